"""Loss-weighting and gradient-balancing methods behind one registry.

>>> import torch, polytask
>>> b = polytask.balancers.create("mean", n_tasks=2)
>>> b.combine(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
tensor([0.5000, 1.5000])
"""

from __future__ import annotations

# Importing the implementation modules fills the registry.
from . import (
    _amortized,  # noqa: F401
    _gramian,  # noqa: F401
    _jacobian,  # noqa: F401
    _losses,  # noqa: F401
    _simple,  # noqa: F401
    _stochastic,  # noqa: F401
)
from ._amortized import Amortized
from ._base import (
    Balancer,
    BalancerInfo,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    MultiBatchWeighting,
    available,
    create,
    info,
    register,
    stack_batches,
)
from ._jacobian import compose, partition

__all__ = [
    "Amortized",
    "Balancer",
    "BalancerInfo",
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "MultiBatchWeighting",
    "available",
    "compose",
    "create",
    "info",
    "partition",
    "register",
    "stack_batches",
]
