"""Property tests (hypothesis): what each method's paper claims, on generated Jacobians.

Already covered in ``test_balancers_losses.py`` (not repeated here): PCGrad's ``K = 2`` claim
(the direction conflicts with neither task gradient), GradDrop's one-sign-per-coordinate, the
scale invariance of ``si`` and of IMTL (loss scales + IMTL-G).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import polytask.balancers as B
from polytask.balancers._solvers import power_equation, project_to_simplex

F64 = torch.float64
# Deterministic in the default run (CI); PT_EXAMPLES=400 explores more (and other) examples.
SETTINGS = settings(
    max_examples=int(os.environ.get("PT_EXAMPLES", "40")),
    deadline=None,
    derandomize="PT_EXAMPLES" not in os.environ,
)

entry = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, width=64)
scale = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)


@st.composite
def jacobians(draw, k_min=2, k_max=4, full_rank=False, p_max=6):
    """A ``[K, P]`` Jacobian; ``full_rank``: ``P >= K`` and reasonably conditioned rows."""
    k = draw(st.integers(k_min, k_max))
    p = draw(st.integers(k if full_rank else 1, p_max))
    vals = draw(st.lists(entry, min_size=k * p, max_size=k * p))
    jac = torch.tensor(vals, dtype=F64).reshape(k, p)
    if full_rank:
        s = torch.linalg.svdvals(jac)
        assume(s.amin() > 1e-3 * max(1.0, float(s.amax())))
    else:
        assume(jac.abs().amax() > 1e-3)
    return jac


def _row_scales(draw_scales, k):
    return torch.tensor(draw_scales[:k], dtype=F64)


# ------------------------------------------------------------------------------------------------
# MGDA: the min-norm point of the convex hull
# ------------------------------------------------------------------------------------------------
def _scipy_min_norm(gram: np.ndarray) -> np.ndarray:
    """Cross-check: the simplex QP min w^T G w solved by scipy's SLSQP."""
    k = gram.shape[0]
    res = minimize(
        lambda w: w @ gram @ w,
        np.full(k, 1.0 / k),
        jac=lambda w: 2 * gram @ w,
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return res.x


@SETTINGS
@given(jacobians(k_max=5))
def test_mgda_is_the_min_norm_point_of_the_convex_hull(jac):
    b = B.create("mgda", jac.shape[0])
    d = b.combine(jac)
    w = b.last_weights
    scale2 = float(jac.norm(dim=1).amax()) ** 2
    # w on the simplex, d = w @ J
    assert bool((w >= -1e-12).all()) and abs(float(w.sum()) - 1.0) < 1e-9
    torch.testing.assert_close(d, w @ jac)
    # KKT of min ||w @ J||^2 on the simplex: g_i . d >= |d|^2, with equality on the support
    dots = jac @ d
    dd = float(d @ d)
    assert bool((dots >= dd - 1e-9 * scale2).all()), (dots, dd)
    support = w > 1e-6
    torch.testing.assert_close(dots[support], torch.full_like(dots[support], dd),
                               rtol=0, atol=1e-8 * scale2)
    # cross-check with scipy's solution x (a point of the hull, as accurate as SLSQP gets):
    # ours is no longer, and ||x - d||^2 <= ||x||^2 - ||d||^2, which holds for every point x of
    # the hull exactly when d is its min-norm point ((x - d) . d >= 0)
    w_ref = np.clip(_scipy_min_norm((jac @ jac.T).numpy()), 0.0, None)
    d_ref = torch.from_numpy(w_ref / w_ref.sum()) @ jac
    xx = float(d_ref @ d_ref)
    assert dd <= xx + 1e-9 * scale2
    assert float((d_ref - d) @ (d_ref - d)) <= xx - dd + 1e-9 * scale2


@SETTINGS
@given(jacobians(), st.lists(scale, min_size=5, max_size=5), scale)
def test_mgda_scaling(jac, scales, c):
    """Common scaling: the direction scales with it (weights unchanged). Per-task scaling:
    with grad_norm="l2" (normalised gradients, as the official code allows) nothing changes."""
    k = jac.shape[0]
    torch.testing.assert_close(
        B.create("mgda", k).combine(c * jac), c * B.create("mgda", k).combine(jac),
        rtol=1e-6, atol=1e-9 * c * float(jac.abs().amax()),
    )
    assume(bool((jac.norm(dim=1) > 1e-3).all()))
    cs = _row_scales(scales, k)
    a = B.create("mgda", k, grad_norm="l2").combine(cs[:, None] * jac)
    b = B.create("mgda", k, grad_norm="l2").combine(jac)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# PCGrad for K > 2
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(k_min=3, k_max=5))
def test_pcgrad_projected_gradient_agrees_with_last_task_it_visited(jac):
    """For K > 2 the guarantee is per task and weaker: each projected gradient g_i^PC does not
    conflict with the *last* task in its visiting order (projecting onto a later task's normal
    plane can re-create a conflict with an earlier one; see the next test)."""
    k = jac.shape[0]
    pc = B.create("pcgrad", k, order="index")
    coeffs = pc.projection_coefficients(jac @ jac.T)
    projected = coeffs @ jac
    scale2 = float(jac.norm(dim=1).amax()) ** 2
    for i in range(k):
        last = k - 1 if i != k - 1 else k - 2
        assert float(projected[i] @ jac[last]) >= -1e-9 * scale2 * (1 + float(coeffs.abs().amax()))
    torch.testing.assert_close(pc.combine(jac), projected.sum(0))


