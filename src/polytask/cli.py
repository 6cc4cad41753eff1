"""The ``polytask`` command line: ``train``, ``list``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from . import architectures, balancers, data

    what = args.what
    if what in ("all", "methods"):
        print("methods (balancers):")
        for name in balancers.available():
            rec = balancers.info(name)
            caps = [f"needs={rec.needs}"]
            if rec.stateful:
                caps.append("stateful")
            if rec.learnable:
                caps.append("learnable")
            if rec.protocol:
                caps.append("protocol=" + "+".join(rec.protocol))
            if rec.n_batches > 1:
                caps.append(f"batches={rec.n_batches}")
            if rec.mode:
                caps.append(f"mode={rec.mode}")
            print(f"  {name:<16} {rec.description}")
            print(f"  {'':<16} [{', '.join(caps)}] {rec.paper}")
        from . import strategies

        print("training strategies (Trainer(strategy=...)):")
        for name in strategies.available():
            srec = strategies.info(name)
            print(f"  {name:<16} {srec.description}")
            print(f"  {'':<16} [protocol={'+'.join(srec.protocol)}] {srec.paper}")
    if what in ("all", "architectures"):
        print("architectures:")
        for name in architectures.available():
            a = architectures.info(name)
            print(f"  {name:<16} {a.description} ({a.paper})")
    if what in ("all", "datasets"):
        print("datasets:")
        for name in data.available():
            print(f"  {name:<20} {data.describe(name)}")
    if what in ("all", "suites"):
        from . import bench

        print("benchmark suites (polytask bench SUITE):")
        for name in bench.available_suites():
            print(f"  {name:<20} {bench.get_suite(name).description}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .recipes import build_run

    cfg = load_config(args.config, args.set)
    if args.out_dir:
        cfg.trainer.out_dir = args.out_dir
    run = build_run(cfg)
    out = Path(cfg.trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    ckpt = out / "last.pt"
    if cfg.trainer.resume or args.resume:
        if ckpt.exists():
            run.trainer.load_checkpoint(ckpt)
            print(f"resumed from {ckpt} at epoch {run.trainer.epoch}")
        else:
            print(f"no checkpoint at {ckpt}; starting from scratch")
    history = run.trainer.fit(run.train_loader, run.val_loader)
    for row in history[-1:]:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
    run.trainer.load_best()
    test = run.trainer.evaluate(run.test_loader)
    print("test (best validation epoch " + str(run.trainer.best_epoch) + "):")
    for k, v in test.items():
        print(f"  {k}: {v:.5f}")
    (out / "test.json").write_text(json.dumps(test, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    demo_main(args.dataset, args.methods, args.epochs, args.n_train, args.out)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench._report import format_table

    if args.suite not in bench.available_suites():
        print(
            f"polytask: unknown suite {args.suite!r}; "
            f"available: {', '.join(bench.available_suites())}",
            file=sys.stderr,
        )
        return 2
    try:
        summary = bench.run_suite(
            args.suite,
            methods=args.methods,
            seeds=args.seeds,
            quick=args.quick,
            results_dir=args.results,
            progress=not args.no_progress,
            threads=args.threads,
            train=not args.report_only,
            jobs=args.jobs,
        )
    except ValueError as err:
        print(f"polytask: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    for kind in ("md", "html"):
        if kind in summary.get("report", {}):
            print(f"report: {summary['report'][kind]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polytask", description="Multi-task learning for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.epochs=3")
    t.add_argument("--out-dir", default=None, help="where logs and checkpoints go")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is faster for small models "
                        "on a busy machine)")
    t.set_defaults(func=_cmd_train)

    ls = sub.add_parser("list", help="list methods, architectures, datasets and benchmark suites")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "methods", "architectures", "datasets", "suites"])
    ls.set_defaults(func=_cmd_list)

    d = sub.add_parser("demo", help="the main job: compare balancers on real multi-task data")
    d.add_argument("--dataset", default="multi_mnist")
    d.add_argument("--methods", nargs="+", default=None)
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--n-train", type=int, default=4000)
    d.add_argument("--out", default="runs/demo/results.json")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark suite (resumable) and write its report")
    b.add_argument("suite", help="suite name (see `polytask list suites`)")
    b.add_argument("--methods", nargs="+", default=None, help="methods (default: the suite's)")
    b.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's)")
    b.add_argument(
        "--quick", action="store_true", help="the quick protocol (small data, few epochs)"
    )
    b.add_argument("--results", default="results", help="results directory (default: results)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads for the runs")
    b.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once in worker processes (default: the suite's)")
    b.add_argument("--report-only", action="store_true",
                   help="do not train; aggregate and report the stored runs")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None and args.command in ("train", "demo"):
        if threads < 1:
            print(f"polytask: --threads must be >= 1, got {threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"polytask: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
