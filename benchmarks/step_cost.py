#!/usr/bin/env python
"""Cost of one training step of a gradient-balancing method, against the plain sum-of-losses step.

Workload: a shared MLP 512-1024-1024-512 (ReLU after every layer, ~2.1M parameters), ``K`` linear
regression heads (512 -> 1), batch 256, MSE losses, SGD (lr 1e-3), ``K`` in {2, 10, 40}.

Each configuration (method, K, variant) is timed against the baseline step
(``zero_grad``; forward; ``losses.sum().backward()``; ``opt.step()``) by alternating
baseline and candidate steps (A B A B ...) after a warm-up; the reported number is the median of
the pairwise ratios candidate/baseline, so slow drifts of a shared machine cancel out.

Variants (each on its own copy of the model, so that hooks never slow the baseline down):

* ``polytask``: ``polytask.mtl_backward(..., mode="params", capture=cap)`` with
  ``cap = polytask.capture_linear_layers(encoder, shared)`` (the exact activation-based path);
* ``polytask_nocap``: the same without ``capture`` (one batched VJP through the encoder);
* in representation rows (``method (repr)``), ``mode="representation"``: ``polytask`` captures
  the heads (``which="heads"``: a Gramian weighting gets the Gramian from the heads' output
  gradients and weights), ``polytask_nocap`` forms the ``[K, B*D]`` representation Jacobian;
* ``torchjd``: ``torchjd.autojac.mtl_backward(losses, features=z, shared_params=...)`` then
  ``torchjd.autojac.jac_to_grad(shared, aggregator)`` (torchjd 0.18's documented MTL step); in
  representation rows ``torchjd.autojac.jac(losses, [z])``, the aggregator on the ``[K, B*D]``
  Jacobian and ``z.backward(direction)``;
* ``torchjd_autogram``: ``torchjd.autogram.Engine(encoder, batch_dim=None)``,
  ``G = engine.compute_gramian(losses)`` (``losses`` a ``[K]`` vector), ``w = weighting(G)``,
  ``losses.backward(w)`` (the documented autogram step; the heads then get ``w_i``-weighted
  gradients). ``batch_dim=0`` needs per-instance losses (``[B, K]``, instance-wise MTL): its
  per-sample Jacobians of a 1024x1024 layer alone take ``K*B*1.05M`` floats (2.1 GB at K=2), so it
  is not timed here (the output says so);
* ``libmtl``: LibMTL's weighting mixin combined with its ``HPS`` architecture exactly as its
  ``Trainer._prepare_model`` does (``class MTLmodel(HPS, weighting)``),
  ``zero_grad(set_to_none=False)``,
  ``model.backward(losses, **weight_args)``, ``opt.step()`` (``rep_grad=True`` in repr rows).
  LibMTL is not a dependency: pass ``--libmtl PATH`` (or set ``LIBMTL_PATH``) to a checkout
  (the folder holding the ``LibMTL`` package); without it these columns are skipped.

Peak memory: each variant runs two steps under ``torch.profiler`` with ``profile_memory=True``;
the c10 CPU allocator reports every allocation and free, and the peak of the running sum during the
second step, minus its value when that step starts, is the step's peak *additional* tensor memory
(frees of tensors made by the first step are credited; memory held by numpy/cvxpy solvers is not
seen). Added to it is what the step starts with: the parameters, their gradients and the optimiser
state. That total, the step's peak tensor memory, is reported as a ratio to the same number for
the baseline step.

Also printed per K: the analytic FLOP bounds (the ``K`` vector-Jacobian products through the
encoder w.r.t. activations that an exact per-task method cannot avoid, relative to the sum step;
cross-checked against ``torch.utils.flop_counter`` for the sum step), and the solver time alone
(ms per call of the balancer on a random ``K x K`` Gramian, or ``K x P`` Jacobian for the methods
that need one).

Run (full; takes a while, wants a quiet machine)::

    python benchmarks/step_cost.py --out results.json
    python benchmarks/step_cost.py --ks 2 10 --pairs 3 --methods pcgrad mean   # quick look
    python benchmarks/step_cost.py --tiny --ks 2 --pairs 2                     # smoke test

Optional peer dependencies: ``torchjd>=0.18`` (``pip install "torchjd[full]"`` for UPGrad's
quadprog projector, CAGrad/Nash-MTL's cvxpy, FairGrad's scipy); LibMTL additionally imports
``cvxpy`` and ``qpsolvers`` at import time (stand-ins are inserted when they are missing, and only
the methods that call them fail).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the profiler's allocator warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import polytask

# ------------------------------------------------------------------------------------------------
# workload and method table
# ------------------------------------------------------------------------------------------------
FULL_DIMS = (512, 1024, 1024, 512)
FULL_BATCH = 256
TINY_DIMS = (32, 64, 64, 32)
TINY_BATCH = 16
LR = 1e-3

DEFAULT_METHODS = [
    "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "upgrad", "fairgrad", "aligned_mtl", "mean",
    "uw", "famo",
]
DEFAULT_AMORTIZE = ["upgrad", "mgda", "nash_mtl"]  # rows "method (every N)" with --amortize N
DEFAULT_REPR_METHODS = ["upgrad", "mgda"]

VARIANTS = ["polytask", "polytask_nocap", "torchjd", "torchjd_autogram", "libmtl"]


@dataclass(frozen=True)
class Peer:
    """How a polytask method maps onto torchjd 0.18 and LibMTL (same hyperparameters)."""

    torchjd: str | None  # aggregator class name in torchjd.aggregation
    torchjd_kwargs: Callable[[int], dict[str, Any]] = lambda k: {}
    torchjd_weighting: str | None = None  # Gramian weighting class (autogram); None: not possible
    libmtl: str | None = None  # class name in LibMTL.weighting
    libmtl_kwargs: dict[str, Any] = field(default_factory=dict)
    # polytask hyperparameters to align with the peers: name -> (aliases, value)
    polytask_hparams: dict[str, tuple[tuple[str, ...], Any]] = field(default_factory=dict)
    note: str = ""


PEERS: dict[str, Peer] = {
    "mgda": Peer("MGDA", torchjd_weighting="MGDAWeighting", libmtl="MGDA",
                 libmtl_kwargs={"mgda_gn": "none"}),
    "pcgrad": Peer("PCGrad", torchjd_weighting="PCGradWeighting", libmtl="PCGrad"),
    "cagrad": Peer("CAGrad", lambda k: {"c": 0.5}, "CAGradWeighting", "CAGrad",
                   {"calpha": 0.5, "rescale": 1},
                   polytask_hparams={"c": (("c", "calpha"), 0.5)}),
    "imtl_g": Peer("IMTLG", torchjd_weighting="IMTLGWeighting", libmtl="IMTL",
                   note="LibMTL has only IMTL (IMTL-L + IMTL-G)"),
    "imtl": Peer("IMTLG", torchjd_weighting="IMTLGWeighting", libmtl="IMTL",
                 note="torchjd has only IMTL-G"),
    "nash_mtl": Peer("NashMTL",
                     lambda k: {"n_tasks": k, "max_norm": 1.0, "update_weights_every": 1,
                                "optim_niter": 20},
                     None, "Nash_MTL",
                     {"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0},
                     polytask_hparams={"max_norm": (("max_norm",), 1.0),
                                       "update_weights_every": (("update_weights_every",), 1),
                                       "optim_niter": (("optim_niter",), 20)},
                     note="torchjd's NashMTL weighting reads the Jacobian: no autogram"),
    "upgrad": Peer("UPGrad", torchjd_weighting="UPGradWeighting", libmtl="UPGrad",
                   libmtl_kwargs={"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4}),
    "fairgrad": Peer("FairGrad", lambda k: {"alpha": 1.0}, "FairGradWeighting", "FairGrad",
                     {"FairGrad_alpha": 1.0},
                     polytask_hparams={"alpha": (("alpha", "fairgrad_alpha"), 1.0)}),
    "aligned_mtl": Peer("AlignedMTL", torchjd_weighting="AlignedMTLWeighting",
                        libmtl="Aligned_MTL"),
    "gradvac": Peer("GradVac", torchjd_weighting="GradVacWeighting", libmtl="GradVac",
                    libmtl_kwargs={"GradVac_beta": 0.5, "GradVac_group_type": 0}),
    "uw": Peer(None, libmtl="UW", note="torchjd has no loss weightings"),
    "famo": Peer(None, libmtl="FAMO", libmtl_kwargs={"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3},
                 note="torchjd has no loss weightings"),
    "mean": Peer("Mean", torchjd_weighting="MeanWeighting", libmtl="EW",
                 note="LibMTL EW sums the losses"),
    "sum": Peer("Sum", torchjd_weighting="SumWeighting", libmtl="EW"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
def make_encoder(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


@dataclass
class Workload:
    dims: tuple[int, ...]
    batch: int
    k: int
    seed: int

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed + 1000 * self.k)
        torch.manual_seed(self.seed + self.k)
        self.encoder = make_encoder(self.dims)
        self.heads = nn.ModuleList(nn.Linear(self.dims[-1], 1) for _ in range(self.k))
        self.x = torch.randn(self.batch, self.dims[0], generator=g)
        self.y = torch.randn(self.batch, self.k, generator=g)

    def copy(self) -> tuple[nn.Sequential, nn.ModuleList]:
        return copy.deepcopy(self.encoder), copy.deepcopy(self.heads)

    @property
    def n_shared(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())


def task_losses(
    enc: nn.Module, heads: nn.ModuleList, x: Tensor, y: Tensor
) -> tuple[Tensor, list[Tensor]]:
    z = enc(x)
    return z, [F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(heads)]


# ------------------------------------------------------------------------------------------------
# step variants
# ------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """The variant cannot run for this configuration (reason in the message)."""


class Variant:
    """One way of making a training step; ``compute`` fills ``.grad``, ``step`` also updates."""

    set_to_none = True

    def __init__(self, wl: Workload, extra_params: Sequence[Tensor] = ()) -> None:
        self.wl = wl
        self.enc, self.heads = wl.copy()
        self.shared = list(self.enc.parameters())
        self.extra = list(extra_params)
        self.opt = torch.optim.SGD(
            [*self.enc.parameters(), *self.heads.parameters(), *self.extra], lr=LR
        )

    def set_extra(self, params: Sequence[Tensor]) -> None:
        """Add a balancer's own learnable parameters to the optimiser."""
        params = [p for p in params if p.requires_grad]
        if params:
            self.extra = params
            self.opt.add_param_group({"params": params})

    def compute(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=self.set_to_none)
        self.compute()
        self.opt.step()

    def shared_grad(self) -> Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
            for p in self.shared
        ])

    def close(self) -> None:
        pass


