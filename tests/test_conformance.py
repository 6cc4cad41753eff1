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
* (loss weightings) return an objective whose gradient w.r.t. the losses is ``last_weights``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import polytask.balancers as B

NAMES = B.available()

# Per-name hyperparameters where the defaults would not exercise the method in a few steps:
# STCH's warm-up is 4 epochs by default (here 0, so the steps reach its smooth phase).
HPARAMS: dict[str, dict] = {"stch": {"warmup_epoch": 0}}

K, P, STEPS = 3, 7, 3


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
    torch.manual_seed(0)
    b = make(name)
    jac = _case(kind, dtype)
    for out in _run(b, lambda s: jac * (1 + 0.1 * s), dtype, STEPS):
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
