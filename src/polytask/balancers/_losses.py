"""Loss weightings (``direction = w(losses) @ J``) and their shared state helpers.

Every method here follows one reference implementation, named in its class docstring, in its
hyperparameter defaults and in its scale convention (e.g. UW's weights are ``1 / (2 exp(s))`` as in
LibMTL, DWA's weights sum to ``K``, RLW's to ``1``).

Conventions of this module (also used by :mod:`._jacobian`):

* :meth:`LossWeighting.weights` is the *per-step entry point*: the engine calls it once per training
  step (through :meth:`~LossWeighting.objective` or :meth:`~Balancer.combine`), and stateful methods
  advance their state there (DWA's epoch averages, FAMO's remembered losses, GO4Align's risk
  probabilities). Calling it twice in one step advances the state twice.
* State lives in buffers. Floating-point state buffers follow the dtype and device of the inputs
  (they are converted on first use) and lazily-shaped buffers start empty; both load from a
  ``state_dict`` into a fresh object with the saved shape and dtype (see :class:`_StateMixin`).
* Randomness comes from torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._base import JacobianAggregator, LossWeighting, register

__all__ = [
    "DWA",
    "FAMO",
    "GLS",
    "GO4Align",
    "IMTLL",
    "RLW",
    "STCH",
    "ExcessMTL",
    "ScaleInvariant",
    "UncertaintyWeighting",
]

# Smallest loss value used where a method divides by or takes the log of a loss (keeps degenerate
# zero losses finite; far below any real loss value).
_LOSS_FLOOR = 1e-20


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
class _StateMixin(nn.Module):
    """Buffers whose dtype, device and (for lazily-shaped ones) shape follow the data.

    ``_adaptive_buffers`` names floating-point state buffers. :meth:`_state` converts such a buffer
    to the dtype and device of the data it is combined with (so float64 inputs keep float64 state).
    Lazily-shaped buffers (e.g. ``[K, P]`` gradient buffers whose ``P`` is only known at the first
    call) are registered as empty tensors; ``numel() == 0`` means "not initialised yet".

    :meth:`_load_from_state_dict` gives each adaptive buffer the shape and dtype stored in the
    ``state_dict`` before loading, so a fresh object resumes exactly where the saved one stopped.
    """

    _adaptive_buffers: ClassVar[tuple[str, ...]] = ()

    def _state(self, name: str, like: Tensor) -> Tensor:
        buf = getattr(self, name)
        if buf.dtype != like.dtype or buf.device != like.device:
            buf = buf.to(dtype=like.dtype, device=like.device)
            setattr(self, name, buf)
        return buf

    def _set_state(self, name: str, value: Tensor) -> None:
        setattr(self, name, value.detach())

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self._adaptive_buffers:
            key = prefix + name
            saved = state_dict.get(key)
            current = self._buffers.get(name)
            if (
                isinstance(saved, Tensor)
                and current is not None
                and (saved.shape != current.shape or saved.dtype != current.dtype)
            ):
                self._buffers[name] = torch.empty(
                    saved.shape, dtype=saved.dtype, device=current.device
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _backward_into(objective: Tensor, params: Iterable[nn.Parameter]) -> None:
    """Accumulate ``d objective / d p`` into ``p.grad`` for the given parameters only.

    Used by balancers whose learnable parameters are trained by an auxiliary objective computed
    inside :meth:`combine` (IMTL's loss scales, GradNorm's weights, a composed loss weighting): the
    gradient lands in ``.grad`` exactly as an ordinary ``backward()`` would put it there, and the
    optimiser that holds ``balancer.parameters()`` steps them.
    """
    params = [p for p in params if p.requires_grad]
    if params and objective.requires_grad:
        torch.autograd.backward(objective, inputs=params)


def _floor(losses: Tensor) -> Tensor:
    """``max(losses, 1e-20)`` whose gradient is 1 everywhere (a straight-through floor), so an
    objective built on floored losses still has the gradient its weights describe."""
    return losses + (_LOSS_FLOOR - losses).clamp(min=0.0).detach()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


class _EpochMixin(_StateMixin):
    """Per-epoch average of the raw task losses, tracked step-wise.

    Reference implementations (LibMTL's DWA and STCH) read ``train_loss_buffer[:, epoch]``: the
    average training loss of each task over a finished epoch. Here every call of
    :meth:`LossWeighting.weights` adds the step's losses to a running sum; an epoch is closed either

    * by calling :meth:`epoch_end` (polytask's trainer calls it on every balancer at the end of
      each epoch), or
    * automatically after ``steps_per_epoch`` steps when that hyperparameter is set.

    :meth:`epoch_end` with no step recorded since the last close is a no-op, so a trainer calling it
    while ``steps_per_epoch`` already closed the epoch does not count an epoch twice.
    """

    def _init_epochs(self, n_tasks: int, steps_per_epoch: int | None) -> None:
        if steps_per_epoch is not None and (
            not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
        ):
            raise ValueError(
                f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}"
            )
        self.steps_per_epoch = steps_per_epoch
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_loss_sum", torch.zeros(n_tasks))

        if steps_per_epoch is not None:  # closing epochs by count reads the counter each step
            self.info = replace(type(self).info, host_syncs=2)

    @property
    def current_epoch(self) -> int:
        """Number of completed epochs (the 0-based index of the running epoch)."""
        return int(self.epoch)

    def _track(self, losses: Tensor) -> None:
        total = self._state("epoch_loss_sum", losses)
        self._set_state("epoch_loss_sum", total + losses)
        self.epoch_steps += 1
        if self.steps_per_epoch is not None and int(self.epoch_steps) >= self.steps_per_epoch:
            self.epoch_end()

    def epoch_end(self) -> None:
        """Close the running epoch: its average losses are handed to :meth:`_on_epoch_end`."""
        count = int(self.epoch_steps)
        if count == 0:
            return
        average = self.epoch_loss_sum / count
        self._on_epoch_end(average)
        self.epoch_loss_sum.zero_()
        self.epoch_steps.zero_()
        self.epoch += 1

    def _on_epoch_end(self, average: Tensor) -> None:
        raise NotImplementedError


def _losses_of(method: nn.Module, losses: Tensor | None) -> Tensor:
    if losses is None:
        raise ValueError(f"{type(method).__name__} needs the task losses: combine(J, losses)")
    return losses


# ------------------------------------------------------------------------------------------------
# uw
# ------------------------------------------------------------------------------------------------
@register(
    "uw",
    paper="Kendall, Gal & Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses for "
    "Scene Geometry and Semantics, CVPR 2018",
    description="Uncertainty weighting: learnable log-variances s, loss sum L/(2e^s) + s/2.",
    learnable=True,
    reference="LibMTL weighting/UW.py",
)
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (UW), in LibMTL's form.

    Paper: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. Reference code: LibMTL ``weighting/UW.py``.

    The balancer owns learnable log-variances ``s`` (``nn.Parameter`` ``log_vars``, initialised to
    ``-0.5`` as in LibMTL). The objective is ``sum_i L_i / (2 exp(s_i)) + s_i / 2``; one ordinary
    backward pass on :meth:`objective` gives the model its gradient ``sum_i w_i grad L_i`` with
    ``w_i = 1 / (2 exp(s_i))`` and ``s`` its gradient ``1/2 - L_i / (2 exp(s_i))``; the optimiser
    must hold ``balancer.parameters()``. :meth:`combine` returns ``w @ J`` and does not touch ``s``.
    """

    def __init__(self, n_tasks: int, init: float = -0.5) -> None:
        super().__init__(n_tasks)
        self.log_vars = nn.Parameter(torch.full((n_tasks,), float(init)))

    def weights(self, losses: Tensor | None) -> Tensor:
        return (0.5 * torch.exp(-self.log_vars)).detach()

    def objective(self, losses: Tensor) -> Tensor:
        s = self.log_vars.to(losses)
        self.last_weights = (0.5 * torch.exp(-s)).detach()
        return (losses * 0.5 * torch.exp(-s) + 0.5 * s).sum()


# ------------------------------------------------------------------------------------------------
# imtl_l
# ------------------------------------------------------------------------------------------------
@register(
    "imtl_l",
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021",
    description="IMTL-L: learnable loss scales s, loss sum e^s L - s (scale-balanced losses).",
    learnable=True,
    reference="LibMTL weighting/IMTL.py (loss part)",
)
class IMTLL(LossWeighting):
    """IMTL-L: learnable loss scales.

    Paper: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021. Reference code: the loss part of LibMTL ``weighting/IMTL.py``.

    Learnable ``s`` (``nn.Parameter`` ``loss_scale``, initialised to 0). The objective is
    ``sum_i exp(s_i) L_i - s_i``: the model gets ``sum_i exp(s_i) grad L_i`` (``w = exp(s)``) and
    ``s`` gets ``exp(s_i) L_i - 1`` whose zero is ``exp(s_i) L_i = 1`` (every scaled loss equal).
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)
        self.loss_scale = nn.Parameter(torch.zeros(n_tasks))

    def weights(self, losses: Tensor | None) -> Tensor:
        return torch.exp(self.loss_scale).detach()

    def objective(self, losses: Tensor) -> Tensor:
        s = self.loss_scale.to(losses)
        self.last_weights = torch.exp(s).detach()
        return (torch.exp(s) * losses - s).sum()


# ------------------------------------------------------------------------------------------------
# dwa
# ------------------------------------------------------------------------------------------------
@register(
    "dwa",
    paper="Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
    description="Dynamic Weight Average: K softmax(r/T), r = ratio of the last two epoch losses.",
    stateful=True,
    reference="LibMTL weighting/DWA.py (from the official mtan code)",
)
class DWA(_EpochMixin, LossWeighting):
    """Dynamic Weight Average (DWA).

    Paper: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
    Reference code: LibMTL ``weighting/DWA.py`` (from the official ``lorenmt/mtan`` code).

    With ``a_e`` the average training loss of each task over epoch ``e``, the weights during epoch
    ``e >= 2`` are ``K softmax((a_{e-1} / a_{e-2}) / T)``; during epochs 0 and 1 they are all 1.

    Step-wise tracking: each step's raw losses are added to a running per-epoch average (see
    :class:`_EpochMixin`). An epoch ends when :meth:`epoch_end` is called (the trainer calls it
    after each epoch) or, with ``steps_per_epoch=n``, after every ``n`` steps. Only the last two
    epoch averages are kept (buffers ``last_avg`` and ``prev_avg``).
    """

    _adaptive_buffers = ("epoch_loss_sum", "last_avg", "prev_avg")

    def __init__(self, n_tasks: int, T: float = 2.0, steps_per_epoch: int | None = None) -> None:
        super().__init__(n_tasks)
        if not T > 0:
            raise ValueError(f"dwa: T must be positive, got {T!r}")
        self.T = float(T)
        self._init_epochs(n_tasks, steps_per_epoch)
        self.register_buffer("last_avg", torch.ones(n_tasks))
        self.register_buffer("prev_avg", torch.ones(n_tasks))

    def weights(self, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses)
        last = self._state("last_avg", losses)
        prev = self._state("prev_avg", losses)
        ratio = last / prev.clamp(min=_LOSS_FLOOR)
        dynamic = self.n_tasks * torch.softmax(ratio / self.T, dim=-1)
        w = torch.where(self.epoch >= 2, dynamic, torch.ones_like(losses))
        self._track(losses)
        return w

    def _on_epoch_end(self, average: Tensor) -> None:
        self._set_state("prev_avg", self._state("last_avg", average).clone())
        self._set_state("last_avg", average.clone())


# ------------------------------------------------------------------------------------------------
# rlw
# ------------------------------------------------------------------------------------------------
@register(
    "rlw",
    paper="Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
    "Multi-Task Learning, TMLR 2022",
    description="Random loss weighting: softmax of standard-normal samples, drawn every step.",
    reference="LibMTL weighting/RLW.py",
)
class RLW(LossWeighting):
    """Random Loss Weighting (RLW).

    Paper: Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022. Reference code: LibMTL ``weighting/RLW.py``.

    Each step draws ``z ~ N(0, I_K)`` with ``torch.randn`` (torch's global CPU RNG) and uses
    ``w = softmax(z)`` (weights sum to 1).
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)

    def weights(self, losses: Tensor | None) -> Tensor:
        w = torch.softmax(torch.randn(self.n_tasks), dim=-1)
        if losses is not None:
            w = w.to(device=losses.device)
        return w


