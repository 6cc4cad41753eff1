"""Gradient-manipulation methods (projections, sign dropout, momentum buffers) and wrappers.

Methods whose direction is a weighted sum of the task gradients with weights computable from the
Gramian ``G = J J^T`` alone (PCGrad, GradVac, IMTL, CR-MOGM) are :class:`GramianWeighting`
subclasses, so the engine may compute ``G`` without materialising ``J``; the others need the full
Jacobian. Also here: :func:`compose` (a loss weighting followed by a gradient method) and
:func:`partition` (one balancer per column block of ``J``).

State handling follows :mod:`._losses` (buffers that follow the data's dtype and device, lazily
shaped ``[K, P]`` buffers that load from a ``state_dict`` into fresh objects).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ._base import (
    Balancer,
    BalancerInfo,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Needs,
    create,
    register,
    single_batch_protocol,
    sum_host_syncs,
)
from ._losses import _backward_into, _losses_of, _safe_div, _StateMixin

__all__ = [
    "CRMOGM",
    "DBMTL",
    "IMTL",
    "MoCo",
    "Composed",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "PCGrad",
    "Partitioned",
    "compose",
    "partition",
]

Order = Literal["random", "index"]


def _check_order(name: str, order: str) -> str:
    if order not in ("random", "index"):
        raise ValueError(f"{name}: order must be 'random' or 'index', got {order!r}")
    return order


def _visit_order(k: int, random: bool, device: torch.device) -> Tensor:
    """``torch.randperm(k)`` from torch's global (CPU) RNG, or ``0..k-1``, as a tensor on
    ``device`` (the order is only ever used to index tensors, never read on the host)."""
    order = torch.randperm(k) if random else torch.arange(k)
    return order.to(device)


def _check_lazy(name: str, buf: Tensor, shape: torch.Size) -> bool:
    """True when the lazily-shaped buffer is initialised; ValueError on a shape change."""
    if buf.numel() == 0:
        return False
    if buf.shape != shape:
        raise ValueError(
            f"{name}: jacobian shape {tuple(shape)} differs from the shape {tuple(buf.shape)} of "
            "its gradient buffers (P must stay fixed across steps)"
        )
    return True


# ------------------------------------------------------------------------------------------------
# pcgrad
# ------------------------------------------------------------------------------------------------
@register(
    "pcgrad",
    paper="Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
    description="PCGrad: project each task gradient off the conflicting others, then sum.",
    reference="torchjd 0.18 aggregation.PCGrad (LibMTL weighting/PCGrad.py)",
)
class PCGrad(GramianWeighting):
    """Projecting Conflicting Gradients (PCGrad), computed from the Gramian.

    Paper: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (Algorithm 1). Reference code: torchjd 0.18 ``PCGrad`` (also LibMTL
    ``weighting/PCGrad.py``).

    For each task ``i``, ``g_i^PC`` starts at ``g_i``; for every other task ``j`` in the visiting
    order, if ``g_i^PC . g_j < 0`` then ``g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j``. The direction is
    ``sum_i g_i^PC`` (sum scale, as the references). Writing ``g_i^PC = sum_k c_ik g_k``, all inner
    products come from the Gramian, and ``last_weights = sum_i c_i``.

    Args:
        order: ``"random"`` (default; one ``torch.randperm(K)`` per task from torch's global RNG,
            the same draws as torchjd) or ``"index"`` (tasks visited as ``0..K-1``, which equals
            torchjd's PCGrad with ``randperm`` patched to the identity).
    """

    def __init__(self, n_tasks: int, order: Order = "random") -> None:
        super().__init__(n_tasks)
        self.order = _check_order("pcgrad", order)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        return self.projection_coefficients(gramian).sum(0)

    def projection_coefficients(self, gramian: Tensor) -> Tensor:
        """``C`` (``[K, K]``) with ``g_i^PC = C[i] @ J``: each task's projected gradient.

        Draws the visiting orders (with ``order="random"``) like one step does.
        """
        k = gramian.shape[0]
        device = gramian.device
        eye = torch.eye(k, dtype=gramian.dtype, device=device)
        sq_norms = torch.diagonal(gramian)
        safe_sq = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms))
        rows_pc = []
        for i in range(k):
            # Rows of G, unit vectors and squared norms in task i's visiting order: indexing by
            # tensors keeps the loop free of host reads; visiting i itself is a no-op (masked).
            order = _visit_order(k, self.order == "random", device)
            rows = gramian.index_select(0, order)
            units = eye.index_select(0, order)
            sq = safe_sq.index_select(0, order)
            other = order != i
            coeffs = eye[i].clone()
            for step in range(k):
                dot = rows[step] @ coeffs
                conflict = (dot < 0) & other[step]
                coeffs = coeffs - units[step] * torch.where(conflict, dot / sq[step], 0.0)
            rows_pc.append(coeffs)
        return torch.stack(rows_pc)


# ------------------------------------------------------------------------------------------------
# gradvac
# ------------------------------------------------------------------------------------------------
@register(
    "gradvac",
    paper="Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization "
    "in Massively Multilingual Models, ICLR 2021",
    description="GradVac: raise each pair's cosine similarity towards an EMA target, then sum.",
    stateful=True,
    reference="torchjd 0.18 aggregation.GradVac",
)
class GradVac(_StateMixin, GramianWeighting):
    """Gradient Vaccine (GradVac), following torchjd 0.18 ``GradVac`` (Gramian form).

    Paper: Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021. Reference code: torchjd 0.18
    ``aggregation/_gradvac.py`` (LibMTL ``weighting/GradVac.py`` with ``group_type=0``).

    For each task ``i`` and each other task ``j`` (visiting order as in :class:`PCGrad`), with
    ``phi`` the cosine between the current ``g_i^PC`` and ``g_j`` and ``phi_hat_ij`` its EMA target
    (buffer ``phi_hat`` ``[K, K]``, initially 0): if ``phi < phi_hat_ij``, add
    ``|g_i^PC| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) / (|g_j| sqrt(1-phi_hat^2) + eps)``
    times ``g_j``; then ``phi_hat_ij <- (1-beta) phi_hat_ij + beta phi``. Direction: sum of the
    corrected rows (``last_weights`` are the implied coefficients of the original rows).

    Args:
        beta: EMA decay of the targets.
        eps: added to denominators.
        order: ``"random"`` (default, one ``torch.randperm(K-1)`` per task, as torchjd) or
            ``"index"``.
    """

    _adaptive_buffers = ("phi_hat",)

    def __init__(
        self, n_tasks: int, beta: float = 0.5, eps: float = 1e-8, order: Order = "random"
    ) -> None:
        super().__init__(n_tasks)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta!r}")
        if eps < 0:
            raise ValueError(f"gradvac: eps must be >= 0, got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.order = _check_order("gradvac", order)
        self.register_buffer("phi_hat", torch.zeros(n_tasks, n_tasks))

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        k = gramian.shape[0]
        phi_hat = self._state("phi_hat", gramian).clone()
        eye = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
        coeffs = eye.clone()
        norms = torch.diagonal(gramian).clamp(min=0.0).sqrt()
        beta, eps = self.beta, self.eps
        device = gramian.device
        for i in range(k):
            row = coeffs[i].clone()
            dots = row @ gramian  # g_i^PC . g_j for every j
            others = torch.tensor([j for j in range(k) if j != i], dtype=torch.long)
            order = others.to(device).index_select(0, _visit_order(k - 1, self.order == "random",
                                                                    device))
            units = eye.index_select(0, order)  # one-hot of j, in visiting order
            rows = gramian.index_select(0, order)
            norms_o = norms.index_select(0, order)
            hat_row = phi_hat[i].clone()
            for step in range(k - 1):
                unit = units[step]
                norm_i = (dots * row).sum().clamp(min=0.0).sqrt()
                phi = (dots * unit).sum() / (norm_i * norms_o[step] + eps)
                target = (hat_row * unit).sum()
                root_phi = (1.0 - phi * phi).clamp(min=0.0).sqrt()
                root_target = (1.0 - target * target).clamp(min=0.0).sqrt()
                w = (
                    norm_i
                    * (target * root_phi - phi * root_target)
                    / (norms_o[step] * root_target + eps)
                )
                w = torch.where(phi < target, w, torch.zeros_like(w))
                row = row + w * unit
                dots = dots + w * rows[step]
                hat_row = torch.where(unit > 0, (1.0 - beta) * target + beta * phi, hat_row)
            phi_hat[i] = hat_row
            coeffs[i] = row
        self._set_state("phi_hat", phi_hat)
        return coeffs.sum(dim=0)


# ------------------------------------------------------------------------------------------------
# imtl
# ------------------------------------------------------------------------------------------------
def _imtl_g_weights(gramian: Tensor) -> Tensor:
    """IMTL-G weights ``alpha`` (sum 1) of gradients with Gramian ``G`` (LibMTL's closed form).

    With ``u_i = g_i / |g_i|``, ``D_j = g_1 - g_j`` and ``U_j = u_1 - u_j`` (``j >= 2``):
    ``alpha_{2:} = (g_1 U^T)(D U^T)^+`` and ``alpha_1 = 1 - sum alpha_{2:}``; every product is read
    from ``A_ij = g_i . u_j = G_ij / |g_j|`` (0 for a zero gradient). The pseudo-inverse replaces
    LibMTL's inverse so that singular cases (colinear or zero gradients) stay finite.
    """
    k = gramian.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    norms = torch.diagonal(gramian).clamp(min=0.0).sqrt()
    a = _safe_div(gramian, norms.unsqueeze(0).expand_as(gramian))
    g1_u = a[0, 0] - a[0, 1:]
    d_u = a[0, 0] - a[0, 1:].unsqueeze(0) - a[1:, 0].unsqueeze(1) + a[1:, 1:]
    rest = g1_u @ torch.linalg.pinv(d_u)
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


@register(
    "imtl",
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021",
    description="IMTL: learnable loss scales (IMTL-L), equal-projection gradient weights (IMTL-G).",
    learnable=True,
    reference="LibMTL weighting/IMTL.py",
)
class IMTL(GramianWeighting):
    """Impartial Multi-task Learning (IMTL = IMTL-L + IMTL-G), as LibMTL ``weighting/IMTL.py``.

    Paper: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021. Reference code: LibMTL ``weighting/IMTL.py``.

    IMTL-L: learnable scales ``s`` (``nn.Parameter`` ``loss_scale``, initially 0) turn the losses
    into ``exp(s_i) L_i - s_i``, so the task gradients become ``h_i = exp(s_i) g_i``. IMTL-G:
    weights ``alpha`` (summing to 1) such that ``d = sum_i alpha_i h_i`` has equal projections on
    every unit vector ``h_i / |h_i|`` (see :func:`_imtl_g_weights`). ``last_weights`` are the
    weights on the raw rows, ``alpha_i exp(s_i)``.

    Gradient of ``s``: ``combine`` (and :meth:`weights_from_gramian`) accumulate
    ``exp(s_i) L_i - 1`` into ``loss_scale.grad`` (what LibMTL's backward leaves there); the
    optimiser that holds ``balancer.parameters()`` steps it. Needs the losses.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)
        self.loss_scale = nn.Parameter(torch.zeros(n_tasks))

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses).detach()
        with torch.enable_grad():
            s = self.loss_scale.to(losses)
            _backward_into((torch.exp(s) * losses - s).sum(), [self.loss_scale])
        scale = torch.exp(self.loss_scale.detach()).to(gramian)
        alpha = _imtl_g_weights(scale.unsqueeze(1) * gramian * scale.unsqueeze(0))
        return alpha * scale


