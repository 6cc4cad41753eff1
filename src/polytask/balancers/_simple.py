"""The simplest loss weightings: sum, mean and user-given fixed weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import LossWeighting, register


@register(
    "sum",
    paper="Linear scalarisation (equal weights); e.g. Caruana, Machine Learning 1997",
    description="Sum of the task losses (every weight 1).",
    reference="torchjd 0.18 aggregation.Sum",
)
class Sum(LossWeighting):
    """Equal weights of 1: ``direction = sum_i J_i``.

    Reference: Caruana, "Multitask Learning", Machine Learning 28, 1997 (linear scalarisation).
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)

    def weights(self, losses: Tensor | None) -> Tensor:
        return torch.ones(self.n_tasks)


@register(
    "mean",
    paper="Linear scalarisation (equal weights); e.g. Caruana, Machine Learning 1997",
    description="Mean of the task losses (every weight 1/K).",
    reference="torchjd 0.18 aggregation.Mean",
)
class Mean(LossWeighting):
    """Equal weights of ``1/K``: ``direction = mean_i J_i``.

    Reference: Caruana, "Multitask Learning", Machine Learning 28, 1997 (linear scalarisation).
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)

    def weights(self, losses: Tensor | None) -> Tensor:
        return torch.full((self.n_tasks,), 1.0 / self.n_tasks)


@register(
    "fixed",
    paper="Linear scalarisation with hand-set weights",
    description="User-given fixed task weights.",
)
class Fixed(LossWeighting):
    """Fixed user-given weights ``w``: ``direction = w @ J`` (default: all ones)."""

    def __init__(self, n_tasks: int, weights: Sequence[float] | None = None) -> None:
        super().__init__(n_tasks)
        w = torch.ones(n_tasks) if weights is None else torch.as_tensor(weights, dtype=torch.float)
        if w.shape != (n_tasks,):
            raise ValueError(f"fixed: weights must have {n_tasks} entries, got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"fixed: weights must be finite, got {w.tolist()}")
        self.register_buffer("fixed_weights", w)

    def weights(self, losses: Tensor | None) -> Tensor:
        return self.fixed_weights
