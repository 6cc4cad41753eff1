"""Learning to branch: a tree of stage copies whose branching is learned with Gumbel-softmax."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import register
from ._blocks import _stages_of
from ._common import Result, _Model, check_heads, pack, reset_parameters, unique_params, unpack


@register(
    "ltb",
    paper="Guo, Lee & Ulbricht, 'Learning to Branch for Multi-Task Learning', ICML 2020",
    description="Tree of stage copies; each node picks its parent by Gumbel-softmax.",
    representation="config",
    gates=True,
    needs_staged_encoder=True,
)
class LearningToBranch(_Model):
    """Learning to branch (Guo, Lee & Ulbricht, ICML 2020) over a staged encoder.

    Stage ``j`` of the encoder is copied into ``widths[j]`` nodes; the last stage has one node per
    task (node ``i`` feeds task ``i``'s head). Nodes of stage 0 read the input; node ``i`` of stage
    ``j > 0`` reads ``sum_p w_p * out_p`` over the nodes ``p`` of stage ``j - 1``, where ``w`` is a
    Gumbel-softmax sample of its branching logits ``alpha_ji`` (temperature ``temperature``,
    straight-through one-hot with ``hard=True``), drawn once per forward as in the paper. In eval
    mode the argmax parent is used (deterministic); :meth:`finalize` fixes the argmax tree for
    good, after which only the nodes on the tasks' paths run.

    Args:
        encoder: staged encoder (``stages: nn.ModuleList``); each node is a deep copy of its stage
            (weights kept, e.g. pretrained; ``reinit=True`` re-initialises every copy).
        heads: ``{task: module}`` on the task's last-stage node.
        widths: nodes per stage for all stages but the last (default: one per task at every
            stage, as LibMTL's implementation); the last stage always has one node per task.
        temperature: Gumbel-softmax temperature (anneal it by setting ``model.temperature``;
            the paper decays it during the search).
        hard: straight-through one-hot samples (paper) or soft samples.
        reinit: re-initialise the deep copies.

    Shared parameters (before :meth:`finalize`): the nodes of all stages but the last and their
    branching logits (any task may route through them). Task ``t``: its last-stage node, that
    node's branching logits and its head. After :meth:`finalize`, nodes on several tasks' paths
    are shared, nodes on one task's path belong to it, and the branching logits and nodes on no
    path are frozen (``requires_grad=False``) and listed by :meth:`unused_parameters`.

    Representation (before :meth:`finalize`, with at least two stages): the outputs of all nodes
    of stage ``L - 2``, flattened and concatenated to ``[B, widths[L-2] * F]`` (what the task
    nodes of the last stage read); ``decode`` samples the last stage's branching weights and runs
    its nodes and the heads. After :meth:`finalize` ``encode`` raises ``NotImplementedError``
    (the shared part of the tree then differs per task). Multi-input batches: the tree runs on
    each task's input and task ``t``'s output is kept.

    ``last_gate_weights``: ``{"<stage>/<node>": [widths[stage - 1]]}`` branching weights of the
    last forward (one sample per forward).

    Example:
        >>> import torch
        >>> from polytask.architectures import StagedMLP
        >>> heads = {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)}
        >>> m = LearningToBranch(StagedMLP([4, 8, 8, 8]), heads)
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
        {'a': (5, 2), 'b': (5, 1)}
        >>> [len(row) for row in m.finalize().parents]  # chosen parents, stages 1 and 2
        [2, 2]
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        widths: Sequence[int] | None = None,
        temperature: float = 1.0,
        hard: bool = True,
        reinit: bool = False,
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        stages = _stages_of(encoder)
        n_tasks, n_stages = len(self.task_names), len(stages)
        if widths is None:
            widths = [n_tasks] * (n_stages - 1)
        widths = [int(w) for w in widths]
        if len(widths) != n_stages - 1 or any(w < 1 for w in widths):
            raise ValueError(f"widths needs {n_stages - 1} positive entries, got {widths}")
        self.widths = [*widths, n_tasks]
        self.temperature, self.hard = float(temperature), bool(hard)

        def node(j: int) -> nn.Module:
            m = copy.deepcopy(stages[j])
            return reset_parameters(m) if reinit else m

        self.nodes = nn.ModuleList(
            nn.ModuleList(node(j) for _ in range(self.widths[j])) for j in range(n_stages)
        )
        self.alphas = nn.ModuleList(
            nn.ParameterList(
                nn.Parameter(torch.zeros(self.widths[j - 1])) for _ in range(self.widths[j])
            )
            for j in range(1, n_stages)
        )
        self.heads = nn.ModuleDict(dict(heads))
        # finalized tree: parents[j-1][i] = chosen parent of node i of stage j (-1: off any path)
        self.register_buffer(
            "parent_index", torch.full((max(n_stages - 1, 1), max(self.widths)), -1)
        )
        self.register_buffer("is_finalized", torch.tensor(False))
        self._final = False
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def n_stages(self) -> int:
        return len(self.nodes)

    @property
    def parents(self) -> list[list[int]]:
        """Chosen parent per node of stages ``1..L-1`` (argmax of the branching logits)."""
        if self._final:
            return [
                [int(self.parent_index[j - 1, i]) for i in range(self.widths[j])]
                for j in range(1, self.n_stages)
            ]
        return [[int(a.argmax()) for a in row] for row in self.alphas]

    def _weights(self, j: int, i: int) -> Tensor:
        alpha = self.alphas[j - 1][i]
        if self.training:
            return F.gumbel_softmax(alpha, tau=self.temperature, hard=self.hard)
        return F.one_hot(alpha.argmax(), alpha.numel()).to(alpha.dtype)

    # Before finalize() the representation is the outputs of all nodes of stage L-2 (what the
    # last stage's task nodes read): only shared parameters feed them and they reach the tasks only
    # through them (the last stage's branching logits belong to its task nodes).
    _has_encode = True

    def _no_representation(self) -> str | None:
        if self._final:
            return "after finalize() the shared part of the tree differs per task"
        if self.n_stages < 2:
            return "one stage: the task nodes share nothing"
        return None

    def _mix(self, j: int, i: int, stacked: Tensor) -> tuple[Tensor, Tensor]:
        w = self._weights(j, i)
        return (w.reshape((-1,) + (1,) * (stacked.dim() - 1)) * stacked).sum(dim=0), w.detach()

    def _forward(self, x: Any, tasks: tuple[str, ...]) -> Result:
        if self._final:
            idx = [self.task_names.index(t) for t in tasks]
            return self._forward_final(x, tasks, idx), None, {}
        if self.n_stages < 2:
            return (
                {t: self.heads[t](self.nodes[0][self.task_names.index(t)](x)) for t in tasks},
                None,
                {},
            )
        feats, ctx = self._encode(x, tasks)
        return self._decode(feats, ctx, tasks)

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        gates: dict[str, Tensor] = {}
        outs = [node(x) for node in self.nodes[0]]
        for j in range(1, self.n_stages - 1):
            stacked = torch.stack(outs, dim=0)
            new = []
            for i, node in enumerate(self.nodes[j]):
                inp, gates[f"{j}/{i}"] = self._mix(j, i, stacked)
                new.append(node(inp))
            outs = new
        features, layout = pack(outs)
        return features, {"layout": layout, "gates": gates}

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        gates = dict(ctx["gates"])
        stacked = torch.stack(unpack(features, ctx["layout"]), dim=0)
        j = self.n_stages - 1
        out: dict[str, Tensor] = {}
        for t in tasks:
            i = self.task_names.index(t)
            inp, gates[f"{j}/{i}"] = self._mix(j, i, stacked)
            out[t] = self.heads[t](self.nodes[j][i](inp))
        return out, None, gates

    def _forward_final(self, x: Any, tasks: tuple[str, ...], idx: list[int]) -> dict[str, Tensor]:
        cache: dict[tuple[int, int], Tensor] = {}
        parents = self.parents

        def run(j: int, i: int) -> Tensor:
            if (j, i) not in cache:
                inp = x if j == 0 else run(j - 1, parents[j - 1][i])
                cache[(j, i)] = self.nodes[j][i](inp)
            return cache[(j, i)]

        return {
            t: self.heads[t](run(self.n_stages - 1, i)) for t, i in zip(tasks, idx, strict=True)
        }

    @torch.no_grad()
    def finalize(self) -> LearningToBranch:
        """Fix the argmax tree: later forwards run only the nodes on the tasks' paths, the
        branching logits and the nodes off every path are frozen. Returns ``self``."""
        parents = self.parents
        self.parent_index.fill_(-1)
        for j, row in enumerate(parents):
            for i, p in enumerate(row):
                self.parent_index[j, i] = p
        self.is_finalized.fill_(True)
        self._apply_final()
        return self

    def _apply_final(self) -> None:
        was_final, self._final = self._final, bool(self.is_finalized)
        if not self._final:
            if was_final:  # a non-finalized state loaded into a finalized model
                self.alphas.requires_grad_(True)
                self.nodes.requires_grad_(True)
            return
        users = self._users()
        for row in self.alphas:
            for a in row:
                a.requires_grad_(False)
        for j, nodes in enumerate(self.nodes):
            for i, node in enumerate(nodes):
                if not users[j][i]:
                    node.requires_grad_(False)

    def _users(self) -> list[list[set[str]]]:
        """Tasks whose path (in the finalized tree) passes through each node."""
        parents = self.parents
        users: list[list[set[str]]] = [[set() for _ in range(w)] for w in self.widths]
        for i, t in enumerate(self.task_names):
            p = i
            for j in range(self.n_stages - 1, -1, -1):
                users[j][p].add(t)
                if j > 0:
                    p = parents[j - 1][p]
        return users

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        if self._final:
            users = self._users()
            return iter(
                unique_params(
                    [
                        node
                        for j, nodes in enumerate(self.nodes)
                        for i, node in enumerate(nodes)
                        if len(users[j][i]) > 1
                    ]
                )
            )
        last = self.n_stages - 1
        return iter(unique_params(list(self.nodes)[:last], list(self.alphas)[: last - 1]))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        i = self.task_names.index(task)
        if self._final:
            users = self._users()
            own = [
                node
                for j, nodes in enumerate(self.nodes)
                for k, node in enumerate(nodes)
                if users[j][k] == {task}
            ]
            return iter(unique_params(own, self.heads[task]))
        last = self.n_stages - 1
        alpha = self.alphas[last - 1][i] if last > 0 else None
        return iter(unique_params(self.nodes[last][i], alpha, self.heads[task]))

    def unused_parameters(self) -> Iterator[nn.Parameter]:
        """After :meth:`finalize`: the frozen branching logits and off-path nodes (else empty)."""
        if not self._final:
            return iter(())
        users = self._users()
        off = [
            node
            for j, nodes in enumerate(self.nodes)
            for i, node in enumerate(nodes)
            if not users[j][i]
        ]
        return iter(unique_params(self.alphas, off))


def _after_load(module: nn.Module, incompatible: Any) -> None:
    if isinstance(module, LearningToBranch):
        module._apply_final()