class Baseline(Variant):
    def compute(self) -> None:
        _, losses = task_losses(self.enc, self.heads, self.wl.x, self.wl.y)
        torch.stack(losses).sum().backward()


class PolytaskStep(Variant):
    def __init__(self, wl: Workload, method: str, mode: str, capture: bool, every: int = 1) -> None:
        super().__init__(wl)
        if method not in polytask.balancers.available():
            raise Unavailable(f"{method!r} is not registered in polytask")
        rec = polytask.balancers.info(method)
        if rec.needs != "losses" and mode not in rec.modes:
            raise Unavailable(f"polytask {method!r} does not support mode={mode!r}")
        self.hparams = polytask_hparams(method)
        if every > 1:  # the opt-in approximation: recompute the weights every `every` steps
            self.balancer = polytask.balancers.create(
                "amortized", wl.k, base=method, every=every, base_hparams=self.hparams)
        else:
            self.balancer = polytask.balancers.create(method, wl.k, **self.hparams)
        self.set_extra(list(self.balancer.parameters()))
        self.mode = mode
        # params mode: the shared layers (exact activation-based path); representation mode:
        # the heads (a Gramian weighting gets the Gramian from the heads' output gradients)
        which = "heads" if mode == "representation" else "shared"
        self.cap = (
            polytask.capture_linear_layers(nn.ModuleList([self.enc, self.heads]), self.shared,
                                           which=which)
            if capture else None
        )
        self.after_step = "loss_after_step" in self.balancer.info.protocol

    def step(self) -> None:
        super().step()
        if self.after_step:  # FAMO: the losses at the new parameters (the protocol's extra forward)
            with torch.no_grad():
                _, losses = task_losses(self.enc, self.heads, self.wl.x, self.wl.y)
            self.balancer.after_step(torch.stack(losses))

    def compute(self) -> None:
        if self.cap is not None:
            self.cap.clear()
        z, losses = task_losses(self.enc, self.heads, self.wl.x, self.wl.y)
        polytask.mtl_backward(  # the list of losses: each task's head backward runs on its own
            losses, shared_params=self.shared, balancer=self.balancer, features=z,
            mode=self.mode, capture=self.cap,
        )

    def close(self) -> None:
        if self.cap is not None:
            self.cap.remove()