# ------------------------------------------------------------------------------------------------
# gls
# ------------------------------------------------------------------------------------------------
@register(
    "gls",
    paper="Chennupati et al., MultiNet++ ... and Geometric Loss Strategy, CVPR Workshops 2019",
    description="Geometric loss strategy: minimise the geometric mean of the task losses.",
    reference="LibMTL weighting/GLS.py",
)
class GLS(LossWeighting):
    """Geometric Loss Strategy (GLS).

    Paper: Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019. Reference code:
    LibMTL ``weighting/GLS.py``.

    The objective is ``(prod_i L_i)^(1/K)``; its gradient weights are ``w_i = GM / (K L_i)`` with
    ``GM`` the geometric mean (computed in log space; losses are floored at 1e-20 to stay finite).
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)

    def weights(self, losses: Tensor | None) -> Tensor:
        log_l = torch.log(_floor(_losses_of(self, losses)))
        return torch.exp(log_l.mean() - log_l) / self.n_tasks

    def objective(self, losses: Tensor) -> Tensor:
        self.last_weights = self.weights(losses.detach()).detach()
        return torch.exp(torch.log(_floor(losses)).mean())


# ------------------------------------------------------------------------------------------------
# si
# ------------------------------------------------------------------------------------------------
@register(
    "si",
    paper="Scale-invariant baseline (sum of log losses), e.g. Navon et al., Nash-MTL, ICML 2022",
    description="Scale-invariant loss: sum of the log task losses (weights 1/L_i).",
    reference="nash-mtl methods/weight_methods.py ScaleInvariantLinearScalarization",
)
class ScaleInvariant(LossWeighting):
    """Scale-invariant loss ``sum_i log L_i``.

    Used as a baseline in Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022
    (reference code: ``AvivNavon/nash-mtl`` ``ScaleInvariantLinearScalarization``, reused by FAMO
    and GO4Align). Weights ``w_i = 1 / L_i``: multiplying a task's loss (and so its gradient) by a
    positive constant leaves the direction unchanged. Losses are floored at 1e-20.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)

    def weights(self, losses: Tensor | None) -> Tensor:
        return 1.0 / _floor(_losses_of(self, losses))

    def objective(self, losses: Tensor) -> Tensor:
        self.last_weights = self.weights(losses.detach()).detach()
        return torch.log(_floor(losses)).sum()


