"""Multi-gate mixture of experts (MMoE) and its DSelect-k variant."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
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


def mix_experts(weights: Tensor, stacked: Tensor) -> Tensor:
    """``sum_e weights[b, e] * stacked[b, e, ...]`` for expert outputs of any shape."""
    w = weights.reshape(weights.shape + (1,) * (stacked.dim() - 2))
    return (w * stacked).sum(dim=1)


@register(
    "mmoe",
    paper="Ma et al., 'Modeling Task Relationships in Multi-task Learning with Multi-gate "
    "Mixture-of-Experts', KDD 2018",
    description="Shared experts mixed by one softmax gate per task, then a tower per task.",
    representation="config",
    gates=True,
)
class MMoE(_Model):
    """Multi-gate mixture of experts (Ma et al., KDD 2018).

    ``y_t = tower_t(sum_e g_t(x)_e * expert_e(x))`` with ``g_t(x) = softmax(W_t x)``: every task
    has its own linear softmax gate over the same experts.

    Args:
        expert_factory: zero-argument callable building one expert, or an ``nn.Module`` template
            (deep-copied and re-initialised per expert). Experts may be any module (MLP, CNN,
            transformer); all must return tensors of one shape ``[B, *D]``.
        n_experts: number of experts ``E``.
        heads: the towers, ``{task: module}`` mapping the mixture ``[B, *D]`` to the prediction.
        gate_in_features: width ``F`` of the gates' input: the per-sample number of elements of
            the input (gates read the flattened input), or of ``gate_input(x)``.
        gate_input: optional module mapping the batch to the gates' input ``[B, ...]``
            (flattened), e.g. a shared embedding, or a selector for dict batches. Its parameters
            count as shared (all gates read it).

    Shared parameters: the experts and ``gate_input``. Task ``t``: its gate and its tower.

    Representation: ``encode(x)`` returns the stacked expert outputs ``[B, E, *D]`` that all
    gates read and remembers the gates' (parameter-free) input; ``decode`` applies the gates and
    the towers and must follow the ``encode`` of the same batch. With a ``gate_input`` that has
    trainable parameters those shared parameters would reach the tasks past the representation, so
    ``encode`` raises ``NotImplementedError`` (train in the engine's params mode).

    Multi-input batches ``{task: x_t}``: the experts run on each task's input and task ``t``'s
    gate reads ``x_t`` (one expert pass per task).

    ``last_gate_weights``: ``{task: [B, E]}`` softmax weights of the last forward (detached).

    Example:
        >>> import torch
        >>> from polytask.architectures import MLP
        >>> m = MMoE(lambda: MLP([4, 8], last_act=True), 3,
        ...          {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)}, gate_in_features=4)
        >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
        {'a': (5, 2), 'b': (5, 1)}
        >>> m.encode(torch.randn(5, 4)).shape
        torch.Size([5, 3, 8])
    """

    _has_encode = True

    def __init__(
        self,
        expert_factory: ExpertSpec,
        n_experts: int,
        heads: Mapping[str, nn.Module],
        gate_in_features: int,
        gate_input: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts = int(n_experts)
        self.gate_in_features = int(gate_in_features)
        self.experts = nn.ModuleList(make_modules(expert_factory, self.n_experts))
        self.gate_input = gate_input
        self.gates = nn.ModuleDict({t: self._make_gate(t) for t in self.task_names})
        self.heads = nn.ModuleDict(dict(heads))

    # gate hooks (overridden by DSelect-k)
    def _make_gate(self, task: str) -> nn.Module:
        return nn.Linear(self.gate_in_features, self.n_experts)

    def _gate_weights(self, task: str, src: Tensor) -> tuple[Tensor, Tensor | None]:
        return F.softmax(self.gates[task](src), dim=-1), None

    def _gate_source(self, x: Any) -> Tensor:
        return flatten_batch(self.gate_input(x) if self.gate_input is not None else x)

    def _no_representation(self) -> str | None:
        if has_trainable(self.gate_input):
            return "the gates read a learned gate_input, a shared module outside the experts"
        return None

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        stacked = torch.stack([expert(x) for expert in self.experts], dim=1)
        return stacked, {"gate_src": self._gate_source(x)}

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        src = self._ctx_tensor(ctx, "gate_src", features)
        out: dict[str, Tensor] = {}
        gates: dict[str, Tensor] = {}
        auxes: list[Tensor] = []
        for t in tasks:
            w, aux = self._gate_weights(t, src)
            out[t] = self.heads[t](mix_experts(w, features))
            gates[t] = w.detach()
            if aux is not None:
                auxes.append(aux)
        return out, (torch.stack(auxes).sum() if auxes else None), gates

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(unique_params(self.experts, self.gate_input))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(unique_params(self.gates[task], self.heads[task]))


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """Cubic smooth-step (Hazimeh et al. 2020): 0 below ``-gamma/2``, 1 above ``gamma/2``."""
    poly = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), poly)
    )


class DSelectKGate(nn.Module):
    """One DSelect-k gate: ``k`` single-expert selectors, each a product of ``m = ceil(log2 E)``
    smooth-step "bits", mixed by softmax weights (Hazimeh et al., NeurIPS 2021).

    With ``in_features`` the gate is example-conditioned (``z`` and ``w`` logits are linear in the
    input); with ``None`` it is task-only (static logits). ``forward`` returns the expert weights
    ``[B, E]`` (or ``[E]``) and the selector outputs ``[B, k, E]`` (or ``[k, E]``).
    """

    def __init__(self, n_experts: int, k: int, in_features: int | None, gamma: float = 1.0):
        super().__init__()
        if n_experts < 2:
            raise ValueError("DSelect-k needs at least 2 experts")
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
        self.n_experts, self.k, self.gamma = int(n_experts), int(k), float(gamma)
        self.n_bits = math.ceil(math.log2(n_experts))
        self.power_of_2 = n_experts == 2**self.n_bits
        codes = [
            [(i >> (self.n_bits - 1 - b)) & 1 for b in range(self.n_bits)] for i in range(n_experts)
        ]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)
        self.conditioned = in_features is not None
        lim = self.gamma / 100
        if in_features is not None:
            self.z_logits: nn.Module | nn.Parameter = nn.Linear(in_features, k * self.n_bits)
            self.w_logits: nn.Module | nn.Parameter = nn.Linear(in_features, k)
            for p in self.z_logits.parameters():
                nn.init.uniform_(p, -lim, lim)
            for p in self.w_logits.parameters():
                nn.init.uniform_(p, -0.05, 0.05)
        else:
            self.z_logits = nn.Parameter(torch.empty(k, self.n_bits).uniform_(-lim, lim))
            self.w_logits = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))

    def forward(self, src: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.conditioned:
            if src is None:
                raise ValueError("an example-conditioned DSelect-k gate needs its input")
            z = self.z_logits(src).reshape(-1, self.k, 1, self.n_bits)
            w = F.softmax(self.w_logits(src), dim=-1)  # [B, k]
        else:
            z = self.z_logits.reshape(self.k, 1, self.n_bits)
            w = F.softmax(self.w_logits, dim=-1)  # [k]
        bits = smooth_step(z, self.gamma)  # [..., k, 1, m]
        selectors = torch.where(self.codes, bits, 1 - bits).prod(dim=-1)  # [..., k, E]
        weights = (w.unsqueeze(-1) * selectors).sum(dim=-2)  # [..., E]
        return weights, selectors

    def regularizer(self, selectors: Tensor, entropy_reg: float) -> Tensor:
        """The official code's regulariser of the selector outputs ``[B, k, E]`` (or ``[k, E]``):
        ``entropy_reg`` times their entropy ``-sum s log(s + 1e-6)``, plus, when ``E`` is not a
        power of 2, ``sum 1 / sum_e s[..., e]`` (keeps the weight on reachable experts); both
        summed over the batch and the selectors, as in the official code."""
        reg = -(selectors * torch.log(selectors + 1e-6)).sum() * entropy_reg
        if not self.power_of_2:
            reg = reg + (1.0 / selectors.sum(dim=-1)).sum()
        return reg


@register(
    "dselect_k",
    paper="Hazimeh et al., 'DSelect-k: Differentiable Selection in the Mixture of Experts with "
    "Applications to Multi-Task Learning', NeurIPS 2021",
    description="MMoE with differentiable sparse (k non-zero) smooth-step gates.",
    representation="config",
    gates=True,
    auxiliary_loss=True,
)
class DSelectK(MMoE):
    """DSelect-k mixture of experts (Hazimeh et al., NeurIPS 2021).

    MMoE whose per-task softmax gates are DSelect-k gates: each gate picks at most ``k`` experts
    through ``k`` single-expert selectors. A selector encodes the expert index in
    ``m = ceil(log2 E)`` binary variables relaxed by the cubic smooth-step
    ``S(t) = -2t^3/gamma^3 + 3t/(2 gamma) + 1/2`` on ``[-gamma/2, gamma/2]`` (0 below, 1 above);
    selector ``i`` gives expert ``e`` the weight ``prod_b S(z_ib)`` or ``1 - S(z_ib)`` by the bits
    of ``e``, and softmax weights over the ``k`` selectors combine them. When ``E`` is a power of
    2 the expert weights sum to 1; otherwise the regulariser below pushes the mass onto the ``E``
    reachable codes.

    Args:
        expert_factory, n_experts, heads, gate_in_features, gate_input: as :class:`MMoE`.
        k: the number of non-zeros per gate (``1 <= k <= E``).
        gamma: width of the smooth-step's polynomial region (paper default 1.0).
        entropy_reg: coefficient of the entropy regulariser on the selectors, which drives each
            selector to a single expert (the official code's default 1e-6; the paper tunes it).
            As in the official code the regulariser is summed over the batch, so its weight
            relative to the (batch-mean) task losses grows with the batch size.
        conditioned: ``True`` for example-conditioned gates (logits linear in the gate input),
            ``False`` for task-only gates (static logits; ``gate_in_features`` is then unused).

    :meth:`auxiliary_loss` returns the sum over the task gates of the entropy regulariser (and,
    for ``E`` not a power of 2, of the reachability term) of the last forward; it is computed in
    eval mode too (the official code adds it in training only; the trainer adds it to training
    steps only).
    Unlike LibMTL, which runs ``backward`` on it inside ``forward`` (so ``zero_grad`` erases it),
    it is returned as a tensor for the objective.

    Shared parameters, representation, multi-input batches: as :class:`MMoE`.
    ``last_gate_weights``: ``{task: [B, E]}`` expert weights (with ``k`` non-zeros at
    convergence).
    """

    def __init__(
        self,
        expert_factory: ExpertSpec,
        n_experts: int,
        heads: Mapping[str, nn.Module],
        gate_in_features: int | None,
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 1e-6,
        conditioned: bool = True,
        gate_input: nn.Module | None = None,
    ) -> None:
        self.k, self.gamma, self.entropy_reg = int(k), float(gamma), float(entropy_reg)
        self.conditioned = bool(conditioned)
        if self.conditioned and gate_in_features is None:
            raise ValueError("example-conditioned DSelect-k needs gate_in_features")
        super().__init__(expert_factory, n_experts, heads, gate_in_features or 0, gate_input)

    def _make_gate(self, task: str) -> nn.Module:
        return DSelectKGate(
            self.n_experts, self.k, self.gate_in_features if self.conditioned else None, self.gamma
        )

    def _gate_source(self, x: Any) -> Tensor:
        if not self.conditioned:
            batch = next(iter(x.values())) if isinstance(x, Mapping) else x
            return batch.new_empty(batch.shape[0], 0)  # carries the batch size only
        return super()._gate_source(x)

    def _gate_weights(self, task: str, src: Tensor) -> tuple[Tensor, Tensor | None]:
        gate = self.gates[task]
        weights, selectors = gate(src if self.conditioned else None)
        reg = gate.regularizer(selectors, self.entropy_reg)
        if not self.conditioned:
            weights = weights.to(src.device).expand(src.shape[0], -1)
        return weights, reg
