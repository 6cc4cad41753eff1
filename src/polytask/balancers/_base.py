"""Balancer base classes, capability records and the registry.

A *balancer* turns the per-task gradients of the shared parameters (a Jacobian ``J`` of shape
``[K, P]``) and optionally the task losses (``[K]``) into one update direction ``[P]``. Three
families share that contract and differ in what they need, which their capability record says:

* :class:`LossWeighting` needs only the losses: ``direction = w(losses) @ J``; the engine runs one
  ordinary backward pass on :meth:`LossWeighting.objective`.
* :class:`GramianWeighting` needs only the Gramian ``G = J J^T`` (``[K, K]``):
  ``direction = w(G, losses) @ J``; the engine may compute ``G`` without materialising ``J``.
* :class:`JacobianAggregator` needs the full Jacobian (projections, per-coordinate operations,
  momentum buffers of gradients).

The engine and the trainer read :class:`BalancerInfo` records and never branch on method names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Needs = Literal["losses", "gramian", "jacobian"]
Mode = Literal["params", "representation"]

__all__ = [
    "Balancer",
    "BalancerInfo",
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "available",
    "create",
    "info",
    "register",
]


@dataclass(frozen=True)
class BalancerInfo:
    """Capability record of a registered balancer (read by the engine and the trainer).

    Attributes:
        name: canonical lower-case name.
        needs: what the method consumes: ``"losses"``, ``"gramian"`` or ``"jacobian"``.
        paper: short citation (authors, venue, year).
        description: one line for ``polytask list``.
        stateful: the method keeps state across steps (in ``state_dict``).
        learnable: the method owns parameters to optimise together with the model.
        protocol: extra training-protocol needs, e.g. ``"loss_after_step"`` (FAMO re-evaluates the
            losses after the optimiser step and calls :meth:`Balancer.after_step`),
            ``"extra_batch"`` (MoDo/SDMGrad need more than one batch per step).
        modes: engine modes the method can work in.
        hparams: default hyperparameters (from the constructor signature).
        reference: the reference implementation followed.
        mode: the engine mode the method is defined for (``None``: whichever the user picks), e.g.
            ``"representation"`` for ``mgda_ub``; the trainer uses it as the default mode.
    """

    name: str
    cls: type[Balancer]
    needs: Needs
    paper: str
    description: str
    stateful: bool = False
    learnable: bool = False
    protocol: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("params", "representation")
    hparams: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    mode: str | None = None


_REGISTRY: dict[str, BalancerInfo] = {}


def register(
    name: str,
    *,
    paper: str,
    description: str,
    stateful: bool = False,
    learnable: bool = False,
    protocol: tuple[str, ...] = (),
    modes: tuple[str, ...] = ("params", "representation"),
    reference: str = "",
    mode: str | None = None,
) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator adding a balancer to the registry under ``name`` (validated)."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"balancer name {name!r} must be lower-case letters, digits and '_'")

    def deco(cls: type[Balancer]) -> type[Balancer]:
        if name in _REGISTRY:
            raise ValueError(f"balancer {name!r} is already registered by {_REGISTRY[name].cls}")
        if not issubclass(cls, Balancer):
            raise TypeError(f"{cls} is not a Balancer")
        sig = inspect.signature(cls.__init__)
        params = list(sig.parameters.values())[1:]
        if not params or params[0].name != "n_tasks":
            raise TypeError(f"{cls.__name__}.__init__ must take n_tasks as its first argument")
        hparams = {
            p.name: p.default
            for p in params[1:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        needs = cls.needs
        rec = BalancerInfo(
            name=name,
            cls=cls,
            needs=needs,
            paper=paper,
            description=description,
            stateful=stateful,
            learnable=learnable,
            protocol=tuple(protocol),
            modes=tuple(modes),
            hparams=hparams,
            reference=reference,
            mode=mode,
        )
        _REGISTRY[name] = rec
        cls.info = rec
        return cls

    return deco


def available() -> list[str]:
    """Sorted canonical names of every registered balancer."""
    return sorted(_REGISTRY)


def info(name: str) -> BalancerInfo:
    """The capability record of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown balancer {name!r}; available: {', '.join(available())}"
        ) from None


