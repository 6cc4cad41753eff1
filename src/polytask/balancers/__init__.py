"""Loss-weighting and gradient-balancing methods behind one registry.

>>> import torch, polytask
>>> b = polytask.balancers.create("mean", n_tasks=2)
>>> b.combine(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
tensor([0.5000, 1.5000])
"""

from __future__ import annotations

from ._base import (
    Balancer,
    BalancerInfo,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    available,
    create,
    info,
    register,
)

# Importing the implementation modules fills the registry.
from . import _simple  # noqa: F401, E402

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
