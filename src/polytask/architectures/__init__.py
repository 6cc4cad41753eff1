"""Multi-task architectures behind one registry (``available``/``create``/``info``).

>>> import torch
>>> from torch import nn
>>> from polytask.architectures import MLP, create
>>> m = create("mmoe", expert_factory=lambda: MLP([4, 8], last_act=True), n_experts=2,
...            heads={"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)}, gate_in_features=4)
>>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
{'a': (5, 1), 'b': (5, 3)}
"""

from __future__ import annotations

# Importing the implementation modules fills the registry.
from . import (  # noqa: F401
    _columns,
    _esmm,
    _hps,
    _ltb,
    _mmoe,
    _moe_router,
    _mtan,
    _ple,
    _task_groups,
)
from ._base import ArchitectureInfo, MultiTaskModel, available, create, info, register
from ._blocks import (
    MLP,
    FieldEmbedding,
    LeNetStages,
    StagedEncoder,
    StagedMLP,
    Stages,
    infer_stage_shapes,
)
from ._columns import NDDR, CrossStitch
from ._common import is_multi_input
from ._esmm import ESMM
from ._hps import HardSharing
from ._ltb import LearningToBranch
from ._mmoe import DSelectK, MMoE
from ._moe_router import RoutedMoE
from ._mtan import MTAN
from ._ple import CGC, PLE
from ._task_groups import TaskGroups

__all__ = [
    "ArchitectureInfo",
    "CGC",
    "CrossStitch",
    "DSelectK",
    "ESMM",
    "FieldEmbedding",
    "HardSharing",
    "LeNetStages",
    "LearningToBranch",
    "MLP",
    "MMoE",
    "MTAN",
    "MultiTaskModel",
    "NDDR",
    "PLE",
    "RoutedMoE",
    "StagedEncoder",
    "StagedMLP",
    "Stages",
    "TaskGroups",
    "available",
    "create",
    "infer_stage_shapes",
    "info",
    "is_multi_input",
    "register",
]
