"""``polytask demo``: train hard sharing on MultiMNIST with several balancers and compare.

Trains single-task baselines (one network per task, same encoder) and one multi-task network per
balancer on the same data, selects each run's epoch on validation loss, and prints test metrics,
Δm% against the single-task baselines, mean rank and time per epoch. Every number comes from the
training it runs.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import balancers, data
from .config import RunConfig, parse_config
from .metrics import delta_m, mean_rank
from .recipes import build_run

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


def _run_one(
    cfg: RunConfig, mtd: data.MultiTaskData, method: str, task_names: Sequence[str] | None
) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg.balancer.name = method
    run = build_run(cfg, mtd=mtd, task_names=task_names, out_dir="")
    t0 = time.perf_counter()
    run.trainer.fit(run.train_loader, run.val_loader)
    elapsed = time.perf_counter() - t0
    run.trainer.load_best()
    test = run.trainer.evaluate(run.test_loader)
    epochs = len(run.trainer.history)
    return {
        "test": test,
        "time_per_epoch": elapsed / max(epochs, 1),
        "best_epoch": run.trainer.best_epoch,
        "higher_is_better": run.tasks.higher_is_better(),
    }


def compare(
    cfg: RunConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    log: Any = print,
) -> dict[str, Any]:
    """Train single-task baselines and every method; return the comparison as data."""
    unknown = [m for m in methods if m not in balancers.available()]
    if unknown:
        raise ValueError(f"unknown balancer(s) {unknown}; available: {balancers.available()}")
    mtd = data.load(cfg.data.name, **cfg.data.options)
    log(f"data: {mtd!r}")
    hib: dict[str, bool] = {}
    baseline: dict[str, float] = {}
    stl_time = 0.0
    for task in mtd.task_names:
        r = _run_one(cfg, mtd, "sum", [task])
        hib.update(r["higher_is_better"])
        for k in r["higher_is_better"]:
            baseline[k] = r["test"][k]
        stl_time += r["time_per_epoch"]
        log(f"  single-task {task}: " + ", ".join(f"{k}={baseline[k]:.4f}" for k in r["higher_is_better"]))
    rows: dict[str, dict[str, Any]] = {}
    rows["stl"] = {**{k: baseline[k] for k in hib}, "time_per_epoch": stl_time, "delta_m": 0.0}
    for method in methods:
        r = _run_one(cfg, mtd, method, None)
        vals = {k: r["test"][k] for k in hib}
        rows[method] = {
            **vals,
            "time_per_epoch": r["time_per_epoch"],
            "delta_m": delta_m(vals, baseline, hib),
        }
        log(f"  {method}: Δm={rows[method]['delta_m']:+.2f}%  ({r['time_per_epoch']:.1f} s/epoch)")
    ranks = mean_rank({m: rows[m] for m in methods}, hib) if methods else {}
    for m in methods:
        rows[m]["mean_rank"] = ranks[m]
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
    chosen = list(methods) if methods else [m for m in DEFAULT_METHODS if m in balancers.available()]
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