# ------------------------------------------------------------------------------------------------
# famo
# ------------------------------------------------------------------------------------------------
@register(
    "famo",
    paper="Liu, Feng, Stone & Liu, FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023",
    description="FAMO: softmax task logits, updated by Adam from each step's log-loss decrease.",
    stateful=True,
    protocol=("loss_after_step",),
    reference="Cranial-XIX/FAMO famo.py",
)
class FAMO(_StateMixin, LossWeighting):
    """Fast Adaptive Multitask Optimization (FAMO).

    Paper: Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.
    Reference code: ``Cranial-XIX/FAMO`` ``famo.py`` (defaults ``gamma=0.01``, ``w_lr=0.025``;
    LibMTL's port uses ``gamma=1e-3``).

    With task logits ``xi`` (buffer ``logits``, initialised to 0), ``z = softmax(xi)`` and
    ``D_i = L_i - min_i + 1e-8``, the objective is ``sum_i z_i log D_i / c`` with
    ``c = sum_i z_i / D_i`` (detached), i.e. weights ``w_i = z_i / (c D_i)`` (they sum to 1).

    After the optimiser step the trainer re-evaluates the losses and calls :meth:`after_step`
    (``protocol=("loss_after_step",)``): with ``delta = log D(previous) - log D(new)`` the logits
    take one Adam step (``lr=w_lr``, L2 weight decay ``gamma``, betas (0.9, 0.999), eps 1e-8, as
    ``torch.optim.Adam``) along ``d = J_softmax(xi)^T delta``. The logits and Adam moments are
    buffers (not parameters: FAMO updates them itself, the model's optimiser must not). The
    reference's ``max_norm`` gradient clipping belongs to the trainer and is not part of this class.
    """

    _adaptive_buffers = ("logits", "min_losses", "prev_losses", "adam_m", "adam_v")

    def __init__(self, n_tasks: int, gamma: float = 0.01, w_lr: float = 0.025) -> None:
        super().__init__(n_tasks)
        self.gamma = float(gamma)
        self.w_lr = float(w_lr)
        self.betas = (0.9, 0.999)
        self.adam_eps = 1e-8
        self.register_buffer("logits", torch.zeros(n_tasks))
        self.register_buffer("min_losses", torch.zeros(n_tasks))
        self.register_buffer("prev_losses", torch.zeros(n_tasks))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("adam_m", torch.zeros(n_tasks))
        self.register_buffer("adam_v", torch.zeros(n_tasks))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    def set_min_losses(self, losses: Tensor) -> None:
        """Set the per-task lower bounds of the losses (default 0), as the reference allows."""
        self._set_state("min_losses", torch.as_tensor(losses).to(self.min_losses).clone())

    def _gap(self, losses: Tensor) -> Tensor:
        return (losses - self._state("min_losses", losses)).clamp(min=0.0) + 1e-8

    def weights(self, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses)
        z = torch.softmax(self._state("logits", losses), dim=-1)
        inv = z / self._gap(losses)
        self._set_state("prev_losses", losses.clone())
        self.has_prev.fill_(True)
        return inv / inv.sum()

    def objective(self, losses: Tensor) -> Tensor:
        w = self.weights(losses.detach())
        self.last_weights = w.detach()
        z = torch.softmax(self.logits, dim=-1).to(losses)
        gap = self._gap(losses)
        c = (z / gap.detach()).sum()
        return (torch.log(gap) * z / c).sum()

    @torch.no_grad()
    def after_step(self, losses: Tensor) -> None:
        """Update the logits from the losses re-evaluated after the optimiser step."""
        if not bool(self.has_prev):
            raise RuntimeError("famo: after_step() called before any weights()/combine() call")
        new = torch.as_tensor(losses).to(self.prev_losses).detach()
        if new.shape != (self.n_tasks,):
            raise ValueError(
                f"famo: losses must have shape [{self.n_tasks}], got {tuple(new.shape)}"
            )
        logits = self._state("logits", new)
        delta = torch.log(self._gap(self.prev_losses)) - torch.log(self._gap(new))
        z = torch.softmax(logits, dim=-1)
        grad = z * (delta - (z * delta).sum())  # J_softmax^T delta
        grad = grad + self.gamma * logits  # Adam's (L2) weight decay
        b1, b2 = self.betas
        self.adam_step += 1
        t = int(self.adam_step)
        m = b1 * self._state("adam_m", new) + (1 - b1) * grad
        v = b2 * self._state("adam_v", new) + (1 - b2) * grad * grad
        denom = v.sqrt() / math.sqrt(1 - b2**t) + self.adam_eps
        self._set_state("adam_m", m)
        self._set_state("adam_v", v)
        self._set_state("logits", logits - (self.w_lr / (1 - b1**t)) * m / denom)


