"""Building blocks for the architectures: an MLP, the staged-encoder protocol and small encoders.

A *staged encoder* is any module with an attribute ``stages: nn.ModuleList`` whose stages run in
sequence (stage ``j`` maps the output of stage ``j - 1`` to its own output); calling the encoder
runs all of them. MTAN, cross-stitch, NDDR, learning-to-branch and task groups act between or after
the stages, so they accept any encoder of this shape (CNN blocks, MLP layers, transformer
blocks). :class:`Stages` turns a list of modules into one; :class:`StagedMLP` and
:class:`LeNetStages` are ready-made ones.

An encoder may also expose ``stage_shapes``: the per-sample shape of each stage output (without
the batch dimension). Architectures that build layers on the stage outputs (MTAN's attention,
NDDR's 1x1 convolutions) read it, or infer it with :func:`infer_stage_shapes` from an example
input.

Stage outputs come in three layouts, recognised from the per-sample shape:

* ``(C, H, W)`` (4-D batches): channels first; layers on them are 1x1 convolutions.
* ``(T, D)`` (3-D batches, tokens): layers act on the last dimension (linear).
* ``(D,)`` (2-D batches): linear layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "MLP",
    "FieldEmbedding",
    "LeNetStages",
    "StagedEncoder",
    "StagedMLP",
    "Stages",
    "infer_stage_shapes",
    "stage_shapes_of",
]

_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}


def _make_act(act: str | Callable[[], nn.Module] | None) -> nn.Module:
    if act is None:
        return nn.Identity()
    if isinstance(act, str):
        try:
            return _ACTS[act.lower()]()
        except KeyError:
            raise ValueError(f"unknown activation {act!r}; known: {sorted(_ACTS)}") from None
    module = act()
    if not isinstance(module, nn.Module):
        raise TypeError("act must be a name or a zero-argument callable returning an nn.Module")
    return module


class MLP(nn.Sequential):
    """Multi-layer perceptron ``Linear -> act -> dropout -> ... -> Linear``.

    Args:
        sizes: layer widths ``[in, hidden..., out]`` (at least two entries).
        act: activation between layers: a name (``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"``,
            ...) or a zero-argument callable returning a module (e.g. ``nn.ReLU``).
        dropout: dropout probability after each hidden activation (0 disables it).
        last_act: also apply the activation (and dropout) after the last layer, e.g. for an
            expert or encoder whose output feeds further layers.

    Acts on the last dimension, so ``[B, D]`` and ``[B, T, D]`` inputs both work.

    Example:
        >>> import torch
        >>> MLP([4, 8, 2])(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        sizes: Sequence[int],
        act: str | Callable[[], nn.Module] | None = "relu",
        dropout: float = 0.0,
        last_act: bool = False,
    ) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {sizes}")
        _make_act(act)  # validate the activation even when no layer uses it
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or last_act:
                layers.append(_make_act(act))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.sizes = sizes


