"""The gradient engine: :func:`mtl_backward`, usable from any training loop.

After :func:`mtl_backward` returns, the ``.grad`` of each shared parameter holds the balanced update
(accumulated, like ``loss.backward()``), each task-specific parameter holds its task's gradient,
and the balancer's own learnable parameters (if any) hold theirs. It returns the task weights used
(``None`` where the method has none).

Modes and their costs (``K`` tasks):

* loss-only methods (``needs == "losses"``): one ordinary backward pass of the method's objective,
  whatever the mode.
* ``mode="params"``: the exact per-task gradients of the shared parameters. With ``features`` (the
  last shared representation) the per-task gradients w.r.t. ``features`` are taken first (cheap:
  heads only), then the ``K`` vector-Jacobian products through the encoder run as one batched
  (``vmap``) backward. Gramian methods then need only ``G = J J^T``; Jacobian methods get ``J``.
* ``mode="representation"``: the balancer works on the per-task gradients w.r.t. ``features``
  (``[K, numel(features)]``); the combined gradient is backpropagated through the encoder once.

The engine reads the balancer's capability record (``info.needs``/``info.modes``) and never
branches on method names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._fast import LinearCapture, _Record, fast_backward
from .balancers import Balancer, GramianWeighting, LossWeighting

__all__ = ["jacobian", "mtl_backward", "task_leaves"]

Mode = Literal["params", "representation"]


def _as_param_list(params: Iterable[Tensor], what: str) -> list[Tensor]:
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError(f"{what} is empty (or nothing in it requires grad)")
    return out


def task_leaves(
    losses: Tensor, exclude: Sequence[Tensor], stop_at: Tensor | None = None
) -> list[Tensor]:
    """Leaf tensors requiring grad reached from ``losses`` without passing through ``stop_at``.

    Used to find the task-specific parameters (heads) of an arbitrary model: every leaf reachable
    from the losses that is not in ``exclude`` (the shared parameters).
    """
    excluded = {id(t) for t in exclude}
    stop = stop_at.grad_fn if stop_at is not None else None
    seen: set[int] = set()
    leaves: list[Tensor] = []
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen or fn is stop:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:  # AccumulateGrad
            if id(var) not in excluded:
                leaves.append(var)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves


def _batched_grad(
    outputs: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor, *, retain_graph: bool
) -> tuple[Tensor | None, ...]:
    """``K`` vector-Jacobian products in one batched backward (falls back to a loop)."""
    try:
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=grad_outputs,
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )
    except RuntimeError as err:  # an op without a batching rule
        warnings.warn(
            f"batched backward failed ({str(err).splitlines()[0]}); "
            "falling back to one backward per task",
            RuntimeWarning,
            stacklevel=3,
        )
        rows = [
            torch.autograd.grad(
                outputs, inputs, grad_outputs=g, retain_graph=True, allow_unused=True
            )
            for g in grad_outputs
        ]
        return tuple(
            None if rows[0][i] is None else torch.stack([r[i] for r in rows])
            for i in range(len(inputs))
        )


def _flatten(grads: Sequence[Tensor | None], params: Sequence[Tensor], k: int) -> Tensor:
    cols = []
    for g, p in zip(grads, params, strict=False):
        if g is None:
            cols.append(p.new_zeros(k, p.numel()))
        else:
            cols.append(g.reshape(k, -1))
    return torch.cat(cols, dim=1)


def jacobian(
    losses: Tensor,
    params: Sequence[Tensor],
    *,
    features: Tensor | None = None,
    retain_graph: bool = False,
) -> Tensor:
    """Exact per-task gradients ``[K, P]`` of ``losses`` w.r.t. ``params`` (flattened, in order).

    With ``features`` the per-task gradients w.r.t. ``features`` are computed first and the ``K``
    vector-Jacobian products through the encoder run batched (when every parameter of ``params``
    lies below ``features``; otherwise directly from the losses).
    """
    k = losses.shape[0]
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    if features is None or not _Graph(features, params, check=False).below(params, []):
        grads = _batched_grad(losses, params, eye, retain_graph=retain_graph)
        return _flatten(grads, params, k)
    (zgrad,) = _batched_grad(losses, [features], eye, retain_graph=True)
    if zgrad is None:
        zgrad = features.new_zeros((k, *features.shape))
    grads = _batched_grad(features, params, zgrad, retain_graph=retain_graph)
    return _flatten(grads, params, k)


def _accumulate(params: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


def _check_losses(losses: Tensor, balancer: Balancer, task_names: Sequence[str] | None) -> None:
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"losses must be a 1-D tensor [K], got {shape}")
    if losses.shape[0] != balancer.n_tasks:
        raise ValueError(
            f"got {losses.shape[0]} losses but the balancer "
            f"{type(balancer).__name__} was created for {balancer.n_tasks} tasks"
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = [int(i) for i in (~finite).nonzero().flatten()]
        names = [task_names[i] if task_names else f"task {i}" for i in bad]
        raise FloatingPointError(
            f"non-finite loss for {', '.join(map(str, names))}: "
            f"{[float(losses.detach()[i]) for i in bad]}"
        )


def mtl_backward(
    losses: Tensor | Sequence[Tensor],
    *,
    shared_params: Iterable[Tensor],
    balancer: Balancer,
    features: Tensor | None = None,
    mode: Mode = "params",
    task_params: Iterable[Tensor] | None = None,
    extra_loss: Tensor | None = None,
    task_names: Sequence[str] | None = None,
    check_finite: bool = True,
    capture: LinearCapture | None = None,
) -> Tensor | None:
    """Backpropagate ``K`` task losses with a balancer; returns the task weights used.

    Args:
        losses: the ``K`` task losses: a sequence of ``K`` scalars (preferred: with ``features``
            the engine then takes each task's gradient w.r.t. ``features`` through that task's
            head alone) or a ``[K]`` tensor.
        shared_params: parameters shared by the tasks; their ``.grad`` receives the balanced
            update.
        balancer: a :class:`~polytask.balancers.Balancer` created for ``K`` tasks.
        features: the last shared representation (needed by ``mode="representation"``; makes
            ``mode="params"`` cheaper).
        mode: ``"params"`` (exact per-task gradients of the shared parameters) or
            ``"representation"`` (balance the gradients w.r.t. ``features``).
        task_params: parameters that belong to single tasks; found from the autograd graph when
            ``None`` (every leaf reached from the losses that is not shared).
        extra_loss: a scalar added to the objective outside balancing (e.g. an architecture's
            auxiliary loss); its gradient is added to every parameter it reaches.
        task_names: used in error messages.
        check_finite: raise :class:`FloatingPointError` naming the task on a NaN/inf loss.
        capture: a :class:`~polytask.LinearCapture` over the shared linear layers, recorded during
            this step's forward pass. In ``mode="params"`` it enables the exact activation-based
            path: the Gramian (or Jacobian) comes from one batched backward to the layer outputs,
            without per-task weight gradients and without a second backward pass.
    """
    parts: list[Tensor] | None = None
    if not isinstance(losses, Tensor):
        parts = list(losses)
        if not parts or not all(isinstance(loss, Tensor) and loss.ndim == 0 for loss in parts):
            raise ValueError(
                "losses must be a [K] tensor or a non-empty sequence of scalar tensors"
            )
        losses = torch.stack(parts)
    if mode not in ("params", "representation"):
        raise ValueError(f"mode must be 'params' or 'representation', got {mode!r}")
    if not isinstance(balancer, Balancer):
        raise TypeError(f"balancer must be a polytask Balancer, got {type(balancer).__name__}")
    _check_losses(losses, balancer, task_names)
    if check_finite and extra_loss is not None and not bool(torch.isfinite(extra_loss.detach())):
        raise FloatingPointError(f"non-finite extra (auxiliary) loss: {float(extra_loss)}")
    shared = _as_param_list(shared_params, "shared_params")
    rec = balancer.info
    own = [p for p in balancer.parameters() if p.requires_grad]

    if rec.needs != "losses" and mode not in rec.modes:
        raise ValueError(
            f"balancer {rec.name!r} cannot work in mode={mode!r}; it supports {list(rec.modes)}"
        )
    if mode == "representation" and features is None:
        raise ValueError(
            f"mode='representation' needs features (the last shared representation) "
            f"for balancer {rec.name!r}"
        )
    if features is not None and not features.requires_grad:
        raise ValueError(
            "features does not require grad: pass the encoder's output tensor, not a detached copy"
        )
    graph = _Graph(features, shared) if features is not None and rec.needs != "losses" else None

    heads = (
        [p for p in task_params if p.requires_grad]
        if task_params is not None
        else task_leaves(losses, [*shared, *own], stop_at=features)
    )

    if rec.needs == "losses":  # one ordinary backward of the method's objective
        assert isinstance(balancer, LossWeighting)
        if capture is not None:
            capture.clear()
        if heads:  # each head gets its own task's gradient (heads only, cheap)
            torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
        objective = balancer.objective(losses)
        objective.backward(inputs=[*shared, *own], retain_graph=extra_loss is not None)
        if extra_loss is not None:
            extra_loss.backward()
        return balancer.last_weights

    reused = balancer.reuse_weights()
    if reused is not None:  # an amortised step: one ordinary backward of sum_i w_i L_i
        if capture is not None:
            capture.clear()
        if heads:
            torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
        objective = (reused.to(losses.dtype) * losses).sum()
        objective.backward(inputs=shared, retain_graph=extra_loss is not None)
        if extra_loss is not None:
            extra_loss.backward()
        return reused

    k = losses.shape[0]
    keep = extra_loss is not None
    shared_ids = {id(p) for p in shared}
    records = capture.records if capture is not None else []
    if mode == "representation":
        assert graph is not None and features is not None
        if not graph.below(shared, []):
            n_above = sum(id(p) not in graph.leaves for p in shared)
            raise ValueError(
                f"mode='representation': {n_above} shared parameter(s) do not feed `features`, so "
                "one backward from the representation would give them no gradient; pass only the "
                "encoder's parameters as shared_params, or use mode='params'"
            )
        head_records = [
            r for r in records if r.source is features and _owned_by(r, shared_ids, False)
        ]
        plan = (
            _head_plan(parts, features, head_records)
            if parts is not None and head_records and isinstance(balancer, GramianWeighting)
            else None
        )
        if capture is not None:
            capture.clear()
        if plan is not None:  # the Gramian from the heads' output gradients and weights
            grad_z = _representation_from_heads(parts, features, heads, plan, balancer, losses)
        else:
            cot = _feature_cotangents(parts, losses, features, heads)
            direction = balancer.combine(cot.reshape(k, -1), losses.detach())
            grad_z = direction.view_as(features).to(features.dtype)
        if extra_loss is not None:
            torch.autograd.backward([features, extra_loss], [grad_z, torch.ones_like(extra_loss)])
        else:
            torch.autograd.backward(features, grad_z, inputs=shared)
        return balancer.last_weights

    shared_records = [r for r in records if _owned_by(r, shared_ids, True)]
    # Split at the representation when every shared parameter (and captured layer use) lies
    # below it: per-task gradients w.r.t. `features` first, then K VJPs through the encoder.
    if graph is not None and graph.below(shared, [r.output for r in shared_records]):
        assert features is not None
        root, cot = features, _feature_cotangents(parts, losses, features, heads)
    else:
        if heads:
            torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
        root, cot = losses, torch.eye(k, dtype=losses.dtype, device=losses.device)

    if shared_records:
        assert capture is not None
        covered = {
            id(p)
            for m in capture.modules
            if all(id(q) in shared_ids for q in m.parameters())
            for p in m.parameters()
        }
        capture.clear()
        weights = fast_backward(
            root, cot, losses.detach(), shared, shared_records, covered, balancer, keep
        )
    else:
        if capture is not None:
            capture.clear()
        grads = _batched_grad(root, shared, cot, retain_graph=keep)
        direction = balancer.combine(_flatten(grads, shared, k), losses.detach())
        _accumulate(shared, direction)
        weights = balancer.last_weights
    if extra_loss is not None:
        extra_loss.backward()
    return weights


def _owned_by(record: _Record, shared_ids: set[int], shared: bool) -> bool:
    """The record's layer has only shared (``shared=True``) or only task-specific parameters."""
    params = list(record.module.parameters())
    if shared:
        return all(id(p) in shared_ids for p in params)
    return not any(id(p) in shared_ids for p in params)


