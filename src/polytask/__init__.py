"""polytask: multi-task learning for PyTorch."""

from __future__ import annotations

from . import architectures, balancers

__version__ = "0.1.0"

__all__ = ["architectures", "balancers", "__version__"]