class FieldEmbedding(nn.Module):
    """Embeddings of categorical fields, looked up and concatenated (the shared embedding layer
    of recommendation models such as ESMM).

    The input holds one integer category code per field, ``x[:, j]`` in
    ``[0, cardinalities[j])``; every field has its own ``dim``-wide table (stored as one
    ``nn.Embedding`` with per-field offsets). A multi-valued field (e.g. a movie's genres) can be
    given as one two-category field per value. A code outside its field's range (which would
    otherwise read another field's rows) raises a ``ValueError`` naming the field (checked
    eagerly, one host read per call; skipped while ``torch.compile`` traces).

    Args:
        cardinalities: number of categories of each field.
        dim: embedding width per field (initialised ``N(0, 1)``, PyTorch's default).

    Example:
        >>> import torch
        >>> emb = FieldEmbedding([3, 5, 2], dim=4)
        >>> emb(torch.tensor([[0, 4, 1], [2, 0, 0]])).shape  # [B, fields * dim]
        torch.Size([2, 12])
    """

    offsets: Tensor
    limits: Tensor

    def __init__(self, cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if not cards or min(cards) < 1:
            raise ValueError(f"cardinalities must be positive integers, got {list(cardinalities)}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.cardinalities = cards
        self.dim = int(dim)
        self.out_features = len(cards) * self.dim
        self.embedding = nn.Embedding(sum(cards), self.dim)
        starts = torch.tensor([0, *itertools.accumulate(cards)][:-1])
        self.register_buffer("offsets", starts, persistent=False)
        self.register_buffer("limits", torch.tensor(cards), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != len(self.cardinalities):
            raise ValueError(
                f"FieldEmbedding: expected {len(self.cardinalities)} fields in the last "
                f"dimension, got input of shape {tuple(x.shape)}"
            )
        x = x.long()
        if not torch.compiler.is_compiling():
            bad = (x < 0) | (x >= self.limits)
            if bool(bad.any()):
                j = int(bad.reshape(-1, len(self.cardinalities)).any(0).nonzero()[0])
                col = x[..., j]
                raise ValueError(
                    f"FieldEmbedding: field {j} has {self.cardinalities[j]} categories (codes "
                    f"0..{self.cardinalities[j] - 1}), got codes from {int(col.min())} to "
                    f"{int(col.max())}"
                )
        return self.embedding(x + self.offsets).flatten(-2)


@runtime_checkable
class StagedEncoder(Protocol):
    """Protocol of a staged encoder: ``stages`` run in sequence, each on the previous output.

    Optionally, ``stage_shapes`` gives the per-sample output shape of every stage.
    """

    stages: nn.ModuleList

    def __call__(self, x: Any) -> Any: ...


class Stages(nn.Module):
    """A staged encoder built from a list of modules (each one stage).

    Args:
        stages: the stage modules, run in order.
        stage_shapes: optional per-sample output shape of each stage (no batch dimension).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> enc = Stages([nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2))])
        >>> enc(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        stages: Iterable[nn.Module],
        stage_shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        if len(self.stages) == 0:
            raise ValueError("a staged encoder needs at least one stage")
        if stage_shapes is not None:
            shapes = [tuple(int(d) for d in s) for s in stage_shapes]
            if len(shapes) != len(self.stages):
                raise ValueError(
                    f"stage_shapes has {len(shapes)} entries for {len(self.stages)} stages"
                )
            self.stage_shapes = shapes

    def forward(self, x: Any) -> Any:
        for stage in self.stages:
            x = stage(x)
        return x


class StagedMLP(Stages):
    """An MLP whose layers are stages: stage ``j`` is ``Linear(sizes[j], sizes[j+1])`` + act.

    Every stage (the last one too) ends with the activation, so the output is a feature vector
    for task heads. ``stage_shapes`` is ``[(sizes[1],), (sizes[2],), ...]``.

    Example:
        >>> import torch
        >>> enc = StagedMLP([4, 8, 8])
        >>> len(enc.stages), enc.stage_shapes, enc(torch.randn(2, 4)).shape
        (2, [(8,), (8,)], torch.Size([2, 8]))
    """

    def __init__(
        self,
        sizes: Sequence[int],
        act: str | Callable[[], nn.Module] | None = "relu",
        dropout: float = 0.0,
    ) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"StagedMLP needs at least two sizes, got {sizes}")
        stages = []
        for a, b in itertools.pairwise(sizes):
            layers: list[nn.Module] = [nn.Linear(a, b), _make_act(act)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            stages.append(nn.Sequential(*layers))
        super().__init__(stages, [(b,) for b in sizes[1:]])


class LeNetStages(Stages):
    """LeNet-style staged CNN for small square images (MultiMNIST), three stages.

    The MultiMNIST encoder of Sener & Koltun (NeurIPS 2018), split into stages (``s`` is the
    image size, ``k1, k2`` the kernel sizes):

    1. ``Conv2d(in, c1, k1) -> MaxPool2d(2) -> ReLU``: ``[c1, s1, s1]``, ``s1 = (s - k1 + 1) // 2``
    2. ``Conv2d(c1, c2, k2) -> MaxPool2d(2) -> ReLU``: ``[c2, s2, s2]``, ``s2 = (s1 - k2 + 1) // 2``
    3. ``Flatten -> Linear(c2 * s2 * s2, features) -> ReLU``: ``[features]``

    Args:
        in_channels: input channels (1 for MultiMNIST).
        channels: ``(c1, c2)``, default ``(10, 20)``.
        features: width of the last (linear) stage, default 50.
        image_size: input height and width (default 36).
        kernel_sizes: ``(k1, k2)``, default ``(5, 5)``; ``(9, 5)`` is the encoder of
            :func:`polytask.recipes.conv_encoder` (what ``hps`` uses in configs).

    Example:
        >>> import torch
        >>> enc = LeNetStages()
        >>> enc.stage_shapes
        [(10, 16, 16), (20, 6, 6), (50,)]
        >>> enc(torch.randn(2, 1, 36, 36)).shape
        torch.Size([2, 50])
        >>> LeNetStages(kernel_sizes=(9, 5)).stage_shapes
        [(10, 14, 14), (20, 5, 5), (50,)]
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (10, 20),
        features: int = 50,
        image_size: int = 36,
        kernel_sizes: Sequence[int] = (5, 5),
    ) -> None:
        c1, c2 = (int(c) for c in channels)
        k1, k2 = (int(k) for k in kernel_sizes)
        s1 = (image_size - k1 + 1) // 2
        s2 = (s1 - k2 + 1) // 2
        if s1 < 1 or s2 < 1:
            raise ValueError(
                f"image_size {image_size} is too small for LeNetStages with kernels {(k1, k2)}"
            )
        stages = [
            nn.Sequential(nn.Conv2d(in_channels, c1, k1), nn.MaxPool2d(2), nn.ReLU()),
            nn.Sequential(nn.Conv2d(c1, c2, k2), nn.MaxPool2d(2), nn.ReLU()),
            nn.Sequential(nn.Flatten(), nn.Linear(c2 * s2 * s2, features), nn.ReLU()),
        ]
        super().__init__(stages, [(c1, s1, s1), (c2, s2, s2), (features,)])


def infer_stage_shapes(encoder: nn.Module, example_input: Any) -> list[tuple[int, ...]]:
    """Per-sample output shape of every stage of ``encoder`` on ``example_input``.

    Runs the stages once without gradients, in eval mode (so batch statistics and dropout are not
    touched; the training flag is restored afterwards).
    """
    stages = _stages_of(encoder)
    was_training = encoder.training
    encoder.eval()
    shapes = []
    try:
        with torch.no_grad():
            h = example_input
            for stage in stages:
                h = stage(h)
                if not isinstance(h, Tensor):
                    raise TypeError("stage outputs must be tensors to infer their shapes")
                shapes.append(tuple(h.shape[1:]))
    finally:
        encoder.train(was_training)
    return shapes


def stage_shapes_of(
    encoder: nn.Module,
    stage_shapes: Sequence[Sequence[int]] | None = None,
    example_input: Any = None,
) -> list[tuple[int, ...]]:
    """Stage output shapes: given explicitly, else ``encoder.stage_shapes``, else inferred."""
    n = len(_stages_of(encoder))
    if stage_shapes is None:
        stage_shapes = getattr(encoder, "stage_shapes", None)
    if stage_shapes is None:
        if example_input is None:
            raise ValueError(
                "the per-stage output shapes are unknown: pass stage_shapes, an example_input, "
                "or an encoder with a stage_shapes attribute"
            )
        stage_shapes = infer_stage_shapes(encoder, example_input)
    shapes = [tuple(int(d) for d in s) for s in stage_shapes]
    if len(shapes) != n:
        raise ValueError(f"{len(shapes)} stage shapes for {n} stages")
    return shapes


def _stages_of(encoder: nn.Module) -> nn.ModuleList:
    stages = getattr(encoder, "stages", None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        raise TypeError(
            f"{type(encoder).__name__} is not a staged encoder: it needs a non-empty "
            "'stages: nn.ModuleList' attribute (see polytask.architectures.Stages)"
        )
    return stages


def _layout(shape: Sequence[int]) -> tuple[str, int]:
    """``("conv2d"|"conv3d"|"linear", channels)`` for a per-sample stage output shape."""
    if len(shape) == 3:
        return "conv2d", int(shape[0])
    if len(shape) == 4:
        return "conv3d", int(shape[0])
    if len(shape) in (1, 2):
        return "linear", int(shape[-1])
    raise ValueError(f"unsupported per-sample stage output shape {tuple(shape)}")


def _pointwise(kind: str, cin: int, cout: int, bias: bool = True) -> nn.Module:
    """A 1x1 convolution (channels first) or a linear layer on the last dimension."""
    if kind == "conv2d":
        return nn.Conv2d(cin, cout, 1, bias=bias)
    if kind == "conv3d":
        return nn.Conv3d(cin, cout, 1, bias=bias)
    return nn.Linear(cin, cout, bias=bias)


class _FeatureBatchNorm(nn.Module):
    """Batch norm over the feature dimension of any layout (channels first or last)."""

    def __init__(self, kind: str, channels: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv2d":
            self.bn: nn.Module = nn.BatchNorm2d(channels, momentum=momentum)
        elif kind == "conv3d":
            self.bn = nn.BatchNorm3d(channels, momentum=momentum)
        else:
            self.bn = nn.BatchNorm1d(channels, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "linear" and x.dim() == 3:
            return self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.bn(x)


def _cat_features(kind: str, xs: Sequence[Tensor]) -> Tensor:
    """Concatenate along the feature dimension (1 for channels first, -1 otherwise)."""
    return torch.cat(list(xs), dim=1 if kind.startswith("conv") else -1)
