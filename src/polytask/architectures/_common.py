"""Machinery shared by the architectures: multi-input dispatch, auxiliary losses, helpers.

Every architecture here follows one convention for **multi-input batches**: a mapping
``{task: x_task}`` whose keys are all task names of the model gives each task its own input
(possibly of its own batch size). Task ``t``'s prediction is then what the single-input model
predicts for ``t`` on ``x_t``: ``model({t: x_t})[t] == model(x_t)[t]`` (up to batch statistics:
each task's input is its own batch). Architectures compute only what task ``t`` needs on
``x_t``. A mapping whose keys are not all task names is a single batch handed to the encoder as is
(encoders may take dicts).

A multi-input batch has one representation per task (each task's own input), not one tensor
that every task reads, so ``encode`` raises :class:`NotImplementedError` on it: train
multi-input batches in the engine's params mode (the trainer falls back to ``model(x)`` there).
``last_gate_weights`` keys of a multi-input forward are prefixed with ``"<task>:"``.

**Representation contract.** Where ``encode`` exists it is *exact* for the engine
(:func:`polytask.mtl_backward` with ``features``): (1) only shared parameters feed the features,
and (2) shared parameters reach the predictions only through the features (``decode`` holds task
parameters only; what it reads besides the features is parameter-free, e.g. the raw input for the
gates). Both modes of the engine are then exact. Where no tensor satisfies this (e.g. MMoE with a
learned ``gate_input``, PLE with more than one level) ``encode`` raises
:class:`NotImplementedError` and the engine's params mode (without features) is the way to train.
When the common representation consists of several tensors of different shapes they are
flattened and concatenated into ``[B, F]`` (:func:`pack`); ``decode`` splits them again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._base import MultiTaskModel

ExpertSpec = Callable[[], nn.Module] | nn.Module

# (outputs, auxiliary loss or None, gate weights)
Result = tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]


def is_multi_input(x: Any, task_names: Sequence[str]) -> bool:
    """True for a multi-input batch: a non-empty mapping whose keys are all task names."""
    return isinstance(x, Mapping) and len(x) > 0 and all(k in task_names for k in x)


def reset_parameters(module: nn.Module) -> nn.Module:
    """Re-initialise every submodule that has ``reset_parameters`` (in place); returns it."""
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn):
            fn()
    return module


def make_modules(spec: ExpertSpec, n: int, what: str = "expert") -> list[nn.Module]:
    """``n`` independent modules from a zero-argument factory or a module template.

    A template is deep-copied and every copy is re-initialised (``reset_parameters`` of its
    submodules), so copies start from different weights.
    """
    if n < 0:
        raise ValueError(f"the number of {what}s must be >= 0, got {n}")
    if isinstance(spec, nn.Module):
        return [reset_parameters(copy.deepcopy(spec)) for _ in range(n)]
    if not callable(spec):
        raise TypeError(f"{what}_factory must be a zero-argument callable or an nn.Module")
    mods = [spec() for _ in range(n)]
    for m in mods:
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}_factory must return nn.Module instances, got {type(m)}")
    # A factory returning the same instance twice would silently share weights.
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError(f"{what}_factory returned the same module twice; it must build new ones")
    return mods


def unique_params(*sources: nn.Module | nn.Parameter | Iterable[Any] | None) -> list[nn.Parameter]:
    """Parameters of modules / parameters / nested iterables of them, without duplicates."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()

    def add(p: nn.Parameter) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)

    def visit(s: Any) -> None:
        if s is None:
            return
        if isinstance(s, nn.Parameter):
            add(s)
        elif isinstance(s, nn.Module):
            for p in s.parameters():
                add(p)
        elif isinstance(s, Mapping):
            for v in s.values():
                visit(v)
        elif isinstance(s, Iterable):
            for v in s:
                visit(v)
        else:
            raise TypeError(f"cannot collect parameters from {type(s)}")

    for s in sources:
        visit(s)
    return out


def check_heads(heads: Mapping[str, nn.Module], what: str = "heads") -> list[str]:
    if not heads:
        raise ValueError(f"at least one task is needed ({what} is empty)")
    for name, head in heads.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"task names must be non-empty strings, got {name!r}")
        if "." in name:
            raise ValueError(f"task name {name!r} must not contain '.' (used in module names)")
        if not isinstance(head, nn.Module):
            raise TypeError(f"{what}[{name!r}] must be an nn.Module")
    return list(heads)


def flatten_batch(x: Any, what: str = "gate") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"the {what} reads the flattened input, which needs a tensor batch; for dict or other "
            "inputs pass a gate_input module that maps the batch to a [B, F] tensor"
        )
    return x.reshape(x.shape[0], -1) if x.dim() != 2 else x


def pack(parts: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, ...]] | None]:
    """One tensor from several ``[B, ...]`` tensors: the tensor itself for one part, else the
    flattened parts concatenated to ``[B, F]``; returns it and the layout for :func:`unpack`."""
    if len(parts) == 1:
        return parts[0], None
    shapes = [tuple(p.shape[1:]) for p in parts]
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1), shapes


