"""Run a suite: baselines and methods over seeds, cached per run, aggregated, reported.

Layout of a results directory (``results/<suite>`` for the full protocol, ``results/<suite>-quick``
for the quick one, so a smoke run never overwrites hours of full runs)::

    <dir>/stl/seed0.json           single-task baselines of seed 0
    <dir>/<method>/seed0.json      {"protocol": Protocol.key(), "result": RunResult, "meta": ...}
    <dir>/summary.json             the aggregate (what :func:`run_suite` returns)
    <dir>/report.md, report.html   see :mod:`polytask.bench._report`

A stored run is reused when its ``protocol`` equals the current ``Protocol.key()`` and rerun (and
overwritten) when it differs, so an interrupted sweep resumes where it stopped.

Peak memory of a run (``RunResult.peak_memory_mb``, how it was measured in
``extras["memory"]``):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start of
  the run (tensors of the caching allocator, not the reserved pool).
* CPU (Linux): the growth of the process's resident set during the run: the kernel's peak-RSS
  mark is reset at the start (``/proc/self/clear_refs``, after ``gc.collect`` and
  ``malloc_trim``), and the peak (``VmHWM``) at the end minus the RSS at the start is reported.
  Shared data is loaded by :meth:`Suite.prepare` before, so it is not counted.
* CPU elsewhere: the growth of ``resource.getrusage().ru_maxrss`` during the run, a lower bound
  (zero whenever an earlier run of the process peaked higher).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import delta_m, mean_rank
from ._suite import Protocol, RunResult, Suite, get_suite

__all__ = [
    "MemoryMeter",
    "aggregate",
    "gradient_conflict",
    "resolve_methods",
    "resolve_seeds",
    "results_dir_for",
    "run_protocol",
    "run_suite",
]

STL = "stl"
RESULT_FORMAT = 1


# ---------------------------------------------------------------------------------------- memory
def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, kB on Linux


class MemoryMeter:
    """Context manager measuring the peak memory of the code it wraps (see the module docstring).

    >>> with MemoryMeter("cpu") as m:
    ...     x = torch.zeros(4_000_000)  # 16 MB
    ...     del x
    >>> m.peak_mb >= 0.0 and m.record()["kind"].startswith("cpu")
    True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.kind = ""
        self.start_mb = 0.0
        self.peak_mb = 0.0

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda.max_memory_allocated"
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        gc.collect()
        _malloc_trim()
        rss = _proc_status_mb("VmRSS")
        if rss is not None and _reset_peak_rss():
            self.kind = "cpu.rss_peak_growth"
            self.start_mb = rss
        else:
            self.kind = "cpu.ru_maxrss_growth"
            self.start_mb = _ru_maxrss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda.max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "cpu.rss_peak_growth":
            hwm = _proc_status_mb("VmHWM")
            self.peak_mb = max(0.0, (hwm or self.start_mb) - self.start_mb)
        else:
            self.peak_mb = max(0.0, _ru_maxrss_mb() - self.start_mb)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "start_mb": self.start_mb, "peak_mb": self.peak_mb}


