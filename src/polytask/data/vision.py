"""GPU-scale vision benchmarks of the multi-task literature, read from their on-disk layouts.

None of these can be downloaded on machines without general internet access; the loaders read
a copy the user already has, and :func:`download` keeps the real upstream locations.

* :func:`nyuv2` -- NYUv2, 3 tasks (13-class segmentation, depth, surface normals), 795 train /
  654 test images at 288x384, as preprocessed by Liu et al. (MTAN, CVPR 2019) and used by CAGrad,
  Nash-MTL, FAMO. Layout (``root/``)::

      train/image/{i}.npy   float [288, 384, 3] in [0, 1]
      train/label/{i}.npy   float [288, 384], classes 0..12, -1 = unlabelled
      train/depth/{i}.npy   float [288, 384, 1], 0 = missing
      train/normal/{i}.npy  float [288, 384, 3], unit vectors, 0 = missing
      val/...               (the same four folders; the literature's test set)

* :func:`cityscapes` -- Cityscapes, 2 tasks (7-class segmentation, inverse depth), 2,975 train /
  500 test images at 128x256 (MTAN's preprocessed release; 2-, 7- and 19-class labels)::

      train/image/{i}.npy  train/label_7/{i}.npy  train/depth/{i}.npy   (and val/)

* :func:`celeba` -- CelebA, 40 binary attributes, 162,770 / 19,867 / 19,962 images (the official
  partition), resized to 64x64 as in FAMO's and NTKMTL's CelebA experiments. Either the flat
  layout (``img_align_celeba/*.jpg``, ``list_attr_celeba.txt``, ``list_eval_partition.txt`` in
  ``root``, as torchvision uses) or the official release's (``Img/img_align_celeba/``,
  ``Anno/list_attr_celeba.txt``, ``Eval/list_eval_partition.txt``).

Samples are dicts: ``{"x": float32 [3, H, W], <task>: target}``. Dense targets: segmentation
``int64 [H, W]`` with ``-1`` for unlabelled pixels (the convention of the MTAN files and of the
reference losses, ``ignore_index=-1``), depth ``float32 [1, H, W]`` (0 = missing), normals
``float32 [3, H, W]`` (all-zero = missing); CelebA attributes ``int64`` scalars in ``{0, 1}``.
``extras`` records the dense targets, the ignore index and whether the validation split is the
test split.

Validation data: NYUv2 and Cityscapes ship only ``train`` and ``val``; the literature reports on
``val`` and selects nothing on held-out data. ``val_size=None`` (default) reproduces that (``val``
and ``test`` are the same dataset, ``extras["val_is_test"] = True``); an integer ``val_size``
holds out that many random training images (``seed``) as validation data instead.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .base import MultiTaskData, TaskSpec, check_size

__all__ = [
    "CELEBA_ATTRIBUTES",
    "SOURCES",
    "RemoteFile",
    "VisionDataMissing",
    "VisionSource",
    "celeba",
    "cityscapes",
    "download",
    "nyuv2",
    "verify",
]

IGNORE_INDEX = -1

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


# ------------------------------------------------------------------------------------------------
# sources and errors
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: where it lives, what it is called, its checksum where known.

    ``archive=True``: a zip archive to extract into the dataset root. ``subdir``: where the file
    goes inside the root (CelebA's official release keeps annotations under ``Anno/``).
    """

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    archive: bool = False
    subdir: str = ""


@dataclass(frozen=True)
class VisionSource:
    """Where a dataset comes from and what its on-disk layout must contain."""

    name: str
    description: str
    files: tuple[RemoteFile, ...]
    homepage: str
    citation: str
    licence: str
    notes: str = ""
    sizes: dict[str, int] = field(default_factory=dict)


