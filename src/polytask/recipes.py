"""Build data, tasks, model, balancer and trainer from a :class:`~polytask.config.RunConfig`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import architectures, balancers, data
from .config import ConfigError, ModelSection, RunConfig
from .tasks import Task, TaskSet
from .trainer import Trainer, TrainerConfig

__all__ = [
    "BUILDERS",
    "ModelContext",
    "Run",
    "build_model",
    "build_run",
    "build_tasks",
    "conv_encoder",
    "mlp",
]


def mlp(sizes: Sequence[int], dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    """A ReLU multi-layer perceptron ``sizes[0] -> ... -> sizes[-1]``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
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


def build_tasks(
    mtd: data.MultiTaskData, names: Sequence[str] | None = None, binary: str = "softmax"
) -> TaskSet:
    """polytask tasks from a dataset's task specs (regression metrics in original units).

    ``binary``: two-class tasks as ``"softmax"`` (two logits, cross-entropy, accuracy),
    ``"logit"`` (one logit, binary cross-entropy, AUC and accuracy) or ``"probability"`` (one
    output that is already a probability, as ESMM's; binary cross-entropy of it, AUC and
    accuracy).
    """
    if binary not in ("softmax", "logit", "probability"):
        raise ValueError(f"binary must be 'softmax', 'logit' or 'probability', got {binary!r}")
    tasks = []
    for spec in mtd.tasks:
        if names is not None and spec.name not in names:
            continue
        if spec.kind == "classification":
            assert spec.n_classes is not None
            if spec.n_classes == 2 and binary != "softmax":
                tasks.append(
                    Task.binary(
                        spec.name, probability=binary == "probability", target=spec.target_key
                    )
                )
            else:
                tasks.append(Task.classification(spec.name, spec.n_classes, target=spec.target_key))
        else:
            scale = mtd.target_stats.get(spec.name, (0.0, 1.0))[1]
            tasks.append(Task.regression(spec.name, target=spec.target_key, target_scale=scale))
    return TaskSet(tasks)


