"""SegNet encoder-decoders for dense multi-task prediction (NYUv2, Cityscapes).

The networks of the dense-prediction experiments of MTAN, CAGrad, Nash-MTL and FAMO
(reference: ``lorenmt/mtan`` ``model_segnet_*.py``, reused as ``experiments/nyuv2/models.py`` in
``AvivNavon/nash-mtl``):

* :class:`SegNet` -- Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional
  Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017: a VGG-style encoder of
  ``len(filters)`` blocks (3x3 conv - BN - ReLU; one conv per block in the first two blocks, two
  after that, plus the block's entry conv), 2x2 max pooling with indices, and a mirrored decoder
  that unpools with those indices. Hard sharing: the whole encoder-decoder is shared and each task
  has a prediction head (3x3 conv, then 1x1 conv to the task's channels), the "split" model of
  MTAN's paper.
* :class:`SegNetMTAN` -- Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
  CVPR 2019: the same shared SegNet plus, for every task, a soft-attention module at every encoder
  and decoder block (1x1 conv - BN - ReLU - 1x1 conv - BN - sigmoid) applied to the shared
  features, chained through the blocks by shared 3x3 conv layers.

Outputs are ``{task: tensor}``: segmentation logits ``[B, C, H, W]``, depth ``[B, 1, H, W]``,
surface normals ``[B, 3, H, W]`` normalised to unit length per pixel (as the reference does).
Heads are built from ``tasks = {name: (out_channels, kind)}`` with ``kind`` one of
``"segmentation"``, ``"depth"``, ``"normal"``.

Shared and task parameters: the heads (``pred`` layers) are task-specific; everything else --
including MTAN's attention modules -- is returned by :meth:`shared_parameters`, exactly as the
reference code passes them to the gradient methods (its ``shared_parameters`` is every parameter
whose name lacks ``pred``). Initialisation as the reference: Xavier-normal conv weights, zero
biases, BN weight 1 and bias 0. The input height and width must be divisible by
``2 ** len(filters)`` (288x384 and 128x256 are, for the default five blocks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..architectures import MultiTaskModel

__all__ = ["DENSE_KINDS", "SegNet", "SegNetMTAN"]

DENSE_KINDS = ("segmentation", "depth", "normal")
_DEFAULT_FILTERS = (64, 128, 256, 512, 512)


def _conv(cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _att(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, cout, 1),
        nn.BatchNorm2d(cout),
        nn.Sigmoid(),
    )


def _head(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 1))


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_tasks(tasks: Mapping[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    if not tasks:
        raise ValueError("SegNet: at least one task is needed")
    out = {}
    for name, spec in tasks.items():
        channels, kind = spec
        if kind not in DENSE_KINDS:
            raise ValueError(
                f"SegNet: task {name!r} has kind {kind!r}; expected one of {DENSE_KINDS}"
            )
        if kind == "normal" and channels != 3:
            raise ValueError(f"SegNet: normal task {name!r} must have 3 channels, got {channels}")
        out[name] = (int(channels), kind)
    return out


class _Backbone(nn.Module):
    """The shared SegNet encoder-decoder; returns every intermediate MTAN's attention reads."""

    def __init__(self, filters: Sequence[int], in_channels: int = 3) -> None:
        super().__init__()
        f = [int(c) for c in filters]
        if len(f) < 2:
            raise ValueError(f"SegNet: filters needs at least two blocks, got {list(filters)}")
        self.filters = f
        n = len(f)
        self.encoder_block = nn.ModuleList(
            [_conv(in_channels if j == 0 else f[j - 1], f[j]) for j in range(n)]
        )
        self.conv_block_enc = nn.ModuleList(
            [
                _conv(f[j], f[j]) if j < 2 else nn.Sequential(_conv(f[j], f[j]), _conv(f[j], f[j]))
                for j in range(n)
            ]
        )
        # decoder of level k maps f[k] -> f[k-1] (f[0] at the top)
        self.decoder_block = nn.ModuleList([_conv(f[k], f[max(k - 1, 0)]) for k in range(n)])
        self.conv_block_dec = nn.ModuleList(
            [
                _conv(f[max(k - 1, 0)], f[max(k - 1, 0)])
                if k < 2
                else nn.Sequential(_conv(f[k - 1], f[k - 1]), _conv(f[k - 1], f[k - 1]))
                for k in range(n)
            ]
        )
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

    def forward(self, x: Tensor) -> dict[str, list[Tensor]]:
        n = len(self.filters)
        if x.ndim != 4 or x.shape[-2] % 2**n or x.shape[-1] % 2**n:
            raise ValueError(
                f"SegNet: input must be [B, C, H, W] with H and W divisible by 2**{n}, got "
                f"{tuple(x.shape)}"
            )
        enc_in, enc_out, indices = [], [], []
        h = x
        for j in range(n):
            a = self.encoder_block[j](h)
            b = self.conv_block_enc[j](a)
            h, idx = self.pool(b)
            enc_in.append(a)
            enc_out.append(b)
            indices.append(idx)
        ups, dec_out = [], []
        for i in range(n):
            k = n - 1 - i
            u = self.unpool(h, indices[k])
            h = self.conv_block_dec[k](self.decoder_block[k](u))
            ups.append(u)
            dec_out.append(h)
        return {"enc_in": enc_in, "enc_out": enc_out, "ups": ups, "dec_out": dec_out}