SOURCES: dict[str, VisionSource] = {
    "nyuv2": VisionSource(
        name="nyuv2",
        description="NYUv2 13-class segmentation + depth + normals, 288x384 (MTAN preprocessing)",
        files=(
            # Dropbox shared folder of the MTAN authors; ``dl=1`` serves it as one zip archive.
            RemoteFile("https://www.dropbox.com/sh/86nssgwm6hm3vkb/AACrnUQ4GxpdrBbLjb6n-mWNa?dl=1",
                       "nyuv2.zip", archive=True),
        ),
        homepage="https://github.com/lorenmt/mtan",
        citation="Silberman et al., ECCV 2012 (NYU Depth v2); preprocessing: Liu, Johns & "
        "Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
        licence="NYU Depth v2 terms of use (research)",
        notes="No checksum is published for this archive; the layout and file counts are checked.",
        sizes={"train": 795, "val": 654},
    ),
    "cityscapes": VisionSource(
        name="cityscapes",
        description="Cityscapes 2/7/19-class segmentation + inverse depth, 128x256 (MTAN)",
        files=(
            RemoteFile("https://www.dropbox.com/sh/gaw6vh6qusoyms6/AADwWi0Tp3E3M4B2xzeGlsEna?dl=1",
                       "cityscapes_128x256.zip", archive=True),
        ),
        homepage="https://github.com/lorenmt/mtan (original data: https://www.cityscapes-dataset.com)",
        citation="Cordts et al., CVPR 2016; preprocessing: Liu, Johns & Davison, CVPR 2019",
        licence="Cityscapes licence (non-commercial research; registration required upstream)",
        notes="No checksum is published for this archive; the layout and file counts are checked. "
        "A 256x512 version: https://www.dropbox.com/sh/vj349qgg57nthi9/AACdZmIuK-Qb_gP6w1HrA43ta",
        sizes={"train": 2975, "val": 500},
    ),
    "celeba": VisionSource(
        name="celeba",
        description="CelebA aligned faces, 40 binary attributes, official partition",
        files=(
            # Google Drive ids and MD5s as listed by torchvision.datasets.CelebA
            RemoteFile("https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pZjFTYXZWM3FlRnM",
                       "img_align_celeba.zip", md5="00d2c5bc6d35e252742224ab0c1e8fcb",
                       archive=True),
            RemoteFile("https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pblRyaVFSWGxPY0U",
                       "list_attr_celeba.txt", md5="75e246fa4810816ffd6ee81facbd244c"),
            RemoteFile("https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pY0NSMzRuSXJEVkk",
                       "list_eval_partition.txt", md5="d32c9cbf5e040fd4025c592c306e6668"),
        ),
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
        citation="Liu, Luo, Wang & Tang, Deep Learning Face Attributes in the Wild, ICCV 2015",
        licence="CelebA agreement: non-commercial research only",
        notes="Only MD5 checksums are published (no SHA-256). Google Drive may refuse automated "
        "downloads of the 1.4 GB image archive; then download it in a browser.",
        sizes={"train": 162770, "val": 19867, "test": 19962},
    ),
}


class VisionDataMissing(FileNotFoundError):
    """The dataset's files are not (completely) at ``root``; the message names the source."""

    def __init__(self, name: str, root: Path, problems: Sequence[str], extra: str = "") -> None:
        src = SOURCES[name]
        self.name, self.root, self.problems = name, Path(root), list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:8])
        more = f"\n  ... and {len(self.problems) - 8} more" if len(self.problems) > 8 else ""
        urls = "\n".join(f"  {f.url}  ->  {f.subdir + '/' if f.subdir else ''}{f.filename}"
                         for f in src.files)
        msg = (
            f"{name}: the data at {root} is missing or incomplete:\n{shown}{more}\n"
            f"Source: {src.description}. Home: {src.homepage}. Licence: {src.licence}.\n"
            f"Upstream files:\n{urls}\n"
            f"Download and unpack them into {root} (see polytask.data.vision's docstring for the "
            f"layout), or call polytask.data.vision.download({name!r}, root) on a machine with "
            f"internet access. {src.notes}{extra}"
        )
        super().__init__(msg)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sum(rf: RemoteFile, path: Path) -> str | None:
    """A description of the mismatch, or ``None`` when the checksums (where known) match."""
    if rf.sha256 is not None and _sha256(path) != rf.sha256:
        return f"{path.name}: SHA-256 mismatch (expected {rf.sha256})"
    if rf.md5 is not None and _md5(path) != rf.md5:
        return f"{path.name}: MD5 mismatch (expected {rf.md5})"
    return None


