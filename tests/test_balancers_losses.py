"""Hand-computed cases and property tests for the loss weightings and gradient methods."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polytask.balancers as B
from polytask.balancers._losses import _kmeans_1d

F64 = torch.float64


def t(*rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, **kw):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), **kw)


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------
finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
positive = st.floats(0.05, 20.0, allow_nan=False, allow_infinity=False)


@st.composite
def jacobians(draw, k=None, p=None):
    k = draw(st.integers(2, 4)) if k is None else k
    p = draw(st.integers(2, 6)) if p is None else p
    vals = draw(st.lists(finite, min_size=k * p, max_size=k * p))
    return torch.tensor(vals, dtype=F64).reshape(k, p)


# ------------------------------------------------------------------------------------------------
# uw / imtl_l
# ------------------------------------------------------------------------------------------------
def test_uw_weights_and_objective_gradient():
    b = B.create("uw", 2)
    close(b.log_vars.detach(), [-0.5, -0.5])
    losses = t(1.0, 2.0).requires_grad_(True)
    obj = b.objective(losses)
    close(obj, (losses.detach() * math.exp(0.5) / 2 - 0.25).sum())
    obj.backward()
    # d/ds [L / (2 e^s) + s / 2] = 1/2 - L / (2 e^s)
    close(b.log_vars.grad, [0.5 - 1.0 * math.exp(0.5) / 2, 0.5 - 2.0 * math.exp(0.5) / 2])
    close(losses.grad, [math.exp(0.5) / 2] * 2)
    close(b.last_weights, [math.exp(0.5) / 2] * 2)
    jac = t([1.0, 0.0], [0.0, 1.0])
    close(b.combine(jac, losses.detach()), [math.exp(0.5) / 2] * 2)


def test_uw_learns_inverse_loss_scale():
    b = B.create("uw", 2)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    losses = t(0.5, 4.0)
    for _ in range(500):
        opt.zero_grad()
        b.objective(losses).backward()
        opt.step()
    # optimum: exp(s) = L  ->  weights 1 / (2 L)
    close(b.weights(losses), 1 / (2 * losses), rtol=1e-3, atol=1e-4)


def test_imtl_l_objective_gradient():
    b = B.create("imtl_l", 3)
    losses = t(0.5, 1.0, 3.0)
    b.objective(losses).backward()
    close(b.loss_scale.grad, losses - 1)  # exp(s) L - 1 at s = 0
    close(b.last_weights, [1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# dwa
# ------------------------------------------------------------------------------------------------
def test_dwa_weights_after_two_epochs():
    b = B.create("dwa", 2)
    # epoch 0: losses average [2, 1]
    close(b.weights(t(3.0, 1.0)), [1.0, 1.0])
    close(b.weights(t(1.0, 1.0)), [1.0, 1.0])
    b.epoch_end()
    # epoch 1: average [1, 1]
    close(b.weights(t(1.0, 1.0)), [1.0, 1.0])
    b.epoch_end()
    assert b.current_epoch == 2
    # epoch 2: r = a_1 / a_0 = [0.5, 1]; w = 2 softmax(r / 2)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]
    close(b.weights(t(9.0, 9.0)), expected)
    jac = t([1.0, 0.0], [0.0, 1.0])
    close(b.combine(jac, t(1.0, 1.0)), expected)
    close(b.last_weights, expected)


def test_dwa_steps_per_epoch_and_noop_epoch_end():
    a = B.create("dwa", 2, steps_per_epoch=2)
    for losses in [t(3.0, 1.0), t(1.0, 1.0)]:
        a.weights(losses)
    assert a.current_epoch == 1
    a.epoch_end()  # no step since the automatic close: no-op
    assert a.current_epoch == 1
    for losses in [t(1.0, 1.0), t(1.0, 1.0)]:
        a.weights(losses)
    assert a.current_epoch == 2
    e1, e2 = math.exp(0.25), math.exp(0.5)
    close(a.weights(t(1.0, 1.0)), [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


# ------------------------------------------------------------------------------------------------
# rlw / gls / si
# ------------------------------------------------------------------------------------------------
def test_rlw_is_softmax_of_normal_draws_from_global_rng():
    torch.manual_seed(11)
    expected = torch.softmax(torch.randn(4), dim=-1)
    torch.manual_seed(11)
    w = B.create("rlw", 4).weights(None)
    close(w, expected)
    close(w.sum(), 1.0)


def test_gls_weights_are_geometric_mean_gradient():
    b = B.create("gls", 2)
    losses = t(1.0, 4.0).requires_grad_(True)
    obj = b.objective(losses)
    close(obj, 2.0)  # sqrt(1 * 4)
    (grad,) = torch.autograd.grad(obj, losses)
    close(grad, [1.0, 0.25])  # GM / (K L_i)
    close(b.last_weights, [1.0, 0.25])


def test_si_weights_and_objective():
    b = B.create("si", 2)
    losses = t(0.5, 4.0).requires_grad_(True)
    obj = b.objective(losses)
    close(obj, math.log(2.0))
    (grad,) = torch.autograd.grad(obj, losses)
    close(grad, [2.0, 0.25])


@settings(max_examples=50, deadline=None)
@given(
    jacobians(k=3),
    st.lists(positive, min_size=3, max_size=3),
    st.lists(positive, min_size=3, max_size=3),
)
def test_si_is_scale_invariant(jac, losses, scales):
    losses, c = torch.tensor(losses, dtype=F64), torch.tensor(scales, dtype=F64)
    b = B.create("si", 3)
    close(b.combine(c[:, None] * jac, c * losses), b.combine(jac, losses), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# famo
# ------------------------------------------------------------------------------------------------
def test_famo_weight_update_from_known_loss_decrease():
    b = B.create("famo", 2)
    w = b.weights(t(1.0, 1.0))
    close(w, [0.5, 0.5])
    b.after_step(t(0.5, 1.0))  # task 0 improved by log 2, task 1 did not
    delta = torch.log(t(1.0 + 1e-8, 1.0 + 1e-8)) - torch.log(t(0.5 + 1e-8, 1.0 + 1e-8))
    z = t(0.5, 0.5)
    d = z * (delta - (z * delta).sum())  # softmax VJP: about [+log2/4, -log2/4]
    close(d, [math.log(2) / 4, -math.log(2) / 4], atol=1e-7, rtol=0)
    # first Adam step (zero logits, so no weight decay): logits = -lr * g / (|g| + eps)
    expected_logits = -0.025 * d / (d.abs() + 1e-8)
    close(b.logits, expected_logits, rtol=1e-6, atol=1e-9)
    # the task that improved now gets less weight
    w = b.weights(t(1.0, 1.0))
    close(w, torch.softmax(expected_logits, dim=-1), rtol=1e-6, atol=1e-9)
    assert w[0] < w[1]


def test_famo_after_step_needs_a_previous_step():
    with pytest.raises(RuntimeError):
        B.create("famo", 2).after_step(t(1.0, 1.0))


def test_famo_weights_sum_to_one_and_favour_small_gaps():
    w = B.create("famo", 3).weights(t(1.0, 2.0, 4.0))
    close(w.sum(), 1.0)
    close(w, t(4.0, 2.0, 1.0) / 7, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# stch
# ------------------------------------------------------------------------------------------------
def test_stch_warmup_nadir_and_smooth_phase():
    b = B.create("stch", 2, warmup_epoch=1, steps_per_epoch=2)
    # epoch 0: log-loss weights
    close(b.weights(t(0.5, 2.0)), [2.0, 0.5])
    b.weights(t(1.0, 1.0))
    # epoch 1 (the warm-up epoch): still log weights, its average is the nadir
    b.weights(t(1.0, 4.0))
    b.weights(t(3.0, 2.0))
    close(b.nadir, [2.0, 3.0])
    # epoch 2: with mu = 1, w_i = K softmax(log(L/n))_i / L_i = K / (n_i sum_j L_j / n_j)
    losses = t(1.0, 6.0)
    s = 1.0 / 2.0 + 6.0 / 3.0
    close(b.weights(losses), [2 / (2.0 * s), 2 / (3.0 * s)], rtol=1e-9, atol=1e-12)


def test_stch_defaults_follow_official_code():
    assert B.info("stch").hparams["mu"] == 1.0
    assert B.info("stch").hparams["warmup_epoch"] == 4


# ------------------------------------------------------------------------------------------------
# go4align
# ------------------------------------------------------------------------------------------------
def test_go4align_single_group_weight():
    b = B.create("go4align", 2)
    losses = t(1.0, 3.0)
    scale = t(4.0, 4.0 / 3.0)
    p = t(0.5 * math.exp(-1e-4), 0.5 * math.exp(-3e-4))
    p = p / p.sum()
    expected = (scale * p).mean()
    close(b.weights(losses), [expected, expected])
    close(b.probs, p)


def test_go4align_groups():
    assert _kmeans_1d([1.0, 5.0, 1.1, 5.2], 2) in ([0, 1, 0, 1], [1, 0, 1, 0])
    assert _kmeans_1d([3.0, 1.0, 2.0], 3) == [2, 0, 1]
    b = B.create("go4align", 4, num_groups=2)
    w = b.weights(t(1.0, 1.01, 10.0, 10.1))
    # tasks with similar indicators share their group's mean weight
    close(w[0], w[1])
    close(w[2], w[3])
    assert w[0] > w[2]


# ------------------------------------------------------------------------------------------------
# excess_mtl
# ------------------------------------------------------------------------------------------------
def test_excess_mtl_first_step():
    b = B.create("excess_mtl", 2)
    jac = t([1.0, 0.0], [0.0, 2.0])
    out = b.combine(jac)
    risk = t(1.0 / math.sqrt(1.0 + 1e-7), 4.0 / math.sqrt(4.0 + 1e-7))
    w = torch.softmax(torch.log(t(0.5, 0.5)) + risk, dim=0)
    close(b.last_weights, w)
    close(out, w @ jac)


# ------------------------------------------------------------------------------------------------
# pcgrad
# ------------------------------------------------------------------------------------------------
def test_pcgrad_orthogonal_rows_untouched():
    jac = t([1.0, 0.0], [0.0, 2.0])
    close(B.create("pcgrad", 2).combine(jac), [1.0, 2.0])


def test_pcgrad_opposite_rows_cancel():
    jac = t([1.0, 2.0], [-1.0, -2.0])
    close(B.create("pcgrad", 2).combine(jac), [0.0, 0.0])


def test_pcgrad_hand_case():
    jac = t([1.0, 0.0], [-1.0, 1.0])
    # g1' = g1 + g2 / 2 = [0.5, 0.5], g2' = g2 + g1 = [0, 1]
    b = B.create("pcgrad", 2, order="index")
    close(b.combine(jac), [0.5, 1.5])
    close(b.last_weights, [2.0, 1.5])


@settings(max_examples=100, deadline=None)
@given(jacobians(k=2), st.sampled_from(["random", "index"]))
def test_pcgrad_k2_no_conflict_with_projected_tasks(jac, order):
    d = B.create("pcgrad", 2, order=order).combine(jac)
    for g in jac:
        assert float(d @ g) >= -1e-9 * (1 + float(d.norm() * g.norm()))


# ------------------------------------------------------------------------------------------------
# graddrop
# ------------------------------------------------------------------------------------------------
def test_graddrop_pure_signs_keep_everything():
    jac = t([1.0, -2.0, 0.0], [3.0, -1.0, 0.5])
    close(B.create("graddrop", 2).combine(jac), jac.sum(0))


@settings(max_examples=50, deadline=None)
@given(jacobians())
def test_graddrop_keeps_one_sign_per_coordinate(jac):
    out = B.create("graddrop", jac.shape[0]).combine(jac)
    pos = jac.clamp(min=0).sum(0)
    neg = jac.clamp(max=0).sum(0)
    ok = torch.isclose(out, pos) | torch.isclose(out, neg)
    assert bool(ok.all())


def test_graddrop_keeps_positive_sign_with_probability_purity():
    torch.manual_seed(0)
    b = B.create("graddrop", 2)
    jac = t([3.0], [-1.0])  # purity 0.5 (1 + 2 / 4) = 0.75
    kept = sum(float(b.combine(jac)[0]) > 0 for _ in range(4000)) / 4000
    assert abs(kept - 0.75) < 0.03


def test_graddrop_leak():
    torch.manual_seed(0)
    jac = t([3.0], [-1.0])
    out = B.create("graddrop", 2, leak=1.0).combine(jac)
    close(out, [2.0])


# ------------------------------------------------------------------------------------------------
# gradvac
# ------------------------------------------------------------------------------------------------
def test_gradvac_first_call_matches_pcgrad_for_two_tasks():
    jac = t([1.0, 0.0], [-1.0, 1.0])
    b = B.create("gradvac", 2, order="index")
    close(b.combine(jac), [0.5, 1.5], atol=1e-6, rtol=0)
    cos = -1 / math.sqrt(2)
    close(b.phi_hat, [[0.0, 0.5 * cos], [0.5 * cos, 0.0]], atol=1e-7, rtol=0)


def test_gradvac_raises_cosine_to_target():
    b = B.create("gradvac", 2, order="index", beta=1.0)
    b.combine(t([1.0, 0.0], [1.0, 1.0]))  # targets become cos 45 deg
    jac = t([1.0, 0.0], [0.0, 1.0])  # orthogonal now: below target
    b.combine(jac)
    w = b.last_weights
    # corrected g_0 = g_0 + c g_1 has cosine 1/sqrt(2) with g_1: c = 1
    close(w, [2.0, 2.0], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# imtl
# ------------------------------------------------------------------------------------------------
def test_imtl_equal_projections_and_loss_scale_gradient():
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 6, generator=g, dtype=F64)
    losses = t(0.5, 1.0, 2.0)
    b = B.create("imtl", 3)
    d = b.combine(jac, losses)
    units = jac / jac.norm(dim=1, keepdim=True)
    proj = units @ d
    close(proj, proj[0].expand(3), rtol=1e-9, atol=1e-12)
    close(b.last_weights.sum(), 1.0)
    close(b.loss_scale.grad, losses - 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(positive, min_size=3, max_size=3))
def test_imtl_g_direction_is_scale_invariant(scales):
    g = torch.Generator().manual_seed(1)
    jac = torch.randn(3, 5, generator=g, dtype=F64)
    losses = t(1.0, 1.0, 1.0)
    c = torch.tensor(scales, dtype=F64)
    d1 = B.create("imtl", 3).combine(jac, losses)
    d2 = B.create("imtl", 3).combine(c[:, None] * jac, losses)
    cos = (d1 @ d2) / (d1.norm() * d2.norm())
    close(cos.abs(), 1.0, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# db_mtl / moco
# ------------------------------------------------------------------------------------------------
def test_db_mtl_first_step():
    b = B.create("db_mtl", 2)
    out = b.combine(t([3.0, 0.0], [0.0, 1.0]), t(1.0, 1.0))
    # buffer = 0.1 J / (L + 1e-8); norms [0.3, 0.1]; alpha = [1, 3]
    close(b.last_weights, [1.0, 3.0], rtol=1e-6, atol=0)
    close(out, [0.3, 0.3], rtol=1e-6, atol=0)


def test_moco_first_step():
    b = B.create("moco", 2)
    out = b.combine(t([1.0, 0.0], [0.0, 1.0]), t(1.0, 2.0))
    lam = torch.softmax(t(0.5 - 0.1 * 0.25 * 0.5, 0.5 - 0.1 * 1.0 * 0.5), dim=-1)
    close(b.last_weights, lam, rtol=1e-6, atol=0)
    close(out, lam * t(0.5, 1.0), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# gradnorm
# ------------------------------------------------------------------------------------------------
def test_gradnorm_weight_gradient_and_renormalisation():
    b = B.create("gradnorm", 2)
    jac = t([1.0, 0.0], [0.0, 2.0])
    out = b.combine(jac, t(1.0, 1.0))
    close(out, [1.0, 2.0])
    # G = [1, 2], target = mean(G) r^alpha = 1.5: grad = sign(G - target) |J_i|
    close(b.loss_weights.grad, [-1.0, 2.0])
    with torch.no_grad():
        b.loss_weights.copy_(torch.tensor([1.0, 3.0]))
    out = b.combine(jac, t(1.0, 1.0))
    close(b.loss_weights.detach(), [0.5, 1.5])
    close(out, [0.5, 3.0])


def test_gradnorm_relative_rates_use_first_losses():
    b = B.create("gradnorm", 2, alpha=1.0)
    jac = t([1.0, 0.0], [0.0, 1.0])
    b.combine(jac, t(2.0, 2.0))
    b.loss_weights.grad = None
    b.combine(jac, t(1.0, 3.0))  # rates [0.5, 1.5] -> targets [0.5, 1.5]; G = [1, 1]
    close(b.loss_weights.grad, [1.0, -1.0])


# ------------------------------------------------------------------------------------------------
# cr_mogm / compose / partition
# ------------------------------------------------------------------------------------------------
def test_cr_mogm_smooths_base_weights():
    torch.manual_seed(4)
    w1 = torch.softmax(torch.randn(3), -1)
    w2 = torch.softmax(torch.randn(3), -1)
    torch.manual_seed(4)
    b = B.create("cr_mogm", 3, base="rlw", alpha=0.9)
    jac = torch.eye(3, dtype=F64)
    close(b.combine(jac, t(1.0, 1.0, 1.0)), w1)
    close(b.combine(jac, t(1.0, 1.0, 1.0)), 0.9 * w1 + 0.1 * w2)


def test_cr_mogm_rejects_non_weighting_and_forwards_protocol():
    with pytest.raises(ValueError, match="weighting"):
        B.create("cr_mogm", 2, base="graddrop")
    b = B.create("cr_mogm", 2, base="famo")
    assert "loss_after_step" in b.info.protocol
    b.combine(t([1.0, 0.0], [0.0, 1.0]), t(1.0, 1.0))
    b.after_step(t(0.5, 1.0))
    assert b.base.logits[0] < 0


def test_compose_uw_pcgrad():
    uw = B.create("uw", 2)
    composed = B.compose(uw, B.create("pcgrad", 2, order="index"))
    jac = t([1.0, 0.0], [-1.0, 1.0])
    losses = t(1.0, 2.0)
    out = composed.combine(jac, losses)
    w = math.exp(0.5) / 2
    close(out, B.create("pcgrad", 2, order="index").combine(w * jac))
    # UW's log-variances got the gradient UW's own objective would give them
    close(uw.log_vars.grad, 0.5 - losses * math.exp(0.5) / 2)
    assert composed.info.learnable and composed.info.needs == "jacobian"
    assert set(dict(composed.named_parameters())) == {"loss_weighting.log_vars"}


def test_compose_by_name_and_hooks():
    composed = B.compose("famo", "pcgrad", n_tasks=2)
    assert composed.info.protocol == ("loss_after_step",)
    composed.combine(t([1.0, 0.0], [0.0, 1.0]), t(1.0, 1.0))
    composed.after_step(t(0.5, 1.0))
    assert composed.loss_weighting.logits[0] < 0
    with pytest.raises(ValueError):
        B.compose("pcgrad", "pcgrad", n_tasks=2)


def test_partition_balances_blocks_separately():
    g = torch.Generator().manual_seed(2)
    jac = torch.randn(3, 7, generator=g, dtype=F64)
    part = B.partition(lambda: B.create("pcgrad", 3, order="index"), [3, 4])
    out = part.combine(jac)
    ref = B.create("pcgrad", 3, order="index")
    close(out, torch.cat([ref.combine(jac[:, :3]), ref.combine(jac[:, 3:])]))
    assert part.last_weights.shape == (2, 3)
    with pytest.raises(ValueError, match="columns"):
        part.combine(jac[:, :6])


def test_partition_state_dict_round_trip():
    part = B.partition(lambda: B.create("db_mtl", 2), [2, 1])
    losses = t(1.0, 2.0)
    for s in range(3):
        part.combine(torch.full((2, 3), float(s + 1), dtype=F64), losses)
    fresh = B.partition(lambda: B.create("db_mtl", 2), [2, 1])
    fresh.load_state_dict(part.state_dict())
    jac = torch.randn(2, 3, dtype=F64)
    close(fresh.combine(jac, losses), part.combine(jac, losses), rtol=0, atol=0)


def test_lazy_buffer_shape_change_is_an_error():
    b = B.create("db_mtl", 2)
    b.combine(torch.ones(2, 3), t(1.0, 1.0, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        b.combine(torch.ones(2, 4), t(1.0, 1.0, dtype=torch.float32))


@pytest.mark.parametrize(
    "name", ["dwa", "famo", "stch", "gls", "si", "go4align", "db_mtl", "moco", "imtl", "gradnorm"]
)
def test_methods_needing_losses_say_so(name):
    with pytest.raises(ValueError, match="losses"):
        B.create(name, 2).combine(torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------
# modo / sdmgrad (multi-batch), against the reference algorithms written out in numpy
# ------------------------------------------------------------------------------------------------
def _ref_projection2simplex(y):
    """The loop of the MoDo reference code (Trade-Off-MOL / LibMTL ``_projection2simplex``)."""
    m = len(y)
    sorted_y = np.sort(y)[::-1]
    tmpsum = 0.0
    tmax_f = (np.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, 0.0)


def _ref_euclidean_proj_simplex(v, s=1):
    """The projection of the SDMGrad reference code (``euclidean_proj_simplex``)."""
    n = v.shape[0]
    if v.sum() == s and np.all(v >= 0):
        return v
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - s))[0][-1]
    theta = float(cssv[rho] - s) / (rho + 1)
    return (v - theta).clip(min=0)


@pytest.mark.parametrize("n_samples", [2, 3])
def test_modo_steps_follow_reference(n_samples):
    g = torch.Generator().manual_seed(3)
    b = B.create("modo", 3, gamma=0.3, rho=0.1, n_samples=n_samples)
    lam = np.full(3, 1 / 3)
    for _ in range(3):
        stack = torch.randn(n_samples, 3, 4, generator=g, dtype=F64)
        out = b.combine(stack)
        j = stack.numpy()
        lam = _ref_projection2simplex(lam - 0.3 * (j[0] @ (j[1].T @ lam) + 0.1 * lam))
        expected = 0.5 * lam @ (j[0] + j[1]) if n_samples == 2 else lam @ j[2]
        close(b.last_weights, lam, rtol=1e-12, atol=1e-14)
        close(out, expected, rtol=1e-12, atol=1e-14)
    assert b.info.n_batches == n_samples


def test_modo_defaults_and_single_batch_form():
    rec = B.info("modo")
    assert rec.hparams == {"gamma": 0.1, "rho": 0.1, "n_samples": 2}
    assert rec.protocol == ("extra_batch",) and rec.n_batches == 2 and rec.stateful
    jac = t([1.0, 0.0], [0.0, 2.0])
    b = B.create("modo", 2)
    out = b.combine(jac)
    lam = _ref_projection2simplex(np.full(2, 0.5) - 0.1 * (np.array([[1.0, 0], [0, 4.0]])
                                                            @ np.full(2, 0.5) + 0.05))
    close(b.last_weights, lam)
    close(out, torch.from_numpy(lam) @ jac)
    with pytest.raises(ValueError, match="n_samples"):
        B.create("modo", 2, n_samples=4)


def _ref_sdmgrad(w, zeta, xi1, xi2, lamda, niter, lr=10.0, momentum=0.5, max_norm=1.0):
    """OptMN-Lab/sdmgrad ``SDMGrad.sdmgrad`` + ``overwrite_grad`` + ``clip_grad_norm_``, in
    numpy (rows are tasks); the diagonal is clamped at 0 as in LibMTL."""
    k = zeta.shape[0]
    gg = xi1 @ xi2.T
    scale = np.mean(np.sqrt(np.clip(np.diag(gg), 0, None) + 1e-4))
    gg = gg / scale**2
    gg_mean = gg.mean(1)
    buf = None
    for _ in range(niter):  # torch.optim.SGD(lr, momentum), a fresh optimiser each call
        grad = gg @ w + lamda * gg_mean
        buf = grad.copy() if buf is None else momentum * buf + grad
        w = _ref_euclidean_proj_simplex(w - lr * buf)
    g = (w @ zeta + lamda * zeta.mean(0)) / (1 + lamda) * k
    norm = np.linalg.norm(g)
    return w, g * min(1.0, max_norm / (norm + 1e-6))


def test_sdmgrad_steps_follow_reference():
    g = torch.Generator().manual_seed(4)
    b = B.create("sdmgrad", 3)
    w = np.full(3, 1 / 3)
    for scale_ in (0.01, 1.0, 0.3):  # small steps: no clipping; large: clipped to max_norm
        stack = scale_ * torch.randn(3, 3, 5, generator=g, dtype=F64)
        out = b.combine(stack)
        z, x1, x2 = stack.numpy()
        w, expected = _ref_sdmgrad(w, z, x1, x2, lamda=0.3, niter=20)
        close(b.w, w, rtol=1e-10, atol=1e-12)
        close(out, expected, rtol=1e-10, atol=1e-12)
    rec = B.info("sdmgrad")
    assert rec.hparams == {"lamda": 0.3, "niter": 20, "lr": 10.0, "momentum": 0.5, "max_norm": 1.0}
    assert rec.n_batches == 3 and rec.modes == ("params",)


def test_simplex_projections_agree_with_references():
    g = np.random.default_rng(0)
    from polytask.balancers._solvers import project_to_simplex

    for _ in range(200):
        v = g.normal(size=int(g.integers(1, 7))) * g.choice([0.1, 1.0, 10.0])
        ours = project_to_simplex(torch.from_numpy(v)).numpy()
        np.testing.assert_allclose(ours, _ref_projection2simplex(v), atol=1e-12)
        np.testing.assert_allclose(ours, _ref_euclidean_proj_simplex(v), atol=1e-12)


def test_gradnorm_norms_on_the_last_shared_layer():
    jac = t([3.0, 0.0, 1.0], [0.0, 4.0, 2.0])
    a = B.create("gradnorm", 2)  # LibMTL's form: all columns, norms [sqrt 10, sqrt 20]
    b = B.create("gradnorm", 2, layer_columns=1)  # the paper's: last layer, norms [1, 2]
    assert B.info("gradnorm").protocol == ("last_shared_layer",)
    a.combine(jac, t(1.0, 1.0))
    b.combine(jac, t(1.0, 1.0))
    # grad of sum |w_i G_i - mean(G)| w.r.t. w at w = 1, targets held: sign(G_i - mean) G_i
    close(b.loss_weights.grad, [-1.0, 2.0])
    close(a.loss_weights.grad, [-math.sqrt(10), math.sqrt(20)])
    with pytest.raises(ValueError, match="exceeds"):
        B.create("gradnorm", 2, layer_columns=4).combine(jac, t(1.0, 1.0))
    part = B.partition(lambda: B.create("gradnorm", 2), [2, 1])
    part.set_last_shared_layer(1)
    assert part.groups[-1].layer_columns == 1 and part.groups[0].layer_columns is None
    with pytest.raises(ValueError, match="spans several groups"):
        part.set_last_shared_layer(2)


def test_trainer_gives_gradnorm_its_last_shared_layer():
    from torch import nn

    import polytask
    from polytask.tasks import Task, TaskSet
    from polytask.trainer import Trainer

    model = polytask.architectures.create(
        "hps", encoder=nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8)),
        heads={"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)},
    )
    tasks = TaskSet([Task.classification("a", 2), Task.regression("b")])
    tr = Trainer(model, tasks, B.create("gradnorm", 2), lambda p: torch.optim.SGD(p, lr=0.1))
    assert tr.balancer.layer_columns == 16 * 8 + 8
    comp = B.compose("uw", "gradnorm", n_tasks=2)
    Trainer(model, tasks, comp, lambda p: torch.optim.SGD(p, lr=0.1))
    assert comp.gradient_method.layer_columns == 16 * 8 + 8
