"""Customized gate control (CGC) and progressive layered extraction (PLE)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import register
from ._common import (
    ExpertSpec,
    Result,
    _Model,
    check_heads,
    flatten_batch,
    has_trainable,
    make_modules,
    unique_params,
)
from ._mmoe import mix_experts

_PAPER = (
    "Tang et al., 'Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model "
    "for Personalized Recommendations', RecSys 2020"
)


@register(
    "ple",
    paper=_PAPER,
    description="Stacked extraction layers of shared and task-specific experts with gates.",
    representation="config",
    gates=True,
)
class PLE(_Model):
    """Progressive layered extraction (Tang et al., RecSys 2020).

    ``n_levels`` extraction layers. Level ``l`` has ``n_shared`` shared experts and
    ``n_specific[t]`` experts of each task ``t``. Task ``t``'s gate mixes its own experts and the
    shared ones, reading task ``t``'s input of the level; below the last level a shared gate mixes
    *all* experts of the level and reads the shared input. The next level's task-``t`` experts and
    gate read task ``t``'s output, its shared experts and shared gate read the shared output. The
    last level has no shared gate; its task outputs feed the towers. ``n_levels=1`` is CGC
    (:class:`CGC`). Gates are linear + softmax on the flattened input, as in the paper.

    Args:
        expert_factory: zero-argument callable or ``nn.Module`` template (deep-copied and
            re-initialised) building an expert; or a sequence with one of these per level, since
            level ``l > 0`` experts read the outputs of level ``l - 1``'s experts.
        heads: the towers ``{task: module}`` on the last level's task outputs.
        gate_in_features: per-sample width of the gates' input per level (flattened), one int per
            level; or one int for level 0 (the input, or ``gate_input(x)``) with
            ``expert_out_features`` giving the (flattened) expert output width of the levels below.
        n_shared: shared experts per level (``>= 0``).
        n_specific: experts per task per level: one int or ``{task: int}``.
        n_levels: number of extraction layers (``>= 1``).
        expert_out_features: per-sample number of elements of an expert output; needed when
            ``gate_in_features`` is one int and ``n_levels > 1``.
        gate_input: optional module giving level 0's gates their input from the batch (flattened);
            its parameters are shared.

    Shared parameters (used by several tasks' losses): all shared experts and shared gates,
    task experts below the last level (the shared gate of their level mixes them), task gates
    below level ``n_levels - 2`` (their output reaches the next shared gate), ``gate_input``.
    Task ``t``: its last-level experts, its gates of the last two levels, its tower.

    Representation: none for ``n_levels > 1`` (``encode`` raises ``NotImplementedError``): the
    last level's task inputs depend on shared parameters (earlier levels) and on task gates, so no
    tensor carries all shared dependence while holding only shared parameters; train in the
    engine's params mode. For one level see :class:`CGC`.

    Multi-input batches ``{task: x_t}``: the whole network runs on each task's input and only
    task ``t``'s last-level branch is computed for it.

    ``last_gate_weights``: ``{"<level>/<task>" | "<level>/shared": [B, n_inputs]}`` softmax
    weights of the last forward.

    Example:
        >>> import torch
        >>> from polytask.architectures import MLP
        >>> heads = {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)}
        >>> m = PLE(lambda: MLP([8, 8], last_act=True), heads, gate_in_features=8,
        ...         expert_out_features=8, n_shared=2, n_specific=1, n_levels=2)
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 8)).items()}
        {'a': (5, 2), 'b': (5, 1)}
    """

    _has_encode = True

    def __init__(
        self,
        expert_factory: ExpertSpec | Sequence[ExpertSpec],
        heads: Mapping[str, nn.Module],
        gate_in_features: int | Sequence[int],
        n_shared: int = 1,
        n_specific: int | Mapping[str, int] = 1,
        n_levels: int = 2,
        expert_out_features: int | None = None,
        gate_input: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        if n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {n_levels}")
        if n_shared < 0:
            raise ValueError(f"n_shared must be >= 0, got {n_shared}")
        self.n_levels, self.n_shared = int(n_levels), int(n_shared)
        if isinstance(n_specific, Mapping):
            missing = set(self.task_names) - set(n_specific)
            if missing:
                raise ValueError(f"n_specific lacks the tasks {sorted(missing)}")
            self.n_specific = {t: int(n_specific[t]) for t in self.task_names}
        else:
            self.n_specific = {t: int(n_specific) for t in self.task_names}
        for t, n in self.n_specific.items():
            if n < 0 or n + self.n_shared < 1:
                raise ValueError(f"task {t!r}'s gate would mix {n + self.n_shared} experts")
        specs = (
            list(expert_factory)
            if isinstance(expert_factory, (list, tuple))
            else [expert_factory] * self.n_levels
        )
        if len(specs) != self.n_levels:
            raise ValueError(f"{len(specs)} expert factories for {self.n_levels} levels")
        if isinstance(gate_in_features, int):
            if self.n_levels > 1 and expert_out_features is None:
                raise ValueError("n_levels > 1 needs expert_out_features or per-level gate widths")
            dims = [int(gate_in_features)] + [int(expert_out_features or 0)] * (self.n_levels - 1)
        else:
            dims = [int(d) for d in gate_in_features]
            if len(dims) != self.n_levels:
                raise ValueError(f"{len(dims)} gate widths for {self.n_levels} levels")
        self.gate_in_features = dims
        n_all = self.n_shared + sum(self.n_specific.values())

        self.shared_experts = nn.ModuleList(
            nn.ModuleList(make_modules(specs[lvl], self.n_shared)) for lvl in range(self.n_levels)
        )
        self.task_experts = nn.ModuleList(
            nn.ModuleDict(
                {
                    t: nn.ModuleList(make_modules(specs[lvl], self.n_specific[t]))
                    for t in self.task_names
                }
            )
            for lvl in range(self.n_levels)
        )
        self.task_gates = nn.ModuleList(
            nn.ModuleDict(
                {
                    t: nn.Linear(dims[lvl], self.n_shared + self.n_specific[t])
                    for t in self.task_names
                }
            )
            for lvl in range(self.n_levels)
        )
        self.shared_gates = nn.ModuleList(
            nn.Linear(dims[lvl], n_all) for lvl in range(self.n_levels - 1)
        )
        self.gate_input = gate_input
        self.heads = nn.ModuleDict(dict(heads))

    def _prefix(self, x: Any, tasks: tuple[str, ...]) -> dict[str, Any]:
        """Levels ``0 .. L-2``: the last level's shared input and the needed tasks' inputs."""
        last = self.n_levels - 1
        src0 = flatten_batch(self.gate_input(x) if self.gate_input is not None else x)
        shared_h: Any = x
        shared_src = src0
        task_h: dict[str, Any] = {t: x for t in self.task_names}
        task_src: dict[str, Tensor] = {t: src0 for t in self.task_names}
        gates: dict[str, Tensor] = {}
        for lvl in range(last):
            sh = [e(shared_h) for e in self.shared_experts[lvl]]
            # every task's experts feed this level's shared gate
            sp = {t: [e(task_h[t]) for e in self.task_experts[lvl][t]] for t in self.task_names}
            # a task's gate output matters for other tasks only if the next level has a shared gate
            gate_tasks = self.task_names if lvl + 1 < last else list(tasks)
            new_h: dict[str, Tensor] = {}
            for t in gate_tasks:
                w = F.softmax(self.task_gates[lvl][t](task_src[t]), dim=-1)
                new_h[t] = mix_experts(w, torch.stack(sh + sp[t], dim=1))
                gates[f"{lvl}/{t}"] = w.detach()
            w = F.softmax(self.shared_gates[lvl](shared_src), dim=-1)
            everything = sh + [h for t in self.task_names for h in sp[t]]
            shared_h = mix_experts(w, torch.stack(everything, dim=1))
            gates[f"{lvl}/shared"] = w.detach()
            task_h = new_h
            shared_src = flatten_batch(shared_h)
            task_src = {t: flatten_batch(h) for t, h in new_h.items()}
        return {
            "shared_h": shared_h,
            "task_h": {t: task_h[t] for t in tasks},
            "gate_src": {t: task_src[t] for t in tasks},
            "gates": gates,
        }

    def _shared_outputs(self, shared_h: Any) -> Tensor | None:
        outs = [e(shared_h) for e in self.shared_experts[self.n_levels - 1]]
        return torch.stack(outs, dim=1) if outs else None

    def _forward(self, x: Any, tasks: tuple[str, ...]) -> Result:
        ctx = self._prefix(x, tasks)
        return self._last_level(self._shared_outputs(ctx["shared_h"]), ctx, tasks)

    def _no_representation(self) -> str | None:
        if self.n_levels > 1:
            return (
                "with n_levels > 1 the last level's task inputs depend on shared parameters "
                "and on task gates"
            )
        if self.n_shared == 0:
            return "n_shared=0: no expert is shared"
        if has_trainable(self.gate_input):
            return "the gates read a learned gate_input, a shared module outside the experts"
        return None

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        ctx = self._prefix(x, tasks)  # one level: task inputs are x, gate sources parameter-free
        features = self._shared_outputs(ctx.pop("shared_h"))
        assert features is not None
        return features, ctx

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        self._ctx_tensor(ctx, "gate_src", features)
        return self._last_level(features, ctx, tasks)

    def _last_level(self, shared: Tensor | None, ctx: Any, tasks: tuple[str, ...]) -> Result:
        """The last level's task experts and gates (mixing the shared experts' outputs
        ``shared`` ``[B, n_shared, *D]``) and the towers."""
        last = self.n_levels - 1
        gates = dict(ctx["gates"])
        out: dict[str, Tensor] = {}
        for t in tasks:
            own = [e(ctx["task_h"][t]) for e in self.task_experts[last][t]]
            parts = ([shared] if shared is not None else []) + (
                [torch.stack(own, dim=1)] if own else []
            )
            experts = torch.cat(parts, dim=1)
            w = F.softmax(self.task_gates[last][t](ctx["gate_src"][t]), dim=-1)
            out[t] = self.heads[t](mix_experts(w, experts))
            gates[f"{last}/{t}"] = w.detach()
        return out, None, gates

    def _task_owned(self, task: str) -> list[Any]:
        last = self.n_levels - 1
        owned: list[Any] = [self.heads[task], self.task_experts[last][task]]
        owned += [self.task_gates[lvl][task] for lvl in range(max(0, last - 1), last + 1)]
        return owned

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        last = self.n_levels - 1
        return iter(
            unique_params(
                self.shared_experts,
                self.shared_gates,
                [self.task_experts[lvl] for lvl in range(last)],
                [self.task_gates[lvl] for lvl in range(max(0, last - 1))],
                self.gate_input,
            )
        )

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(unique_params(self._task_owned(task)))


@register(
    "cgc",
    paper=_PAPER,
    description="Customized gate control: shared and task-specific experts, one gate per task.",
    representation="config",
    gates=True,
)
class CGC(PLE):
    """Customized gate control (Tang et al., RecSys 2020): single-level :class:`PLE`.

    Task ``t``'s gate (linear + softmax on the flattened input, or on ``gate_input(x)``) mixes the
    ``n_shared`` shared experts and task ``t``'s ``n_specific[t]`` experts; towers follow.

    Args:
        expert_factory: zero-argument callable or ``nn.Module`` template of an expert.
        heads: the towers ``{task: module}``.
        gate_in_features: per-sample width of the gates' (flattened) input.
        n_shared: number of shared experts.
        n_specific: experts per task, one int or ``{task: int}``.
        gate_input: optional module mapping the batch to the gates' input (shared).

    Shared parameters: the shared experts and ``gate_input``. Task ``t``: its experts, its gate,
    its tower. ``encode`` returns the stacked shared experts' outputs ``[B, n_shared, *D]`` (what
    all tasks read) and remembers the input; ``decode`` runs the task experts, gates and towers on
    it (after ``encode`` of the same batch). Without shared experts, or with a learned
    ``gate_input``, ``encode`` raises ``NotImplementedError``. Multi-input batches: task ``t``'s
    experts, the shared experts and task ``t``'s gate run on ``x_t``.
    ``last_gate_weights``: ``{"0/<task>": [B, n_shared + n_specific[t]]}``.

    Example:
        >>> import torch
        >>> from polytask.architectures import MLP
        >>> m = CGC(lambda: MLP([4, 8], last_act=True), {"a": nn.Linear(8, 1)}, gate_in_features=4,
        ...         n_shared=2)
        >>> m(torch.randn(3, 4))["a"].shape, m.encode(torch.randn(3, 4)).shape
        (torch.Size([3, 1]), torch.Size([3, 2, 8]))
    """

    def __init__(
        self,
        expert_factory: ExpertSpec,
        heads: Mapping[str, nn.Module],
        gate_in_features: int,
        n_shared: int = 1,
        n_specific: int | Mapping[str, int] = 1,
        gate_input: nn.Module | None = None,
    ) -> None:
        super().__init__(
            expert_factory,
            heads,
            gate_in_features,
            n_shared=n_shared,
            n_specific=n_specific,
            n_levels=1,
            gate_input=gate_input,
        )
