"""``amortized``: reuse a Gramian weighting's weights for several steps (an opt-in approximation).

The exact gradient methods pay ``K`` vector-Jacobian products per step to get the Gramian. Their
weights usually change slowly, so recomputing them every ``every`` steps and reusing them in
between turns most steps into one ordinary backward pass of ``sum_i w_i L_i``. The direction on a
reuse step is exactly ``w_cached @ J`` (no per-task gradient is formed), so the only approximation
is the age of the weights; ``benchmarks/step_cost.py`` reports its error (the cosine between the
amortised and the exact direction along a training run).

This is the ``update_weights_every`` option of the official Nash-MTL code (Navon et al., ICML
2022, ``AvivNavon/nash-mtl`` ``methods/weight_methods.py``), made available to every Gramian
weighting.

>>> import torch, polytask
>>> b = polytask.balancers.create("amortized", 2, base="mgda", every=3)
>>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
>>> b.combine(J)                   # step 0: computes MGDA's weights
tensor([0.8000, 0.4000])
>>> b.combine(torch.eye(2))        # step 1: reuses them (exactly w @ J)
tensor([0.8000, 0.2000])
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ._base import GramianWeighting, create, register, single_batch_protocol
from ._losses import _StateMixin

__all__ = ["Amortized"]


@register(
    "amortized",
    paper="Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022 "
    "(update_weights_every), applied to any Gramian weighting",
    description="Opt-in approximation: recompute another Gramian weighting's weights every n "
    "steps.",
    stateful=True,
    reference="AvivNavon/nash-mtl methods/weight_methods.py NashMTL(update_weights_every)",
)
class Amortized(_StateMixin, GramianWeighting):
    """Recompute the weights of a Gramian weighting every ``every`` steps, reuse them in between.

    Args:
        base: registered name of a :class:`GramianWeighting` (``direction = w(G) @ J``), e.g.
            ``"upgrad"``, ``"mgda"``, ``"nash_mtl"``, ``"cagrad"``, ``"imtl_g"``.
        every: recompute on steps ``0, every, 2 every, ...`` (``1``: exactly the base method).
        base_hparams: hyperparameters of the wrapped method.

    On a reuse step :func:`polytask.mtl_backward` asks :meth:`reuse_weights` first and runs one
    ordinary backward; :meth:`combine` returns ``w_cached @ J``. The step counter and the cached
    weights are in ``state_dict``, so a resumed run continues exactly.
    """

    _adaptive_buffers = ("cached",)

    def __init__(
        self,
        n_tasks: int,
        base: str = "upgrad",
        every: int = 4,
        base_hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(n_tasks)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"amortized: every must be a positive int, got {every!r}")
        if base == "amortized":
            raise ValueError("amortized: cannot wrap itself")
        inner = create(base, n_tasks, **(base_hparams or {}))
        if not isinstance(inner, GramianWeighting):
            raise ValueError(
                f"amortized: {base!r} is not a Gramian weighting (needs={inner.info.needs!r}); "
                "only methods whose direction is w(G) @ J can reuse their weights"
            )
        self.base = inner
        self.every = every
        self.step = 0
        self.register_buffer("cached", torch.zeros(n_tasks))
        base_info = inner.info
        self.info = replace(
            type(self).info,
            learnable=base_info.learnable,
            protocol=single_batch_protocol(base_info.protocol),
            modes=base_info.modes,
            mode=base_info.mode,
            host_syncs=base_info.host_syncs,
        )

    def reuse_weights(self) -> Tensor | None:
        if self.step % self.every == 0:
            return None
        self.step += 1
        self.last_weights = self.cached.clone()
        return self.last_weights

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        reused = self.reuse_weights()
        if reused is not None:
            return reused.to(gramian)
        w = self.base.weights_from_gramian(gramian, losses)
        self.base.last_weights = w.detach()
        self._set_state("cached", w.clone())  # keeps the dtype the weights were computed in
        self.step += 1
        return w

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        reused = self.reuse_weights()
        if reused is not None:  # no Gramian needed
            return reused.to(jacobian) @ jacobian
        return super()._combine(jacobian, losses)

    def after_step(self, losses: Tensor) -> None:
        self.base.after_step(losses)

    def epoch_end(self) -> None:
        self.base.epoch_end()

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, every={self.every}"
