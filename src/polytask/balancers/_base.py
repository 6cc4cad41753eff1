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
* :class:`MultiBatchWeighting` (a :class:`GramianWeighting`) needs the Jacobians of ``B``
  independent batches of the same tasks (MoDo, SDMGrad): its weights come from the ``[B, K, B, K]``
  Gramian of the stacked Jacobian, its direction is a combination of all ``B * K`` rows.

The engine and the trainer read :class:`BalancerInfo` records and never branch on method names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    "MultiBatchWeighting",
    "available",
    "create",
    "info",
    "register",
    "stack_batches",
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
        protocol: extra training-protocol needs:

            * ``"loss_after_step"``: after the optimiser step, the losses of the same batch are
              re-evaluated (no gradient) and passed to :meth:`Balancer.after_step` (FAMO);
            * ``"last_shared_layer"``: the method uses the gradients of the last shared layer
              (GradNorm); the trainer calls :meth:`Balancer.set_last_shared_layer` once with the
              number of trailing Jacobian columns that hold them;
            * ``"extra_batch"``: every step needs ``n_batches`` independent batches of the same
              tasks (MoDo, SDMGrad). The balancer is a :class:`MultiBatchWeighting`; it receives
              the Jacobians of the batches stacked as ``[n_batches, K, P]`` (losses
              ``[n_batches, K]``), through :meth:`MultiBatchWeighting.combine` or, in the engine,
              through :func:`stack_batches`. ``combine(J, losses)`` with a single ``[K, P]``
              Jacobian still works: every batch is then taken to be that one.
        modes: engine modes the method can work in.
        hparams: default hyperparameters (from the constructor signature).
        reference: the reference implementation followed.
        mode: the engine mode the method is defined for (``None``: whichever the user picks), e.g.
            ``"representation"`` for ``mgda_ub``; the trainer uses it as the default mode.
        n_batches: independent batches one step consumes (``> 1`` exactly when ``protocol``
            holds ``"extra_batch"``).
        host_syncs: most host synchronisations one :meth:`Balancer.combine` call makes, for any
            input, with the default hyperparameters: reads of a tensor's value into Python
            (``item``, ``bool``, ``float``, ``int``, ``tolist``, ``numpy``, ``cpu``), each of
            which waits for an accelerator. Closed-form methods make none. ``None``: the method
            runs an iterative solver that tests its convergence on the host (once per iteration
            on CPU, every few iterations on accelerators), so the count depends on the input and
            is bounded only by the solver's iteration cap. The conformance suite counts them.
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
    n_batches: int = 1
    host_syncs: int | None = 0

    def __post_init__(self) -> None:
        if self.n_batches < 1:
            raise ValueError(f"{self.name}: n_batches must be >= 1, got {self.n_batches}")
        if (self.n_batches > 1) != ("extra_batch" in self.protocol):
            raise ValueError(
                f"{self.name}: protocol 'extra_batch' goes with n_batches > 1 "
                f"(got protocol={self.protocol}, n_batches={self.n_batches})"
            )
        if self.host_syncs is not None and self.host_syncs < 0:
            raise ValueError(f"{self.name}: host_syncs must be >= 0 or None")


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
    n_batches: int = 1,
    host_syncs: int | None = 0,
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
            n_batches=n_batches,
            host_syncs=host_syncs,
        )
        _REGISTRY[name] = rec
        cls.info = rec
        return cls

    return deco


def single_batch_protocol(protocol: tuple[str, ...]) -> tuple[str, ...]:
    """``protocol`` without ``"extra_batch"``: for wrappers that call a multi-batch method through
    its single-batch form (``weights_from_gramian`` / ``combine`` on one ``[K, P]`` Jacobian)."""
    return tuple(p for p in protocol if p != "extra_batch")


def sum_host_syncs(counts: list[int | None]) -> int | None:
    """Host-sync budget of a wrapper calling each member once: the sum, ``None`` if any is."""
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


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

    def reuse_weights(self) -> Tensor | None:
        """Weights this step takes without looking at the gradients, or ``None`` (the default).

        Amortised methods (:class:`~polytask.balancers.Amortized`) return their cached weights on
        the steps between two recomputations, and count the step. The engine then skips the
        per-task gradients and runs one ordinary backward of ``sum_i w_i L_i`` for the shared
        parameters, which gives exactly the direction ``w @ J``.
        """
        return None

    def after_step(self, losses: Tensor) -> None:
        """Called with the losses re-evaluated after the optimiser step (``loss_after_step``)."""

    def set_last_shared_layer(self, n_columns: int) -> None:
        """Protocol ``"last_shared_layer"``: the last ``n_columns`` columns of the Jacobians this
        balancer will receive are the gradients of the last shared layer."""

    def epoch_end(self) -> None:
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