# ------------------------------------------------------------------------------ gradient conflict
def gradient_conflict(
    model: nn.Module,
    tasks: Any,
    loader: Iterable[Mapping[str, Any]],
    *,
    n_batches: int = 4,
    device: str | torch.device = "cpu",
    input_key: str = "x",
) -> dict[str, Any]:
    """Cosine similarity between the tasks' gradients of the shared parameters.

    On ``n_batches`` batches of ``loader`` the per-task gradients ``J [K, P]`` of the model's
    ``shared_parameters()`` are computed exactly (:func:`polytask.jacobian`, model in eval mode)
    and ``cos[i, j] = <g_i, g_j> / (|g_i| |g_j|)`` is averaged over the batches. Returns
    ``{"tasks", "cosine" [K][K], "norms" [K] (mean gradient norms), "n_batches"}``.
    """
    from .. import jacobian
    from ..trainer import move_to

    device = torch.device(device)
    shared = [p for p in model.shared_parameters() if p.requires_grad]  # type: ignore[operator]
    was_training = model.training
    model.eval()
    cos_sum: Tensor | None = None
    norm_sum: Tensor | None = None
    seen = 0
    try:
        for batch in loader:
            if seen >= n_batches:
                break
            batch = move_to(batch, device)
            out = model(batch[input_key])
            losses = tasks.compute_losses(out, batch).losses.float()
            jac = jacobian(losses, shared).double()
            norms = jac.norm(dim=1)
            cos = (jac @ jac.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
            cos_sum = cos if cos_sum is None else cos_sum + cos
            norm_sum = norms if norm_sum is None else norm_sum + norms
            seen += 1
    finally:
        model.train(was_training)
    if cos_sum is None or norm_sum is None:
        raise ValueError("gradient_conflict: the loader yielded no batch")
    return {
        "tasks": list(tasks.names),
        "cosine": (cos_sum / seen).tolist(),
        "norms": (norm_sum / seen).tolist(),
        "n_batches": seen,
    }


# ------------------------------------------------------------------------------------- planning
def results_dir_for(name: str, quick: bool, results_dir: str | os.PathLike[str]) -> Path:
    """``<results_dir>/<suite>`` for the full protocol, ``<results_dir>/<suite>-quick`` else."""
    return Path(results_dir) / (f"{name}-quick" if quick else name)


def resolve_seeds(protocol: Protocol, seeds: int | Sequence[int] | None) -> list[int]:
    """``None``: the protocol's seeds; an int ``n``: seeds ``0 .. n-1``; a list: those seeds."""
    if seeds is None:
        return list(protocol.seeds)
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {list(seeds)}")
    return out


def resolve_methods(
    suite: Suite, protocol: Protocol, methods: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The methods to run and the default methods left out because they are not registered.

    Explicit unknown methods are an error; default methods that are not registered (yet) are
    skipped and reported.
    """
    known = set(suite.available_methods())
    if methods is not None:
        chosen = list(dict.fromkeys(methods))
        unknown = [m for m in chosen if m not in known]
        if STL in chosen:
            raise ValueError(
                f"{STL!r} is the single-task baseline, run for every seed; not a method"
            )
        if unknown:
            raise ValueError(
                f"suite {suite.name!r}: unknown method(s) {unknown}; available: {sorted(known)}"
            )
        return chosen, []
    chosen = [m for m in protocol.default_methods if m in known]
    skipped = [m for m in protocol.default_methods if m not in known]
    return chosen, skipped


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _run_path(out_dir: Path, method: str, seed: int) -> Path:
    return out_dir / method / f"seed{seed}.json"


def _load_stored(path: Path, key: Mapping[str, Any]) -> RunResult | None:
    """The stored result at ``path`` when it was made under protocol ``key``, else ``None``."""
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict) or stored.get("protocol") != _jsonable(key):
        return None
    return RunResult.from_dict(stored["result"])


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True))
    os.replace(tmp, path)


def _environment(threads: int | None) -> dict[str, Any]:
    from ..trainer import code_version

    return {
        "polytask": code_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------ aggregation
def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error (sample std / sqrt(n); NaN for one value) of finite values."""
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    se = (
        math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) / math.sqrt(n)
        if n > 1
        else float("nan")
    )
    return {"mean": mean, "se": se, "n": n, "values": vals}


def aggregate(
    results: Mapping[str, Sequence[RunResult]],
    baselines: Sequence[RunResult] = (),
) -> dict[str, Any]:
    """Per method: metrics, Δm%, time per epoch and peak memory as mean ± s.e. over seeds.

    Δm% is computed per seed against that seed's single-task baseline (Maninis et al. 2019:
    ``100/M sum_j (-1)^{h_j} (M_j - B_j) / B_j`` over every metric in ``higher_is_better``), then
    averaged; a seed without a baseline has no Δm. The mean rank ranks the methods (not the
    baseline) on each metric's mean over seeds, 1 = best, and averages over the metrics.

    Returns ``{"metrics", "higher_is_better", "rows": {name: row}, "notes"}`` where ``name`` is
    ``"stl"`` (when there are baselines) and every method with at least one result.
    """
    notes: list[str] = []
    hib: dict[str, bool] = {}
    for runs in [baselines, *results.values()]:
        for r in runs:
            for k, v in r.higher_is_better.items():
                hib.setdefault(k, bool(v))
    base_by_seed = {b.seed: b for b in baselines}
    rows: dict[str, dict[str, Any]] = {}
    order = ([STL] if baselines else []) + [m for m, rs in results.items() if rs]
    for name in order:
        runs = list(baselines) if name == STL else list(results[name])
        runs.sort(key=lambda r: r.seed)
        row: dict[str, Any] = {
            "seeds": [r.seed for r in runs],
            "metrics": {k: _stats([r.test[k] for r in runs if k in r.test]) for k in hib},
            "time_per_epoch": _stats([r.time_per_epoch for r in runs]),
            "peak_memory_mb": _stats([r.peak_memory_mb for r in runs]),
            "best_epoch": [r.best_epoch for r in runs],
        }
        if name == STL:
            row["delta_m"] = _stats([0.0 for _ in runs])
        else:
            deltas = []
            for r in runs:
                b = base_by_seed.get(r.seed)
                if b is None:
                    continue
                try:
                    deltas.append(delta_m(r.test, b.test, hib))
                except (KeyError, ZeroDivisionError) as err:
                    notes.append(f"{name} seed {r.seed}: no Δm ({err})")
            row["delta_m"] = _stats(deltas) if deltas else None
            if baselines and len(deltas) < len(runs):
                notes.append(
                    f"{name}: Δm over {len(deltas)} of {len(runs)} seeds (baseline missing)"
                )
        rows[name] = row
    methods = [m for m in order if m != STL]
    if methods and hib:
        table = {m: {k: rows[m]["metrics"][k]["mean"] for k in hib} for m in methods}
        for m, rank in mean_rank(table, hib).items():
            rows[m]["mean_rank"] = rank
    return {"metrics": list(hib), "higher_is_better": hib, "rows": rows, "notes": notes}


# ------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="epoch",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.05,
    )


