"""Name-based access to the dataset builders: :func:`available`, :func:`describe`, :func:`load`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import MultiTaskData
from .images import multi_fashion, multi_fashion_mnist, multi_mnist
from .movielens import movielens_esmm
from .qm9 import qm9
from .tabular import census, rf1
from .text import reviews

__all__ = ["available", "describe", "load", "register"]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., MultiTaskData]
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, builder: Callable[..., MultiTaskData], summary: str) -> None:
    """Add a builder under ``name`` (``summary`` is the one-line description)."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = _Entry(builder, summary)


register(
    "multi_mnist",
    multi_mnist,
    "MultiMNIST: two overlaid MNIST digits on 36x36 (left/right, 10 classes each).",
)
register(
    "multi_fashion",
    multi_fashion,
    "MultiFashion: two overlaid Fashion-MNIST items on 36x36 (left/right, 10 classes each).",
)
register(
    "multi_fashion_mnist",
    multi_fashion_mnist,
    "Multi-(Fashion+MNIST): MNIST digit top-left + Fashion item bottom-right (10 classes each).",
)
register(
    "census",
    census,
    "UCI Adult census: income >50K and never-married (MMoE set-up), tabular features.",
)
register(
    "rf1", rf1, "Mulan RF1 river flow: 8 regression targets (48h-ahead flows) from 64 features."
)
register(
    "movielens_esmm",
    movielens_esmm,
    "MovieLens 100k entire space (ESMM): click = rated, ctcvr = rated >= 4; sampled unrated pairs.",
)
register(
    "qm9",
    qm9,
    "QM9: 11 molecular property regressions; graph (z, pos) or Coulomb-matrix feature inputs.",
)
register(
    "reviews",
    reviews,
    "Women's clothing reviews: rating (5), recommended (2), department (6) from TF-IDF text.",
)


def available() -> list[str]:
    """Names accepted by :func:`load`, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(available())}") from None


def describe(name: str) -> str:
    """One-line description of dataset ``name``."""
    return _entry(name).summary


def load(name: str, **kwargs: Any) -> MultiTaskData:
    """Build dataset ``name``; ``kwargs`` go to its builder (``n_train``, ``seed``, ...)."""
    return _entry(name).builder(**kwargs)
