"""Multi-task architectures behind one registry (``available``/``create``/``info``)."""

from __future__ import annotations

from ._base import ArchitectureInfo, MultiTaskModel, available, create, info, register

from . import _hps  # noqa: F401, E402
from ._hps import HardSharing  # noqa: E402

__all__ = [
    "ArchitectureInfo",
    "HardSharing",
    "MultiTaskModel",
    "available",
    "create",
    "info",
    "register",
]