def _feature_cotangents(
    parts: Sequence[Tensor] | None, losses: Tensor, features: Tensor, heads: Sequence[Tensor]
) -> Tensor:
    """``[K, *features.shape]`` per-task gradients w.r.t. ``features``; fills the heads' grads."""
    if parts is not None:  # each task through its own head only
        return _feature_grads_per_task(parts, features, heads)
    k = losses.shape[0]
    if heads:
        torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    (zgrad,) = _batched_grad(losses, [features], eye, retain_graph=True)
    return zgrad if zgrad is not None else features.new_zeros((k, *features.shape))


def _head_plan(
    parts: Sequence[Tensor], features: Tensor, records: Sequence[_Record]
) -> list[list[_Record]] | None:
    """For each task, the captured head layers through which *all* of its loss reaches
    ``features`` (``None`` when some path avoids them, e.g. a non-linear op on ``features``)."""
    target = features.grad_fn
    if target is None:
        return None
    at = {id(r.output.grad_fn): r for r in records if r.output.grad_fn is not None}
    plan: list[list[_Record]] = []
    for loss in parts:
        hit: list[_Record] = []
        seen: set[int] = set()
        stack = [loss.grad_fn] if loss.grad_fn is not None else []
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            if fn is target:
                return None
            r = at.get(id(fn))
            if r is not None:
                hit.append(r)
                continue
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        plan.append(hit)
    return plan


