"""Benchmarks: versioned suites, a resumable runner, aggregated reports.

>>> from polytask.bench import available_suites
>>> "multi_mnist" in available_suites()
True

Run one from Python (``polytask bench SUITE`` from the shell)::

    from polytask.bench import run_suite
    summary = run_suite("multi_mnist", quick=True, seeds=1, methods=["mean", "pcgrad"])

See ``docs/benchmarks.md`` for the protocols, measured run times and how to read the reports.
"""

from . import qm9, suites, toy, vision  # noqa: F401  (register every suite)
from ._runner import (
    MemoryMeter,
    aggregate,
    gradient_conflict,
    resolve_methods,
    resolve_seeds,
    results_dir_for,
    run_protocol,
    run_suite,
)
from ._suite import (
    Protocol,
    Published,
    RunResult,
    Suite,
    available_suites,
    get_suite,
    register_suite,
)
from .suites import TrainerSuite

__all__ = [
    "MemoryMeter",
    "Protocol",
    "Published",
    "RunResult",
    "Suite",
    "TrainerSuite",
    "aggregate",
    "available_suites",
    "get_suite",
    "gradient_conflict",
    "register_suite",
    "resolve_methods",
    "resolve_seeds",
    "results_dir_for",
    "run_protocol",
    "run_suite",
]
