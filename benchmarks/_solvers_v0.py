# Frozen copy of polytask.balancers._solvers at commit 606e6af (before the fast solvers of
# polytask.balancers._qp), kept verbatim as the reference that benchmarks/solvers.py times the
# new solvers against and tests/test_solvers.py checks them against. Not used by the library.
# ruff: noqa
"""Small dense solvers on the ``K x K`` Gramian, written in torch.

Every solver here works on tensors of any floating dtype (float32, float64) and on any device,
never moves data to numpy and never calls ``.item()`` on a gradient-sized tensor. The iterative
ones are loops of *masked, fixed-shape* tensor operations: an iteration never changes the shape of
anything, and once a problem has converged further iterations leave it unchanged. That lets the
loop test for convergence only every few iterations (one scalar host sync per test), which is
what keeps them cheap on accelerators; on CPU the test is made every iteration.

Solvers:

* :func:`qp_active_set`: exact primal active-set method for the convex quadratic programs
  ``min 1/2 x^T Q x + p^T x`` over the probability simplex or over the non-negative orthant
  (batched over several linear terms ``p`` sharing one ``Q``). Used by MGDA (min-norm point of
  the convex hull of the rows), UPGrad / DualProj (projection onto the dual cone) and CAGrad.
* :func:`min_norm_point`: the min-norm element of the convex hull of the rows, from the Gramian.
* :func:`project_to_dual_cone`: weights of the projection of ``J^T u`` onto the dual cone
  ``{x : J x >= 0}``, from the Gramian (Proposition 1 of Quinton & Rey, 2024).
* :func:`power_equation`: the positive solution of ``G a = a^(-1/p)`` (FairGrad; with ``p = 1``
  the Nash bargaining solution ``G a = 1 / a`` of Nash-MTL) by damped Newton on a strictly convex
  potential with a vectorised (sync-free) backtracking line search.
* :func:`cagrad_weights`: the CAGrad weights, solved exactly through the one-parameter family of
  simplex QPs it reduces to.
* :func:`nash_cccp_subproblem`: one convex subproblem of the convex-concave procedure used by the
  official Nash-MTL code (linear objective under the constraints ``a_i (G a)_i >= 1``).
* :func:`project_to_simplex`: Euclidean projection onto the probability simplex (MoDo, SDMGrad).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "cagrad_weights",
    "min_norm_point",
    "nash_cccp_subproblem",
    "power_equation",
    "project_to_dual_cone",
    "project_to_simplex",
    "qp_active_set",
]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _check_every(device: torch.device) -> int:
    """How many iterations between convergence tests (each test is one host sync)."""
    return 1 if device.type == "cpu" else 4


def _all(mask: Tensor) -> bool:
    """One host sync: are all entries of ``mask`` true?"""
    return bool(mask.all())


# ---------------------------------------------------------------------------------------------
# Active-set QP
# ---------------------------------------------------------------------------------------------


def qp_active_set(
    Q: Tensor,
    p: Tensor,
    *,
    simplex: bool,
    x0: Tensor | None = None,
    free0: Tensor | None = None,
    ridge: float | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact primal active-set method for convex QPs with non-negativity constraints.

    Solves, for every row ``p[b]``::

        minimise 1/2 x^T Q x + p[b]^T x   subject to  x >= 0  (and sum(x) = 1 if ``simplex``)

    Each iteration solves the equality-constrained problem on the current free set ``F``
    (a masked ``K x K``, or bordered ``(K+1) x (K+1)``, linear system), moves towards its solution
    until the first constraint blocks (dropping the blocking indices from ``F``) or, when the
    subspace minimiser is feasible, adds to ``F`` the indices whose Lagrange multipliers are
    negative (all of them during the first ``K`` iterations, then the most negative one only, as in
    Lawson-Hanson, which guarantees termination). At termination the KKT conditions hold to
    rounding error, so the result is the exact solution, not an early-stopped iterate.

    Args:
        Q: ``[K, K]`` symmetric positive semi-definite matrix.
        p: ``[B, K]`` linear terms (one problem per row).
        simplex: add the constraint ``sum(x) = 1``.
        x0, free0: optional feasible warm start ``[B, K]`` and its free set (bool ``[B, K]``).
        ridge: relative Tikhonov term added to ``Q`` on the free set, which keeps the subspace
            systems non-singular when ``Q`` is singular (rank-deficient Jacobians, duplicated
            rows). Defaults to ``64 * eps(dtype)`` times the largest diagonal entry, at the
            rounding level of ``Q`` itself, so it does not move the solution beyond that level.
        max_iter: iteration cap (default ``3 K + 20``).
        tol: multiplier tolerance relative to the problem scale (default ``1e3 * eps``).

    Returns:
        ``(x, free)``: the solutions ``[B, K]`` and their free sets.
    """
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"Q must be a square matrix, got {tuple(Q.shape)}")
    if p.ndim != 2 or p.shape[1] != Q.shape[0]:
        raise ValueError(f"p must be [B, {Q.shape[0]}], got {tuple(p.shape)}")
    K = Q.shape[0]
    B = p.shape[0]
    dtype, device = Q.dtype, Q.device
    eps = _eps(dtype)
    diag = Q.diagonal()
    scale_q = diag.abs().amax().clamp_min(torch.finfo(dtype).tiny)
    rel_ridge = 64 * eps if ridge is None else ridge
    rtol = 1e3 * eps if tol is None else tol
    if max_iter is None:
        max_iter = 3 * K + 20

    eye = torch.eye(K, dtype=dtype, device=device)
    Qr = Q + (rel_ridge * scale_q) * eye

    if x0 is None:
        if simplex:
            x = torch.full((B, K), 1.0 / K, dtype=dtype, device=device)
            free = torch.ones(B, K, dtype=torch.bool, device=device)
        else:
            x = torch.zeros(B, K, dtype=dtype, device=device)
            free = p < 0
    else:
        x = x0.clone()
        free = free0.clone() if free0 is not None else x > 0
        if simplex:
            free = free | (x > 0)

    done = torch.zeros(B, dtype=torch.bool, device=device)
    arangeK = torch.arange(K, device=device)
    check = _check_every(device)
    inf = torch.tensor(math.inf, dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)

    if simplex:
        # Bordered system [[Q_FF, 1], [1^T, 0]] embedded in (K+1) x (K+1).
        big = torch.zeros(K + 1, K + 1, dtype=dtype, device=device)
        big[:K, :K] = Qr
        big_eye = torch.eye(K + 1, dtype=dtype, device=device)

    for it in range(max_iter):
        # Subspace minimiser on the free set.
        ff = free.unsqueeze(-1) & free.unsqueeze(-2)  # [B, K, K]
        if simplex:
            fa = torch.cat([free, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            ffa = fa.unsqueeze(-1) & fa.unsqueeze(-2)
            fcol = free.to(dtype)
            M = torch.where(ffa, big, big_eye)
            M[:, :K, K] = fcol
            M[:, K, :K] = fcol
            M[:, K, K] = 0.0
            rhs = torch.cat([torch.where(free, -p, zero), one.expand(B, 1)], dim=1)
            sol = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
            y = torch.where(free, sol[:, :K], zero)
        else:
            M = torch.where(ff, Qr, eye)
            rhs = torch.where(free, -p, zero)
            y = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
            y = torch.where(free, y, zero)

        xscale = x.abs().amax(-1, keepdim=True).clamp_min(1.0 if not simplex else 0.0)
        neg = free & (y < 0)
        feasible = ~neg.any(-1)
        # Step towards y, stopped by the first blocking index.
        denom = x - y
        ratio = torch.where(neg, x / torch.where(neg, denom, one), inf)
        theta = ratio.amin(-1).clamp(0.0, 1.0)
        theta = torch.where(feasible, one, theta)
        x_new = x + theta.unsqueeze(-1) * (y - x)
        blocking = neg & (ratio <= theta.unsqueeze(-1) * (1 + 4 * eps) + 4 * eps)
        x_new = torch.where(blocking, zero, x_new).clamp_min(0.0)
        free_new = free & ~blocking

        # Multipliers of the bound constraints at a feasible subspace minimiser.
        grad = x_new @ Q + p
        if simplex:
            nu = (x_new * grad).sum(-1, keepdim=True)
            lam = grad - nu
        else:
            lam = grad
        lam_scale = (scale_q * xscale + p.abs().amax(-1, keepdim=True)).clamp_min(
            torch.finfo(dtype).tiny
        )
        viol = (~free_new) & (lam < -rtol * lam_scale)
        if it < K:
            add = viol
        else:
            idx = torch.where(viol, lam, inf).argmin(-1)
            add = viol & (arangeK == idx.unsqueeze(-1))
        add = add & feasible.unsqueeze(-1)
        converged = feasible & ~viol.any(-1)

        keep = done.unsqueeze(-1)
        x = torch.where(keep, x, x_new)
        free = torch.where(keep, free, free_new | add)
        done = done | converged
        if (it + 1) % check == 0 and _all(done):
            break
    return x, free


def min_norm_point(gramian: Tensor) -> Tensor:
    """Weights ``w`` on the simplex minimising ``||w @ J||`` given ``G = J J^T`` (exact).

    The Gramian is rescaled by its largest diagonal entry first (the solution is invariant to
    that), which keeps the tolerances meaningful at any gradient scale.
    """
    K = gramian.shape[0]
    if K == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    scale = gramian.diagonal().amax()
    tiny = torch.finfo(gramian.dtype).tiny
    G = gramian / scale.clamp_min(tiny)
    # All-zero gradients: every point of the hull is the zero vector; solve the well-posed
    # problem on the identity instead (uniform weights) rather than a singular system.
    G = torch.where(scale > tiny, G, torch.eye(K, dtype=G.dtype, device=G.device))
    p = torch.zeros(1, K, dtype=G.dtype, device=G.device)
    w, _ = qp_active_set(G, p, simplex=True)
    return w[0]


def project_to_dual_cone(gramian: Tensor, U: Tensor) -> Tensor:
    """Weights ``W[b]`` with ``J^T W[b]`` the projection of ``J^T U[b]`` onto ``{x : J x >= 0}``.

    Solves ``min v^T G v`` subject to ``v >= U[b]`` (Proposition 1 of Quinton & Rey, 2024) for
    every row of ``U`` at once, as the non-negative QP in ``z = v - u``. ``gramian`` must be
    positive definite (the callers add a small multiple of the identity, as torchjd does).
    """
    squeeze = U.ndim == 1
    U2 = U.unsqueeze(0) if squeeze else U
    p = U2 @ gramian  # gradient of 1/2 (u+z)^T G (u+z) at z = 0
    Z, _ = qp_active_set(gramian, p, simplex=False)
    W = U2 + Z
    return W[0] if squeeze else W


# ---------------------------------------------------------------------------------------------
# G a = a^(-1/p)  (FairGrad, Nash bargaining)
# ---------------------------------------------------------------------------------------------

_LS_STEPS = 12  # candidate step sizes 1, 1/2, ..., 2^-11 evaluated at once


def _power_potential(G: Tensor, X: Tensor, inv_p: float) -> Tensor:
    """``1/2 x^T G x + sum phi(x)`` with ``phi'(x) = -x^(-1/p)``, for every row of ``X``."""
    quad = 0.5 * ((X @ G) * X).sum(-1)
    if abs(inv_p - 1.0) < 1e-12:
        bar = -torch.log(X).sum(-1)
    else:
        q = 1.0 - inv_p
        bar = -(X.pow(q) / q).sum(-1)
    return quad + bar


def power_equation(
    gramian: Tensor,
    p: float = 1.0,
    *,
    ridge: float = 0.0,
    max_iter: int = 60,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Positive solution ``a`` of ``G a = a^(-1/p)`` (elementwise), and a success flag.

    ``a`` is the unique minimiser of the strictly convex potential
    ``1/2 a^T G a + sum_i phi(a_i)`` with ``phi'(t) = -t^(-1/p)`` (``-log t`` for ``p = 1``,
    which gives the Nash bargaining solution ``G a = 1/a``). It exists if and only if no
    non-negative, non-zero combination of the rows of ``J`` vanishes (Gordan's alternative:
    there is a direction that decreases every task). It is found by damped Newton iterations on
    that potential with a backtracking line search in which all candidate step sizes are
    evaluated at once (no host syncs), on the Gramian normalised by its trace; the result is
    scaled back (``a`` scales as ``s^(-p/(p+1))`` when ``G`` is multiplied by ``s``).

    ``ridge`` adds ``ridge * I`` to the normalised Gramian, which makes the potential coercive
    and the solution exist for any input (the callers use it as a safeguard on degenerate
    inputs; a ridge of 1e-10 moves well-posed solutions by about that relative amount).

    Returns:
        ``(a, ok)`` where ``ok`` (a bool tensor) says whether the Newton decrement fell below
        tolerance with a finite result.
    """
    K = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    tiny = torch.finfo(dtype).tiny
    inv_p = 1.0 / p
    trace = gramian.diagonal().sum()
    nf = trace.clamp_min(tiny)
    G = gramian / nf
    if ridge > 0:
        G = G + ridge * torch.eye(K, dtype=dtype, device=device)
    if tol is None:
        tol = 1e3 * _eps(dtype)

    # Start on the ray through 1/sqrt(diag G), at the minimiser of the potential along it.
    d = 1.0 / G.diagonal().clamp_min(tiny).sqrt()
    dGd = (d @ G @ d).clamp_min(tiny)
    kappa = ((d.pow(1.0 - inv_p)).sum() / dGd).pow(1.0 / (1.0 + inv_p))
    x = kappa * d

    steps = torch.tensor([0.5**i for i in range(_LS_STEPS)], dtype=dtype, device=device)
    eye = torch.eye(K, dtype=dtype, device=device)
    ok = torch.zeros((), dtype=torch.bool, device=device)
    check = _check_every(device)
    rel_tol = 10.0 * math.sqrt(_eps(dtype))
    ar = torch.arange(_LS_STEPS, device=device)
    for it in range(max_iter):
        xp = x.pow(-inv_p)
        g = G @ x - xp
        H = G + torch.diag(inv_p * xp / x)
        # Symmetric positive definite; a tiny diagonal shift guards the Cholesky in float32.
        L, info = torch.linalg.cholesky_ex(H + (tol * H.diagonal().amax()) * eye)
        dx = torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
        dec = (g * dx).sum()  # squared Newton decrement
        rel = (dx.abs() / x).amax()
        # Largest step keeping x > 0, then Armijo backtracking over all candidates at once.
        ratio = torch.where(dx > 0, x / dx.clamp_min(tiny), torch.full_like(x, math.inf))
        smax = (0.99 * ratio.amin()).clamp(max=1.0)
        cand = x.unsqueeze(0) - (smax * steps).unsqueeze(-1) * dx.unsqueeze(0)
        cand = cand.clamp_min(tiny)
        f0 = _power_potential(G, x.unsqueeze(0), inv_p)[0]
        fc = _power_potential(G, cand, inv_p)
        armijo = (fc <= f0 - 1e-4 * smax * steps * dec) & torch.isfinite(fc)
        first = torch.where(armijo, ar, _LS_STEPS).amin()
        chosen = cand[first.clamp(max=_LS_STEPS - 1)]
        # Close to the solution (small decrement, full step inside the domain) take the full
        # Newton step: rounding makes Armijo unreliable there and convergence is quadratic.
        full = (dec < 0.05) & (rel < 0.5)
        x_next = torch.where(full, x - dx, torch.where(first >= _LS_STEPS, x, chosen))
        x_next = torch.where(torch.isfinite(x_next).all() & (info == 0), x_next, x)
        converged = full & (rel <= rel_tol)
        x = torch.where(ok, x, x_next)
        ok = ok | converged
        if (it + 1) % check == 0 and bool(ok):
            break
    ok = ok & torch.isfinite(x).all() & (trace > tiny)
    a = x * nf.pow(-p / (p + 1.0))
    return a, ok


# ---------------------------------------------------------------------------------------------
# CAGrad
# ---------------------------------------------------------------------------------------------


def _affine_parts(G: Tensor, b: Tensor, free: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """On the free set ``F``: ``a`` = argmin ``w^T G w`` s.t. ``sum w = 1`` and ``c`` = argmin
    ``1/2 c^T G c + b^T c`` s.t. ``sum c = 0`` (both zero off ``F``); one bordered solve."""
    K = G.shape[0]
    dtype, device = G.dtype, G.device
    Gr = G + ridge * torch.eye(K, dtype=dtype, device=device)
    fa = torch.cat([free, torch.ones(1, dtype=torch.bool, device=device)])
    M = torch.where(fa.unsqueeze(-1) & fa.unsqueeze(-2), torch.zeros(K + 1, K + 1, dtype=dtype,
                    device=device), torch.eye(K + 1, dtype=dtype, device=device))
    M[:K, :K] = torch.where(free.unsqueeze(-1) & free.unsqueeze(-2), Gr, M[:K, :K])
    fcol = free.to(dtype)
    M[:K, K] = fcol
    M[K, :K] = fcol
    M[K, K] = 0.0
    zero = torch.zeros((), dtype=dtype, device=device)
    rhs = torch.stack(
        [
            torch.cat([torch.zeros(K, dtype=dtype, device=device), torch.ones(1, dtype=dtype,
                      device=device)]),
            torch.cat([torch.where(free, -b, zero), torch.zeros(1, dtype=dtype, device=device)]),
        ],
        dim=-1,
    )
    sol = torch.linalg.solve(M, rhs)
    a = torch.where(free, sol[:K, 0], zero)
    c = torch.where(free, sol[:K, 1], zero)
    return a, c


def cagrad_weights(
    gramian: Tensor,
    c: float,
    norm_eps: float = 1e-4,
    max_outer: int = 60,
    radius_factor: float = 1.0,
) -> Tensor:
    """CAGrad weights (torchjd convention): ``1/K + (sqrt_phi / ||g_w||) w``.

    With ``G~ = G / trace(G)``, ``b = G~ 1/K`` and ``r = radius_factor * c ||g_0||`` (``g_0`` the
    mean gradient in the normalised space), ``w`` minimises ``b^T w + r sqrt(w^T G~ w)`` over the simplex. For
    ``s > 0`` let ``w(s)`` solve the simplex QP ``min b^T w + (s/2) w^T G~ w``; ``w`` is the
    ``w(s)`` with ``s ||g_{w(s)}|| = r``. On a fixed free set, ``w(s) = a + c/s`` with
    ``a^T G~ c = 0``, so ``(s ||g_{w(s)}||)^2 = s^2 a^T G~ a + c^T G~ c`` is increasing in ``s`` and
    the root is explicit. The solver alternates an exact QP solve at the current ``s`` with that
    explicit root on the QP's free set, safeguarded by bisection on ``log s``, and stops when the
    explicit root satisfies the KKT conditions of its own free set (exact solution). The weights
    are then ``1/K + s w``; they are zero when ``||g_w|| < norm_eps`` (approximately Pareto
    stationary; same rule as torchjd).
    """
    K = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    tiny = torch.finfo(dtype).tiny
    eps = _eps(dtype)
    uniform = torch.full((K,), 1.0 / K, dtype=dtype, device=device)
    trace = gramian.diagonal().sum()
    if c == 0.0:
        return uniform
    if not bool(trace > tiny):
        return torch.zeros(K, dtype=dtype, device=device)
    G = gramian / trace
    b = G.sum(-1) / K
    g0_sq = b.sum()  # ||g_0||^2 = 1^T G 1 / K^2
    r = radius_factor * c * g0_sq.clamp_min(0.0).sqrt()
    if not bool(r > 0):
        return uniform
    ridge = 64 * eps * G.diagonal().amax()

    def psi(w: Tensor, s: Tensor) -> Tensor:
        return s * (w @ G @ w).clamp_min(0.0).sqrt()

    def kkt_ok(w: Tensor, s: Tensor, free: Tensor) -> Tensor:
        grad = b + s * (G @ w)
        nu = (w * grad).sum()
        lam = grad - nu
        scale = s * G.diagonal().amax() + b.abs().amax()
        return ((w >= -1e2 * eps).all()) & ((lam >= -1e3 * eps * scale) | free).all()

    s_max = r / norm_eps  # beyond it ||g_w|| = r/s < norm_eps: zero weights
    s = r / g0_sq.clamp_min(tiny).sqrt()  # ||g_w|| ~ ||g_0|| guess
    s = torch.minimum(s, s_max)
    s_lo = torch.zeros((), dtype=dtype, device=device)
    s_hi = torch.full((), math.inf, dtype=dtype, device=device)
    x, free = None, None
    result = None
    for _ in range(max_outer):
        x, free = qp_active_set(s * G, b.unsqueeze(0), simplex=True, x0=x, free0=free)
        w = x[0]
        fr = free[0]
        a, cc = _affine_parts(G, b, fr, float(ridge))
        qa = a @ G @ a
        qc = cc @ G @ cc
        num = r * r - qc
        valid = bool((qa > tiny) & (num > 0))
        if valid:
            s_star = (num / qa).sqrt()
            w_star = a + cc / s_star
            if bool(s_star <= s_max) and bool(kkt_ok(w_star, s_star, fr)):
                result = (w_star.clamp_min(0.0), s_star)
                break
        else:
            s_star = None
        # Bracket update with the sign of psi(s) - r at the QP solution.
        if bool(psi(w, s) < r):
            s_lo = s
            if bool(s >= s_max):
                break  # optimum beyond s_max: Pareto stationary within norm_eps
        else:
            s_hi = s
        if s_star is not None and bool(s_star > s_lo) and bool(s_star < s_hi):
            s_next = s_star
        elif bool(torch.isinf(s_hi)):
            s_next = s_lo * 4 if bool(s_lo > 0) else s * 4
        elif bool(s_lo > 0):
            s_next = (s_lo * s_hi).sqrt()
        else:
            s_next = s_hi / 4
        if bool(torch.isfinite(s_hi)) and bool(s_hi - s_lo <= 1e2 * eps * s_hi):
            result = (w, s)
            break
        s = torch.minimum(s_next, s_max)
    if result is None:
        # Either the optimum is beyond s_max (zero weights) or the loop hit its cap; in the
        # latter case the last QP solution is within the bracket tolerance.
        if bool(s >= s_max) and bool(psi(x[0], s) < r):
            return torch.zeros(K, dtype=dtype, device=device)
        result = (x[0], s)
    w, s_fin = result
    g_w_norm = r / s_fin
    if bool(g_w_norm < norm_eps):
        return torch.zeros(K, dtype=dtype, device=device)
    return uniform + s_fin * w


# ---------------------------------------------------------------------------------------------
# Nash-MTL convex-concave subproblem
# ---------------------------------------------------------------------------------------------


def _hyperbolic_barrier(G: Tensor, X: Tensor, c: Tensor, t: Tensor) -> Tensor:
    """``t c^T x - sum log(x_i (G x)_i - 1)`` for every row of ``X`` (``inf`` outside)."""
    Y = X @ G
    psi = X * Y - 1.0
    inside = (X > 0).all(-1) & (Y > 0).all(-1) & (psi > 0).all(-1)
    val = t * (X @ c) - torch.log(psi.clamp_min(torch.finfo(X.dtype).tiny)).sum(-1)
    return torch.where(inside, val, torch.full_like(val, math.inf))


def nash_cccp_subproblem(
    G: Tensor, c: Tensor, x_star: Tensor, *, max_newton: int = 400, gap_tol: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve ``min c^T x`` subject to ``x_i (G x)_i >= 1`` for all ``i``.

    This is the convex subproblem of the official Nash-MTL code's convex-concave procedure, in
    variables normalised so that ``G`` is the Gramian divided by its Frobenius norm (the
    reference states the constraint as ``-log(a_i) - log((G a)_i) <= 0``).

    ``x_star`` must be the Nash point (``G x* = 1/x*``), where every constraint is active. It is
    tried first: if the multipliers there are non-negative it is optimal (fast path, one linear
    solve). Otherwise a primal log-barrier method is used on the self-concordant barrier
    ``-log(x_i (G x)_i - 1)`` (the constraints are rotated second-order cones), from
    ``2 x*`` (strictly feasible), with damped Newton steps and a vectorised backtracking line
    search, until the duality gap is below ``gap_tol`` relative to the objective.

    Returns:
        ``(x, ok)``; ``ok`` is false when the subproblem is unbounded or the barrier method did
        not converge (the caller then keeps its previous iterate, as the reference does on a
        solver failure).
    """
    K = G.shape[0]
    dtype, device = G.dtype, G.device
    tiny = torch.finfo(dtype).tiny
    eps = _eps(dtype)
    if gap_tol is None:
        gap_tol = max(1e-11, 1e3 * eps)
    y = G @ x_star
    # Rows: gradients of h_i = log x_i + log (Gx)_i at x*.
    Dh = torch.diag(1.0 / x_star) + G / y.unsqueeze(-1)
    mu = torch.linalg.solve(Dh.T, c)
    if bool((mu >= -1e3 * eps * mu.abs().amax()).all()) and bool(torch.isfinite(mu).all()):
        return x_star, torch.ones((), dtype=torch.bool, device=device)

    steps = torch.tensor([0.5**i for i in range(_LS_STEPS)], dtype=dtype, device=device)
    x = 2.0 * x_star
    obj0 = (c @ x).abs().clamp_min(tiny)
    t = (2.0 * K / obj0).clamp_min(tiny)
    nu = 2.0 * K  # barrier parameter
    eye = torch.eye(K, dtype=dtype, device=device)
    ok = torch.zeros((), dtype=torch.bool, device=device)
    for _ in range(max_newton):
        y = G @ x
        psi = x * y - 1.0
        rr = 1.0 / psi
        grad = t * c - rr * y - G @ (rr * x)
        D = torch.diag(y) + x.unsqueeze(-1) * G  # rows: grad psi_i
        H = (D.T * (rr * rr)) @ D - (rr.unsqueeze(-1) * G + G * rr.unsqueeze(0))
        H = 0.5 * (H + H.T)
        L, info = torch.linalg.cholesky_ex(H + (eps * H.diagonal().abs().amax()) * eye)
        dx = torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
        lam2 = (grad * dx).sum()
        f0 = _hyperbolic_barrier(G, x.unsqueeze(0), c, t)[0]
        # Newton decrement at the rounding level of the barrier value: no step can make
        # measurable progress any more (at large t the decrement stalls on that noise floor).
        noise = 64 * eps * f0.abs()
        if bool(lam2 <= torch.clamp(noise, min=1e-14)) or bool(info != 0):
            # Centred: stop or increase t.
            if bool(nu / t <= gap_tol * (c @ x).abs().clamp_min(tiny)):
                ok = torch.ones((), dtype=torch.bool, device=device)
                break
            t = t * 8.0
            continue
        cand = x.unsqueeze(0) - steps.unsqueeze(-1) * dx.unsqueeze(0)
        fc = _hyperbolic_barrier(G, cand, c, t)
        armijo = (fc <= f0 - 1e-4 * steps * lam2) & torch.isfinite(fc)
        first = torch.where(armijo, torch.arange(_LS_STEPS, device=device), _LS_STEPS).amin()
        if bool(first >= _LS_STEPS):
            if bool(nu / t <= gap_tol * (c @ x).abs().clamp_min(tiny)):
                ok = torch.ones((), dtype=torch.bool, device=device)
                break
            t = t * 8.0
            continue
        x = cand[first]
        if bool(lam2 <= torch.clamp(noise, min=1e-9)):
            if bool(nu / t <= gap_tol * (c @ x).abs().clamp_min(tiny)):
                ok = torch.ones((), dtype=torch.bool, device=device)
                break
            t = t * 8.0
    ok = ok & torch.isfinite(x).all()
    return x, ok


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
