"""Training strategies: procedures around the optimiser step that a balancer cannot express.

A balancer maps the task gradients of one step to an update. A *strategy* needs more: other
batches, other parameter values, its own optimiser. Auto-Lambda (Liu et al., TMLR 2022) learns
the task weights by a bilevel step: it takes a virtual SGD step on the weighted training loss,
evaluates the primary tasks' loss on a second ("meta") batch at the virtual parameters, and
moves the weights along the hypergradient. The model's own update then uses those weights,
alone or followed by a gradient method (``auto_lambda`` weighting, then ``pcgrad``, as the
reference code allows).

Strategies have capability records like the balancers (:class:`StrategyInfo`); the trainer serves
``info.protocol`` (``"meta_batch"``: one extra batch per step, drawn from a second pass over the
training data unless another loader is given) and never branches on a strategy's name.

Use from a custom loop (``loss_fn(forward, batch)`` evaluates the task losses with ``forward``
standing for the model, so the strategy can evaluate it at other parameter values):

>>> import torch, polytask, polytask.strategies
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Linear(3, 2)
>>> def loss_fn(forward, batch):
...     out = forward(batch["x"])
...     return ((out - batch["y"]) ** 2).mean(0)  # two tasks: one output each
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> autol = polytask.strategies.create("auto_lambda", n_tasks=2, lr=0.01)
>>> step_balancer = autol.wrap(polytask.balancers.create("sum", 2))
>>> batch = {"x": torch.randn(8, 3), "y": torch.randn(8, 2)}
>>> meta = {"x": torch.randn(8, 3), "y": torch.randn(8, 2)}
>>> _ = autol.meta_step(model, loss_fn, batch, meta, opt)        # updates the task weights
>>> opt.zero_grad()
>>> losses = loss_fn(model, batch)
>>> _ = polytask.mtl_backward(losses, shared_params=model.parameters(), balancer=step_balancer)
>>> opt.step()
>>> autol.task_weights.shape
torch.Size([2])
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .balancers import Balancer, BalancerInfo, LossWeighting, compose

__all__ = [
    "AutoLambda",
    "Strategy",
    "StrategyInfo",
    "available",
    "create",
    "info",
    "register",
]

LossFn = Callable[[Callable[..., Any], Any], Tensor]


@dataclass(frozen=True)
class StrategyInfo:
    """Capability record of a registered training strategy (read by the trainer).

    Attributes:
        name: canonical lower-case name.
        paper: short citation.
        description: one line for ``polytask list``.
        protocol: what the strategy needs each step: ``"meta_batch"`` (one more batch of the same
            tasks, passed to :meth:`Strategy.before_step` as ``meta_batch``).
        hparams: default hyperparameters (from the constructor signature).
        reference: the reference implementation followed.
    """

    name: str
    cls: type[Strategy]
    paper: str
    description: str
    protocol: tuple[str, ...] = ()
    hparams: dict[str, Any] = field(default_factory=dict)
    reference: str = ""


_REGISTRY: dict[str, StrategyInfo] = {}


def register(
    name: str, *, paper: str, description: str, protocol: tuple[str, ...] = (), reference: str = ""
) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator adding a strategy to the registry under ``name``."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if not params or params[0].name != "n_tasks":
            raise TypeError(f"{cls.__name__}.__init__ must take n_tasks as its first argument")
        hparams = {p.name: p.default for p in params[1:]}
        cls.info = StrategyInfo(name, cls, paper, description, tuple(protocol), hparams, reference)
        _REGISTRY[name] = cls.info
        return cls

    return deco


def available() -> list[str]:
    """Sorted names of the registered strategies."""
    return sorted(_REGISTRY)


def info(name: str) -> StrategyInfo:
    """The capability record of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; available: {', '.join(available())}") from None


def create(name: str, n_tasks: int, **hparams: Any) -> Strategy:
    """Instantiate the strategy ``name`` for ``n_tasks`` tasks (unknown hyperparameters are
    errors)."""
    rec = info(name)
    unknown = sorted(set(hparams) - set(rec.hparams))
    if unknown:
        raise TypeError(
            f"strategy {name!r} has no hyperparameter(s) {unknown}; "
            f"it accepts {sorted(rec.hparams)}"
        )
    return rec.cls(n_tasks, **hparams)


