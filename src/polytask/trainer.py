"""A multi-task trainer: fit/evaluate, checkpoint and exact resume, logs, early stopping.

The trainer is a thin loop around :func:`polytask.mtl_backward`; everything method-specific comes
from the capability records (the balancer's ``info.protocol``, ``info.n_batches``,
``info.mode``; a strategy's ``info.protocol``), never from a method's name:

* ``"loss_after_step"`` (FAMO): after the optimiser step the batch's losses are re-evaluated and
  passed to ``balancer.after_step``;
* ``"extra_batch"`` (MoDo, SDMGrad): each step forwards ``info.n_batches`` batches (the step's
  batch and ``n_batches - 1`` extra ones) and balances their stacked losses through
  :func:`polytask.balancers.stack_batches`;
* a strategy's ``"meta_batch"`` (Auto-Lambda): each step draws one more batch and runs
  ``strategy.before_step`` before the update, whose balancer is ``strategy.wrap(balancer)``.

Extra and meta batches come from a second pass over the training loader (each epoch starts a
fresh one, re-started when it runs out), or from ``fit(..., aux_loader=...)``; the references of
those methods draw them the same way. Starting them afresh each epoch keeps resuming from an
epoch checkpoint exact.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ._fast import LinearCapture, capture_linear_layers
from .balancers import Balancer, stack_batches
from .engine import mtl_backward
from .tasks import TaskSet

if TYPE_CHECKING:
    from .strategies import Strategy

__all__ = ["Trainer", "TrainerConfig", "pick_device", "move_to"]

CHECKPOINT_FORMAT = 1


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else MPS if available, else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def move_to(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts/lists/tuples to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


@dataclass
class TrainerConfig:
    """Training-loop settings (the CLI's ``trainer:`` section maps onto this)."""

    epochs: int = 10
    mode: str | None = None  # engine mode; None: the balancer's own (info.mode) or "params"
    grad_clip: float | None = None
    amp: str | None = None  # None, "bf16" or "fp16" (CUDA only)
    device: str = "auto"
    input_key: str | list[str] = "x"
    monitor: str = "val/loss"  # "val/loss" or "val/<task>/<metric>"
    patience: int | None = None  # early stopping (epochs without improvement)
    out_dir: str | None = None  # logs and checkpoints
    progress: bool = True
    seed: int | None = 0
    log_every_step: bool = False
    engine: str = "auto"  # "auto": activation-based exact path for shared nn.Linear layers;
    # "jacobian": batched vector-Jacobian products for every shared parameter
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_shared_layer_columns(model: nn.Module, shared: list[Tensor]) -> int:
    """Entries of the last shared layer: the trailing shared parameters (in ``shared`` order,
    the order of the shared Jacobian's columns) that belong to the same module as the last one."""
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name)
    if not shared:
        raise ValueError("the model has no shared parameter")
    last = owner.get(id(shared[-1]))
    n = 0
    for p in reversed(shared):
        if owner.get(id(p)) != last:
            break
        n += p.numel()
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file then rename: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Fit a multi-task model with a balancer.

    Args:
        model: a :class:`~polytask.architectures.MultiTaskModel` (or any module returning
            ``{task: prediction}`` with ``shared_parameters()``).
        tasks: the :class:`~polytask.tasks.TaskSet`.
        balancer: a :class:`~polytask.balancers.Balancer` for ``len(tasks)`` tasks.
        optimizer: a factory ``params -> Optimizer`` (the balancer's learnable parameters are
            added as their own parameter group) or an optimizer already built.
        scheduler: optional factory ``optimizer -> LR scheduler`` (stepped once per epoch).
        config: :class:`TrainerConfig`.
        run_config: the resolved configuration saved with every checkpoint.
        strategy: an optional training strategy (:mod:`polytask.strategies`, e.g. Auto-Lambda);
            the update then uses ``strategy.wrap(balancer)`` and ``strategy.before_step`` runs
            before it each step. Its state is checkpointed.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSet,
        balancer: Balancer,
        optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] | torch.optim.Optimizer,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        config: TrainerConfig | None = None,
        run_config: Mapping[str, Any] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.config = cfg = config or TrainerConfig()
        if balancer.n_tasks != len(tasks):
            raise ValueError(
                f"balancer was created for {balancer.n_tasks} tasks but there are {len(tasks)} "
                f"({tasks.names})"
            )
        if not hasattr(model, "shared_parameters"):
            raise TypeError(
                f"{type(model).__name__} must define shared_parameters() (see MultiTaskModel)"
            )
        if cfg.seed is not None:
            seed_everything(cfg.seed)
        self.device = pick_device(cfg.device)
        self.model = model.to(self.device)
        self.tasks = tasks
        self.balancer = balancer.to(self.device)
        self.strategy = strategy.to(self.device) if strategy is not None else None
        if strategy is not None and strategy.n_tasks != len(tasks):
            raise ValueError(
                f"strategy was created for {strategy.n_tasks} tasks but there are {len(tasks)}"
            )
        # The balancer the update uses (a strategy may wrap it) and, for methods that consume
        # several batches per step, its form over the stacked losses of those batches.
        self.step_balancer = strategy.wrap(self.balancer) if strategy is not None else self.balancer
        step_rec = self.step_balancer.info
        self.n_batches = step_rec.n_batches
        self._engine_balancer = (
            stack_batches(self.step_balancer) if self.n_batches > 1 else self.step_balancer
        )
        self.needs_meta_batch = strategy is not None and "meta_batch" in strategy.info.protocol
        if "last_shared_layer" in step_rec.protocol and (cfg.mode or step_rec.mode) in (
            None,
            "params",
        ):
            self.step_balancer.set_last_shared_layer(
                last_shared_layer_columns(model, list(model.shared_parameters()))
            )
        self.mode = cfg.mode or step_rec.mode or "params"
        if self.n_batches > 1 and self.mode != "params":
            raise ValueError(
                f"balancer {step_rec.name!r} combines {self.n_batches} batches per step and works "
                f"in mode='params' only, not {self.mode!r}"
            )
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
            own = list(balancer.parameters())
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if own and not all(id(p) in known for p in own):
                optimizer.add_param_group({"params": own})
        else:
            groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
            if list(balancer.parameters()):
                groups.append({"params": list(balancer.parameters())})
            self.optimizer = optimizer(groups)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        if cfg.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {cfg.amp!r}")
        if cfg.amp and self.device.type != "cuda":
            raise ValueError(
                f"mixed precision (amp={cfg.amp!r}) needs CUDA; device is {self.device}"
            )
        if cfg.amp == "fp16" and step_rec.needs != "losses":
            raise ValueError(
                "amp='fp16' needs loss scaling, which changes what gradient methods see; "
                f"use amp='bf16' with {step_rec.name!r}"
            )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if cfg.engine not in ("auto", "jacobian"):
            raise ValueError(f"engine must be 'auto' or 'jacobian', got {cfg.engine!r}")
        self.capture: LinearCapture | None = None
        if cfg.engine == "auto" and step_rec.needs != "losses":
            # params mode: the shared linear layers (exact activation-based path); representation
            # mode with a Gramian method: the heads' linear layers (the Gramian of the
            # representation gradients from the heads' output gradients)
            which = "shared" if self.mode == "params" else "heads"
            if which == "shared" or step_rec.needs == "gramian":
                cap = capture_linear_layers(model, list(model.shared_parameters()), which=which)
                self.capture = cap if cap.modules else None
        self.run_config = dict(run_config or {})
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None

    # ------------------------------------------------------------------ model I/O
    def _inputs(self, batch: Mapping[str, Any]) -> Any:
        key = self.config.input_key
        if isinstance(key, str):
            if key not in batch:
                raise KeyError(f"batch has no input {key!r}; keys are {sorted(batch)}")
            return batch[key]
        return {k: batch[k] for k in key}

    def _forward(self, batch: Mapping[str, Any], need_features: bool) -> tuple[Any, Tensor | None]:
        x = self._inputs(batch)
        model = self.model
        if need_features and hasattr(model, "encode") and hasattr(model, "decode"):
            try:
                features = model.encode(x)
            except NotImplementedError:
                features = None
            if features is not None:
                return model.decode(features), features
        return model(x), None

    def _autocast(self) -> Any:
        if self.config.amp:
            dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return torch.autocast(device_type=self.device.type, enabled=False)

    # ------------------------------------------------------------------ training
    def train_step(
        self,
        batch: Mapping[str, Any],
        extra_batches: Sequence[Mapping[str, Any]] = (),
        meta_batch: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One optimisation step; returns the losses and weights (as tensors).

        Args:
            batch: the step's batch (its losses are the ones returned and logged).
            extra_batches: ``n_batches - 1`` more batches for methods with protocol
                ``"extra_batch"`` (:attr:`n_batches`); none otherwise.
            meta_batch: the batch a strategy with protocol ``"meta_batch"`` needs.
        """
        self.model.train()
        rec = self.step_balancer.info
        n_extra = self.n_batches - 1
        if len(extra_batches) != n_extra:
            raise ValueError(
                f"balancer {rec.name!r} needs {n_extra} extra batch(es) per step "
                f"(n_batches={self.n_batches}, protocol 'extra_batch'); got {len(extra_batches)}"
            )
        if self.needs_meta_batch and meta_batch is None:
            raise ValueError(
                f"strategy {self.strategy.info.name!r} needs a meta batch every step "  # type: ignore[union-attr]
                "(protocol 'meta_batch')"
            )
        batch = move_to(batch, self.device)
        strategy_logs: dict[str, Tensor] = {}
        if self.strategy is not None:  # before the step's forward: it may run the model itself
            strategy_logs = self.strategy.before_step(
                self.model,
                self._strategy_losses,
                batch,
                None if meta_batch is None else move_to(meta_batch, self.device),
                self.optimizer,
            )
        need_features = n_extra == 0 and (self.mode == "representation" or rec.needs != "losses")
        if self.capture is not None:
            self.capture.clear()
        with self._autocast():
            outputs, features = self._forward(batch, need_features)
            tl = self.tasks.compute_losses(outputs, batch)
            aux = self.model.auxiliary_loss() if hasattr(self.model, "auxiliary_loss") else None
            extra_losses = []
            for extra in extra_batches:  # independent batches at the same parameters
                extra = move_to(extra, self.device)
                out_e, _ = self._forward(extra, False)
                extra_losses.append(self.tasks.compute_losses(out_e, extra).losses.float())
        if self.mode == "representation" and features is None and rec.needs != "losses":
            raise ValueError(
                f"mode='representation' needs a model with encode()/decode(); "
                f"{type(self.model).__name__} exposes no common representation"
            )
        losses = tl.losses.float()
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.get_scale() if self.scaler is not None else None
        if extra_losses or len(tl.parts) != len(losses):
            step_losses: Tensor | list[Tensor] = torch.cat([losses, *extra_losses])
            if scale is not None:
                step_losses = step_losses * scale
        else:  # the K scalars (not stacked): each task's head backward then runs on its own
            step_losses = [
                loss.float() if scale is None else loss.float() * scale for loss in tl.parts
            ]
        weights = mtl_backward(
            step_losses,
            shared_params=list(self.model.shared_parameters()),
            balancer=self._engine_balancer,
            features=features,
            mode=self.mode,  # type: ignore[arg-type]
            extra_loss=aux,
            task_names=self.tasks.names * self.n_batches,
            capture=self.capture,
        )
        if n_extra:  # the per-task weights (summed over the batches) for logging
            weights = self.step_balancer.last_weights
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if "loss_after_step" in rec.protocol:
            with torch.no_grad(), self._autocast():
                outputs, _ = self._forward(batch, False)
                new = self.tasks.compute_losses(outputs, batch).losses.float()
            self.step_balancer.after_step(new)
        return {
            "losses": losses.detach(),
            "counts": tl.counts,
            "weights": weights,
            **{k: v.detach() for k, v in strategy_logs.items()},
        }

    def _strategy_losses(self, forward: Callable[..., Any], batch: Mapping[str, Any]) -> Tensor:
        """Task losses ``[K]`` of ``batch`` with ``forward`` standing for the model."""
        with self._autocast():
            return self.tasks.compute_losses(forward(self._inputs(batch)), batch).losses.float()

    def _aux_batches(self, source: Iterable[Any]) -> Iterator[Any]:
        """Endless batches from passes over ``source`` (a new pass when one runs out)."""
        while True:
            empty = True
            for b in source:
                empty = False
                yield b
            if empty:
                raise ValueError("the loader for extra / meta batches yielded no batch")

    def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        aux_loader: Iterable[Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing from a resumed epoch).

        Args:
            train_loader: the training batches (re-iterated every epoch).
            val_loader: validation batches for metrics, model selection and early stopping.
            aux_loader: where the extra batches (balancer protocol ``"extra_batch"``) and meta
                batches (strategy protocol ``"meta_batch"``) come from; default: a second,
                independent pass over ``train_loader`` (a shuffling loader gives another order).
        """
        cfg = self.config
        n_extra = self.n_batches - 1
        need_aux = n_extra > 0 or self.needs_meta_batch
        aux_source = train_loader if aux_loader is None else aux_loader
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if val_loader is not None:
            self._monitor_higher(cfg.monitor)  # validates the monitored key before training
        bar = self._progress(total=cfg.epochs, initial=self.epoch)
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            sums = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
            counts = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
            wsum: Tensor | None = None
            steps = 0
            # a fresh pass each epoch: the epoch's batches depend only on the RNG state at its
            # start, so resuming from an epoch checkpoint continues exactly
            aux = self._aux_batches(aux_source) if need_aux else None
            for batch in train_loader:
                extra = [next(aux) for _ in range(n_extra)] if aux is not None else []
                meta = next(aux) if aux is not None and self.needs_meta_batch else None
                out = self.train_step(batch, extra, meta)
                c = out["counts"].to(torch.float64)
                sums += out["losses"].to(torch.float64) * c
                counts += c
                if out["weights"] is not None:
                    w = out["weights"].detach().to(torch.float64).reshape(-1)
                    wsum = w if wsum is None else wsum + w
                steps += 1
                if cfg.log_every_step and self.out_dir:
                    self._append_jsonl(
                        "steps.jsonl",
                        {
                            "epoch": self.epoch,
                            "step": steps,
                            "losses": out["losses"].tolist(),
                            "weights": None if out["weights"] is None else out["weights"].tolist(),
                        },
                    )
            if steps == 0:
                raise ValueError("the training loader yielded no batch")
            if aux is not None:
                aux.close()
            self.step_balancer.epoch_end()
            if self.scheduler is not None:
                self.scheduler.step()
            train_losses = (sums / counts.clamp_min(1)).tolist()
            row: dict[str, Any] = {
                "epoch": self.epoch + 1,
                "time": time.perf_counter() - t0,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            for n, v in zip(self.tasks.names, train_losses, strict=False):
                row[f"train/{n}/loss"] = v
            if wsum is not None:
                for n, v in zip(self.tasks.names, (wsum / steps).tolist(), strict=False):
                    row[f"weight/{n}"] = v
            if val_loader is not None:
                for k, v in self.evaluate(val_loader).items():
                    row[f"val/{k}"] = v
            self.epoch += 1
            stop = self._select(row)
            self.history.append(row)
            self._log(row)
            if self.out_dir:
                self.save_checkpoint(self.out_dir / "last.pt")
            bar.update(1)
            bar.set_postfix_str(self._short(row))
            if stop:
                break
        bar.close()
        return self.history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Per-task mean losses and metrics: ``{"<task>/loss", "<task>/<metric>", "loss"}``."""
        self.model.eval()
        metrics = self.tasks.make_metrics()
        sums = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        for batch in loader:
            batch = move_to(batch, self.device)
            with self._autocast():
                outputs, _ = self._forward(batch, False)
                tl = self.tasks.compute_losses(outputs, batch)
            c = tl.counts.to(torch.float64)
            sums += tl.losses.detach().to(torch.float64) * c
            counts += c
            self.tasks.update_metrics(metrics, outputs, batch)
        means = (sums / counts.clamp_min(1)).tolist()
        result: dict[str, float] = {}
        for n, v in zip(self.tasks.names, means, strict=False):
            result[f"{n}/loss"] = v
        result["loss"] = float(sum(means))
        for tname, ms in metrics.items():
            for mname, m in ms.items():
                try:
                    result[f"{tname}/{mname}"] = float(m.compute())
                except (ValueError, RuntimeError):  # no sample seen
                    result[f"{tname}/{mname}"] = float("nan")
        return result

    # ------------------------------------------------------------------ selection
    def _select(self, row: Mapping[str, Any]) -> bool:
        """Track the best epoch on the monitored validation value; True to stop early."""
        key = self.config.monitor
        if key not in row:
            return False
        value = float(row[key])
        higher = self._monitor_higher(key)
        score = value if higher else -value
        if self.best_score is None or (not math.isnan(score) and score > self.best_score):
            self.best_score = score
            self.best_epoch = self.epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.bad_epochs = 0
            if self.out_dir:
                atomic_save(self._model_payload(), self.out_dir / "best.pt")
        else:
            self.bad_epochs += 1
        return self.config.patience is not None and self.bad_epochs >= self.config.patience

    def _monitor_higher(self, key: str) -> bool:
        losses = {"val/loss"} | {f"val/{n}/loss" for n in self.tasks.names}
        if key in losses:
            return False
        metric = key.removeprefix("val/")
        hib = self.tasks.higher_is_better()
        if metric not in hib:
            choices = sorted(losses) + [f"val/{m}" for m in hib]
            raise KeyError(f"monitor {key!r} is not a validation metric; choose from {choices}")
        return hib[metric]

    def load_best(self) -> None:
        """Load the weights of the best validation epoch into the model."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # ------------------------------------------------------------------ checkpoints
    def _model_payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "config": self.run_config,
            "code_version": code_version(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "balancer": self.balancer.state_dict(),
            "balancer_name": self.balancer.info.name,
            "strategy": self.strategy.state_dict() if self.strategy is not None else None,
            "rng": _rng_state(),
            "epoch": self.epoch,
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "config": self.run_config,
            "code_version": code_version(),
        }

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        atomic_save(self.state_dict(), path)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore everything saved by :meth:`save_checkpoint`; training resumes exactly."""
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {ckpt.get('format')!r}")
        if ckpt["balancer_name"] != self.balancer.info.name:
            raise ValueError(
                f"{path} was written with balancer {ckpt['balancer_name']!r}, "
                f"not {self.balancer.info.name!r}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.balancer.load_state_dict(ckpt["balancer"])
        if self.strategy is not None:
            if ckpt.get("strategy") is None:
                raise ValueError(f"{path} holds no state for strategy {self.strategy.info.name!r}")
            self.strategy.load_state_dict(ckpt["strategy"])
        self.epoch = ckpt["epoch"]
        self.history = ckpt["history"]
        self.best_score = ckpt["best_score"]
        self.best_epoch = ckpt["best_epoch"]
        self.best_state = ckpt["best_state"]
        self.bad_epochs = ckpt["bad_epochs"]
        rng = ckpt["rng"]
        rng["torch"] = rng["torch"].cpu()
        _set_rng_state(rng)

    # ------------------------------------------------------------------ logging
    def _log(self, row: Mapping[str, Any]) -> None:
        if not self.out_dir:
            return
        self._append_jsonl("log.jsonl", row)
        path = self.out_dir / "log.csv"
        keys = list(row)
        new = not path.exists()
        if not new:
            with path.open() as f:
                header = next(csv.reader(f), [])
            if header != keys:  # columns changed (e.g. resumed with a validation set)
                keys = header + [k for k in keys if k not in header]
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def _append_jsonl(self, name: str, row: Mapping[str, Any]) -> None:
        assert self.out_dir is not None
        with (self.out_dir / name).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _progress(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        enabled = self.config.progress and sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc="epochs", disable=not enabled, leave=False)

    @staticmethod
    def _short(row: Mapping[str, Any]) -> str:
        keys = [k for k in row if k.startswith("val/") and not k.endswith("/loss")][:4]
        return " ".join(f"{k[4:]}={row[k]:.4g}" for k in keys)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """polytask version plus the git commit of the source tree when available."""
    from . import __version__

    commit = ""
    try:
        import subprocess

        root = Path(__file__).resolve().parents[2]
        if (root / ".git").exists():
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__
