"""Every route through mtl_backward equals the plain per-task torch.autograd.grad computation.

Routes: losses as a list (per-task head backward) or stacked; with or without ``features``; with
or without ``capture``; params and representation mode; and models where some shared parameters
(or a captured layer's use) sit *above* the representation, where the engine must not split there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polytask
from polytask import balancers

K = 3


class Model(nn.Module):
    """Encoder -> z -> heads. ``above``: a shared scale and a shared (tied) linear layer are also
    used after z, so not every shared parameter lies below the representation."""

    def __init__(self, above: bool) -> None:
        super().__init__()
        self.above = above
        self.l1 = nn.Linear(5, 8)
        self.l2 = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))

    def shared(self) -> list[nn.Parameter]:
        return [*self.l1.parameters(), *self.l2.parameters(), self.scale]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return z if self.above else z * self.scale

    def losses(self, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if self.above:
            z = torch.tanh(self.l2(z)) * self.scale  # the tied layer and the scale above z
        return [(h(z).squeeze(1) - t).pow(2).mean() for h, t in zip(self.heads, y, strict=False)]


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(
        K, 6, generator=g, dtype=torch.float64
    )


def _reference(model: Model, name: str, mode: str):
    x, y = _data()
    z = model.encode(x)
    ls = model.losses(z, y)
    shared = model.shared()
    torch.manual_seed(3)
    bal = balancers.create(name, K)
    if mode == "params":
        jac = torch.stack(
            [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]
                )
                for loss in ls
            ]
        )
        direction = bal.combine(jac, torch.stack(ls).detach())
        offs, shared_grads = 0, []
        for p in shared:
            shared_grads.append(direction[offs : offs + p.numel()].view_as(p))
            offs += p.numel()
    else:
        zg = torch.stack(
            [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in ls]
        )
        d = bal.combine(zg, torch.stack(ls).detach()).view_as(z)
        shared_grads = list(torch.autograd.grad(z, shared, d, retain_graph=True, allow_unused=True))
        shared_grads = [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(shared, shared_grads, strict=False)
        ]
    head_grads = [
        list(torch.autograd.grad(loss, list(h.parameters()), retain_graph=True))
        for loss, h in zip(ls, model.heads, strict=False)
    ]
    return shared_grads, head_grads


def _engine(model: Model, name: str, mode: str, as_list: bool, features: bool, capture: bool):
    for p in model.parameters():
        p.grad = None
    cap = polytask.capture_linear_layers(model, model.shared()) if capture else None
    x, y = _data()
    z = model.encode(x)
    ls = model.losses(z, y)
    torch.manual_seed(3)
    polytask.mtl_backward(
        ls if as_list else torch.stack(ls),
        shared_params=model.shared(),
        balancer=balancers.create(name, K),
        features=z if features else None,
        mode=mode,
        capture=cap,
    )
    if cap is not None:
        cap.remove()
    return [p.grad for p in model.shared()], [[p.grad for p in h.parameters()] for h in model.heads]


METHODS = ["upgrad", "mgda", "imtl_g", "config", "pcgrad"]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("above", [False, True], ids=["all_below_z", "shared_above_z"])
@pytest.mark.parametrize("as_list", [True, False], ids=["list", "stacked"])
@pytest.mark.parametrize("features", [True, False], ids=["features", "no_features"])
@pytest.mark.parametrize("capture", [True, False], ids=["capture", "no_capture"])
def test_params_mode_routes(name, above, as_list, features, capture):
    torch.manual_seed(0)
    model = Model(above).double()
    ref_shared, ref_heads = _reference(model, name, "params")
    got_shared, got_heads = _engine(model, name, "params", as_list, features, capture)
    for p, a, b in zip(model.shared(), got_shared, ref_shared, strict=False):
        assert a is not None, f"shared parameter {tuple(p.shape)} got no gradient"
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    for a_list, b_list in zip(got_heads, ref_heads, strict=False):
        for a, b in zip(a_list, b_list, strict=False):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["upgrad", "mgda_ub", "config"])
@pytest.mark.parametrize("as_list", [True, False], ids=["list", "stacked"])
def test_representation_mode_routes(name, as_list):
    torch.manual_seed(0)
    model = Model(above=False).double()
    ref_shared, ref_heads = _reference(model, name, "representation")
    got_shared, got_heads = _engine(model, name, "representation", as_list, True, False)
    for a, b in zip(got_shared, ref_shared, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    for a_list, b_list in zip(got_heads, ref_heads, strict=False):
        for a, b in zip(a_list, b_list, strict=False):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_task_without_gradient_in_a_list():
    """A task whose loss is a constant (no labels in the batch) contributes a zero row."""
    torch.manual_seed(0)
    model = Model(above=False).double()
    x, y = _data()
    z = model.encode(x)
    ls = model.losses(z, y)
    ls[1] = torch.zeros((), dtype=torch.float64)
    w = polytask.mtl_backward(
        ls, shared_params=model.shared(), balancer=balancers.create("mean", K), features=z
    )
    assert w is not None and torch.isfinite(w).all()
    for p in [*model.shared(), *model.heads[0].parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None for p in model.heads[1].parameters())


def test_losses_must_be_scalars():
    with pytest.raises(ValueError, match="sequence of scalar tensors"):
        polytask.mtl_backward(
            [torch.ones(2, requires_grad=True)],
            shared_params=[nn.Parameter(torch.ones(1))],
            balancer=balancers.create("mean", 1),
        )


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_amortized_reuse_step_is_one_backward_with_cached_weights(mode):
    """Steps between recomputations give exactly w_cached @ J (and the heads their own grads)."""
    torch.manual_seed(0)
    model = Model(above=False).double()
    bal = balancers.create("amortized", K, base="upgrad", every=3)
    exact = balancers.create("upgrad", K)
    x, y = _data()
    seen = []
    for step in range(5):
        for p in model.parameters():
            p.grad = None
        z = model.encode(x * (1 + 0.1 * step))
        ls = model.losses(z, y)
        if mode == "params":
            jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
                loss, model.shared(), retain_graph=True)]) for loss in ls])
        else:
            jac = torch.stack(
                [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in ls]
            )
        w = polytask.mtl_backward(
            ls, shared_params=model.shared(), balancer=bal, features=z, mode=mode
        )
        if step % 3 == 0:
            w_exact = exact.weights_from_gramian(jac @ jac.T, None)
            torch.testing.assert_close(w, w_exact.to(w))
            cached = w.clone()
        else:
            torch.testing.assert_close(w, cached)
        seen.append(w)
        if mode == "params":
            got = torch.cat([p.grad.flatten() for p in model.shared()])
            torch.testing.assert_close(got, w.to(jac) @ jac, rtol=1e-7, atol=1e-10)
    assert bal.step == 5
    state = bal.state_dict()
    fresh = balancers.create("amortized", K, base="upgrad", every=3)
    fresh.load_state_dict(state)
    assert fresh.step == 5 and fresh.reuse_weights() is not None  # step 5: a reuse step


def test_amortized_rejects_jacobian_methods():
    with pytest.raises(ValueError, match="not a Gramian weighting"):
        balancers.create("amortized", K, base="config")


def test_layer_gramian_chunks_equal_one_shot(monkeypatch):
    from polytask import _fast

    a = torch.randn(50, 7, dtype=torch.float64)
    g = torch.randn(9, 50, 3, dtype=torch.float64)
    full = torch.cat([torch.einsum("kno,ni->koi", g, a).reshape(9, -1), g.sum(1)], 1)
    monkeypatch.setattr(_fast, "_CHUNK_ELEMENTS", 300)  # 2 tasks per chunk
    torch.testing.assert_close(_fast._layer_gramian(a, g, True), full @ full.T)


class HeadsModel(nn.Module):
    """Representation-mode variety: heads of different widths and depths, a head layer used twice,
    one head with a non-linear op on the representation first (no structured path), 3-D inputs."""

    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.kinds = kinds
        heads = []
        for kind in kinds:
            if kind == "linear":
                heads.append(nn.Linear(6, 1))
            elif kind == "wide":
                heads.append(nn.Linear(6, 4))
            elif kind == "mlp":
                heads.append(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1)))
            elif kind == "twice":
                heads.append(nn.Linear(6, 6, bias=False))
            elif kind == "nonlinear":
                heads.append(nn.Linear(6, 1))
        self.heads = nn.ModuleList(heads)

    def losses(self, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for kind, h, t in zip(self.kinds, self.heads, y, strict=False):
            if kind == "twice":
                o = (h(z) * h(z)).sum(-1)
            elif kind == "nonlinear":
                o = h(torch.sin(z)).squeeze(-1)
            elif kind == "wide":
                o = h(z).pow(2).mean(-1)
            else:
                o = h(z).squeeze(-1)
            out.append((o - t).pow(2).mean())
        return out


@pytest.mark.parametrize("name", ["upgrad", "mgda_ub", "imtl_g", "nash_mtl", "aligned_mtl_ub"])
@pytest.mark.parametrize(
    "kinds",
    [["linear", "linear", "linear"], ["linear", "wide", "mlp", "twice"], ["linear", "nonlinear"]],
    ids=["linear", "mixed", "with_nonlinear"],
)
@pytest.mark.parametrize("tokens", [False, True], ids=["2d", "3d"])
def test_representation_mode_with_captured_heads(name, kinds, tokens):
    torch.manual_seed(0)
    model = HeadsModel(kinds).double()
    k = len(kinds)
    g = torch.Generator().manual_seed(1)
    shape = (4, 3, 5) if tokens else (6, 5)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(k, *shape[:-1], generator=g, dtype=torch.float64)
    shared = list(model.enc.parameters())

    z = model.enc(x)
    ls = model.losses(z, y)
    zg = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in ls])
    ref_bal = balancers.create(name, k)
    d = ref_bal.combine(zg, torch.stack(ls).detach()).view_as(z)
    expected = torch.autograd.grad(z, shared, d, retain_graph=True)
    head_ref = [torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
                for loss, h in zip(ls, model.heads, strict=False)]

    cap = polytask.capture_linear_layers(model, shared, which="heads")
    z = model.enc(x)
    ls = model.losses(z, y)
    bal = balancers.create(name, k)
    w = polytask.mtl_backward(ls, shared_params=shared, balancer=bal, features=z,
                              mode="representation", capture=cap)
    cap.remove()
    assert cap.records == []
    torch.testing.assert_close(w, ref_bal.last_weights, rtol=1e-6, atol=1e-9)
    for p, e in zip(shared, expected, strict=False):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)
    for h, gs in zip(model.heads, head_ref, strict=False):
        for p, e in zip(h.parameters(), gs, strict=False):
            torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


def test_head_plan_detects_paths_around_the_heads():
    from polytask.engine import _head_plan

    model = HeadsModel(["linear", "nonlinear"]).double()
    cap = polytask.capture_linear_layers(model, list(model.enc.parameters()), which="heads")
    z = model.enc(torch.randn(6, 5, dtype=torch.float64))
    ls = model.losses(z, torch.randn(2, 6, dtype=torch.float64))
    heads = [r for r in cap.records if r.source is z]
    assert len(heads) == 1  # the non-linear head's layer sees sin(z), not z
    assert _head_plan(ls[:1], z, heads) == [heads]
    assert _head_plan(ls, z, heads) is None
    cap.remove()


def test_representation_mode_refuses_shared_parameters_above_features():
    torch.manual_seed(0)
    model = Model(above=True).double()
    x, y = _data()
    z = model.encode(x)
    with pytest.raises(ValueError, match="do not feed `features`"):
        polytask.mtl_backward(model.losses(z, y), shared_params=model.shared(),
                              balancer=balancers.create("upgrad", K), features=z,
                              mode="representation")


def test_capture_which_selects_layers():
    model = HeadsModel(["linear", "mlp"])
    shared = list(model.enc.parameters())
    assert len(polytask.capture_linear_layers(model, shared).modules) == 2
    assert len(polytask.capture_linear_layers(model, shared, which="heads").modules) == 3
    assert len(polytask.capture_linear_layers(model, shared, which="all").modules) == 5
    with pytest.raises(ValueError, match="which must be"):
        polytask.capture_linear_layers(model, shared, which="encoder")