def polytask_hparams(method: str) -> dict[str, Any]:
    peer = PEERS.get(method)
    if peer is None or method not in polytask.balancers.available():
        return {}
    accepted = polytask.balancers.info(method).hparams
    out: dict[str, Any] = {}
    for aliases, value in peer.polytask_hparams.values():
        for a in aliases:
            if a in accepted:
                out[a] = value
                break
    return out


def _torchjd() -> tuple[Any, Any, Any]:
    try:
        import torchjd.aggregation as agg
        import torchjd.autogram as autogram
        import torchjd.autojac as autojac
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise Unavailable(f"torchjd is not installed ({err})") from None
    return agg, autojac, autogram


def torchjd_aggregator(method: str, k: int) -> Any:
    peer = PEERS.get(method)
    if peer is None or peer.torchjd is None:
        raise Unavailable(f"no torchjd aggregator mapped for {method!r}")
    agg, _, _ = _torchjd()
    try:
        return getattr(agg, peer.torchjd)(**peer.torchjd_kwargs(k))
    except ImportError as err:
        raise Unavailable(f"torchjd {peer.torchjd}: {str(err).splitlines()[0]}") from None


def torchjd_weighting(method: str) -> Any:
    peer = PEERS.get(method)
    if peer is None or peer.torchjd_weighting is None:
        why = peer.note if peer is not None and peer.note else "no Gramian weighting in torchjd"
        raise Unavailable(why)
    agg, _, _ = _torchjd()
    kwargs = peer.torchjd_kwargs(0)
    kwargs.pop("n_tasks", None)
    try:
        return getattr(agg, peer.torchjd_weighting)(**kwargs)
    except ImportError as err:
        raise Unavailable(f"torchjd {peer.torchjd_weighting}: {str(err).splitlines()[0]}") from None


class TorchjdAutojac(Variant):
    def __init__(self, wl: Workload, method: str) -> None:
        super().__init__(wl)
        self.aggregator = torchjd_aggregator(method, wl.k)
        _, self.autojac, _ = _torchjd()

    def compute(self) -> None:
        z, losses = task_losses(self.enc, self.heads, self.wl.x, self.wl.y)
        self.autojac.mtl_backward(losses, features=z, shared_params=self.shared)
        self.autojac.jac_to_grad(self.shared, self.aggregator)


class TorchjdRepr(Variant):
    """Representation-level Jacobian descent with torchjd's public ``autojac.jac``."""

    def __init__(self, wl: Workload, method: str) -> None:
        super().__init__(wl)
        self.aggregator = torchjd_aggregator(method, wl.k)
        _, self.autojac, _ = _torchjd()
        self.head_params = list(self.heads.parameters())

    def compute(self) -> None:
        z, losses = task_losses(self.enc, self.heads, self.wl.x, self.wl.y)
        (jz,) = self.autojac.jac(losses, [z], retain_graph=True)
        torch.autograd.backward(torch.stack(losses).sum(), inputs=self.head_params)
        direction = self.aggregator(jz.reshape(len(losses), -1))
        z.backward(direction.view_as(z))


class TorchjdAutogram(Variant):
    def __init__(self, wl: Workload, method: str) -> None:
        super().__init__(wl)
        self.weighting = torchjd_weighting(method)
        _, _, autogram = _torchjd()
        self.engine = autogram.Engine(self.enc, batch_dim=None)

    def compute(self) -> None:
        _, losses = task_losses(self.enc, self.heads, self.wl.x, self.wl.y)
        vec = torch.stack(losses)
        gramian = self.engine.compute_gramian(vec)
        weights = self.weighting(gramian)
        vec.backward(weights)


# -- LibMTL --------------------------------------------------------------------------------------
_LIBMTL: dict[str, Any] = {}


