"""The fast K x K solvers (``polytask.balancers._qp``) against the reference solvers (a frozen copy
of ``_solvers`` before them, ``benchmarks/_solvers_v0.py``), a brute-force enumeration of the
KKT points (small ``K``), ``scipy.optimize`` (``nnls``, ``minimize``) and the optimality
conditions themselves, on random and degenerate Gramians in float32 and float64.

Float64 results must agree with the reference to ``1e-9`` relative on well-posed problems; in
float32, and wherever the solution is not unique (rank-deficient Gramians), the checks are on the
KKT conditions and the objective value instead, since two exact solvers then legitimately return
different points.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from polytask.balancers import _qp as N

_REF_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_solvers_v0.py"


def _reference():
    spec = importlib.util.spec_from_file_location("_solvers_v0", _REF_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = _reference()


@pytest.fixture(autouse=True)
def _one_thread():
    """K x K problems: one thread is faster than several (no contention on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

DTYPES = (torch.float32, torch.float64)
WELL_POSED = ("square", "wide", "wide_shifted", "spread")
DEGENERATE = ("low_rank", "rank3", "colinear", "opposite", "duplicate", "zero_row", "zero")


def gramian(kind: str, k: int, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``J J^T`` of a family of Jacobians (built in float64, then cast)."""
    g = torch.Generator().manual_seed(1000 * seed + k)
    f64 = torch.float64
    if kind == "square":
        J = torch.randn(k, k, generator=g, dtype=f64)
    elif kind == "wide":
        J = torch.randn(k, 3 * k + 5, generator=g, dtype=f64)
    elif kind == "wide_shifted":  # mostly agreeing tasks: large free sets
        J = torch.randn(k, 3 * k + 5, generator=g, dtype=f64) + 0.4
    elif kind == "spread":  # row norms over two orders of magnitude
        J = torch.randn(k, 3 * k + 5, generator=g, dtype=f64)
        J = J * torch.logspace(-1, 1, k, dtype=f64).unsqueeze(-1)
    elif kind == "low_rank":
        J = torch.randn(k, max(1, k // 2), generator=g, dtype=f64)
    elif kind == "rank3":
        J = torch.randn(k, 3, generator=g, dtype=f64)
    elif kind == "colinear":
        J = torch.randn(k, 1, generator=g, dtype=f64).abs() * torch.randn(1, 7, generator=g,
                                                                            dtype=f64)
    elif kind == "opposite":
        v = torch.randn(1, 7, generator=g, dtype=f64)
        signs = torch.tensor([(-1.0) ** i for i in range(k)], dtype=f64).unsqueeze(-1)
        J = signs * v * (1 + torch.rand(k, 1, generator=g, dtype=f64))
    elif kind == "duplicate":
        J = torch.randn(max(1, k // 2), 9, generator=g, dtype=f64).repeat(2, 1)[:k]
        if J.shape[0] < k:
            J = torch.cat([J, J[:1]])
    elif kind == "zero_row":
        J = torch.randn(k, 9, generator=g, dtype=f64)
        J[0] = 0
    elif kind == "zero":
        J = torch.zeros(k, 5, dtype=f64)
    else:
        raise ValueError(kind)
    return ((J @ J.T) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# KKT and brute force
# ---------------------------------------------------------------------------------------------


def kkt_violation(Q: torch.Tensor, p: torch.Tensor, x: torch.Tensor, simplex: bool) -> float:
    """Largest violation of the KKT conditions of ``min 1/2 x^T Q x + p^T x`` over the simplex
    (or ``x >= 0``), relative to the problem scale, evaluated in float64."""
    Q, p, x = Q.double(), p.double(), x.double()
    grad = x @ Q + p
    lam = grad - (x * grad).sum(-1, keepdim=True) if simplex else grad
    scale = Q.abs().amax() * x.abs().amax(-1, keepdim=True).clamp_min(1.0) + p.abs().amax(
        -1, keepdim=True
    )
    scale = scale.clamp_min(1e-300)
    dual = (-lam).clamp_min(0.0) / scale  # multipliers must be >= 0
    comp = (lam.abs() * (x > 0)) / scale  # and zero on the support
    primal = (-x).clamp_min(0.0).amax(-1, keepdim=True)
    if simplex:
        primal = primal + (x.sum(-1, keepdim=True) - 1).abs()
    return float(torch.cat([dual, comp, primal], -1).amax())


def objective(Q: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    Q, p, x = Q.double(), p.double(), x.double()
    return 0.5 * ((x @ Q) * x).sum(-1) + (p * x).sum(-1)


def brute_force_qp(Q: torch.Tensor, p: torch.Tensor, simplex: bool) -> torch.Tensor:
    """Optimal value of the QP by enumerating the free sets (float64, ``K <= 7``)."""
    Q, p = Q.double(), p.double()
    K = Q.shape[0]
    best = math.inf
    for r in range(0 if not simplex else 1, K + 1):
        for F in itertools.combinations(range(K), r):
            idx = list(F)
            x = torch.zeros(K, dtype=torch.float64)
            if idx:
                QF = Q[idx][:, idx]
                if simplex:
                    A = torch.zeros(r + 1, r + 1, dtype=torch.float64)
                    A[:r, :r] = QF
                    A[:r, r] = 1
                    A[r, :r] = 1
                    rhs = torch.cat([-p[idx], torch.ones(1, dtype=torch.float64)])
                    sol = torch.linalg.lstsq(A, rhs.unsqueeze(-1)).solution.squeeze(-1)
                    x[idx] = sol[:r]
                else:
                    x[idx] = torch.linalg.lstsq(QF, -p[idx].unsqueeze(-1)).solution.squeeze(-1)
            if bool((x >= -1e-12).all()) and (not simplex or abs(float(x.sum()) - 1) < 1e-9):
                x = x.clamp_min(0.0)
                if simplex:
                    x = x / x.sum()
                best = min(best, float(objective(Q, p, x)))
    return torch.tensor(best, dtype=torch.float64)


def _tol(dtype: torch.dtype) -> float:
    return 1e4 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# qp_active_set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("simplex", [True, False])
def test_qp_matches_brute_force(dtype: torch.dtype, simplex: bool) -> None:
    for k in (1, 2, 4, 6):
        for seed in range(2 if k < 6 else 1):
            for kind in WELL_POSED + DEGENERATE:
                Q = gramian(kind, k, seed, dtype)
                if not bool(Q.diagonal().amax() > 0):  # Q = 0 is not a QP (the callers never
                    Q = torch.eye(k, dtype=dtype)  # pass it): the identity instead
                Q = Q / Q.diagonal().amax()
                g = torch.Generator().manual_seed(seed)
                p = torch.randn(2, k, generator=g, dtype=torch.float64).to(dtype) * 0.5
                if not simplex:  # bounded below: p in the range of Q (as in UPGrad)
                    p = p @ Q
                x, free = N.qp_active_set(Q, p, simplex=simplex)
                assert x.dtype == dtype and free.dtype == torch.bool
                assert torch.isfinite(x).all() and (x >= 0).all()
                for b in range(2):
                    opt = brute_force_qp(Q, p[b], simplex)
                    got = objective(Q, p[b], x[b])
                    slack = 10 * _tol(dtype) * (1 + abs(float(opt)))
                    assert float(got) <= float(opt) + slack, (kind, k, seed, b, got, opt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("simplex", [True, False])
def test_qp_kkt_and_reference(dtype: torch.dtype, simplex: bool) -> None:
    for k in (10, 40):
        for seed in range(2):
            for kind in WELL_POSED + DEGENERATE[:-1]:  # without the zero matrix
                Q = gramian(kind, k, seed, dtype)
                Q = Q / Q.diagonal().amax().clamp_min(1e-30)
                if not simplex:  # strictly convex
                    Q = Q + 1e-3 * torch.eye(k, dtype=dtype)
                g = torch.Generator().manual_seed(seed)
                p = (torch.randn(3, k, generator=g, dtype=torch.float64) * 0.3).to(dtype)
                x, _ = N.qp_active_set(Q, p, simplex=simplex)
                x_ref, _ = REF.qp_active_set(Q, p, simplex=simplex)
                assert kkt_violation(Q, p, x, simplex) < _tol(dtype), (kind, k, seed)
                # At least as good as the reference (float32: often better).
                f_new, f_ref = objective(Q, p, x), objective(Q, p, x_ref)
                assert bool((f_new <= f_ref + _tol(dtype) * (1 + f_ref.abs())).all()), (
                    kind, k, seed, f_new, f_ref)
                if dtype == torch.float64 and kind in WELL_POSED:
                    assert torch.allclose(x, x_ref, rtol=1e-9, atol=1e-11), (kind, k, seed)


def test_qp_nonneg_matches_scipy_nnls() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    for k in (10, 40):
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            A = torch.randn(k, 2 * k, generator=g, dtype=torch.float64)
            c = torch.randn(2 * k, generator=g, dtype=torch.float64)
            # min 1/2 ||A^T z + c||^2 = 1/2 z^T (A A^T) z + (A c)^T z + const, z >= 0
            Q, p = A @ A.T, (A @ c).unsqueeze(0)
            x, _ = N.qp_active_set(Q, p, simplex=False)
            z, _ = scipy_optimize.nnls(A.T.numpy(), -c.numpy())
            assert np.allclose(x[0].numpy(), z, rtol=1e-8, atol=1e-10)


def test_qp_warm_start_and_validation() -> None:
    Q = gramian("square", 10, 0, torch.float64)
    p = torch.zeros(1, 10, dtype=torch.float64)
    x, free = N.qp_active_set(Q, p, simplex=True)
    x2, free2 = N.qp_active_set(Q, p, simplex=True, x0=x, free0=free)
    assert torch.equal(free, free2) and torch.allclose(x, x2, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="square"):
        N.qp_active_set(torch.zeros(2, 3), p, simplex=True)
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        N.qp_active_set(Q, torch.zeros(1, 9, dtype=torch.float64), simplex=True)


@pytest.mark.parametrize("simplex", [True, False])
def test_primal_fallback_is_exact(simplex: bool) -> None:
    """The primal active-set fallback, run alone from the default start, reaches the same
    KKT point as block pivoting."""
    for kind in ("square", "low_rank", "spread"):
        Q = gramian(kind, 12, 1, torch.float64)
        Q = Q / Q.diagonal().amax() + 1e-6 * torch.eye(12, dtype=torch.float64)
        p = torch.randn(4, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        x, _ = N.qp_active_set(Q, p, simplex=simplex)
        eps = torch.finfo(torch.float64).eps
        scale_q = Q.diagonal().amax()
        Qr = Q + 64 * eps * scale_q * torch.eye(12, dtype=torch.float64)
        if simplex:
            x0 = torch.full_like(p, 1 / 12)
            free0 = torch.ones_like(p, dtype=torch.bool)
        else:
            x0, free0 = torch.zeros_like(p), p < 0
        done = torch.zeros(4, dtype=torch.bool)
        xp, _ = N._primal_active_set(Q, Qr, p, x0, free0, done, simplex=simplex,
                                     max_iter=3 * 12 + 20, rtol=1e3 * eps, scale_q=scale_q)
        assert kkt_violation(Q, p, xp, simplex) < 1e-10
        assert torch.allclose(x, xp, rtol=1e-8, atol=1e-10)


def test_pivoting_safeguard_terminates_on_a_cycling_example(monkeypatch) -> None:
    """With plain full exchanges only, block pivoting cycles on these rank-deficient UPGrad
    problems; with the Júdice-Pires safeguard it terminates at the exact solution."""
    eps = torch.finfo(torch.float64).eps
    for seed in (1, 2):
        Q = gramian("low_rank", 20, seed, torch.float64)
        Q = Q / Q.trace() + 1e-4 * torch.eye(20, dtype=torch.float64)
        p = Q / 20
        f0 = (p < 0).to(torch.float64)
        Qr = Q + 64 * eps * Q.diagonal().amax() * torch.eye(20, dtype=torch.float64)
        kw = dict(simplex=False, n_iter=120, rtol=1e3 * eps, scale_q=Q.diagonal().amax())
        x, _, conv = N._block_pivoting(Q, Qr, p, f0, **kw)
        assert bool(conv.all()), seed
        assert kkt_violation(Q, p, x, False) < 1e-11
        with monkeypatch.context() as m:
            m.setattr(N, "_PLAIN", 10**6)
            _, _, conv_plain = N._block_pivoting(Q, Qr, p, f0, **kw)
        assert not bool(conv_plain.all()), seed


# ---------------------------------------------------------------------------------------------
# MGDA, UPGrad / DualProj
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_norm_point(dtype: torch.dtype) -> None:
    for k in (1, 2, 10, 40):
        for seed in range(2):
            for kind in WELL_POSED + DEGENERATE:
                for scale in (1.0, 1e-8, 1e8) if k == 10 else (1.0,):
                    G = gramian(kind, k, seed, dtype, scale)
                    w = N.min_norm_point(G)
                    w_ref = REF.min_norm_point(G)
                    assert w.shape == (k,) and w.dtype == dtype
                    assert torch.isfinite(w).all() and (w >= 0).all()
                    assert abs(float(w.double().sum()) - 1) < 1e-5
                    # The min-norm value is unique: same as the reference's.
                    Gd = G.double() / G.double().diagonal().amax().clamp_min(1e-300)
                    n_new, n_ref = float(w.double() @ Gd @ w.double()), float(
                        w_ref.double() @ Gd @ w_ref.double())
                    assert abs(n_new - n_ref) <= _tol(dtype) * (1 + n_ref), (kind, k, seed)
                    if dtype == torch.float64 and kind in WELL_POSED:
                        assert torch.allclose(w, w_ref, rtol=1e-9, atol=1e-12), (kind, k, seed)
                        # g_i . d >= ||d||^2 for every task, with equality on the support.
                        gd = Gd @ w
                        assert bool((gd >= n_new - 1e-10).all())
                        assert bool(((gd - n_new).abs() < 1e-10)[w > 1e-9].all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_to_dual_cone(dtype: torch.dtype) -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    for k in (1, 2, 10, 40):
        for seed in range(2):
            for kind in WELL_POSED + DEGENERATE:
                G = gramian(kind, k, seed, dtype)
                trace = G.diagonal().sum()
                Gn = G / trace if bool(trace > 0) else G
                Gn = Gn + 1e-4 * torch.eye(k, dtype=dtype)
                U = torch.eye(k, dtype=dtype) / k
                W = N.project_to_dual_cone(Gn, U)
                W_ref = REF.project_to_dual_cone(Gn, U)
                assert torch.isfinite(W).all() and (W >= U - 1e-12).all()
                Z = W - U
                assert kkt_violation(Gn, U @ Gn, Z, False) < _tol(dtype), (kind, k, seed)
                assert torch.allclose(objective(Gn, U @ Gn, Z), objective(Gn, U @ Gn, W_ref - U),
                                      rtol=_tol(dtype), atol=_tol(dtype) / k)
                if dtype == torch.float64:
                    assert torch.allclose(W, W_ref, rtol=1e-8, atol=1e-10), (kind, k, seed)
                    # scipy: z = argmin ||L^T (u + z)||, z >= 0, with G = L L^T
                    L = torch.linalg.cholesky(Gn)
                    for b in (0, k - 1):
                        z, _ = scipy_optimize.nnls(L.T.numpy(), -(L.T @ U[b]).numpy())
                        assert np.allclose(Z[b].numpy(), z, rtol=1e-7, atol=1e-9), (kind, k)


# ---------------------------------------------------------------------------------------------
# CAGrad
# ---------------------------------------------------------------------------------------------


def _cagrad_objective(G: torch.Tensor, w: torch.Tensor, r: float) -> float:
    """``b^T w + r ||g_w||`` in the trace-normalised space (float64)."""
    G = G.double() / G.double().trace()
    b = G.sum(-1) / G.shape[0]
    return float(b @ w + r * (w @ G @ w).clamp_min(0.0).sqrt())


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_weights_match_reference(dtype: torch.dtype) -> None:
    for k in (1, 2, 10, 40):
        for seed in range(2):
            for kind in WELL_POSED + DEGENERATE:
                for c in (0.1, 0.5, 2.0) if k < 40 else (0.5,):
                    for scale in (1.0, 1e-8, 1e8) if k == 10 else (1.0,):
                        G = gramian(kind, k, seed, dtype, scale)
                        w = N.cagrad_weights(G, c, radius_factor=1 / math.sqrt(k))
                        assert w.shape == (k,) and w.dtype == dtype
                        assert torch.isfinite(w).all()
                        if dtype == torch.float64 and kind in WELL_POSED:
                            w_ref = REF.cagrad_weights(G, c, radius_factor=1 / math.sqrt(k))
                            assert torch.allclose(w, w_ref, rtol=1e-9, atol=1e-12), (
                                kind, k, seed, c, scale)


def test_cagrad_is_optimal_against_scipy() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    for k in (3, 10):
        for seed in range(3):
            for kind in WELL_POSED:
                G = gramian(kind, k, seed, torch.float64)
                Gt = G / G.trace()
                b = Gt.sum(-1) / k
                c = 0.5
                r = c * float(b.sum().sqrt()) / math.sqrt(k)
                weights = N.cagrad_weights(G, c, radius_factor=1 / math.sqrt(k))
                s_w = weights - 1 / k  # = s w with w on the simplex
                w = s_w / s_w.sum()
                res = scipy_optimize.minimize(
                    lambda v, G=G, r=r: _cagrad_objective(G, torch.from_numpy(v), r),
                    np.full(k, 1 / k),
                    method="SLSQP",
                    bounds=[(0, 1)] * k,
                    constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
                    options={"ftol": 1e-14, "maxiter": 500},
                )
                ours = _cagrad_objective(G, w, r)
                assert ours <= res.fun + 1e-9, (kind, k, seed, ours, res.fun)
                # s ||g_w|| = r (the weights are 1/K + (r / ||g_w||) w)
                assert abs(float(s_w @ Gt @ s_w) ** 0.5 - r) < 1e-9


def test_cagrad_fallback_search_agrees() -> None:
    """The fallback (safeguarded search on ``s``) alone gives the pivoting result."""
    for kind in WELL_POSED:
        for k in (2, 10):
            G = gramian(kind, k, 2, torch.float64)
            w = N.cagrad_weights(G, 0.4, radius_factor=1 / math.sqrt(k))
            Gt = G / G.trace()
            b = Gt.sum(-1) / k
            g0_sq = b.sum()
            r = 0.4 / math.sqrt(k) * g0_sq.sqrt()
            s_max = r / 1e-4
            s0 = torch.minimum(r / g0_sq.sqrt(), s_max)
            x0, f0 = N.qp_active_set(s0 * Gt, b.unsqueeze(0), simplex=True)
            w_search = N._cagrad_search(Gt, b, r, s0, s_max, x0, f0, 1e-4, 60)
            assert torch.allclose(w, w_search, rtol=1e-9, atol=1e-12), (kind, k)


def test_cagrad_special_cases() -> None:
    G = gramian("square", 5, 0, torch.float64)
    assert torch.equal(N.cagrad_weights(G, 0.0), torch.full((5,), 0.2, dtype=torch.float64))
    assert torch.equal(N.cagrad_weights(torch.zeros(5, 5), 0.5), torch.zeros(5))
    # Exactly Pareto-stationary (opposite gradients, float64): zero weights, like the reference.
    G = gramian("opposite", 2, 0, torch.float64)
    assert torch.equal(N.cagrad_weights(G, 0.5), REF.cagrad_weights(G, 0.5))


# ---------------------------------------------------------------------------------------------
# Power equation (FairGrad, Nash), Nash CCCP subproblem
# ---------------------------------------------------------------------------------------------


def _power_residual(G: torch.Tensor, a: torch.Tensor, p: float) -> float:
    """Relative residual of ``G a = a^(-1/p)`` (float64)."""
    G, a = G.double(), a.double()
    rhs = a.pow(-1 / p)
    return float((G @ a - rhs).abs().amax() / rhs.abs().amax())


@pytest.mark.parametrize("dtype", DTYPES)
def test_power_equation(dtype: torch.dtype) -> None:
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    for k in (1, 2, 10, 40):
        for seed in range(2):
            for kind in WELL_POSED:
                for p in (0.5, 1.0, 2.0) if k < 40 else (1.0,):
                    for scale in (1.0, 1e-8, 1e8) if k == 10 else (1.0,):
                        G = gramian(kind, k, seed, dtype, scale)
                        a, ok = N.power_equation(G, p)
                        a_ref, ok_ref = REF.power_equation(G, p)
                        assert a.dtype == dtype and ok.dtype == torch.bool
                        assert bool(ok) and bool(ok_ref)
                        assert _power_residual(G, a, p) < tol, (kind, k, seed, p, scale)
                        if dtype == torch.float64:
                            assert torch.allclose(a, a_ref, rtol=1e-10), (kind, k, seed, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_power_equation_degenerate(dtype: torch.dtype) -> None:
    """Success is only reported with a small residual (the reference also reported it where
    no solution exists, e.g. opposite gradients); the ridge keeps the weights finite."""
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    for k, seed in ((2, 0), (2, 2), (10, 0)):
        for kind in DEGENERATE:
            for p in (0.5, 2.0) if k == 2 else (1.0,):
                G = gramian(kind, k, seed, dtype)
                a, ok = N.power_equation(G, p)
                a_ref, ok_ref = REF.power_equation(G, p)
                if bool(ok):
                    assert torch.isfinite(a).all() and _power_residual(G, a, p) < tol
                elif bool(ok_ref):  # the reference's "success" is not a solution
                    assert not _power_residual(G, a_ref, p) < tol, (kind, k, seed, p)
                a, _ = N.power_equation(G, p, ridge=1e-10)
                a_ref, _ = REF.power_equation(G, p, ridge=1e-10)
                assert torch.equal(torch.isfinite(a), torch.isfinite(a_ref))
    # two exactly opposite gradients: no solution
    G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=dtype)
    assert not bool(N.power_equation(G, 1.0)[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_cccp_subproblem(dtype: torch.dtype) -> None:
    for k in (2, 5, 10):
        for seed in range(3):
            G = gramian("wide", k, seed, dtype)
            Gt = G / torch.linalg.matrix_norm(G)
            x_star, ok = N.power_equation(Gt, 1.0)
            assert bool(ok)
            g = torch.Generator().manual_seed(seed)
            for c in (Gt.sum(0) + 1.0 / x_star,  # at the Nash point: the fast path
                      torch.rand(k, generator=g, dtype=torch.float64).to(dtype) + 0.1):
                x, ok = N.nash_cccp_subproblem(Gt, c, x_star)
                x_ref, ok_ref = REF.nash_cccp_subproblem(Gt, c, x_star)
                assert bool(ok) == bool(ok_ref)
                if bool(ok):
                    tol = 1e-7 if dtype == torch.float64 else 1e-3
                    assert torch.allclose(x, x_ref, rtol=tol), (k, seed)
                    assert bool(((x * (Gt @ x)) >= 1 - tol).all())


# ---------------------------------------------------------------------------------------------
# Host reads: at most one per iteration (CPU), counted like tests/test_conformance.py
# ---------------------------------------------------------------------------------------------

_HOST_READS = frozenset({torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
                         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.cpu})


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.factorisations = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.reads += 1
        if func is torch.linalg.cholesky_ex:
            self.factorisations += 1
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_iteration() -> None:
    G = gramian("square", 40, 0, torch.float32)
    Gu = G / G.trace() + 1e-4 * torch.eye(40)
    for fn, extra in [
        (lambda: N.min_norm_point(G), 1),
        (lambda: N.project_to_dual_cone(Gu, torch.eye(40) / 40), 1),
        (lambda: N.power_equation(G, 1.0), 0),
        (lambda: N.cagrad_weights(G, 0.5), 4),
    ]:
        with _Counter() as c:
            fn()
        # one read per factorisation (= iteration), plus a few set-up tests
        assert c.reads <= c.factorisations + extra, (c.reads, c.factorisations)


def test_accelerator_code_path_on_cpu(monkeypatch) -> None:
    """The branch-free iterations (convergence tested every 4 iterations) used on
    accelerators give the results of the CPU path."""
    cases = []
    for kind in ("square", "spread", "low_rank", "opposite"):
        for dtype in DTYPES:
            G = gramian(kind, 12, 0, dtype)
            Gu = G / G.trace() + 1e-4 * torch.eye(12, dtype=dtype)
            cases.append((G, Gu, torch.eye(12, dtype=dtype) / 12))

    def run():
        out = []
        for G, Gu, U in cases:
            out.append(N.min_norm_point(G))
            out.append(N.project_to_dual_cone(Gu, U))
            out.append(N.cagrad_weights(G, 0.5))
            a, ok = N.power_equation(G, 1.0)
            out += [a, ok]
        return out

    cpu = run()
    monkeypatch.setattr(N, "_check_every", lambda device: 4)
    monkeypatch.setattr(N, "_host_branching", lambda device: False)
    with _Counter() as c:
        accel = run()
    for a, b in zip(cpu, accel, strict=True):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            tol = 1e-12 if a.dtype == torch.float64 else 1e-5
            assert torch.allclose(a, b, rtol=tol, atol=tol)
    with _Counter() as c_cpu:
        monkeypatch.undo()
        run()
    assert c.reads < c_cpu.reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for dtype in DTYPES:
        G = gramian("square", 40, 0, dtype)
        Gc = G.cuda()
        Gu = G / G.trace() + 1e-4 * torch.eye(40, dtype=dtype)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-3,
                                                                              atol=1e-5)
        assert torch.allclose(N.min_norm_point(Gc).cpu(), N.min_norm_point(G), **tol)
        U = torch.eye(40, dtype=dtype) / 40
        assert torch.allclose(N.project_to_dual_cone(Gu.cuda(), U.cuda()).cpu(),
                              N.project_to_dual_cone(Gu, U), **tol)
        assert torch.allclose(N.cagrad_weights(Gc, 0.5).cpu(), N.cagrad_weights(G, 0.5), **tol)
        a, ok = N.power_equation(Gc, 1.0)
        assert bool(ok) and torch.allclose(a.cpu(), N.power_equation(G, 1.0)[0], **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_two_task_closed_form_matches_barrier(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K=2 with one constraint active: the closed-form KKT point is the barrier method's
    solution (computed in float64 with the closed form switched off)."""
    g = torch.Generator().manual_seed(0)
    compared = 0
    for trial in range(300):
        A = torch.randn(2, 5, generator=g, dtype=torch.float64)
        if trial % 3 == 0:  # strongly conflicting pairs, as near a Pareto front
            A[1] = -0.9 * A[0] + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
        G64 = A @ A.T
        G64 = G64 / torch.linalg.matrix_norm(G64)
        c64 = torch.rand(2, generator=g, dtype=torch.float64) * 3 + 0.01
        x_star64, ok = N.power_equation(G64, 1.0)
        if not bool(ok):
            continue
        Gt, c = G64.to(dtype), c64.to(dtype)
        x_closed = N._nash_subproblem_one_active(Gt, c, N._eps(dtype))
        if x_closed is None:
            continue
        with monkeypatch.context() as m:
            m.setattr(N, "_nash_subproblem_one_active", lambda *a: None)
            x_bar, ok_bar = N.nash_cccp_subproblem(G64, c64, x_star64)
        assert bool(ok_bar), trial
        tol = 1e-7 if dtype == torch.float64 else 2e-3
        assert torch.allclose(x_closed.double(), x_bar, rtol=tol), (trial, x_closed, x_bar)
        compared += 1
    assert compared >= 20
