"""The ``toy`` suite: the two-objective problem of CAGrad, Nash-MTL and FAMO on ``x in R^2``.

Problem (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
reference code ``Cranial-XIX/CAGrad`` ``toy.py``; reused unchanged by Navon et al., Nash-MTL,
ICML 2022, ``AvivNavon/nash-mtl`` ``experiments/toy``, and Liu et al., FAMO, NeurIPS 2023,
``Cranial-XIX/FAMO`` ``experiments/toy``). With ``t = tanh``::

    g1 = log(max(|0.5(-x1 - 7) - t(-x2)|, 5e-6)) + 6
    g2 = log(max(|0.5(-x1 + 3) + t(-x2) + 2|, 5e-6)) + 6
    s1 = ((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    s2 = ((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    c1 = max(t(x2 / 2), 0),  c2 = max(t(-x2 / 2), 0)
    L1 = scale_1 (g1 c1 + s1 c2),  L2 = scale_2 (g2 c1 + s2 c2)

For ``x2 > 0`` the objectives are narrow logarithmic valleys (where plain averaging gets stuck);
for ``x2 < 0`` two quadratics centred at ``x1 = +7`` and ``x1 = -7`` whose Pareto set is a curve
from ``(-7, -8.434)`` through ``(0, -8.355)`` to ``(7, -8.434)`` (the reference plots it as the
line ``x2 = -8.3552``, its value at ``x1 = 0``).

Protocol followed (``variant="nashmtl"``, the default): Nash-MTL's and FAMO's version, with the
first objective scaled by 0.1 to make the tasks imbalanced, the five starting points
``(-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1)``, Adam (lr 1e-3, default betas) on ``x`` and
35,000 steps (Nash-MTL's count; FAMO runs 50,000). ``variant="cagrad"`` is CAGrad's original:
unscaled objectives, starts ``(-8.5, 7.5), (-8.5, -5), (9, 9)``, 100,000 steps.

Every registered balancer runs here: gradient methods get the exact ``2 x 2`` Jacobian
(``combine(J, losses)``); loss-only methods get the gradient of their objective w.r.t. the losses
(exactly what :func:`polytask.mtl_backward` does: ``direction = dObjective/dlosses @ J``), and their
learnable parameters are trained by Adam with lr 0.025 (the reference's ``method_params_lr``).
``loss_after_step`` methods (FAMO) get :meth:`~polytask.balancers.Balancer.after_step` with the
losses at the new point after every step. The problem is deterministic and full-batch, so one step
is one epoch (``epoch_end`` methods are told so after every step). The balancers see the losses
shifted by their known lower bound (``L_i + 21 scale_i`` > 0): FAMO's toy does exactly this
(``set_min_losses([-21 scale, -21])``), and it keeps log-based loss weightings defined; it changes
neither the Jacobian nor any gradient-only method.

A run "reaches the Pareto front" from a start when its final point lies within ``pareto_tol`` (in
``x`` space) of the numerically traced Pareto set (:func:`pareto_set`: the points where the two
gradients are anti-parallel, ``det J = 0`` with ``x2 < 0``, for ``x1`` in ``[-7, 7]``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..balancers import available, create, info
from ._suite import Protocol, RunResult, Suite, register_suite

__all__ = [
    "FINDINGS",
    "LOWER",
    "Finding",
    "VARIANTS",
    "ToySuite",
    "distance_to_pareto",
    "pareto_set",
    "balancer_direction",
    "run_toy",
    "toy_losses",
    "toy_losses_and_jacobian",
    "toy_losses_torch",
]

#: floor of the log terms (the reference's ``LOWER``)
LOWER = 0.000005

#: the published protocols (starting points, loss scales, steps, Adam lr)
VARIANTS: dict[str, dict[str, Any]] = {
    "nashmtl": {
        "scale": (0.1, 1.0),
        "starts": ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)),
        "steps": 35000,
        "lr": 1e-3,
    },
    "cagrad": {
        "scale": (1.0, 1.0),
        "starts": ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)),
        "steps": 100000,
        "lr": 1e-3,
    },
}

#: methods of the papers' figures (LS, MGDA, PCGrad, CAGrad, Nash-MTL, FAMO) plus IMTL-G and SI
_PAPER_METHODS = ("mean", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo", "imtl_g", "si")


# ------------------------------------------------------------------------------------------------
# the problem
# ------------------------------------------------------------------------------------------------
def toy_losses_and_jacobian(
    x: np.ndarray | Sequence[float], scale: Sequence[float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Losses ``[..., 2]`` and Jacobian ``[..., 2, 2]`` (``J[..., i, j] = dL_i/dx_j``) at ``x``.

    Closed form in float64, vectorised over leading dimensions of ``x`` (``[..., 2]``). The
    gradients follow PyTorch's conventions at the kinks (``clamp`` passes the gradient where the
    input equals the bound; ``abs`` has zero gradient at 0), so they equal autograd's on
    :func:`toy_losses_torch` everywhere, including the start point ``(0, 0)``.
    """
    x = np.asarray(x, dtype=np.float64)
    x1, x2 = x[..., 0], x[..., 1]
    s_1, s_2 = float(scale[0]), float(scale[1])
    th2 = np.tanh(x2)
    dth2 = 1.0 - th2 * th2
    a = -0.5 * x1 - 3.5 + th2  # 0.5 (-x1 - 7) - tanh(-x2)
    b = -0.5 * x1 + 3.5 - th2  # 0.5 (-x1 + 3) + tanh(-x2) + 2
    aa, ab = np.abs(a), np.abs(b)
    g1 = np.log(np.maximum(aa, LOWER)) + 6.0
    g2 = np.log(np.maximum(ab, LOWER)) + 6.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ia = np.where(aa >= LOWER, 1.0 / np.where(a == 0, 1.0, a), 0.0)  # d log|a| / da
        ib = np.where(ab >= LOWER, 1.0 / np.where(b == 0, 1.0, b), 0.0)
    th = np.tanh(0.5 * x2)
    dth = 0.5 * (1.0 - th * th)
    c1 = np.maximum(th, 0.0)
    c2 = np.maximum(-th, 0.0)
    dc1 = np.where(th >= 0.0, dth, 0.0)
    dc2 = np.where(-th >= 0.0, -dth, 0.0)
    q = 0.1 * (x2 + 8.0) ** 2
    s1 = ((x1 - 7.0) ** 2 + q) / 10.0 - 20.0
    s2 = ((x1 + 7.0) ** 2 + q) / 10.0 - 20.0
    dq = 0.02 * (x2 + 8.0)

    f1 = s_1 * (g1 * c1 + s1 * c2)
    f2 = s_2 * (g2 * c1 + s2 * c2)
    j11 = s_1 * (-0.5 * ia * c1 + (x1 - 7.0) / 5.0 * c2)
    j12 = s_1 * (dth2 * ia * c1 + g1 * dc1 + dq * c2 + s1 * dc2)
    j21 = s_2 * (-0.5 * ib * c1 + (x1 + 7.0) / 5.0 * c2)
    j22 = s_2 * (-dth2 * ib * c1 + g2 * dc1 + dq * c2 + s2 * dc2)
    losses = np.stack([f1, f2], axis=-1)
    jac = np.stack([np.stack([j11, j12], axis=-1), np.stack([j21, j22], axis=-1)], axis=-2)
    return losses, jac


