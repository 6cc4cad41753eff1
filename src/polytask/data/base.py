"""Core containers shared by every dataset builder.

* :class:`TaskSpec` -- one task (name, classification/regression, classes, key).
* :class:`MultiTaskData` -- train/val/test datasets plus task metadata.
* :class:`DictDataset` -- a map-style dataset over equally long tensors whose
  items are ``{key: tensor[i]}`` dicts (inputs under ``"x"``, one key per task).

Targets follow one convention across the package: classification targets are
``int64`` scalars in ``[0, n_classes)``, regression targets ``float32`` scalars.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DictDataset",
    "MultiTaskData",
    "TaskKind",
    "TaskSpec",
    "check_size",
    "fit_standardizer",
]

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """Description of one task.

    ``target_key`` is the key of the target in each sample dict (defaults to
    ``name``).  ``n_classes`` is required for classification and must be
    ``None`` for regression.
    """

    name: str
    kind: TaskKind
    n_classes: int | None = None
    target_key: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}")
        if self.kind == "classification" and (self.n_classes is None or self.n_classes < 2):
            raise ValueError(f"task {self.name!r}: classification needs n_classes >= 2")
        if self.kind == "regression" and self.n_classes is not None:
            raise ValueError(f"task {self.name!r}: regression tasks have n_classes=None")
        if not self.target_key:
            object.__setattr__(self, "target_key", self.name)


@dataclass
class MultiTaskData:
    """A multi-task dataset split into train / val / test.

    Attributes:
        train, val, test: map-style datasets yielding sample dicts.
        tasks: the tasks, in a fixed order.
        input_shape: shape of ``sample["x"]`` (``None`` for variable-size
            inputs such as molecular graphs; see ``collate_fn``).
        description: one-paragraph human description.
        source: upstream URL(s), paper and licence.
        collate_fn: batch function for a ``DataLoader``; ``None`` means the
            default collate works.
        target_stats: ``{task: (mean, std)}`` for regression targets that were
            standardised with training statistics (use :meth:`unstandardize`).
        extras: builder-specific metadata (feature names, units, ...).
        cardinalities: ``None`` for real-valued inputs; for categorical inputs, ``sample["x"]``
            is an ``int64`` vector of category codes and ``cardinalities[j]`` is the number of
            categories of field ``j`` (codes lie in ``[0, cardinalities[j])``; model recipes
            embed them, see :class:`polytask.architectures.FieldEmbedding`).
    """

    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any]
    tasks: list[TaskSpec]
    input_shape: tuple[int, ...] | None
    description: str
    source: str
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    target_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    cardinalities: tuple[int, ...] | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {self.task_names}")

    def unstandardize(self, task: str, values: torch.Tensor) -> torch.Tensor:
        """Map standardised regression outputs/targets back to original units."""
        if task not in self.target_stats:
            return values
        mean, std = self.target_stats[task]
        return values * std + mean

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(getattr(self, k))}" for k in ("train", "val", "test"))  # type: ignore[arg-type]
        tasks = ", ".join(
            f"{t.name}:{'cls' + str(t.n_classes) if t.kind == 'classification' else 'reg'}"
            for t in self.tasks
        )
        return f"MultiTaskData({sizes}; input_shape={self.input_shape}; tasks=[{tasks}])"


class DictDataset(Dataset[dict[str, torch.Tensor]]):
    """Map-style dataset over tensors of equal first dimension.

    ``dataset[i]`` returns ``{key: tensor[i] for key in tensors}``.  ``meta``
    holds per-sample tensors that are *not* put into samples (e.g. the index of
    the source image each sample was built from).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not tensors:
            raise ValueError("DictDataset needs at least one tensor")
        lengths = {k: len(v) for k, v in {**tensors, **(meta or {})}.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors have different lengths: {lengths}")
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.meta: dict[str, torch.Tensor] = dict(meta or {})
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def check_size(what: str, requested: int | None, available: int) -> int:
    """Validate a requested subsample size (``None`` means all available)."""
    if requested is None:
        return available
    if requested < 0:
        raise ValueError(f"{what} must be >= 0, got {requested}")
    if requested > available:
        raise ValueError(f"{what}={requested} but only {available} are available")
    return requested


def fit_standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of ``x`` (std of constant columns set to 1)."""
    if len(x) == 0:
        raise ValueError("cannot fit standardisation statistics on an empty training split")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return mean, std


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer sizes for ``fractions`` (summing to 1) of ``n`` items.

    The first size takes the rounding remainder.
    """
    sizes = [round(n * f) for f in fractions[1:]]
    return [n - sum(sizes), *sizes]