def test_pcgrad_k3_direction_can_conflict():
    """What does *not* hold for K > 2: the summed direction may conflict with a task."""
    jac = torch.tensor([[-0.9081, 0.5423], [0.1103, -2.2590], [0.6067, -0.1383]], dtype=F64)
    d = B.create("pcgrad", 3, order="index").combine(jac)
    assert float(jac[0] @ d) < -0.5


# ------------------------------------------------------------------------------------------------
# UPGrad / DualProj: non-conflicting
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(k_max=5), st.sampled_from(["upgrad", "dualproj"]))
def test_upgrad_dualproj_are_non_conflicting(jac, name):
    """J d >= 0. With the regularised Gramian G~ = G / tr(G) + eps I the projection satisfies
    G~ w >= 0, i.e. J d >= -eps tr(G) w: that is the exact tolerance (plus rounding)."""
    b = B.create(name, jac.shape[0])
    d = b.combine(jac)
    w = b.last_weights
    trace = float(torch.trace(jac @ jac.T))
    bound = -1e-4 * trace * w.abs() - 1e-10 * trace
    assert bool((jac @ d >= bound).all()), (jac @ d, bound)


@SETTINGS
@given(jacobians(k_max=5), st.sampled_from(["upgrad", "dualproj", "aligned_mtl"]), scale)
def test_linear_under_scaling(jac, name, c):
    k = jac.shape[0]
    torch.testing.assert_close(
        B.create(name, k).combine(c * jac), c * B.create(name, k).combine(jac),
        rtol=1e-6, atol=1e-9 * c * float(jac.abs().amax()),
    )


# ------------------------------------------------------------------------------------------------
# IMTL-G: equal projections on the normalised task gradients; invariant to the task scales
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(full_rank=True), st.lists(scale, min_size=4, max_size=4))
def test_imtl_g_equal_projections_and_scale_invariance(jac, scales):
    k = jac.shape[0]
    b = B.create("imtl_g", k)
    d = b.combine(jac)
    assert abs(float(b.last_weights.sum()) - 1.0) < 1e-9
    units = jac / jac.norm(dim=1, keepdim=True)
    proj = units @ d
    torch.testing.assert_close(proj, proj.mean().expand(k), rtol=1e-7,
                               atol=1e-9 * float(jac.norm(dim=1).amax()))
    d2 = B.create("imtl_g", k).combine(_row_scales(scales, k)[:, None] * jac)
    cos = (d @ d2) / (d.norm() * d2.norm())
    # the same line whatever the task scales; the normalisation sum(w) = 1 fixes its length and
    # sign, and that sign can flip with the scales (the common projection may be negative)
    assert abs(abs(float(cos)) - 1.0) < 1e-8


# ------------------------------------------------------------------------------------------------
# Nash-MTL / FairGrad: the bargaining equations
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(full_rank=True), st.floats(0.3, 4.0))
def test_power_equation_solves_the_bargaining_equations(jac, p):
    """The torch solver behind FairGrad (any p) and Nash-MTL (p = 1): G a = a^(-1/p), a > 0."""
    gram = jac @ jac.T
    a, ok = power_equation(gram, p)
    assert bool(ok) and bool((a > 0).all())
    torch.testing.assert_close(gram @ a, a.pow(-1.0 / p), rtol=1e-7, atol=0)


