"""Fast exact solvers for the small problems on the ``K x K`` Gramian, in torch.

Exported by :mod:`._solvers`. Same functions, signatures and results (to rounding) as the
solvers they replaced (the *reference*, kept verbatim in ``benchmarks/_solvers_v0.py``), built
to keep the number of tensor operations per call small, since at ``K <= 100`` the cost of a
solver is the per-operation dispatch (a few microseconds on CPU, a kernel launch on an
accelerator) far more than its arithmetic:

* :func:`qp_active_set`: the convex QPs ``min 1/2 x^T Q x + p^T x`` over the simplex or the
  non-negative orthant are solved by *block principal pivoting* (the primal-dual active-set
  method): every iteration solves the equality-constrained problem on the current free set with
  one masked Cholesky factorisation and exchanges *all* the indices that violate a KKT condition
  at once (Hintermüller, Ito & Kunisch, 2002), with the safeguard of Júdice & Pires (1994):
  when the number of violations stops decreasing for three iterations, a single index is
  exchanged (Murty's rule), which makes the method finite for positive definite ``Q``. It needs
  3 to 8 iterations on typical Gramians where the reference's primal active-set method needs
  about as many iterations as the solution has free indices. When it does not terminate within
  its budget (near-singular Gramians), that primal active-set method (Lawson-Hanson) takes over
  from its last iterate, so the result is always an exact KKT point.
* :func:`cagrad_weights`: the CAGrad problem is solved directly in its free set: on a fixed free
  set the optimal ``s`` and ``w`` are explicit, so the same pivoting on the free set finds the
  solution in a few solves; the reference's one-parameter search on ``s`` is kept as the
  fallback.
* :func:`power_equation`: the same damped Newton method on the same strictly convex potential,
  for ``p = 1`` (Nash-MTL, FairGrad's default) from a better start (two Jacobi sweeps), which
  halves the number of Newton iterations; on CPU the one host read per iteration (the
  convergence test) also decides whether the full Newton step is taken, so the vectorised line
  search is only evaluated in the damped phase.
* :func:`nash_cccp_subproblem`: the same method, with a leaner fast path.

Every function works for float32 and float64 on any device, never leaves torch and makes one
host read (a convergence test) per iteration at most; on accelerators the iterations are
fixed-shape and the test is made every few iterations only. Papers: M. Hintermüller, K. Ito &
K. Kunisch, "The primal-dual active set strategy as a semismooth Newton method", SIAM J. Optim.
13(3), 2002; J. J. Júdice & F. M. Pires, "A block principal pivoting algorithm for large-scale
strictly monotone linear complementarity problems", Computers & Operations Research 21(5), 1994;
C. L. Lawson & R. J. Hanson, "Solving Least Squares Problems", Prentice-Hall, 1974 (chapter 23).
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
    "qp_active_set",
]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _check_every(device: torch.device) -> int:
    """How many iterations between convergence tests (each test is one host read)."""
    return 1 if device.type == "cpu" else 4


def _symmetric(A: Tensor) -> Tensor:
    """The symmetric part of ``A`` (``A`` itself, exactly, when it is symmetric). A Gramian
    computed as ``J @ J.T`` may be asymmetric at the rounding level; the factorisations read one
    triangle only, so the problems are defined on the symmetric part."""
    return 0.5 * (A + A.mT)


def _host_branching(device: torch.device) -> bool:
    """Whether an iteration may branch on the values it reads for its convergence test (on
    CPU a host read costs nothing; elsewhere iterations are branch-free)."""
    return device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Convex QPs over the simplex / the non-negative orthant
# ---------------------------------------------------------------------------------------------

_BACKUP = 3  # Júdice-Pires: full exchanges allowed without a decrease of the violation count
_PLAIN = 6  # iterations of plain full exchanges before the Júdice-Pires safeguard starts


def _exchange(
    viol: Tensor, f: Tensor, state: tuple[Tensor, Tensor] | None, rank: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Júdice-Pires exchange: flip every violating index of ``f`` while the number of
    violations decreases (and for ``_BACKUP`` more iterations), else only the last one
    (Murty's rule). ``state`` is ``(best count, backup counter)``, ``None`` to start."""
    v = viol.to(f.dtype)
    n = v.sum(-1, keepdim=True)
    if state is None:
        state = (n, torch.full_like(n, float(_BACKUP)))
    best, backup = state
    backup = torch.where(n < best, float(_BACKUP), backup - 1.0)
    best = torch.minimum(best, n)
    key = v * rank
    single = (key == key.amax(-1, keepdim=True)) & viol
    flip = torch.where(backup < 0, single, viol)
    return torch.where(flip, 1.0 - f, f), (best, backup)