# ------------------------------------------------------------------------------------------------
# graddrop
# ------------------------------------------------------------------------------------------------
@register(
    "graddrop",
    paper="Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign "
    "Dropout, NeurIPS 2020",
    description="GradDrop: per coordinate, keep one sign, drawn by the gradients' sign purity.",
    mode="representation",
    reference="torchjd 0.18 aggregation.GradDrop (LibMTL weighting/GradDrop.py)",
)
class GradDrop(JacobianAggregator):
    """Gradient Sign Dropout (GradDrop).

    Paper: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1, lines 10-15).
    Reference code: torchjd 0.18 ``GradDrop`` (identity ``f``); LibMTL ``weighting/GradDrop.py``
    for the ``leak`` default. The paper applies it to activations, hence the default
    ``mode="representation"``.

    Per coordinate ``p``: positive sign purity ``P_p = (1 + sum_i J_ip / sum_i |J_ip|) / 2``
    (``1/2`` on an all-zero column); ``U_p ~ Uniform(0, 1)`` from ``torch.rand`` (torch's global
    RNG); row ``i`` keeps ``J_ip`` when ``P_p > U_p and J_ip > 0`` or ``P_p < U_p and J_ip < 0``.
    Direction ``sum_i (leak_i + (1 - leak_i) M_ip) J_ip``.

    Args:
        leak: a float or ``K`` floats in ``[0, 1]``: how much of each row always passes.
    """

    def __init__(self, n_tasks: int, leak: float | Sequence[float] = 0.0) -> None:
        super().__init__(n_tasks)
        t = torch.as_tensor(leak, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(n_tasks).clone()
        if t.shape != (n_tasks,):
            raise ValueError(f"graddrop: leak must be a float or {n_tasks} floats, got {leak!r}")
        self.leak = [float(x) for x in t.tolist()]

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        purity = 0.5 * (1.0 + _safe_div(jacobian.sum(dim=0), jacobian.abs().sum(dim=0)))
        u = torch.rand(purity.shape, dtype=jacobian.dtype, device=jacobian.device)
        keep_pos = purity > u
        keep_neg = purity < u
        out = torch.zeros_like(jacobian[0])
        for i in range(self.n_tasks):
            row = jacobian[i]
            mask = (keep_pos & (row > 0)) | (keep_neg & (row < 0))
            out = out + (self.leak[i] + (1.0 - self.leak[i]) * mask.to(row.dtype)) * row
        self.last_weights = None
        return out


# ------------------------------------------------------------------------------------------------
# db_mtl
# ------------------------------------------------------------------------------------------------
@register(
    "db_mtl",
    paper="Lin et al., Dual-Balancing for Multi-Task Learning (DB-MTL), arXiv 2308.12029, 2023",
    description="DB-MTL: log-loss gradients, EMA-smoothed, rescaled to the largest norm, summed.",
    stateful=True,
    modes=("params",),
    reference="LibMTL weighting/DB_MTL.py",
)
class DBMTL(_StateMixin, JacobianAggregator):
    """Dual-Balancing Multi-Task Learning (DB-MTL), as LibMTL ``weighting/DB_MTL.py``.

    Paper: Lin, Jiang, Ye, Zhang, Chen, Chen, Kwok & Zhang, "Dual-Balancing for Multi-Task
    Learning", arXiv:2308.12029 (2023). Reference code: LibMTL ``weighting/DB_MTL.py`` (defaults
    ``DB_beta=0.9``, ``DB_beta_sigma=0``).

    Loss-scale balancing: the gradients of ``log(L_i + 1e-8)``, ``J_i / (L_i + 1e-8)``.
    With step ``t`` (from 1), the buffer (``grad_buffer`` ``[K, P]``, initially 0) becomes
    ``g + beta / t**beta_sigma * (buffer - g)``. Gradient-magnitude balancing: with ``n_i`` the
    buffer's row norms, ``alpha_i = max_j n_j / (n_i + 1e-8)`` and the direction is
    ``sum_i alpha_i buffer_i``. ``last_weights`` holds ``alpha`` (weights of the buffer rows).
    Needs the losses.
    """

    _adaptive_buffers = ("grad_buffer",)

    def __init__(self, n_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__(n_tasks)
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("grad_buffer", torch.zeros(0))

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses)
        grads = jacobian / (losses + 1e-8).unsqueeze(1)
        buf = self._state("grad_buffer", jacobian)
        if not _check_lazy("db_mtl", buf, jacobian.shape):
            buf = torch.zeros_like(jacobian)
        self.step += 1
        rate = self.beta / self.step.to(jacobian.dtype).pow(self.beta_sigma)
        buf = grads + rate * (buf - grads)
        self._set_state("grad_buffer", buf)
        norms = torch.linalg.vector_norm(buf, dim=1)
        alpha = norms.max() / (norms + 1e-8)
        self.last_weights = alpha.detach()
        return alpha @ buf


# ------------------------------------------------------------------------------------------------
# moco
# ------------------------------------------------------------------------------------------------
@register(
    "moco",
    paper="Fernando et al., Mitigating Gradient Bias in Multi-objective Learning: A Provably "
    "Convergent Approach (MoCo), ICLR 2023",
    description="MoCo: tracked normalised gradients y and simplex weights lambda; y^T lambda.",
    stateful=True,
    modes=("params",),
    reference="LibMTL weighting/MoCo.py",
)
class MoCo(_StateMixin, JacobianAggregator):
    """MoCo (stochastic multi-objective gradient correction), as LibMTL ``weighting/MoCo.py``.

    Paper: Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023. Reference code: LibMTL
    ``weighting/MoCo.py`` (defaults ``beta=0.5``, ``beta_sigma=0.5``, ``gamma=0.1``,
    ``gamma_sigma=0.5``, ``rho=0``).

    With step ``t`` (from 1) and ``h_i = J_i / (|J_i| + 1e-8) L_i``: ``y <- y - beta / t**beta_sigma
    (y - h)`` (buffer ``y`` ``[K, P]``, initially 0), ``lambda <- softmax(lambda - gamma /
    t**gamma_sigma (y y^T + rho I) lambda)`` (buffer, initially ``1/K``), direction ``y^T lambda``.
    ``last_weights`` holds ``lambda`` (weights of the rows of ``y``). Needs the losses.
    """

    _adaptive_buffers = ("y", "lambd")

    def __init__(
        self,
        n_tasks: int,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__(n_tasks)
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("y", torch.zeros(0))
        self.register_buffer("lambd", torch.full((n_tasks,), 1.0 / n_tasks))

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses)
        norms = torch.linalg.vector_norm(jacobian, dim=1, keepdim=True)
        h = jacobian / (norms + 1e-8) * losses.unsqueeze(1)
        y = self._state("y", jacobian)
        if not _check_lazy("moco", y, jacobian.shape):
            y = torch.zeros_like(jacobian)
        self.step += 1
        t = self.step.to(jacobian.dtype)
        y = y - (self.beta / t.pow(self.beta_sigma)) * (y - h)
        k = self.n_tasks
        eye = torch.eye(k, dtype=jacobian.dtype, device=jacobian.device)
        lambd = self._state("lambd", jacobian)
        rate = self.gamma / t.pow(self.gamma_sigma)
        lambd = torch.softmax(lambd - rate * ((y @ y.T + self.rho * eye) @ lambd), dim=-1)
        self._set_state("y", y)
        self._set_state("lambd", lambd)
        self.last_weights = lambd.detach().clone()
        return lambd @ y


# ------------------------------------------------------------------------------------------------
# gradnorm
# ------------------------------------------------------------------------------------------------
@register(
    "gradnorm",
    paper="Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
    "Multitask Networks, ICML 2018",
    description="GradNorm: learnable weights pull gradient norms to training-rate targets.",
    stateful=True,
    learnable=True,
    protocol=("last_shared_layer",),
    reference="Chen et al. 2018 (Algorithm 1); LibMTL weighting/GradNorm.py",
)
class GradNorm(_StateMixin, JacobianAggregator):
    """GradNorm (paper form: learnable weights renormalised to sum ``K``).

    Paper: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018 (Algorithm 1). Reference code: LibMTL
    ``weighting/GradNorm.py`` (which parameterises ``w = K softmax(.)``; here the paper's
    renormalisation is used instead).

    The gradient norms are those of the last shared layer ``W`` (the paper's choice): the last
    ``layer_columns`` columns of ``J`` (``protocol=("last_shared_layer",)``: the trainer sets
    them with :meth:`set_last_shared_layer` to the size of the last module holding shared
    parameters, whose gradients are the last columns of the shared Jacobian; with
    ``layer_columns=None`` and nobody setting it, all of ``J``, as LibMTL). With learnable
    weights ``w`` (``nn.Parameter`` ``loss_weights``, initially 1), ``G_i = |w_i J_i|``,
    ``Gbar = mean G``, ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` (``L(0)``: the losses of the
    first call, buffer ``initial_losses``) and the targets ``Gbar r_i**alpha`` held constant, the
    GradNorm loss ``sum_i |G_i - Gbar r_i**alpha|`` is differentiated w.r.t. ``w`` and accumulated
    into ``loss_weights.grad``; the optimiser that holds ``balancer.parameters()`` steps it. At the
    start of each call ``w`` is renormalised in place to sum ``K`` (negative entries clipped to 0;
    all-zero or non-finite weights reset to 1). Direction ``w @ J``. Needs the losses.
    """

    _adaptive_buffers = ("initial_losses",)

    def __init__(self, n_tasks: int, alpha: float = 1.5, layer_columns: int | None = None) -> None:
        super().__init__(n_tasks)
        self.alpha = float(alpha)
        self.layer_columns: int | None = None
        if layer_columns is not None:
            self.set_last_shared_layer(layer_columns)
        self.loss_weights = nn.Parameter(torch.ones(n_tasks))
        self.register_buffer("initial_losses", torch.ones(n_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))

    def set_last_shared_layer(self, n_columns: int) -> None:
        """Take the gradient norms over the last ``n_columns`` columns of ``J``."""
        if not isinstance(n_columns, int) or n_columns < 1:
            raise ValueError(f"gradnorm: layer_columns must be a positive int, got {n_columns!r}")
        self.layer_columns = n_columns

    @torch.no_grad()
    def _renormalise(self) -> None:
        w = self.loss_weights.clamp(min=0.0)
        total = w.sum()
        ok = torch.isfinite(total) & (total > 0)
        scaled = w * (self.n_tasks / torch.where(ok, total, torch.ones_like(total)))
        self.loss_weights.copy_(torch.where(ok, scaled, torch.ones_like(w)))

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses).detach()
        self._renormalise()
        first = losses.clamp(min=1e-20)
        initial = torch.where(self.has_initial, self._state("initial_losses", losses), first)
        self._set_state("initial_losses", initial.clone())
        self.has_initial.fill_(True)
        layer = jacobian.detach()
        if self.layer_columns is not None:
            if self.layer_columns > layer.shape[1]:
                raise ValueError(
                    f"gradnorm: layer_columns={self.layer_columns} exceeds the jacobian's "
                    f"{layer.shape[1]} columns (shape {tuple(layer.shape)})"
                )
            layer = layer[:, layer.shape[1] - self.layer_columns :]
        norms = torch.linalg.vector_norm(layer, dim=1)
        ratio = losses / self._state("initial_losses", losses)
        rel = ratio / ratio.mean().clamp(min=1e-20)
        with torch.enable_grad():
            w = self.loss_weights.to(jacobian)
            g = w.abs() * norms
            target = (g.mean() * rel**self.alpha).detach()
            _backward_into((g - target).abs().sum(), [self.loss_weights])
        w = self.loss_weights.detach().to(jacobian)
        self.last_weights = w.clone()
        return w @ jacobian