def _representation_from_heads(
    parts: Sequence[Tensor],
    features: Tensor,
    heads: Sequence[Tensor],
    plan: Sequence[Sequence[_Record]],
    balancer: Balancer,
    losses: Tensor,
) -> Tensor:
    """Representation mode for a Gramian weighting whose heads start with linear layers.

    Task ``i``'s gradient w.r.t. ``features`` is ``sum_r gy_r W_r`` over its head layers ``r``
    (``gy_r`` the gradient at the layer's output, ``[N, D_h]``). With every ``(task, layer)`` column
    ``c`` stacked, ``Gy = [gy_c]`` (``[N, H]``) and ``Wc = [W_c]`` (``[H, D]``), the Gramian is
    ``S ((Gy^T Gy) * (Wc Wc^T)) S^T`` (``S`` sums the columns of each task), exact, without the
    ``[K, N, D]`` Jacobian; the direction is ``(Gy diag(w_owner)) Wc``. The cheaper of this and the
    plain ``K x K`` contraction of the materialised Jacobian is used.
    """
    assert isinstance(balancer, GramianWeighting)
    k = len(parts)
    d = features.shape[-1]
    rows = features.numel() // d
    gys: list[Tensor] = []
    ws: list[Tensor] = []
    owner: list[int] = []
    owner_of_block: list[int] = []
    for i, (loss, recs) in enumerate(zip(parts, plan, strict=False)):
        if not loss.requires_grad or not recs:
            continue
        outs = [r.output for r in recs]
        grads = torch.autograd.grad(loss, [*outs, *heads], retain_graph=True, allow_unused=True)
        for r, g in zip(recs, grads[: len(outs)], strict=False):
            if g is not None:
                gys.append(g.reshape(rows, -1))
                ws.append(r.module.weight)
                owner += [i] * gys[-1].shape[1]  # the task of each column
                owner_of_block.append(i)
        for p, g in zip(heads, grads[len(outs) :], strict=False):
            if g is not None:
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
    dtype = features.dtype
    if not gys:  # no task reaches the representation
        balancer.last_weights = balancer.weights_from_gramian(
            features.new_zeros(k, k), losses.detach()
        ).detach()
        return torch.zeros_like(features)
    gy = torch.cat(gys, 1)  # [N, H]
    wc = torch.cat([w.detach().to(dtype) for w in ws], 0)  # [H, D]
    idx = torch.tensor(owner, device=features.device)
    h = gy.shape[1]
    if h * h * (rows + d) <= k * k * rows * d + h * rows * d:
        c = (gy.T @ gy) * (wc @ wc.T)
        s = torch.zeros(k, h, dtype=dtype, device=features.device)
        s[idx, torch.arange(h, device=features.device)] = 1.0
        gram = s @ c @ s.T
    else:
        jac = features.new_zeros(k, rows, d)
        start = 0
        for i, g in zip(owner_of_block, gys, strict=False):  # blocks are in task order
            jac[i] += g @ wc[start : start + g.shape[1]]
            start += g.shape[1]
        jac = jac.reshape(k, -1)
        gram = jac @ jac.T
    w = balancer.weights_from_gramian(gram, losses.detach())
    balancer.last_weights = w.detach()
    direction = (gy * w.to(dtype)[idx]) @ wc  # [N, D]
    return direction.reshape(features.shape)