def download(name: str, root: str | Path, *, timeout: float = 60.0) -> Path:
    """Download ``name``'s upstream files into ``root``, verify them and unpack archives.

    Files already present and complete (:func:`verify`) are not downloaded again. Any network
    failure raises :class:`VisionDataMissing` naming every upstream URL (on machines that can
    reach only package registries this is the expected outcome).
    """
    if name not in SOURCES:
        raise KeyError(f"unknown vision dataset {name!r}; choose from {sorted(SOURCES)}")
    root = Path(root).expanduser()
    try:
        verify(name, root)
        return root
    except VisionDataMissing:
        pass
    root.mkdir(parents=True, exist_ok=True)
    for rf in SOURCES[name].files:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            part = Path(tmp) / rf.filename
            try:
                with (
                    urllib.request.urlopen(rf.url, timeout=timeout) as resp,
                    part.open("wb") as out,
                ):
                    shutil.copyfileobj(resp, out)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise VisionDataMissing(
                    name, root, [f"could not download {rf.url}: {exc}"]
                ) from exc
            bad = _check_sum(rf, part)
            if bad:
                raise VisionDataMissing(name, root, [f"downloaded {bad}"])
            dest_dir = root / rf.subdir if rf.subdir else root
            dest_dir.mkdir(parents=True, exist_ok=True)
            if rf.archive:
                if not zipfile.is_zipfile(part):
                    raise VisionDataMissing(name, root, [f"{rf.url} did not return a zip archive "
                                                         "(a login or confirmation page?)"])
                with zipfile.ZipFile(part) as zf:
                    zf.extractall(dest_dir)
            else:
                shutil.move(str(part), dest_dir / rf.filename)
    verify(name, root)
    return root


# ------------------------------------------------------------------------------------------------
# NYUv2 and Cityscapes (MTAN's .npy folders)
# ------------------------------------------------------------------------------------------------
_INDEX = re.compile(r"^(\d+)\.npy$")


def _npy_indices(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _INDEX.match(p.name)))


def _find_npy_root(root: Path, subdirs: Sequence[str]) -> Path:
    """``root`` itself or the single folder below it holding ``train/`` (archives often nest)."""
    if (root / "train" / subdirs[0]).is_dir():
        return root
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and (child / "train" / subdirs[0]).is_dir():
                return child
    return root


def _check_npy_layout(name: str, root: Path, subdirs: Sequence[str]) -> dict[str, int]:
    root = _find_npy_root(root, subdirs)
    problems: list[str] = []
    sizes: dict[str, int] = {}
    for split in ("train", "val"):
        counts = {}
        for sub in subdirs:
            folder = root / split / sub
            if not folder.is_dir():
                problems.append(f"missing folder {folder}")
                continue
            idx = _npy_indices(folder)
            if not idx:
                problems.append(f"no <i>.npy files in {folder}")
                continue
            if idx != list(range(len(idx))):
                gaps = sorted(set(range(idx[-1] + 1)) - set(idx))[:5]
                problems.append(f"{folder}: files are not numbered 0..{len(idx) - 1} "
                                f"(missing e.g. {gaps})")
            counts[sub] = len(idx)
        if counts and len(set(counts.values())) != 1:
            problems.append(f"{root / split}: different file counts per folder {counts}")
        if counts:
            sizes[split] = min(counts.values())
    if problems:
        raise VisionDataMissing(name, root, problems)
    return sizes