# ------------------------------------------------------------------------------------------------
# cr_mogm
# ------------------------------------------------------------------------------------------------
def _as_weighting(name: str, obj: Balancer) -> Balancer:
    if not isinstance(obj, (LossWeighting, GramianWeighting)):
        raise ValueError(
            f"{name}: the wrapped method must be a weighting (a LossWeighting or a "
            f"GramianWeighting), got {type(obj).__name__} (needs={obj.needs!r})"
        )
    return obj


def _weights_of(base: Balancer, gramian: Tensor, losses: Tensor | None) -> Tensor:
    """One step of a weighting's weights (advancing its state once)."""
    if isinstance(base, GramianWeighting):
        return base.weights_from_gramian(gramian, losses).to(gramian)
    w = base.weights(None if losses is None else losses.detach()).to(gramian)
    if losses is not None:
        _train_loss_weighting(base, losses)
    return w


def _train_loss_weighting(lw: Balancer, losses: Tensor) -> None:
    """Accumulate the gradients of a learnable loss weighting's own parameters.

    The gradients are those an ordinary ``backward()`` of ``lw.objective(losses)`` would give its
    parameters (the losses are detached, so nothing flows into the model). Only called for
    weightings with trainable parameters (``uw``, ``imtl_l``), whose objective does not advance any
    other state.
    """
    if isinstance(lw, LossWeighting) and any(p.requires_grad for p in lw.parameters()):
        with torch.enable_grad():
            _backward_into(lw.objective(losses.detach()), lw.parameters())