def unpack(z: Tensor, layout: list[tuple[int, ...]] | None) -> list[Tensor]:
    """Inverse of :func:`pack`."""
    if layout is None:
        return [z]
    out, start = [], 0
    for shape in layout:
        n = math.prod(shape)
        out.append(z[:, start : start + n].reshape(z.shape[0], *shape))
        start += n
    if start != z.shape[1]:
        raise RuntimeError("decode got features of another layout than encode produced")
    return out


def has_trainable(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


class _Model(MultiTaskModel):
    """Base of the architectures: dispatches single- and multi-input batches.

    Subclasses implement ``_forward(x, tasks) -> (outputs, aux, gates)``; those with a common
    representation implement ``_encode(x, tasks) -> (features, ctx)`` and
    ``_decode(features, ctx, tasks) -> (outputs, aux, gates)`` instead (``ctx`` carries what the
    decoder needs besides the features, e.g. the gates' input) and set ``_has_encode = True``.
    """

    _has_encode: bool = False
    #: ``decode`` reads what ``encode`` remembered (``ctx``), so it must follow ``encode``.
    _decode_needs_ctx: bool = True
    #: how auxiliary losses of the per-task runs of a multi-input batch combine.
    _aux_reduce: str = "sum"

    def __init__(self) -> None:
        super().__init__()
        self._last_aux: Tensor | None = None
        self._ctx: Any = None
        self._has_ctx = False
        self.last_gate_weights: dict[str, Tensor] = {}

    # -- subclass hooks -------------------------------------------------------------------------
    def _no_representation(self) -> str | None:
        """Why this configuration has no exact common representation (``None``: it has one)."""
        return None if self._has_encode else "it has no common representation"

    def _forward(self, x: Any, tasks: tuple[str, ...]) -> Result:
        feats, ctx = self._encode(x, tasks)
        return self._decode(feats, ctx, tasks)

    def _encode(self, x: Any, tasks: tuple[str, ...]) -> tuple[Tensor, Any]:
        raise NotImplementedError(
            f"{type(self).__name__} exposes no common representation; "
            "use the engine's 'params' mode"
        )

    def _decode(self, features: Tensor, ctx: Any, tasks: tuple[str, ...]) -> Result:
        raise NotImplementedError

    # -- public contract ------------------------------------------------------------------------
    def forward(self, x: Any) -> dict[str, Tensor]:
        if is_multi_input(x, self.task_names):
            results = {t: self._forward(xt, (t,)) for t, xt in x.items()}
            return self._merge(results)
        out, aux, gates = self._forward(x, tuple(self.task_names))
        self._last_aux = aux
        self.last_gate_weights = gates
        return out

    def encode(self, x: Any) -> Tensor:
        reason = self._no_representation()
        if reason is not None:
            raise NotImplementedError(
                f"{type(self).__name__} exposes no common representation ({reason}); "
                "use the engine's 'params' mode without features"
            )
        if is_multi_input(x, self.task_names):
            raise NotImplementedError(
                f"{type(self).__name__}: a multi-input batch (one input per task) has one "
                "representation per task, not one tensor that every task reads; use the engine's "
                "'params' mode without features for multi-input batches"
            )
        feats, ctx = self._encode(x, tuple(self.task_names))
        self._ctx = ctx
        self._has_ctx = True
        return feats

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        reason = self._no_representation()
        if reason is not None:
            raise NotImplementedError(f"{type(self).__name__} has no decode ({reason})")
        if not isinstance(features, Tensor):
            raise TypeError(
                f"{type(self).__name__}.decode takes the tensor encode returned, "
                f"got {type(features).__name__}"
            )
        if self._decode_needs_ctx and not self._has_ctx:
            raise RuntimeError(f"{type(self).__name__}.decode must follow encode of the same batch")
        out, aux, gates = self._decode(features, self._ctx, tuple(self.task_names))
        self._last_aux = aux
        self.last_gate_weights = gates
        return out

    def auxiliary_loss(self) -> Tensor | None:
        """The regulariser of the last forward (or decode), a differentiable tensor, or ``None``.

        It is an attribute of the model, not a gradient side effect, so ``zero_grad`` does not
        erase it; add it to the objective before ``backward``.
        """
        return self._last_aux

    # -- helpers --------------------------------------------------------------------------------
    def _merge(self, results: dict[str, Result]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        auxes: list[Tensor] = []
        gates: dict[str, Tensor] = {}
        for t, (o, aux, g) in results.items():
            out[t] = o[t]
            if aux is not None:
                auxes.append(aux)
            for k, v in g.items():
                gates[f"{t}:{k}"] = v
        if auxes:
            total = torch.stack(auxes).sum()
            self._last_aux = total / len(auxes) if self._aux_reduce == "mean" else total
        else:
            self._last_aux = None
        self.last_gate_weights = gates
        return out

    def _ctx_tensor(self, ctx: Any, key: str, features: Tensor) -> Tensor:
        if not isinstance(ctx, Mapping) or key not in ctx:
            raise RuntimeError(f"{type(self).__name__}.decode must follow encode of the same batch")
        value = ctx[key]
        if isinstance(value, Mapping):
            value = next(iter(value.values()))
        if value.shape[0] != features.shape[0]:
            raise RuntimeError(
                f"{type(self).__name__}.decode got a batch of {features.shape[0]} but the last "
                f"encode saw {value.shape[0]}; decode must follow encode of the same batch"
            )
        return ctx[key]
