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
* A mapping ``{task: x_task}`` whose keys are all task names is a multi-input batch (one input per
  task); see :mod:`polytask.architectures._common`.

Each registered architecture has a capability record (:class:`ArchitectureInfo`): whether it has
an exact representation, gates, an auxiliary loss, multi-input batches, what its predictions are
(logits or probabilities), and its ``torch.compile`` status. The test suite checks every claim of
every record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

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


Representation = Literal["always", "config", "never"]
Compile = Literal["fullgraph", "graph_breaks", "unsupported"]
Outputs = Literal["logits", "probabilities"]


@dataclass(frozen=True)
class ArchitectureInfo:
    """Registry record of an architecture: what it is and what it can do.

    Attributes:
        name: registry name (what configs select).
        factory: the class (or function) :func:`create` calls.
        paper: citation of the paper the architecture comes from.
        description: one line for ``polytask list``.
        needs_staged_encoder: it acts between the stages of an encoder with
            ``stages: nn.ModuleList`` (see :class:`~polytask.architectures.Stages`).
        representation: whether ``encode`` gives an exact common representation for the
            engine's ``features`` / ``mode="representation"``: ``"always"``, ``"config"``
            (depends on the hyperparameters; ``encode`` raises ``NotImplementedError`` naming the
            reason where it has none) or ``"never"``.
        gates: the model records ``last_gate_weights`` (softmax/routing weights whose rows sum
            to 1) on every forward.
        auxiliary_loss: ``auxiliary_loss()`` returns a regulariser to add to the objective
            (the trainer passes it to :func:`polytask.mtl_backward` as ``extra_loss``).
        multi_input: accepts multi-input batches ``{task: x_task}`` (a separate input per task).
        outputs: what the predictions are: ``"logits"`` (what each task's head gives; the usual
            losses and metrics apply), or ``"probabilities"`` of binary tasks (e.g. ESMM's pCTR
            and ``pCTCVR = pCTR * pCVR``: train with the binary cross-entropy of probabilities,
            ``Task.binary(name, probability=True)`` / ``tasks.binary: probability``).
        compile: ``torch.compile`` status of the default configuration: ``"fullgraph"`` (one
            graph, ``fullgraph=True`` works), ``"graph_breaks"`` (compiles, with graph breaks;
            see ``compile_note``) or ``"unsupported"``.
        compile_note: what breaks the graph, and how to avoid it.
    """

    name: str
    factory: Callable[..., MultiTaskModel]
    paper: str
    description: str
    needs_staged_encoder: bool = False
    representation: Representation = "never"
    gates: bool = False
    auxiliary_loss: bool = False
    multi_input: bool = True
    outputs: Outputs = "logits"
    compile: Compile = "fullgraph"
    compile_note: str = ""


_REGISTRY: dict[str, ArchitectureInfo] = {}


def register(
    name: str,
    *,
    paper: str,
    description: str,
    needs_staged_encoder: bool = False,
    representation: Representation = "never",
    gates: bool = False,
    auxiliary_loss: bool = False,
    multi_input: bool = True,
    outputs: Outputs = "logits",
    compile: Compile = "fullgraph",
    compile_note: str = "",
) -> Callable[[Callable[..., MultiTaskModel]], Callable[..., MultiTaskModel]]:
    """Decorator registering an architecture class (or factory) under ``name`` with its
    capability record (see :class:`ArchitectureInfo`)."""
    if representation not in ("always", "config", "never"):
        raise ValueError(f"representation must be always/config/never, got {representation!r}")
    if outputs not in ("logits", "probabilities"):
        raise ValueError(f"outputs must be logits/probabilities, got {outputs!r}")
    if compile not in ("fullgraph", "graph_breaks", "unsupported"):
        raise ValueError(f"compile must be fullgraph/graph_breaks/unsupported, got {compile!r}")
    if compile != "fullgraph" and not compile_note:
        raise ValueError(f"architecture {name!r}: say what breaks torch.compile (compile_note)")

    def deco(factory: Callable[..., MultiTaskModel]) -> Callable[..., MultiTaskModel]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchitectureInfo(
            name,
            factory,
            paper,
            description,
            needs_staged_encoder=needs_staged_encoder,
            representation=representation,
            gates=gates,
            auxiliary_loss=auxiliary_loss,
            multi_input=multi_input,
            outputs=outputs,
            compile=compile,
            compile_note=compile_note,
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