@register(
    "cr_mogm",
    paper="Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient Manipulation "
    "and Beyond, NeurIPS 2022",
    description="CR-MOGM: exponential moving average of another weighting's task weights.",
    stateful=True,
    reference="torchjd 0.18 aggregation.CRMOGMWeighting",
)
class CRMOGM(_StateMixin, GramianWeighting):
    """CR-MOGM weight smoothing around another weighting.

    Paper: Zhou, Zhang, Jiang, Liu, Liu & Wang, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS 2022. Reference code: torchjd 0.18
    ``aggregation/_cr_mogm.py`` (``CRMOGMWeighting``, default ``alpha=0.9``).

    With ``w_hat_k`` the weights of the wrapped method at step ``k``:
    ``w_k = alpha w_{k-1} + (1 - alpha) w_hat_k`` and ``w_1 = w_hat_1``; direction ``w_k @ J``.

    Args:
        base: registered name of the wrapped method; it must be a weighting (a
            :class:`LossWeighting` or a :class:`GramianWeighting`, i.e. ``direction = w @ J``).
            Default ``"pcgrad"`` (PCGrad is one of the paper's wrapped methods).
        alpha: EMA coefficient on the previous weights (0: no smoothing).
        base_hparams: hyperparameters for the wrapped method.

    The wrapped method is a submodule (its state and parameters are in ``state_dict``); a learnable
    wrapped loss weighting (``uw``) gets its parameter gradients as in :func:`compose`. The
    instance's ``info`` adds the wrapped method's protocol and capabilities.
    """

    _adaptive_buffers = ("smoothed",)

    def __init__(
        self,
        n_tasks: int,
        base: str = "pcgrad",
        alpha: float = 0.9,
        base_hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(n_tasks)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"cr_mogm: alpha must be in [0, 1], got {alpha!r}")
        if base == "cr_mogm":
            raise ValueError("cr_mogm: cannot wrap itself")
        self.alpha = float(alpha)
        self.base = _as_weighting("cr_mogm", create(base, n_tasks, **(base_hparams or {})))
        self.register_buffer("smoothed", torch.zeros(n_tasks))
        self.register_buffer("has_smoothed", torch.zeros((), dtype=torch.bool))
        base_info = self.base.info
        self.info = replace(
            type(self).info,
            learnable=base_info.learnable,
            protocol=single_batch_protocol(base_info.protocol),
            modes=base_info.modes,
            mode=base_info.mode,
            host_syncs=base_info.host_syncs,
        )

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        w_hat = _weights_of(self.base, gramian, losses)
        self.base.last_weights = w_hat.detach()
        smoothed = self.alpha * self._state("smoothed", gramian) + (1.0 - self.alpha) * w_hat
        w = torch.where(self.has_smoothed, smoothed, w_hat)
        self.has_smoothed.fill_(True)
        self._set_state("smoothed", w.clone())
        return w

    def after_step(self, losses: Tensor) -> None:
        self.base.after_step(losses)

    def epoch_end(self) -> None:
        """Forwarded to the wrapped method."""
        self.base.epoch_end()


