"""Soft sharing between per-task copies of a staged encoder: cross-stitch and NDDR."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._base import register
from ._blocks import (
    _cat_features,
    _FeatureBatchNorm,
    _layout,
    _pointwise,
    _stages_of,
    stage_shapes_of,
)
from ._common import Result, _Model, check_heads, pack, reset_parameters, unique_params, unpack


def _columns(
    encoder: nn.Module | Callable[[], nn.Module], tasks: Sequence[str], reinit: bool
) -> tuple[nn.ModuleDict, nn.Module]:
    """One copy of the encoder's stages per task (and the first encoder copy, for its shapes)."""
    cols = {}
    first: nn.Module | None = None
    for t in tasks:
        if isinstance(encoder, nn.Module):
            enc = copy.deepcopy(encoder)
            if reinit:
                reset_parameters(enc)
        else:
            enc = encoder()
            if not isinstance(enc, nn.Module):
                raise TypeError("the encoder factory must return an nn.Module")
        first = enc if first is None else first
        cols[t] = _stages_of(enc)
    n = {len(c) for c in cols.values()}
    if len(n) != 1:
        raise ValueError("the encoder factory built encoders with different numbers of stages")
    assert first is not None
    return nn.ModuleDict(cols), first


class _ColumnsModel(_Model):
    """One column (copy of the staged encoder) per task with per-task mixers after some stages.

    ``mixers[str(j)][t]`` maps the list of all tasks' stage-``j`` outputs (task order) to task
    ``t``'s input of stage ``j + 1`` (or of its head after the last stage).
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        after_last: bool,
        reinit: bool,
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        self.columns, first = _columns(encoder, self.task_names, reinit)
        # the first copy answers shape questions (stage_shapes, inference); not registered
        self.__dict__["_probe"] = first
        self.n_stages = len(self.columns[self.task_names[0]])
        last = self.n_stages - 1
        self.mix_at = list(range(last)) + ([last] if after_last else [])
        self.heads = nn.ModuleDict(dict(heads))

    def _build_mixers(self, make: Callable[[int, int], nn.Module]) -> None:
        self.mixers = nn.ModuleDict(
            {
                str(j): nn.ModuleDict({t: make(j, i) for i, t in enumerate(self.task_names)})
                for j in self.mix_at
            }
        )

    @property
    def _last_mix(self) -> int:
        return self.mix_at[-1] if self.mix_at else -1

    def _forward(self, x: Any, tasks: tuple[str, ...]) -> Result:
        h: dict[str, Any] = {t: x for t in self.task_names}
        for j in range(self.n_stages):
            active = self.task_names if j <= self._last_mix else list(tasks)
            h = {t: self.columns[t][j](h[t]) for t in active}
            if str(j) in self.mixers:
                xs = [h[s] for s in self.task_names]
                rows = self.task_names if j < self._last_mix else list(tasks)
                h = {t: self.mixers[str(j)][t](xs) for t in rows}
        return {t: self.heads[t](h[t]) for t in tasks}, None, {}

    # The representation: every column's output of the stage before the last mixer (what the
    # last mixer's task rows read). Only shared parameters (the stage copies up to there and the
    # earlier mixers) feed it, and they reach the tasks only through it.
    _has_encode = True

    def _no_representation(self) -> str | None:
        if not self.mix_at:
            return "no mixing layer: the task columns are independent networks"
        return None

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        last_mix = self._last_mix
        h: dict[str, Any] = {t: x for t in self.task_names}
        for j in range(last_mix + 1):
            h = {t: self.columns[t][j](h[t]) for t in self.task_names}
            if j < last_mix:
                xs = [h[s] for s in self.task_names]
                h = {t: self.mixers[str(j)][t](xs) for t in self.task_names}
        return pack([h[t] for t in self.task_names])

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        xs = unpack(features, ctx)
        last_mix = self._last_mix
        h = {t: self.mixers[str(last_mix)][t](xs) for t in tasks}
        for j in range(last_mix + 1, self.n_stages):
            h = {t: self.columns[t][j](h[t]) for t in tasks}
        return {t: self.heads[t](h[t]) for t in tasks}, None, {}

    def _owned(self, task: str) -> list[Any]:
        last_mix = self._last_mix
        owned: list[Any] = [self.heads[task]]
        owned += [self.columns[task][j] for j in range(last_mix + 1, self.n_stages)]
        if last_mix >= 0:
            owned.append(self.mixers[str(last_mix)][task])
        return owned

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Stage copies up to the last mixer and mixers before the last one: their outputs reach
        every task through a later mixer."""
        last_mix = self._last_mix
        return iter(
            unique_params(
                [self.columns[t][j] for t in self.task_names for j in range(last_mix + 1)],
                [self.mixers[str(j)] for j in self.mix_at if j != last_mix],
            )
        )

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The head, the stage copies after the last mixer and the task's row of the last mixer."""
        self._check_task(task)
        return iter(unique_params(self._owned(task)))


