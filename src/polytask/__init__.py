"""polytask: multi-task learning for PyTorch."""

from __future__ import annotations

from . import balancers

__version__ = "0.1.0"

__all__ = ["balancers", "__version__"]
