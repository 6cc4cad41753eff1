"""Smoke test of benchmarks/step_cost.py: tiny sizes, K=2, two pairs, the methods that exist."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polytask

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


def _load():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_flop_model_matches_flop_counter():
    sc = _load()
    for k in (1, 3):
        wl = sc.Workload((8, 16, 12), 5, k, seed=0)
        bounds = sc.flop_model(wl.dims, wl.batch, k)
        assert bounds["sum_step_flops"] == sc.counted_sum_step_flops(wl)
        assert 0 < bounds["k_vjp_over_sum_step"] < bounds["exact_step_lower_bound"]
        assert bounds["exact_step_lower_bound"] < bounds["exact_step_with_gramian"]


def test_step_cost_smoke(tmp_path):
    wanted = ["pcgrad", "mgda", "upgrad", "mean"]
    methods = [m for m in wanted if m in polytask.balancers.available()]
    repr_methods = [m for m in ("upgrad", "mgda") if m in polytask.balancers.available()]
    out = tmp_path / "res.json"
    env = {k: v for k, v in os.environ.items() if k != "LIBMTL_PATH"}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--ks", "2", "--pairs", "2", "--warmup", "1",
           "--threads", "1", "--solver-budget", "0.01", "--out", str(out),
           "--methods", *methods, "nonexistent_method", "--repr-methods", *repr_methods]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | K | polytask ratio |" in proc.stdout
    assert "nonexistent_method" in proc.stdout  # skipped with a note

    res = json.loads(out.read_text())
    assert set(res) >= {"meta", "notes", "bounds", "solver", "baseline", "results"}
    assert res["meta"]["dims"] == [32, 64, 64, 32] and res["meta"]["pairs"] == 2
    assert set(res["bounds"]["2"]) >= {
        "sum_step_flops", "sum_step_flops_counted", "k_vjp_over_sum_step",
        "exact_step_lower_bound", "exact_step_with_gramian",
    }
    assert res["baseline"]["2"]["peak_bytes"] > 0 and res["baseline"]["2"]["ms"] > 0
    labels = {r["label"] for r in res["results"]}
    assert labels == set(methods) | {f"{m} (repr)" for m in repr_methods}
    assert "nonexistent_method" not in {r["method"] for r in res["results"]}
    for row in res["results"]:
        assert row["K"] == 2
        assert {"polytask_over_torchjd", "polytask_over_libmtl", "variants"} <= set(row)
        pt = row["variants"]["polytask"]
        assert pt["ratio"] > 0 and pt["mem_ratio"] > 0 and len(pt["pairs"]) == 2
        assert "skipped" in row["variants"]["libmtl"]  # no LibMTL path given
        for entry in row["variants"].values():
            assert "error" not in entry, entry
            if "cosine_to_ref" in entry:
                assert entry["cosine_to_ref"] > 0.999  # K=2: every variant gives one direction
    for s in res["solver"]:
        assert "polytask_ms" in s
    if importlib.util.find_spec("torchjd") is not None:  # an optional (bench) dependency
        (mean,) = [r for r in res["results"] if r["label"] == "mean"]
        assert mean["variants"]["torchjd"]["ratio"] > 0
        assert mean["variants"]["torchjd_autogram"]["ratio"] > 0
        assert mean["polytask_over_torchjd"] > 0