# ------------------------------------------------------------------------------------------------
# stch
# ------------------------------------------------------------------------------------------------
@register(
    "stch",
    paper="Lin et al., Smooth Tchebycheff Scalarization for Multi-Objective Optimization, "
    "ICML 2024",
    description="Smooth Tchebycheff scalarisation of nadir-normalised log losses after a warm-up.",
    stateful=True,
    reference="Xi-L/STCH STCH_MTL/LibMTL/weighting/STCH.py",
)
class STCH(_EpochMixin, LossWeighting):
    """Smooth Tchebycheff scalarisation (STCH) for multi-task learning.

    Paper: Lin, Zhang, Zhang, Liu, Zhang & Zhang, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024. Reference code: ``Xi-L/STCH``
    ``STCH_MTL/LibMTL/weighting/STCH.py`` (defaults ``mu=1.0``, ``warmup_epoch=4``).

    * epochs ``e < warmup_epoch``: objective ``sum_i log(L_i + 1e-20)`` (weights ``1/(L_i+1e-20)``);
    * epoch ``e == warmup_epoch``: the same, and the epoch's average losses become the nadir
      vector ``n`` when the epoch closes;
    * epochs ``e > warmup_epoch``: with ``l_i = log(L_i / n_i + 1e-20)``, the objective is
      ``K mu log sum_i exp((l_i - max_j l_j) / mu)`` (the max is a detached shift), i.e. weights
      ``w_i = K softmax(l / mu)_i / (L_i + 1e-20 n_i)``.

    Epochs are tracked step-wise as in :class:`DWA` (``epoch_end()`` hook or ``steps_per_epoch``).
    """

    _adaptive_buffers = ("epoch_loss_sum", "nadir")

    def __init__(
        self,
        n_tasks: int,
        mu: float = 1.0,
        warmup_epoch: int = 4,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__(n_tasks)
        if not mu > 0:
            raise ValueError(f"stch: mu must be positive, got {mu!r}")
        if warmup_epoch < 0:
            raise ValueError(f"stch: warmup_epoch must be >= 0, got {warmup_epoch!r}")
        self.mu = float(mu)
        self.warmup_epoch = int(warmup_epoch)
        self._init_epochs(n_tasks, steps_per_epoch)
        self.register_buffer("nadir", torch.ones(n_tasks))

    def _smooth(self) -> Tensor:
        """Whether this step is in the smooth phase (a bool tensor: no host read)."""
        return self.epoch > self.warmup_epoch

    def _log_terms(self, losses: Tensor) -> Tensor:
        return torch.log(_floor(losses) / self._state("nadir", losses) + 1e-20)

    def weights(self, losses: Tensor | None) -> Tensor:
        losses = _losses_of(self, losses)
        nadir = self._state("nadir", losses)
        soft = torch.softmax(self._log_terms(losses) / self.mu, dim=-1)
        smooth_w = self.n_tasks * soft / (_floor(losses) + 1e-20 * nadir)
        w = torch.where(self._smooth(), smooth_w, 1.0 / (losses + 1e-20))
        self._track(losses)
        return w

    def objective(self, losses: Tensor) -> Tensor:
        smooth = self._smooth()  # the phase of this step (weights() may close the epoch)
        self.last_weights = self.weights(losses.detach()).detach()
        warm = torch.log(losses + 1e-20).sum()
        terms = self._log_terms(losses)
        shifted = (terms - terms.detach().max()) / self.mu
        tcheby = self.mu * torch.log(torch.exp(shifted).sum()) * self.n_tasks
        return torch.where(smooth, tcheby, warm)

    def _on_epoch_end(self, average: Tensor) -> None:
        if self.current_epoch == self.warmup_epoch:
            self._set_state("nadir", average.clamp(min=_LOSS_FLOOR).clone())


# ------------------------------------------------------------------------------------------------
# go4align
# ------------------------------------------------------------------------------------------------
def _kmeans_1d(values: list[float], n_groups: int) -> list[int]:
    """Exact 1-D k-means: the optimal partition of ``values`` into ``n_groups`` clusters.

    In one dimension the optimal clusters are contiguous in sorted order, so dynamic programming
    over split points finds the global optimum (deterministically; ties keep the earliest split).
    Returns the cluster index of each value.
    """
    n = len(values)
    g = min(n_groups, n)
    order = sorted(range(n), key=lambda i: values[i])
    xs = [values[i] for i in order]
    pre = [0.0]
    pre2 = [0.0]
    for x in xs:
        pre.append(pre[-1] + x)
        pre2.append(pre2[-1] + x * x)

    def sse(a: int, b: int) -> float:  # cost of xs[a:b]
        s = pre[b] - pre[a]
        return max(pre2[b] - pre2[a] - s * s / (b - a), 0.0)

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(g + 1)]
    split = [[0] * (n + 1) for _ in range(g + 1)]
    cost[0][0] = 0.0
    for k in range(1, g + 1):
        for b in range(k, n + 1):
            for a in range(k - 1, b):
                c = cost[k - 1][a] + sse(a, b)
                if c < cost[k][b]:
                    cost[k][b] = c
                    split[k][b] = a
    labels = [0] * n
    b = n
    for k in range(g, 0, -1):
        a = split[k][b]
        for pos in range(a, b):
            labels[order[pos]] = k - 1
        b = a
    return labels