class MultiBatchWeighting(GramianWeighting):
    """A weighting of the Jacobians of several independent batches (protocol ``"extra_batch"``).

    Stochastic multi-objective methods (MoDo, SDMGrad) need unbiased estimates of products of
    gradients such as ``J J^T lambda``, hence several *independent* stochastic Jacobians of the
    same tasks at the same parameters per step. With ``B = info.n_batches`` such Jacobians
    ``J_1..J_B`` (``[K, P]`` each), the method sees the block Gramian
    ``G[a, i, b, j] = <J_a[i], J_b[j]>`` (``[B, K, B, K]``) and returns weights ``W`` (``[B, K]``);
    the direction is ``sum_{a, i} W[a, i] J_a[i]``. So it only ever needs inner products, and
    the engine can compute ``G`` without materialising any Jacobian (:func:`stack_batches`).

    Entry points:

    * :meth:`combine` with ``[B, K, P]`` (and losses ``[B, K]``): the stacked Jacobians;
    * :meth:`combine` with ``[K, P]`` (losses ``[K]``): every batch is this one (the
      single-batch form every balancer supports); the weights are then summed over the batches;
    * :func:`stack_batches` for :func:`polytask.mtl_backward` with the ``B * K`` losses of the
      ``B`` batches concatenated batch by batch.

    ``last_weights`` holds the per-task weights summed over the batches (``[K]``).
    Implement :meth:`weights_from_batch_gramian`.
    """

    @property
    def n_batches(self) -> int:
        """Independent batches one step consumes (``info.n_batches``)."""
        return self.info.n_batches

    def weights_from_batch_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        """Weights ``[B, K]`` from the block Gramian ``[B, K, B, K]`` and losses ``[B, K]``.

        Called once per training step; stateful methods advance their state here.
        """
        raise NotImplementedError

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        B, K = self.n_batches, gramian.shape[0]
        blocks = gramian.reshape(1, K, 1, K).expand(B, K, B, K)
        per_batch = None if losses is None else losses.reshape(1, K).expand(B, K)
        return self.weights_from_batch_gramian(blocks, per_batch).sum(0)

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        """Direction ``[P]`` from ``[K, P]`` (one batch) or ``[n_batches, K, P]`` Jacobians."""
        if not (isinstance(jacobian, Tensor) and jacobian.ndim == 3):
            return super().combine(jacobian, losses)
        name = type(self).__name__
        B, K = self.n_batches, self.n_tasks
        if jacobian.shape[:2] != (B, K):
            raise ValueError(
                f"{name}: stacked jacobians must have shape [{B}, {K}, P] (n_batches, n_tasks, "
                f"P), got {tuple(jacobian.shape)}"
            )
        if losses is not None:
            losses = torch.as_tensor(losses, dtype=jacobian.dtype, device=jacobian.device)
            if losses.shape != (B, K):
                raise ValueError(
                    f"{name}: losses of stacked batches must have shape [{B}, {K}], "
                    f"got {tuple(losses.shape)}"
                )
        rows = jacobian.reshape(B * K, jacobian.shape[2])
        gramian = (rows @ rows.T).reshape(B, K, B, K)
        w = self.weights_from_batch_gramian(gramian, losses)
        self.last_weights = w.detach().sum(0)
        return w.reshape(-1).to(rows) @ rows


class BatchStack(GramianWeighting):
    """A :class:`MultiBatchWeighting` seen as a weighting of ``B * K`` losses (for the engine).

    Created by :func:`stack_batches`; the wrapped balancer is the submodule ``base`` (its state is
    this module's state under ``base.``).
    """

    def __init__(self, balancer: MultiBatchWeighting) -> None:
        if not isinstance(balancer, MultiBatchWeighting):
            raise TypeError(
                f"stack_batches needs a MultiBatchWeighting (protocol 'extra_batch'), got "
                f"{type(balancer).__name__}"
            )
        super().__init__(balancer.n_batches * balancer.n_tasks)
        self.base = balancer
        rec = balancer.info
        self.info = replace(
            rec,
            cls=BatchStack,
            protocol=tuple(p for p in rec.protocol if p != "extra_batch"),
            n_batches=1,
        )

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        B, K = self.base.n_batches, self.base.n_tasks
        w = self.base.weights_from_batch_gramian(
            gramian.reshape(B, K, B, K), None if losses is None else losses.reshape(B, K)
        )
        self.base.last_weights = w.detach().sum(0)
        return w.reshape(-1)

    def after_step(self, losses: Tensor) -> None:
        self.base.after_step(losses)

    def epoch_end(self) -> None:
        self.base.epoch_end()


def stack_batches(balancer: MultiBatchWeighting) -> BatchStack:
    """Wrap a multi-batch method for :func:`polytask.mtl_backward` over ``B`` batches.

    Forward the ``B = balancer.n_batches`` batches, concatenate their task losses batch by batch
    (``B * K`` losses: batch 0's ``K`` tasks, then batch 1's, ...) and pass them with the
    returned balancer. The engine computes the ``[B K, B K]`` Gramian (exactly, also through
    the activation-based path), the wrapped method turns it into weights, and each shared
    parameter's ``.grad`` receives ``sum_{a, i} W[a, i] grad L_{a, i}``; task-specific
    parameters receive the sum of their task's gradients over the ``B`` batches (as the
    reference implementations of MoDo and SDMGrad give them). ``mtl_backward`` returns the
    ``B * K`` weights; ``balancer.last_weights`` holds the per-task weights summed over batches.

    >>> import torch, polytask.balancers as B
    >>> modo = B.create("modo", n_tasks=2)
    >>> stacked = B.stack_batches(modo)
    >>> stacked.n_tasks  # two batches of two tasks
    4
    """
    return BatchStack(balancer)