class Strategy(nn.Module):
    """Base class: a per-step procedure run before the model's update, with its own state.

    ``state_dict`` holds everything needed to resume exactly (the trainer checkpoints it).
    """

    info: ClassVar[StrategyInfo]

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        self.n_tasks = n_tasks

    def wrap(self, balancer: Balancer) -> Balancer:
        """The balancer the model's update uses under this strategy (default: ``balancer``)."""
        return balancer

    def before_step(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        meta_batch: Any | None,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Tensor]:
        """Run before the model's update of each step; returns values to log."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Auto-Lambda
# ------------------------------------------------------------------------------------------------
_AUTOL_PAPER = (
    "Liu, Liang, Gupta, Dai & Davison, Auto-Lambda: Disentangling Dynamic Task Relationships, "
    "TMLR 2022"
)


class _MetaWeights(LossWeighting):
    """The strategy's current task weights as a loss weighting (``w = lambda``, detached).

    It holds a reference to the strategy, not the weights themselves, so ``parameters()`` is
    empty: the meta-weights are trained by the strategy's own optimiser, never by the model's.
    """

    def __init__(self, strategy: AutoLambda) -> None:
        super().__init__(strategy.n_tasks)
        self._strategy = (strategy,)  # a tuple: not registered as a submodule
        self.info = BalancerInfo(
            name="auto_lambda",
            cls=_MetaWeights,
            needs="losses",
            paper=_AUTOL_PAPER,
            description="Auto-Lambda's meta-learned task weights.",
            stateful=True,
            reference="lorenmt/auto-lambda",
        )

    def weights(self, losses: Tensor | None) -> Tensor:
        w = self._strategy[0].task_weights
        return w if losses is None else w.to(losses)


class _MetaScaled(LossWeighting):
    """A loss weighting applied to the Auto-Lambda-weighted losses ``lambda_i L_i``.

    Objective ``base.objective(lambda * L)`` (one ordinary backward pass), weights
    ``lambda * base.weights(lambda * L)``. Hooks (``after_step``, ``epoch_end``) go to the base
    with the same scaling.
    """

    def __init__(self, meta: _MetaWeights, base: LossWeighting) -> None:
        super().__init__(base.n_tasks)
        self.meta = meta
        self.base = base
        rec = getattr(base, "info", None)
        self.info = replace(
            rec if rec is not None else meta.info,
            name=f"auto_lambda+{getattr(rec, 'name', type(base).__name__)}",
            paper=f"{_AUTOL_PAPER}; {getattr(rec, 'paper', '')}",
            stateful=True,
        )

    def _lambda(self, like: Tensor) -> Tensor:
        return self.meta.weights(None).to(like)

    def weights(self, losses: Tensor | None) -> Tensor:
        if losses is None:
            lam = self.meta.weights(None)
            return lam * self.base.weights(None).to(lam)
        lam = self._lambda(losses)
        return lam * self.base.weights(lam * losses).to(losses)

    def objective(self, losses: Tensor) -> Tensor:
        lam = self._lambda(losses)
        out = self.base.objective(lam * losses)
        self.last_weights = lam * self.base.last_weights.to(lam)
        return out

    def after_step(self, losses: Tensor) -> None:
        self.base.after_step(self._lambda(losses) * losses)

    def epoch_end(self) -> None:
        self.base.epoch_end()


@register(
    "auto_lambda",
    paper=_AUTOL_PAPER,
    description="Bilevel task weights: a virtual step, the meta batch's loss, a finite-difference "
    "hypergradient.",
    protocol=("meta_batch",),
    reference="lorenmt/auto-lambda auto_lambda.py and trainer_dense.py",
)
class AutoLambda(Strategy):
    """Auto-Lambda: meta-learned task weights (a training strategy, not a balancer).

    Paper: S. Liu, Y. Liang, A. Gupta, J. Dai & A. J. Davison (Liu et al.), "Auto-Lambda:
    Disentangling Dynamic Task Relationships", TMLR 2022. Reference code: ``lorenmt/auto-lambda``
    ``auto_lambda.py`` and ``trainer_dense.py`` (defaults ``autol_init=0.1``, ``autol_lr=1e-4``,
    Adam on the weights; the "validation" batch is a batch of the *training* set drawn in another
    order, which is what the trainer gives by default).

    Each step, before the model's update (:meth:`meta_step`, with ``lambda`` the task weights):

    1. virtual step ``theta' = theta - alpha (m + grad_theta sum_i lambda_i L_i(batch) + wd theta)``
       with each parameter's learning rate ``alpha``, weight decay ``wd`` and, for SGD, its
       momentum term ``m = momentum * buffer`` (as the reference);
    2. ``v = grad_theta' sum_{i primary} L_i(meta_batch; theta')``;
    3. hypergradient by central finite differences along ``u = alpha v``:
       ``grad_lambda = -(L(batch; theta + eps u) - L(batch; theta - eps u)) / (2 eps)`` with
       ``eps = fd_scale / ||u||`` (so the perturbation has norm ``fd_scale = 0.01``, the
       reference's); with one learning rate this is exactly the reference's
       ``-alpha (dL(theta+) - dL(theta-)) / (2 eps)``;
    4. one step of the strategy's Adam (``lr``) on ``lambda``.

    The model's update then uses :meth:`wrap`: the losses weighted by ``lambda`` (a loss
    weighting ``b`` becomes ``b`` applied to ``lambda_i L_i``, one backward pass; a gradient method
    ``g`` becomes ``compose(lambda, g)``, e.g. Auto-Lambda + PCGrad as in the reference's
    ``--grad_method``).

    Deviations: the model's parameters are never modified in place (the virtual and perturbed
    parameters are evaluated with :func:`torch.func.functional_call`), and its buffers (batch-norm
    statistics) are restored after the meta step, so the meta step changes nothing but
    ``lambda``; the reference perturbs and restores the parameters arithmetically (not exactly)
    and lets the three extra forward passes update the batch-norm statistics.

    Args:
        init: initial value of every task weight.
        lr: Adam learning rate of the weights.
        primary: indices of the primary tasks whose meta-batch loss is minimised (default: all,
            the multi-task setting; a subset gives the auxiliary-learning setting).
        fd_scale: norm of the finite-difference perturbation.
    """

    def __init__(
        self,
        n_tasks: int,
        init: float = 0.1,
        lr: float = 1e-4,
        primary: Sequence[int] | None = None,
        fd_scale: float = 0.01,
    ) -> None:
        super().__init__(n_tasks)
        if not lr > 0:
            raise ValueError(f"auto_lambda: lr must be positive, got {lr!r}")
        if not fd_scale > 0:
            raise ValueError(f"auto_lambda: fd_scale must be positive, got {fd_scale!r}")
        mask = torch.zeros(n_tasks)
        idx = list(range(n_tasks)) if primary is None else [int(i) for i in primary]
        if not idx or any(not 0 <= i < n_tasks for i in idx):
            raise ValueError(f"auto_lambda: primary must be task indices in [0, {n_tasks}), got "
                             f"{primary!r}")
        mask[idx] = 1.0
        self.meta_weights = nn.Parameter(torch.full((n_tasks,), float(init)))
        self.register_buffer("primary", mask)
        self.lr = float(lr)
        self.fd_scale = float(fd_scale)
        self.meta_optimizer = torch.optim.Adam([self.meta_weights], lr=self.lr)

    @property
    def task_weights(self) -> Tensor:
        """The current task weights ``lambda`` (detached)."""
        return self.meta_weights.detach()

    # -- balancer side ----------------------------------------------------------------------------
    def wrap(self, balancer: Balancer) -> Balancer:
        """``balancer`` applied to the ``lambda``-weighted task losses (see the class doc)."""
        if balancer.n_tasks != self.n_tasks:
            raise ValueError(
                f"auto_lambda: balancer has {balancer.n_tasks} tasks, the strategy {self.n_tasks}"
            )
        meta = _MetaWeights(self)
        if isinstance(balancer, LossWeighting):
            return _MetaScaled(meta, balancer)
        return compose(meta, balancer)

    # -- the meta step ----------------------------------------------------------------------------
    def before_step(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        meta_batch: Any | None,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Tensor]:
        if meta_batch is None:
            raise ValueError("auto_lambda needs a meta batch every step (protocol 'meta_batch')")
        return {"meta_loss": self.meta_step(model, loss_fn, batch, meta_batch, optimizer)}

    def meta_step(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        meta_batch: Any,
        optimizer: torch.optim.Optimizer,
    ) -> Tensor:
        """Update the task weights from one training batch and one meta batch.

        Args:
            model: the multi-task model (its parameters and buffers are left unchanged).
            loss_fn: ``loss_fn(forward, batch) -> [K]`` task losses, where ``forward`` is called
                like the model (it is the model itself, or the model at other parameter values).
            batch: the training batch of this step.
            meta_batch: another batch (the reference draws it from the training set).
            optimizer: the model's optimiser (its learning rates, momentum buffers and weight
                decay define the virtual step).

        Returns:
            the primary tasks' meta-batch loss at the virtual parameters (detached).
        """
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("auto_lambda: the model has no parameter requiring grad")
        names = [n for n, _ in named]
        params = [p for _, p in named]
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in named if id(p) not in groups]
        if missing:
            raise ValueError(f"auto_lambda: parameters {missing[:3]} are not in the optimizer")
        saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        lam = self.meta_weights.detach()

        def forward_at(values: Sequence[Tensor]) -> Callable[..., Any]:
            mapping = dict(zip(names, values, strict=True))
            return lambda *args, **kwargs: torch.func.functional_call(model, mapping, args, kwargs)

        # 1) virtual step theta' = theta - alpha (m + g + wd theta)
        losses = self._check_losses(loss_fn(model, batch), "the training batch")
        grads = torch.autograd.grad((lam.to(losses) * losses).sum(), params, allow_unused=True)
        alphas: list[float] = []
        virtual: list[Tensor] = []
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                group = groups[id(p)]
                step = torch.zeros_like(p) if g is None else g.detach().clone()
                momentum = group.get("momentum", 0.0) or 0.0
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if momentum and buf is not None:
                    step = step + momentum * buf
                if group.get("weight_decay", 0.0):
                    step = step + group["weight_decay"] * p
                alpha = float(group["lr"])
                alphas.append(alpha)
                virtual.append((p - alpha * step).requires_grad_(True))

        # 2) primary tasks' loss on the meta batch at theta'
        meta_losses = self._check_losses(loss_fn(forward_at(virtual), meta_batch), "the meta batch")
        meta_loss = (self.primary.to(meta_losses) * meta_losses).sum()
        v = torch.autograd.grad(meta_loss, virtual, allow_unused=True)

        # 3) finite-difference hypergradient along u = alpha v
        with torch.no_grad():
            u = [
                torch.zeros_like(p) if d is None else a * d
                for p, d, a in zip(params, v, alphas, strict=True)
            ]
            norm = torch.sqrt(sum((x.double() ** 2).sum() for x in u))
            eps = self.fd_scale / norm.clamp_min(torch.finfo(torch.float64).tiny)
            plus = [p + (eps * x).to(p.dtype) for p, x in zip(params, u, strict=True)]
            minus = [p - (eps * x).to(p.dtype) for p, x in zip(params, u, strict=True)]
            l_plus = self._check_losses(loss_fn(forward_at(plus), batch), "the training batch")
            l_minus = self._check_losses(loss_fn(forward_at(minus), batch), "the training batch")
            hyper = -(l_plus.double() - l_minus.double()) / (2.0 * eps)
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])

        # 4) Adam step on lambda
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_weights.grad = hyper.to(self.meta_weights)
        self.meta_optimizer.step()
        return meta_loss.detach()

    def _check_losses(self, losses: Tensor, what: str) -> Tensor:
        if not isinstance(losses, Tensor) or losses.shape != (self.n_tasks,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"auto_lambda: loss_fn must return [{self.n_tasks}] task losses for {what}, "
                f"got {shape}"
            )
        return losses

    # -- state ------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        # a copy: the optimiser updates its moments in place
        return {"meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict())}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])

    def _apply(self, fn: Any, recurse: bool = True) -> AutoLambda:
        super()._apply(fn, recurse)
        # keep the optimiser's moments on the weights' device and dtype
        for st in self.meta_optimizer.state.values():
            for k, t in list(st.items()):
                if isinstance(t, Tensor) and k != "step":
                    st[k] = t.to(self.meta_weights.device)
        return self

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, lr={self.lr}"