# ------------------------------------------------------------------------------- models
@dataclass
class ModelContext:
    """What an architecture builder needs: the config's model section, the input shape, the
    tasks (their output widths) and, for categorical inputs, each field's number of categories
    (``MultiTaskData.cardinalities``)."""

    section: ModelSection
    input_shape: tuple[int, ...]
    tasks: TaskSet
    cardinalities: tuple[int, ...] | None = None

    def _real_valued(self, what: str) -> None:
        if self.cardinalities is not None:
            raise ConfigError(
                f"model.architecture: the {self.section.architecture!r} recipe reads the raw input "
                f"as real values ({what}), but this dataset's inputs are category codes; recipes "
                "that embed them: those whose encoder network reads the input alone (hps, "
                "moe_router, esmm)"
            )

    @property
    def kind(self) -> str:
        """The encoder network: ``mlp`` or ``lenet`` (``auto``: lenet for ``[C, H, W]``)."""
        kind = self.section.encoder
        if kind == "auto":
            kind = "lenet" if len(self.input_shape) == 3 else "mlp"
        if kind == "lenet" and len(self.input_shape) != 3:
            raise ConfigError(
                f"model.encoder: lenet needs [C, H, W] inputs, data has {list(self.input_shape)}"
            )
        return kind

    @property
    def d_in(self) -> int:
        """Per-sample number of input elements (what flattened-input gates read)."""
        self._real_valued("gates on the flattened input")
        return math.prod(self.input_shape)

    @property
    def width(self) -> int:
        """Width of the encoder's (or an expert's) output: ``hidden[-1]``."""
        return int(self.section.hidden[-1])

    def network(self) -> nn.Module:
        """One encoder network on the raw input: an MLP ``d_in -> hidden`` (flattening images)
        or the LeNet of :func:`conv_encoder` with ``hidden[-1]`` features; for categorical inputs,
        an ``embedding_dim``-wide embedding per field
        (:class:`~polytask.architectures.FieldEmbedding`), concatenated, then the MLP."""
        m = self.section
        if self.cardinalities is not None:
            if m.encoder == "lenet":
                raise ConfigError("model.encoder: lenet needs images; the inputs are categorical")
            emb = architectures.FieldEmbedding(self.cardinalities, m.embedding_dim)
            return nn.Sequential(emb, mlp([emb.out_features, *m.hidden], m.dropout))
        if self.kind == "lenet":
            return conv_encoder(self.input_shape, self.width)
        net = mlp([self.d_in, *m.hidden], m.dropout)
        return nn.Sequential(nn.Flatten(), net) if len(self.input_shape) > 1 else net

    def staged(self) -> architectures.Stages:
        """The encoder network as a staged encoder: one stage per MLP layer, or LeNet's three
        stages (:class:`~polytask.architectures.LeNetStages` with the kernels of
        :func:`conv_encoder`)."""
        self._real_valued("its first stage")
        m = self.section
        if self.kind == "lenet":
            c, h, w = self.input_shape
            if h != w:
                raise ConfigError(f"model.encoder: lenet stages need square images, got {h}x{w}")
            return architectures.LeNetStages(
                in_channels=c, features=self.width, image_size=h, kernel_sizes=(9, 5)
            )
        enc = architectures.StagedMLP([self.d_in, *m.hidden], dropout=m.dropout)
        if len(self.input_shape) > 1:  # images through an MLP: flatten in the first stage
            enc.stages[0] = nn.Sequential(nn.Flatten(), enc.stages[0])
        return enc

    def heads(self, width: int | None = None) -> dict[str, nn.Module]:
        """One tower per task: ``tower`` hidden ReLU layers, then a linear output."""
        width = self.width if width is None else width
        heads: dict[str, nn.Module] = {}
        for t in self.tasks:
            if t.kind == "binary":
                out = 1
            elif t.kind == "classification":
                out = int(t.n_classes or 2)
            else:
                out = 1
            tower = self.section.tower
            if tower:
                heads[t.name] = nn.Sequential(
                    mlp([width, *tower], self.section.dropout), nn.Linear(tower[-1], out)
                )
            else:
                heads[t.name] = nn.Linear(width, out)
        return heads


