"""Build data, tasks, model, balancer and trainer from a :class:`~polytask.config.RunConfig`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import architectures, balancers, data
from .config import ConfigError, RunConfig
from .tasks import Task, TaskSet
from .trainer import Trainer, TrainerConfig

__all__ = ["Run", "build_model", "build_run", "build_tasks", "conv_encoder", "mlp"]


def mlp(sizes: Sequence[int], dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    """A ReLU multi-layer perceptron ``sizes[0] -> ... -> sizes[-1]``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def conv_encoder(in_shape: Sequence[int], out_dim: int = 50) -> nn.Sequential:
    """LeNet-style encoder for small images (the MultiMNIST encoder of Sener & Koltun 2018)."""
    c, h, w = in_shape
    conv = nn.Sequential(
        nn.Conv2d(c, 10, kernel_size=9, stride=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        n = conv(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(conv, nn.Linear(n, out_dim), nn.ReLU())


def build_tasks(mtd: data.MultiTaskData, names: Sequence[str] | None = None) -> TaskSet:
    """polytask tasks from a dataset's task specs (regression metrics in original units)."""
    tasks = []
    for spec in mtd.tasks:
        if names is not None and spec.name not in names:
            continue
        if spec.kind == "classification":
            assert spec.n_classes is not None
            tasks.append(Task.classification(spec.name, spec.n_classes, target=spec.target_key))
        else:
            scale = mtd.target_stats.get(spec.name, (0.0, 1.0))[1]
            tasks.append(Task.regression(spec.name, target=spec.target_key, target_scale=scale))
    return TaskSet(tasks)


def build_model(cfg: RunConfig, mtd: data.MultiTaskData, tasks: TaskSet) -> nn.Module:
    """Encoder chosen by input shape (or ``model.encoder``) and the configured architecture."""
    m = cfg.model
    shape = mtd.input_shape
    if shape is None:
        raise ConfigError(
            f"dataset {cfg.data.name!r} has variable-size inputs; it needs a dedicated model "
            "(see polytask.bench)"
        )
    kind = m.encoder
    if kind == "auto":
        kind = "lenet" if len(shape) == 3 else "mlp"
    if kind == "lenet":
        if len(shape) != 3:
            raise ConfigError(f"model.encoder: lenet needs [C, H, W] inputs, data has {shape}")
        hidden = m.hidden[-1] if m.hidden else 50
        encoder: nn.Module = conv_encoder(shape, hidden)
        rep = hidden
    elif kind == "mlp":
        d_in = math.prod(shape)
        sizes = [d_in, *m.hidden]
        encoder = nn.Sequential(nn.Flatten(), mlp(sizes, m.dropout)) if len(shape) > 1 else mlp(
            sizes, m.dropout
        )
        rep = sizes[-1]
    else:
        raise ConfigError(f"model.encoder: expected auto, mlp or lenet, got {m.encoder!r}")
    heads = {}
    for t in tasks:
        out = t.n_classes if t.kind == "classification" else 1
        heads[t.name] = nn.Linear(rep, int(out or 1))
    if m.architecture == "hps":
        return architectures.create("hps", encoder=encoder, heads=heads, **m.options)
    return architectures.create(
        m.architecture, encoder=encoder, heads=heads, rep_dim=rep, **m.options
    )


@dataclass
class Run:
    """Everything a training run needs, built from a config."""

    config: RunConfig
    data: data.MultiTaskData
    tasks: TaskSet
    trainer: Trainer
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    test_loader: DataLoader[Any]


def _optimizer(cfg: RunConfig) -> Any:
    o = cfg.optimizer
    if o.name == "adam":
        return lambda p: torch.optim.Adam(p, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return lambda p: torch.optim.AdamW(p, lr=o.lr, weight_decay=o.weight_decay)
    return lambda p: torch.optim.SGD(p, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _scheduler(cfg: RunConfig) -> Any:
    s = cfg.scheduler
    if s.name == "step":
        return lambda opt: torch.optim.lr_scheduler.StepLR(opt, s.step_size, s.gamma)
    if s.name == "cosine":
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.trainer.epochs)
    return None


def build_run(
    cfg: RunConfig,
    *,
    mtd: data.MultiTaskData | None = None,
    task_names: Sequence[str] | None = None,
    out_dir: str | None = None,
) -> Run:
    """Build a :class:`Run`; ``task_names`` restricts to a subset (single-task baselines)."""
    torch.manual_seed(cfg.trainer.seed)
    if mtd is None:
        mtd = data.load(cfg.data.name, **cfg.data.options)
    tasks = build_tasks(mtd, task_names)
    model = build_model(cfg, mtd, tasks)
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
        out_dir=out_dir if out_dir is not None else t.out_dir,
        progress=t.progress,
        seed=t.seed,
    )
    # the loader shuffles with the global RNG, which checkpoints save and resume restores
    trainer = Trainer(
        model, tasks, balancer, _optimizer(cfg), _scheduler(cfg), tcfg, run_config=cfg.to_dict()
    )
    d = cfg.data
    kw: dict[str, Any] = {"num_workers": d.num_workers, "collate_fn": mtd.collate_fn}
    return Run(
        cfg,
        mtd,
        tasks,
        trainer,
        DataLoader(mtd.train, batch_size=d.batch_size, shuffle=True, **kw),
        DataLoader(mtd.val, batch_size=d.eval_batch_size, **kw),
        DataLoader(mtd.test, batch_size=d.eval_batch_size, **kw),
    )
