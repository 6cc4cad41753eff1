"""Routed (top-k) mixture of experts with load balancing and modality-aware routing."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import register
from ._common import ExpertSpec, Result, _Model, check_heads, make_modules, unique_params

MASK_KEY = "modality_mask"


@register(
    "moe_router",
    paper="Shazeer et al., 'Outrageously Large Neural Networks: The Sparsely-Gated "
    "Mixture-of-Experts Layer', ICLR 2017; Lepikhin et al., 'GShard', ICLR 2021; Fedus, Zoph & "
    "Shazeer, 'Switch Transformers', JMLR 2022; shared experts as in Dai et al., 'DeepSeekMoE', "
    "2024; missing-modality routing after dual-routing MoE for modality-missing classification",
    description="Top-k routed experts + always-on shared experts, load balancing, modality masks.",
    representation="always",
    gates=True,
    auxiliary_loss=True,
    compile="graph_breaks",
    compile_note=(
        "dispatch='sparse' (the default) gathers each expert's units with nonzero(), a "
        "data-dependent shape that breaks the graph there; dispatch='dense' compiles in one graph"
    ),
)
class RoutedMoE(_Model):
    """Routed mixture of experts shared by all tasks, with per-task heads.

    A linear router scores the ``E`` routed experts for every routing unit (a sample for ``[B, D]``
    inputs, a token for ``[B, T, D]``); each unit goes to its top-``k`` experts (Shazeer et al.
    2017; GShard, 2021), weighted by the router's softmax probabilities (renormalised over the
    top-k with ``normalize_topk``). ``n_shared`` shared experts process every unit and are added
    (DeepSeekMoE, 2024). :meth:`auxiliary_loss` is the Switch-Transformer load-balancing loss
    ``balance_coef * E * sum_e f_e * P_e`` (``f_e``: fraction of the ``k`` assignments per unit
    that go to expert ``e``; ``P_e``: mean router probability of ``e``; both over the valid units;
    equals ``balance_coef`` when balanced). There is no capacity limit (no unit is dropped).

    **Modalities.** With ``modalities`` the input is a dict ``{modality: tensor, ...}`` with an
    optional ``"modality_mask"`` ``[B, M]`` bool (``True`` = present; a modality missing from the
    dict is absent for every sample). Each modality has its own encoder to ``d_model``
    (``[B, D_m] -> [B, d]`` or ``[B, T_m, D_m] -> [B, T_m, d]``). A missing modality is *masked*,
    never replaced by zeros: per-sample inputs are fused by the mean over the present modalities
    only; token inputs are concatenated and the tokens of missing modalities take no part in
    routing, load balancing or pooling (their outputs are zero). With
    ``condition_on_modalities`` the router adds a learned term of the presence pattern,
    ``logits = W_h h + W_m mask`` (routing on the token and on which modalities are present, as in
    dual-routing MoE for modality-missing classification). Every sample needs at least one present
    modality (a sample with none is left out of routing and its features are zero).

    Args:
        expert_factory: zero-argument callable or ``nn.Module`` template (deep-copied and
            re-initialised) of an expert mapping ``[N, d_model] -> [N, d_model]``.
        n_experts: routed experts ``E``.
        heads: ``{task: module}`` on the pooled features ``[B, d_model]`` (or tokens with
            ``pool="none"``).
        d_model: width of the routed representation.
        k: experts per unit (``1 <= k <= E``).
        n_shared: always-on shared experts.
        encoder: for tensor inputs (no ``modalities``), optional module to ``d_model``.
        modalities: modality names, or ``{name: encoder}`` (``None`` = identity).
        condition_on_modalities: add the presence term to the router.
        balance_coef: coefficient of the load-balancing loss (Switch: 0.01).
        normalize_topk: renormalise the top-k probabilities to sum to 1 (GShard); ``False`` keeps
            the raw probabilities (Switch with ``k=1``).
        residual: add the router's input to the mixture (``h + MoE(h)``).
        pool: ``"mean"`` pools tokens (masked mean) to ``[B, d_model]``; ``"none"`` keeps them.
        dispatch: ``"sparse"`` runs each expert only on its units (gather/scatter; data-dependent
            shapes, so ``torch.compile`` breaks the graph there); ``"dense"`` runs every expert on
            every unit and weights by the sparse routing weights (same result, compiles in one
            graph, every expert gets a (possibly zero) gradient).

    Shared parameters: everything but the heads (encoders, router, experts). Task ``t``: its
    head. Representation: ``encode`` returns the (pooled) MoE output every head reads and computes
    the auxiliary loss; ``decode`` applies the heads. Multi-input batches ``{task: batch_t}``
    (keys are task names; each ``batch_t`` a tensor or modality dict): each runs through the MoE,
    and the auxiliary loss is the mean over the task batches.

    ``last_gate_weights``: ``{"router": [N, E]}`` routing weights of the units (``N = B`` or
    ``B * T``), zero outside the top-k; rows of valid units sum to 1 with ``normalize_topk``, rows
    of masked units are zero.

    Example:
        >>> import torch
        >>> from polytask.architectures import MLP
        >>> heads = {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)}
        >>> m = RoutedMoE(lambda: MLP([8, 16, 8]), 4, heads, d_model=8, k=2, n_shared=1,
        ...               modalities={"img": nn.Linear(6, 8), "txt": None})
        >>> batch = {"img": torch.randn(3, 6), "txt": torch.randn(3, 5, 8),
        ...          "modality_mask": torch.tensor([[True, True], [False, True], [True, False]])}
        >>> {k: tuple(v.shape) for k, v in m(batch).items()}
        {'a': (3, 2), 'b': (3, 1)}
        >>> bool(m.auxiliary_loss() > 0)
        True
    """

    _has_encode = True
    _aux_reduce = "mean"

    def __init__(
        self,
        expert_factory: ExpertSpec,
        n_experts: int,
        heads: Mapping[str, nn.Module],
        d_model: int,
        k: int = 2,
        n_shared: int = 0,
        encoder: nn.Module | None = None,
        modalities: Sequence[str] | Mapping[str, nn.Module | None] | None = None,
        condition_on_modalities: bool = True,
        balance_coef: float = 0.01,
        normalize_topk: bool = True,
        residual: bool = False,
        pool: str = "mean",
        dispatch: str = "sparse",
    ) -> None:
        super().__init__()
        self.task_names = check_heads(heads)
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
        if pool not in ("mean", "none"):
            raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")
        if dispatch not in ("sparse", "dense"):
            raise ValueError(f"dispatch must be 'sparse' or 'dense', got {dispatch!r}")
        self.n_experts, self.k, self.d_model = int(n_experts), int(k), int(d_model)
        self.balance_coef, self.normalize_topk = float(balance_coef), bool(normalize_topk)
        self.residual, self.pool, self.dispatch = bool(residual), pool, dispatch
        self.experts = nn.ModuleList(make_modules(expert_factory, self.n_experts))
        self.shared_experts = nn.ModuleList(make_modules(expert_factory, int(n_shared)))
        self.router = nn.Linear(self.d_model, self.n_experts, bias=False)
        if modalities is not None and encoder is not None:
            raise ValueError("give either encoder (tensor inputs) or modalities, not both")
        self.encoder = encoder
        if modalities is not None:
            mods = (
                dict(modalities) if isinstance(modalities, Mapping) else dict.fromkeys(modalities)
            )
            if not mods:
                raise ValueError("modalities must not be empty")
            clash = (set(mods) | {MASK_KEY}) & set(self.task_names)
            if clash:
                raise ValueError(f"names used both as modality and task: {sorted(clash)}")
            if MASK_KEY in mods:
                raise ValueError(f"{MASK_KEY!r} cannot be a modality name")
            self.modalities: list[str] | None = list(mods)
            self.modality_encoders = nn.ModuleDict(
                {m: (e if e is not None else nn.Identity()) for m, e in mods.items()}
            )
            self.presence_router = (
                nn.Linear(len(mods), self.n_experts, bias=False)
                if condition_on_modalities
                else None
            )
        else:
            self.modalities = None
            self.modality_encoders = None
            self.presence_router = None
        self.heads = nn.ModuleDict(dict(heads))

    # -- inputs ---------------------------------------------------------------------------------
    def _units(self, x: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """Routing units ``h`` ([B, d] or [B, T, d]), their validity and the presence mask."""
        if self.modalities is None:
            if isinstance(x, Mapping):
                raise TypeError("this RoutedMoE has no modalities; pass a tensor batch")
            h = self.encoder(x) if self.encoder is not None else x
            if h.dim() not in (2, 3):
                raise ValueError(
                    f"RoutedMoE routes [B, D] or [B, T, D] inputs, got {tuple(h.shape)}"
                )
            return h, torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device), None
        if not isinstance(x, Mapping):
            if len(self.modalities) != 1:
                raise TypeError(f"pass a dict of the modalities {self.modalities}")
            x = {self.modalities[0]: x}
        unknown = set(x) - set(self.modalities) - {MASK_KEY}
        if unknown:
            raise KeyError(f"unknown modalities {sorted(unknown)}; known: {self.modalities}")
        present = [m for m in self.modalities if m in x]
        if not present:
            raise ValueError("the batch holds none of the modalities")
        emb = {m: self.modality_encoders[m](x[m]) for m in present}
        first = emb[present[0]]
        batch, device = first.shape[0], first.device
        mask = x.get(MASK_KEY)
        if mask is None:
            mask = torch.zeros(batch, len(self.modalities), dtype=torch.bool, device=device)
            for i, m in enumerate(self.modalities):
                if m in x:
                    mask[:, i] = True
        else:
            mask = mask.to(device=device, dtype=torch.bool)
            if mask.shape != (batch, len(self.modalities)):
                raise ValueError(
                    f"{MASK_KEY} must be [B={batch}, M={len(self.modalities)}], "
                    f"got {tuple(mask.shape)}"
                )
            absent = [i for i, m in enumerate(self.modalities) if m not in x]
            if absent:
                keep = torch.ones(len(self.modalities), dtype=torch.bool, device=device)
                keep[absent] = False
                mask = mask & keep
        col = {m: i for i, m in enumerate(self.modalities)}
        if any(e.dim() == 3 for e in emb.values()):  # token mode
            toks, valid = [], []
            for m in present:
                e = emb[m] if emb[m].dim() == 3 else emb[m].unsqueeze(1)
                toks.append(e)
                valid.append(mask[:, col[m]].unsqueeze(1).expand(batch, e.shape[1]))
            return torch.cat(toks, dim=1), torch.cat(valid, dim=1), mask
        w = torch.stack([mask[:, col[m]] for m in present], dim=1).to(first.dtype)  # [B, P]
        stacked = torch.stack([emb[m] for m in present], dim=1)  # [B, P, d]
        fused = (w.unsqueeze(-1) * stacked).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)
        return fused, mask.any(dim=1), mask

    # -- routing --------------------------------------------------------------------------------
    def _route(
        self, h: Tensor, valid: Tensor, presence: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.router(h)
        if self.presence_router is not None and presence is not None:
            logits = logits + self.presence_router(presence.to(h.dtype))
        probs = F.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        if self.normalize_topk:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        validf = valid.to(probs.dtype).unsqueeze(-1)
        combine = torch.zeros_like(probs).scatter(-1, top_i, top_p) * validf  # [N, E]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(
            -1, top_i, True
        ) & valid.unsqueeze(-1)
        if self.dispatch == "dense":
            outs = torch.stack([e(h) for e in self.experts], dim=1)  # [N, E, d]
            mixed = (combine.unsqueeze(-1) * outs).sum(dim=1)
        else:
            mixed = torch.zeros_like(h)
            for e, expert in enumerate(self.experts):
                idx = chosen[:, e].nonzero().squeeze(-1)
                if idx.numel() == 0:
                    continue
                y = expert(h.index_select(0, idx)) * combine.index_select(0, idx)[:, e : e + 1]
                mixed = mixed.index_add(0, idx, y)
        for expert in self.shared_experts:
            mixed = mixed + expert(h)
        if self.residual:
            mixed = mixed + h
        mixed = mixed * validf
        n_valid = validf.sum().clamp(min=1.0)
        frac = (chosen.to(probs.dtype)).sum(dim=0) / (n_valid * self.k)
        mean_p = (probs * validf).sum(dim=0) / n_valid
        aux = self.balance_coef * self.n_experts * (frac * mean_p).sum()
        return mixed, aux, combine

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        h, valid, mask = self._units(x)
        if h.shape[-1] != self.d_model:
            raise ValueError(
                f"routing units have width {h.shape[-1]}, expected d_model={self.d_model}"
            )
        if h.dim() == 2:
            out, aux, combine = self._route(h, valid, mask)
            return out, {"aux": aux, "gates": {"router": combine.detach()}}
        b, t, d = h.shape
        presence = (
            None
            if mask is None
            else mask.unsqueeze(1).expand(b, t, mask.shape[1]).reshape(b * t, -1)
        )
        out, aux, combine = self._route(h.reshape(b * t, d), valid.reshape(b * t), presence)
        out = out.reshape(b, t, -1)
        if self.pool == "mean":
            vf = valid.to(out.dtype).unsqueeze(-1)
            out = (out * vf).sum(dim=1) / vf.sum(dim=1).clamp(min=1.0)
        return out, {"aux": aux, "gates": {"router": combine.detach()}}

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        if not isinstance(ctx, Mapping) or "aux" not in ctx:
            raise RuntimeError("RoutedMoE.decode must follow encode of the same batch")
        return {t: self.heads[t](features) for t in tasks}, ctx["aux"], dict(ctx["gates"])

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(
            unique_params(
                self.encoder,
                self.modality_encoders,
                self.router,
                self.presence_router,
                self.experts,
                self.shared_experts,
            )
        )

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self._check_task(task)
        return iter(unique_params(self.heads[task]))