@register(
    "go4align",
    paper="Shen et al., GO4Align: Group Optimization for Multi-Task Alignment, NeurIPS 2024",
    description="Adaptive group risk minimisation: risk-guided indicators averaged per task group.",
    stateful=True,
    reference="autumn9999/GO4Align methods/cluster_methods.py GO4ALIGN",
)
class GO4Align(_StateMixin, LossWeighting):
    """GO4Align: adaptive group risk minimisation.

    Paper: Shen, Wang, Xiao, van Noord & Worring, "GO4Align: Group Optimization for Multi-Task
    Alignment", NeurIPS 2024. Reference code: ``autumn9999/GO4Align``
    ``methods/cluster_methods.py`` class ``GO4ALIGN`` (defaults from its NYUv2 trainer:
    ``num_groups=1``, ``robust_step_size=1e-4``).

    Each step: ``scale_i = sum_j L_j / L_i``; the risk probabilities ``p`` (buffer, initially
    ``1/K``) become ``p_i exp(-eta L_i)`` renormalised to sum 1; the indicators are
    ``a_i = scale_i p_i``. With ``num_groups == 1`` every weight is ``mean(a)``; with
    ``num_groups >= 2`` the indicators are clustered and each task gets its cluster's mean.

    Deviation: the reference clusters with randomly initialised Lloyd k-means (``kmeans_pytorch``,
    numpy RNG); here the 1-D clustering is solved exactly and deterministically (same objective,
    its global optimum). Losses are floored at 1e-20 to keep ``scale`` finite.
    """

    _adaptive_buffers = ("probs",)

    def __init__(self, n_tasks: int, num_groups: int = 1, robust_step_size: float = 1e-4) -> None:
        super().__init__(n_tasks)
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"go4align: num_groups must be a positive int, got {num_groups!r}")
        self.num_groups = num_groups
        if num_groups > 1 and n_tasks > 1:  # the 1-D clustering runs on the host
            self.info = replace(type(self).info, host_syncs=1)
        self.robust_step_size = float(robust_step_size)
        self.register_buffer("probs", torch.full((n_tasks,), 1.0 / n_tasks))

    def weights(self, losses: Tensor | None) -> Tensor:
        losses = _floor(_losses_of(self, losses))
        scale = losses.sum() / losses
        # p <- p exp(-eta L) / sum(...), done in log space so huge losses cannot give 0 / 0
        probs = torch.softmax(
            torch.log(self._state("probs", losses)) - self.robust_step_size * losses, dim=-1
        )
        self._set_state("probs", probs)
        indicators = scale * probs
        if self.num_groups == 1 or self.n_tasks == 1:
            return indicators.mean().expand(self.n_tasks).clone()
        labels = torch.tensor(
            _kmeans_1d(indicators.detach().cpu().tolist(), self.num_groups), device=losses.device
        )
        n_groups = int(labels.max()) + 1
        sums = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device)
        sums = sums.index_add(0, labels, indicators)
        counts = torch.bincount(labels, minlength=n_groups).to(losses.dtype)
        return (sums / counts)[labels]


