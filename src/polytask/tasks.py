"""Tasks and task sets: names, losses, metrics, targets, label masks and input validation.

A batch is a mapping. Each task reads its target from ``batch[task.target]`` (the task's name by
default, or a callable ``batch -> Tensor``). A sample may lack a label for a task:

* the target key is absent from the batch: the task has no label in this batch;
* ``batch["masks"][task_name]`` is a boolean ``[B]`` tensor: ``False`` marks a missing label;
* a floating-point target that is NaN is missing.

A task's loss averages over the labelled samples only; a batch without any label for a task gives
that task a zero loss with no gradient (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MetricSpec", "Task", "TaskSet"]

Kind = Literal["classification", "regression", "binary", "custom"]


@dataclass(frozen=True)
class MetricSpec:
    """A metric of a task: a factory of a torchmetrics-like object (update/compute/reset)."""

    name: str
    factory: Callable[[], Any]
    higher_is_better: bool


def _accuracy(n_classes: int) -> MetricSpec:
    def make() -> Any:
        from torchmetrics.classification import MulticlassAccuracy

        return MulticlassAccuracy(num_classes=n_classes, average="micro")

    return MetricSpec("acc", make, True)


def _mae() -> MetricSpec:
    def make() -> Any:
        from torchmetrics.regression import MeanAbsoluteError

        return MeanAbsoluteError()

    return MetricSpec("mae", make, False)


def _mse() -> MetricSpec:
    def make() -> Any:
        from torchmetrics.regression import MeanSquaredError

        return MeanSquaredError()

    return MetricSpec("mse", make, False)


def _binary_auroc() -> MetricSpec:
    def make() -> Any:
        from torchmetrics.classification import BinaryAUROC

        return BinaryAUROC()

    return MetricSpec("auc", make, True)


def _binary_accuracy() -> MetricSpec:
    def make() -> Any:
        from torchmetrics.classification import BinaryAccuracy

        return BinaryAccuracy()

    return MetricSpec("acc", make, True)


def _bce_of_probability(pred: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy of probabilities ``pred``, in float32 with autocast off (CUDA
    autocast refuses ``binary_cross_entropy``; its logs are clamped at -100 and its gradient
    stays finite at probabilities of exactly 0 or 1)."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return F.binary_cross_entropy(pred.reshape(-1).float(), target.reshape(-1).float())


@dataclass
class Task:
    """One task of a multi-task problem.

    Args:
        name: unique task name (the key of the model's output and, by default, of the target).
        loss: ``loss(prediction, target) -> scalar`` averaged over the samples it is given.
        metrics: metrics computed on evaluation data.
        kind: ``"classification"`` (logits ``[B, C]``, int targets ``[B]``), ``"binary"`` (one
            logit or probability per sample, ``[B]`` or ``[B, 1]``, targets in {0, 1}; see
            ``output``), ``"regression"`` (``[B]`` or ``[B, 1]`` predictions, float targets
            ``[B]``) or ``"custom"`` (no shape checks).
        weight: optional fixed weight (used by the ``fixed`` balancer when configured so).
        target: batch key of the target, or a callable ``batch -> target`` (default: ``name``).
        n_classes: number of classes for classification.
        target_scale: multiply regression predictions/targets by this before metrics (e.g. to
            report errors in original units after standardisation).
        output: what a binary task's prediction is: ``"logit"`` (metrics see its sigmoid) or
            ``"probability"`` (already in [0, 1], e.g. ESMM's pCTR and pCTCVR; metrics see it
            unchanged).
    """

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    metrics: Sequence[MetricSpec] = ()
    kind: Kind = "custom"
    weight: float | None = None
    target: str | Callable[[Mapping[str, Any]], Tensor | None] | None = None
    n_classes: int | None = None
    target_scale: float = 1.0
    output: Literal["logit", "probability"] = "logit"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if self.output not in ("logit", "probability"):
            raise ValueError(
                f"task {self.name!r}: output must be 'logit' or 'probability', got {self.output!r}"
            )
        if self.target is None:
            self.target = self.name

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def classification(cls, name: str, n_classes: int, **kw: Any) -> Task:
        """Cross-entropy over ``n_classes`` logits, accuracy metric."""
        kw.setdefault("metrics", (_accuracy(n_classes),))
        return cls(name, F.cross_entropy, kind="classification", n_classes=n_classes, **kw)

    @classmethod
    def binary(cls, name: str, probability: bool = False, **kw: Any) -> Task:
        """Binary cross-entropy on one logit, AUC and accuracy metrics.

        ``probability=True``: the prediction is already a probability (e.g. ESMM's
        ``pCTCVR = pCTR * pCVR``, which has no logit of its own); the loss is
        :func:`torch.nn.functional.binary_cross_entropy` of it, in float32 outside autocast.
        """
        if probability:
            loss: Callable[[Tensor, Tensor], Tensor] = _bce_of_probability
            kw["output"] = "probability"
        else:

            def loss(pred: Tensor, target: Tensor) -> Tensor:
                return F.binary_cross_entropy_with_logits(pred.reshape(-1), target.float())

        kw.setdefault("metrics", (_binary_auroc(), _binary_accuracy()))
        return cls(name, loss, kind="binary", n_classes=2, **kw)

    @classmethod
    def regression(cls, name: str, loss: str = "mse", **kw: Any) -> Task:
        """Regression with an ``"mse"`` or ``"l1"`` loss, MAE (and MSE) metrics."""
        fns = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}
        if loss not in fns:
            raise ValueError(f"task {name!r}: unknown regression loss {loss!r}; use {list(fns)}")
        fn = fns[loss]

        def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
            return fn(pred.reshape(-1), target.reshape(-1).to(pred.dtype))

        kw.setdefault("metrics", (_mae(), _mse()))
        return cls(name, loss_fn, kind="regression", **kw)

    # ---- batch handling ------------------------------------------------------------------
    def get_target(self, batch: Mapping[str, Any]) -> Tensor | None:
        if callable(self.target):
            return self.target(batch)
        return batch.get(self.target)  # type: ignore[arg-type]

    def label_mask(self, batch: Mapping[str, Any], target: Tensor) -> Tensor | None:
        """Boolean ``[B]`` mask of labelled samples, or ``None`` when all are labelled."""
        mask = None
        masks = batch.get("masks")
        if isinstance(masks, Mapping) and self.name in masks:
            mask = torch.as_tensor(masks[self.name], device=target.device).bool().reshape(-1)
            if mask.shape[0] != target.shape[0]:
                raise ValueError(
                    f"task {self.name!r}: masks[{self.name!r}] has {mask.shape[0]} entries but "
                    f"the target has batch size {target.shape[0]}"
                )
        if target.is_floating_point():
            finite = torch.isfinite(target.reshape(target.shape[0], -1)).all(dim=1)
            mask = finite if mask is None else mask & finite
        return mask

    def check_shapes(self, pred: Tensor, target: Tensor) -> None:
        """Raise a ValueError naming the task, tensor and expected shape on a mismatch."""
        b = target.shape[0] if target.ndim else None
        if target.ndim == 0:
            raise ValueError(
                f"task {self.name!r}: target must have a batch dimension, got a scalar"
            )
        if pred.shape[0] != b:
            raise ValueError(
                f"task {self.name!r}: prediction has batch size {pred.shape[0]} but target has {b} "
                f"(prediction {tuple(pred.shape)}, target {tuple(target.shape)})"
            )
        if self.kind == "classification":
            if pred.ndim != 2 or (self.n_classes is not None and pred.shape[1] != self.n_classes):
                raise ValueError(
                    f"task {self.name!r}: prediction must have shape [B, {self.n_classes}] "
                    f"(logits), got {tuple(pred.shape)}"
                )
            if target.ndim != 1 or target.is_floating_point():
                raise ValueError(
                    f"task {self.name!r}: target must be an integer tensor of shape [B], got "
                    f"{tuple(target.shape)} {target.dtype}"
                )
        elif self.kind in ("regression", "binary"):
            ok = pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1)
            if not ok or target.numel() != b:
                raise ValueError(
                    f"task {self.name!r}: prediction must have shape [B] or [B, 1] and target "
                    f"[B] (B={b}), got prediction {tuple(pred.shape)}, target {tuple(target.shape)}"
                )


@dataclass
class TaskLosses:
    """Per-task losses of one batch: ``losses[K]`` and the number of labelled samples ``counts``.

    ``parts`` holds the ``K`` scalar losses before stacking; passing them (not ``losses``) to
    :func:`polytask.mtl_backward` lets the engine take each task's head gradients separately,
    which is cheaper with many tasks.
    """

    losses: Tensor
    counts: Tensor
    names: list[str] = field(default_factory=list)
    parts: tuple[Tensor, ...] = ()

    def as_dict(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.losses.detach(), strict=False)}


class TaskSet:
    """An ordered set of tasks; validates model outputs and batches against them."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("a TaskSet needs at least one task")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task names: {dup}")
        self.tasks = tasks
        self.names = names

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.tasks)

    def __getitem__(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; tasks are {self.names}")

    def check_outputs(self, outputs: Mapping[str, Tensor]) -> None:
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"the model must return a dict {{task_name: prediction}}, got "
                f"{type(outputs).__name__}"
            )
        missing = [n for n in self.names if n not in outputs]
        extra = [k for k in outputs if k not in self.names]
        if missing or extra:
            raise ValueError(
                f"model outputs do not match the tasks: missing {missing}, unexpected {extra} "
                f"(tasks are {self.names})"
            )

    def compute_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> TaskLosses:
        """Per-task losses over labelled samples (zero, without gradient, when none are)."""
        self.check_outputs(outputs)
        losses, counts = [], []
        for task in self.tasks:
            pred = outputs[task.name]
            target = task.get_target(batch)
            if target is None:
                losses.append(pred.new_zeros(()))
                counts.append(0)
                continue
            target = torch.as_tensor(target, device=pred.device)
            task.check_shapes(pred, target)
            mask = task.label_mask(batch, target)
            if mask is not None:
                n = int(mask.sum())
                if n == 0:
                    losses.append(pred.new_zeros(()))
                    counts.append(0)
                    continue
                if n < mask.numel():
                    pred, target = pred[mask], target[mask]
            else:
                n = target.shape[0]
            loss = task.loss(pred, target)
            if loss.ndim != 0:
                raise ValueError(
                    f"task {task.name!r}: loss must return a scalar, got shape {tuple(loss.shape)}"
                )
            losses.append(loss)
            counts.append(n)
        dev = losses[0].device
        parts = tuple(task_loss.to(losses[0].dtype) for task_loss in losses)
        return TaskLosses(torch.stack(parts), torch.tensor(counts, device=dev), self.names, parts)

    def make_metrics(self) -> dict[str, dict[str, Any]]:
        return {t.name: {m.name: m.factory() for m in t.metrics} for t in self.tasks}

    def update_metrics(
        self,
        metrics: Mapping[str, Mapping[str, Any]],
        outputs: Mapping[str, Tensor],
        batch: Mapping[str, Any],
    ) -> None:
        for task in self.tasks:
            target = task.get_target(batch)
            if target is None or not metrics[task.name]:
                continue
            pred = outputs[task.name].detach()
            target = torch.as_tensor(target, device=pred.device)
            mask = task.label_mask(batch, target)
            if mask is not None:
                pred, target = pred[mask], target[mask]
            if target.numel() == 0:
                continue
            if task.kind in ("regression", "binary"):
                pred = pred.reshape(-1)
                target = target.reshape(-1)
            if task.kind == "regression":
                pred = pred.float() * task.target_scale
                target = target.float() * task.target_scale
            if task.kind == "binary":
                pred = pred.float() if task.output == "probability" else torch.sigmoid(pred.float())
                target = target.long()
            for m in metrics[task.name].values():
                m.to(pred.device)
                m.update(pred, target)

    def higher_is_better(self) -> dict[str, bool]:
        """``{"task/metric": higher_is_better}`` for every metric."""
        return {f"{t.name}/{m.name}": m.higher_is_better for t in self.tasks for m in t.metrics}
