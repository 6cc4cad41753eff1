"""Run configuration: typed sections, validated (unknown keys are errors), YAML in and out.

A config file has the sections ``data``, ``model``, ``tasks``, ``balancer``, ``optimizer``,
``scheduler`` and ``trainer``; see ``configs/`` for examples and :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

__all__ = [
    "BalancerSection",
    "ConfigError",
    "DataSection",
    "ModelSection",
    "OptimizerSection",
    "RunConfig",
    "SchedulerSection",
    "TasksSection",
    "TrainerSection",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """An invalid configuration (the message names the key)."""


@dataclass
class DataSection:
    name: str = "multi_mnist"
    batch_size: int = 256
    eval_batch_size: int = 1024
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the loader


@dataclass
class ModelSection:
    """The network: ``architecture`` (a name of :func:`polytask.architectures.available`) around
    an ``encoder`` network. What the encoder network is depends on the architecture: the shared
    encoder (``hps``, ``moe_router``), each expert (``mmoe``, ``dselect_k``, ``cgc``, ``ple``)
    or the staged encoder (``mtan``, ``cross_stitch``, ``nddr``, ``ltb``, ``task_groups``), and
    for ``esmm`` the shared bottom under its CTR and CVR towers; see docs/architectures.md. On
    datasets with categorical inputs (integer codes, ``MultiTaskData.cardinalities``) the encoder
    network starts with an ``embedding_dim``-wide embedding per field."""

    architecture: str = "hps"
    encoder: str = "auto"  # "auto" (by input shape), "mlp", "lenet"
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # encoder / expert widths
    dropout: float = 0.0
    tower: list[int] = field(default_factory=list)  # hidden widths of each task's tower
    embedding_dim: int = 8  # per-field embedding width (datasets with categorical inputs)
    options: dict[str, Any] = field(default_factory=dict)  # architecture keyword arguments


@dataclass
class TasksSection:
    """How the dataset's tasks become losses and metrics."""

    # two-class tasks: "softmax" (two logits, cross-entropy, accuracy) or "logit" (one logit,
    # binary cross-entropy, AUC and accuracy, as in the MMoE/PLE papers) or "probability" (one
    # output that is already a probability, binary cross-entropy of it, AUC and accuracy: for
    # architectures whose record says outputs="probabilities", i.e. esmm)
    binary: str = "softmax"


@dataclass
class BalancerSection:
    name: str = "mean"
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerSection:
    name: str = "adam"  # adam, adamw, sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only


@dataclass
class SchedulerSection:
    name: str = "none"  # none, step, cosine
    step_size: int = 10
    gamma: float = 0.5


@dataclass
class TrainerSection:
    epochs: int = 10
    mode: str | None = None
    grad_clip: float | None = None
    amp: str | None = None
    device: str = "auto"
    monitor: str = "val/loss"
    patience: int | None = None
    seed: int = 0
    out_dir: str = "runs/polytask"
    progress: bool = True
    resume: bool = False


@dataclass
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    balancer: BalancerSection = field(default_factory=BalancerSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: must not be null")
    if hint is bool or text == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float or text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str or text.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if text.startswith("list"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if text.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        sub = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, raw[f.name], sub)
        else:
            kwargs[f.name] = _check_type(raw[f.name], hint, sub)
    return cls(**kwargs)


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig` (names are checked against registries)."""
    cfg: RunConfig = _build(RunConfig, raw, "")
    from . import architectures, balancers

    if cfg.balancer.name not in balancers.available():
        raise ConfigError(
            f"balancer.name: unknown balancer {cfg.balancer.name!r}; "
            f"available: {balancers.available()}"
        )
    hp = balancers.info(cfg.balancer.name).hparams
    bad = sorted(set(cfg.balancer.hparams) - set(hp))
    if bad:
        raise ConfigError(
            f"balancer.hparams: {cfg.balancer.name!r} has no hyperparameter(s) {bad}; "
            f"it accepts {sorted(hp)}"
        )
    if cfg.model.architecture not in architectures.available():
        raise ConfigError(
            f"model.architecture: unknown architecture {cfg.model.architecture!r}; "
            f"available: {architectures.available()}"
        )
    if cfg.tasks.binary not in ("softmax", "logit", "probability"):
        raise ConfigError(
            f"tasks.binary: expected softmax, logit or probability, got {cfg.tasks.binary!r}"
        )
    if cfg.model.encoder not in ("auto", "mlp", "lenet"):
        raise ConfigError(f"model.encoder: expected auto, mlp or lenet, got {cfg.model.encoder!r}")
    for key in ("hidden", "tower"):
        widths = getattr(cfg.model, key)
        if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ConfigError(f"model.{key}: expected a list of positive integers, got {widths}")
    if not cfg.model.hidden:
        raise ConfigError("model.hidden: needs at least one width")
    if cfg.model.embedding_dim < 1:
        raise ConfigError(f"model.embedding_dim: must be >= 1, got {cfg.model.embedding_dim}")
    if cfg.optimizer.name not in ("adam", "adamw", "sgd"):
        raise ConfigError(
            f"optimizer.name: expected adam, adamw or sgd, got {cfg.optimizer.name!r}"
        )
    if cfg.scheduler.name not in ("none", "step", "cosine"):
        raise ConfigError(
            f"scheduler.name: expected none, step or cosine, got {cfg.scheduler.name!r}"
        )
    if cfg.trainer.mode not in (None, "params", "representation"):
        raise ConfigError(
            f"trainer.mode: expected params or representation, got {cfg.trainer.mode!r}"
        )
    if cfg.trainer.epochs < 1:
        raise ConfigError(f"trainer.epochs: must be >= 1, got {cfg.trainer.epochs}")
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return parse_config(raw)
