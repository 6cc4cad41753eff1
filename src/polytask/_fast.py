"""Exact per-task Gramians and directions from layer activations (no K x P Jacobian).

For a linear layer ``y = a W^T + b`` used on ``N`` rows (batch, or batch x tokens), task ``i``'s
weight gradient is ``g_i^T a`` with ``g_i = dL_i/dy`` (``[N, D_out]``). Hence

* ``<dW_i, dW_j> + <db_i, db_j> = tr(g_i^T M g_j)`` with ``M = a a^T + 1`` (``[N, N]``), and
* the balanced update ``sum_i w_i dW_i = (sum_i w_i g_i)^T a``.

One batched backward (``vmap`` over the ``K`` one-hot cotangents) gives every ``g_i`` at every
captured layer output, and the per-task gradients of any shared parameter that is not in a
captured linear layer. The Gramian and the update then follow without ever forming a per-task
weight gradient of a captured layer and without a second backward pass. Each layer picks the
cheaper of two exact contractions (through ``M``, or through the per-task weight gradients).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LinearCapture", "capture_linear_layers"]


@dataclass
class _Record:
    module: nn.Linear
    inputs: Tensor  # [N, D_in], detached
    output: Tensor  # the layer output, in the graph
    source: Tensor  # the input tensor itself (identity tells a head applied to `features`)


class LinearCapture:
    """Forward hooks on linear layers that record their inputs and outputs while training.

    Create it once for the shared part of a model (see :func:`capture_linear_layers`) and pass it
    to :func:`polytask.mtl_backward` as ``capture=``. Records are cleared after each use and are
    not taken under ``torch.no_grad()``.
    """

    def __init__(self, modules: Iterable[nn.Linear]) -> None:
        self.modules = list(modules)
        self.records: list[_Record] = []
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._hook) for m in self.modules
        ]
        self.enabled = True

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled or not torch.is_grad_enabled() or not output.requires_grad:
            return
        assert isinstance(module, nn.Linear)
        a = args[0]
        self.records.append(_Record(module, a.detach().reshape(-1, a.shape[-1]), output, a))

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()

    def covered(self) -> set[int]:
        """ids of the parameters of the captured layers."""
        return {id(p) for m in self.modules for p in m.parameters()}


def capture_linear_layers(
    module: nn.Module,
    shared_params: Sequence[Tensor] | None = None,
    *,
    which: Literal["shared", "heads", "all"] = "shared",
) -> LinearCapture:
    """Capture the ``nn.Linear`` layers of ``module``.

    ``which="shared"`` (default): the layers whose parameters are all shared (the exact
    activation-based path of ``mode="params"``). ``"heads"``: the layers with no shared parameter
    (task heads; in ``mode="representation"`` a Gramian weighting then gets the Gramian of the
    representation gradients from each head's output gradients and weights, without forming the
    ``[K, numel(features)]`` Jacobian). ``"all"``: both. Without ``shared_params`` every linear
    layer counts as shared.
    """
    if which not in ("shared", "heads", "all"):
        raise ValueError(f"which must be 'shared', 'heads' or 'all', got {which!r}")
    shared = None if shared_params is None else {id(p) for p in shared_params}

    def is_shared(m: nn.Module) -> bool:
        return shared is None or all(id(p) in shared for p in m.parameters())

    def is_head(m: nn.Module) -> bool:
        return shared is not None and not any(id(p) in shared for p in m.parameters())

    keep = {"shared": is_shared, "heads": is_head, "all": lambda m: is_shared(m) or is_head(m)}
    mods = [m for m in module.modules() if type(m) is nn.Linear and keep[which](m)]
    return LinearCapture(mods)


#: Largest temporary (in elements) the Gramian contraction makes at once (16 MiB of float32).
_CHUNK_ELEMENTS = 1 << 22


def _layer_gramian(a: Tensor, g: Tensor, has_bias: bool) -> Tensor:
    """``[K, K]`` Gramian of a linear layer's per-task (weight, bias) gradients."""
    k, n, d_out = g.shape
    d_in = a.shape[1]
    cost_m = n * n * d_in + k * n * n * d_out + k * k * n * d_out
    cost_w = k * n * d_in * d_out + k * k * d_in * d_out
    if cost_m < cost_w:
        m = a @ a.T
        if has_bias:
            m = m + 1.0
        flat = g.reshape(k, -1)
        # rows of the Gramian in chunks of tasks, so the [chunk, N, D_out] temporary stays small
        chunk = max(1, _CHUNK_ELEMENTS // max(1, n * d_out))
        if chunk >= k:
            return flat @ torch.matmul(m, g).reshape(k, -1).T
        rows = [torch.matmul(m, g[i : i + chunk]).reshape(-1, n * d_out) @ flat.T
                for i in range(0, k, chunk)]
        return torch.cat(rows, 0)
    dw = torch.einsum("kno,ni->koi", g, a).reshape(k, -1)
    gram = dw @ dw.T
    if has_bias:
        db = g.sum(1)
        gram = gram + db @ db.T
    return gram


def fast_backward(
    root: Tensor,
    cotangents: Tensor,
    losses: Tensor,
    shared: Sequence[Tensor],
    records: Sequence[_Record],
    covered: set[int],
    balancer: Balancer,  # noqa: F821
    retain_graph: bool,
) -> Tensor | None:
    """Balanced update into ``.grad`` of ``shared`` from captured activations (exact).

    ``root`` is the tensor the ``K`` cotangents (``[K, *root.shape]``) are pushed back from: the
    stacked losses with the identity, or the shared representation with the per-task gradients
    w.r.t. it. ``losses`` (detached) is what the balancer sees. ``records`` are the uses of the
    captured shared layers in this forward pass; ``covered`` the ids of the parameters of every
    captured shared layer (used or not).
    """
    from .balancers import GramianWeighting

    k = cotangents.shape[0]
    records = [r for r in records if r.output.requires_grad]
    rest = [p for p in shared if id(p) not in covered]
    outputs = [r.output for r in records]
    grads = torch.autograd.grad(
        root,
        [*outputs, *rest],
        grad_outputs=cotangents,
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    g_out = [
        (g if g is not None else o.new_zeros((k, *o.shape))).reshape(k, -1, o.shape[-1])
        for g, o in zip(grads[: len(outputs)], outputs, strict=False)
    ]
    g_rest = [
        (g if g is not None else p.new_zeros((k, *p.shape))).reshape(k, -1)
        for g, p in zip(grads[len(outputs) :], rest, strict=False)
    ]
    # group the uses of each captured module (a layer applied several times sums its uses)
    by_module: dict[int, tuple[nn.Linear, list[Tensor], list[Tensor]]] = {}
    for r, g in zip(records, g_out, strict=False):
        entry = by_module.setdefault(id(r.module), (r.module, [], []))
        entry[1].append(r.inputs)
        entry[2].append(g)
    layers = [
        (m, a_list[0], g_list[0]) if len(a_list) == 1 else
        (m, torch.cat(a_list, 0), torch.cat(g_list, 1))
        for m, a_list, g_list in by_module.values()
    ]
    # shared parameters in captured modules that were not used in this forward get no gradient
    shared_ids = {id(p) for p in shared}

    if isinstance(balancer, GramianWeighting):
        gram = losses.new_zeros(k, k)
        for m, a, g in layers:
            gram = gram + _layer_gramian(a.to(g.dtype), g, m.bias is not None)
        for j in g_rest:
            gram = gram + j @ j.T
        w = balancer.weights_from_gramian(gram, losses)
        balancer.last_weights = w.detach()
        w = w.to(cotangents.dtype)
        for m, a, g in layers:
            gw = torch.einsum("k,kno->no", w, g)
            _add_grad(m.weight, gw.T @ a.to(gw.dtype), shared_ids)
            if m.bias is not None:
                _add_grad(m.bias, gw.sum(0), shared_ids)
        for p, j in zip(rest, g_rest, strict=False):
            _add_grad(p, (w @ j).view_as(p), shared_ids)
        return balancer.last_weights

    # a Jacobian method: form the rows (in the order of `shared`)
    per_param: dict[int, Tensor] = {}
    for m, a, g in layers:
        per_param[id(m.weight)] = torch.einsum("kno,ni->koi", g, a.to(g.dtype)).reshape(k, -1)
        if m.bias is not None:
            per_param[id(m.bias)] = g.sum(1)
    for p, j in zip(rest, g_rest, strict=False):
        per_param[id(p)] = j
    cols = [per_param.get(id(p), p.new_zeros(k, p.numel())) for p in shared]
    jac = torch.cat(cols, dim=1)
    direction = balancer.combine(jac, losses)
    offset = 0
    for p in shared:
        n = p.numel()
        _add_grad(p, direction[offset : offset + n].view_as(p), shared_ids)
        offset += n
    return balancer.last_weights


def _add_grad(p: Tensor, g: Tensor, shared_ids: set[int]) -> None:
    """Accumulate ``g`` (a tensor this module computed and owns) into ``p.grad``."""
    if id(p) not in shared_ids:
        return
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g if g.is_contiguous() else g.contiguous()
    else:
        p.grad.add_(g)
