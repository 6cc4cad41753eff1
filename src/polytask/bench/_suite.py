"""Benchmark suites: versioned protocols and the suite registry.

A suite fixes everything a number depends on (data split, model, optimiser, schedule, epochs,
seeds, metrics) in a :class:`Protocol` with a version string. Results are stored per
``results/<suite>/<method>/seed<N>.json`` together with the protocol they came from; a stored
result whose protocol differs is not reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Protocol",
    "Published",
    "RunResult",
    "Suite",
    "available_suites",
    "get_suite",
    "register_suite",
]


@dataclass(frozen=True)
class Protocol:
    """The versioned settings of a suite (``quick`` protocols are separate versions)."""

    suite: str
    version: str
    settings: dict[str, Any]
    seeds: tuple[int, ...] = (0, 1, 2)
    default_methods: tuple[str, ...] = ()

    def key(self) -> dict[str, Any]:
        """What must match for a stored result to be reused."""
        return {"suite": self.suite, "version": self.version, "settings": self.settings}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """One (method, seed) run of a suite.

    ``test`` holds the test metrics (``"task/metric"``) of the checkpoint selected on validation
    data; ``history`` the per-epoch log rows (losses, weights, validation metrics);
    ``extras`` suite-specific data (e.g. toy trajectories, gradient cosine matrices).
    """

    method: str
    seed: int
    test: dict[str, float]
    higher_is_better: dict[str, bool]
    time_per_epoch: float
    peak_memory_mb: float
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict` (e.g. for a result read back from JSON)."""
        return cls(**d)


@dataclass(frozen=True)
class Published:
    """Published numbers a suite's results can be set beside (see ``/shared/references.md``).

    ``matches`` says whether the suite's protocol is the published one; when it is not,
    ``note`` says what differs and the numbers are context only. ``delta_m`` maps polytask method
    names to the published Δm%; ``metrics`` maps method names (``"stl"`` included) to published
    ``{"task/metric": value}``; ``delta_m_se`` the published standard errors where given.
    """

    source: str
    protocol: str
    matches: bool
    note: str = ""
    delta_m: dict[str, float] = field(default_factory=dict)
    delta_m_se: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


class Suite:
    """Base class of a benchmark suite.

    Subclasses set ``name`` and ``description``, build their :meth:`protocol`, and implement
    :meth:`run` (one method, one seed) and, where Δm% applies, :meth:`run_baseline` (the
    single-task baselines of one seed, returning one merged :class:`RunResult` with method
    ``"stl"``). ``has_baselines = False`` for suites without single-task baselines (toy).
    """

    name: str = ""
    description: str = ""
    has_baselines: bool = True
    # set by the runner before the runs: progress display on/off; device ("auto", "cpu", ...)
    progress: bool = True
    device: str = "auto"
    #: torch CPU threads for the runs when the caller gives none (``None``: torch's default).
    #: Small models run faster on one thread, above all on a shared CPU, where idle OpenMP
    #: threads spin; not part of the protocol (it changes no result beyond float round-off).
    default_threads: int | None = None
    #: runs trained at once in worker processes when the caller gives no ``jobs`` (1: in this
    #: process). Results do not depend on it; only single-threaded CPU suites should set 2.
    default_jobs: int = 1

    def advance(self, n: int = 1) -> None:
        """Report ``n`` finished epochs of the current run (the runner's progress bar replaces
        this before the runs; a suite calls it once per epoch, the toy once per ``stride``)."""

    def planned_epochs(self, method: str, protocol: Protocol) -> int:
        """How many :meth:`advance` units one run of ``method`` (``"stl"``: all single-task
        baselines of a seed) reports, for the progress bar's total and ETA; default: the
        protocol's ``trainer.epochs`` or ``epochs`` setting, else 1."""
        s = protocol.settings
        epochs = s.get("trainer", {}).get("epochs", s.get("epochs", 1))
        return max(1, int(epochs))

    def run_batch(
        self, todo: Sequence[tuple[str, int]], protocol: Protocol, jobs: int, advance: Any
    ) -> Iterator[tuple[str, int, RunResult]] | None:
        """Optional: train the runs ``todo`` with ``jobs`` processes in a suite-specific way,
        yielding ``(method, seed, RunResult)`` as runs finish and calling ``advance(n)`` for
        progress. ``None`` (the default): the runner trains whole runs in a process pool."""
        return None

    def relative_cost(self, method: str, protocol: Protocol) -> float:
        """A rough relative cost of one run, used only to start the longest runs first when
        runs are trained in parallel (``jobs > 1``); default: ``planned_epochs``."""
        return float(self.planned_epochs(method, protocol))

    def protocol(self, quick: bool) -> Protocol:
        raise NotImplementedError

    def prepare(self, protocol: Protocol) -> None:
        """Load and cache what every run shares (data), before any run is timed or measured."""

    def available_methods(self) -> list[str]:
        """Method names :meth:`run` accepts; default: the registered balancers."""
        from .. import balancers

        return balancers.available()

    def published(self, protocol: Protocol) -> list[Published]:
        """Published numbers to compare with; default none."""
        return []

    def run(self, method: str, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        raise NotImplementedError

    def run_baseline(self, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        raise NotImplementedError

    def plots(self, results: dict[str, list[RunResult]], out_dir: Path) -> list[Path]:
        """Suite-specific figures (PNG) for the report; default none."""
        return []

    def sections(self, results: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
        """Suite-specific report sections: ``{"title", "text", "table": (head, rows)}``
        (``table`` optional), shown after the results table; default none."""
        return []


_SUITES: dict[str, Callable[[], Suite]] = {}


def register_suite(name: str) -> Callable[[type[Suite]], type[Suite]]:
    def deco(cls: type[Suite]) -> type[Suite]:
        if name in _SUITES:
            raise ValueError(f"suite {name!r} is already registered")
        cls.name = name
        _SUITES[name] = cls
        return cls

    return deco


def available_suites() -> list[str]:
    return sorted(_SUITES)


def get_suite(name: str) -> Suite:
    try:
        return _SUITES[name]()
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; available: {available_suites()}") from None