@SETTINGS
@given(jacobians(full_rank=True), st.floats(0.5, 3.0))
def test_fairgrad_weights_solve_its_equation(jac, alpha):
    b = B.create("fairgrad", jac.shape[0], alpha=alpha)
    b.combine(jac)
    w = b.last_weights
    torch.testing.assert_close((jac @ jac.T) @ w, w.pow(-1.0 / alpha), rtol=1e-7, atol=0)


@st.composite
def non_conflicting(draw):
    """Full-rank Jacobians whose task gradients do not conflict pairwise (G >= 0), rotated."""
    k = draw(st.integers(2, 4))
    p = draw(st.integers(k, 6))
    vals = draw(st.lists(st.floats(0.0, 10.0), min_size=k * p, max_size=k * p))
    a = torch.tensor(vals, dtype=F64).reshape(k, p)
    s = torch.linalg.svdvals(a)
    assume(s.amin() > 1e-2 * max(1.0, float(s.amax())))
    seed = draw(st.integers(0, 2**16))
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed),
                                       dtype=F64))
    return a @ q


@SETTINGS
@given(non_conflicting(), st.lists(scale, min_size=4, max_size=4))
def test_nash_mtl_weights_satisfy_bargaining_equations(jac, scales):
    """Where the official convex-concave procedure converges to the bargaining point -- here on
    pairwise non-conflicting gradients, where its first subproblem is solved there -- the
    weights (max_norm=0: no rescaling) solve a_i (G a)_i = 1, and the direction is invariant to
    the scale of each task's gradient (Navon et al., ICML 2022, Section 3). On conflicting
    gradients the reference's stopping rules can end elsewhere; the implementation keeps them."""
    k = jac.shape[0]
    b = B.create("nash_mtl", k, max_norm=0.0)
    d = b.combine(jac)
    a = b.last_weights
    assert bool(b.solve_ok)
    torch.testing.assert_close(a * ((jac @ jac.T) @ a), torch.ones(k, dtype=F64), rtol=0,
                               atol=1e-8)
    d2 = B.create("nash_mtl", k, max_norm=0.0).combine(_row_scales(scales, k)[:, None] * jac)
    torch.testing.assert_close(d2, d, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# MoDo / SDMGrad: weights stay on the simplex; the simplex projection is the Euclidean one
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=8))
def test_project_to_simplex_is_the_euclidean_projection(vals):
    v = torch.tensor(vals, dtype=F64)
    p = project_to_simplex(v)
    assert bool((p >= 0).all()) and abs(float(p.sum()) - 1.0) < 1e-9
    # KKT: p = max(v - theta, 0) for one theta, i.e. v - p is constant on the support
    # and v <= theta off it
    theta = (v - p)[p > 0]
    torch.testing.assert_close(theta, theta[0].expand_as(theta), rtol=0, atol=1e-9)
    assert bool((v[p == 0] <= theta[0] + 1e-9).all())


@SETTINGS
@given(jacobians(), st.sampled_from(["modo", "sdmgrad"]), st.integers(1, 4))
def test_stochastic_methods_keep_simplex_weights(jac, name, steps):
    k = jac.shape[0]
    b = B.create(name, k)
    for s in range(steps):
        b.combine(jac * (1 + 0.5 * s))
        lam = b.lambd if name == "modo" else b.w
        assert bool((lam >= 0).all()) and abs(float(lam.sum()) - 1.0) < 1e-9


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_stochastic_methods_reach_the_min_norm_weights_on_one_batch(name):
    """With every batch equal, MoDo's and SDMGrad's (lamda=0) weight iterations are projected
    gradient descent on 1/2 ||w @ J||^2 (plus MoDo's rho/2 ||w||^2): with a step size below the
    stability limit, many steps reach MGDA's weights. (SDMGrad's reference step size, 10 on the
    normalised Gramian, is far above that limit: its inner loop is a rough solver.)"""
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 5, generator=g, dtype=F64)
    ref = B.create("mgda", 3)
    ref.combine(jac)
    hp = (
        {"gamma": 0.05, "rho": 0.0}
        if name == "modo"
        else {"lamda": 0.0, "max_norm": 0.0, "lr": 0.2}
    )
    b = B.create(name, 3, **hp)
    for _ in range(300):
        b.combine(jac)
    lam = b.lambd if name == "modo" else b.w
    torch.testing.assert_close(lam, ref.last_weights, rtol=0, atol=1e-5)