# ------------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------------
def _resolve(b: Balancer | str, n_tasks: int | None, what: str) -> Balancer:
    if isinstance(b, Balancer):
        return b
    if isinstance(b, str):
        if n_tasks is None:
            raise ValueError(f"{what}: pass n_tasks=... to create {b!r} by name")
        return create(b, n_tasks)
    raise TypeError(f"{what}: expected a Balancer or a registered name, got {type(b).__name__}")


def _info_of(b: Balancer) -> BalancerInfo | None:
    return getattr(b, "info", None)


def _merged_info(name: str, parts: Sequence[Balancer], description: str) -> BalancerInfo:
    infos = [i for i in (_info_of(p) for p in parts) if i is not None]
    protocol: list[str] = []
    for i in infos:  # members are called through their single-batch form
        protocol += [x for x in single_batch_protocol(i.protocol) if x not in protocol]
    modes = ("params", "representation")
    for i in infos:
        modes = tuple(m for m in modes if m in i.modes)
    mode = next((i.mode for i in reversed(infos) if i.mode is not None), None)
    return BalancerInfo(
        name=name,
        cls=Composed,
        needs="jacobian",
        paper="; ".join(i.paper for i in infos),
        description=description,
        stateful=any(i.stateful for i in infos),
        learnable=any(i.learnable for i in infos),
        protocol=tuple(protocol),
        modes=modes,
        hparams={},
        reference="; ".join(i.reference for i in infos if i.reference),
        mode=mode,
        host_syncs=sum_host_syncs([i.host_syncs for i in infos]),
    )


