"""Task grouping: a shared trunk branching into one copy of the remaining stages per group."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ._base import register
from ._blocks import _stages_of
from ._common import Result, _Model, check_heads, pack, reset_parameters, unique_params, unpack


@register(
    "task_groups",
    paper="Branched sharing of task groups, e.g. Standley et al., 'Which Tasks Should Be Learned "
    "Together in Multi-task Learning?', ICML 2020; Fifty et al., 'Efficiently Identifying Task "
    "Groupings for Multi-Task Learning', NeurIPS 2021",
    description="Shared trunk, then one copy of the remaining stages per user-given task group.",
    representation="config",
    needs_staged_encoder=True,
)
class TaskGroups(_Model):
    """Shared trunk branching into task groups (e.g. the groupings found by Standley et al.,
    ICML 2020, or Fifty et al.'s TAG, NeurIPS 2021).

    Stages ``[0, branch_at)`` of the staged encoder form a trunk shared by all tasks; every group
    gets its own deep copy of stages ``[branch_at, L)``, shared by the tasks of the group; each
    task has its head on its group's branch. ``branch_at = L`` is hard sharing; ``branch_at = 0``
    with singleton groups gives independent networks.

    Args:
        encoder: staged encoder (``stages: nn.ModuleList``).
        heads: ``{task: module}``.
        groups: lists of task names; every task in exactly one group.
        branch_at: number of trunk stages (``0 <= branch_at <= L``).
        reinit: re-initialise every group's copy (default: copies keep the encoder's weights).

    Shared parameters: the trunk and the branches of groups with more than one task. Task ``t``:
    its head and, if its group has only ``t``, the group's branch.

    Representation: what the heads read through shared parameters only. Without groups of several
    tasks with a branch, that is the trunk output (``decode`` runs the single-task branches and
    heads). Otherwise the outputs of the shared branches (and the trunk output if a single-task
    group needs it) are flattened and concatenated to ``[B, F]``; ``decode`` splits them, runs the
    single-task branches and the heads. Multi-input batches: task ``t``'s input runs through the
    trunk, its group's branch and its head.

    Example:
        >>> import torch
        >>> from polytask.architectures import StagedMLP
        >>> heads = {t: nn.Linear(8, 1) for t in "abc"}
        >>> m = TaskGroups(StagedMLP([4, 8, 8]), heads, groups=[["a", "b"], ["c"]], branch_at=1)
        >>> sorted(m(torch.randn(5, 4)))
        ['a', 'b', 'c']
        >>> m.encode(torch.randn(5, 4)).shape  # trunk output (for c) and the a+b branch output
        torch.Size([5, 16])
    """

    _has_encode = True

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        groups: Sequence[Sequence[str]],
        branch_at: int,
        reinit: bool = False,
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        stages = _stages_of(encoder)
        if not 0 <= branch_at <= len(stages):
            raise ValueError(f"branch_at must be in [0, {len(stages)}], got {branch_at}")
        groups = [list(g) for g in groups]
        flat = [t for g in groups for t in g]
        if any(len(g) == 0 for g in groups):
            raise ValueError("task groups must not be empty")
        if sorted(flat) != sorted(self.task_names) or len(set(flat)) != len(flat):
            raise ValueError(
                f"groups {groups} must contain every task of {self.task_names} exactly once"
            )
        self.groups = groups
        self.branch_at = int(branch_at)
        self.group_of = {t: gi for gi, g in enumerate(groups) for t in g}
        self.trunk = nn.ModuleList(stages[: self.branch_at])

        def branch() -> nn.ModuleList:
            b = nn.ModuleList(copy.deepcopy(s) for s in stages[self.branch_at :])
            return reset_parameters(b) if reinit else b  # type: ignore[return-value]

        self.branches = nn.ModuleList(branch() for _ in groups)
        self.heads = nn.ModuleDict(dict(heads))

    def _shared_group(self, gi: int) -> bool:
        """A branch used by several tasks (it belongs to the representation)."""
        return len(self.groups[gi]) > 1 and len(self.branches[gi]) > 0

    def _forward(self, x: Any, tasks: tuple[str, ...]) -> Result:
        for stage in self.trunk:
            x = stage(x)
        out: dict[str, Tensor] = {}
        for gi, group in enumerate(self.groups):
            wanted = [t for t in group if t in tasks]
            if not wanted:
                continue
            h = x
            for stage in self.branches[gi]:
                h = stage(h)
            for t in wanted:
                out[t] = self.heads[t](h)
        return {t: out[t] for t in tasks}, None, {}

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        for stage in self.trunk:
            x = stage(x)
        needed = [gi for gi, g in enumerate(self.groups) if any(t in tasks for t in g)]
        branched = [gi for gi in needed if self._shared_group(gi)]
        # the trunk output goes into the representation if a single-task branch reads it; with
        # no trunk stages it is the raw input, which stays outside (parameter-free)
        with_trunk = len(self.trunk) > 0 and any(not self._shared_group(gi) for gi in needed)
        parts = [x] if with_trunk else []
        for gi in branched:
            h = x
            for stage in self.branches[gi]:
                h = stage(h)
            parts.append(h)
        if not parts:
            raise NotImplementedError(f"the tasks {list(tasks)} read no shared stage")
        z, layout = pack(parts)
        return z, (with_trunk, None if len(self.trunk) else x, branched, layout)

    def _no_representation(self) -> str | None:
        if len(self.trunk) == 0 and not any(self._shared_group(g) for g in range(len(self.groups))):
            return "no stage is shared by several tasks"
        return None

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        with_trunk, raw, branched, layout = ctx
        parts = unpack(features, layout)
        trunk = parts.pop(0) if with_trunk else raw
        reps = dict(zip(branched, parts, strict=True))
        out: dict[str, Tensor] = {}
        for gi, group in enumerate(self.groups):
            wanted = [t for t in group if t in tasks]
            if not wanted:
                continue
            if gi in reps:
                h = reps[gi]
            else:
                h = trunk
                for stage in self.branches[gi]:
                    h = stage(h)
            for t in wanted:
                out[t] = self.heads[t](h)
        return {t: out[t] for t in tasks}, None, {}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        multi = [self.branches[gi] for gi, g in enumerate(self.groups) if len(g) > 1]
        return iter(unique_params(self.trunk, multi))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        gi = self.group_of[task]
        own = self.branches[gi] if len(self.groups[gi]) == 1 else None
        return iter(unique_params(own, self.heads[task]))
