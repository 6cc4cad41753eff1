"""Benchmark suites on real data: images, tabular, text (each with a full and a quick protocol).

=====================  ===========================================================================
suite                  protocol
=====================  ===========================================================================
multi_mnist            MultiMNIST left/right digit, LeNet-style shared encoder, hard sharing
multi_fashion          MultiFashion left/right item, same model
multi_fashion_mnist    Multi-(Fashion+MNIST), same model
census                 UCI Adult income >50K + never married, MMoE (AUC)
census_ple             the same with PLE
rf1                    Mulan RF1 river flow, 8 regressions, MLP hard sharing (MAE, original units)
reviews                clothing reviews rating/recommended/department, TF-IDF + MLP hard sharing
=====================  ===========================================================================

Every suite trains with :class:`~polytask.trainer.Trainer`: Adam, the epoch with the lowest
validation loss (sum over tasks) is selected and its test metrics are reported. The data split is
fixed (data seed 0); the run seed sets initialisation and batch order. The single-task baselines
use the same model with one head, trained with the plain loss. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import architectures, balancers, data
from ..config import RunConfig, parse_config
from ..recipes import _optimizer, _scheduler, build_model, build_tasks, mlp
from ..tasks import Task, TaskSet
from ..trainer import Trainer, TrainerConfig
from ._runner import STL, gradient_conflict
from ._suite import Protocol, RunResult, Suite, register_suite

__all__ = [
    "DEFAULT_METHOD_PREFERENCE",
    "CensusSuite",
    "ImageSuite",
    "RF1Suite",
    "ReviewsMiniLMSuite",
    "ReviewsSuite",
    "TrainerSuite",
]

# The default methods of a suite are the first N of these that are registered.
DEFAULT_METHOD_PREFERENCE = (
    "mean",
    "uw",
    "dwa",
    "famo",
    "pcgrad",
    "mgda",
    "cagrad",
    "nash_mtl",
    "upgrad",
    "imtl",
    "db_mtl",
    "gradvac",
    "rlw",
)


def default_methods(
    n: int = 8, preference: Sequence[str] = DEFAULT_METHOD_PREFERENCE
) -> tuple[str, ...]:
    known = set(balancers.available())
    return tuple([m for m in preference if m in known][:n])


class TrainerSuite(Suite):
    """A suite whose runs are :class:`~polytask.trainer.Trainer` fits of a :class:`RunConfig`.

    ``settings(quick)`` returns the protocol settings: the ``data``, ``model``, ``optimizer``,
    ``scheduler`` sections of a run config, ``trainer`` (epochs, monitor, ...), and optionally
    ``metrics`` (metric names kept per task, ``None``: all), ``hparams`` (``{method: {...}}``),
    ``grad_conflict_batches`` and ``notes``. Subclasses may override :meth:`make_tasks` and
    :meth:`make_model`.
    """

    version = "1"
    seeds: tuple[int, ...] = (0, 1, 2)
    n_default_methods = 8
    default_threads = 1  # small CPU models (see Suite.default_threads)

    def __init__(self) -> None:
        self._data: dict[str, data.MultiTaskData] = {}

    # ------------------------------------------------------------------ protocol
    def settings(self, quick: bool) -> dict[str, Any]:
        raise NotImplementedError

    def protocol(self, quick: bool) -> Protocol:
        return Protocol(
            suite=self.name,
            version=self.version + ("-quick" if quick else ""),
            settings=self.settings(quick),
            seeds=self.seeds,
            default_methods=default_methods(self.n_default_methods),
        )

    # ------------------------------------------------------------------ data, tasks, model
    def data(self, protocol: Protocol) -> data.MultiTaskData:
        """The protocol's dataset, loaded once per suite object."""
        d = protocol.settings["data"]
        key = json.dumps([d["name"], d.get("options", {})], sort_keys=True)
        if key not in self._data:
            self._data = {key: data.load(d["name"], **d.get("options", {}))}
        return self._data[key]

    def prepare(self, protocol: Protocol) -> None:
        """Load the data and warm up (one step of a loss method and of a gradient method, one
        evaluation batch), so one-time lazy initialisation is not charged to the first run."""
        mtd = self.data(protocol)
        cfg = self.run_config(protocol, "sum", 0)
        tasks = self.make_tasks(cfg, mtd, None, protocol.settings.get("metrics"))
        kw: dict[str, Any] = {"collate_fn": mtd.collate_fn}
        batch = next(iter(DataLoader(mtd.train, batch_size=cfg.data.batch_size, **kw)))
        evals = [next(iter(DataLoader(mtd.val, batch_size=cfg.data.eval_batch_size, **kw)))]
        known = balancers.available()
        for name in ["mean", *[m for m in ("pcgrad", "upgrad", "mgda") if m in known][:1]]:
            model = self.make_model(cfg, mtd, tasks)
            tcfg = TrainerConfig(epochs=1, progress=False, device=cfg.trainer.device, seed=0)
            trainer = Trainer(
                model, tasks, balancers.create(name, len(tasks)), _optimizer(cfg), None, tcfg
            )
            trainer.train_step(batch)
            trainer.evaluate(evals)
        if len(tasks) > 1:
            gradient_conflict(trainer.model, tasks, [batch], n_batches=1, device=trainer.device)

    def run_config(self, protocol: Protocol, method: str, seed: int) -> RunConfig:
        s = protocol.settings
        raw: dict[str, Any] = {
            k: copy.deepcopy(s[k]) for k in ("data", "model", "optimizer", "scheduler") if k in s
        }
        raw["trainer"] = {
            **copy.deepcopy(s.get("trainer", {})),
            "seed": seed,
            "progress": False,  # the runner's bar shows runs, epochs and ETA
            "device": self.device,
            "out_dir": "",
        }
        raw["balancer"] = {
            "name": method,
            "hparams": copy.deepcopy(s.get("hparams", {}).get(method, {})),
        }
        return parse_config(raw)

    def make_tasks(
        self,
        cfg: RunConfig,
        mtd: data.MultiTaskData,
        names: Sequence[str] | None,
        keep: Sequence[str] | None,
    ) -> TaskSet:
        """Tasks from the dataset's specs; ``keep``: metric names to compute (``None``: all)."""
        tasks = build_tasks(mtd, names)
        if keep is None:
            return tasks
        return TaskSet([_keep_metrics(t, keep) for t in tasks])

    def make_model(self, cfg: RunConfig, mtd: data.MultiTaskData, tasks: TaskSet) -> nn.Module:
        return build_model(cfg, mtd, tasks)

    # ------------------------------------------------------------------ runs
    def train(
        self, protocol: Protocol, method: str, seed: int, task_names: Sequence[str] | None = None
    ) -> RunResult:
        """Fit one network (all tasks, or ``task_names``) with balancer ``method``; test it."""
        s = protocol.settings
        cfg = self.run_config(protocol, method, seed)
        mtd = self.data(protocol)
        # the same order of random draws as recipes.build_run
        torch.manual_seed(cfg.trainer.seed)
        tasks = self.make_tasks(cfg, mtd, task_names, s.get("metrics"))
        model = self.make_model(cfg, mtd, tasks)
        bal_name = cfg.balancer.name if len(tasks) > 1 else "sum"
        hp = cfg.balancer.hparams if len(tasks) > 1 else {}
        balancer = balancers.create(bal_name, len(tasks), **hp)
        t = cfg.trainer
        tcfg = TrainerConfig(
            epochs=t.epochs,
            mode=t.mode,
            grad_clip=t.grad_clip,
            amp=t.amp,
            device=t.device,
            monitor=t.monitor,
            patience=t.patience,
            out_dir=None,
            progress=t.progress,
            seed=t.seed,
        )
        trainer = Trainer(
            model, tasks, balancer, _optimizer(cfg), _scheduler(cfg), tcfg, run_config=cfg.to_dict()
        )
        d = cfg.data
        kw: dict[str, Any] = {"num_workers": d.num_workers, "collate_fn": mtd.collate_fn}
        train_loader = DataLoader(mtd.train, batch_size=d.batch_size, shuffle=True, **kw)
        val_loader = DataLoader(mtd.val, batch_size=d.eval_batch_size, **kw)
        test_loader = DataLoader(mtd.test, batch_size=d.eval_batch_size, **kw)

        t0 = time.perf_counter()
        # one epoch per fit() call (the trainer continues from its epoch counter), so that the
        # runner's progress bar advances per epoch; the same training as one fit(epochs) call
        for epoch in range(t.epochs):
            trainer.config.epochs = epoch + 1
            trainer.fit(train_loader, val_loader)
            self.advance(1)
            if t.patience is not None and trainer.bad_epochs >= t.patience:
                break
        history = trainer.history
        elapsed = time.perf_counter() - t0
        extras: dict[str, Any] = {"train_time_s": elapsed, "epochs_run": len(history)}
        n_conf = int(s.get("grad_conflict_batches", 4))
        if len(tasks) > 1 and n_conf > 0:
            # the final (last-epoch) model, on training batches
            extras["grad_conflict"] = gradient_conflict(
                trainer.model, tasks, train_loader, n_batches=n_conf, device=trainer.device
            )
        trainer.load_best()
        test = trainer.evaluate(test_loader)
        return RunResult(
            method=method,
            seed=seed,
            test=test,
            higher_is_better=tasks.higher_is_better(),
            time_per_epoch=elapsed / max(len(history), 1),
            peak_memory_mb=0.0,  # measured by the runner around the whole run
            best_epoch=trainer.best_epoch,
            history=history,
            extras=extras,
        )

    def planned_epochs(self, method: str, protocol: Protocol) -> int:
        epochs = int(protocol.settings["trainer"]["epochs"])
        return epochs * (len(self.data(protocol).task_names) if method == STL else 1)

    def run(self, method: str, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        return self.train(protocol, method, seed)

    def run_baseline(self, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        """One network per task (same model, one head, plain loss); merged into one result.

        ``time_per_epoch`` is the sum over the tasks (the cost of training all baselines).
        """
        names = self.data(protocol).task_names
        parts = {n: self.train(protocol, "sum", seed, [n]) for n in names}
        return merge_baselines(seed, parts)


def merge_baselines(seed: int, parts: dict[str, RunResult]) -> RunResult:
    """Merge single-task runs ``{task: result}`` into one ``"stl"`` result."""
    test: dict[str, float] = {}
    hib: dict[str, bool] = {}
    for r in parts.values():
        test.update({k: v for k, v in r.test.items() if k != "loss"})
        hib.update(r.higher_is_better)
    history: list[dict[str, Any]] = []
    for i in range(max(len(r.history) for r in parts.values())):
        row: dict[str, Any] = {"epoch": i + 1, "time": 0.0}
        for r in parts.values():
            if i < len(r.history):
                src = r.history[i]
                row["time"] += float(src.get("time", 0.0))
                row.update(
                    {
                        k: v
                        for k, v in src.items()
                        if k.startswith(("train/", "val/")) and k != "val/loss"
                    }
                )
        history.append(row)
    return RunResult(
        method=STL,
        seed=seed,
        test=test,
        higher_is_better=hib,
        time_per_epoch=sum(r.time_per_epoch for r in parts.values()),
        peak_memory_mb=0.0,
        best_epoch=None,
        history=history,
        extras={
            "best_epoch": {t: r.best_epoch for t, r in parts.items()},
            "time_per_epoch": {t: r.time_per_epoch for t, r in parts.items()},
        },
    )


def _keep_metrics(task: Task, keep: Sequence[str]) -> Task:
    metrics = tuple(m for m in task.metrics if m.name in keep)
    if not metrics:
        raise ValueError(f"task {task.name!r} has none of the metrics {list(keep)}")
    return dataclasses.replace(task, metrics=metrics)


def _trainer_settings(epochs: int) -> dict[str, Any]:
    return {"epochs": epochs, "monitor": "val/loss"}


# ---------------------------------------------------------------------------------- images
class ImageSuite(TrainerSuite):
    """Two-object image classification (left/right), LeNet-style shared encoder, hard sharing.

    Model: conv 9x9 (10) - maxpool - ReLU - conv 5x5 (20) - maxpool - ReLU - linear 50 - ReLU
    (:func:`polytask.recipes.conv_encoder`, the MultiMNIST encoder of Sener & Koltun 2018) and a
    linear head per task; Adam 1e-3, batch 128; accuracy per task.
    """

    dataset = ""
    full: ClassVar[dict[str, Any]] = {"n_train": 10000, "n_val": 1000, "n_test": 2000, "epochs": 20}
    quick: ClassVar[dict[str, Any]] = {"n_train": 1500, "n_val": 500, "n_test": 1000, "epochs": 3}

    def settings(self, quick: bool) -> dict[str, Any]:
        p = self.quick if quick else self.full
        return image_settings(self.dataset, p["n_train"], p["n_val"], p["n_test"], p["epochs"])


def image_settings(
    dataset: str, n_train: int, n_val: int, n_test: int, epochs: int, batch_size: int = 128
) -> dict[str, Any]:
    """Settings of the image protocols (also used by ``polytask demo``)."""
    return {
        "data": {
            "name": dataset,
            "batch_size": batch_size,
            "eval_batch_size": 1000,
            "options": {"n_train": n_train, "n_val": n_val, "n_test": n_test},
        },
        "model": {"architecture": "hps", "encoder": "lenet", "hidden": [50]},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "trainer": _trainer_settings(epochs),
        "metrics": ["acc"],
        "grad_conflict_batches": 4,
    }


@register_suite("multi_mnist")
class MultiMNISTSuite(ImageSuite):
    description = "MultiMNIST (two overlaid MNIST digits, left/right), LeNet hard sharing"
    dataset = "multi_mnist"


@register_suite("multi_fashion")
class MultiFashionSuite(ImageSuite):
    description = "MultiFashion (two overlaid Fashion-MNIST items, left/right), LeNet hard sharing"
    dataset = "multi_fashion"


@register_suite("multi_fashion_mnist")
class MultiFashionMNISTSuite(ImageSuite):
    description = "Multi-(Fashion+MNIST) (MNIST digit left, Fashion item right), LeNet hard sharing"
    dataset = "multi_fashion_mnist"


# ---------------------------------------------------------------------------------- census
class _Tower(nn.Sequential):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class CensusSuite(TrainerSuite):
    """UCI Adult: ``income`` (>50K) and ``marital`` (never married), binary, AUC (MMoE set-up).

    Model: MMoE (Ma et al. 2018) with 4 experts (MLP d-64, ReLU), a softmax gate per task on the
    input and a tower per task (64-16-1); binary cross-entropy; Adam 1e-3, batch 256. When the
    ``mmoe`` architecture is not registered, hard sharing with an MLP encoder d-64 is used and
    the protocol says so.
    """

    architecture = "mmoe"
    full: ClassVar[dict[str, Any]] = {"n_train": None, "n_val": None, "n_test": None, "epochs": 20}
    quick: ClassVar[dict[str, Any]] = {"n_train": 5000, "n_val": 2000, "n_test": 4000, "epochs": 4}

    def arch_options(self) -> dict[str, Any]:
        return {"n_experts": 4}

    def settings(self, quick: bool) -> dict[str, Any]:
        p = self.quick if quick else self.full
        arch, notes = self.architecture, []
        options = {**self.arch_options(), "tower_hidden": 16}
        if arch not in architectures.available():
            notes.append(
                f"architecture {arch!r} is not registered in this installation; hard sharing "
                "(hps) with the same MLP encoder was used instead"
            )
            arch, options = "hps", {"tower_hidden": 16}
        return {
            "data": {
                "name": "census",
                "batch_size": 256,
                "eval_batch_size": 4096,
                "options": {"n_train": p["n_train"], "n_val": p["n_val"], "n_test": p["n_test"]},
            },
            "model": {"architecture": arch, "encoder": "mlp", "hidden": [64], "options": options},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "trainer": _trainer_settings(p["epochs"]),
            "metrics": ["auc"],
            "grad_conflict_batches": 4,
            "notes": notes,
        }

    def make_tasks(
        self,
        cfg: RunConfig,
        mtd: data.MultiTaskData,
        names: Sequence[str] | None,
        keep: Sequence[str] | None,
    ) -> TaskSet:
        tasks = [Task.binary(t.name) for t in mtd.tasks if names is None or t.name in names]
        return TaskSet([_keep_metrics(t, keep) if keep else t for t in tasks])

    def make_model(self, cfg: RunConfig, mtd: data.MultiTaskData, tasks: TaskSet) -> nn.Module:
        m = cfg.model
        assert mtd.input_shape is not None
        d_in = mtd.input_shape[0]
        width = m.hidden[-1]
        opts = dict(m.options)
        tower = int(opts.pop("tower_hidden", 16))
        heads = {t.name: _Tower(width, tower) for t in tasks}

        def expert(d: int = d_in) -> nn.Module:
            return mlp([d, *m.hidden])

        if m.architecture == "hps":
            return architectures.create("hps", encoder=expert(), heads=heads)
        if m.architecture == "mmoe":
            return architectures.create(
                "mmoe", expert_factory=expert, heads=heads, gate_in_features=d_in, **opts
            )
        if m.architecture == "ple":
            levels = int(opts.get("n_levels", 2))
            factories = [expert] + [lambda: expert(width)] * (levels - 1)
            return architectures.create(
                "ple",
                expert_factory=factories,
                heads=heads,
                gate_in_features=d_in,
                expert_out_features=width,
                **opts,
            )
        raise ValueError(f"census suites build hps, mmoe or ple, not {m.architecture!r}")


@register_suite("census")
class CensusMMoESuite(CensusSuite):
    description = "UCI Adult census: income >50K + never married (binary, AUC), MMoE"


@register_suite("census_ple")
class CensusPLESuite(CensusSuite):
    description = "UCI Adult census: income >50K + never married (binary, AUC), PLE"
    architecture = "ple"

    def arch_options(self) -> dict[str, Any]:
        return {"n_shared": 2, "n_specific": 1, "n_levels": 2}


# ---------------------------------------------------------------------------------- rf1
@register_suite("rf1")
class RF1Suite(TrainerSuite):
    """Mulan RF1: 8 river-flow regressions (48 h ahead), MAE in original units.

    Model: MLP 64-128-64 shared (ReLU), a linear head per target; MSE on standardised targets;
    Adam 1e-3, batch 64.
    """

    description = "Mulan RF1 river flow: 8 regression targets (MAE), MLP hard sharing"
    full: ClassVar[dict[str, Any]] = {"n_train": None, "n_val": None, "n_test": None, "epochs": 60}
    quick: ClassVar[dict[str, Any]] = {"n_train": None, "n_val": None, "n_test": 2000, "epochs": 8}

    def settings(self, quick: bool) -> dict[str, Any]:
        p = self.quick if quick else self.full
        return {
            "data": {
                "name": "rf1",
                "batch_size": 64,
                "eval_batch_size": 2048,
                "options": {"n_train": p["n_train"], "n_val": p["n_val"], "n_test": p["n_test"]},
            },
            "model": {"architecture": "hps", "encoder": "mlp", "hidden": [128, 64]},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "trainer": _trainer_settings(p["epochs"]),
            "metrics": ["mae"],
            "grad_conflict_batches": 4,
        }


# ---------------------------------------------------------------------------------- reviews
@register_suite("reviews")
class ReviewsSuite(TrainerSuite):
    """Clothing reviews: rating (5), recommended (2), department (6), accuracy each.

    Input: hashed TF-IDF of title + text (2,000 buckets, fitted on the training split; the numpy
    backend, so results do not depend on scikit-learn). Model: MLP 2000-256-64 shared (ReLU), a
    linear head per task; Adam 1e-3, batch 128.
    """

    description = "Women's clothing reviews: rating/recommended/department from TF-IDF, MLP"
    full: ClassVar[dict[str, Any]] = {"n_train": None, "n_val": None, "n_test": None, "epochs": 10}
    quick: ClassVar[dict[str, Any]] = {"n_train": 4000, "n_val": 1000, "n_test": 2000, "epochs": 3}

    def settings(self, quick: bool) -> dict[str, Any]:
        p = self.quick if quick else self.full
        return {
            "data": {
                "name": "reviews",
                "batch_size": 128,
                "eval_batch_size": 1024,
                "options": {
                    "n_train": p["n_train"],
                    "n_val": p["n_val"],
                    "n_test": p["n_test"],
                    "backend": "hashing",
                    "max_features": 2000,
                },
            },
            "model": {"architecture": "hps", "encoder": "mlp", "hidden": [256, 64]},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "trainer": _trainer_settings(p["epochs"]),
            "metrics": ["acc"],
            "grad_conflict_batches": 4,
        }


@register_suite("reviews_minilm")
class ReviewsMiniLMSuite(TrainerSuite):
    """Clothing reviews on a subset, from pretrained MiniLM sentence embeddings (384-d).

    The same tasks and split as ``reviews`` (the subset is the first ``n_*`` reviews of each
    split), input: the cached all-MiniLM-L6-v2 embedding of title + text
    (:func:`polytask.data.text.minilm_embeddings`; optional extra ``polytask[text]``; about 11
    reviews/s to encode on 2 CPU cores, once). Model: MLP 384-256-64 shared (ReLU), a linear
    head per task; Adam 1e-3, batch 128. The quick protocol uses the first reviews of the full
    subset, so its embeddings come from the same cache.
    """

    description = (
        "Women's clothing reviews (3,500-review subset): rating/recommended/department "
        "from MiniLM sentence embeddings, MLP (needs polytask[text])"
    )
    full: ClassVar[dict[str, Any]] = {"n_train": 2000, "n_val": 500, "n_test": 1000, "epochs": 30}
    quick: ClassVar[dict[str, Any]] = {"n_train": 1000, "n_val": 250, "n_test": 500, "epochs": 8}

    def settings(self, quick: bool) -> dict[str, Any]:
        p = self.quick if quick else self.full
        return {
            "data": {
                "name": "reviews",
                "batch_size": 128,
                "eval_batch_size": 1024,
                "options": {
                    "n_train": p["n_train"],
                    "n_val": p["n_val"],
                    "n_test": p["n_test"],
                    "features": "minilm",
                },
            },
            "model": {"architecture": "hps", "encoder": "mlp", "hidden": [256, 64]},
            "optimizer": {"name": "adam", "lr": 1e-3},
            "trainer": _trainer_settings(p["epochs"]),
            "metrics": ["acc"],
            "grad_conflict_batches": 4,
        }