def _execute(
    suite: Suite, protocol: Protocol, m: str, s: int, root: Path, device: torch.device
) -> RunResult:
    """One run (``m == "stl"``: the baselines of seed ``s``), timed and memory-metered."""
    work = root / m / f"seed{s}"
    t0 = time.perf_counter()
    with MemoryMeter(device) as meter:
        r = suite.run_baseline(s, protocol, work) if m == STL else suite.run(m, s, protocol, work)
    r.peak_memory_mb = meter.peak_mb
    r.extras["memory"] = meter.record()
    r.extras.setdefault("wall_time_s", time.perf_counter() - t0)
    return r


def _registered_as(suite: Suite) -> bool:
    """Whether worker processes can rebuild ``suite`` by name (a registered suite of its type)."""
    try:
        return type(get_suite(suite.name)) is type(suite)
    except KeyError:
        return False


_WORKER_SUITES: dict[str, Suite] = {}


def _worker(
    name: str, protocol: Protocol, m: str, s: int, root: str, threads: int | None, device: str
) -> dict[str, Any]:
    """Process-pool entry point: rebuild the suite, prepare it once per process, run."""
    if threads is not None:
        torch.set_num_threads(threads)
    tag = json.dumps([name, protocol.key()], sort_keys=True, default=str)
    suite = _WORKER_SUITES.get(tag)
    if suite is None:
        suite = get_suite(name)
        suite.progress = False
        suite.prepare(protocol)
        _WORKER_SUITES.clear()
        _WORKER_SUITES[tag] = suite
    return _execute(suite, protocol, m, s, Path(root), torch.device(device)).to_dict()


