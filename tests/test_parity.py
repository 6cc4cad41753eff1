"""Parity with reference implementations on the shared vectors (``shared/parity``).

Every case of ``vectors_shared.json`` whose method is registered is run in float64 through
``create(method, n_tasks, **hparams)``, feeding each step's Jacobian and losses to the same
object, and compared elementwise with ``atol + rtol * |expected|``; where the expected direction
is null (reference failure, random task order, unstable reference) only finiteness and shape are
checked. Cases whose method is not registered yet are skipped with a reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import polytask

_CANDIDATES = [
    os.environ.get("POLYTASK_PARITY_FILE", ""),
    str(Path(__file__).resolve().parents[1] / "shared" / "parity" / "vectors_shared.json"),
    str(Path(__file__).resolve().parents[2] / "shared" / "parity" / "vectors_shared.json"),
    "/work/shared/parity/vectors_shared.json",
]


def _parity_file() -> Path | None:
    for c in _CANDIDATES:
        if c and Path(c).is_file():
            return Path(c)
    return None


_FILE = _parity_file()
_CASES = json.loads(_FILE.read_text())["cases"] if _FILE is not None else []


def _ids(case: dict) -> str:
    return case["id"]


@pytest.mark.skipif(_FILE is None, reason="parity vectors (shared/parity) not found")
@pytest.mark.parametrize("case", _CASES, ids=_ids)
def test_parity(case: dict) -> None:
    method = case["method"]
    if method not in polytask.balancers.available():
        pytest.skip(f"method {method!r} is not registered yet")
    balancer = polytask.balancers.create(method, case["n_tasks"], **case["hparams"])
    rtol, atol = case["rtol"], case["atol"]
    for k, step in enumerate(case["steps"]):
        J = torch.tensor(step["jacobian"], dtype=torch.float64)
        losses = torch.tensor(step["losses"], dtype=torch.float64)
        got = balancer.combine(J, losses)
        assert got.shape == (J.shape[1],), f"step {k}: shape {tuple(got.shape)}"
        assert torch.isfinite(got).all(), f"step {k}: non-finite direction"
        expected = step["expected_direction"]
        if expected is None:
            continue
        exp = torch.tensor(expected, dtype=torch.float64)
        err = (got - exp).abs()
        bound = atol + rtol * exp.abs()
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (
            f"{case['id']} step {k}: max |got - expected| = {err.max().item():.3e} "
            f"(at {worst.item()}: got {got[worst].item():.6e}, expected {exp[worst].item():.6e}, "
            f"bound {bound[worst].item():.3e})"
        )