def _feature_grads_per_task(
    parts: Sequence[Tensor], features: Tensor, heads: Sequence[Tensor]
) -> Tensor:
    """``[K, *features.shape]`` gradients of each loss w.r.t. ``features``, one task at a time.

    Each backward runs through that task's own head only (a batched backward from stacked losses
    would push all ``K`` cotangents through every head and sum ``K`` dense ``[K, ...]`` tensors at
    ``features``). The heads' gradients (each from its own task) are accumulated on the way.
    """
    k = len(parts)
    out = features.new_zeros((k, *features.shape))
    inputs = [features, *heads]
    for i, loss in enumerate(parts):
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        if grads[0] is not None:
            out[i] = grads[0]
        for p, g in zip(heads, grads[1:], strict=False):
            if g is not None:
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
    return out


class _Graph:
    """The autograd graph below ``features``: its leaves and nodes (one traversal per step).

    Raises if a tensor requiring grad feeds ``features`` but is missing from ``shared`` (it would
    get no gradient).
    """

    def __init__(self, features: Tensor, shared: Sequence[Tensor], check: bool = True) -> None:
        self.nodes: set[int] = set()
        self.leaves: set[int] = set()
        missing: list[Tensor] = []
        shared_ids = {id(p) for p in shared}
        stack = [features.grad_fn] if features.grad_fn is not None else []
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in self.nodes:
                continue
            self.nodes.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None:  # AccumulateGrad
                self.leaves.add(id(var))
                if check and id(var) not in shared_ids:
                    missing.append(var)
                continue
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        if missing:
            shapes = [tuple(m.shape) for m in missing[:5]]
            raise ValueError(
                f"{len(missing)} tensor(s) requiring grad feed `features` but are not in "
                f"shared_params (shapes {shapes}{'...' if len(missing) > 5 else ''}); they would "
                "get no gradient. Pass every encoder parameter as shared_params."
            )

    def below(self, params: Sequence[Tensor], outputs: Sequence[Tensor]) -> bool:
        """Every parameter and every tensor of ``outputs`` lies below ``features``."""
        return all(id(p) in self.leaves for p in params) and all(
            o.grad_fn is not None and id(o.grad_fn) in self.nodes for o in outputs
        )