def _run_parallel(
    suite: Suite,
    protocol: Protocol,
    todo: Sequence[tuple[str, int]],
    planned: Mapping[tuple[str, int], int],
    root: Path,
    threads: int | None,
    jobs: int,
    device: str,
    bar: Any,
    record: Callable[[str, int, RunResult], None],
) -> None:
    """Train ``todo`` in ``jobs`` spawned worker processes; ``record`` each result as it ends."""
    import concurrent.futures as cf
    import multiprocessing as mp

    n_done = 0
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        # longest first, so that the last run to finish does not start last
        order = sorted(todo, key=lambda p: -suite.relative_cost(p[0], protocol))
        futures = {
            pool.submit(_worker, suite.name, protocol, m, s, str(root), threads, device): (m, s)
            for m, s in order
        }
        bar.set_description_str(f"{suite.name}: {jobs} runs at a time, 0/{len(todo)} done")
        for fut in cf.as_completed(futures):
            m, s = futures[fut]
            r = RunResult.from_dict(fut.result())
            n_done += 1
            bar.update(planned[(m, s)])
            bar.set_description_str(
                f"{suite.name}: {jobs} runs at a time, {n_done}/{len(todo)} done"
            )
            bar.set_postfix_str(f"last: {m} seed {s}")
            record(m, s, r)