def _hps(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
    encoder = ctx.network()
    return architectures.create("hps", encoder=encoder, heads=ctx.heads(), **options)


def _mixture(name: str) -> Builder:
    def build(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
        options.setdefault("n_experts", 8)
        return architectures.create(
            name,
            expert_factory=ctx.network,
            heads=ctx.heads(),
            gate_in_features=ctx.d_in,
            **options,
        )

    return build


def _cgc(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
    return architectures.create(
        "cgc",
        expert_factory=ctx.network,
        heads=ctx.heads(),
        gate_in_features=ctx.d_in,
        **options,
    )


def _ple(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
    levels = int(options.pop("n_levels", 2))
    w, m = ctx.width, ctx.section

    def upper() -> nn.Module:  # experts of levels > 0 read the width-w outputs below
        return mlp([w, *m.hidden], m.dropout) if ctx.kind == "mlp" else mlp([w, w], m.dropout)

    factories = [ctx.network] + [upper] * (levels - 1)
    return architectures.create(
        "ple",
        expert_factory=factories,
        heads=ctx.heads(),
        gate_in_features=ctx.d_in,
        expert_out_features=w,
        n_levels=levels,
        **options,
    )


def _moe_router(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
    encoder = ctx.network()
    w = ctx.width
    options.setdefault("n_experts", 8)
    return architectures.create(
        "moe_router",
        expert_factory=lambda: mlp([w, w, w], ctx.section.dropout, last_act=False),
        heads=ctx.heads(),
        d_model=w,
        encoder=encoder,
        **options,
    )


def _staged(name: str) -> Builder:
    def build(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
        encoder = ctx.staged()
        return architectures.create(name, encoder=encoder, heads=ctx.heads(), **options)

    return build


def _esmm(ctx: ModelContext, options: dict[str, Any]) -> nn.Module:
    """The encoder network is the shared bottom (for categorical inputs: the shared field
    embeddings, then the MLP); the CTR and CVR towers are the tasks' towers. ``task_names`` (in
    ``model.options``): ``[click task, click-and-conversion task]``, default the dataset's order."""
    names = options.pop("task_names", None)
    names = list(ctx.tasks.names) if names is None else names
    if (
        len(ctx.tasks) != 2
        or not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or sorted(names) != sorted(ctx.tasks.names)
    ):
        raise ConfigError(
            "model.options.task_names: esmm models two tasks, [click task, click-and-conversion "
            f"task] (default: the dataset's order); got {names!r} for the tasks {ctx.tasks.names}"
        )
    heads = ctx.heads()
    return architectures.create(
        "esmm",
        encoder=ctx.network(),
        ctr_tower=heads[names[0]],
        cvr_tower=heads[names[1]],
        task_names=names,
        **options,
    )


Builder = Callable[[ModelContext, dict[str, Any]], nn.Module]

#: How a config builds each registered architecture around its encoder network.
BUILDERS: dict[str, Builder] = {
    "hps": _hps,
    "mmoe": _mixture("mmoe"),
    "dselect_k": _mixture("dselect_k"),
    "cgc": _cgc,
    "ple": _ple,
    "moe_router": _moe_router,
    "mtan": _staged("mtan"),
    "cross_stitch": _staged("cross_stitch"),
    "nddr": _staged("nddr"),
    "ltb": _staged("ltb"),
    "task_groups": _staged("task_groups"),
    "esmm": _esmm,
}


def build_model(cfg: RunConfig, mtd: data.MultiTaskData, tasks: TaskSet) -> nn.Module:
    """The configured architecture around the configured encoder network (see
    :class:`ModelContext` and ``BUILDERS``); ``model.options`` are the architecture's keyword
    arguments."""
    m = cfg.model
    shape = mtd.input_shape
    if shape is None:
        raise ConfigError(
            f"dataset {cfg.data.name!r} has variable-size inputs; it needs a dedicated model "
            "(see polytask.bench)"
        )
    builder = BUILDERS.get(m.architecture)
    if builder is None:
        raise ConfigError(
            f"model.architecture: {m.architecture!r} has no config recipe; build it in Python "
            f"(recipes exist for {sorted(BUILDERS)})"
        )
    _check_outputs(m.architecture, tasks)
    ctx = ModelContext(m, tuple(shape), tasks, mtd.cardinalities)
    try:
        return builder(ctx, dict(m.options))
    except TypeError as err:  # an unknown or missing keyword argument of the architecture
        raise ConfigError(f"model.options for {m.architecture!r}: {err}") from err
    except (ValueError, KeyError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model ({m.architecture!r}): {err}") from err


def _check_outputs(name: str, tasks: TaskSet) -> None:
    """The tasks' losses must read what the architecture predicts (its record's ``outputs``)."""
    prob = [t.name for t in tasks if t.kind == "binary" and t.output == "probability"]
    if architectures.info(name).outputs == "probabilities":
        other = [t.name for t in tasks if t.name not in prob]
        if other:
            raise ConfigError(
                f"model.architecture: {name!r} predicts probabilities (its record's outputs), so "
                f"its tasks must be two-class tasks with tasks.binary: probability; not so: {other}"
            )
    elif prob:
        with_probs = [
            n for n in architectures.available() if architectures.info(n).outputs == "probabilities"
        ]
        raise ConfigError(
            f"tasks.binary: probability is for architectures that predict probabilities "
            f"({with_probs}); {name!r} predicts logits: use tasks.binary: logit"
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
    tasks = build_tasks(mtd, task_names, binary=cfg.tasks.binary)
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