class _Wrapper(Balancer):
    """Forwards the protocol hooks to the wrapped balancers."""

    needs: ClassVar[Needs] = "jacobian"

    def _members(self) -> list[Balancer]:
        raise NotImplementedError

    def after_step(self, losses: Tensor) -> None:
        for b in self._members():
            b.after_step(losses)

    def epoch_end(self) -> None:
        for b in self._members():
            b.epoch_end()

    def set_last_shared_layer(self, n_columns: int) -> None:
        for b in self._members():
            b.set_last_shared_layer(n_columns)


class Composed(_Wrapper):
    """A loss weighting followed by a gradient method (see :func:`compose`)."""

    def __init__(self, loss_weighting: Balancer, gradient_method: Balancer) -> None:
        if not isinstance(loss_weighting, LossWeighting):
            raise ValueError(
                f"compose: the first method must be a LossWeighting, got "
                f"{type(loss_weighting).__name__}"
            )
        if loss_weighting.n_tasks != gradient_method.n_tasks:
            raise ValueError(
                f"compose: n_tasks differ ({loss_weighting.n_tasks} vs {gradient_method.n_tasks})"
            )
        super().__init__(loss_weighting.n_tasks)
        self.loss_weighting = loss_weighting
        self.gradient_method = gradient_method
        lw_name = getattr(_info_of(loss_weighting), "name", type(loss_weighting).__name__)
        gm_name = getattr(_info_of(gradient_method), "name", type(gradient_method).__name__)
        self.info = _merged_info(
            f"{lw_name}+{gm_name}",
            [loss_weighting, gradient_method],
            f"{lw_name} loss weights applied to the task gradients, then {gm_name}.",
        )

    def _members(self) -> list[Balancer]:
        return [self.loss_weighting, self.gradient_method]

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        lw = self.loss_weighting
        w = lw.weights(None if losses is None else losses.detach()).to(jacobian)
        lw.last_weights = w.detach()
        if losses is not None:
            _train_loss_weighting(lw, losses)
        scaled_losses = None if losses is None else w * losses.detach()
        direction = self.gradient_method.combine(w.unsqueeze(1) * jacobian, scaled_losses)
        inner = self.gradient_method.last_weights
        self.last_weights = (
            w * inner.to(w) if isinstance(inner, Tensor) and inner.shape == w.shape else None
        )
        return direction