def toy_losses(x: np.ndarray | Sequence[float], scale: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Losses ``[..., 2]`` at ``x`` (``[..., 2]``), float64."""
    return toy_losses_and_jacobian(x, scale)[0]


def toy_losses_torch(x: torch.Tensor, scale: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """The same losses as a differentiable torch expression (``[..., 2] -> [..., 2]``)."""
    x1, x2 = x[..., 0], x[..., 1]
    g1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    g2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    s1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    s2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return torch.stack([scale[0] * (g1 * c1 + s1 * c2), scale[1] * (g2 * c1 + s2 * c2)], dim=-1)


# ------------------------------------------------------------------------------------------------
# the Pareto set
# ------------------------------------------------------------------------------------------------
_FRONT_CACHE: dict[int, np.ndarray] = {}


def pareto_set(n: int = 2001) -> np.ndarray:
    """``n`` points ``[n, 2]`` of the Pareto set, ordered by ``x1`` from -7 to 7.

    For each ``x1`` the Pareto-stationary ``x2`` (the two gradients anti-parallel: ``det J = 0``;
    the loss scales only multiply ``det J``) is found by bisection in ``x2 in [-11, -6]``, where the
    objectives are the two quadratics. For ``x1`` outside ``[-7, 7]`` both gradients point the same
    way in ``x1``, and every point of the ``x2 > 0`` region is worse than every point of this set in
    both objectives (there each loss is at least ``-6.2``, while on this set ``L1 + L2 <= -20.4``
    for unit scales), so this curve is the whole Pareto set. Cached per ``n``.
    """
    if n in _FRONT_CACHE:
        return _FRONT_CACHE[n].copy()
    x1 = np.linspace(-7.0, 7.0, n)
    lo = np.full(n, -11.0)
    hi = np.full(n, -6.0)

    def det(x2: np.ndarray) -> np.ndarray:
        _, jac = toy_losses_and_jacobian(np.stack([x1, x2], axis=-1))
        return jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]

    d_lo, d_hi = det(lo), det(hi)
    if np.any(np.sign(d_lo) == np.sign(d_hi)):
        raise RuntimeError("pareto_set: the bisection bracket does not contain a root")
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        d_mid = det(mid)
        left = np.sign(d_mid) == np.sign(d_lo)
        lo = np.where(left, mid, lo)
        d_lo = np.where(left, d_mid, d_lo)
        hi = np.where(left, hi, mid)
    front = np.stack([x1, 0.5 * (lo + hi)], axis=-1)
    _FRONT_CACHE[n] = front
    return front.copy()


def distance_to_pareto(
    points: np.ndarray | Sequence[float], front: np.ndarray | None = None
) -> np.ndarray:
    """Euclidean distance (in ``x`` space) from each point ``[..., 2]`` to the Pareto set.

    The distance is to the polyline through :func:`pareto_set` (2,001 points, spacing 0.007).
    """
    pts = np.asarray(points, dtype=np.float64)
    front = pareto_set() if front is None else np.asarray(front, dtype=np.float64)
    flat = pts.reshape(-1, 2)
    a, b = front[:-1], front[1:]
    ab = b - a
    denom = (ab * ab).sum(-1)
    ap = flat[:, None, :] - a[None]
    t = np.clip((ap * ab[None]).sum(-1) / denom[None], 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    dist = np.sqrt(((flat[:, None, :] - closest) ** 2).sum(-1)).min(axis=1)
    return dist.reshape(pts.shape[:-1])


# ------------------------------------------------------------------------------------------------
# optimisation
# ------------------------------------------------------------------------------------------------
def balancer_direction(
    balancer: Any,
    losses: torch.Tensor,
    jacobian: torch.Tensor,
    own: Sequence[torch.Tensor] = (),
    optimizer: torch.optim.Optimizer | None = None,
) -> torch.Tensor:
    """The update direction ``[P]`` :func:`polytask.mtl_backward` would put into ``.grad``.

    Gradient methods: ``combine(J, losses)``. Loss-only methods: the gradient of their objective
    w.r.t. the losses times ``J`` (the chain rule through ``L = f(x)``), and the gradient of the
    objective w.r.t. the balancer's own parameters ``own`` (stepped by ``optimizer``).
    """
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if balancer.info.needs == "losses":
        lt = losses.detach().clone().requires_grad_(True)
        obj = balancer.objective(lt)
        grads = torch.autograd.grad(obj, [lt, *own], allow_unused=True)
        w = grads[0] if grads[0] is not None else torch.zeros_like(lt)
        d = w @ jacobian
        for p, g in zip(own, grads[1:], strict=False):
            p.grad = g
    else:
        with torch.inference_mode():  # no autograd bookkeeping: about 1.3x faster on 2x2 problems
            d = balancer.combine(jacobian, losses)
    if optimizer is not None:
        optimizer.step()
    return d.detach()


def run_toy(
    method: str,
    *,
    starts: Sequence[Sequence[float]] = VARIANTS["nashmtl"]["starts"],
    scale: Sequence[float] = VARIANTS["nashmtl"]["scale"],
    steps: int = 35000,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    balancer_lr: float = 0.025,
    loss_lower_bound: float = -21.0,
    hparams: dict[str, Any] | None = None,
    seed: int = 0,
    stride: int = 50,
    pareto_tol: float = 0.05,
    freeze: tuple[int, float] | None = None,
    on_progress: Any = None,
) -> dict[str, Any]:
    """Optimise the toy problem from every start with balancer ``method``; return the record.

    One balancer (fresh state) per start; all starts advance in lock step. ``x`` is updated by
    Adam with ``torch.optim.Adam``'s update rule (written out in float64 so that the 2-D problem
    costs microseconds per step). Returns ``trajectories`` (``[S][n, 2]``, every ``stride``-th point
    plus the last), ``losses`` (the true, unshifted losses along them), ``final``, ``distance``,
    ``reached``, ``front_position`` (``x1 / 7`` of the final point, in ``[-1, 1]`` on the front),
    ``weights`` (the last task weights per start, where the method has weights) and ``seconds``.

    ``freeze=(every, tol)``: every ``every`` steps, a start whose point lies within
    ``pareto_tol`` of the Pareto set and moved less than ``tol`` since the previous check is
    frozen there (no more steps, its balancer is not called again; ``converged_step`` records
    when). Points off the front always run all ``steps``: a point that sat still for thousands of
    steps may still leave (LS from ``(9, -1)`` rests near ``x1 = 7`` from step 5,000 and reaches
    the front only after 29,000), so freezing it would change the outcome. ``on_progress(n)``
    is called with the number of steps done since its last call.
    """
    rec = info(method)
    if "extra_batch" in rec.protocol:
        raise ValueError(
            f"toy: {method!r} needs extra batches, which a deterministic problem lacks"
        )
    if steps < 1 or stride < 1:
        raise ValueError("toy: steps and stride must be >= 1")
    starts_np = np.asarray(starts, dtype=np.float64).reshape(-1, 2)
    n_starts = len(starts_np)
    scale = tuple(float(s) for s in scale)
    shift = -loss_lower_bound * np.asarray(scale)  # balancers see L_i + 21 scale_i > 0
    torch.manual_seed(seed)
    balancers = [create(method, 2, **(hparams or {})).to(torch.float64) for _ in range(n_starts)]
    owns = [[p for p in b.parameters() if p.requires_grad] for b in balancers]
    opts = [torch.optim.Adam(own, lr=balancer_lr) if own else None for own in owns]
    after = "loss_after_step" in rec.protocol
    epoch_end = "epoch_end" in rec.protocol

    x = starts_np.copy()
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    b1, b2 = betas
    traj = [x.copy()]
    record_steps = [0]
    f, jac = toy_losses_and_jacobian(x, scale)
    loss_rec = [f.copy()]
    direction = np.zeros_like(x)
    active = np.ones(n_starts, dtype=bool)
    converged_step: list[int | None] = [None] * n_starts
    last_check = x.copy()
    reported = 0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for i, bal in enumerate(balancers):
            if not active[i]:
                continue
            d = balancer_direction(
                bal, torch.from_numpy(f[i] + shift), torch.from_numpy(jac[i]), owns[i], opts[i]
            )
            direction[i] = d.numpy()
        if not np.all(np.isfinite(direction)):
            raise FloatingPointError(f"toy: {method!r} produced a non-finite update at step {step}")
        # Adam (torch.optim.Adam's update, no weight decay, no amsgrad); frozen starts stay put
        m = b1 * m + (1.0 - b1) * direction
        v = b2 * v + (1.0 - b2) * direction * direction
        bc1 = 1.0 - b1**step
        bc2 = 1.0 - b2**step
        x_new = x - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
        x = np.where(active[:, None], x_new, x)
        f, jac = toy_losses_and_jacobian(x, scale)
        if after:
            for i, bal in enumerate(balancers):
                if active[i]:
                    bal.after_step(torch.from_numpy(f[i] + shift))
        if epoch_end:
            for i, bal in enumerate(balancers):
                if active[i]:
                    bal.epoch_end()
        if freeze is not None and step % freeze[0] == 0:
            moved = np.linalg.norm(x - last_check, axis=1)
            near = distance_to_pareto(x) <= pareto_tol
            for i in np.flatnonzero(active & near & (moved < freeze[1])):
                active[i] = False
                converged_step[i] = step
            last_check = x.copy()
        done = not active.any()
        if step % stride == 0 or step == steps or done:
            traj.append(x.copy())
            loss_rec.append(f.copy())
            record_steps.append(step)
            if on_progress is not None:
                on_progress(step - reported)
                reported = step
        if done:
            break
    seconds = time.perf_counter() - t0

    dist = distance_to_pareto(x)
    weights = []
    for bal in balancers:
        w = getattr(bal, "last_weights", None)
        weights.append(None if w is None else [float(u) for u in w.reshape(-1)])
    traj_np = np.stack(traj, axis=1)  # [S, n, 2]
    loss_np = np.stack(loss_rec, axis=1)
    return {
        "method": method,
        "starts": starts_np.tolist(),
        "scale": list(scale),
        "steps": steps,
        "record_steps": record_steps,
        "trajectories": traj_np.tolist(),
        "losses": loss_np.tolist(),
        "final": x.tolist(),
        "final_losses": f.tolist(),
        "distance": dist.tolist(),
        "reached": [bool(d <= pareto_tol) for d in dist],
        "front_position": [float(np.clip(p[0] / 7.0, -1.0, 1.0)) for p in x],
        "weights": weights,
        "pareto_tol": pareto_tol,
        "converged_step": converged_step,
        "steps_run": record_steps[-1],
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------------
# one start of one run, and the merge of a run's starts
# ------------------------------------------------------------------------------------------------
def toy_unit(method: str, start: Sequence[float], settings: dict[str, Any], seed: int) -> dict:
    """:func:`run_toy` of ``method`` from one ``start`` under the protocol ``settings``."""
    hp = dict(settings.get("method_hparams", {}).get(method, {}))
    hp = {k: val for k, val in hp.items() if k in info(method).hparams}
    freeze = settings.get("freeze")
    out = run_toy(
        method,
        starts=[list(start)],
        scale=settings["scale"],
        steps=int(settings["steps"]),
        lr=float(settings["lr"]),
        betas=tuple(settings["betas"]),
        eps=float(settings["eps"]),
        balancer_lr=float(settings["balancer_lr"]),
        loss_lower_bound=float(settings["loss_lower_bound"]),
        hparams=hp,
        seed=seed,
        stride=int(settings["stride"]),
        pareto_tol=float(settings["pareto_tol"]),
        freeze=None if freeze is None else (int(freeze[0]), float(freeze[1])),
    )
    out["hparams"] = hp
    return out


def _toy_worker(method: str, start: Sequence[float], settings: dict[str, Any], seed: int) -> dict:
    """Process-pool entry point of :meth:`ToySuite.run_batch` (one thread, memory metered)."""
    from ._runner import MemoryMeter

    torch.set_num_threads(1)
    with MemoryMeter("cpu") as meter:
        out = toy_unit(method, start, settings, seed)
    out["memory"] = meter.record()
    return out


_PER_START = (
    "starts",
    "trajectories",
    "losses",
    "final",
    "final_losses",
    "distance",
    "reached",
    "front_position",
    "weights",
    "converged_step",
)


def toy_result(method: str, seed: int, parts: Sequence[dict[str, Any]]) -> RunResult:
    """Merge the one-start records of :func:`toy_unit` (in start order) into one run.

    Per-start fields become lists over the starts; ``record_steps`` too (a frozen start stops
    early); ``seconds`` is the sum, ``steps_run`` the longest.
    """
    out: dict[str, Any] = {k: [p[k][0] for p in parts] for k in _PER_START}
    out["record_steps"] = [p["record_steps"] for p in parts]
    first = parts[0]
    out.update(
        method=method,
        scale=first["scale"],
        steps=first["steps"],
        pareto_tol=first["pareto_tol"],
        hparams=first.get("hparams", {}),
        seconds=float(sum(p["seconds"] for p in parts)),
        steps_run=max(p["steps_run"] for p in parts),
    )
    mems = [p["memory"] for p in parts if "memory" in p]
    if mems:
        out["memory"] = max(mems, key=lambda r: r["peak_mb"])
    final_losses = np.asarray(out["final_losses"])
    test = {
        "pareto/reached": float(np.mean(out["reached"])),
        "pareto/mean_distance": float(np.mean(out["distance"])),
        "pareto/max_distance": float(np.max(out["distance"])),
        "loss/final_mean": float(final_losses.mean()),
    }
    hib = {
        "pareto/reached": True,
        "pareto/mean_distance": False,
        "pareto/max_distance": False,
        "loss/final_mean": False,
    }
    steps_total = sum(p["steps_run"] for p in parts)
    return RunResult(
        method=method,
        seed=seed,
        test=test,
        higher_is_better=hib,
        time_per_epoch=out["seconds"] / max(steps_total, 1) * len(parts),  # one step of all starts
        peak_memory_mb=float(out["memory"]["peak_mb"]) if mems else 0.0,
        best_epoch=None,
        history=[],
        extras=out,
    )


# ------------------------------------------------------------------------------------------------
# the published qualitative findings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """A qualitative claim of a paper about the toy problem, checked against a run.

    ``check(runs)`` receives ``{method: [RunResult, ...]}`` (seed 0 first) and returns
    ``(agrees, what this run shows)``, or ``None`` when the methods it needs were not run.
    """

    source: str
    claim: str
    methods: tuple[str, ...]
    check: Callable[[dict[str, list[RunResult]]], tuple[bool, str]]


def _reached(r: RunResult) -> list[bool]:
    return list(r.extras["reached"])


def _n_reached(runs: dict[str, list[RunResult]], m: str) -> tuple[int, int]:
    r = runs[m][0]
    return sum(_reached(r)), len(_reached(r))


def _front_side(runs: dict[str, list[RunResult]], m: str) -> float:
    """Mean final ``x1 / 7`` over the seed-0 starts that reached the front (``> 0``: favours
    L1, whose minimum is at ``x1 = +7``; ``< 0``: favours L2)."""
    r = runs[m][0]
    pos = [p for p, ok in zip(r.extras["front_position"], _reached(r), strict=True) if ok]
    return float(np.mean(pos)) if pos else float("nan")


def _count_check(m: str, want: int) -> Callable[[dict[str, list[RunResult]]], tuple[bool, str]]:
    def check(runs: dict[str, list[RunResult]]) -> tuple[bool, str]:
        k, n = _n_reached(runs, m)
        return k == want, f"{_LABELS.get(m, m)} reaches the front from {k} of {n} starts"

    return check


def _side_check(
    ms: Sequence[str], sign: int
) -> Callable[[dict[str, list[RunResult]]], tuple[bool, str]]:
    def check(runs: dict[str, list[RunResult]]) -> tuple[bool, str]:
        sides = {m: _front_side(runs, m) for m in ms}
        ok = all(math.isfinite(v) and np.sign(v) == sign for v in sides.values())
        text = ", ".join(f"{_LABELS.get(m, m)} {v:+.2f}" for m, v in sides.items())
        return ok, f"mean final x1/7 on the front: {text} (L2's side is < 0)"

    return check


_NASH = "Navon et al., Nash-MTL (ICML 2022), Fig. 1"
_FAMO = "Liu et al., FAMO (NeurIPS 2023), Fig. 1"
#: claims readable in the papers' text (figure captions); the FAMO-protocol count of a third
#: party is listed as such.
FINDINGS: tuple[Finding, ...] = (
    Finding(
        _FAMO,
        "Adam on the average loss (LS) fails to reach the Pareto front from 1 of the 5 "
        "starts (FAMO runs 50,000 steps)",
        ("mean",),
        _count_check("mean", 4),
    ),
    Finding(
        _FAMO,
        "FAMO decreases the task losses in a balanced way and reaches the front from every start",
        ("famo",),
        _count_check("famo", 5),
    ),
    Finding(
        _NASH,
        "for LS, PCGrad and CAGrad the optimisation is controlled by the gradient of "
        "L2, which has the larger magnitude (their solutions favour L2)",
        ("mean", "pcgrad", "cagrad"),
        _side_check(("mean", "pcgrad", "cagrad"), -1),
    ),
    Finding(
        _NASH,
        "Nash-MTL reaches the Pareto front from every start",
        ("nash_mtl",),
        _count_check("nash_mtl", 5),
    ),
    Finding(
        _NASH + " (the figure; the caption's text on MGDA was not readable here)",
        "MGDA leans towards the loss with the smaller gradient, L1",
        ("mgda",),
        _side_check(("mgda",), +1),
    ),
    Finding(
        "Hassanpour et al., ConicGrad (arXiv 2502.00217), Fig. 1, on FAMO's protocol",
        "CAGrad reaches the global minimum of the average loss (on the front) from all 5 starts",
        ("cagrad",),
        _count_check("cagrad", 5),
    ),
)


# ------------------------------------------------------------------------------------------------
# the suite
# ------------------------------------------------------------------------------------------------
@register_suite("toy")
class ToySuite(Suite):
    """CAGrad / Nash-MTL / FAMO two-objective toy: does each method reach the Pareto front?

    Protocol ``toy-v4`` (``polytask bench toy``): Nash-MTL's and FAMO's variant (first loss x 0.1,
    their five starts, Adam lr 1e-3, 35,000 steps, balancer parameters with Adam lr 0.025), with
    converged starts frozen (see :func:`run_toy`'s ``freeze``: within ``pareto_tol`` of the front
    and moved < 0.01 over the last 1,000 steps). The problem and the default methods are
    deterministic, so the protocol has one seed; seed ``k > 0`` (``--seeds 3``) moves every start
    by ``N(0, start_jitter^2)`` noise drawn from seed ``k``, which tests whether the finding
    survives small changes of the starts. The quick protocol (``toy-quick-v4``) is a smoke test:
    3,500 steps at lr 1e-2 do not converge, so it does not reproduce the finding.
    """

    description = (
        "Two-objective toy problem of CAGrad/Nash-MTL/FAMO on x in R^2 (first loss scaled by 0.1, "
        "5 starts, Adam): which methods reach the Pareto front from which start"
    )
    has_baselines = False
    default_threads = 1  # 2x2 problems: torch's thread pool only adds overhead
    default_jobs = 2  # independent single-threaded runs: one per core

    def protocol(self, quick: bool) -> Protocol:
        var = VARIANTS["nashmtl"]
        settings: dict[str, Any] = {
            "variant": "nashmtl",
            "scale": list(var["scale"]),
            "starts": [list(s) for s in var["starts"]],
            "start_jitter": 0.1,
            "optimizer": "adam",
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "balancer_lr": 0.025,
            "loss_lower_bound": -21.0,
            "pareto_tol": 0.05,
            "freeze": [1000, 0.01],
            # as the reference toy scripts run them: FAMO with gamma=0 ("the objective is not
            # changing", FAMO's run.sh); CAGrad as Nash-MTL's toy (c=0.4, radius c ||g0||,
            # divided by 1 + c^2); Nash-MTL's own defaults (max_norm=1, 20 CCP iterations).
            "method_hparams": {
                "famo": {"gamma": 0.0},
                "cagrad": {"c": 0.4, "convention": "official", "rescale": 1},
            },
        }
        if quick:
            settings.update(steps=3500, lr=1e-2, stride=5)
            version = "toy-quick-v4"
        else:
            settings.update(steps=var["steps"], lr=var["lr"], stride=50)
            version = "toy-v4"
        registered = set(available())
        defaults = tuple(m for m in _PAPER_METHODS if m in registered)
        return Protocol("toy", version, settings, seeds=(0,), default_methods=defaults)

    def planned_epochs(self, method: str, protocol: Protocol) -> int:
        return int(protocol.settings["steps"])

    #: seconds per toy run relative to LS, measured on the 2-core development machine (only
    #: orders the parallel runs, longest first)
    _COST: ClassVar[dict[str, float]] = {
        "nash_mtl": 25.0,
        "cagrad": 14.0,
        "mgda": 4.0,
        "pcgrad": 4.0,
        "famo": 4.0,
        "uw": 6.0,
    }

    def relative_cost(self, method: str, protocol: Protocol) -> float:
        return self._COST.get(method, 1.0)

    def starts(self, protocol: Protocol, seed: int) -> np.ndarray:
        """The published starts (seed 0) or starts jittered with seed ``seed``'s noise."""
        s = protocol.settings
        base = np.asarray(s["starts"], dtype=np.float64)
        if seed == 0:
            return base
        noise = np.random.default_rng(seed).normal(0.0, float(s["start_jitter"]), base.shape)
        return base + noise

    def run(self, method: str, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        """One method and seed: every start on its own (:func:`toy_unit`), then merged."""
        starts = self.starts(protocol, seed).tolist()
        parts = []
        for start in starts:
            parts.append(toy_unit(method, start, protocol.settings, seed))
            self.advance(int(protocol.settings["steps"]) // len(starts))
        return toy_result(method, seed, parts)

    def run_batch(
        self, todo: Sequence[tuple[str, int]], protocol: Protocol, jobs: int, advance: Any
    ) -> Any:
        """Train ``todo`` in ``jobs`` worker processes, one start of one run per task (the most
        even split: the costliest method is a fifth of a run per task), longest first; yield
        ``(method, seed, RunResult)`` as each run's starts are all done. The same results as
        :meth:`run` (each start is independent: its own balancer and Adam state)."""
        import concurrent.futures as cf
        import multiprocessing as mp

        starts = {(m, sd): self.starts(protocol, sd).tolist() for m, sd in todo}
        units = [(m, sd, i) for m, sd in todo for i in range(len(starts[(m, sd)]))]
        units.sort(key=lambda u: -self.relative_cost(u[0], protocol))
        parts: dict[tuple[str, int], dict[int, dict[str, Any]]] = {p: {} for p in todo}
        per_unit = {p: int(protocol.settings["steps"]) // len(starts[p]) for p in todo}
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(_toy_worker, m, starts[(m, sd)][i], protocol.settings, sd): (m, sd, i)
                for m, sd, i in units
            }
            for fut in cf.as_completed(futures):
                m, sd, i = futures[fut]
                parts[(m, sd)][i] = fut.result()
                advance(per_unit[(m, sd)])
                if len(parts[(m, sd)]) == len(starts[(m, sd)]):
                    got = parts.pop((m, sd))
                    yield m, sd, toy_result(m, sd, [got[k] for k in sorted(got)])

    def sections(self, results: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
        """Report sections: which start reaches the front, and the papers' findings checked."""
        runs = {m: sorted(rs, key=lambda r: r.seed) for m, rs in results.items() if rs}
        if not runs:
            return []
        first = next(iter(runs.values()))[0].extras
        starts = [f"({a:g}, {b:g})" for a, b in first["starts"]]
        head = ["method", *starts, "reached (seed 0)", "final x1/7 on the front"]
        rows = []
        for m, rs in runs.items():
            r0 = rs[0]
            cells = []
            for i in range(len(starts)):
                k = sum(bool(r.extras["reached"][i]) for r in rs)
                mark = "yes" if r0.extras["reached"][i] else "no"
                cells.append(mark + (f" ({k}/{len(rs)} seeds)" if len(rs) > 1 else ""))
            side = _front_side(runs, m)
            rows.append(
                [
                    _LABELS.get(m, m),
                    *cells,
                    f"{sum(_reached(r0))}/{len(starts)}",
                    f"{side:+.2f}" if math.isfinite(side) else "–",  # noqa: RUF001
                ]
            )
        ftab = []
        for fnd in FINDINGS:
            if not all(m in runs for m in fnd.methods):
                continue
            ok, what = fnd.check(runs)
            ftab.append([fnd.source, fnd.claim, what, "matches" if ok else "does not match"])
        seeds = sorted({r.seed for rs in runs.values() for r in rs})
        text = (
            "A start reaches the front when its final point lies within "
            f"{first['pareto_tol']:g} (in x) of the Pareto set; seed 0 uses the published starts"
            + (
                ""
                if seeds == [0]
                else ", seeds " + ", ".join(map(str, seeds[1:])) + " jittered "
                "starts (in brackets: how many seeds reach from that start)"
            )
            + ". x1/7 locates the final point on the front: -1 is L2's minimum, +1 L1's."
        )
        return [
            {"title": "Which start reaches the Pareto front", "text": text, "table": (head, rows)},
            {
                "title": "The papers' qualitative findings, checked",
                "text": "Each claim is tested on seed 0 (the published starts) of this run.",
                "table": (["source", "claim", "this run", "verdict"], ftab),
            },
        ]

    def plots(self, results: dict[str, list[RunResult]], out_dir: Path) -> list[Path]:
        runs = {m: sorted(rs, key=lambda r: r.seed)[0] for m, rs in results.items() if rs}
        if not runs:
            return []
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            plot_landscape(runs, out_dir / "toy_trajectories.png"),
            plot_loss_space(runs, out_dir / "toy_loss_space.png"),
        ]


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
_LABELS = {
    "mean": "LS (mean)",
    "sum": "LS (sum)",
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "nash_mtl": "Nash-MTL",
    "famo": "FAMO",
    "imtl_g": "IMTL-G",
    "imtl": "IMTL",
    "uw": "UW",
    "fairgrad": "FairGrad",
    "upgrad": "UPGrad",
    "aligned_mtl": "Aligned-MTL",
}
_START_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)


def _grid(n_panels: int) -> tuple[int, int]:
    cols = min(4, n_panels)
    return (n_panels + cols - 1) // cols, cols


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_landscape(runs: dict[str, RunResult], path: Path, xl: float = 10.5) -> Path:
    """One panel per method: contours of the mean loss, the Pareto set and the trajectories."""
    plt = _pyplot()
    first = next(iter(runs.values())).extras
    scale = first["scale"]
    g = np.linspace(-xl, xl, 400)
    gx, gy = np.meshgrid(g, g)
    mean_loss = toy_losses(np.stack([gx, gy], -1), scale).mean(-1)
    front = pareto_set()
    rows, cols = _grid(len(runs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(runs) :]:
        ax.axis("off")
    for ax, (name, res) in zip(axes.flat, runs.items(), strict=False):
        ex = res.extras
        ax.contourf(gx, gy, mean_loss, levels=30, cmap="viridis", alpha=0.55)
        ax.contour(gx, gy, mean_loss, levels=15, colors="k", linewidths=0.3, alpha=0.5)
        ax.plot(
            front[:, 0],
            front[:, 1],
            color="#555555",
            linewidth=5,
            alpha=0.8,
            zorder=2,
            label="Pareto set",
        )
        for i, tr in enumerate(ex["trajectories"]):
            tr = np.asarray(tr)
            col = _START_COLOURS[i % len(_START_COLOURS)]
            ax.plot(tr[:, 0], tr[:, 1], color=col, linewidth=1.6, zorder=3)
            ax.scatter(tr[0, 0], tr[0, 1], color="k", s=30, zorder=4)
            ok = ex["reached"][i]
            ax.scatter(
                tr[-1, 0],
                tr[-1, 1],
                color=col,
                marker="*" if ok else "X",
                s=170 if ok else 90,
                edgecolors="k",
                linewidths=0.8,
                zorder=5,
            )
        n_ok = sum(ex["reached"])
        ax.set_title(
            f"{_LABELS.get(name, name)}: {n_ok}/{len(ex['reached'])} reach the front", fontsize=10
        )
        ax.set_xlim(-xl, xl)
        ax.set_ylim(-xl, xl)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"Toy problem (L1 x {scale[0]:g}, L2 x {scale[1]:g}): contours of (L1+L2)/2, Pareto set "
        "(grey), start (black dot), end (star: on the front, X: not)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_space(runs: dict[str, RunResult], path: Path) -> Path:
    """One panel per method in loss space ``(L1, L2)`` with the Pareto front (as Nash-MTL's)."""
    plt = _pyplot()
    first = next(iter(runs.values())).extras
    scale = first["scale"]
    front_l = toy_losses(pareto_set(), scale)
    rows, cols = _grid(len(runs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(runs) :]:
        ax.axis("off")
    for ax, (name, res) in zip(axes.flat, runs.items(), strict=False):
        ex = res.extras
        ax.plot(front_l[:, 0], front_l[:, 1], color="#777777", linewidth=6, zorder=1)
        for i, ls in enumerate(ex["losses"]):
            ls = np.asarray(ls)
            col = _START_COLOURS[i % len(_START_COLOURS)]
            ax.plot(ls[:, 0], ls[:, 1], color=col, linewidth=1.4, zorder=3)
            ax.scatter(ls[0, 0], ls[0, 1], color="k", s=25, zorder=4)
            ok = ex["reached"][i]
            ax.scatter(
                ls[-1, 0],
                ls[-1, 1],
                color=col,
                marker="*" if ok else "X",
                s=150 if ok else 80,
                edgecolors="k",
                linewidths=0.8,
                zorder=5,
            )
        ax.set_title(_LABELS.get(name, name), fontsize=10)
        ax.set_xlabel("L1", fontsize=8)
        ax.set_ylabel("L2", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Toy problem in loss space; grey: Pareto front", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