class CrossStitchUnit(nn.Module):
    """Task ``t``'s row of a cross-stitch unit: ``sum_s alpha[s] * x_s`` (any tensor shape)."""

    def __init__(self, n_tasks: int, index: int, self_weight: float = 0.9) -> None:
        super().__init__()
        other = (1.0 - self_weight) / (n_tasks - 1) if n_tasks > 1 else 0.0
        alpha = torch.full((n_tasks,), other)
        alpha[index] = self_weight if n_tasks > 1 else 1.0
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack(list(xs), dim=0)
        return (self.alpha.reshape((-1,) + (1,) * (stacked.dim() - 1)) * stacked).sum(dim=0)


@register(
    "cross_stitch",
    paper="Misra, Shrivastava, Gupta & Hebert, 'Cross-stitch Networks for Multi-task Learning', "
    "CVPR 2016",
    description="One encoder copy per task, linearly mixed by cross-stitch units between stages.",
    representation="config",
    needs_staged_encoder=True,
)
class CrossStitch(_ColumnsModel):
    """Cross-stitch networks (Misra et al., CVPR 2016) over a staged encoder.

    Each task has its own copy of the staged encoder. After every stage but the last (and after
    the last with ``after_last=True``) a cross-stitch unit mixes the tasks' outputs:
    ``x̃_t = sum_s alpha_ts x_s``, with scalar ``alpha`` per task pair, initialised to the paper's
    convex combination ``alpha_tt = self_weight`` and ``alpha_ts = (1 - self_weight)/(T - 1)``.
    Mixing is element-wise, so any stage-output shape works (``[B, D]``, tokens, images). The
    paper trains ``alpha`` with a larger learning rate (put :meth:`alpha_parameters` in their own
    optimiser group).

    Args:
        encoder: staged encoder (``stages: nn.ModuleList``) deep-copied once per task (copies keep
            its weights, e.g. a pretrained network, as in the paper), or a zero-argument factory
            building one per task.
        heads: ``{task: module}`` on the task's last-stage output.
        self_weight: initial ``alpha_tt`` (paper: 0.9).
        after_last: also place a unit after the last stage.
        reinit: re-initialise each deep copy (``reset_parameters``) instead of keeping weights.

    Shared parameters: the stage copies up to the last unit (their outputs reach all tasks) and
    all but the last unit. Task ``t``: its row of the last unit, its copies of the stages after
    the last unit, its head. Each task row of a unit is its own parameter (``[T]``).

    Representation: every task column's output of the stage before the last unit (what the last
    unit's task rows read), flattened and concatenated to ``[B, T * F]``; ``decode`` applies the
    last unit, the stages after it and the heads. Without any unit (one stage,
    ``after_last=False``) the columns share nothing and ``encode`` raises
    ``NotImplementedError``. Multi-input batches ``{task: x_t}``: the whole network runs on
    ``x_t`` (units mix samples of one batch) and task ``t``'s output is kept.

    Example:
        >>> import torch
        >>> from polytask.architectures import StagedMLP
        >>> m = CrossStitch(StagedMLP([4, 8, 8]), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)})
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
        {'a': (5, 2), 'b': (5, 1)}
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        self_weight: float = 0.9,
        after_last: bool = False,
        reinit: bool = False,
    ) -> None:
        super().__init__(encoder, heads, after_last, reinit)
        self.__dict__.pop("_probe")
        n = len(self.task_names)
        self._build_mixers(lambda j, i: CrossStitchUnit(n, i, self_weight))

    def alpha_parameters(self) -> Iterator[nn.Parameter]:
        """The cross-stitch coefficients (for a separate optimiser group)."""
        return iter(unique_params(self.mixers))


class NDDRLayer(nn.Module):
    """Task ``t``'s NDDR layer: concatenate all tasks' features, pointwise projection back to
    ``C`` channels (no bias), batch norm, ReLU. Initialised to ``alpha * I`` on the task's own
    block and ``beta * I`` on the others."""

    def __init__(
        self,
        kind: str,
        channels: int,
        n_tasks: int,
        index: int,
        alpha: float = 0.9,
        beta: float = 0.1,
        batch_norm: bool = True,
        momentum: float = 0.05,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.proj = _pointwise(kind, n_tasks * channels, channels, bias=not batch_norm)
        with torch.no_grad():
            w = torch.zeros(channels, n_tasks * channels)
            eye = torch.eye(channels)
            for s in range(n_tasks):
                w[:, s * channels : (s + 1) * channels] = (alpha if s == index else beta) * eye
            self.proj.weight.copy_(w.reshape(self.proj.weight.shape))
            if self.proj.bias is not None:
                self.proj.bias.zero_()
        self.norm = _FeatureBatchNorm(kind, channels, momentum) if batch_norm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return self.act(self.norm(self.proj(_cat_features(self.kind, xs))))


@register(
    "nddr",
    paper="Gao, Ma, Zhao, Liu & Yuille, 'NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by "
    "Neural Discriminative Dimensionality Reduction', CVPR 2019",
    description="One encoder copy per task, fused by NDDR layers (concat + 1x1 conv).",
    representation="config",
    needs_staged_encoder=True,
)
class NDDR(_ColumnsModel):
    """NDDR-CNN (Gao et al., CVPR 2019) over a staged encoder.

    Each task has its own copy of the staged encoder. After every stage but the last (and after
    the last with ``after_last=True``) each task's NDDR layer concatenates all tasks' outputs on
    the feature dimension and reduces them back to the stage's width: ``1x1 conv (no bias) -> BN
    -> ReLU`` for ``[B, C, H, W]`` outputs, ``linear -> BN -> ReLU`` on the last dimension for
    ``[B, D]`` and ``[B, T, D]``. Weights start as ``alpha * I`` on the task's own block and
    ``beta * I`` on every other task's block (paper: 0.9 / 0.1); BN momentum 0.05 as in the
    authors' code.

    Args:
        encoder: staged encoder deep-copied per task (weights kept), or a zero-argument factory.
        heads: ``{task: module}``.
        stage_shapes, example_input: per-sample stage output shapes, or an example batch to infer
            them (default ``encoder.stage_shapes``).
        alpha, beta: initialisation of the own-task and other-task blocks.
        batch_norm: use BN in the NDDR layers (paper: yes).
        momentum: BN momentum.
        after_last: also place NDDR layers after the last stage.
        reinit: re-initialise each deep copy.

    Shared parameters / task parameters, representation: as :class:`CrossStitch` (the last NDDR
    layers are task-specific; the representation is what they read). Multi-input batches run the
    whole network per task input.

    Example:
        >>> import torch
        >>> from polytask.architectures import LeNetStages
        >>> m = NDDR(LeNetStages(), {"a": nn.Linear(50, 10), "b": nn.Linear(50, 10)})
        >>> m(torch.randn(2, 1, 36, 36))["b"].shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        stage_shapes: Sequence[Sequence[int]] | None = None,
        example_input: Any = None,
        alpha: float = 0.9,
        beta: float = 0.1,
        batch_norm: bool = True,
        momentum: float = 0.05,
        after_last: bool = False,
        reinit: bool = False,
    ) -> None:
        super().__init__(encoder, heads, after_last, reinit)
        shapes = stage_shapes_of(self.__dict__.pop("_probe"), stage_shapes, example_input)
        self.stage_shapes = shapes
        n = len(self.task_names)

        def make(j: int, i: int) -> nn.Module:
            kind, c = _layout(shapes[j])
            return NDDRLayer(kind, c, n, i, alpha, beta, batch_norm, momentum)

        self._build_mixers(make)
