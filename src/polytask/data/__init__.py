"""Multi-task datasets for polytask.

Every builder returns a :class:`MultiTaskData` whose splits yield sample dicts
``{"x": input, <task name>: target, ...}`` (QM9's graph form uses ``z``/``pos``
instead of ``x``).  Data files are fetched, checksummed and cached by
:func:`fetch` (cache: ``$POLYTASK_DATA`` or ``~/.cache/polytask``).

>>> from polytask.data import available, load
>>> data = load("multi_mnist", n_train=600)          # doctest: +SKIP
>>> data.tasks[0].name, data.input_shape             # doctest: +SKIP
('left', (1, 36, 36))
"""

from ._fetch import (
    DataUnavailableError,
    DebianPackage,
    InstalledPackage,
    LocalFile,
    PipWheel,
    Resource,
    Source,
    Url,
    cache_dir,
    fetch,
)
from .base import DictDataset, MultiTaskData, TaskSpec
from .images import multi_fashion, multi_fashion_mnist, multi_mnist
from .movielens import movielens_esmm
from .qm9 import collate_graphs, qm9
from .registry import available, describe, load, register
from .tabular import census, rf1
from .text import reviews

__all__ = [
    "DataUnavailableError",
    "DebianPackage",
    "DictDataset",
    "InstalledPackage",
    "LocalFile",
    "MultiTaskData",
    "PipWheel",
    "Resource",
    "Source",
    "TaskSpec",
    "Url",
    "available",
    "cache_dir",
    "census",
    "collate_graphs",
    "describe",
    "fetch",
    "load",
    "multi_fashion",
    "multi_fashion_mnist",
    "multi_mnist",
    "movielens_esmm",
    "qm9",
    "register",
    "reviews",
    "rf1",
]
