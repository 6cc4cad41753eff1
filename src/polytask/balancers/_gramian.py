"""Gradient-balancing methods that combine the task gradients through the Gramian (and a few
that need the full Jacobian): MGDA, UPGrad, DualProj, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL,
FairGrad, NTKMTL, Krum, trimmed mean, ConFIG.

Every solver runs in torch on the ``K x K`` Gramian (see :mod:`._solvers`); nothing here calls
scipy, cvxpy or numpy on the training path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import GramianWeighting, JacobianAggregator, register
from ._solvers import (
    cagrad_weights,
    min_norm_point,
    nash_cccp_subproblem,
    power_equation,
    project_to_dual_cone,
)

__all__ = [
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "IMTLG",
    "Krum",
    "MGDA",
    "MGDAUB",
    "NTKMTL",
    "NTKMTLSR",
    "AlignedMTL",
    "AlignedMTLUB",
    "NashMTL",
    "TrimmedMean",
    "UPGrad",
]

_TINY = {torch.float16: 6e-5, torch.bfloat16: 1e-38}


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _pref(pref_vector: Sequence[float] | None, n_tasks: int, name: str) -> Tensor | None:
    if pref_vector is None:
        return None
    v = torch.as_tensor(pref_vector, dtype=torch.float64)
    if v.shape != (n_tasks,):
        raise ValueError(f"{name}: pref_vector must have {n_tasks} entries, got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name}: pref_vector must be finite")
    return v


# ---------------------------------------------------------------------------------------------
# MGDA
# ---------------------------------------------------------------------------------------------

_GRAD_NORMS = ("none", "l2", "loss", "loss+")


@register(
    "mgda",
    paper="Désidéri, C. R. Math. 2012; Sener & Koltun, NeurIPS 2018",
    description="Min-norm point of the convex hull of the task gradients (exact QP).",
    reference="torchjd 0.18 aggregation.MGDA / LibMTL weighting.MGDA (solved exactly here)",
    host_syncs=None,
)
class MGDA(GramianWeighting):
    """Multiple-gradient descent: the min-norm element of the convex hull of the gradients.

    ``w = argmin_{w in simplex} ||w @ J||^2`` and ``direction = w @ J``. The quadratic program is
    solved *exactly* on the Gramian with an active-set method (:func:`._solvers.qp_active_set`),
    not with the early-stopped Frank-Wolfe iterations of the references, so the direction is the
    true min-norm point: every task gradient ``g_i`` has ``g_i . d >= ||d||^2`` with equality on the
    support of ``w``.

    Papers: J.-A. Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 350, 2012; O. Sener & V. Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
    Reference code: torchjd 0.18 ``aggregation.MGDA`` (Frank-Wolfe, epsilon=1e-3), LibMTL
    ``weighting/MGDA.py`` and isl-org/MultiObjectiveOptimization (``MinNormSolver``).

    Args:
        grad_norm: gradient normalisation applied before solving, as in LibMTL / the official
            code (``mgda_gn``): ``"none"`` (default), ``"l2"`` (``||g_i||``), ``"loss"``
            (``L_i``), ``"loss+"`` (``L_i ||g_i||``). The direction is then ``w @ (J / gn)``,
            i.e. ``last_weights = w / gn``. Zero normalisers are replaced by 1.
    """

    def __init__(self, n_tasks: int, grad_norm: str = "none") -> None:
        super().__init__(n_tasks)
        if grad_norm not in _GRAD_NORMS:
            raise ValueError(f"mgda: grad_norm must be one of {_GRAD_NORMS}, got {grad_norm!r}")
        self.grad_norm = grad_norm

    def _normalisers(self, gramian: Tensor, losses: Tensor | None) -> Tensor | None:
        if self.grad_norm == "none":
            return None
        norms = gramian.diagonal().clamp_min(0.0).sqrt()
        if self.grad_norm == "l2":
            gn = norms
        else:
            losses = self._require_losses(losses).to(gramian)
            gn = losses if self.grad_norm == "loss" else losses * norms
        return torch.where(gn.abs() > _tiny(gn.dtype), gn, torch.ones_like(gn))

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        gn = self._normalisers(gramian, losses)
        if gn is None:
            return min_norm_point(gramian)
        w = min_norm_point(gramian / (gn.unsqueeze(0) * gn.unsqueeze(1)))
        return w / gn


@register(
    "mgda_ub",
    paper="Sener & Koltun, NeurIPS 2018 (MGDA-UB)",
    description="MGDA on the gradients w.r.t. the shared representation (upper bound).",
    reference="isl-org/MultiObjectiveOptimization (MGDA-UB); LibMTL MGDA with rep_grad=True",
    mode="representation",
    host_syncs=None,
)
class MGDAUB(MGDA):
    """MGDA-UB: MGDA solved on the gradients with respect to the shared representation.

    Same computation as :class:`MGDA`; it is registered with ``mode="representation"`` so that
    the engine feeds it the Jacobian of the losses with respect to the shared representation ``Z``
    (the upper bound of Sener & Koltun, Theorem 1) and applies the resulting weights to the losses.

    Paper: O. Sener & V. Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018, Section 3.3. Reference code: isl-org/MultiObjectiveOptimization.
    """


# ---------------------------------------------------------------------------------------------
# UPGrad / DualProj
# ---------------------------------------------------------------------------------------------


def _normalised_regularised(gramian: Tensor, reg_eps: float) -> Tensor:
    """``G / trace(G) + reg_eps I`` (torchjd's ``regularize(normalize(G))``).

    torchjd zeroes the normalised Gramian when ``trace(G) < norm_eps = 1e-4`` (an absolute
    threshold, which turns UPGrad/DualProj into the mean for small gradients); here only an
    exactly degenerate trace (below the dtype's smallest normal number) is treated that way, so
    the methods stay invariant to the gradient scale.
    """
    K = gramian.shape[0]
    trace = gramian.diagonal().sum()
    tiny = _tiny(gramian.dtype)
    G = torch.where(trace > tiny, gramian / trace.clamp_min(tiny), torch.zeros_like(gramian))
    return G + reg_eps * torch.eye(K, dtype=gramian.dtype, device=gramian.device)


@register(
    "upgrad",
    paper="Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv:2406.16232",
    description="Average of the projections of each task gradient onto the dual cone.",
    reference="torchjd 0.18 aggregation.UPGrad (quadprog; here an exact active-set QP in torch)",
    host_syncs=None,
)
class UPGrad(GramianWeighting):
    """UPGrad: project every row of ``J`` onto the dual cone of the rows, then average.

    With ``G~ = G / trace(G) + reg_eps I``, the weights of the projection of ``J^T u`` onto the
    dual cone ``{x : J x >= 0}`` solve ``min v^T G~ v`` s.t. ``v >= u`` (Proposition 1 of the
    paper); UPGrad sums those weights over ``u = pref_i e_i`` (``pref = 1/K`` by default), so the
    direction is non-conflicting (``J d >= 0``) and linear under scaling of the rows.

    Paper: P. Quinton & V. Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024. Reference code: torchjd 0.18 ``aggregation.UPGrad`` with
    ``QuadprogProjector(norm_eps=1e-4, reg_eps=1e-4)``. The K projection QPs are solved together
    by :func:`._solvers.project_to_dual_cone` (exact active set, batched).

    Args:
        pref_vector: weights of the combination of the projections (default: ``1/K`` each).
        reg_eps: multiple of the identity added to the trace-normalised Gramian (torchjd default).
    """

    def __init__(
        self, n_tasks: int, pref_vector: Sequence[float] | None = None, reg_eps: float = 1e-4
    ) -> None:
        super().__init__(n_tasks)
        if reg_eps <= 0:
            raise ValueError(f"upgrad: reg_eps must be positive, got {reg_eps}")
        self.pref_vector = _pref(pref_vector, n_tasks, "upgrad")
        self.reg_eps = float(reg_eps)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = gramian.shape[0]
        u = (
            torch.full((K,), 1.0 / K, dtype=gramian.dtype, device=gramian.device)
            if self.pref_vector is None
            else self.pref_vector.to(gramian)
        )
        G = _normalised_regularised(gramian, self.reg_eps)
        W = project_to_dual_cone(G, torch.diag(u))
        return W.sum(0)


@register(
    "dualproj",
    paper="Lopez-Paz & Ranzato, GEM, NeurIPS 2017 (Eq. 11); Quinton & Rey, arXiv:2406.16232",
    description="Projection of the mean gradient onto the dual cone of the task gradients.",
    reference="torchjd 0.18 aggregation.DualProj (quadprog; here an exact active-set QP in torch)",
    host_syncs=None,
)
class DualProj(GramianWeighting):
    """DualProj: project the (preference-weighted) mean gradient onto the dual cone.

    Weights solve ``min v^T G~ v`` s.t. ``v >= u`` with ``G~ = G / trace(G) + reg_eps I`` and
    ``u = pref`` (``1/K`` by default); the direction is non-conflicting (``J d >= 0``).

    Papers: D. Lopez-Paz & M. Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (Eq. 11); P. Quinton & V. Rey, arXiv:2406.16232. Reference code: torchjd 0.18
    ``aggregation.DualProj`` with ``QuadprogProjector(norm_eps=1e-4, reg_eps=1e-4)``.

    Args:
        pref_vector: the weights ``u`` of the combination to project (default ``1/K``).
        reg_eps: multiple of the identity added to the trace-normalised Gramian.
    """

    def __init__(
        self, n_tasks: int, pref_vector: Sequence[float] | None = None, reg_eps: float = 1e-4
    ) -> None:
        super().__init__(n_tasks)
        if reg_eps <= 0:
            raise ValueError(f"dualproj: reg_eps must be positive, got {reg_eps}")
        self.pref_vector = _pref(pref_vector, n_tasks, "dualproj")
        self.reg_eps = float(reg_eps)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = gramian.shape[0]
        u = (
            torch.full((K,), 1.0 / K, dtype=gramian.dtype, device=gramian.device)
            if self.pref_vector is None
            else self.pref_vector.to(gramian)
        )
        G = _normalised_regularised(gramian, self.reg_eps)
        return project_to_dual_cone(G, u)


# ---------------------------------------------------------------------------------------------
# CAGrad
# ---------------------------------------------------------------------------------------------


@register(
    "cagrad",
    paper="Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021",
    description="Maximise the worst task improvement in a ball around the mean gradient.",
    reference="torchjd 0.18 aggregation.CAGrad(c) (cvxpy/CLARABEL; here an exact solve in torch)",
    host_syncs=None,
)
class CAGrad(GramianWeighting):
    """CAGrad: ``d = g_0 + (r / ||g_w||) g_w`` with ``w`` the worst-case weights.

    ``w`` minimises ``g_w . g_0 + r ||g_w||`` over the simplex (``g_0`` the mean gradient,
    ``g_w = w @ J``, ``r`` the radius of the ball around ``g_0``), computed on the
    trace-normalised Gramian and solved exactly by :func:`._solvers.cagrad_weights`. The weights
    are ``1/K + (r / ||g_w||) w``; they are all zero when ``||g_w|| < norm_eps`` in the normalised
    space (approximately Pareto-stationary point), as in torchjd. With ``c = 0`` the direction is
    the mean gradient.

    Radius convention (``convention``):

    * ``"torchjd"`` (default): ``r = c ||g_0|| / sqrt(K)``, the output of torchjd 0.18
      ``CAGrad(c)``, which the parity vectors were produced with (its weights are
      ``1/K + c ||g_0|| / (sqrt(K) ||g_w||) w``, checked on all 28 shared cases);
    * ``"official"``: ``r = c ||g_0||`` as in the paper's Algorithm 1, the official code and
      LibMTL (combine with ``rescale=1`` to reproduce their final division by ``1 + c^2``).

    Paper: B. Liu, X. Liu, X. Jin, P. Stone & Q. Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021 (Algorithm 1). Reference code: torchjd 0.18
    ``aggregation.CAGrad`` (``norm_eps=1e-4``); official Cranial-XIX/CAGrad and LibMTL
    ``weighting/CAGrad.py`` (``calpha=0.5, rescale=1`` there).

    Args:
        c: radius scale of the ball around the mean gradient (official default 0.4).
        norm_eps: threshold on ``||g_w||`` (trace-normalised) below which the weights are zero.
        rescale: ``0`` = no rescaling (torchjd, default); ``1`` = divide by ``1 + c^2``
            (official code and LibMTL default); ``2`` = divide by ``1 + c``.
        convention: ``"torchjd"`` or ``"official"`` (radius, see above).
    """

    def __init__(
        self,
        n_tasks: int,
        c: float = 0.4,
        norm_eps: float = 1e-4,
        rescale: int = 0,
        convention: str = "torchjd",
    ) -> None:
        super().__init__(n_tasks)
        if c < 0:
            raise ValueError(f"cagrad: c must be non-negative, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
        if convention not in ("torchjd", "official"):
            raise ValueError(
                f"cagrad: convention must be 'torchjd' or 'official', got {convention!r}"
            )
        self.c = float(c)
        self.norm_eps = float(norm_eps)
        self.rescale = int(rescale)
        self.convention = convention

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = gramian.shape[0]
        factor = 1.0 / math.sqrt(K) if self.convention == "torchjd" else 1.0
        w = cagrad_weights(gramian, self.c, self.norm_eps, radius_factor=factor)
        if self.rescale == 1:
            w = w / (1.0 + self.c**2)
        elif self.rescale == 2:
            w = w / (1.0 + self.c)
        return w


# ---------------------------------------------------------------------------------------------
# IMTL-G
# ---------------------------------------------------------------------------------------------


@register(
    "imtl_g",
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (IMTL-G)",
    description="Direction with equal projections on all normalised task gradients.",
    reference="torchjd 0.18 aggregation.IMTLG",
)
class IMTLG(GramianWeighting):
    """IMTL-G: the combination whose projections on every unit task gradient are equal.

    ``v = pinv(G) sqrt(diag(G))`` and ``w = v / sum(v)``; then ``g_i . d / ||g_i||`` is the same
    for every task (torchjd's generalisation, which tolerates linearly dependent rows through the
    pseudo-inverse). The weights are zero when ``|sum(v)|`` vanishes relative to ``sum(|v|)``
    (torchjd uses an absolute ``1e-12``, which is not scale invariant). Invariant to the scale of
    the gradients (weights unchanged, direction linear in the scale).

    Paper: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao & W. Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021. Reference code: torchjd 0.18 ``aggregation.IMTLG``.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        # Normalise by the largest diagonal entry for conditioning (weights are invariant).
        scale = gramian.diagonal().amax()
        tiny = _tiny(gramian.dtype)
        G = torch.where(scale > tiny, gramian / scale.clamp_min(tiny), torch.zeros_like(gramian))
        d = G.diagonal().clamp_min(0.0).sqrt()
        v = torch.linalg.pinv(G) @ d
        s = v.sum()
        degenerate = s.abs() <= 1e3 * torch.finfo(G.dtype).eps * v.abs().sum()
        return torch.where(degenerate | ~torch.isfinite(s), torch.zeros_like(v), v / s)


# ---------------------------------------------------------------------------------------------
# Nash-MTL
# ---------------------------------------------------------------------------------------------


@register(
    "nash_mtl",
    paper="Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022",
    description="Nash bargaining solution G a = 1/a via the official convex-concave procedure.",
    stateful=True,
    reference="AvivNavon/nash-mtl@cce1840 NashMTL; torchjd 0.18 aggregation.NashMTL",
    host_syncs=None,
)
class NashMTL(GramianWeighting):
    """Nash-MTL: weights from the Nash bargaining solution ``G a = 1/a``.

    Follows the official code (and torchjd's port of it) step by step: every
    ``update_weights_every`` calls the weights are recomputed, otherwise the previous ones are
    reused. The recomputation normalises ``G~ = G / ||G||_F`` and runs up to ``optim_niter``
    iterations of the reference's convex-concave procedure (CCCP), started from the previous
    weights (all ones at the first step): each iteration minimises the linearised objective
    ``sum(G~ a) + phi'(a_prev) . (a - a_prev) / ||G||_F`` subject to ``a_i (G a)_i >= 1``, and the
    loop stops, keeping the iterate *before* the last solve, when ``||G~ a - 1/a|| < 1e-3`` or
    when the iterate moves by less than ``1e-6`` (the reference's stopping rules, kept because
    they shape the output on badly scaled inputs, where the CCCP drifts away from the bargaining
    solution). Each subproblem is solved in torch (:func:`._solvers.nash_cccp_subproblem`):
    first the bargaining point itself (found by Newton's method on the convex potential
    ``1/2 a^T G a - sum log a``) is tested with its KKT multipliers, which settles the common
    case with one linear solve; otherwise a log-barrier method on the rotated-cone form of the
    constraints solves it to a 1e-11 relative duality gap.

    Finally, as in torchjd, if ``max_norm > 0`` and ``||a @ J|| > max_norm`` the weights are
    scaled so that the direction has norm ``max_norm`` (the official code clips the gradient norm
    the same way, up to the ``1e-6`` of ``clip_grad_norm_``). ``last_weights`` are the scaled
    weights.

    Reference failure mode: the reference solves each subproblem with cvxpy/ECOS, swallows solver
    exceptions, ignores non-optimal statuses and then returns its previous weights (all ones at
    the first step) or an inaccurate iterate. Here every subproblem is solved to tolerance; when
    a subproblem genuinely has no solution -- no direction decreases every task (e.g. exactly
    opposite or zero gradients), or the linearised objective is unbounded -- the loop stops and
    the previous weights are kept, which is the reference's behaviour in that situation. The
    buffer ``solve_ok`` records whether the last recomputation ended on a solved subproblem.

    Paper: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik & E. Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022 (Algorithm 1, Section 3.3).
    Reference code: AvivNavon/nash-mtl@cce1840 ``methods/weight_methods.py::NashMTL``; torchjd
    0.18 ``aggregation.NashMTL`` (defaults ``max_norm=1.0, update_weights_every=1,
    optim_niter=20``).

    Args:
        max_norm: the direction is scaled down to this norm if longer (0 disables).
        update_weights_every: recompute the weights every this many calls.
        optim_niter: maximum number of CCCP iterations per recomputation.
    """

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(n_tasks)
        if update_weights_every < 1:
            raise ValueError(
                f"nash_mtl: update_weights_every must be >= 1, got {update_weights_every}"
            )
        if optim_niter < 1:
            raise ValueError(f"nash_mtl: optim_niter must be >= 1, got {optim_niter}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("prvs_alpha", torch.ones(n_tasks, dtype=torch.float64))
        self.register_buffer("solve_ok", torch.ones((), dtype=torch.bool))

    def reset(self) -> None:
        """Forget the previous weights and the step counter."""
        self.step.zero_()
        self.prvs_alpha.fill_(1.0)
        self.solve_ok.fill_(True)

    def _cccp(self, gramian: Tensor, alpha0: Tensor) -> tuple[Tensor, bool]:
        G = gramian
        nf = torch.linalg.matrix_norm(G)
        tiny = _tiny(G.dtype)
        if not bool(nf > tiny):
            return alpha0, False
        Gt = G / nf
        sq = nf.sqrt()
        x_star, ok_star = power_equation(Gt, 1.0)
        # power_equation normalises by the trace internally and scales back: x_star solves
        # Gt x = 1/x.
        if not bool(ok_star) or not bool(torch.isfinite(x_star).all()):
            return alpha0, False
        alpha_t = alpha0
        solved_any = False
        for _ in range(self.optim_niter):
            xp = alpha_t * sq
            c = Gt.sum(0) + (1.0 / xp + Gt @ (1.0 / (Gt @ xp))) / sq
            if not bool(torch.isfinite(c).all()):
                # The linearisation is undefined at the previous iterate (the reference's solver
                # then fails); keep the previous weights.
                break
            x_new, ok = nash_cccp_subproblem(Gt, c, x_star)
            if not bool(ok):
                break
            solved_any = True
            alpha_new = x_new / sq
            stop = bool(torch.linalg.vector_norm(Gt @ alpha_t - 1.0 / (alpha_t + 1e-10)) < 1e-3)
            stop = stop or bool(torch.linalg.vector_norm(alpha_new - alpha_t) < 1e-6)
            if stop:
                break
            alpha_t = alpha_new
        return alpha_t, solved_any

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        if int(self.step) % self.update_weights_every == 0:
            alpha0 = self.prvs_alpha.to(device=gramian.device, dtype=gramian.dtype)
            alpha, ok = self._cccp(gramian, alpha0)
            self.prvs_alpha.copy_(alpha.to(self.prvs_alpha))
            self.solve_ok.fill_(ok)
        else:
            alpha = self.prvs_alpha.to(device=gramian.device, dtype=gramian.dtype)
        self.step += 1
        if self.max_norm > 0:
            norm = (alpha @ gramian @ alpha).clamp_min(0.0).sqrt()
            factor = torch.where(norm > self.max_norm, self.max_norm / norm, torch.ones_like(norm))
            alpha = alpha * factor
        return alpha


# ---------------------------------------------------------------------------------------------
# Aligned-MTL
# ---------------------------------------------------------------------------------------------

_SCALE_MODES = ("min", "median", "rmse")


@register(
    "aligned_mtl",
    paper="Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023",
    description="Align the principal components of the task gradients (condition number 1).",
    reference="torchjd 0.18 aggregation.AlignedMTL(scale_mode='min')",
)
class AlignedMTL(GramianWeighting):
    """Aligned-MTL: ``w = B u`` with ``B = sqrt(scale) V S^{-1/2} V^T`` from ``G = V S V^T``.

    Eigenvalues below ``lambda_max * K * eps(dtype)`` are treated as zero (rank truncation, as in
    torchjd 0.18; LibMTL uses the float32 epsilon whatever the dtype); ``scale`` is the smallest
    kept eigenvalue (``"min"``, default), the median (``"median"``) or the mean (``"rmse"``, as in
    the official code). When the Gramian is zero, ``B`` is the identity. Linear under scaling.

    Paper: D. Senushkin, N. Patakin, A. Kuznetsov & A. Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023 (Algorithm 1). Reference code: torchjd 0.18
    ``aggregation.AlignedMTL``; LibMTL ``weighting/Aligned_MTL.py``; SamsungLabs/MTL.

    Args:
        pref_vector: weights ``u`` combined by the balance transformation (default ``1/K``).
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
    """

    def __init__(
        self,
        n_tasks: int,
        pref_vector: Sequence[float] | None = None,
        scale_mode: str = "min",
    ) -> None:
        super().__init__(n_tasks)
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"aligned_mtl: scale_mode must be one of {_SCALE_MODES}")
        self.pref_vector = _pref(pref_vector, n_tasks, "aligned_mtl")
        self.scale_mode = scale_mode

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = gramian.shape[0]
        u = (
            torch.full((K,), 1.0 / K, dtype=gramian.dtype, device=gramian.device)
            if self.pref_vector is None
            else self.pref_vector.to(gramian)
        )
        lam, V = torch.linalg.eigh(gramian)  # ascending eigenvalues
        lam_max = lam.amax()
        tol = lam_max * K * torch.finfo(gramian.dtype).eps
        keep = lam > tol  # a suffix of the ascending eigenvalues
        n_kept = keep.sum()
        lam_k = torch.where(keep, lam, torch.ones_like(lam))
        inv_sqrt = torch.where(keep, lam_k.rsqrt(), torch.zeros_like(lam))
        # Statistics of the kept eigenvalues without boolean indexing (no host sync).
        first = (K - n_kept).clamp(max=K - 1)
        if self.scale_mode == "min":
            scale = lam.gather(0, first.reshape(1))[0]
        elif self.scale_mode == "median":  # torch.median's lower median of the kept values
            scale = lam.gather(0, (first + (n_kept - 1).clamp(min=0) // 2).reshape(1))[0]
        else:
            scale = torch.where(keep, lam, torch.zeros_like(lam)).sum() / n_kept.clamp(min=1)
        B = scale.clamp(min=0.0).sqrt() * (V * inv_sqrt) @ V.T
        return torch.where(n_kept > 0, B @ u, u)


@register(
    "aligned_mtl_ub",
    paper="Senushkin et al., CVPR 2023 (Aligned-MTL-UB)",
    description="Aligned-MTL on the gradients w.r.t. the shared representation.",
    reference="SamsungLabs/MTL (aligned-mtl-ub); LibMTL Aligned_MTL with rep_grad=True",
    mode="representation",
)
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB: :class:`AlignedMTL` on the representation gradients.

    Same computation, registered with ``mode="representation"`` (the cheaper upper-bound variant
    of the paper, Section 4.3), so the engine feeds it the Jacobian with respect to the shared
    representation and applies the weights to the losses.

    Paper: D. Senushkin et al., CVPR 2023. Reference code: LibMTL ``weighting/Aligned_MTL.py``
    with ``rep_grad=True``.
    """


# ---------------------------------------------------------------------------------------------
# FairGrad
# ---------------------------------------------------------------------------------------------


@register(
    "fairgrad",
    paper="Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024",
    description="alpha-fair allocation: weights solving G w = w^(-1/alpha).",
    reference="torchjd 0.18 aggregation.FairGrad(alpha); OptMN-Lab/fairgrad; LibMTL FairGrad",
    host_syncs=None,
)
class FairGrad(GramianWeighting):
    """FairGrad: weights ``w > 0`` with ``G w = w^(-1/alpha)`` elementwise; ``d = w @ J``.

    The references solve this with ``scipy.optimize.least_squares`` from ``1/K``; here ``w`` is
    computed as the unique minimiser of the strictly convex potential
    ``1/2 w^T G w + sum phi(w_i)``, ``phi'(t) = -t^(-1/alpha)``, by damped Newton iterations in
    torch (:func:`._solvers.power_equation`). With ``alpha = 1`` this is the Nash bargaining
    solution. On degenerate inputs where no positive solution exists (a zero gradient, or
    gradients with a vanishing non-negative combination, e.g. exactly opposite ones) the Newton
    iterations do not converge; the equation is then re-solved with ``1e-10 I`` added to the
    trace-normalised Gramian, which makes the solution exist and keeps the weights finite. The
    official code multiplies the direction by ``K`` and clips its norm in its training step;
    torchjd (whose convention the parity vectors follow) returns ``w @ J`` unscaled, as here.

    Paper: H. Ban & K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
    Reference code: torchjd 0.18 ``aggregation.FairGrad``; OptMN-Lab/fairgrad; LibMTL
    ``weighting/FairGrad.py`` (``FairGrad_alpha`` default 1.0).

    Args:
        alpha: the fairness exponent (1: proportional fairness; larger: closer to max-min).
    """

    def __init__(self, n_tasks: int, alpha: float = 1.0) -> None:
        super().__init__(n_tasks)
        if not alpha > 0:
            raise ValueError(f"fairgrad: alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        w, ok = power_equation(gramian, self.alpha)
        if not bool(ok):
            w, _ = power_equation(gramian, self.alpha, ridge=1e-10)
        return torch.where(torch.isfinite(w), w, torch.zeros_like(w))


# ---------------------------------------------------------------------------------------------
# NTKMTL
# ---------------------------------------------------------------------------------------------


def _ntk_raw_weights(gramian: Tensor, ntk_exp: float) -> Tensor:
    diag = gramian.diagonal().clamp_min(0.0)
    trace = diag.sum()
    tiny = _tiny(gramian.dtype)
    ratio = trace / diag.clamp_min(tiny)
    w = ratio.pow(ntk_exp)
    # Zero gradients have no NTK eigenvalue: their weight is irrelevant (the row is zero); 0 keeps
    # everything finite where the reference divides by zero.
    return torch.where(diag > tiny, w, torch.zeros_like(w))


@register(
    "ntkmtl",
    paper="Qin et al., NTKMTL: Mitigating Task Imbalance in MTL from NTK Perspective, 2025",
    description="Weights (trace(G)/G_ii)^p balancing the NTK eigenvalues of the tasks.",
    reference="jianke0604/NTKMTL@abbf1f0 methods.weight_methods.NTKMTL",
)
class NTKMTL(GramianWeighting):
    """NTKMTL (one sample per task): ``w_i = (trace(G) / G_ii)^ntk_exp``.

    Follows the official step exactly: the combined gradient is ``K * (w @ J)`` ("to match the
    sum loss") and, if ``max_norm > 0``, it is clipped as ``torch.nn.utils.clip_grad_norm_``
    does: multiplied by ``min(1, max_norm / (||d|| + 1e-6))``. So the direction is
    ``last_weights @ J`` with ``last_weights = K * w * clip_coef``. Tasks with a zero gradient get
    weight 0 (the reference divides by zero there).

    Paper: NTKMTL, "Mitigating Task Imbalance in Multi-Task Learning from Neural Tangent Kernel
    Perspective" (2025). Reference code: jianke0604/NTKMTL@abbf1f0
    ``methods/weight_methods.py::NTKMTL`` (defaults ``max_norm=1.0, ntk_exp=0.5``).

    Args:
        ntk_exp: the exponent ``p`` (0.5 in the paper's experiments).
        max_norm: norm clipping of the combined gradient (0 disables).
    """

    def __init__(self, n_tasks: int, ntk_exp: float = 0.5, max_norm: float = 1.0) -> None:
        super().__init__(n_tasks)
        self.ntk_exp = float(ntk_exp)
        self.max_norm = float(max_norm)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = gramian.shape[0]
        w = K * _ntk_raw_weights(gramian, self.ntk_exp)
        if self.max_norm > 0:
            norm = (w @ gramian @ w).clamp_min(0.0).sqrt()
            coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
            w = w * coef
        return w


@register(
    "ntkmtl_sr",
    paper="Qin et al., NTKMTL (NTKMTL-SR, shared-representation variant), 2025",
    description="NTKMTL weights from the representation gradients, applied to the losses.",
    reference="jianke0604/NTKMTL@abbf1f0 NTKMTL (the 'NTKMTL-SR' branch of get_weighted_loss)",
    mode="representation",
)
class NTKMTLSR(GramianWeighting):
    """NTKMTL-SR: ``w_i = (sum_j lambda_j / lambda_i)^ntk_exp`` from representation gradients.

    In the official code's SR branch, ``lambda_i`` is the largest eigenvalue of task ``i``'s
    NTK with respect to the shared representation; with one (batch-averaged) gradient per task it
    is ``||g_i||^2 = G_ii``, so ``w_i = (trace(G) / G_ii)^ntk_exp``. The weights multiply the
    losses directly (no factor ``K``, no clipping: that branch returns a weighted loss), so the
    direction is ``w @ J``. Registered with ``mode="representation"``.

    Paper: NTKMTL (2025), Section on NTKMTL-SR. Reference code: jianke0604/NTKMTL@abbf1f0
    ``methods/weight_methods.py::NTKMTL.get_weighted_loss`` (commented SR branch).

    Args:
        ntk_exp: the exponent ``p``.
    """

    def __init__(self, n_tasks: int, ntk_exp: float = 0.5) -> None:
        super().__init__(n_tasks)
        self.ntk_exp = float(ntk_exp)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        return _ntk_raw_weights(gramian, self.ntk_exp)


# ---------------------------------------------------------------------------------------------
# Krum, trimmed mean
# ---------------------------------------------------------------------------------------------


@register(
    "krum",
    paper="Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant GD, "
    "NeurIPS 2017",
    description="(Multi-)Krum: average of the rows closest to their neighbours.",
    reference="torchjd 0.18 aggregation.Krum",
)
class Krum(GramianWeighting):
    """Krum / Multi-Krum on the task gradients.

    Each row is scored by the sum of its distances to its ``K - n_byzantine - 2`` nearest other
    rows (distances from the Gramian, clamped at 0 against rounding); the ``n_selected`` rows
    with the smallest scores are averaged. Requires ``K >= n_byzantine + 3`` and
    ``K >= n_selected`` (checked at construction).

    Paper: P. Blanchard, E. M. El Mhamdi, R. Guerraoui & J. Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. Reference code: torchjd 0.18
    ``aggregation.Krum`` (``n_selected`` defaults to 1; ``n_byzantine`` has no default there,
    0 here).

    Args:
        n_byzantine: number of rows that may be adversarial.
        n_selected: number of rows averaged (Multi-Krum when > 1).
    """

    def __init__(self, n_tasks: int, n_byzantine: int = 0, n_selected: int = 1) -> None:
        super().__init__(n_tasks)
        if n_byzantine < 0:
            raise ValueError(f"krum: n_byzantine must be >= 0, got {n_byzantine}")
        if n_selected < 1:
            raise ValueError(f"krum: n_selected must be >= 1, got {n_selected}")
        if n_tasks < n_byzantine + 3:
            raise ValueError(
                f"krum: needs n_tasks >= n_byzantine + 3 = {n_byzantine + 3}, got {n_tasks}"
            )
        if n_tasks < n_selected:
            raise ValueError(f"krum: n_selected={n_selected} exceeds n_tasks={n_tasks}")
        self.n_byzantine = int(n_byzantine)
        self.n_selected = int(n_selected)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = gramian.shape[0]
        sq = gramian.diagonal()
        dist2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * gramian).clamp_min(0.0)
        dist = dist2.sqrt()
        n_closest = K - self.n_byzantine - 2
        smallest, _ = torch.topk(dist, k=n_closest + 1, largest=False)
        scores = smallest[:, 1:].sum(1)
        _, sel = torch.topk(scores, k=self.n_selected, largest=False)
        w = torch.zeros(K, dtype=gramian.dtype, device=gramian.device)
        w[sel] = 1.0 / self.n_selected
        return w


@register(
    "trimmed_mean",
    paper="Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Rates, ICML 2018",
    description="Coordinate-wise mean after removing the trim_number largest and smallest values.",
    reference="torchjd 0.18 aggregation.TrimmedMean",
)
class TrimmedMean(JacobianAggregator):
    """Coordinate-wise trimmed mean of the task gradients.

    For every coordinate, the ``trim_number`` largest and ``trim_number`` smallest values across
    tasks are removed and the rest averaged. Not a combination of the rows, so
    ``last_weights`` is ``None``. Requires ``K >= 2 * trim_number + 1``.

    Paper: D. Yin, Y. Chen, K. Ramchandran & P. Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018. Reference code: torchjd 0.18
    ``aggregation.TrimmedMean`` (no default there; 0 here, i.e. the mean).

    Args:
        trim_number: values removed at each end of every coordinate.
    """

    def __init__(self, n_tasks: int, trim_number: int = 0) -> None:
        super().__init__(n_tasks)
        if trim_number < 0:
            raise ValueError(f"trimmed_mean: trim_number must be >= 0, got {trim_number}")
        if n_tasks < 2 * trim_number + 1:
            raise ValueError(
                f"trimmed_mean: needs n_tasks >= 2 * trim_number + 1 = {2 * trim_number + 1}, "
                f"got {n_tasks}"
            )
        self.trim_number = int(trim_number)

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        K = jacobian.shape[0]
        self.last_weights = None
        if self.trim_number == 0:
            return jacobian.mean(0)
        srt, _ = torch.sort(jacobian, dim=0)
        kept = srt.narrow(0, self.trim_number, K - 2 * self.trim_number)
        return kept.mean(0)


# ---------------------------------------------------------------------------------------------
# ConFIG
# ---------------------------------------------------------------------------------------------


@register(
    "config",
    paper="Liu, Chu & Thuerey, ConFIG: Towards Conflict-free Training of PINNs, ICLR 2025",
    description="Conflict-free direction: equal cosine to every task gradient, projected length.",
    reference="torchjd 0.18 aggregation.ConFIG; tum-pbs/ConFIG",
)
class ConFIG(JacobianAggregator):
    """ConFIG: ``d = (sum_i g_i . u) u`` with ``u`` the unit vector of ``pinv(U) @ pref``.

    ``U`` holds the unit task gradients (zero rows stay zero), so ``u`` makes the same angle with
    every task gradient (when the rows are independent); its length is the sum of the projections
    of the task gradients on it. ``pref`` defaults to ones. The pseudo-inverse is computed from an
    SVD of ``U`` with ``torch.linalg.pinv``'s default cut-off, as the references do; the direction
    is a combination of the rows, whose weights are stored in ``last_weights``.

    Paper: Q. Liu, M. Chu & N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025 (Eq. 2). Reference code: torchjd 0.18
    ``aggregation.ConFIG``; tum-pbs/ConFIG ``conflictfree``.

    Args:
        pref_vector: weights of the unit gradients in the target (default: ones).
    """

    def __init__(self, n_tasks: int, pref_vector: Sequence[float] | None = None) -> None:
        super().__init__(n_tasks)
        self.pref_vector = _pref(pref_vector, n_tasks, "config")

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        K = jacobian.shape[0]
        dtype, device = jacobian.dtype, jacobian.device
        pref = (
            torch.ones(K, dtype=dtype, device=device)
            if self.pref_vector is None
            else self.pref_vector.to(device=device, dtype=dtype)
        )
        norms = jacobian.norm(dim=1)
        tiny = _tiny(dtype)
        inv = torch.where(norms > tiny, 1.0 / norms.clamp_min(tiny), torch.zeros_like(norms))
        units = jacobian * inv.unsqueeze(1)
        # pinv(units) @ pref = Vh^T diag(s^+) Uh^T pref  =  units^T (Uh diag(s^+^2) Uh^T pref)
        Uh, S, Vh = torch.linalg.svd(units, full_matrices=False)
        cutoff = max(units.shape) * torch.finfo(dtype).eps * S.amax()
        s_inv = torch.where(cutoff < S, 1.0 / S.clamp_min(tiny), torch.zeros_like(S))
        coeff_u = Uh @ (s_inv * s_inv * (Uh.T @ pref))  # best = coeff_u @ units
        best = Vh.T @ (s_inv * (Uh.T @ pref))
        best_norm = best.norm()
        scale = torch.where(
            best_norm > 1e-12, 1.0 / best_norm.clamp_min(1e-12), torch.zeros_like(best_norm)
        )
        unit_target = best * scale
        length = (jacobian @ unit_target).sum()
        self.last_weights = (length * scale * coeff_u * inv).detach()
        return length * unit_target