class _Missing(types.ModuleType):
    """Stand-in for an optional module LibMTL imports at import time; using it raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*_: Any, **__: Any) -> Any:
            raise ImportError(f"{self.__name__} is not installed")

        return missing


def load_libmtl(path: str | None) -> tuple[Any | None, str]:
    """Import LibMTL from ``path`` (the folder containing the ``LibMTL`` package)."""
    if "mod" in _LIBMTL:
        return _LIBMTL["mod"], _LIBMTL["note"]
    if not path:
        _LIBMTL.update(mod=None, note="LibMTL skipped: pass --libmtl PATH or set LIBMTL_PATH")
        return None, _LIBMTL["note"]
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "LibMTL", "LibMTL")):
        path = os.path.join(path, "LibMTL")
    if not os.path.isfile(os.path.join(path, "LibMTL", "weighting", "abstract_weighting.py")):
        _LIBMTL.update(mod=None, note=f"LibMTL skipped: no LibMTL package under {path}")
        return None, _LIBMTL["note"]
    stubs = []
    if "torch_geometric" not in sys.modules:  # only LibMTL's graph data loaders use it
        sys.modules["torch_geometric"] = _Missing("torch_geometric")
    for name in ("cvxpy", "qpsolvers"):
        try:
            importlib.import_module(name)
        except Exception:
            sys.modules[name] = _Missing(name)
            stubs.append(name)
    sys.path.insert(0, path)
    try:
        import LibMTL.architecture
        import LibMTL.weighting
    except Exception as err:
        _LIBMTL.update(
            mod=None, note=f"LibMTL skipped: import failed ({type(err).__name__}: {err})"
        )
        return None, _LIBMTL["note"]
    note = f"LibMTL from {path}"
    if stubs:
        note += f" (stand-ins for missing {', '.join(stubs)})"
    _LIBMTL.update(mod=LibMTL, note=note)
    return LibMTL, note


@contextlib.contextmanager
def _symeig_shim() -> Iterator[None]:
    """LibMTL's Aligned_MTL calls ``torch.symeig``, removed from torch 2.x; torch's own error
    message prescribes ``torch.linalg.eigh`` as the replacement, which this installs meanwhile."""
    old = getattr(torch, "symeig", None)

    def symeig(a: Tensor, eigenvectors: bool = False, upper: bool = True) -> tuple[Tensor, Tensor]:
        return torch.linalg.eigh(a, UPLO="U" if upper else "L")

    torch.symeig = symeig  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if old is None:
            del torch.symeig  # type: ignore[attr-defined]
        else:
            torch.symeig = old  # type: ignore[attr-defined]


class LibMTLStep(Variant):
    set_to_none = False  # LibMTL's Trainer: optimizer.zero_grad(set_to_none=False)

    def __init__(self, wl: Workload, method: str, rep_grad: bool, libmtl_path: str | None) -> None:
        lib, note = load_libmtl(libmtl_path)
        if lib is None:
            raise Unavailable(note)
        peer = PEERS.get(method)
        if peer is None or peer.libmtl is None:
            raise Unavailable(f"no LibMTL weighting mapped for {method!r}")
        wcls = getattr(lib.weighting, peer.libmtl)
        arch = lib.architecture.HPS
        enc, heads = wl.copy()
        names = [f"t{i}" for i in range(wl.k)]

        class MTLmodel(arch, wcls):  # as LibMTL.trainer.Trainer._prepare_model
            def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device,
                         kwargs):
                super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input,
                                 device, **kwargs)
                self.init_param()

        self.model = MTLmodel(
            task_name=names, encoder_class=lambda: enc,
            decoders=nn.ModuleDict(dict(zip(names, heads, strict=False))), rep_grad=rep_grad,
            multi_input=False, device=torch.device("cpu"), kwargs={},
        )
        self.wl = wl
        self.enc, self.heads = enc, heads
        self.shared = list(enc.parameters())
        self.names = names
        self.kwargs = dict(peer.libmtl_kwargs)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.shim = _symeig_shim if peer.libmtl == "Aligned_MTL" else contextlib.nullcontext
        self.method = method

    def compute(self) -> None:
        preds = self.model(self.wl.x)
        losses = torch.stack([
            F.mse_loss(preds[t].squeeze(-1), self.wl.y[:, i]) for i, t in enumerate(self.names)
        ])
        with self.shim():
            self.model.backward(losses, **self.kwargs)

    def step(self) -> None:
        super().step()
        if hasattr(self.model, "update_w"):  # FAMO, as LibMTL's Trainer does after the step
            with torch.no_grad():
                preds = self.model(self.wl.x)
                new = torch.stack([
                    F.mse_loss(preds[t].squeeze(-1), self.wl.y[:, i])
                    for i, t in enumerate(self.names)
                ])
            self.model.update_w(new.detach())


def make_variant(
    kind: str, wl: Workload, method: str, mode: str, args: argparse.Namespace
) -> Variant:
    if mode.startswith("every"):
        if kind != "polytask":
            raise Unavailable("amortised rows time polytask only")
        return PolytaskStep(wl, method, "params", capture=True, every=int(mode.split()[1]))
    repr_mode = mode == "representation"
    if kind == "polytask":
        return PolytaskStep(wl, method, "representation" if repr_mode else "params", capture=True)
    if kind == "polytask_nocap":
        return PolytaskStep(wl, method, "representation" if repr_mode else "params",
                            capture=False)
    if kind == "torchjd":
        return TorchjdRepr(wl, method) if repr_mode else TorchjdAutojac(wl, method)
    if kind == "torchjd_autogram":
        if repr_mode:
            raise Unavailable("autogram differentiates module parameters, not a representation")
        return TorchjdAutogram(wl, method)
    if kind == "libmtl":
        return LibMTLStep(wl, method, rep_grad=repr_mode, libmtl_path=args.libmtl)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence C-level writes to fd 2 (the profiler's start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_MARK = "__step_cost_measured_step__"


def _resident_bytes(variant: Variant) -> int:
    """Tensor memory held between steps: parameters, their gradients and optimiser state."""
    params = [p for g in variant.opt.param_groups for p in g["params"]]
    held = {p.data_ptr(): p.numel() * p.element_size() for p in params}
    for p in params:
        if p.grad is not None:
            held[p.grad.data_ptr()] = p.grad.numel() * p.grad.element_size()
    for state in variant.opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                held[v.data_ptr()] = v.numel() * v.element_size()
    return sum(held.values())


def peak_step_bytes(variant: Variant, period: int = 1) -> int:
    """Peak tensor memory of one step: what is held between steps (parameters, gradients,
    optimiser state) plus the peak of the additional allocations during the step (see the
    module docstring). ``period > 1`` (an amortised method): the peak over ``period``
    consecutive steps, which include one full step."""
    variant.step()
    return _resident_bytes(variant) + _peak_additional_bytes(variant, period)


def _peak_additional_bytes(variant: Variant, period: int = 1) -> int:
    """Peak additional CPU tensor memory of one step, or over ``period`` consecutive steps
    (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with (
        _quiet_stderr_fd(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        variant.step()
        with record_function(_MARK):
            for _ in range(period):
                variant.step()
    events = prof.profiler.kineto_results.events()
    marks = [e for e in events if e.name() == _MARK]
    if not marks:
        raise RuntimeError("profiler marker not found")
    t0, t1 = marks[0].start_ns(), marks[0].end_ns()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur, start, peak = 0, None, 0
    for t, nbytes in mem:
        if t > t1:
            break
        if t >= t0 and start is None:
            start = peak = cur
        cur += nbytes
        if start is not None:
            peak = max(peak, cur)
    return 0 if start is None else int(peak - start)


def timed_pairs(
    base: Variant, cand: Variant, warmup: int, pairs: int, period: int = 1
) -> dict[str, Any]:
    """A B A B ... timing; ``ratio`` is the median over periods of ``period`` consecutive pairs of
    (sum of candidate times) / (sum of baseline times). ``period=1``: the median of the pairwise
    ratios. An amortised method (one full step in ``N``) is timed with ``period=N``, so every
    period holds exactly one of its full steps and the median cannot hide them."""
    if period > 1:
        pairs = max(-(-pairs // period), 6) * period
    for _ in range(warmup):
        base.step()
        cand.step()
    tb: list[float] = []
    tc: list[float] = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(pairs):
            t0 = time.perf_counter()
            base.step()
            t1 = time.perf_counter()
            cand.step()
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            tc.append(t2 - t1)
    finally:
        if was_enabled:
            gc.enable()
    ratios = [
        sum(tc[i : i + period]) / sum(tb[i : i + period]) for i in range(0, len(tb), period)
    ]
    return {
        "ratio": statistics.median(ratios),
        "period": period,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ms": 1e3 * (statistics.median(tc) if period == 1 else statistics.fmean(tc)),
        "baseline_ms": 1e3 * statistics.median(tb),
        "pairs": [[1e3 * b, 1e3 * c] for b, c in zip(tb, tc, strict=False)],
    }


def flop_model(dims: Sequence[int], batch: int, k: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of the sum step and of the parts of an exact step."""
    layers = list(itertools.pairwise(dims))
    b, d = batch, dims[-1]
    mm = [2 * b * i * o for i, o in layers]
    head = 2 * b * d  # one head's forward, weight grad or input grad
    forward = sum(mm) + k * head
    weight_grad = sum(mm) + k * head
    input_grad = sum(mm[1:]) + k * head  # the input x needs no gradient
    sum_step = forward + weight_grad + input_grad
    vjp_per_task = head + sum(mm[1:])  # one task's VJP to every encoder activation
    k_vjp = k * vjp_per_task
    exact_lower = forward + k_vjp + sum(mm) + k * head  # + one combined weight gradient
    gram = 0.0
    for i, o in layers:  # polytask's per-layer cheaper exact Gramian contraction (_fast.py)
        cost_m = b * b * i + k * b * b * o + k * k * b * o
        cost_w = k * b * i * o + k * k * i * o
        gram += 2 * min(cost_m, cost_w)
    return {
        "sum_step_flops": float(sum_step),
        "forward_over_sum_step": forward / sum_step,
        "k_vjp_flops": float(k_vjp),
        "k_vjp_over_sum_step": k_vjp / sum_step,
        "exact_step_lower_bound": exact_lower / sum_step,
        "gramian_contraction_flops": gram,
        "exact_step_with_gramian": (exact_lower + gram) / sum_step,
    }


def counted_sum_step_flops(wl: Workload) -> float | None:
    """The sum step's FLOPs as counted by ``torch.utils.flop_counter`` (matmuls only)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    base = Baseline(wl)
    with FlopCounterMode(display=False) as counter:
        base.compute()
    return float(counter.get_total_flops())


def _median_call_ms(fn: Callable[[], Any], budget_s: float, max_reps: int) -> float:
    fn()  # warm (lazy imports, solver set-up)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def solver_times(method: str, k: int, p: int, seed: int, budget_s: float) -> dict[str, Any]:
    """ms per call of the balancer alone on a random Gramian (or Jacobian)."""
    g = torch.Generator().manual_seed(seed + 17 * k)
    a = torch.randn(k, k, generator=g)  # rank-K with conflicting rows
    gramian = a @ a.T
    losses = torch.rand(k, generator=g) + 0.5
    jac_cache: dict[str, Tensor] = {}

    def jacobian() -> Tensor:  # J with J J^T ~= a a^T, P columns
        if "j" not in jac_cache:
            q = torch.randn(k, p, generator=g) / math.sqrt(p)
            jac_cache["j"] = a @ q
        return jac_cache["j"]

    out: dict[str, Any] = {}
    if method in polytask.balancers.available():
        try:
            b = polytask.balancers.create(method, k, **polytask_hparams(method))
            needs = b.info.needs
            if needs == "gramian":
                fn = lambda: b.weights_from_gramian(gramian, losses)  # noqa: E731
            elif needs == "jacobian":
                jac = jacobian()
                fn = lambda: b.combine(jac, losses)  # noqa: E731
            else:
                fn = lambda: b.weights(losses)  # noqa: E731
            out["polytask_ms"] = _median_call_ms(fn, budget_s, 200)
            out["polytask_input"] = "jacobian" if needs == "jacobian" else (
                "gramian" if needs == "gramian" else "losses")
        except Exception as err:
            out["polytask_error"] = f"{type(err).__name__}: {err}"
    else:
        out["polytask_error"] = "not registered"
    try:
        try:
            w = torchjd_weighting(method)
            fn = lambda: w(gramian)  # noqa: E731
            out["torchjd_input"] = "gramian"
        except Unavailable:
            agg = torchjd_aggregator(method, k)
            jac = jacobian()
            fn = lambda: agg(jac)  # noqa: E731
            out["torchjd_input"] = "jacobian"
        out["torchjd_ms"] = _median_call_ms(fn, budget_s, 200)
    except Unavailable as err:
        out["torchjd_error"] = str(err)
    except Exception as err:
        out["torchjd_error"] = f"{type(err).__name__}: {err}"
    return out


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def run_config(
    wl: Workload, base: Variant, base_peak: int | None, method: str, mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    label = {"params": method, "representation": f"{method} (repr)"}.get(mode, f"{method} ({mode})")
    row: dict[str, Any] = {"method": method, "mode": mode, "label": label, "K": wl.k,
                           "variants": {}}
    ref_grad: Tensor | None = None
    row["reference"] = None
    for kind in args.variants:
        entry: dict[str, Any] = {}
        row["variants"][kind] = entry
        try:
            _seed_all(args.seed)
            cand = make_variant(kind, wl, method, mode, args)
        except Unavailable as err:
            entry["skipped"] = str(err)
            continue
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"
            log(f"  [{label} K={wl.k}] {kind}: setup failed: {entry['error']}")
            continue
        try:
            # direction agreement on the first step (same weights, data and seeds)
            _seed_all(args.seed)
            cand.opt.zero_grad(set_to_none=cand.set_to_none)
            cand.compute()
            grad = cand.shared_grad()
            if ref_grad is None:  # polytask's when it runs, else the first variant that does
                ref_grad = grad
                row["reference"] = kind
            else:
                entry["cosine_to_ref"] = _cosine(grad, ref_grad)
            t0 = time.perf_counter()
            period = int(mode.split()[1]) if mode.startswith("every") else 1
            entry.update(timed_pairs(base, cand, args.warmup, args.pairs, period))
            if args.memory:
                peak = peak_step_bytes(cand, period)
                entry["peak_bytes"] = peak
                if base_peak:
                    entry["mem_ratio"] = peak / base_peak
            log(f"  [{label} K={wl.k}] {kind}: ratio {entry['ratio']:.2f} "
                f"({entry['ms']:.1f} ms vs {entry['baseline_ms']:.1f} ms)"
                + (f", mem x{entry['mem_ratio']:.2f}" if "mem_ratio" in entry else "")
                + f"  [{time.perf_counter() - t0:.0f} s]")
        except Exception as err:
            for key in ("ratio", "ms", "baseline_ms", "pairs"):
                entry.pop(key, None)
            entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"  [{label} K={wl.k}] {kind}: failed: {entry['error']}")
        finally:
            cand.close()
            del cand
            gc.collect()
    pt = row["variants"].get("polytask", {}).get("ratio")
    tj = [row["variants"].get(v, {}).get("ratio") for v in ("torchjd", "torchjd_autogram")]
    tj = [r for r in tj if r is not None]
    lm = row["variants"].get("libmtl", {}).get("ratio")
    row["polytask_over_torchjd"] = pt / min(tj) if pt is not None and tj else None
    row["polytask_over_libmtl"] = pt / lm if pt is not None and lm is not None else None
    return row


def amortized_error(wl: Workload, method: str, every: int, steps: int, seed: int) -> dict[str, Any]:
    """The approximation error of ``amortized``: along ``steps`` SGD steps of the amortised run,
    the cosine and relative error between its direction and the exact method's direction at the
    same parameters (the exact balancer is called at every step, so its own state advances)."""
    _seed_all(seed)
    amort = PolytaskStep(wl, method, "params", capture=True, every=every)
    exact = PolytaskStep(wl, method, "params", capture=True)
    cos: list[float] = []
    rel: list[float] = []
    try:
        for t in range(steps):
            exact.enc.load_state_dict(amort.enc.state_dict())
            exact.heads.load_state_dict(amort.heads.state_dict())
            exact.opt.zero_grad(set_to_none=True)
            exact.compute()
            d_exact = exact.shared_grad()
            amort.step()  # zero_grad, compute, opt.step (gradients stay readable)
            d = amort.shared_grad()
            if t % every:  # reuse steps only (recomputation steps are exact)
                cos.append(_cosine(d, d_exact))
                rel.append(float((d - d_exact).norm() / d_exact.norm().clamp_min(1e-30)))
    finally:
        amort.close()
        exact.close()
    return {
        "steps": steps, "reuse_steps": len(cos),
        "cosine_median": statistics.median(cos) if cos else None,
        "cosine_min": min(cos) if cos else None,
        "rel_error_median": statistics.median(rel) if rel else None,
        "rel_error_max": max(rel) if rel else None,
    }


def row_bound(row: dict[str, Any], bounds: dict[str, float]) -> float | None:
    """The FLOP bound of a result row (see the report's explanation)."""
    method, mode = row["method"], row["mode"]
    if method not in polytask.balancers.available():
        return None
    rec = polytask.balancers.info(method)
    if rec.needs == "losses":
        return 1.0 + (bounds["forward_over_sum_step"] if "loss_after_step" in rec.protocol else 0.0)
    if mode == "representation":
        return 1.0
    if mode.startswith("every"):  # one exact step in N, the others one backward
        n = int(mode.split()[1])
        return (bounds["exact_step_lower_bound"] + (n - 1)) / n
    return bounds["exact_step_lower_bound"]


def fmt(x: float | None, suffix: str = "") -> str:
    if x is None:
        return "—"
    return f"{x:.2f}{suffix}"


def cell(row: dict[str, Any], kind: str, key: str = "ratio") -> str:
    e = row["variants"].get(kind)
    if e is None:
        return "—"
    if key in e:
        return fmt(e[key])
    if "error" in e:
        return "error"
    return "n/a" if "skipped" in e else "—"


def print_report(res: dict[str, Any]) -> None:
    meta = res["meta"]
    print(f"# step cost: dims {'-'.join(map(str, meta['dims']))}, batch {meta['batch']}, "
          f"{meta['threads']} threads, {meta['pairs']} pairs, torch {meta['torch']}, "
          f"torchjd {meta['torchjd']}")
    print()
    print("## Physical bounds (matmul FLOPs relative to the sum-of-losses step)")
    print()
    print("| K | sum step GFLOP (counted) | K VJPs to activations | exact step lower bound "
          "| + Gramian contraction |")
    print("|---|---|---|---|---|")
    for k, b in res["bounds"].items():
        counted = b.get("sum_step_flops_counted")
        gflop = f"{b['sum_step_flops'] / 1e9:.4f}"
        if counted:
            gflop += f" ({counted / 1e9:.4f})"
        print(f"| {k} | {gflop} | {b['k_vjp_over_sum_step']:.2f}× "  # noqa: RUF001
              f"| {b['exact_step_lower_bound']:.2f}× "  # noqa: RUF001
              f"| {b['exact_step_with_gramian']:.2f}× |")  # noqa: RUF001
    if res["solver"]:
        print()
        print("## Solver alone (ms per call; input in brackets)")
        print()
        print("| method | K | polytask | torchjd |")
        print("|---|---|---|---|")
        for s in res["solver"]:
            pt = (f"{s['polytask_ms']:.3f} [{s['polytask_input']}]" if "polytask_ms" in s
                  else "n/a")
            tj = (f"{s['torchjd_ms']:.3f} [{s['torchjd_input']}]" if "torchjd_ms" in s
                  else "n/a")
            print(f"| {s['method']} | {s['K']} | {pt} | {tj} |")
    print()
    print("## Step time as a ratio to the sum-of-losses step (median of paired ratios)")
    print()
    print("FLOP bound: the matmul work the row's exact computation cannot avoid, relative to the "
          "sum step (gradient methods in params mode: forward + K VJPs to the activations + one "
          "combined weight gradient; representation mode and loss weightings: one forward and one "
          "backward, plus FAMO's extra forward); polytask/bound: how close polytask is to it. "
          "The bound counts FLOPs, not seconds: the batched [K*B, D] matmuls of the K VJPs run "
          "closer to the CPU's peak than the sum step's [B, D] ones, so a time ratio can come "
          "in under it.")
    print()
    print("| method | K | polytask ratio | FLOP bound | polytask/bound | polytask (no capture) "
          "| torchjd ratio | torchjd autogram | LibMTL ratio | polytask/torchjd | polytask/LibMTL "
          "| mem ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["results"]:
        bound = row_bound(r, res["bounds"][str(r["K"])])
        pt = r["variants"].get("polytask", {}).get("ratio")
        close = fmt(pt / bound) if pt is not None and bound else "—"
        print(f"| {r['label']} | {r['K']} | {cell(r, 'polytask')} | {fmt(bound)} | {close} "
              f"| {cell(r, 'polytask_nocap')} "
              f"| {cell(r, 'torchjd')} | {cell(r, 'torchjd_autogram')} | {cell(r, 'libmtl')} "
              f"| {fmt(r['polytask_over_torchjd'])} | {fmt(r['polytask_over_libmtl'])} "
              f"| {cell(r, 'polytask', 'mem_ratio')} |")
    if any("mem_ratio" in e for r in res["results"] for e in r["variants"].values()):
        print()
        print("## Peak step memory as a ratio to the sum-of-losses step")
        print()
        print("| method | K | baseline MB | polytask | no capture | torchjd | autogram | LibMTL |")
        print("|---|---|---|---|---|---|---|---|")
        for r in res["results"]:
            bp = res["baseline"][str(r["K"])].get("peak_bytes")
            print(f"| {r['label']} | {r['K']} | {fmt(bp / 2**20 if bp else None)} "
                  f"| {cell(r, 'polytask', 'mem_ratio')} "
                  f"| {cell(r, 'polytask_nocap', 'mem_ratio')} "
                  f"| {cell(r, 'torchjd', 'mem_ratio')} "
                  f"| {cell(r, 'torchjd_autogram', 'mem_ratio')} "
                  f"| {cell(r, 'libmtl', 'mem_ratio')} |")
    amort = [r for r in res["results"] if "amortized_error" in r]
    if amort:
        print()
        print("## Opt-in approximation: `amortized` (weights recomputed every N steps)")
        print()
        print("Time: the median over periods of N consecutive A B pairs of the summed times, so "
              "each period holds one full step. Error: along an SGD run on reuse steps, against "
              "the exact method at the same parameters.")
        print()
        print("| method | K | polytask ratio | reuse steps | cosine median (min) "
              "| relative error median (max) |")
        print("|---|---|---|---|---|---|")
        for r in amort:
            e = r["amortized_error"]
            print(f"| {r['label']} | {r['K']} | {cell(r, 'polytask')} | {e['reuse_steps']} "
                  f"| {fmt(e['cosine_median'])} ({fmt(e['cosine_min'])}) "
                  f"| {e['rel_error_median']:.2e} ({e['rel_error_max']:.2e}) |")
    print()
    print("Baseline (sum step) median ms per K: " + ", ".join(
        f"K={k}: {v['ms']:.2f}" for k, v in res["baseline"].items() if "ms" in v))
    notes = list(res["notes"])
    grouped: dict[str, list[str]] = {}
    for r in res["results"]:
        for kind, e in r["variants"].items():
            msg = e.get("skipped") or (f"ERROR {e['error']}" if "error" in e else None)
            if msg is None or "is not registered in polytask" in msg:
                continue  # absent polytask methods are listed once above
            grouped.setdefault(f"{kind}: {msg}", []).append(f"{r['label']} K={r['K']}")
            cos = e.get("cosine_to_ref")
            if cos is not None and not cos > 0.99:
                notes.append(f"{r['label']} K={r['K']} {kind}: first-step direction cosine "
                             f"{cos:.3f} to {r['reference']}")
    notes += [f"{msg} [{', '.join(where)}]" for msg, where in grouped.items()]
    if notes:
        print()
        print("Notes:")
        for n in dict.fromkeys(notes):
            print(f"- {n}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40])
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS,
                   help="params-mode rows (default: %(default)s)")
    p.add_argument("--repr-methods", nargs="*", default=DEFAULT_REPR_METHODS,
                   help="representation-mode rows (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--amortize", type=int, nargs="*", default=[],
                   help="also time the opt-in `amortized` approximation with these periods N "
                        "(rows 'method (every N)', polytask only) and report its direction error")
    p.add_argument("--amortize-methods", nargs="+", default=DEFAULT_AMORTIZE)
    p.add_argument("--amortize-steps", type=int, default=24,
                   help="SGD steps over which the amortised direction error is measured")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write every number to this JSON file")
    p.add_argument("--libmtl", default=os.environ.get("LIBMTL_PATH"),
                   help="LibMTL checkout (folder containing the LibMTL package); env LIBMTL_PATH")
    p.add_argument("--tiny", action="store_true",
                   help=f"tiny sizes (dims {'-'.join(map(str, TINY_DIMS))}, batch {TINY_BATCH})")
    p.add_argument("--dims", type=int, nargs="+", help="encoder widths (overrides --tiny)")
    p.add_argument("--batch", type=int, help="batch size (overrides --tiny)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the profiler memory measurement")
    p.add_argument("--no-solver", dest="solver", action="store_false",
                   help="skip the solver-alone timings")
    p.add_argument("--solver-budget", type=float, default=0.3,
                   help="seconds per solver timing (default: %(default)s)")
    p.add_argument("--peers-for-missing", action="store_true",
                   help="still time torchjd/LibMTL for methods polytask has not registered")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dims = tuple(args.dims) if args.dims else (TINY_DIMS if args.tiny else FULL_DIMS)
    args.batch = args.batch or (TINY_BATCH if args.tiny else FULL_BATCH)
    if len(args.dims) < 2:
        p.error("--dims needs at least two widths")
    return args


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    available = set(polytask.balancers.available())
    notes: list[str] = []
    rows: list[tuple[str, str]] = []
    missing: list[str] = []
    modes = [("params", args.methods), ("representation", args.repr_methods)]
    modes += [(f"every {n}", args.amortize_methods) for n in args.amortize]
    for mode, names in modes:
        for m in names:
            if m not in available:
                missing.append(m)
                if not args.peers_for_missing:
                    continue
            rows.append((m, mode))
    if missing:
        msg = (f"not registered in polytask: {', '.join(dict.fromkeys(missing))} "
               + ("(peers timed anyway: --peers-for-missing)" if args.peers_for_missing
                  else "(skipped)")
               + f"; available: {', '.join(sorted(available))}")
        log(msg)
        notes.append(msg)
    libmtl, libmtl_note = (None, "LibMTL not requested")
    if "libmtl" in args.variants:
        libmtl, libmtl_note = load_libmtl(args.libmtl)
    notes.append(libmtl_note)
    notes.append("torchjd autogram runs with batch_dim=None on the [K] loss vector; batch_dim=0 "
                 "needs per-instance losses [B, K] (instance-wise MTL) and per-sample Jacobians "
                 f"of {max(i * o + o for i, o in itertools.pairwise(args.dims))} parameters "
                 "per layer for every (sample, task), so it is not timed")
    notes.append("polytask/torchjd divides by the faster of torchjd's autojac and autogram steps")
    res: dict[str, Any] = {
        "meta": {
            "dims": list(args.dims), "batch": args.batch, "ks": args.ks, "lr": LR,
            "threads": args.threads, "pairs": args.pairs, "warmup": args.warmup,
            "seed": args.seed, "torch": torch.__version__, "torchjd": _version("torchjd"),
            "polytask": polytask.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "libmtl": getattr(libmtl, "__file__", None),
            "memory_method": "parameters + gradients + optimiser state held at the step start, "
                             "plus the torch.profiler profile_memory peak of the running "
                             "allocation sum during the second of two profiled steps (for an "
                             "amortised method: over the N steps after the first) minus its "
                             "start value",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "polytask_available": sorted(available),
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "notes": notes, "bounds": {}, "solver": [], "baseline": {}, "results": [],
    }
    for k in args.ks:
        log(f"K={k}")
        wl = Workload(tuple(args.dims), args.batch, k, args.seed)
        bounds = flop_model(args.dims, args.batch, k)
        bounds["sum_step_flops_counted"] = counted_sum_step_flops(wl)
        res["bounds"][str(k)] = bounds
        base = Baseline(wl)
        for _ in range(max(args.warmup, 1)):
            base.step()
        binfo: dict[str, Any] = {}
        if args.memory:
            binfo["peak_bytes"] = peak_step_bytes(base)
        res["baseline"][str(k)] = binfo
        if args.solver:
            for m in dict.fromkeys(m for m, _ in rows):
                s = solver_times(m, k, wl.n_shared, args.seed, args.solver_budget)
                res["solver"].append({"method": m, "K": k, **s})
        base_ms = []
        for method, mode in rows:
            row = run_config(wl, base, binfo.get("peak_bytes"), method, mode, args)
            if mode.startswith("every") and "ratio" in row["variants"].get("polytask", {}):
                row["amortized_error"] = amortized_error(
                    wl, method, int(mode.split()[1]), args.amortize_steps, args.seed)
            res["results"].append(row)
            base_ms += [e["baseline_ms"] for e in row["variants"].values() if "baseline_ms" in e]
        if base_ms:
            binfo["ms"] = statistics.median(base_ms)
    res["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        log(f"wrote {args.out}")
    print_report(res)
    return res


if __name__ == "__main__":
    main()