class _NpyFolderDataset(Dataset[dict[str, torch.Tensor]]):
    """Samples ``{"x": image, task: target}`` read lazily from ``<split>/<folder>/<i>.npy``."""

    def __init__(
        self,
        split_dir: Path,
        n: int,
        tasks: dict[str, tuple[str, Callable[[np.ndarray], torch.Tensor]]],
    ) -> None:
        self.split_dir = split_dir
        self.n = n
        self.tasks = tasks

    def __len__(self) -> int:
        return self.n

    def _load(self, folder: str, index: int) -> np.ndarray:
        return np.load(self.split_dir / folder / f"{index}.npy")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        sample = {"x": _chw(self._load("image", index))}
        for task, (folder, convert) in self.tasks.items():
            sample[task] = convert(self._load(folder, index))
        return sample


def _chw(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0)))


def _labels(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    out = np.rint(a).astype(np.int64) if a.dtype.kind == "f" else a.astype(np.int64)
    out[out < 0] = IGNORE_INDEX
    return torch.from_numpy(out)


def _split_train_val(
    train: Dataset[Any], test: Dataset[Any], val_size: int | None, seed: int
) -> tuple[Dataset[Any], Dataset[Any], bool]:
    if val_size is None:
        return train, test, True
    n = len(train)  # type: ignore[arg-type]
    k = check_size("val_size", val_size, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return Subset(train, perm[k:].tolist()), Subset(train, perm[:k].tolist()), False


def _npy_benchmark(
    name: str,
    root: str | Path,
    tasks: dict[str, tuple[str, Callable[[np.ndarray], torch.Tensor]]],
    specs: list[TaskSpec],
    val_size: int | None,
    seed: int,
    extras: dict[str, Any],
) -> MultiTaskData:
    root = Path(root).expanduser()
    subdirs = ["image", *[folder for folder, _ in tasks.values()]]
    sizes = _check_npy_layout(name, root, subdirs)
    base = _find_npy_root(root, subdirs)
    train = _NpyFolderDataset(base / "train", sizes["train"], tasks)
    test = _NpyFolderDataset(base / "val", sizes["val"], tasks)
    first = train[0]
    shape = tuple(first["x"].shape)
    train_ds, val_ds, val_is_test = _split_train_val(train, test, val_size, seed)
    src = SOURCES[name]
    return MultiTaskData(
        train=train_ds,
        val=val_ds,
        test=test,
        tasks=specs,
        input_shape=shape,
        description=f"{src.description}: {sizes['train']} train / {sizes['val']} test images"
        + (" (validation = test, as in the literature)" if val_is_test
           else f" ({val_size} training images held out for validation)"),
        source=f"{src.citation}. {src.homepage}. Licence: {src.licence}.",
        extras={**extras, "val_is_test": val_is_test, "root": str(base),
                "dense_targets": [t.name for t in specs], "ignore_index": IGNORE_INDEX,
                "target_shapes": {k: tuple(v.shape) for k, v in first.items() if k != "x"}},
    )


def nyuv2(root: str | Path, *, val_size: int | None = None, seed: int = 0) -> MultiTaskData:
    """NYUv2 (MTAN's preprocessed ``.npy`` release): segmentation (13), depth, normals.

    Args:
        root: folder holding ``train/`` and ``val/`` (or one folder containing it).
        val_size: ``None`` -- validation is the test split (literature practice); an int holds
            out that many random training images (``seed``).
    """
    tasks = {
        "segmentation": ("label", _labels),
        "depth": ("depth", _chw),
        "normal": ("normal", _chw),
    }
    specs = [TaskSpec("segmentation", "classification", n_classes=13),
             TaskSpec("depth", "regression"), TaskSpec("normal", "regression")]
    return _npy_benchmark("nyuv2", root, tasks, specs, val_size, seed,
                          {"n_classes": 13, "depth_missing": 0.0, "normal_missing": "all-zero"})


def cityscapes(
    root: str | Path, *, n_classes: int = 7, val_size: int | None = None, seed: int = 0
) -> MultiTaskData:
    """Cityscapes (MTAN's preprocessed ``.npy`` release): segmentation (7 classes), depth.

    ``n_classes`` picks the ``label_2``, ``label_7`` (the MTL literature's) or ``label_19`` folder.
    """
    if n_classes not in (2, 7, 19):
        raise ValueError(f"cityscapes: n_classes must be 2, 7 or 19, got {n_classes}")
    tasks = {"segmentation": (f"label_{n_classes}", _labels), "depth": ("depth", _chw)}
    specs = [TaskSpec("segmentation", "classification", n_classes=n_classes),
             TaskSpec("depth", "regression")]
    return _npy_benchmark("cityscapes", root, tasks, specs, val_size, seed,
                          {"n_classes": n_classes, "depth_missing": 0.0})


# ------------------------------------------------------------------------------------------------
# CelebA
# ------------------------------------------------------------------------------------------------
def _celeba_paths(root: Path) -> tuple[Path, Path, Path]:
    """(image folder, attribute file, partition file) for the flat or the official layout."""
    candidates = [
        (root / "img_align_celeba", root / "list_attr_celeba.txt",
         root / "list_eval_partition.txt"),
        (root / "Img" / "img_align_celeba", root / "Anno" / "list_attr_celeba.txt",
         root / "Eval" / "list_eval_partition.txt"),
        (root / "celeba" / "img_align_celeba", root / "celeba" / "list_attr_celeba.txt",
         root / "celeba" / "list_eval_partition.txt"),
    ]
    for img, attr, part in candidates:
        if img.is_dir() and attr.is_file() and part.is_file():
            nested = img / "img_align_celeba"  # some archives unpack one level deeper
            return (nested if nested.is_dir() else img), attr, part
    img, attr, part = candidates[0]
    problems = [f"missing {p}" for p in (img, attr, part) if not p.exists()]
    raise VisionDataMissing(
        "celeba", root, problems or ["incomplete layout"],
        extra=" The official layout (Img/img_align_celeba, Anno/list_attr_celeba.txt, "
        "Eval/list_eval_partition.txt) is accepted too.",
    )


def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line")
    n = int(lines[0].split()[0])
    header = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    if len(rows) != n:
        raise ValueError(f"{path}: header says {n} images, found {len(rows)} rows")
    names = [r[0] for r in rows]
    values = np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.int64)
    if values.shape[1] != len(header):
        raise ValueError(
            f"{path}: {len(header)} attribute names but {values.shape[1]} values per row"
        )
    if not np.isin(values, (-1, 1)).all():
        raise ValueError(f"{path}: attribute values must be -1 or 1")
    return header, names, (values > 0).astype(np.int64)


def _read_partition(path: Path) -> dict[str, int]:
    out = {}
    for ln in path.read_text().splitlines():
        if ln.strip():
            name, part = ln.split()[:2]
            out[name] = int(part)
    return out


class _CelebADataset(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, img_dir: Path, files: list[str], labels: np.ndarray, attrs: list[str],
                 image_size: tuple[int, int] | None) -> None:
        self.img_dir, self.files, self.labels = img_dir, files, torch.from_numpy(labels)
        self.attrs, self.image_size = attrs, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        with Image.open(self.img_dir / self.files[index]) as im:
            im = im.convert("RGB")
            if self.image_size is not None:
                h, w = self.image_size
                im = im.resize((w, h), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
        sample = {"x": torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))}
        row = self.labels[index]
        for j, name in enumerate(self.attrs):
            sample[name] = row[j]
        return sample