def run_protocol(
    suite: Suite,
    protocol: Protocol,
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None,
    progress: bool = True,
    threads: int | None = None,
    report: bool = True,
    train: bool = True,
    log: Callable[[str], None] | None = None,
    on_result: Callable[[str, int, RunResult], None] | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Run ``protocol`` of ``suite`` (see :func:`run_suite`); ``out_dir=None`` keeps nothing.

    ``train=False`` only aggregates (and reports) the stored results. ``on_result(method, seed,
    result)`` is called after every run, trained or reused (``method`` is ``"stl"`` for the
    baselines). ``jobs > 1`` trains that many runs at once in worker processes (registered
    suites only; default the suite's ``default_jobs``); results do not depend on it.
    """
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    if threads is None:
        threads = suite.default_threads
    if jobs is None:
        jobs = suite.default_jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    chosen, skipped = resolve_methods(suite, protocol, methods)
    seed_list = resolve_seeds(protocol, seeds)
    if skipped:
        say(f"{suite.name}: default method(s) not registered, skipped: {', '.join(skipped)}")
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="polytask-bench-")))
            persistent = False
        else:
            root = Path(out_dir)
            persistent = True
        key = protocol.key()
        plan = [(m, s) for s in seed_list for m in ([STL] if suite.has_baselines else []) + chosen]
        done: dict[tuple[str, int], RunResult] = {}
        for m, s in plan:
            r = _load_stored(_run_path(root, m, s), key) if persistent else None
            if r is not None:
                done[(m, s)] = r
            elif persistent and _run_path(root, m, s).exists():
                say(f"{suite.name}: {m} seed {s}: stored under another protocol; rerunning")
        todo = [p for p in plan if p not in done] if train else []
        if done:
            say(f"{suite.name}: reusing {len(done)} stored run(s) from {root}")
        for (m, s), r in sorted(done.items(), key=lambda kv: plan.index(kv[0])):
            if on_result is not None:
                on_result(m, s, r)
        env = _environment(threads)
        if todo:
            from ..trainer import pick_device

            suite.progress = progress
            device = pick_device(suite.device)
            with _threads(threads):
                suite.prepare(protocol)
                # one bar over every epoch of every run still to do: runs done, epochs, ETA
                planned = {p: suite.planned_epochs(p[0], protocol) for p in todo}
                bar = _progress_bar(sum(planned.values()), suite.name, progress)
                bar.set_description_str(f"{suite.name}: run 0/{len(todo)}")

                def record(m: str, s: int, r: RunResult) -> None:
                    if persistent:
                        meta = {**env, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                        _write_json(
                            _run_path(root, m, s),
                            {
                                "format": RESULT_FORMAT,
                                "protocol": key,
                                "result": r.to_dict(),
                                "meta": meta,
                            },
                        )
                    done[(m, s)] = r
                    if on_result is not None:
                        on_result(m, s, r)

                parallel = jobs > 1 and len(todo) > 1 and _registered_as(suite)
                try:
                    batch = suite.run_batch(todo, protocol, jobs, bar.update) if parallel else None
                    if batch is not None:
                        bar.set_description_str(f"{suite.name}: {jobs} processes")
                        for n_done, (m, s, r) in enumerate(batch, start=1):
                            r.extras.setdefault("memory", {"kind": "cpu.rss_peak_growth"})
                            bar.set_postfix_str(
                                f"{n_done}/{len(todo)} runs done, last {m} seed {s}"
                            )
                            record(m, s, r)
                    elif parallel:
                        _run_parallel(
                            suite,
                            protocol,
                            todo,
                            planned,
                            root,
                            threads,
                            jobs,
                            str(device),
                            bar,
                            record,
                        )
                    for i, (m, s) in enumerate([] if parallel else todo):
                        bar.set_description_str(f"{suite.name}: run {i + 1}/{len(todo)}")
                        bar.set_postfix_str(f"{m} seed {s}")
                        start = bar.n
                        budget = planned[(m, s)]

                        def advance(n: int = 1, _start: int = start, _budget: int = budget) -> None:
                            n = min(int(n), _start + _budget - bar.n)  # never past this run's share
                            if n > 0:
                                bar.update(n)

                        suite.advance = advance  # type: ignore[method-assign]
                        r = _execute(suite, protocol, m, s, root, device)
                        advance(budget)  # early-stopped runs: their remaining epochs are done
                        record(m, s, r)
                finally:
                    bar.close()
                    suite.advance = Suite.advance.__get__(suite)  # type: ignore[method-assign]
        baselines = [done[(STL, s)] for s in seed_list if (STL, s) in done]
        results = {m: [done[(m, s)] for s in seed_list if (m, s) in done] for m in chosen}
        summary = aggregate(results, baselines)
        missing = [f"{m} seed {s}" for m, s in plan if (m, s) not in done]
        if missing:
            summary["notes"].append(f"runs not (yet) done: {', '.join(missing)}")
        if skipped:
            summary["notes"].append(
                "default methods not registered in this installation, skipped: "
                + ", ".join(skipped)
            )
        summary.update(
            {
                "suite": suite.name,
                "description": suite.description,
                "protocol": protocol.to_dict(),
                "methods": chosen,
                "seeds": seed_list,
                "environment": env,
                "results_dir": str(root) if persistent else None,
            }
        )
        if persistent:
            _write_json(root / "summary.json", summary)
            if report:
                from ._report import write_report

                written = write_report(suite, protocol, summary, baselines, results, root)
                summary["report"] = {k: str(v) for k, v in written.items()}
        return summary


def run_suite(
    name: str,
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    quick: bool = False,
    results_dir: str | os.PathLike[str] = "results",
    progress: bool = True,
    *,
    threads: int | None = None,
    report: bool = True,
    train: bool = True,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Run benchmark suite ``name`` and write its report; return the aggregate.

    For each seed the single-task baselines run first, then each method; every run is stored in
    ``results/<suite>[-quick]/<method>/seed<N>.json`` and reused on a later call when its protocol
    matches (rerun when it does not). ``methods=None``: the protocol's default methods that are
    registered; ``seeds``: ``None`` (the protocol's), a count ``n`` (seeds ``0..n-1``) or a list.
    ``threads`` sets ``torch.set_num_threads`` for the runs (default: the suite's
    ``default_threads``); ``jobs``: runs trained at once in worker processes (default: the
    suite's ``default_jobs``); ``train=False`` only re-aggregates and re-reports the stored
    results.
    """
    suite = get_suite(name)
    protocol = suite.protocol(quick)
    return run_protocol(
        suite,
        protocol,
        methods,
        seeds,
        out_dir=results_dir_for(name, quick, results_dir),
        progress=progress,
        threads=threads,
        report=report,
        train=train,
        jobs=jobs,
    )
