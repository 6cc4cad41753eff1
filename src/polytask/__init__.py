"""polytask: multi-task learning for PyTorch."""

from __future__ import annotations

from . import architectures, balancers
from ._fast import LinearCapture, capture_linear_layers
from .engine import jacobian, mtl_backward

__version__ = "0.1.0"

__all__ = [
    "LinearCapture",
    "capture_linear_layers",
    "architectures",
    "balancers", "jacobian", "mtl_backward", "__version__"]