def compose(
    loss_weighting: Balancer | str,
    gradient_method: Balancer | str,
    *,
    n_tasks: int | None = None,
) -> Composed:
    """A loss weighting followed by a gradient method, e.g. ``compose("uw", "pcgrad", n_tasks=3)``.

    ``combine(J, losses)``: the loss weighting's weights ``w = loss_weighting.weights(losses)``
    scale the rows (``J_i -> w_i J_i``, the gradients of the weighted losses ``w_i L_i``, which are
    also what the gradient method receives as losses); the gradient method then combines the scaled
    Jacobian into the direction. ``last_weights``: ``w`` times the gradient method's weights where
    it has them.

    Learnable loss weightings (``uw``, ``imtl_l``): their parameters are not on the path from the
    model's loss to the direction, so ``combine`` gives them their gradients itself: it evaluates
    ``loss_weighting.objective(losses.detach())`` (detached losses, so nothing reaches the model)
    and backpropagates it into the loss weighting's parameters only
    (``torch.autograd.backward(..., inputs=params)``). Their ``.grad`` then holds exactly what the
    plain loss weighting would have given them (for UW, ``1/2 - L_i / (2 exp(s_i))``), and the
    optimiser that holds ``composed.parameters()`` steps them; ``zero_grad`` clears them.

    Both arguments are balancer objects or registered names (then ``n_tasks`` is needed). The
    result's ``info`` merges the two records (``needs="jacobian"``, the union of the protocols).
    """
    lw = _resolve(loss_weighting, n_tasks, "compose")
    gm = _resolve(gradient_method, n_tasks, "compose")
    return Composed(lw, gm)