class _DenseModel(MultiTaskModel):
    def __init__(
        self, tasks: Mapping[str, tuple[int, str]], filters: Sequence[int], in_channels: int
    ) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        self.task_names = list(self.tasks)
        self.backbone = _Backbone(filters, in_channels)
        top = self.backbone.filters[0]
        self.pred = nn.ModuleDict({t: _head(top, c) for t, (c, _) in self.tasks.items()})

    def _predict(self, task: str, features: Tensor) -> Tensor:
        out = self.pred[task](features)
        if self.tasks[task][1] == "normal":
            out = out / out.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)
        return out

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(self.pred[task].parameters())

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        head = {id(p) for p in self.pred.parameters()}
        return (p for p in self.parameters() if id(p) not in head)


class SegNet(_DenseModel):
    """Hard-sharing SegNet with one prediction head per task (see the module docstring).

    >>> m = SegNet({"seg": (13, "segmentation"), "depth": (1, "depth")}, filters=(4, 8))
    >>> {k: tuple(v.shape) for k, v in m(torch.randn(2, 3, 8, 8)).items()}
    {'seg': (2, 13, 8, 8), 'depth': (2, 1, 8, 8)}
    """

    def __init__(
        self,
        tasks: Mapping[str, tuple[int, str]],
        filters: Sequence[int] = _DEFAULT_FILTERS,
        in_channels: int = 3,
    ) -> None:
        super().__init__(tasks, filters, in_channels)
        _init(self)

    def encode(self, x: Any) -> Tensor:
        return self.backbone(x)["dec_out"][-1]

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        return {t: self._predict(t, features) for t in self.task_names}


class SegNetMTAN(_DenseModel):
    """SegNet with MTAN's per-task attention at every encoder and decoder block.

    No common representation (every task reads its own attended features), so ``encode`` raises
    and gradient methods use the engine's ``params`` mode.

    >>> m = SegNetMTAN({"seg": (7, "segmentation"), "n": (3, "normal")}, filters=(4, 8, 8))
    >>> out = m(torch.randn(2, 3, 16, 16))
    >>> tuple(out["seg"].shape), bool(torch.allclose(out["n"].norm(dim=1), torch.tensor(1.0)))
    ((2, 7, 16, 16), True)
    """

    def __init__(
        self,
        tasks: Mapping[str, tuple[int, str]],
        filters: Sequence[int] = _DEFAULT_FILTERS,
        in_channels: int = 3,
    ) -> None:
        super().__init__(tasks, filters, in_channels)
        f = self.backbone.filters
        n = len(f)
        out_of = [f[max(k - 1, 0)] for k in range(n)]  # decoder output channels per level
        self.encoder_att = nn.ModuleDict(
            {
                t: nn.ModuleList([_att(f[j] if j == 0 else 2 * f[j], f[j], f[j]) for j in range(n)])
                for t in self.task_names
            }
        )
        self.decoder_att = nn.ModuleDict(
            {
                t: nn.ModuleList([_att(f[k] + out_of[k], out_of[k], out_of[k]) for k in range(n)])
                for t in self.task_names
            }
        )
        # shared layers chaining the attention blocks
        self.encoder_block_att = nn.ModuleList(
            [_conv(f[j], f[j + 1] if j < n - 1 else f[j]) for j in range(n)]
        )
        self.decoder_block_att = nn.ModuleList([_conv(f[k], out_of[k]) for k in range(n)])
        _init(self)

    def forward(self, x: Any) -> dict[str, Tensor]:
        g = self.backbone(x)
        n = len(self.backbone.filters)
        out = {}
        for t in self.task_names:
            h: Tensor | None = None
            for j in range(n):
                inp = g["enc_in"][j] if h is None else torch.cat([g["enc_in"][j], h], dim=1)
                a = self.encoder_att[t][j](inp) * g["enc_out"][j]
                h = F.max_pool2d(self.encoder_block_att[j](a), kernel_size=2, stride=2)
            assert h is not None
            for i in range(n):
                k = n - 1 - i
                d = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
                d = self.decoder_block_att[k](d)
                att = self.decoder_att[t][k](torch.cat([g["ups"][i], d], dim=1))
                h = att * g["dec_out"][i]
            out[t] = self._predict(t, h)
        return out
