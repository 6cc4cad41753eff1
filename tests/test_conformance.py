"""One conformance suite run over every registered balancer (``polytask.balancers.available()``).

Each method is created with its default hyperparameters (``HPARAMS`` lists the few exceptions)
and must:

* return a finite ``[P]`` direction of the input dtype on ordinary and degenerate Jacobians (zero,
  colinear, opposite, tiny, huge rows; ``K = 1``) in float32 and float64, over several steps driven
  like the trainer drives them (``after_step`` where the protocol asks for it, ``epoch_end``); a
  method undefined for a single task may refuse ``n_tasks=1`` with a ``ValueError`` when created;
* be deterministic under ``torch.manual_seed``;
* resume identically from a ``state_dict`` loaded into a fresh object;
* reject a Jacobian with the wrong number of rows with a ``ValueError`` naming the shape;
* carry a paper and a description;
* (loss weightings) return an objective whose gradient w.r.t. the losses is ``last_weights``;
* make no more host synchronisations per ``combine`` call than its capability record declares
  (``info.host_syncs``), counted with a :class:`torch.overrides.TorchFunctionMode`;
* (multi-batch methods, protocol ``"extra_batch"``) do all of the above on stacked
  ``[n_batches, K, P]`` Jacobians too, and reject stacks of the wrong shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

import polytask.balancers as B

NAMES = B.available()

# Per-name hyperparameters where the defaults would not exercise the method in a few steps:
# STCH's warm-up is 4 epochs by default (here 0, so the steps reach its smooth phase).
HPARAMS: dict[str, dict] = {"stch": {"warmup_epoch": 0}}

K, P, STEPS = 3, 7, 3


# ------------------------------------------------------------------------------------------------
# host synchronisations
# ------------------------------------------------------------------------------------------------
# Tensor methods that copy a value to the host (each one waits for an accelerator).
_HOST_READS = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
    }
)
# Methods declaring ``host_syncs=None`` run iterative solvers with host-side convergence tests;
# their count depends on the input. For K = 3 it must still stay below this cap (which a
# per-coordinate or per-element host read would exceed at once).
_ITERATIVE_CAP = 400


class HostSyncCounter(TorchFunctionMode):
    """Counts the host reads made while it is active (including those inside torch functions
    that dispatch to Python tensor methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.count += 1
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def make(name: str, n_tasks: int = K) -> B.Balancer:
    return B.create(name, n_tasks, **HPARAMS.get(name, {}))


def _base(dtype: torch.dtype, n_tasks: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n_tasks, P, generator=g, dtype=torch.float64).to(dtype)


def _losses(dtype: torch.dtype, n_tasks: int = K, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(99 + step)
    return (torch.rand(n_tasks, generator=g, dtype=torch.float64) + 0.25).to(dtype)


def _case(kind: str, dtype: torch.dtype) -> torch.Tensor:
    base = _base(dtype)
    v = base[0]
    if kind == "random":
        return base
    if kind == "zero":
        return torch.zeros_like(base)
    if kind == "zero_row":
        out = base.clone()
        out[1] = 0
        return out
    if kind == "colinear":
        return torch.stack([v, 2.5 * v, 0.1 * v])
    if kind == "opposite":
        return torch.stack([v, -v, 3 * v])
    if kind == "tiny":
        return 1e-8 * base
    if kind == "huge":
        return 1e8 * base
    raise AssertionError(kind)


def _step(b: B.Balancer, jac: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """One training step as the trainer drives it, hooks included (every step is an epoch here)."""
    out = b.combine(jac, losses)
    if "loss_after_step" in b.info.protocol:
        b.after_step(losses * 0.9)
    b.epoch_end()
    return out


def _run(b: B.Balancer, jacs: Callable[[int], torch.Tensor], dtype: torch.dtype, steps: int):
    outs = []
    for s in range(steps):
        outs.append(_step(b, jacs(s), _losses(dtype, b.n_tasks, s)))
    return outs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kind", ["random", "zero", "zero_row", "colinear", "opposite", "tiny", "huge"]
)
def test_finite_shape_dtype(name: str, dtype: torch.dtype, kind: str) -> None:
    """... and at most ``info.host_syncs`` host reads per combine call (counted here too)."""
    torch.manual_seed(0)
    b = make(name)
    jac = _case(kind, dtype)
    budget = b.info.host_syncs
    limit = _ITERATIVE_CAP if budget is None else budget
    for s in range(STEPS):
        losses = _losses(dtype, b.n_tasks, s)
        with HostSyncCounter() as counter:
            out = b.combine(jac * (1 + 0.1 * s), losses)
        assert counter.count <= limit, (
            f"{name} made {counter.count} host reads on {kind} ({dtype}), declared "
            f"host_syncs={budget}: {counter.calls}"
        )
        if "loss_after_step" in b.info.protocol:
            b.after_step(losses * 0.9)
        b.epoch_end()
        assert out.shape == (P,)
        assert out.dtype == dtype
        assert torch.isfinite(out).all(), f"{name} on {kind} ({dtype}): {out}"
    if b.last_weights is not None:
        assert torch.isfinite(b.last_weights).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_task(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    try:
        b = make(name, n_tasks=1)
    except ValueError as err:  # a method undefined for one task may refuse it when created
        pytest.skip(f"{name} refuses n_tasks=1: {err}")
    jac = _base(dtype, n_tasks=1)
    for out in _run(b, lambda s: jac * (1 + 0.1 * s), dtype, STEPS):
        assert out.shape == (P,)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()


def _random_jacs(dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    def jac(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(7 + step)
        return torch.randn(K, P, generator=g, dtype=torch.float64).to(dtype)

    return jac


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name: str) -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(_run(make(name), _random_jacs(torch.float64), torch.float64, STEPS))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip(name: str, dtype: torch.dtype) -> None:
    jacs = _random_jacs(dtype)
    torch.manual_seed(5)
    original = make(name)
    for s in range(3):
        _step(original, jacs(s), _losses(dtype, K, s))
    state = copy.deepcopy(original.state_dict())
    rng = torch.get_rng_state()
    expected = [_step(original, jacs(s), _losses(dtype, K, s)) for s in (3, 4)]

    fresh = make(name)
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    got = [_step(fresh, jacs(s), _losses(dtype, K, s)) for s in (3, 4)]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_number_of_rows(name: str) -> None:
    b = make(name)
    jac = torch.randn(K + 1, P)
    with pytest.raises(ValueError, match=rf"\[{K}, P\]|{K + 1} rows|\({K + 1}, {P}\)"):
        b.combine(jac, _losses(torch.float32, K + 1))


@pytest.mark.parametrize("name", NAMES)
def test_info_is_documented(name: str) -> None:
    rec = B.info(name)
    assert rec.name == name
    assert rec.paper.strip()
    assert rec.description.strip()
    assert rec.needs in ("losses", "gramian", "jacobian")
    assert rec.cls.__doc__ and rec.cls.__doc__.strip()


@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(B.info(n).cls, B.LossWeighting)])
def test_loss_weighting_objective_matches_weights(name: str) -> None:
    """The engine backpropagates objective(); its gradient must be the weights combine() uses."""
    torch.manual_seed(0)
    b = make(name)
    for s in range(STEPS):
        losses = _losses(torch.float64, K, s).requires_grad_(True)
        obj = b.objective(losses)
        assert obj.ndim == 0 and torch.isfinite(obj)
        (grad,) = torch.autograd.grad(obj, losses)
        torch.testing.assert_close(grad, b.last_weights.to(grad), rtol=1e-10, atol=1e-12)
        if "loss_after_step" in b.info.protocol:
            b.after_step(losses.detach() * 0.9)
        b.epoch_end()


def test_host_sync_counter_counts() -> None:
    x = torch.ones(3)
    with HostSyncCounter() as c:
        float(x.sum())
        bool(x.all())
        x.tolist()
        _ = x * 2 + 1
    assert c.count == 3, c.calls


@pytest.mark.parametrize("name", [n for n in NAMES if B.info(n).host_syncs is None])
def test_iterative_methods_do_sync(name: str) -> None:
    """``host_syncs=None`` is for methods that really read convergence tests on the host (the
    bound itself is checked on every case by ``test_finite_shape_dtype``); one that never does
    should declare a number."""
    torch.manual_seed(0)
    b = make(name)
    with HostSyncCounter() as counter:
        for s in range(STEPS):
            b.combine(_case("random", torch.float64) * (1 + 0.1 * s), _losses(torch.float64, K, s))
    assert counter.count > 0


def test_closed_form_methods_make_no_host_sync() -> None:
    """The declared budgets: every method without an iterative solver needs none."""
    iterative = {n for n in NAMES if B.info(n).host_syncs is None}
    assert iterative <= {
        "amortized", "cagrad", "dualproj", "fairgrad", "mgda", "mgda_ub", "nash_mtl", "upgrad"
    }, iterative
    for n in set(NAMES) - iterative:
        assert B.info(n).host_syncs == 0, n


# ------------------------------------------------------------------------------------------------
# multi-batch methods (protocol "extra_batch"): stacked [n_batches, K, P] Jacobians
# ------------------------------------------------------------------------------------------------
MULTI = [n for n in NAMES if B.info(n).n_batches > 1]


def test_extra_batch_protocol_matches_n_batches() -> None:
    assert {"modo", "sdmgrad"} <= set(MULTI)
    for n in NAMES:
        rec = B.info(n)
        assert (rec.n_batches > 1) == ("extra_batch" in rec.protocol), n
        if rec.n_batches > 1:
            assert issubclass(rec.cls, B.MultiBatchWeighting), n
            assert rec.modes == ("params",), n


def _stack(kind: str, dtype: torch.dtype, n_batches: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + step)
    noise = torch.randn(n_batches, K, P, generator=g, dtype=torch.float64).to(dtype)
    base = _case(kind, dtype)
    return base.unsqueeze(0) * (1 + 0.1 * step) + 0.3 * base.abs().amax() * noise


def _stacked_step(b: B.Balancer, stack: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    out = b.combine(stack, losses.unsqueeze(0).expand(stack.shape[0], -1))
    b.epoch_end()
    return out


@pytest.mark.parametrize("name", MULTI)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kind", ["random", "zero", "zero_row", "colinear", "opposite", "tiny", "huge"]
)
def test_stacked_finite_shape_dtype_and_syncs(name: str, dtype: torch.dtype, kind: str) -> None:
    torch.manual_seed(0)
    b = make(name)
    for s in range(STEPS):
        stack = _stack(kind, dtype, b.info.n_batches, s)
        with HostSyncCounter() as counter:
            out = _stacked_step(b, stack, _losses(dtype, K, s))
        assert counter.count <= b.info.host_syncs, counter.calls
        assert out.shape == (P,) and out.dtype == dtype
        assert torch.isfinite(out).all(), f"{name} on stacked {kind} ({dtype}): {out}"
        assert b.last_weights.shape == (K,) and torch.isfinite(b.last_weights).all()


@pytest.mark.parametrize("name", MULTI)
def test_stacked_direction_is_a_combination_of_all_rows(name: str) -> None:
    """combine([B, K, P]) == W.flatten() @ rows with W from the block Gramian."""
    torch.manual_seed(0)
    a, c = make(name), make(name)
    stack = _stack("random", torch.float64, a.info.n_batches, 0)
    out = a.combine(stack)
    rows = stack.reshape(-1, P)
    w = c.weights_from_batch_gramian((rows @ rows.T).reshape(stack.shape[0], K, -1, K), None)
    torch.testing.assert_close(out, w.reshape(-1) @ rows)
    torch.testing.assert_close(a.last_weights, w.sum(0))


@pytest.mark.parametrize("name", MULTI)
def test_stacked_state_dict_round_trip_and_determinism(name: str) -> None:
    dtype = torch.float64
    torch.manual_seed(5)
    original = make(name)
    n = original.info.n_batches
    for s in range(3):
        _stacked_step(original, _stack("random", dtype, n, s), _losses(dtype, K, s))
    state = copy.deepcopy(original.state_dict())
    expected = [_stacked_step(original, _stack("random", dtype, n, s), _losses(dtype, K, s))
                for s in (3, 4)]
    fresh = make(name)
    fresh.load_state_dict(state)
    got = [_stacked_step(fresh, _stack("random", dtype, n, s), _losses(dtype, K, s))
           for s in (3, 4)]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", MULTI)
def test_stacked_wrong_shape_is_an_error(name: str) -> None:
    b = make(name)
    n = b.info.n_batches
    with pytest.raises(ValueError, match=rf"\[{n}, {K}, P\]"):
        b.combine(torch.randn(n + 1, K, P))
    with pytest.raises(ValueError, match=rf"\[{n}, {K}\]"):
        b.combine(torch.randn(n, K, P), torch.ones(K))


# ------------------------------------------------------------------------------------------------
# documentation
# ------------------------------------------------------------------------------------------------
def _doc_rows() -> dict[str, str]:
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "balancers.md"
    rows = {}
    for line in doc.read_text().splitlines():
        if line.startswith("| `"):
            rows[line.split("`")[1]] = line
    return rows


def test_docs_list_every_method_with_its_record() -> None:
    rows = _doc_rows()
    assert sorted(rows) == NAMES, set(rows) ^ set(NAMES)
    family = {"losses": "loss", "gramian": "gramian", "jacobian": "jacobian"}
    for name, row in rows.items():
        rec = B.info(name)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith(family[rec.needs]), (name, cells[1])
        assert cells[2] == rec.paper, name
        for k, v in rec.hparams.items():
            assert f"`{k}={v!r}`" in cells[4], (name, k)
        if rec.protocol:
            assert all(p in cells[5] for p in rec.protocol), name