# ------------------------------------------------------------------------------------------------
# partition
# ------------------------------------------------------------------------------------------------
class Partitioned(_Wrapper):
    """One balancer per column block of ``J`` (see :func:`partition`)."""

    def __init__(self, balancers: Sequence[Balancer], group_sizes: Sequence[int]) -> None:
        if len(balancers) != len(group_sizes) or not balancers:
            raise ValueError("partition: one balancer per group is needed")
        n = balancers[0].n_tasks
        if any(b.n_tasks != n for b in balancers):
            raise ValueError("partition: every group's balancer must have the same n_tasks")
        super().__init__(n)
        self.group_sizes = [int(s) for s in group_sizes]
        self.groups = nn.ModuleList(balancers)
        first = _info_of(balancers[0])
        name = getattr(first, "name", type(balancers[0]).__name__)
        self.info = replace(
            _merged_info(
                f"partition({name})",
                list(balancers),
                f"{name} applied separately to {len(balancers)} parameter groups.",
            ),
            cls=Partitioned,
        )

    def _members(self) -> list[Balancer]:
        return list(self.groups)

    def set_last_shared_layer(self, n_columns: int) -> None:
        """The last shared layer lies in the last group (an error if it spans several)."""
        if n_columns > self.group_sizes[-1]:
            raise ValueError(
                f"partition: the last shared layer ({n_columns} columns) spans several groups "
                f"(group_sizes={self.group_sizes})"
            )
        self.groups[-1].set_last_shared_layer(n_columns)

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        total = sum(self.group_sizes)
        if jacobian.shape[1] != total:
            raise ValueError(
                f"Partitioned: jacobian has {jacobian.shape[1]} columns but the groups sum to "
                f"{total} (group_sizes={self.group_sizes}, shape {tuple(jacobian.shape)})"
            )
        parts = []
        start = 0
        for balancer, size in zip(self.groups, self.group_sizes, strict=True):
            parts.append(balancer.combine(jacobian[:, start : start + size], losses))
            start += size
        weights = [b.last_weights for b in self.groups]
        self.last_weights = (
            torch.stack([w.to(jacobian) for w in weights])
            if all(isinstance(w, Tensor) and w.shape == (self.n_tasks,) for w in weights)
            else None
        )
        return torch.cat(parts).to(jacobian.dtype)


def partition(balancer_factory: Callable[[], Balancer], group_sizes: Sequence[int]) -> Partitioned:
    """Balance each column block of ``J`` separately, e.g. per layer.

    ``balancer_factory()`` is called once per group (``len(group_sizes)`` independent balancers,
    e.g. ``lambda: create("pcgrad", 3)``); ``combine(J, losses)`` splits the columns of ``J`` into
    consecutive blocks of ``group_sizes`` (which must sum to ``P``), combines each block with its
    own balancer and concatenates the directions. ``last_weights`` is ``[n_groups, K]`` when every
    group has weights. State and parameters of every group are in ``state_dict``.
    """
    sizes = list(group_sizes)
    if not sizes or any(not isinstance(s, int) or s < 0 for s in sizes):
        raise ValueError(f"partition: group_sizes must be non-negative ints, got {group_sizes!r}")
    return Partitioned([balancer_factory() for _ in sizes], sizes)