def celeba(
    root: str | Path,
    *,
    image_size: tuple[int, int] | None = (64, 64),
    attributes: Sequence[str] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> MultiTaskData:
    """CelebA with its 40 binary attributes as tasks and the official train/val/test partition.

    Args:
        root: folder with ``img_align_celeba/`` and the two annotation files (or the official
            ``Img/``, ``Anno/``, ``Eval/`` layout).
        image_size: ``(H, W)`` to resize to (64x64 as in FAMO/NTKMTL); ``None`` keeps 218x178.
        attributes: a subset of :data:`CELEBA_ATTRIBUTES` (default all 40, in file order).
        n_train, n_val, n_test: random subsets (``seed``) of each split; ``None`` = all.
        check_images: raise :class:`VisionDataMissing` if any listed image file is absent.
    """
    root = Path(root).expanduser()
    img_dir, attr_file, part_file = _celeba_paths(root)
    header, names, labels = _read_attributes(attr_file)
    partition = _read_partition(part_file)
    chosen = list(attributes) if attributes is not None else header
    unknown = [a for a in chosen if a not in header]
    if unknown or not chosen:
        raise ValueError(f"unknown CelebA attributes {unknown}; choose from {header}")
    cols = [header.index(a) for a in chosen]
    missing_part = [n for n in names if n not in partition]
    if missing_part:
        raise ValueError(f"{part_file}: no partition for {len(missing_part)} images "
                         f"(e.g. {missing_part[:3]})")
    if check_images:
        present = {p.name for p in img_dir.iterdir()}
        absent = [n for n in names if n not in present]
        if absent:
            raise VisionDataMissing("celeba", root, [f"{len(absent)} of {len(names)} images absent "
                                                     f"from {img_dir} (e.g. {absent[:3]})"])
    rng = np.random.default_rng(seed)
    splits = []
    for code, req, what in ((0, n_train, "n_train"), (1, n_val, "n_val"), (2, n_test, "n_test")):
        idx = np.array([i for i, n in enumerate(names) if partition[n] == code], dtype=np.int64)
        k = check_size(what, req, len(idx))
        if k < len(idx):
            idx = np.sort(rng.permutation(idx)[:k])
        splits.append(_CelebADataset(img_dir, [names[i] for i in idx], labels[idx][:, cols],
                                     chosen, image_size))
    h, w = image_size if image_size is not None else (218, 178)
    src = SOURCES["celeba"]
    return MultiTaskData(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        tasks=[TaskSpec(a, "classification", n_classes=2) for a in chosen],
        input_shape=(3, h, w),
        description=f"CelebA: {len(chosen)} binary face attributes; "
        f"{len(splits[0])}/{len(splits[1])}/{len(splits[2])} images (official partition)",
        source=f"{src.citation}. {src.homepage}. Licence: {src.licence}.",
        extras={"attributes": chosen, "positive_rate": {a: float(labels[:, header.index(a)].mean())
                                                       for a in chosen},
                "val_is_test": False, "root": str(root)},
    )


# ------------------------------------------------------------------------------------------------
# verification
# ------------------------------------------------------------------------------------------------
def verify(name: str, root: str | Path) -> dict[str, Any]:
    """Check that ``root`` holds a complete copy of ``name``; return its split sizes.

    NYUv2/Cityscapes: every folder present, files numbered ``0..n-1`` with equal counts (the
    published sizes are reported next to the found ones, not enforced, so that subsets work).
    CelebA: the layout, the annotation files' MD5 (where they match the published ones a
    mismatch is reported as ``checksums``), and that every listed image exists.
    """
    root = Path(root).expanduser()
    if name == "nyuv2":
        sizes = _check_npy_layout(name, root, ["image", "label", "depth", "normal"])
    elif name == "cityscapes":
        sizes = _check_npy_layout(name, root, ["image", "label_7", "depth"])
    elif name == "celeba":
        img_dir, attr_file, part_file = _celeba_paths(root)
        data = celeba(root, image_size=None, check_images=True)
        sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}  # type: ignore[arg-type]
        sums = {}
        for rf, path in zip(SOURCES["celeba"].files[1:], (attr_file, part_file), strict=False):
            bad = _check_sum(rf, path)
            sums[rf.filename] = "ok" if bad is None else bad
        return {"sizes": sizes, "published": SOURCES[name].sizes, "checksums": sums,
                "images": str(img_dir)}
    else:
        raise KeyError(f"unknown vision dataset {name!r}; choose from {sorted(SOURCES)}")
    return {"sizes": sizes, "published": SOURCES[name].sizes}
