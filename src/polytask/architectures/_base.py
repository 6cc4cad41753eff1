"""The model contract and the architecture registry.

A polytask model is any :class:`torch.nn.Module` that maps inputs to ``{task_name: prediction}``
and can say which parameters are shared and which belong to each task. :class:`MultiTaskModel`
gives that contract a base class; architectures in the registry subclass it.

* ``encode(x)`` returns the last representation that every task uses (the ``features`` of the
  engine's ``representation`` mode); ``decode(features)`` maps it to the task predictions. Models
  without one common representation (e.g. per-task mixtures in MMoE) return a tensor that all
  tasks read (the stacked expert outputs) or raise :class:`NotImplementedError` from ``encode``.
* ``shared_parameters()`` are the parameters that more than one task uses; the balancer acts on
  their gradients. ``task_parameters(name)`` belong to one task only.
* ``auxiliary_loss()`` returns a regulariser the architecture adds to the objective (load
  balancing, entropy), or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["ArchitectureInfo", "MultiTaskModel", "available", "create", "info", "register"]


class MultiTaskModel(nn.Module):
    """Base class of the model contract (see the module docstring)."""

    task_names: list[str]

    def encode(self, x: Any) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} exposes no common representation; "
            "use the engine's 'params' mode"
        )

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, x: Any) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def auxiliary_loss(self) -> Tensor | None:
        return None

    def _check_task(self, task: str) -> None:
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; the model has tasks {self.task_names}")


@dataclass(frozen=True)
class ArchitectureInfo:
    """Registry record of an architecture."""

    name: str
    factory: Callable[..., MultiTaskModel]
    paper: str
    description: str
    needs_staged_encoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ArchitectureInfo] = {}


def register(
    name: str, *, paper: str, description: str, needs_staged_encoder: bool = False
) -> Callable[[Callable[..., MultiTaskModel]], Callable[..., MultiTaskModel]]:
    """Decorator registering an architecture class (or factory) under ``name``."""

    def deco(factory: Callable[..., MultiTaskModel]) -> Callable[..., MultiTaskModel]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchitectureInfo(
            name, factory, paper, description, needs_staged_encoder
        )
        return factory

    return deco


def available() -> list[str]:
    """Sorted names of the registered architectures."""
    return sorted(_REGISTRY)


def info(name: str) -> ArchitectureInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown architecture {name!r}; available: {', '.join(available())}"
        ) from None


def create(name: str, **kwargs: Any) -> MultiTaskModel:
    """Build the architecture ``name`` with its keyword arguments."""
    return info(name).factory(**kwargs)
