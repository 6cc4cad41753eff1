"""Auto-Lambda (polytask.strategies) and the trainer serving protocol needs from the records:
extra batches (MoDo, SDMGrad), meta batches (Auto-Lambda), losses after the step (FAMO)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import polytask
import polytask.strategies as S
from polytask import balancers as B
from polytask.tasks import Task, TaskSet
from polytask.trainer import Trainer, TrainerConfig

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Auto-Lambda's meta step against the exact hypergradient
# ------------------------------------------------------------------------------------------------
def _linear_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g, dtype=F64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=F64))
    batch = {"x": torch.randn(10, 4, generator=g, dtype=F64),
             "y": torch.randn(10, 3, generator=g, dtype=F64)}
    meta = {"x": torch.randn(10, 4, generator=g, dtype=F64),
            "y": torch.randn(10, 3, generator=g, dtype=F64)}
    return model, batch, meta


def loss_fn(forward, batch):
    """Three regression tasks, one output each (quadratic in the parameters)."""
    return ((forward(batch["x"]) - batch["y"]) ** 2).mean(0)


def _exact_hypergradient(model, batch, meta, lam, opt, primary):
    """d/dlambda sum_primary L(meta; theta - alpha (m + grad sum lambda L(batch) + wd theta))."""
    lam = lam.clone().requires_grad_(True)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    losses = loss_fn(model, batch)
    grads = torch.autograd.grad((lam * losses).sum(), params, create_graph=True)
    group = opt.param_groups[0]
    virtual = {}
    for n, p, g in zip(names, params, grads, strict=True):
        step = g + group["weight_decay"] * p.detach()
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            step = step + group["momentum"] * buf
        virtual[n] = p.detach() - group["lr"] * step
    out = torch.func.functional_call(model, virtual, (meta["x"],))
    val = ((out - meta["y"]) ** 2).mean(0)
    (hyper,) = torch.autograd.grad((primary * val).sum(), lam)
    return hyper


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-2)])
@pytest.mark.parametrize("primary", [None, [0, 2]])
def test_meta_step_hypergradient_matches_second_order_autograd(momentum, weight_decay, primary):
    model, batch, meta = _linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum,
                          weight_decay=weight_decay)
    # one real step first so that SGD's momentum buffers exist
    opt.zero_grad()
    loss_fn(model, batch).sum().backward()
    opt.step()
    autol = S.create("auto_lambda", 3, primary=primary, init=0.3).double()
    autol.meta_weights.data.copy_(torch.tensor([0.3, 0.7, 1.1], dtype=F64))
    mask = torch.tensor([1.0, 1.0, 1.0] if primary is None else [1.0, 0.0, 1.0], dtype=F64)
    expected = _exact_hypergradient(model, batch, meta, autol.meta_weights.detach(), opt, mask)
    before = [p.detach().clone() for p in model.parameters()]
    seen = {}
    autol.meta_optimizer.step = lambda: seen.setdefault("grad", autol.meta_weights.grad.clone())
    autol.meta_step(model, loss_fn, batch, meta, opt)
    # the losses are quadratic in the parameters: central differences are exact up to rounding
    torch.testing.assert_close(seen["grad"], expected, rtol=1e-6, atol=1e-10)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)  # the model is not modified


def test_meta_step_moves_weights_against_the_hypergradient_with_adam():
    model, batch, meta = _linear_problem(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    autol = S.create("auto_lambda", 3, lr=0.01).double()
    mask = torch.ones(3, dtype=F64)
    hyper = _exact_hypergradient(model, batch, meta, autol.task_weights, opt, mask)
    before = autol.task_weights.clone()
    autol.meta_step(model, loss_fn, batch, meta, opt)
    # Adam's first step moves every coordinate by lr against the sign of its gradient
    torch.testing.assert_close(autol.task_weights, before - 0.01 * hyper.sign(), rtol=0, atol=1e-9)


def test_meta_step_restores_buffers_and_checks_losses():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    _, batch, meta = _linear_problem(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    autol = S.create("auto_lambda", 3).double()
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    autol.meta_step(net, loss_fn, batch, meta, opt)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    with pytest.raises(ValueError, match=r"\[3\] task losses"):
        autol.meta_step(net, lambda f, b: loss_fn(f, b)[:2], batch, meta, opt)
    with pytest.raises(ValueError, match="not in the optimizer"):
        autol.meta_step(net, loss_fn, batch, meta, torch.optim.SGD(net[0].parameters(), lr=0.1))


def test_wrap_loss_weighting_and_gradient_method():
    autol = S.create("auto_lambda", 2).double()
    autol.meta_weights.data.copy_(torch.tensor([0.5, 2.0], dtype=F64))
    lam = autol.task_weights
    # a loss weighting stays a loss weighting (one backward pass) of the weighted losses
    uw = B.create("uw", 2).double()
    wrapped = autol.wrap(uw)
    assert wrapped.info.needs == "losses" and list(wrapped.parameters()) == list(uw.parameters())
    losses = torch.tensor([1.0, 3.0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(wrapped.objective(losses), losses)
    torch.testing.assert_close(grad, lam * uw.weights(lam * losses.detach()))
    torch.testing.assert_close(wrapped.last_weights, grad)
    # a gradient method receives the lambda-scaled rows (Auto-Lambda + PCGrad)
    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    pc = autol.wrap(B.create("pcgrad", 2, order="index"))
    out = pc.combine(jac, torch.ones(2, dtype=F64))
    ref = B.create("pcgrad", 2, order="index").combine(lam[:, None] * jac)
    torch.testing.assert_close(out, ref)
    assert list(pc.parameters()) == []  # the meta-weights belong to the strategy's optimiser
    with pytest.raises(ValueError, match="tasks"):
        autol.wrap(B.create("sum", 3))


def test_strategy_registry_and_state_round_trip():
    assert S.available() == ["auto_lambda"]
    rec = S.info("auto_lambda")
    assert rec.protocol == ("meta_batch",) and rec.hparams["init"] == 0.1
    assert rec.hparams["lr"] == 1e-4 and "Auto-Lambda" in rec.paper
    with pytest.raises(TypeError, match="no hyperparameter"):
        S.create("auto_lambda", 2, gamma=1)
    with pytest.raises(KeyError, match="unknown strategy"):
        S.create("autolambda", 2)
    model, batch, meta = _linear_problem(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a = S.create("auto_lambda", 3, lr=0.05).double()
    for _ in range(2):
        a.meta_step(model, loss_fn, batch, meta, opt)
    b = S.create("auto_lambda", 3, lr=0.05).double()
    b.load_state_dict(a.state_dict())
    a.meta_step(model, loss_fn, batch, meta, opt)
    b.meta_step(model, loss_fn, batch, meta, opt)
    assert torch.equal(a.task_weights, b.task_weights)  # Adam moments restored too


# ------------------------------------------------------------------------------------------------
# the trainer serving the protocols
# ------------------------------------------------------------------------------------------------
class Toy(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g)
        self.a = (self.x[:, 0] > 0).long()
        self.b = self.x[:, 1] * 2 + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "a": self.a[i], "b": self.b[i]}


def make(balancer, epochs=3, out=None, strategy=None, **hp):
    torch.manual_seed(0)
    model = polytask.architectures.create(
        "hps", encoder=nn.Sequential(nn.Linear(5, 16), nn.ReLU()),
        heads={"a": nn.Linear(16, 2), "b": nn.Linear(16, 1)},
    )
    tasks = TaskSet([Task.classification("a", 2), Task.regression("b")])
    bal = balancer if isinstance(balancer, B.Balancer) else B.create(balancer, 2, **hp)
    return Trainer(
        model, tasks, bal, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        config=TrainerConfig(epochs=epochs, out_dir=out, progress=False),
        strategy=S.create(strategy, 2, lr=1e-2) if strategy else None,
    )


def loader():
    return DataLoader(Toy(), batch_size=16, shuffle=True)


@pytest.mark.parametrize(
    "balancer,strategy",
    [("modo", None), ("sdmgrad", None), ("famo", None), ("sum", "auto_lambda"),
     ("pcgrad", "auto_lambda")],
)
def test_resume_is_exact_with_protocol_methods(tmp_path, balancer, strategy):
    full = make(balancer, epochs=3, out=str(tmp_path / "full"), strategy=strategy)
    full.fit(loader(), loader())
    part = make(balancer, epochs=1, out=str(tmp_path / "part"), strategy=strategy)
    part.fit(loader(), loader())
    resumed = make(balancer, epochs=3, out=str(tmp_path / "part"), strategy=strategy)
    resumed.load_checkpoint(tmp_path / "part" / "last.pt")
    resumed.fit(loader(), loader())
    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (k, a), b in pairs:
        assert torch.equal(a, b), k
    for a, b in zip(full.balancer.state_dict().values(), resumed.balancer.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    if strategy:
        assert torch.equal(full.strategy.task_weights, resumed.strategy.task_weights)
        assert not torch.equal(full.strategy.task_weights, torch.full((2,), 0.1))  # it learned
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    assert full.history[-1]["val/a/acc"] > 0.6


def test_trainer_step_with_extra_batches_equals_stacked_combine():
    t = make("modo", gamma=0.5)
    batches = [next(iter(DataLoader(Toy(), batch_size=8, shuffle=False)))]
    batches.append({k: v.flip(0) for k, v in batches[0].items()})
    model = t.model
    shared = list(model.shared_parameters())
    jacs, losses = [], []
    for b in batches:
        ls = t.tasks.compute_losses(model(b["x"]), b).losses
        jacs.append(polytask.jacobian(ls, shared))
        losses.append(ls.detach())
    ref = B.create("modo", 2, gamma=0.5).combine(torch.stack(jacs), torch.stack(losses))
    t.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the parameters
    with pytest.raises(ValueError, match="needs 1 extra batch"):
        t.train_step(batches[0])
    out = t.train_step(batches[0], [batches[1]])
    got = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert out["weights"].shape == (2,)
    torch.testing.assert_close(out["weights"].sum(), torch.tensor(1.0))  # MoDo's simplex weights
    assert t.n_batches == 2 and t.capture is not None  # through the activation path


def test_trainer_meta_batch_is_required_and_strategy_checks():
    t = make("sum", strategy="auto_lambda")
    batch = next(iter(DataLoader(Toy(), batch_size=8)))
    with pytest.raises(ValueError, match="meta batch"):
        t.train_step(batch)
    out = t.train_step(batch, meta_batch=batch)
    assert "meta_loss" in out and torch.isfinite(out["meta_loss"])
    assert t.step_balancer.info.needs == "losses"  # sum stays one backward pass
    with pytest.raises(ValueError, match="strategy was created for 3 tasks"):
        Trainer(t.model, t.tasks, B.create("sum", 2), lambda p: torch.optim.SGD(p, lr=0.1),
                strategy=S.create("auto_lambda", 3))


def test_extra_batches_come_from_the_aux_loader(tmp_path):
    seen = []

    class Spy:
        def __iter__(self):
            for b in loader():
                seen.append(1)
                yield b

    t = make("sdmgrad", epochs=1)
    t.fit(loader(), aux_loader=Spy())
    assert len(seen) == 2 * len(loader())  # two extra batches per step (n_batches=3)
