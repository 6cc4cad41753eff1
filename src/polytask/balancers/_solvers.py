"""Small dense solvers on the ``K x K`` Gramian, written in torch.

Every solver here works on tensors of any floating dtype (float32, float64) and on any device,
never moves data to numpy and never calls ``.item()`` on a gradient-sized tensor; iterative ones
make at most one host read (a convergence test) per iteration, and on accelerators only every
few iterations. The implementations live in :mod:`._qp` (fast exact solvers: block principal
pivoting for the QPs, direct pivoting for CAGrad, see there); this module is their public face.
The solvers they replaced (a primal active-set method, a one-parameter search for CAGrad) are
kept verbatim in ``benchmarks/_solvers_v0.py``, which ``tests/test_solvers.py`` checks these
against and ``benchmarks/solvers.py`` times them against.

Solvers:

* :func:`qp_active_set`: exact solution of the convex quadratic programs
  ``min 1/2 x^T Q x + p^T x`` over the probability simplex or over the non-negative orthant
  (batched over several linear terms ``p`` sharing one ``Q``). Used by MGDA (min-norm point of
  the convex hull of the rows), UPGrad / DualProj (projection onto the dual cone).
* :func:`min_norm_point`: the min-norm element of the convex hull of the rows, from the Gramian.
* :func:`project_to_dual_cone`: weights of the projection of ``J^T u`` onto the dual cone
  ``{x : J x >= 0}``, from the Gramian (Proposition 1 of Quinton & Rey, 2024).
* :func:`power_equation`: the positive solution of ``G a = a^(-1/p)`` (FairGrad; with ``p = 1``
  the Nash bargaining solution ``G a = 1 / a`` of Nash-MTL) by damped Newton on a strictly convex
  potential with a vectorised (sync-free) backtracking line search.
* :func:`cagrad_weights`: the CAGrad weights, solved exactly.
* :func:`nash_cccp_subproblem`: one convex subproblem of the convex-concave procedure used by the
  official Nash-MTL code (linear objective under the constraints ``a_i (G a)_i >= 1``).
* :func:`project_to_simplex`: Euclidean projection onto the probability simplex (MoDo, SDMGrad).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._qp import (
    cagrad_weights,
    min_norm_point,
    nash_cccp_subproblem,
    power_equation,
    project_to_dual_cone,
    qp_active_set,
)

__all__ = [
    "cagrad_weights",
    "min_norm_point",
    "nash_cccp_subproblem",
    "power_equation",
    "project_to_dual_cone",
    "project_to_simplex",
    "qp_active_set",
]


# ---------------------------------------------------------------------------------------------
# Simplex projection
# ---------------------------------------------------------------------------------------------


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (``[..., K]``) onto the probability simplex.

    The sort-based algorithm of Held, Wolfe & Crowder (1974) / Duchi et al. (ICML 2008), the
    projection the MoDo and SDMGrad reference codes compute (with a Python loop or numpy there):
    with ``u`` sorted decreasingly and ``rho`` the number of indices with
    ``u_k > (sum_{j <= k} u_j - 1) / k`` (a prefix), ``theta = (sum_{j <= rho} u_j - 1) / rho``
    and the projection is ``max(v - theta, 0)``. Fixed-shape tensor operations only: no host
    synchronisation.
    """
    K = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, K + 1, dtype=v.dtype, device=v.device)
    rho = (u - css / k > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)
