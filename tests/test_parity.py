"""Parity with reference implementations on the shared vectors (``shared/parity``).

Every case of ``vectors_shared.json`` is run in float64 through
``create(method, n_tasks, **hparams)``, feeding each step's Jacobian and losses to the same
object, and compared elementwise with ``atol + rtol * |expected|``; where the expected direction
is null (reference failure, random task order, unstable reference) only finiteness and shape are
checked.

The file is bundled as ``tests/parity/vectors_shared.json.gz`` (a verbatim, gzipped copy of the
shared file, sha256 below) so that CI runs it from a clean clone; ``POLYTASK_PARITY_FILE`` points
the tests at another copy.

Reference outputs that are provably inaccurate
----------------------------------------------
For a few steps the expected direction is not the output the method defines, because the solver
behind the reference stopped early. There the comparison is made with an independently
*certified* solution instead, and the test also asserts that the reference misses that solution
by more than the case's tolerance (so that the exception disappears if the file is corrected):

* ``mgda``: the min-norm point of the convex hull is unique. :func:`_mgda_certified` recomputes
  it in 50-digit arithmetic (``mpmath``) on the support our solver found and checks the KKT
  conditions on *every* row (``g_i . d >= ||d||^2``, weights positive on the support), which
  proves optimality whatever produced the support. In five cases (rows with norms spread over four
  orders of magnitude, or many nearly-conflicting rows) the file's interior-point solution is off
  by up to 1.3e-2 relative, while ours agrees with the certified point to 1e-7.
* ``nash_mtl-official-k3-p300-scaled-5`` step 3: the official code's ECOS solves ended
  ``optimal_inaccurate`` (its own status; re-running it with cvxpy 1.9.3 / ECOS 2.0.14 reproduces
  this); a tight-tolerance Clarabel solve of the same convex subproblem agrees with ours (0.3468
  vs the reference's 0.4298 in the largest weight). Certificate: our weights, rescaled, satisfy
  the bargaining equation ``G~ x = 1/x`` to 1e-9 and are the exact solution of the CCCP
  subproblem linearised at that point (its KKT multipliers are non-negative), so the exact
  procedure stays there; the reference's weights do neither.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

import polytask

SHA256 = "683bd9f680b8f4c9af4e6efde719606f6299c9dcd8e4cd8fa5b2620fa8c30857"
_BUNDLED = Path(__file__).resolve().parent / "parity" / "vectors_shared.json.gz"


def _load() -> list[dict]:
    override = os.environ.get("POLYTASK_PARITY_FILE", "")
    if override:
        return json.loads(Path(override).read_text())["cases"]
    return json.loads(gzip.decompress(_BUNDLED.read_bytes()))["cases"]


_CASES = _load()

# case id -> steps whose reference output is certified inaccurate (see the module docstring)
_INACCURATE: dict[str, set[int]] = {
    "mgda-k2-p8-scaled-4": {0},
    "mgda-k3-p50-scaled-5": {0},
    "mgda-k5-p300-scaled-6": {0},
    "mgda-k10-p8-scaled-7": {0},
    "mgda-k10-p50-conflict-11": {0},
    "nash_mtl-official-k3-p300-scaled-5": {3},
}


def _ids(case: dict) -> str:
    return case["id"]


def test_bundled_file_is_the_shared_one() -> None:
    import hashlib

    raw = gzip.decompress(_BUNDLED.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == SHA256
    shared = Path(__file__).resolve().parents[2] / "shared" / "parity" / "vectors_shared.json"
    if shared.is_file():
        assert hashlib.sha256(shared.read_bytes()).hexdigest() == SHA256


def _within(got: torch.Tensor, exp: torch.Tensor, rtol: float, atol: float) -> tuple[bool, str]:
    err = (got - exp).abs()
    bound = atol + rtol * exp.abs()
    worst = int((err - bound).argmax())
    msg = (
        f"max |got - expected| = {err.max().item():.3e} (at {worst}: got {got[worst].item():.6e}, "
        f"expected {exp[worst].item():.6e}, bound {bound[worst].item():.3e})"
    )
    return bool((err <= bound).all()), msg


def _mgda_certified(J: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The exact min-norm point, recomputed in 50 digits on the support of ``weights``.

    Asserts the KKT conditions on every row, which certifies optimality.
    """
    import mpmath as mp

    with mp.workdps(50):
        support = [i for i in range(J.shape[0]) if float(weights[i]) > 0]
        rows = [[mp.mpf(float(v)) for v in J[i]] for i in range(J.shape[0])]
        gram = mp.matrix([[mp.fdot(rows[a], rows[b]) for b in support] for a in support])
        x = mp.lu_solve(gram, mp.matrix([1] * len(support)))
        w = [x[i] / mp.fsum(x) for i in range(len(support))]
        assert all(v > 0 for v in w), "support weights not positive: not a KKT point"
        d = [mp.fsum(w[a] * rows[s][j] for a, s in enumerate(support)) for j in range(J.shape[1])]
        n2 = mp.fdot(d, d)
        for i, r in enumerate(rows):
            assert mp.fdot(r, d) - n2 >= -mp.mpf(10) ** -40 * (1 + n2), f"row {i} violates KKT"
        return torch.tensor([float(v) for v in d], dtype=torch.float64)


