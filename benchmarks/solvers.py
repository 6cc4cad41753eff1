"""Micro-benchmark of the K x K solvers: the reference solvers (``benchmarks/_solvers_v0.py``, a
frozen copy of ``polytask.balancers._solvers`` before ``_qp``) against ``polytask.balancers._qp``.

Each method is timed through its balancer (``weights_from_gramian``, as ``step_cost.py
--solvers`` does), on the same Gramian as there (``G = A A^T``, ``A`` a seeded Gaussian
``K x K``), with the solver functions the balancer module uses swapped between the two
versions. Old and new calls are interleaved (old, new, new, old, ...), so load on the machine
hits both alike; the table reports the median time of each and the median of the per-pair
ratios old / new, and the largest relative difference of the weights. (That Gramian is a
float32 product, cast for the float64 rows; at K = 10 it is asymmetric at the 2.5e-8 level, and
the new solvers solve the problem of its symmetric part, the reference that of its lower or
full matrix, hence differences near 1e-7 there; on the symmetrised Gramian they agree to 1e-15.)

    python benchmarks/solvers.py                       # K in {2, 10, 40}, float32 and float64,
                                                       # 1 and 2 threads
    python benchmarks/solvers.py --k 40 --threads 1 --reps 50 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import polytask
from polytask.balancers import _gramian, _qp

_HERE = Path(__file__).resolve().parent
_SWAPPED = ("cagrad_weights", "min_norm_point", "nash_cccp_subproblem", "power_equation",
            "project_to_dual_cone")
METHODS: dict[str, dict[str, Any]] = {
    "mgda": {},
    "upgrad": {},
    "dualproj": {},
    "cagrad": {"c": 0.5},
    "nash_mtl": {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20},
    "fairgrad": {"alpha": 1.0},
}


def load_reference() -> Any:
    """The frozen reference solvers as a module."""
    spec = importlib.util.spec_from_file_location("_solvers_v0", _HERE / "_solvers_v0.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def solvers(module: Any) -> Iterator[None]:
    """Make the balancers call the solver functions of ``module``."""
    saved = {name: getattr(_gramian, name) for name in _SWAPPED}
    try:
        for name in _SWAPPED:
            setattr(_gramian, name, getattr(module, name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(_gramian, name, fn)


def gramian(k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The Gramian of ``step_cost.py``'s solver timings (``seed + 17 k``)."""
    g = torch.Generator().manual_seed(seed + 17 * k)
    a = torch.randn(k, k, generator=g)
    return (a @ a.T).to(dtype)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(method: str, k: int, dtype: torch.dtype, reps: int, seed: int,
            reference: Any) -> dict[str, Any]:
    """Interleaved timings of one method with the reference and the new solvers."""
    G = gramian(k, seed, dtype)
    hp = METHODS[method]
    b_old = polytask.balancers.create(method, k, **hp)
    b_new = polytask.balancers.create(method, k, **hp)

    def old() -> Any:
        with solvers(reference):
            return b_old.weights_from_gramian(G, None)

    def new() -> Any:
        with solvers(_qp):
            return b_new.weights_from_gramian(G, None)

    w_old, w_new = old(), new()  # warm-up; the results agree (tests/test_solvers.py checks)
    diff = float((w_old - w_new).abs().max() / w_old.abs().max().clamp_min(1e-30))
    t_old, t_new, ratios = [], [], []
    for i in range(reps):
        if i % 2 == 0:
            a, b = _timed(old), _timed(new)
        else:
            b, a = _timed(new), _timed(old)
        t_old.append(a)
        t_new.append(b)
        ratios.append(a / b)
    return {
        "method": method,
        "K": k,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "old_ms": 1e3 * statistics.median(t_old),
        "new_ms": 1e3 * statistics.median(t_new),
        "ratio": statistics.median(ratios),
        "max_rel_diff": diff,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[2, 10, 40])
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default="")
    args = p.parse_args(argv)
    reference = load_reference()
    rows = []
    header = (f"{'method':10} {'K':>3} {'dtype':8} {'thr':>3} {'old ms':>9} {'new ms':>9} "
              f"{'old/new':>8} {'max rel diff':>12}")
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dt in args.dtype:
            dtype = getattr(torch, dt)
            for k in args.k:
                for m in args.methods:
                    r = compare(m, k, dtype, args.reps, args.seed, reference)
                    rows.append(r)
                    print(f"{m:10} {k:3d} {r['dtype']:8} {threads:3d} {r['old_ms']:9.3f} "
                          f"{r['new_ms']:9.3f} {r['ratio']:8.2f} {r['max_rel_diff']:12.1e}",
                          flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "python": sys.version.split()[0],
                "reps": args.reps, "seed": args.seed}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