# ------------------------------------------------------------------------------------------------
# excess_mtl
# ------------------------------------------------------------------------------------------------
@register(
    "excess_mtl",
    paper="He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024",
    description="ExcessMTL: exponentiated-gradient weights from AdaGrad-style excess risks.",
    stateful=True,
    modes=("params",),
    reference="torchjd 0.18 aggregation.ExcessMTL",
)
class ExcessMTL(_StateMixin, JacobianAggregator):
    """ExcessMTL, following torchjd 0.18 ``ExcessMTL`` (weights on the simplex).

    Paper: He, Zhou, Zhao & Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024.
    Reference code: torchjd 0.18 ``aggregation/_excess_mtl.py`` (adapted there from the official
    ``uiuctml/ExcessMTL`` code and LibMTL).

    Per call, ``S += J**2`` (buffer ``sq_grad_sum`` ``[K, P]``), the excess-risk proxy is
    ``r_i = sum_p J_ip^2 / sqrt(S_ip + 1e-7)``; during the first ``n_warmup_steps`` calls the
    weights stay ``1/K`` and ``r`` is averaged into the baseline. Afterwards ``r`` is divided by the
    baseline ``r0 + 1e-7`` (with ``n_warmup_steps=0`` the first call's ``r`` is the baseline and is
    used raw), and ``w <- softmax(log w + robust_step_size * r)``. Direction ``w @ J``.
    Needs the Jacobian (lives with the loss weightings because it weights tasks). Parameter mode
    only: its ``[K, P]`` accumulator needs the same ``P`` coordinates at every step, which
    representation gradients (batch-sized) do not have.
    """

    _adaptive_buffers = ("task_weights", "sq_grad_sum", "initial_risk", "warmup_risk_sum")

    def __init__(
        self, n_tasks: int, robust_step_size: float = 1.0, n_warmup_steps: int = 0
    ) -> None:
        super().__init__(n_tasks)
        if not robust_step_size > 0:
            raise ValueError(
                f"excess_mtl: robust_step_size must be positive, got {robust_step_size!r}"
            )
        if n_warmup_steps < 0:
            raise ValueError(f"excess_mtl: n_warmup_steps must be >= 0, got {n_warmup_steps!r}")
        self.robust_step_size = float(robust_step_size)
        self.n_warmup_steps = int(n_warmup_steps)
        self.register_buffer("task_weights", torch.full((n_tasks,), 1.0 / n_tasks))
        self.register_buffer("sq_grad_sum", torch.zeros(0))
        self.register_buffer("initial_risk", torch.zeros(n_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self.register_buffer("warmup_risk_sum", torch.zeros(n_tasks))
        self.register_buffer("n_steps", torch.zeros((), dtype=torch.long))

    def _combine(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        sq = jacobian.detach() ** 2
        total = self._state("sq_grad_sum", jacobian)
        if total.numel() == 0:
            total = torch.zeros_like(sq)
        elif total.shape != sq.shape:
            raise ValueError(
                f"excess_mtl: jacobian shape {tuple(sq.shape)} differs from the shape "
                f"{tuple(total.shape)} of the accumulated squared gradients"
            )
        total = total + sq
        self._set_state("sq_grad_sum", total)
        risk = (sq / torch.sqrt(total + 1e-7)).sum(dim=1)
        w = self._state("task_weights", jacobian)
        # Phases as tensor masks (no host read): warm-up, first step after it, later steps.
        warmup = self.n_steps < self.n_warmup_steps
        first = ~warmup & ~self.has_initial
        self.n_steps += 1
        risk_sum = self._state("warmup_risk_sum", risk)
        risk_sum = torch.where(warmup, risk_sum + risk, risk_sum)
        self._set_state("warmup_risk_sum", risk_sum)
        if self.n_warmup_steps > 0:
            base = risk_sum / self.n_warmup_steps
            initial = torch.where(first, base, self._state("initial_risk", risk))
            scaled = risk / (initial + 1e-7)
        else:  # the first step's risk is the baseline and is used raw
            initial = torch.where(first, risk, self._state("initial_risk", risk))
            scaled = torch.where(first, risk, risk / (initial + 1e-7))
        self._set_state("initial_risk", initial.clone())
        self.has_initial.logical_or_(~warmup)
        w_new = torch.softmax(torch.log(w) + self.robust_step_size * scaled, dim=0)
        w = torch.where(warmup, w, w_new)
        self._set_state("task_weights", w)
        self.last_weights = w.detach().clone()
        return w @ jacobian
