"""Multi-task attention network (MTAN) over any staged encoder."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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
from ._common import Result, _Model, check_heads, unique_params


def _attention_module(kind: str, cin: int, hidden: int, cout: int) -> nn.Module:
    """Paper's attention block: pointwise-BN-ReLU-pointwise-BN-sigmoid (BN for conv layouts)."""
    if kind.startswith("conv"):
        return nn.Sequential(
            _pointwise(kind, cin, hidden),
            _FeatureBatchNorm(kind, hidden),
            nn.ReLU(),
            _pointwise(kind, hidden, cout),
            _FeatureBatchNorm(kind, cout),
            nn.Sigmoid(),
        )
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout), nn.Sigmoid())


@register(
    "mtan",
    paper="Liu, Johns & Davison, 'End-To-End Multi-Task Learning With Attention', CVPR 2019",
    description="Shared staged encoder with per-task soft attention masks at every stage.",
    needs_staged_encoder=True,
)
class MTAN(_Model):
    """Multi-task attention network (Liu, Johns & Davison, CVPR 2019) over a staged encoder.

    The shared encoder (stages ``s_j``) runs once. Every task ``t`` has one attention module per
    stage producing a soft mask ``a_j^t`` in ``(0, 1)`` with the shape of the shared stage output
    ``p_j``; the task's features are ``â_j^t = a_j^t * p_j``. The mask reads ``p_0`` at the first
    stage and ``[p_j ; f_j(â_{j-1}^t)]`` (concatenated features) later, where ``f_j`` maps the
    previous attended features to stage ``j``'s shape, as the paper's shared feature extractor
    between attention modules. Task ``t``'s head reads ``â_L^t``.

    Attention modules follow the paper: for channels-first stage outputs (``[B, C, H, W]``)
    ``1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid``; for ``[B, D]`` and token outputs
    ``[B, T, D]`` the same with linear layers on the feature dimension (without BN).

    Args:
        encoder: staged encoder (``stages: nn.ModuleList``, see :class:`Stages`), shared.
        heads: ``{task: module}`` reading the task's attended last-stage features.
        stage_shapes: per-sample output shape of every stage; default ``encoder.stage_shapes``,
            else inferred from ``example_input``.
        example_input: a small example batch to infer the stage shapes.
        transitions: the maps ``f_j`` for ``j >= 1`` (``len(stages) - 1`` modules, shared by the
            tasks), each from stage ``j - 1``'s output shape to stage ``j``'s; default ``None``
            reuses the shared stage ``j`` itself (no extra parameters, one more pass of the stage
            per task).
        hidden_ratio: width of the attention modules' hidden layer relative to the stage's
            channels (paper: 1 for basic blocks).

    Shared parameters: the encoder and the transitions. Task ``t``: its attention modules and its
    head. No common representation (each task reads its own attended features): ``encode``
    raises ``NotImplementedError``; use the engine's params mode.

    Multi-input batches ``{task: x_t}``: the shared stages run on each task's input and only task
    ``t``'s attention branch is computed.

    Example:
        >>> import torch
        >>> from polytask.architectures import StagedMLP
        >>> m = MTAN(StagedMLP([4, 8, 8]), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)})
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
        {'a': (5, 2), 'b': (5, 1)}
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        stage_shapes: Sequence[Sequence[int]] | None = None,
        example_input: Any = None,
        transitions: Sequence[nn.Module] | None = None,
        hidden_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        stages = _stages_of(encoder)
        shapes = stage_shapes_of(encoder, stage_shapes, example_input)
        self.encoder = encoder
        if transitions is not None:
            transitions = list(transitions)
            if len(transitions) != len(stages) - 1:
                raise ValueError(f"{len(transitions)} transitions for {len(stages)} stages")
            self.transitions: nn.ModuleList | None = nn.ModuleList(transitions)
        else:
            self.transitions = None
        self.stage_shapes = shapes
        attention: dict[str, nn.ModuleList] = {}
        for t in self.task_names:
            mods = []
            for j, shape in enumerate(shapes):
                kind, c = _layout(shape)
                hidden = max(1, round(c * hidden_ratio))
                mods.append(_attention_module(kind, c if j == 0 else 2 * c, hidden, c))
            attention[t] = nn.ModuleList(mods)
        self.attention = nn.ModuleDict(attention)
        self._kinds = [_layout(s)[0] for s in shapes]
        self.heads = nn.ModuleDict(dict(heads))

    def _forward(self, x: Any, tasks: tuple[str, ...]) -> Result:
        stages = self.encoder.stages
        att: dict[str, Tensor] = {}
        h = x
        for j, stage in enumerate(stages):
            h = stage(h)
            for t in tasks:
                if j == 0:
                    inp = h
                else:
                    f = self.transitions[j - 1] if self.transitions is not None else stage
                    inp = _cat_features(self._kinds[j], [h, f(att[t])])
                att[t] = self.attention[t][j](inp) * h
        return {t: self.heads[t](att[t]) for t in tasks}, None, {}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(unique_params(self.encoder, self.transitions))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(unique_params(self.attention[task], self.heads[task]))