def _nash_certified(balancer: polytask.balancers.Balancer, J: torch.Tensor) -> torch.Tensor:
    """Check that the state after this step is the exact CCCP output (see the module docstring).

    Returns the weights before clipping (``prvs_alpha``).
    """
    from polytask.balancers._solvers import nash_cccp_subproblem

    G = J @ J.T
    nf = torch.linalg.matrix_norm(G)
    Gt, sq = G / nf, nf.sqrt()
    alpha = balancer.prvs_alpha.to(torch.float64)
    x = alpha * sq
    residual = torch.linalg.vector_norm(Gt @ x - 1 / x) / torch.linalg.vector_norm(1 / x)
    assert residual < 1e-9, f"not the bargaining point: relative residual {residual:.2e}"
    c = Gt.sum(0) + (1.0 / x + Gt @ (1.0 / (Gt @ x))) / sq  # linearisation at x
    x_next, ok = nash_cccp_subproblem(Gt, c, x)
    assert bool(ok) and torch.allclose(x_next, x, rtol=1e-10), "not a fixed point of the CCCP"
    return alpha


@pytest.mark.parametrize("case", _CASES, ids=_ids)
def test_parity(case: dict) -> None:
    method = case["method"]
    balancer = polytask.balancers.create(method, case["n_tasks"], **case["hparams"])
    rtol, atol = case["rtol"], case["atol"]
    inaccurate = _INACCURATE.get(case["id"], set())
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
        if k not in inaccurate:
            ok, msg = _within(got, exp, rtol, atol)
            assert ok, f"{case['id']} step {k}: {msg}"
            continue
        # certified solution instead of the inaccurate reference output
        if method == "mgda":
            certified = _mgda_certified(J, balancer.last_weights)
            ok, msg = _within(got, certified, 1e-6, atol)
            assert ok, f"{case['id']} step {k} vs certified: {msg}"
        else:
            assert method == "nash_mtl"
            _nash_certified(balancer, J)
            ref = torch.tensor(step["reference_weights"], dtype=torch.float64)
            G = J @ J.T
            x_ref = ref * torch.linalg.matrix_norm(G).sqrt()
            Gt = G / torch.linalg.matrix_norm(G)
            res = (
                torch.linalg.vector_norm(Gt @ x_ref - 1 / x_ref)
                / torch.linalg.vector_norm(1 / x_ref)
            )
            assert res > 1e-3, "the reference is the bargaining point after all"
            certified = got
        ok_ref, _ = _within(certified, exp, rtol, atol)
        assert not ok_ref, (
            f"{case['id']} step {k}: the reference output is within tolerance of the certified "
            "solution; remove the case from _INACCURATE"
        )