def create(name: str, n_tasks: int, **hparams: Any) -> Balancer:
    """Instantiate the balancer ``name`` for ``n_tasks`` tasks.

    Unknown hyperparameters are errors (never silently ignored).
    """
    rec = info(name)
    unknown = sorted(set(hparams) - set(rec.hparams))
    if unknown:
        raise TypeError(
            f"balancer {name!r} has no hyperparameter(s) {unknown}; "
            f"it accepts {sorted(rec.hparams) or 'none'}"
        )
    return rec.cls(n_tasks, **hparams)


class Balancer(nn.Module):
    """Base class: maps a Jacobian ``[K, P]`` (and losses ``[K]``) to a direction ``[P]``.

    Subclasses are :class:`torch.nn.Module` so that state (buffers) and learnable parameters go
    into ``state_dict`` and move with ``.to(device)``. ``last_weights`` holds the task weights used
    by the last call (``None`` where the method has no such weights).
    """

    info: ClassVar[BalancerInfo]
    needs: ClassVar[Needs] = "jacobian"

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        self.n_tasks = n_tasks
        self.last_weights: Tensor | None = None

    # -- public API -----------------------------------------------------------------------
    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        """Update direction ``[P]`` for the shared parameters.

        Args:
            jacobian: ``[K, P]`` per-task gradients (row ``i`` is the gradient of loss ``i``).
            losses: ``[K]`` task losses (required by methods that use them).
        """
        jacobian, losses = self._check(jacobian, losses)
        return self._combine(jacobian, losses)

    def after_step(self, losses: Tensor) -> None:  # noqa: B027 - optional hook
        """Called with the losses re-evaluated after the optimiser step (``loss_after_step``)."""

    def epoch_end(self) -> None:  # noqa: B027 - optional hook
        """Called by the trainer at the end of every training epoch (e.g. DWA's loss history)."""

    # -- to implement ---------------------------------------------------------------------
    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------
    def _check(self, jacobian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor | None]:
        name = type(self).__name__
        if not isinstance(jacobian, Tensor) or jacobian.ndim != 2:
            shape = tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian)
            raise ValueError(f"{name}: jacobian must be a [K, P] tensor, got {shape}")
        if jacobian.shape[0] != self.n_tasks:
            raise ValueError(
                f"{name}: jacobian has {jacobian.shape[0]} rows but the balancer was created "
                f"for {self.n_tasks} tasks (expected shape [{self.n_tasks}, P])"
            )
        if losses is not None:
            losses = torch.as_tensor(losses, dtype=jacobian.dtype, device=jacobian.device)
            if losses.shape != (self.n_tasks,):
                raise ValueError(
                    f"{name}: losses must have shape [{self.n_tasks}], got {tuple(losses.shape)}"
                )
        return jacobian, losses

    def _require_losses(self, losses: Tensor | None) -> Tensor:
        if losses is None:
            raise ValueError(f"{type(self).__name__} needs the task losses: combine(J, losses)")
        return losses

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"


class LossWeighting(Balancer):
    """A method that weights the task losses: ``direction = w @ J``.

    Implement :meth:`weights`; methods with learnable parameters or regularisers override
    :meth:`objective` (the scalar the engine backpropagates once).
    """

    needs: ClassVar[Needs] = "losses"

    def weights(self, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    def objective(self, losses: Tensor) -> Tensor:
        """Scalar training objective for one ordinary backward pass; records ``last_weights``."""
        w = self.weights(losses.detach()).to(losses.dtype)
        self.last_weights = w.detach()
        return (w * losses).sum()

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        w = self.weights(None if losses is None else losses.detach()).to(jacobian)
        self.last_weights = w.detach()
        return w @ jacobian


class GramianWeighting(Balancer):
    """A method whose weights depend on the Gramian ``G = J J^T`` only.

    Implement :meth:`weights_from_gramian`; the direction is ``w @ J``.
    """

    needs: ClassVar[Needs] = "gramian"

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        gramian = jacobian @ jacobian.T
        w = self.weights_from_gramian(gramian, losses)
        self.last_weights = w.detach()
        return w @ jacobian


class JacobianAggregator(Balancer):
    """A method that needs the full Jacobian (projections, masks, gradient buffers)."""

    needs: ClassVar[Needs] = "jacobian"
