"""``polytask demo``: train hard sharing on MultiMNIST with several balancers and compare.

Trains single-task baselines (one network per task, same encoder) and one multi-task network per
balancer on the same data, selects each run's epoch on validation loss, and prints test metrics,
Δm% against the single-task baselines, mean rank and time per epoch. Every number comes from the
training it runs (one seed of the benchmark runner, :func:`polytask.bench.run_protocol`, with
nothing cached; ``polytask bench`` runs the versioned suites with seeds, caching and reports).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import balancers
from .bench import RunResult, TrainerSuite, run_protocol
from .bench._runner import STL
from .config import RunConfig, parse_config
from .metrics import delta_m

__all__ = ["DEFAULT_METHODS", "compare", "demo_config", "format_table"]

DEFAULT_METHODS = ("mean", "uw", "dwa", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "upgrad")


def demo_config(dataset: str = "multi_mnist", epochs: int = 4, n_train: int = 4000) -> RunConfig:
    return parse_config(
        {
            "data": {
                "name": dataset,
                "batch_size": 128,
                "options": {"n_train": n_train, "n_val": 1000, "n_test": 1000},
            },
            "model": {"architecture": "hps", "encoder": "lenet", "hidden": [50]},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "trainer": {"epochs": epochs, "progress": False, "out_dir": "runs/demo"},
        }
    )


class _ConfigSuite(TrainerSuite):
    """A one-off suite whose protocol is a run config (the demo's); not registered."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.name = cfg.data.name
        self.description = f"polytask demo on {cfg.data.name}"
        self.cfg = cfg

    def settings(self, quick: bool) -> dict[str, Any]:
        d = self.cfg.to_dict()
        keep = ("epochs", "mode", "grad_clip", "amp", "monitor", "patience")
        return {
            "data": d["data"],
            "model": d["model"],
            "optimizer": d["optimizer"],
            "scheduler": d["scheduler"],
            "trainer": {k: d["trainer"][k] for k in keep},
            "grad_conflict_batches": 0,
        }


def compare(
    cfg: RunConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    log: Any = print,
) -> dict[str, Any]:
    """Train single-task baselines and every method; return the comparison as data.

    One seed (``cfg.trainer.seed``) of :func:`polytask.bench.run_protocol`, nothing stored.
    """
    unknown = [m for m in methods if m not in balancers.available()]
    if unknown:
        raise ValueError(f"unknown balancer(s) {unknown}; available: {balancers.available()}")
    suite = _ConfigSuite(cfg)
    protocol = suite.protocol(quick=False)
    mtd = suite.data(protocol)
    log(f"data: {mtd!r}")
    stl: dict[str, RunResult] = {}

    def on_result(method: str, seed: int, r: RunResult) -> None:
        if method == STL:
            stl[str(seed)] = r
            for task in mtd.task_names:
                keys = [k for k in r.higher_is_better if k.split("/")[0] == task]
                log(f"  single-task {task}: " + ", ".join(f"{k}={r.test[k]:.4f}" for k in keys))
            return
        dm = delta_m(r.test, stl[str(seed)].test, r.higher_is_better)
        log(f"  {method}: Δm={dm:+.2f}%  ({r.time_per_epoch:.1f} s/epoch)")

    summary = run_protocol(
        suite,
        protocol,
        list(methods),
        [cfg.trainer.seed],
        out_dir=None,
        progress=False,
        report=False,
        log=log,
        on_result=on_result,
    )
    hib = summary["higher_is_better"]
    rows: dict[str, dict[str, Any]] = {}
    for name, row in summary["rows"].items():
        rows[name] = {k: row["metrics"][k]["mean"] for k in hib}
        rows[name]["time_per_epoch"] = row["time_per_epoch"]["mean"]
        rows[name]["delta_m"] = 0.0 if name == STL else row["delta_m"]["mean"]
        if "mean_rank" in row:
            rows[name]["mean_rank"] = row["mean_rank"]
    return {"dataset": cfg.data.name, "metrics": list(hib), "higher_is_better": hib, "rows": rows,
            "config": cfg.to_dict()}


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the comparison."""
    metrics = result["metrics"]
    head = ["method", *metrics, "Δm% ↓", "mean rank ↓", "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["rows"].items():
        cells = [name, *(f"{row[m]:.4f}" for m in metrics), f"{row['delta_m']:+.2f}"]
        cells.append(f"{row['mean_rank']:.2f}" if "mean_rank" in row else "-")
        cells.append(f"{row['time_per_epoch']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    dataset: str = "multi_mnist",
    methods: Sequence[str] | None = None,
    epochs: int = 4,
    n_train: int = 4000,
    out: str | None = "runs/demo/results.json",
) -> dict[str, Any]:
    cfg = demo_config(dataset, epochs, n_train)
    chosen = (
        list(methods) if methods else [m for m in DEFAULT_METHODS if m in balancers.available()]
    )
    print(
        f"polytask demo: hard sharing (LeNet encoder) on {dataset}, {n_train} training pairs, "
        f"{epochs} epochs, Adam 1e-3; methods: {', '.join(chosen)}"
    )
    t0 = time.perf_counter()
    result = compare(cfg, chosen)
    print()
    print(format_table(result))
    print(
        f"\ntest-set metrics of the epoch with the lowest validation loss; Δm% against the "
        f"single-task rows (lower is better); total {time.perf_counter() - t0:.0f} s"
    )
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"results written to {path}")
    return result
