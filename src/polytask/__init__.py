"""polytask: multi-task learning for PyTorch."""

from __future__ import annotations

from . import architectures, balancers
from .engine import jacobian, mtl_backward

__version__ = "0.1.0"

__all__ = ["architectures", "balancers", "jacobian", "mtl_backward", "__version__"]