def _block_pivoting(
    Q: Tensor,
    Qr: Tensor,
    p: Tensor,
    f: Tensor,
    *,
    simplex: bool,
    n_iter: int,
    rtol: float,
    scale_q: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Block principal pivoting from the free sets ``f`` (float masks); returns
    ``(x, f, converged)``.

    Every iteration minimises the QP on the free set ``F`` (one batched masked Cholesky
    factorisation of ``Qr_FF``, identity off ``F``; on the simplex the equality constraint is
    eliminated with a second right-hand side: ``x_F = y1 + nu y2`` with ``Qr_FF y1 = -p_F``,
    ``Qr_FF y2 = 1`` and ``nu`` such that ``sum(x) = 1``). A problem has converged when that
    minimiser satisfies the KKT conditions: ``x_F >= -rtol max|x|`` and multipliers
    ``lam_A >= -rtol * scale`` off ``F`` (the scale of the primal method:
    ``scale_q max(|x|, 1) + max|p|``, without the ``1`` on the simplex). Otherwise the
    violating indices are exchanged (:func:`_exchange`; plain full exchanges during the first
    ``_PLAIN`` iterations). A converged problem has no violations, so later iterations leave
    it unchanged. Exchanges and the stopping test use a tolerance ten times tighter than
    ``rtol`` (with ``rtol`` itself, float32 problems with condition numbers near ``1e3`` would
    stop with multipliers of ``-rtol`` times the scale, at visibly suboptimal points); a problem
    counts as converged when its last iterate meets ``rtol``.
    """
    K = p.shape[-1]
    dtype, device = p.dtype, p.device
    check = _check_every(device)
    eye = torch.eye(K, dtype=dtype, device=device)
    Qm1 = Qr - eye
    rhs = torch.stack((-p, torch.ones_like(p)), dim=-1) if simplex else (-p).unsqueeze(-1)
    tight = 0.1 * rtol
    lam_tol0 = (-tight) * p.abs().amax(-1, keepdim=True)
    lam_tol1 = (-tight) * scale_q
    rank = torch.arange(1, K + 1, dtype=dtype, device=device)
    state = None
    B = p.shape[0]
    # On CPU, rows that have converged leave the batch (the host read of the convergence test
    # returns the indices of the others): the batched factorisation, which dominates the cost
    # of an iteration, then only runs on the problems still iterating.
    compact = B > 1 and _host_branching(device)
    rows: Tensor | None = None  # indices of the rows in the batch (compacting), None: all
    x_all = lam_all = f_all = info_all = None  # last iterate of every row
    pc, rhsc, tol0c = p, rhs, lam_tol0
    for it in range(n_iter):
        f_last = f
        M = torch.addcmul(eye, Qm1, f.unsqueeze(-1) * f.unsqueeze(-2))
        L, info = torch.linalg.cholesky_ex(M)
        Y = torch.cholesky_solve(rhsc * f.unsqueeze(-1), L)
        if simplex:
            sums = Y.sum(-2)
            nu = (1.0 - sums[:, :1]) / sums[:, 1:]
            x = torch.addcmul(Y[..., 0], nu, Y[..., 1])
            lam = torch.addmm(pc - nu, x, Q)
        else:
            x = Y.squeeze(-1)
            lam = torch.addmm(pc, x, Q)
        xmax = x.abs().amax(-1, keepdim=True)
        xs = xmax if simplex else xmax.clamp_min(1.0)
        # x is zero off F and lam is (up to the ridge) zero on F.
        viol = torch.where(f > 0, x < (-tight) * xmax, lam < torch.addcmul(tol0c, xs, lam_tol1))
        pending = viol.any(-1) & (info == 0)
        if rows is None:
            x_all, lam_all, f_all, info_all = x, lam, f_last, info
        else:
            x_all.index_copy_(0, rows, x)
            lam_all.index_copy_(0, rows, lam)
            f_all.index_copy_(0, rows, f_last)
            info_all.index_copy_(0, rows, info)
        if compact:
            keep = pending.nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            if keep.numel() < pending.numel():
                if rows is None:
                    x_all, lam_all, f_all, info_all = (
                        x_all.clone(), lam_all.clone(), f_all.clone(), info_all.clone())
                rows = keep if rows is None else rows[keep]
                pc, rhsc, tol0c, f, viol = pc[keep], rhsc[keep], tol0c[keep], f[keep], viol[keep]
                if state is not None:
                    state = (state[0][keep], state[1][keep])
        elif (it + 1) % check == 0 and not bool(pending.any()):
            break
        if it < _PLAIN:
            f = torch.where(viol, 1.0 - f, f)
        else:
            f, state = _exchange(viol, f, state, rank)
    if x_all is None:
        return torch.zeros_like(p), f, torch.zeros(B, dtype=torch.bool, device=device)
    # The test with rtol itself on every row's last iterate.
    xmax = x_all.abs().amax(-1, keepdim=True)
    xs = xmax if simplex else xmax.clamp_min(1.0)
    loose = torch.where(
        f_all > 0, x_all < (-rtol) * xmax, lam_all < (10.0 * torch.addcmul(lam_tol0, xs, lam_tol1))
    )
    conv = ~loose.any(-1) & (info_all == 0)
    return x_all, f_all, conv


def _primal_active_set(
    Q: Tensor,
    Qr: Tensor,
    p: Tensor,
    x: Tensor,
    free: Tensor,
    done: Tensor,
    *,
    simplex: bool,
    max_iter: int,
    rtol: float,
    scale_q: Tensor,
) -> tuple[Tensor, Tensor]:
    """The reference's primal active-set method (Lawson-Hanson), from
    the feasible points ``x`` with free sets ``free`` (bool); rows marked ``done`` are kept."""
    B, K = p.shape
    dtype, device = Q.dtype, Q.device
    eps = _eps(dtype)
    check = _check_every(device)
    arange_k = torch.arange(K, device=device)
    inf = torch.tensor(math.inf, dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    eye = torch.eye(K, dtype=dtype, device=device)
    if simplex:
        big = torch.zeros(K + 1, K + 1, dtype=dtype, device=device)
        big[:K, :K] = Qr
        rhs_one = torch.ones(B, 1, dtype=dtype, device=device)
    pmax = p.abs().amax(-1, keepdim=True)
    for it in range(max_iter):
        fm = free.to(dtype)
        if simplex:
            fa = torch.cat([fm, rhs_one], dim=1)
            M = big * (fa.unsqueeze(-1) * fa.unsqueeze(-2))
            M[:, :K, K] = fm
            M[:, K, :K] = fm
            M.diagonal(dim1=-2, dim2=-1)[:, :K].add_(1.0 - fm)
            rhs = torch.cat([-p * fm, rhs_one], dim=1)
            sol = torch.linalg.solve_ex(M, rhs.unsqueeze(-1))[0].squeeze(-1)
            y = sol[:, :K] * fm
        else:
            M = Qr * (fm.unsqueeze(-1) * fm.unsqueeze(-2)) + eye * (1.0 - fm).unsqueeze(-1)
            y = torch.linalg.solve_ex(M, (-p * fm).unsqueeze(-1))[0].squeeze(-1) * fm
        xscale = x.abs().amax(-1, keepdim=True)
        if not simplex:
            xscale = xscale.clamp_min(1.0)
        neg = free & (y < 0)
        feasible = ~neg.any(-1)
        denom = x - y
        ratio = torch.where(neg, x / torch.where(neg, denom, one), inf)
        theta = torch.where(feasible, one, ratio.amin(-1).clamp(0.0, 1.0))
        x_new = x + theta.unsqueeze(-1) * (y - x)
        blocking = neg & (ratio <= theta.unsqueeze(-1) * (1 + 4 * eps) + 4 * eps)
        x_new = torch.where(blocking, zero, x_new).clamp_min(0.0)
        free_new = free & ~blocking
        grad = x_new @ Q + p
        lam = grad - (x_new * grad).sum(-1, keepdim=True) if simplex else grad
        lam_scale = scale_q * xscale + pmax
        viol = (~free_new) & (lam < -rtol * lam_scale)
        if it < K:
            add = viol
        else:
            idx = torch.where(viol, lam, inf).argmin(-1)
            add = viol & (arange_k == idx.unsqueeze(-1))
        add = add & feasible.unsqueeze(-1)
        converged = feasible & ~viol.any(-1)
        keep = done.unsqueeze(-1)
        x = torch.where(keep, x, x_new)
        free = torch.where(keep, free, free_new | add)
        done = done | converged
        if (it + 1) % check == 0 and bool(done.all()):
            break
    return x, free


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
    """Exact solution of convex QPs with non-negativity constraints (block pivoting).

    Solves, for every row ``p[b]``::

        minimise 1/2 x^T Q x + p[b]^T x   subject to  x >= 0  (and sum(x) = 1 if ``simplex``)

    by block principal pivoting (see the module docstring), falling back to the primal
    active-set method when pivoting does not terminate within its budget. At termination the KKT
    conditions hold to rounding error (same tolerances as the reference).

    Args:
        Q: ``[K, K]`` symmetric positive semi-definite matrix.
        p: ``[B, K]`` linear terms (one problem per row).
        simplex: add the constraint ``sum(x) = 1``.
        x0, free0: optional warm start ``[B, K]`` and its free set (bool ``[B, K]``); pivoting
            starts from ``free0 | (x0 > 0)``.
        ridge: relative Tikhonov term added to ``Q`` in the subspace systems (default
            ``64 * eps(dtype)`` times the largest diagonal entry); keeps them positive definite
            when ``Q`` is singular without moving the solution beyond rounding.
        max_iter: iteration cap of the fallback (default ``3 K + 20``); pivoting gets
            ``min(max_iter, 12 + K // 10)`` iterations (it needs 3 to 8 on well-posed
            problems; on near-singular ones, where its safeguarded phase is slow, the primal
            method finishes faster from its last iterate).
        tol: multiplier and feasibility tolerance relative to the problem scale (default
            ``1e3 * eps``).

    Returns:
        ``(x, free)``: the solutions ``[B, K]`` and their free sets (bool).
    """
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"Q must be a square matrix, got {tuple(Q.shape)}")
    if p.ndim != 2 or p.shape[1] != Q.shape[0]:
        raise ValueError(f"p must be [B, {Q.shape[0]}], got {tuple(p.shape)}")
    K = Q.shape[0]
    dtype, device = Q.dtype, Q.device
    eps = _eps(dtype)
    Q = _symmetric(Q)
    scale_q = Q.diagonal().abs().amax().clamp_min(torch.finfo(dtype).tiny)
    rel_ridge = 64 * eps if ridge is None else ridge
    rtol = 1e3 * eps if tol is None else tol
    if max_iter is None:
        max_iter = 3 * K + 20
    eye = torch.eye(K, dtype=dtype, device=device)
    Qr = Q + (rel_ridge * scale_q) * eye

    if x0 is not None or free0 is not None:
        free = free0 if free0 is not None else x0 > 0
        if x0 is not None:
            free = free | (x0 > 0)
        f = free.to(dtype).expand_as(p)
    elif simplex:
        f = torch.ones_like(p)
    else:
        f = (p < 0).to(dtype)
    if simplex:  # the free set of a simplex problem is never empty
        f = torch.where(f.sum(-1, keepdim=True) > 0, f, 1.0)

    # On the simplex, x^T (Q + t 11^T) x = x^T Q x + t: adding t 11^T changes neither the
    # solution nor the multipliers of the bounds, and makes Q_FF + t 11^T non-singular in every
    # null direction of Q_FF that the constraint sum(x) = 1 already fixes (Pareto-stationary
    # combinations in MGDA), which keeps the eliminated system as well conditioned as the
    # bordered one.
    Qs, Qrs = (Q + scale_q, Qr + scale_q) if simplex else (Q, Qr)
    n_pivot = min(max_iter, 12 + K // 10)
    x, f, conv = _block_pivoting(
        Qs, Qrs, p, f, simplex=simplex, n_iter=n_pivot, rtol=rtol, scale_q=scale_q
    )
    free = f > 0
    if simplex:
        x = x.clamp_min(0.0)
        x = x / x.sum(-1, keepdim=True)
    else:
        x = x.clamp_min(0.0)
    if bool(conv.all()):
        return x, free
    # Fallback from a feasible point built from the pivoting iterate.
    finite = torch.isfinite(x).all(-1, keepdim=True)
    if simplex:
        start = torch.full_like(x, 1.0 / K)
        x = torch.where(finite, x, start)
        free = torch.where(finite, x > 0, True)
    else:
        x = torch.where(finite, x, 0.0)
        free = torch.where(finite, x > 0, p < 0)
    return _primal_active_set(
        Q, Qr, p, x, free, conv, simplex=simplex, max_iter=max_iter, rtol=rtol, scale_q=scale_q
    )


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


def _barrier(X: Tensor, inv_p: float) -> Tensor:
    """``sum phi(x)`` over the last dimension, ``phi'(t) = -t^(-1/p)``."""
    if inv_p == 1.0:
        return -torch.log(X).sum(-1)
    q = 1.0 - inv_p
    return -(X.pow(q) / q).sum(-1)


def _line_search(
    G: Tensor, x: Tensor, dx: Tensor, Gx: Tensor, dec: Tensor, inv_p: float, steps: Tensor
) -> tuple[Tensor, Tensor]:
    """Armijo backtracking over all candidate steps at once (no host read).

    Returns the first accepted candidate (``x`` itself when none is) and whether one was.
    """
    tiny = torch.finfo(x.dtype).tiny
    ratio = torch.where(dx > 0, x / dx, math.inf)
    smax = (0.99 * ratio.amin()).clamp(max=1.0)
    t = smax * steps
    cand = (x - t.unsqueeze(-1) * dx).clamp_min(tiny)
    f0 = 0.5 * (x @ Gx) + _barrier(x, inv_p)
    fc = 0.5 * ((cand @ G) * cand).sum(-1) + _barrier(cand, inv_p)
    armijo = fc <= f0 - 1e-4 * t * dec
    found = armijo.any()
    first = armijo.to(torch.uint8).argmax()
    return torch.where(found, cand[first], x), found


def power_equation(
    gramian: Tensor,
    p: float = 1.0,
    *,
    ridge: float = 0.0,
    max_iter: int = 60,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Positive solution ``a`` of ``G a = a^(-1/p)`` (elementwise), and a success flag.

    Same method and result as the reference: damped Newton iterations on the
    strictly convex potential ``1/2 a^T G a + sum_i phi(a_i)``, ``phi'(t) = -t^(-1/p)``, on the
    Gramian normalised by its trace, from the minimiser of the potential on the ray through
    ``1/sqrt(diag G)`` (for ``p = 1``, through two Jacobi sweeps on ``a (G a) = 1`` from
    there). Close to the solution (Newton decrement below 0.05, relative step below
    1/2) the full Newton step is taken; otherwise the first step size of ``1, 1/2, ...,
    2^-11`` (times the largest step keeping ``a > 0``) that satisfies Armijo's condition. On CPU
    the iteration reads the decrement and the step length (one host read), so the line search
    is evaluated only when it is needed; elsewhere every iteration is branch-free and
    convergence is tested every few iterations.

    ``ridge`` adds ``ridge * I`` to the normalised Gramian (a safeguard on degenerate inputs
    where no solution exists).

    Returns:
        ``(a, ok)`` where ``ok`` (a bool tensor) says whether the Newton step fell below
        tolerance and the result solves the (normalised) equation to a relative residual of
        ``100 sqrt(eps)``. (The reference reported success on some inputs without solution,
        e.g. two opposite gradients, where the iterates run off to infinity.)
    """
    K = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    tiny = torch.finfo(dtype).tiny
    inv_p = 1.0 / p
    trace = gramian.diagonal().sum()
    nf = trace.clamp_min(tiny)
    G = _symmetric(gramian / nf)
    if ridge > 0:
        G = G + ridge * torch.eye(K, dtype=dtype, device=device)
    if tol is None:
        tol = 1e3 * _eps(dtype)
    gd = G.diagonal()

    d = 1.0 / gd.clamp_min(tiny).sqrt()
    dGd = (d @ G @ d).clamp_min(tiny)
    kappa = ((d.pow(1.0 - inv_p)).sum() / dGd).pow(1.0 / (1.0 + inv_p))
    x = kappa * d
    if inv_p == 1.0:
        # Two Jacobi sweeps on x_i (G x)_i = 1 (x_i is the positive root of
        # G_ii x_i^2 + o_i x_i = 1 with o = G x - diag(G) x), then back to the minimiser of the
        # potential on the ray through the result: about 2.5 fewer Newton iterations at K = 40.
        xj = x
        for _ in range(2):
            off = torch.addcmul(G @ xj, gd, xj, value=-1.0)
            xn = 2.0 / (off + (off * off + 4.0 * gd).sqrt())
            xj = torch.where(torch.isfinite(xn) & (xn > 0), xn, xj)
        kappa_j = (K / (xj @ G @ xj)).sqrt()
        x = torch.where(torch.isfinite(kappa_j) & (kappa_j > 0), kappa_j * xj, x)

    steps = torch.tensor([0.5**i for i in range(_LS_STEPS)], dtype=dtype, device=device)
    rel_tol = 10.0 * math.sqrt(_eps(dtype))
    on_cpu = _host_branching(device)
    check = _check_every(device)
    ok = torch.zeros((), dtype=torch.bool, device=device)
    stalled = None  # (decrement, step) of a CPU iteration whose line search may have failed
    for it in range(max_iter):
        if inv_p == 1.0:
            xp = x.reciprocal()
            hd = xp * xp
        else:
            xp = x.pow(-inv_p)
            hd = inv_p * xp / x
        Gx = G @ x
        g = Gx - xp
        # Symmetric positive definite; a tiny diagonal shift guards the Cholesky in float32.
        hdiag = gd + hd
        H = G.diagonal_scatter(torch.add(hdiag, hdiag.amax(), alpha=tol))
        L, info = torch.linalg.cholesky_ex(H)
        dx = torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
        dec = g @ dx  # squared Newton decrement
        rel = (dx.abs() / x).amax()
        if on_cpu:
            dec_v, rel_v, info_v = torch.stack((dec, rel, info.to(dtype))).tolist()
            if info_v != 0 or not (math.isfinite(dec_v) and math.isfinite(rel_v)):
                break
            if dec_v < 0.05 and rel_v < 0.5:
                x = x - dx
                if rel_v <= rel_tol:
                    ok = torch.ones((), dtype=torch.bool, device=device)
                    break
                continue
            if stalled == (dec_v, rel_v):
                break  # the previous line search accepted no step: x cannot move any more
            stalled = (dec_v, rel_v)
            x, _ = _line_search(G, x, dx, Gx, dec, inv_p, steps)
            continue
        full = (dec < 0.05) & (rel < 0.5)
        chosen, _ = _line_search(G, x, dx, Gx, dec, inv_p, steps)
        x_next = torch.where(full, x - dx, chosen)
        x_next = torch.where(torch.isfinite(x_next).all() & (info == 0), x_next, x)
        x = torch.where(ok, x, x_next)
        ok = ok | (full & (rel <= rel_tol))
        if (it + 1) % check == 0 and bool(ok):
            break
    # The Newton step can also shrink along a ray on which the potential is unbounded below
    # (no solution: a non-negative combination of the rows vanishes); only a small residual
    # of the equation itself certifies a solution.
    rhs = x.pow(-inv_p)
    residual = (G @ x - rhs).abs().amax()
    ok = ok & (residual <= 100.0 * math.sqrt(_eps(dtype)) * rhs.abs().amax()) & (trace > tiny)
    a = x * nf.pow(-p / (p + 1.0))
    return a, ok


# ---------------------------------------------------------------------------------------------
# CAGrad
# ---------------------------------------------------------------------------------------------


def _affine_parts(
    G: Tensor, Gr: Tensor, b: Tensor, f: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """On the free set ``f`` (float mask): ``a`` = argmin ``w^T G w`` s.t. ``sum w = 1`` and
    ``c`` = argmin ``1/2 c^T G c + b^T c`` s.t. ``sum c = 0`` (both zero off ``F``), from one
    masked Cholesky factorisation of ``Gr`` with the right-hand sides ``1`` and ``b``; with
    ``G a`` and ``G c``. ``Gr`` is ``G`` plus the ridge and ``t 11^T``, which changes neither
    ``a`` nor ``c`` (see :func:`qp_active_set`). Returns ``(a, c, Ga, Gc, info)``."""
    K = G.shape[0]
    eye = torch.eye(K, dtype=G.dtype, device=G.device)
    M = torch.addcmul(eye, Gr - eye, f.unsqueeze(-1) * f.unsqueeze(-2))
    L, info = torch.linalg.cholesky_ex(M)
    Y = torch.cholesky_solve(torch.stack((f, b * f), dim=-1), L)
    sums = Y.sum(0)
    a = Y[:, 0] / sums[0]
    c = (sums[1] / sums[0]) * Y[:, 0] - Y[:, 1]
    GY = G @ torch.stack((a, c), dim=-1)
    return a, c, GY[:, 0], GY[:, 1], info


def _cagrad_pivoting(
    G: Tensor, b: Tensor, r: Tensor, s0: Tensor, s_max: Tensor, n_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block pivoting on the free set of ``min_{w in simplex} b^T w + r ||g_w||``.

    For a free set ``F`` let ``w(s) = a + c / s`` be the minimiser of the simplex QP
    ``b^T w + (s/2) w^T G w`` restricted to ``F`` (:func:`_affine_parts`). The solution is the
    ``w(s)`` with ``s ||g_w(s)|| = r``, i.e. ``s^2 a^T G a + c^T G c = r^2`` (explicit), whose
    KKT conditions hold. Every iteration takes that root on the current ``F`` (clipped to
    ``s_max``; when ``F`` has no root, or ``||g_a||^2`` is below its rounding error, ``s`` is
    kept)
    and exchanges the indices of ``F`` where ``w(s) < 0`` and those outside ``F`` with a
    negative multiplier, like :func:`_block_pivoting`; it starts from the vertex with the
    smallest ``b``. Returns ``(w, s, root, done)``: ``done`` when the KKT conditions hold at a
    root (then ``root > s_max`` means that the optimum lies beyond ``s_max``).
    """
    K = G.shape[0]
    dtype, device = G.dtype, G.device
    eps = _eps(dtype)
    check = _check_every(device)
    scale0 = G.diagonal().amax()
    Gr = G + (64 * eps) * scale0 * torch.eye(K, dtype=dtype, device=device) + scale0
    G_abs = G.abs() * (4 * K * eps)
    lam_tol0 = (-1e3 * eps) * b.abs().amax()
    lam_tol1 = (-1e3 * eps) * scale0
    rank = torch.arange(1, K + 1, dtype=dtype, device=device)
    f = (torch.arange(K, device=device) == b.argmin()).to(dtype)
    s = s0
    state = None
    w = root = done = None
    for it in range(n_iter):
        a, c, Ga, Gc, info = _affine_parts(G, Gr, b, f)
        qa = a @ Ga
        num = r * r - c @ Gc
        root = (num / qa).sqrt()
        abs_a = a.abs()
        valid = (num > 0) & (qa > abs_a @ G_abs @ abs_a) & (info == 0)
        s = torch.where(valid, torch.minimum(root, s_max), s)
        w = a + c / s
        grad = b + s * Ga + Gc  # b + s G w
        lam = grad - w @ grad
        viol = torch.where(f > 0, w < -1e2 * eps, lam < torch.addcmul(lam_tol0, s, lam_tol1))
        settled = ~viol.any()
        done = valid & settled
        # Without violations the free set no longer changes: converged, or (no valid root)
        # stuck, which the caller hands to the fallback.
        if (it + 1) % check == 0 and bool(settled):
            break
        if it < _PLAIN:
            f = torch.where(viol, 1.0 - f, f)
        else:
            f, state = _exchange(viol, f, state, rank)
    return w, s, root, done


def cagrad_weights(
    gramian: Tensor,
    c: float,
    norm_eps: float = 1e-4,
    max_outer: int = 60,
    radius_factor: float = 1.0,
) -> Tensor:
    """CAGrad weights (torchjd convention): ``1/K + (sqrt_phi / ||g_w||) w``.

    Same problem and result as the reference: with ``G~ = G / trace(G)``,
    ``b = G~ 1/K`` and ``r = radius_factor * c ||g_0||``, ``w`` minimises
    ``b^T w + r sqrt(w^T G~ w)`` over the simplex and the weights are ``1/K + s w`` with
    ``s = r / ||g_w||`` (zero when ``||g_w|| < norm_eps``, i.e. ``s > s_max = r / norm_eps``).
    Solved by block pivoting on the free set of ``w`` (:func:`_cagrad_pivoting`); when that
    does not terminate within its budget, the reference's safeguarded search on ``s``
    (exact simplex QPs and the explicit root on their free sets) takes over.
    """
    K = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    tiny = torch.finfo(dtype).tiny
    uniform = torch.full((K,), 1.0 / K, dtype=dtype, device=device)
    trace = gramian.diagonal().sum()
    if c == 0.0:
        return uniform
    if not bool(trace > tiny):
        return torch.zeros(K, dtype=dtype, device=device)
    G = _symmetric(gramian / trace)
    b = G.sum(-1) / K
    g0_sq = b.sum()  # ||g_0||^2 = 1^T G 1 / K^2
    r = radius_factor * c * g0_sq.clamp_min(0.0).sqrt()
    if not bool(r > 0):
        return uniform
    s_max = r / norm_eps  # beyond it ||g_w|| = r/s < norm_eps: zero weights
    s0 = torch.minimum(r / g0_sq.clamp_min(tiny).sqrt(), s_max)  # ||g_w|| ~ ||g_0|| guess
    w, s, root, done = _cagrad_pivoting(G, b, r, s0, s_max, K + 10)
    if bool(done):
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(root > s_max, zero, uniform + s * w.clamp_min(0.0))
    x0, free0 = qp_active_set(s0 * G, b.unsqueeze(0), simplex=True)
    return _cagrad_search(G, b, r, s0, s_max, x0, free0, norm_eps, max_outer)


def _cagrad_search(
    G: Tensor,
    b: Tensor,
    r: Tensor,
    s: Tensor,
    s_max: Tensor,
    x: Tensor,
    free: Tensor,
    norm_eps: float,
    max_outer: int,
) -> Tensor:
    """The reference's search on ``s``, from the QP solution ``x``
    (free set ``free``) at ``s``."""
    K = G.shape[0]
    dtype, device = G.dtype, G.device
    tiny = torch.finfo(dtype).tiny
    eps = _eps(dtype)
    uniform = torch.full((K,), 1.0 / K, dtype=dtype, device=device)
    ridge = 64 * eps * G.diagonal().amax()
    Gr = G + ridge * torch.eye(K, dtype=dtype, device=device) + G.diagonal().amax()
    G_abs = G.abs() * (4 * K * eps)  # rounding error of a^T G a is below |a|^T G_abs |a|

    def psi(w: Tensor, s: Tensor) -> Tensor:
        return s * (w @ G @ w).clamp_min(0.0).sqrt()

    def kkt_ok(w: Tensor, s: Tensor, free: Tensor) -> Tensor:
        grad = b + s * (G @ w)
        lam = grad - (w * grad).sum()
        scale = s * G.diagonal().amax() + b.abs().amax()
        return ((w >= -1e2 * eps).all()) & ((lam >= -1e3 * eps * scale) | free).all()

    s_lo = torch.zeros((), dtype=dtype, device=device)
    s_hi = torch.full((), math.inf, dtype=dtype, device=device)
    result = None
    first = True
    for _ in range(max_outer):
        if not first:
            x, free = qp_active_set(s * G, b.unsqueeze(0), simplex=True, x0=x, free0=free)
        first = False
        w = x[0]
        fr = free[0]
        a, cc, Ga, Gc, _ = _affine_parts(G, Gr, b, fr.to(dtype))
        qa = a @ Ga
        num = r * r - cc @ Gc
        abs_a = a.abs()
        valid = bool((qa > tiny) & (qa > abs_a @ G_abs @ abs_a) & (num > 0))
        if valid:
            s_star = (num / qa).sqrt()
            w_star = a + cc / s_star
            if bool(s_star <= s_max) and bool(kkt_ok(w_star, s_star, fr)):
                result = (w_star.clamp_min(0.0), s_star)
                break
        else:
            s_star = None
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
        if bool(s >= s_max) and bool(psi(x[0], s) < r):
            return torch.zeros(K, dtype=dtype, device=device)
        result = (x[0], s)
    w, s_fin = result
    if bool(r / s_fin < norm_eps):
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


def _nash_subproblem_one_active(G: Tensor, c: Tensor, eps: float) -> Tensor | None:
    """Two tasks, one constraint active: the KKT point in closed form, or ``None``.

    With ``x_i (G x)_i = 1`` active and the other constraint slack, stationarity
    ``c = mu grad h_i`` (``h_i = log x_i + log (G x)_i``, so ``grad h_i = (1/x_i + G_ii x_i,
    G_ij x_i)`` on the boundary) gives ``x_i^2 (c_i G_ij - c_j G_ii) = c_j`` and then
    ``x_j = (1/x_i - G_ii x_i) / G_ij``. A candidate with ``x > 0``, ``G x > 0``, ``mu >= 0`` and
    the other constraint satisfied is a KKT point of the convex subproblem, hence its solution
    (the barrier method's, without its Newton iterations). One host read.
    """
    g11, g12, g22 = G[0, 0], G[0, 1], G[1, 1]
    cands = []
    for i, j, gii in ((0, 1, g11), (1, 0, g22)):
        ci, cj = c[i], c[j]
        xi = (cj / (ci * g12 - cj * gii)).sqrt()
        xj = (1.0 / xi - gii * xi) / g12
        x = torch.stack((xi, xj) if i == 0 else (xj, xi))
        y = G @ x
        mu = cj / (g12 * xi)
        slack = x[j] * y[j] - 1.0
        valid = (
            torch.isfinite(x).all() & (x > 0).all() & (y > 0).all() & (mu >= 0)
            & (slack >= -1e3 * eps)
        )
        cands.append((x, valid))
    xs = torch.stack([x for x, _ in cands])
    valid = torch.stack([v for _, v in cands])
    obj = torch.where(valid, xs @ c, torch.full_like(xs[:, 0], math.inf))
    best, ok = torch.stack((obj.argmin().to(xs.dtype), valid.any().to(xs.dtype))).tolist()
    return xs[int(best)] if ok else None


def nash_cccp_subproblem(
    G: Tensor, c: Tensor, x_star: Tensor, *, max_newton: int = 400, gap_tol: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve ``min c^T x`` subject to ``x_i (G x)_i >= 1`` for all ``i``.

    Same method and result as the reference: the Nash point ``x_star``
    (``G x* = 1/x*``, every constraint active) is tested first with its KKT multipliers (one
    linear solve, one host read); for two tasks, the KKT point with one constraint active is
    then tried in closed form (:func:`_nash_subproblem_one_active`; over 25x faster on the toy
    problem near its Pareto front, where this case is the rule); otherwise a primal log-barrier
    method on the rotated-cone form of the constraints solves it to ``gap_tol`` relative
    duality gap.

    Returns:
        ``(x, ok)``; ``ok`` is false when the subproblem is unbounded or the barrier method did
        not converge.
    """
    K = G.shape[0]
    dtype, device = G.dtype, G.device
    tiny = torch.finfo(dtype).tiny
    eps = _eps(dtype)
    if gap_tol is None:
        gap_tol = max(1e-11, 1e3 * eps)
    y = G @ x_star
    # Rows: gradients of h_i = log x_i + log (Gx)_i at x*.
    Dh = G / y.unsqueeze(-1)
    Dh.diagonal().add_(1.0 / x_star)
    mu = torch.linalg.solve_ex(Dh.T, c)[0]
    if bool(((mu >= -1e3 * eps * mu.abs().amax()) & torch.isfinite(mu)).all()):
        return x_star, torch.ones((), dtype=torch.bool, device=device)
    if K == 2:
        x2 = _nash_subproblem_one_active(G, c, eps)
        if x2 is not None:
            return x2, torch.ones((), dtype=torch.bool, device=device)

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
        noise = 64 * eps * f0.abs()
        if bool(lam2 <= torch.clamp(noise, min=1e-14)) or bool(info != 0):
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
