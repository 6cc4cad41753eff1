"""Stochastic multi-objective methods that need several independent batches per step.

MoDo and SDMGrad estimate products of task gradients (``J J^T lambda``) without the bias a single
mini-batch gives them, by taking the two factors from *independent* batches. Both are
:class:`~polytask.balancers.MultiBatchWeighting` subclasses (protocol ``"extra_batch"``): they
receive the ``[B, K, B, K]`` block Gramian of ``B`` stacked Jacobians and return ``[B, K]``
weights. Their simplex iterations run in torch with the sort-based projection of
:func:`._solvers.project_to_simplex` and make no host synchronisation.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ._base import MultiBatchWeighting, register
from ._losses import _StateMixin
from ._solvers import project_to_simplex

__all__ = ["SDMGrad", "MoDo"]


# ------------------------------------------------------------------------------------------------
# modo
# ------------------------------------------------------------------------------------------------
@register(
    "modo",
    paper="Chen, Fernando, Ying & Chen, Three-Way Trade-Off in Multi-Objective Learning: "
    "Optimization, Generalization and Conflict-Avoidance, NeurIPS 2023 (JMLR 2024)",
    description="MoDo: simplex weights stepped along a double-sampled J_1 J_2^T lambda.",
    stateful=True,
    protocol=("extra_batch",),
    n_batches=2,
    modes=("params",),
    reference="heshandevaka/Trade-Off-MOL moo.py grad_modo and LibMTL/weighting/MoDo.py; "
    "LibMTL weighting/MoDo.py",
)
class MoDo(_StateMixin, MultiBatchWeighting):
    """Multi-objective gradient with Double sampling (MoDo).

    Paper: L. Chen, H. Fernando, Y. Ying & T. Chen, "Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024),
    Algorithm 1. Reference code: ``heshandevaka/Trade-Off-MOL`` (``moo.py::grad_modo``; its
    LibMTL ``weighting/MoDo.py`` and ``config.py``: ``gamma_modo=0.1``, ``rho_modo=0.1``);
    LibMTL ``weighting/MoDo.py`` (three samples, ``MoDo_gamma=0.001``).

    With ``J_1, J_2`` the task Jacobians of two independent batches at the same parameters and
    ``lambda`` the task weights (buffer ``lambd``, initially ``1/K``), each step
    ``lambda <- Proj_simplex(lambda - gamma (J_1 J_2^T lambda + rho lambda))`` -- an unbiased
    stochastic gradient step on ``1/2 ||J^T lambda||^2 + rho/2 ||lambda||^2`` -- and then

    * ``n_samples=2`` (default, the official code's double sampling): direction
      ``lambda @ (J_1 + J_2) / 2`` (``moo.py``; the repository's LibMTL port returns the sum of
      the two, i.e. twice this, and leaves the averaging to the learning rate);
    * ``n_samples=3`` (the paper's Algorithm 1 and LibMTL): direction ``lambda @ J_3`` from a
      third independent batch.

    Single-batch use (``combine(J, losses)`` with one ``[K, P]`` Jacobian, every batch equal to
    ``J``): the update uses ``J J^T`` and the direction is ``lambda @ J``. ``last_weights`` is
    ``lambda``. Parameter mode only (representation gradients of different batches are
    gradients w.r.t. different samples, whose inner products mean nothing).

    Args:
        gamma: step size of the ``lambda`` update.
        rho: l2 regularisation of the ``lambda`` subproblem.
        n_samples: independent batches per step, 2 or 3.
    """

    _adaptive_buffers = ("lambd",)

    def __init__(
        self, n_tasks: int, gamma: float = 0.1, rho: float = 0.1, n_samples: int = 2
    ) -> None:
        super().__init__(n_tasks)
        if not gamma > 0:
            raise ValueError(f"modo: gamma must be positive, got {gamma!r}")
        if rho < 0:
            raise ValueError(f"modo: rho must be >= 0, got {rho!r}")
        if n_samples not in (2, 3):
            raise ValueError(f"modo: n_samples must be 2 or 3, got {n_samples!r}")
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.n_samples = int(n_samples)
        if n_samples != type(self).info.n_batches:
            self.info = replace(type(self).info, n_batches=n_samples)
        # float64 until the first call (then the data's dtype): 1/K is exact in float64 data
        self.register_buffer("lambd", torch.full((n_tasks,), 1.0 / n_tasks, dtype=torch.float64))

    def weights_from_batch_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        cross = gramian[0, :, 1, :]  # J_1 J_2^T
        lam = self._state("lambd", gramian)
        lam = project_to_simplex(lam - self.gamma * (cross @ lam + self.rho * lam))
        lam = torch.where(torch.isfinite(lam).all(), lam, self._state("lambd", gramian))
        self._set_state("lambd", lam)
        w = torch.zeros(self.n_samples, self.n_tasks, dtype=gramian.dtype, device=gramian.device)
        if self.n_samples == 2:
            w[0] = 0.5 * lam
            w[1] = 0.5 * lam
        else:
            w[2] = lam
        return w


# ------------------------------------------------------------------------------------------------
# sdmgrad
# ------------------------------------------------------------------------------------------------
@register(
    "sdmgrad",
    paper="Xiao, Ban & Ji, Direction-oriented Multi-objective Learning: Simple and Provable "
    "Stochastic Algorithms, NeurIPS 2023",
    description="SDMGrad: projected-SGD simplex weights on a double-sampled Gramian, pulled "
    "towards the mean gradient.",
    stateful=True,
    protocol=("extra_batch",),
    n_batches=3,
    modes=("params",),
    reference="OptMN-Lab/sdmgrad methods/weight_methods.py SDMGrad; LibMTL weighting/SDMGrad.py",
)
class SDMGrad(_StateMixin, MultiBatchWeighting):
    """Stochastic Direction-oriented Multi-objective Gradient descent (SDMGrad).

    Paper: P. Xiao, H. Ban & K. Ji, "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023. Reference code: ``OptMN-Lab/sdmgrad``
    ``methods/weight_methods.py::SDMGrad`` and ``experiments/utils.py`` (``lamda=0.3``,
    ``niter=20``, ``max_norm=1.0``); LibMTL ``weighting/SDMGrad.py``.

    Three independent batches per step: ``zeta`` (batch 0), ``xi_1`` and ``xi_2`` (batches 1
    and 2). With ``GG = J_xi1 J_xi2^T / s^2``, ``s = mean_i sqrt(max(GG_ii, 0) + 1e-4)``
    (before the division) and ``Gg = GG 1 / K``, the weights ``w`` (buffer, initially ``1/K``,
    kept across steps) take ``niter`` steps of SGD with momentum (a fresh momentum buffer each
    call, ``lr=10``, ``momentum=0.5``, as the reference's ``torch.optim.SGD``) along
    ``GG w + lamda Gg``, each followed by the Euclidean projection onto the simplex. The
    direction is ``K (J_zeta^T w + lamda g_0) / (1 + lamda)`` with ``g_0`` the mean gradient of
    ``zeta`` (the factor ``K`` "to match the sum loss", as the reference), clipped to norm
    ``max_norm`` as the reference's ``clip_grad_norm_`` does (factor
    ``min(1, max_norm / (||d|| + 1e-6))``). ``last_weights`` are the weights of the rows of
    ``J_zeta``.

    Deviations: (1) the official code stores the three Jacobians in one tensor (``[t] * 3``),
    so all three hold the last batch's gradients; here, as in the paper and LibMTL, they are the
    three independent batches. (2) The diagonal of the cross Gramian is clamped at 0 before the
    square root (LibMTL does the same): with independent batches it can be negative, where the
    official ``sqrt(GG_ii + 1e-4)`` would give NaN. (3) The projection runs in torch.

    Single-batch use (``combine(J, losses)``): all three batches are ``J``.

    Args:
        lamda: regularisation towards the mean gradient (``lambda`` of the paper).
        niter: projected SGD iterations on ``w`` per step.
        lr: step size of those iterations.
        momentum: their momentum.
        max_norm: norm clipping of the direction (0 disables).
    """

    _adaptive_buffers = ("w",)

    def __init__(
        self,
        n_tasks: int,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
        max_norm: float = 1.0,
    ) -> None:
        super().__init__(n_tasks)
        if lamda < 0:
            raise ValueError(f"sdmgrad: lamda must be >= 0, got {lamda!r}")
        if not isinstance(niter, int) or niter < 0:
            raise ValueError(f"sdmgrad: niter must be a non-negative int, got {niter!r}")
        if not lr > 0:
            raise ValueError(f"sdmgrad: lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"sdmgrad: momentum must be in [0, 1), got {momentum!r}")
        if max_norm < 0:
            raise ValueError(f"sdmgrad: max_norm must be >= 0, got {max_norm!r}")
        self.lamda = float(lamda)
        self.niter = niter
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.max_norm = float(max_norm)
        self.register_buffer("w", torch.full((n_tasks,), 1.0 / n_tasks, dtype=torch.float64))

    def weights_from_batch_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        K = self.n_tasks
        gg = gramian[1, :, 2, :]  # J_xi1 J_xi2^T
        scale = (gg.diagonal().clamp_min(0.0) + 1e-4).sqrt().mean()
        gg = gg / scale.pow(2)
        gg_mean = gg.mean(1)
        w0 = self._state("w", gramian)
        w = w0
        buf = torch.zeros_like(w)
        for it in range(self.niter):
            grad = gg @ w + self.lamda * gg_mean
            buf = grad if it == 0 else self.momentum * buf + grad
            w = project_to_simplex(w - self.lr * buf)
        w = torch.where(torch.isfinite(w).all(), w, w0)
        self._set_state("w", w)
        coeff = K * (w + self.lamda / K) / (1.0 + self.lamda)
        if self.max_norm > 0:
            g00 = gramian[0, :, 0, :]
            norm = (coeff @ g00 @ coeff).clamp_min(0.0).sqrt()
            coeff = coeff * (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        out = torch.zeros(3, K, dtype=gramian.dtype, device=gramian.device)
        out[0] = coeff
        return out
