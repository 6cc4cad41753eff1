"""GPU-scale vision suites: ``nyuv2``, ``cityscapes`` (dense prediction), ``celeba`` (attributes).

=============  ===============================================================================
suite          protocol (version ``1``)
=============  ===============================================================================
nyuv2          NYUv2 13-class segmentation + depth + surface normals, 288x384, SegNet-MTAN;
               Adam 1e-4, batch 2, StepLR(100, 0.5), 200 epochs, scale-crop + flip augmentation
cityscapes     Cityscapes 7-class segmentation + depth, 128x256, SegNet-MTAN; Adam 1e-4,
               batch 8, StepLR(100, 0.5), 200 epochs
celeba         CelebA 40 binary attributes, 64x64, FAMO's 9-layer CNN; Adam 3e-4, batch 256,
               15 epochs; F1 per attribute
=============  ===============================================================================

Model, optimiser, schedule, epochs, losses and metrics follow the reference code of Nash-MTL
(``AvivNavon/nash-mtl`` ``experiments/nyuv2``, ``experiments/cityscapes``) and FAMO
(``Cranial-XIX/FAMO`` ``experiments/celeba``), the code behind the numbers in
``/shared/references.md``. Two deliberate differences, both in the published-numbers section of
every report:

* **selection on validation data.** NYUv2 and Cityscapes ship only a training and a test split;
  the papers report test metrics (the mean over the last epochs) without any validation data.
  Here ``val_fraction`` (10 %) of the training images are held out (a fixed draw), the epoch with
  the lowest validation loss is selected and its test metrics are reported. CelebA has an official
  validation split, used as FAMO does (FAMO selects on validation mean F1; here validation loss,
  as in every polytask suite).
* **pooled metrics.** Depth errors and normal-angle statistics are pooled over every valid pixel
  of the test set (the median from a 0.01-degree histogram), where the reference averages
  per-batch values.

Data are read from ``$POLYTASK_<NAME>_ROOT`` (e.g. ``POLYTASK_NYUV2_ROOT``), else
``<cache>/<name>`` (see :mod:`polytask.data.vision` for the layouts and
:func:`polytask.data.vision.download` for the upstream sources and checksums). None of them can be
downloaded on machines that reach only package registries: these suites are for GPU machines with
the data; the tests run them end to end on small fixtures in the real on-disk layout.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import data
from ..config import RunConfig
from ..data import vision as vdata
from ..data._fetch import cache_dir
from ..tasks import MetricSpec, Task, TaskSet
from ._suite import Protocol, Published, register_suite
from .suites import TrainerSuite

__all__ = [
    "CelebASuite",
    "CityscapesSuite",
    "DepthError",
    "NYUv2Suite",
    "NormalAngle",
    "SegmentationScore",
    "data_root",
    "depth_task",
    "normal_task",
    "segmentation_task",
]


# ------------------------------------------------------------------------------------------------
# metrics (update/compute/reset/to, as torchmetrics objects)
# ------------------------------------------------------------------------------------------------
class SegmentationScore:
    """Mean IoU (``"miou"``) or pixel accuracy (``"pix_acc"``) from a confusion matrix.

    Pixels with targets outside ``[0, n_classes)`` (the ignore index ``-1``) are skipped. mIoU is
    the mean over classes of ``TP / (TP + FP + FN)``, classes never seen nor predicted excluded
    (the reference divides 0/0 into NaN and takes ``torch.mean``; on the full test set every class
    occurs, where both agree).

    >>> m = SegmentationScore(3, "miou")
    >>> logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]], [[0.0, 0.0]]]])  # [1, 3, 1, 2]
    >>> m.update(logits, torch.tensor([[[0, 2]]]))
    >>> float(m.compute())  # class 0 right (IoU 1), classes 1 and 2 wrong (IoU 0)
    0.3333333333333333
    """

    def __init__(self, n_classes: int, which: str) -> None:
        if which not in ("miou", "pix_acc"):
            raise ValueError(f"SegmentationScore: which must be 'miou' or 'pix_acc', got {which!r}")
        self.n, self.which = int(n_classes), which
        self.reset()

    def reset(self) -> None:
        self.mat = torch.zeros(self.n, self.n, dtype=torch.int64)

    def to(self, device: Any) -> SegmentationScore:
        self.mat = self.mat.to(device)
        return self

    def update(self, pred: Tensor, target: Tensor) -> None:
        if (
            pred.ndim != 4
            or pred.shape[1] != self.n
            or target.shape != (pred.shape[0], *pred.shape[2:])
        ):
            raise ValueError(
                f"segmentation: prediction must be [B, {self.n}, H, W] logits and target "
                "[B, H, W], "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        p = pred.argmax(1).flatten()
        t = target.flatten().long()
        keep = (t >= 0) & (t < self.n)
        self.mat += torch.bincount(self.n * t[keep] + p[keep], minlength=self.n**2).reshape(
            self.n, self.n
        )

    def compute(self) -> Tensor:
        h = self.mat.double()
        if h.sum() == 0:
            raise ValueError("no labelled pixel seen")
        if self.which == "pix_acc":
            return torch.diag(h).sum() / h.sum()
        union = h.sum(0) + h.sum(1) - torch.diag(h)
        seen = union > 0
        return (torch.diag(h)[seen] / union[seen]).mean()


class DepthError:
    """Absolute (``"abs"``) or relative (``"rel"``) depth error over valid pixels (target != 0).

    >>> m = DepthError("rel")
    >>> m.update(torch.tensor([[[[2.0, 5.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    >>> float(m.compute())  # |2 - 1| / 1 on the one valid pixel
    1.0
    """

    def __init__(self, which: str) -> None:
        if which not in ("abs", "rel"):
            raise ValueError(f"DepthError: which must be 'abs' or 'rel', got {which!r}")
        self.which = which
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def to(self, device: Any) -> DepthError:
        self.total, self.count = self.total.to(device), self.count.to(device)
        return self

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(
                f"depth: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ"
            )
        mask = target.sum(1, keepdim=True) != 0
        mask = mask.expand_as(target)
        err = (pred - target).abs()[mask]
        if self.which == "rel":
            err = err / target[mask].abs()
        self.total += err.double().sum()
        self.count += mask.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("no valid pixel seen")
        return self.total / self.count


class NormalAngle:
    """Angle (degrees) between predicted and true surface normals over valid pixels.

    ``which``: ``"mean"``, ``"median"``, or ``"within_11.25"`` / ``"within_22.5"`` /
    ``"within_30"`` (fraction of pixels below that angle). Angles are binned at 0.01 degrees, so
    the median is exact to 0.01 degrees and the state is a fixed-size histogram.

    >>> m = NormalAngle("within_30")
    >>> n = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])  # [1, 3, 1, 2]
    >>> m.update(n, torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]]))
    >>> float(m.compute())  # 0 and 90 degrees: one of two pixels within 30
    0.5
    """

    BINS = 18000

    def __init__(self, which: str) -> None:
        ok = ("mean", "median", "within_11.25", "within_22.5", "within_30")
        if which not in ok:
            raise ValueError(f"NormalAngle: which must be one of {ok}, got {which!r}")
        self.which = which
        self.reset()

    def reset(self) -> None:
        self.hist = torch.zeros(self.BINS, dtype=torch.int64)
        self.total = torch.zeros((), dtype=torch.float64)

    def to(self, device: Any) -> NormalAngle:
        self.hist, self.total = self.hist.to(device), self.total.to(device)
        return self

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"normal: prediction and target must both be [B, 3, H, W], got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        mask = target.sum(1) != 0
        cos = (pred * target).sum(1)[mask].clamp(-1, 1)
        deg = torch.rad2deg(torch.acos(cos.double()))
        self.total += deg.sum()
        idx = (deg / 180.0 * self.BINS).long().clamp_(0, self.BINS - 1)
        self.hist += torch.bincount(idx, minlength=self.BINS)

    def compute(self) -> Tensor:
        n = self.hist.sum()
        if n == 0:
            raise ValueError("no valid pixel seen")
        if self.which == "mean":
            return self.total / n
        width = 180.0 / self.BINS
        if self.which == "median":
            k = int(torch.searchsorted(torch.cumsum(self.hist, 0), (n + 1) // 2))
            return torch.tensor((k + 0.5) * width, dtype=torch.float64)
        limit = float(self.which.split("_")[1])
        return self.hist[: round(limit / width)].sum().double() / n


# ------------------------------------------------------------------------------------------------
# dense tasks (the reference losses)
# ------------------------------------------------------------------------------------------------
def segmentation_task(name: str, n_classes: int) -> Task:
    """Pixel-wise cross-entropy (``ignore_index=-1``); metrics mIoU and pixel accuracy."""

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        if (
            pred.ndim != 4
            or pred.shape[1] != n_classes
            or target.shape != (pred.shape[0], *pred.shape[2:])
        ):
            raise ValueError(
                f"task {name!r}: prediction must be [B, {n_classes}, H, W] and target [B, H, W], "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if not (target >= 0).any():
            return pred.sum() * 0.0  # no labelled pixel: zero loss, no NaN
        return F.cross_entropy(pred, target.long(), ignore_index=vdata.IGNORE_INDEX)

    metrics = (
        MetricSpec("miou", lambda: SegmentationScore(n_classes, "miou"), True),
        MetricSpec("pix_acc", lambda: SegmentationScore(n_classes, "pix_acc"), True),
    )
    return Task(name, loss, metrics=metrics, kind="custom", n_classes=n_classes)


def _valid(target: Tensor) -> Tensor:
    return (target.sum(1, keepdim=True) != 0).to(target.dtype)


def depth_task(name: str) -> Task:
    """L1 over the pixels with a depth (target != 0); metrics absolute and relative error."""

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"task {name!r}: prediction {tuple(pred.shape)} and target "
                f"{tuple(target.shape)} must have the same shape [B, 1, H, W]"
            )
        mask = _valid(target)
        return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1)

    metrics = (
        MetricSpec("abs_err", lambda: DepthError("abs"), False),
        MetricSpec("rel_err", lambda: DepthError("rel"), False),
    )
    return Task(name, loss, metrics=metrics, kind="custom")


def normal_task(name: str) -> Task:
    """``1 - cos`` between unit normals over valid pixels; angle metrics (mean, median, within)."""

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"task {name!r}: prediction and target must be [B, 3, H, W], got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        mask = _valid(target)
        return 1.0 - (pred * target * mask).sum() / mask.sum().clamp_min(1)

    metrics = (
        MetricSpec("mean_angle", lambda: NormalAngle("mean"), False),
        MetricSpec("median_angle", lambda: NormalAngle("median"), False),
        MetricSpec("within_11.25", lambda: NormalAngle("within_11.25"), True),
        MetricSpec("within_22.5", lambda: NormalAngle("within_22.5"), True),
        MetricSpec("within_30", lambda: NormalAngle("within_30"), True),
    )
    return Task(name, loss, metrics=metrics, kind="custom")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def data_root(name: str) -> Path:
    """``$POLYTASK_<NAME>_ROOT`` if set, else ``<cache>/<name>``."""
    env = os.environ.get(f"POLYTASK_{name.upper()}_ROOT")
    return Path(env).expanduser() if env else cache_dir() / name


class ScaleCropFlip(Dataset[dict[str, Tensor]]):
    """NYUv2 training augmentation of the reference code (CAGrad/Nash-MTL ``RandomScaleCrop``).

    Crop a random window of ``1/s`` of the image (``s`` drawn from ``scales``), resize back
    (bilinear for the image and normals, nearest for labels and depth), divide depth by ``s``;
    then flip horizontally with probability 1/2 (negating the normals' x component).
    """

    def __init__(
        self,
        base: Dataset[dict[str, Tensor]],
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        flip: bool = True,
    ) -> None:
        self.base, self.scales, self.flip = base, tuple(scales), flip

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        s = dict(self.base[index])
        height, width = s["x"].shape[-2:]
        sc = random.choice(self.scales)
        h, w = int(height / sc), int(width / sc)
        i, j = random.randint(0, height - h), random.randint(0, width - w)

        def crop(t: Tensor, mode: str) -> Tensor:
            t = t[..., i : i + h, j : j + w]
            kw: dict[str, Any] = {"align_corners": True} if mode == "bilinear" else {}
            if t.ndim == 2:
                return F.interpolate(t[None, None].float(), size=(height, width), mode=mode)[0, 0]
            return F.interpolate(t[None].float(), size=(height, width), mode=mode, **kw)[0]

        s["x"] = crop(s["x"], "bilinear")
        if "segmentation" in s:
            s["segmentation"] = crop(s["segmentation"], "nearest").long()
        if "depth" in s:
            s["depth"] = crop(s["depth"], "nearest") / sc
        if "normal" in s:
            s["normal"] = crop(s["normal"], "bilinear")
        if self.flip and random.random() < 0.5:
            for k in list(s):
                s[k] = torch.flip(s[k], dims=[-1])
            if "normal" in s:
                s["normal"][0] = -s["normal"][0]
        return s


# ------------------------------------------------------------------------------------------------
# suites
# ------------------------------------------------------------------------------------------------
_NASH_NYU = "Navon et al., Nash-MTL, ICML 2022, Table 2 (also NTKMTL Table 1); 3 seeds"


class _VisionSuite(TrainerSuite):
    """A :class:`TrainerSuite` on a vision loader of :mod:`polytask.data.vision`."""

    dataset = ""
    version = "1"
    seeds = (0, 1, 2)
    default_threads = None  # GPU suites: torch's default

    def loader_options(self, protocol: Protocol) -> dict[str, Any]:
        return dict(protocol.settings["data"].get("options", {}))

    def data(self, protocol: Protocol) -> data.MultiTaskData:
        d = protocol.settings["data"]
        key = repr(
            [self.dataset, str(data_root(self.dataset)), sorted(d.get("options", {}).items())]
        )
        if key not in self._data:
            mtd = self.load(data_root(self.dataset), protocol)
            if protocol.settings.get("augment"):
                mtd.train = ScaleCropFlip(mtd.train)
            self._data = {key: mtd}
        return self._data[key]

    def load(self, root: Path, protocol: Protocol) -> data.MultiTaskData:
        raise NotImplementedError

    def make_tasks(
        self,
        cfg: RunConfig,
        mtd: data.MultiTaskData,
        names: Sequence[str] | None,
        keep: Sequence[str] | None,
    ) -> TaskSet:
        tasks = [self.task_for(spec) for spec in mtd.tasks if names is None or spec.name in names]
        return TaskSet(tasks)

    def task_for(self, spec: Any) -> Task:
        raise NotImplementedError


class _DenseSuite(_VisionSuite):
    """NYUv2 / Cityscapes: SegNet-MTAN (or plain SegNet), the reference losses and metrics."""

    val_fraction = 0.1

    def dense_settings(self, quick: bool, batch_size: int, n_train: int) -> dict[str, Any]:
        val = max(1, math.floor(self.val_fraction * n_train))
        return {
            "data": {
                "name": self.dataset,
                "batch_size": batch_size,
                "eval_batch_size": batch_size,
                "options": {"val_size": val, "seed": 0},
            },
            "augment": self.dataset == "nyuv2",
            "network": {"name": "segnet_mtan", "filters": [64, 128, 256, 512, 512]},
            "optimizer": {"name": "adam", "lr": 1e-4},
            "scheduler": {"name": "step", "step_size": 100, "gamma": 0.5},
            "trainer": {"epochs": 4 if quick else 200, "monitor": "val/loss"},
            "grad_conflict_batches": 2,
            "notes": [
                f"selection: {val} training images held out as validation data (fixed draw); the "
                "published protocol has no validation split and reports test metrics of the last "
                "epochs",
            ],
        }

    def task_for(self, spec: Any) -> Task:
        if spec.name == "segmentation":
            return segmentation_task(spec.name, int(spec.n_classes))
        if spec.name == "depth":
            return depth_task(spec.name)
        if spec.name == "normal":
            return normal_task(spec.name)
        raise ValueError(f"{self.name}: no dense task for {spec.name!r}")

    def make_model(self, cfg: RunConfig, mtd: data.MultiTaskData, tasks: TaskSet) -> nn.Module:
        from ..models import SegNet, SegNetMTAN

        net = self._network
        kinds = {"segmentation": "segmentation", "depth": "depth", "normal": "normal"}
        channels = {
            "segmentation": int(mtd.task("segmentation").n_classes or 0),
            "depth": 1,
            "normal": 3,
        }
        spec = {t.name: (channels[t.name], kinds[t.name]) for t in tasks}
        cls = {"segnet_mtan": SegNetMTAN, "segnet": SegNet}[net["name"]]
        return cls(spec, filters=net["filters"])

    def train(
        self, protocol: Protocol, method: str, seed: int, task_names: Sequence[str] | None = None
    ) -> Any:
        self._network = protocol.settings["network"]
        return super().train(protocol, method, seed, task_names)

    def prepare(self, protocol: Protocol) -> None:
        self._network = protocol.settings["network"]
        super().prepare(protocol)


@register_suite("nyuv2")
class NYUv2Suite(_DenseSuite):
    """NYUv2, 3 tasks, SegNet-MTAN (Nash-MTL's NYUv2 protocol; GPU)."""

    description = (
        "NYUv2 (GPU): 13-class segmentation + depth + normals, SegNet-MTAN, 200 epochs "
        "(Nash-MTL protocol, validation held out)"
    )
    dataset = "nyuv2"

    def settings(self, quick: bool) -> dict[str, Any]:
        return self.dense_settings(quick, batch_size=2, n_train=795)

    def load(self, root: Path, protocol: Protocol) -> data.MultiTaskData:
        return vdata.nyuv2(root, **self.loader_options(protocol))

    def published(self, protocol: Protocol) -> list[Published]:
        from ._report import REFERENCE_TABLES

        return REFERENCE_TABLES["nyuv2"]


@register_suite("cityscapes")
class CityscapesSuite(_DenseSuite):
    """Cityscapes, 7-class segmentation + depth, SegNet-MTAN (Nash-MTL's protocol; GPU)."""

    description = (
        "Cityscapes (GPU): 7-class segmentation + depth, SegNet-MTAN, 200 epochs "
        "(Nash-MTL protocol, validation held out)"
    )
    dataset = "cityscapes"

    def settings(self, quick: bool) -> dict[str, Any]:
        s = self.dense_settings(quick, batch_size=8, n_train=2975)
        s["data"]["options"]["n_classes"] = 7
        return s

    def load(self, root: Path, protocol: Protocol) -> data.MultiTaskData:
        return vdata.cityscapes(root, **self.loader_options(protocol))

    def published(self, protocol: Protocol) -> list[Published]:
        from ._report import REFERENCE_TABLES

        return REFERENCE_TABLES["cityscapes"]


class _BinaryF1:
    """F1 of the positive class at threshold 0.5 (FAMO's CelebA metric), from probabilities."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tp = self.fp = self.fn = 0.0

    def to(self, device: Any) -> _BinaryF1:
        return self

    def update(self, prob: Tensor, target: Tensor) -> None:
        p = (prob.reshape(-1) > 0.5).double()
        t = target.reshape(-1).double()
        self.tp += float((p * t).sum())
        self.fp += float((p * (1 - t)).sum())
        self.fn += float(((1 - p) * t).sum())

    def compute(self) -> Tensor:
        precision = self.tp / (self.tp + self.fp + 1e-8)
        recall = self.tp / (self.tp + self.fn + 1e-8)
        return torch.tensor(2 * precision * recall / (precision + recall + 1e-8))


@register_suite("celeba")
class CelebASuite(_VisionSuite):
    """CelebA, 40 binary attributes, FAMO's CNN, F1 per attribute (FAMO's protocol; GPU)."""

    description = (
        "CelebA (GPU): 40 binary attributes, 64x64, FAMO's 9-layer CNN, F1 (FAMO protocol)"
    )
    dataset = "celeba"

    def settings(self, quick: bool) -> dict[str, Any]:
        return {
            "data": {
                "name": "celeba",
                "batch_size": 256,
                "eval_batch_size": 512,
                "num_workers": 0 if quick else 4,
                "options": {
                    "image_size": [64, 64],
                    **({"n_train": 20000, "n_val": 2000, "n_test": 5000} if quick else {}),
                },
            },
            "network": {"name": "celeba_cnn", "width": 1.0},
            "optimizer": {"name": "adam", "lr": 3e-4},
            "trainer": {"epochs": 3 if quick else 15, "monitor": "val/loss"},
            "grad_conflict_batches": 1,
            "notes": [
                "selection: official validation split, lowest validation loss (FAMO selects "
                "on validation mean F1)"
            ],
        }

    def load(self, root: Path, protocol: Protocol) -> data.MultiTaskData:
        opts = self.loader_options(protocol)
        if "image_size" in opts and opts["image_size"] is not None:
            opts["image_size"] = tuple(opts["image_size"])
        return vdata.celeba(root, **opts)

    def task_for(self, spec: Any) -> Task:
        return Task.binary(spec.name, metrics=(MetricSpec("f1", _BinaryF1, True),))

    def make_model(self, cfg: RunConfig, mtd: data.MultiTaskData, tasks: TaskSet) -> nn.Module:
        from ..models import CelebANet

        return CelebANet(list(tasks.names), width=float(self._network.get("width", 1.0)))

    def train(
        self, protocol: Protocol, method: str, seed: int, task_names: Sequence[str] | None = None
    ) -> Any:
        self._network = protocol.settings["network"]
        return super().train(protocol, method, seed, task_names)

    def prepare(self, protocol: Protocol) -> None:
        self._network = protocol.settings["network"]
        super().prepare(protocol)

    def published(self, protocol: Protocol) -> list[Published]:
        from ._report import REFERENCE_TABLES

        return REFERENCE_TABLES["celeba"]
