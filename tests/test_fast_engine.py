"""The activation-based exact path (capture=) equals the plain per-task autograd computation."""

import pytest
import torch
from torch import nn

import polytask
from polytask import balancers
from polytask.balancers import BalancerInfo, GramianWeighting


class _InvNorm(GramianWeighting):
    """Test-only Gramian weighting: w_i proportional to 1/||g_i|| (uses the whole Gramian)."""

    def __init__(self, n_tasks):
        super().__init__(n_tasks)

    def weights_from_gramian(self, gramian, losses):
        w = 1 / gramian.diagonal().clamp_min(1e-12).sqrt()
        return w + 0.01 * gramian.sum(1) / gramian.diagonal().sum()


_InvNorm.info = BalancerInfo("test_invnorm", _InvNorm, "gramian", "-", "-")


class Net(nn.Module):
    """Shared part mixing captured Linear layers (one used twice) and an uncaptured LayerNorm and
    embedding-like parameter; 3-D activations for one layer."""

    def __init__(self, k):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.shift = nn.Parameter(torch.randn(12) * 0.1)
        self.mid = nn.Linear(12, 12)
        self.tok = nn.Linear(12, 12, bias=False)
        self.heads = nn.ModuleList([nn.Linear(12, 1) for _ in range(k)])

    def shared(self):
        return [*self.inp.parameters(), *self.norm.parameters(), self.shift, *self.mid.parameters(),
                *self.tok.parameters()]

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)) + self.shift)
        h = torch.relu(self.mid(h))
        h = torch.relu(self.mid(h))  # the same layer twice
        t = self.tok(h.unsqueeze(1).expand(-1, 3, -1)).mean(1)  # a 3-D use
        return [head(t + h).squeeze(1) for head in self.heads]


def _losses(net, x, y):
    return torch.stack([(o - t).pow(2).mean() for o, t in zip(net(x), y, strict=False)])


def _run(name_or_obj, capture, k=4, seed=0):
    torch.manual_seed(seed)
    net = Net(k).double()
    x, y = torch.randn(9, 6).double(), torch.randn(k, 9).double()
    cap = polytask.capture_linear_layers(net, net.shared()) if capture else None
    bal = name_or_obj(k) if isinstance(name_or_obj, type) else balancers.create(name_or_obj, k)
    torch.manual_seed(1)
    w = polytask.mtl_backward(
        _losses(net, x, y), shared_params=net.shared(), balancer=bal, capture=cap
    )
    if cap is not None:
        assert len(cap.modules) == 3
        cap.remove()
    return [p.grad for p in net.parameters()], w


def _methods():
    names = [n for n in balancers.available() if balancers.info(n).needs != "losses"]
    return [_InvNorm, *names]


@pytest.mark.parametrize(
    "method", _methods(), ids=lambda m: m if isinstance(m, str) else m.__name__
)
def test_capture_path_equals_jacobian_path(method):
    slow, w_slow = _run(method, capture=False)
    fast, w_fast = _run(method, capture=True)
    for a, b in zip(slow, fast, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    if w_slow is not None:
        torch.testing.assert_close(w_slow, w_fast, rtol=1e-7, atol=1e-9)


def test_layer_gramian_routes_agree():
    from polytask._fast import _layer_gramian

    a = torch.randn(7, 5, dtype=torch.float64)
    g = torch.randn(3, 7, 4, dtype=torch.float64)
    dw = torch.einsum("kno,ni->koi", g, a).reshape(3, -1)
    db = g.sum(1)
    full = torch.cat([dw, db], 1)
    torch.testing.assert_close(_layer_gramian(a, g, True), full @ full.T)
    # force the other route with a wide batch
    a2 = torch.randn(200, 2, dtype=torch.float64)
    g2 = torch.randn(3, 200, 2, dtype=torch.float64)
    dw2 = torch.einsum("kno,ni->koi", g2, a2).reshape(3, -1)
    torch.testing.assert_close(_layer_gramian(a2, g2, False), dw2 @ dw2.T)


def test_no_records_under_no_grad():
    net = Net(2)
    cap = polytask.capture_linear_layers(net, net.shared())
    with torch.no_grad():
        net(torch.randn(3, 6))
    assert cap.records == []
    net(torch.randn(3, 6))
    assert len(cap.records) == 4
    cap.remove()


@pytest.mark.parametrize(
    "name", [n for n in balancers.available() if balancers.info(n).n_batches > 1]
)
def test_capture_path_over_stacked_batches(name):
    """B forward passes recorded by one capture: the activation-based block Gramian (including
    the cross-batch blocks) gives exactly the plain per-task autograd result."""
    n = balancers.info(name).n_batches
    results = []
    for capture in (False, True):
        torch.manual_seed(0)
        net = Net(3).double()
        g = torch.Generator().manual_seed(4)
        data = [(torch.randn(9, 6, generator=g).double(), torch.randn(3, 9, generator=g).double())
                for _ in range(n)]
        cap = polytask.capture_linear_layers(net, net.shared()) if capture else None
        losses = torch.cat([_losses(net, x, y) for x, y in data])
        bal = balancers.create(name, 3)
        w = polytask.mtl_backward(losses, shared_params=net.shared(),
                                  balancer=balancers.stack_batches(bal), capture=cap)
        if cap is not None:
            cap.remove()
        results.append(([p.grad.clone() for p in net.parameters()], w, bal.last_weights))
    (slow, w_slow, t_slow), (fast, w_fast, t_fast) = results
    for a, b in zip(slow, fast, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w_slow, w_fast, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(t_slow, t_fast, rtol=1e-7, atol=1e-9)
