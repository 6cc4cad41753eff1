"""Trainer: fit/evaluate, exact resume, masked labels, early stopping, checkpoints."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import polytask
from polytask.tasks import Task, TaskSet
from polytask.trainer import Trainer, TrainerConfig, pick_device


class Toy(Dataset):
    """Two tasks on 5 features; task ``b`` is labelled on every other sample only."""

    def __init__(self, n=96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g)
        self.a = (self.x[:, 0] > 0).long()
        self.b = self.x[:, 1] * 2 + 0.1 * torch.randn(n, generator=g)
        self.mask = torch.arange(n) % 2 == 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "a": self.a[i], "b": self.b[i], "masks": {"b": self.mask[i]}}


def make(balancer="mean", epochs=4, out=None, **cfg):
    torch.manual_seed(0)
    model = polytask.architectures.create(
        "hps", encoder=nn.Sequential(nn.Linear(5, 16), nn.ReLU()),
        heads={"a": nn.Linear(16, 2), "b": nn.Linear(16, 1)},
    )
    tasks = TaskSet([Task.classification("a", 2), Task.regression("b")])
    return Trainer(
        model, tasks, polytask.balancers.create(balancer, 2),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
        config=TrainerConfig(epochs=epochs, out_dir=out, progress=False, **cfg),
        run_config={"note": "test"},
    )


def loader():
    return DataLoader(Toy(), batch_size=16, shuffle=True)


def test_pick_device_is_automatic():
    dev = pick_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else dev.type)
    assert pick_device("cpu").type == "cpu"


def test_fit_learns_and_logs(tmp_path):
    t = make(out=str(tmp_path), epochs=6)
    hist = t.fit(loader(), loader())
    assert len(hist) == 6
    assert hist[-1]["val/a/acc"] > 0.8
    assert hist[-1]["train/b/loss"] < hist[0]["train/b/loss"]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"weight/a", "weight/b", "val/b/mae"} <= set(rows[0])
    assert (tmp_path / "log.csv").read_text().startswith("epoch,")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["config"] == {"note": "test"} and ckpt["code_version"].startswith(
        polytask.__version__
    )
    assert (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("balancer", ["mean", "rlw", "pcgrad", "dwa"])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, balancer):
    if balancer not in polytask.balancers.available():
        pytest.skip(f"{balancer} not registered")
    full = make(balancer, epochs=4, out=str(tmp_path / "full"))
    full.fit(loader(), loader())
    part = make(balancer, epochs=2, out=str(tmp_path / "part"))
    part.fit(loader(), loader())
    resumed = make(balancer, epochs=4, out=str(tmp_path / "part"))
    resumed.load_checkpoint(tmp_path / "part" / "last.pt")
    assert resumed.epoch == 2
    resumed.fit(loader(), loader())
    for (k, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=False
    ):
        assert torch.equal(a, b), k
    for a, b in zip(
        full.balancer.state_dict().values(), resumed.balancer.state_dict().values(), strict=False
    ):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)


def test_masked_labels_use_only_labelled_samples():
    t = make()
    batch = next(iter(DataLoader(Toy(), batch_size=8)))
    out = t.train_step(batch)
    assert out["counts"].tolist() == [8, 4]
    # a batch without any label for b: no NaN, b's head gets no update
    batch["masks"]["b"] = torch.zeros(8, dtype=torch.bool)
    head_b = [p.detach().clone() for p in t.model.heads["b"].parameters()]
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.1)  # no momentum carry-over
    out = t.train_step(batch)
    assert out["losses"][1] == 0 and torch.isfinite(out["losses"]).all()
    for p, q in zip(t.model.heads["b"].parameters(), head_b, strict=False):
        assert torch.equal(p, q)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_early_stopping_and_best_model():
    t = make(epochs=30, patience=2, monitor="val/a/acc")
    t.fit(loader(), loader())
    assert len(t.history) < 30
    best = max(r["val/a/acc"] for r in t.history)
    assert t.history[t.best_epoch - 1]["val/a/acc"] == best
    t.load_best()
    assert t.evaluate(loader())["a/acc"] == pytest.approx(best)


def test_bad_monitor_is_an_error():
    t = make(epochs=1, monitor="val/a/f1")
    with pytest.raises(KeyError, match="not a validation metric"):
        t.fit(loader(), loader())


def test_balancer_task_count_mismatch():
    model = polytask.architectures.create(
        "hps", encoder=nn.Linear(5, 4), heads={"a": nn.Linear(4, 2)}
    )
    with pytest.raises(ValueError, match="created for 2 tasks"):
        Trainer(model, TaskSet([Task.classification("a", 2)]), polytask.balancers.create("mean", 2),
                lambda p: torch.optim.SGD(p, lr=0.1))


def test_nan_loss_stops_with_task_name():
    t = make()
    batch = next(iter(DataLoader(Toy(), batch_size=8)))
    with torch.no_grad():
        t.model.heads["b"].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"'b'|b"):
        t.train_step(batch)


def test_gradient_method_trains():
    name = next(
        (n for n in ("mgda", "upgrad", "pcgrad") if n in polytask.balancers.available()), None
    )
    if name is None:
        pytest.skip("no gradient method registered")
    t = make(name, epochs=3)
    hist = t.fit(loader(), loader())
    assert hist[-1]["val/a/acc"] > 0.7


@pytest.mark.parametrize("balancer", ["pcgrad", "mgda", "upgrad"])
def test_fast_engine_matches_jacobian_engine(balancer):
    if balancer not in polytask.balancers.available():
        pytest.skip(f"{balancer} not registered")
    a = make(balancer, epochs=2)
    assert a.capture is not None and len(a.capture.modules) == 1
    a.fit(loader())
    b = make(balancer, epochs=2, engine="jacobian")
    assert b.capture is None
    b.fit(loader())
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
