"""Tasks (targets, masks, shape checks), Δm% and mean rank."""

import math

import pytest
import torch

from polytask.metrics import delta_m, mean_rank
from polytask.tasks import Task, TaskSet


def _ts():
    return TaskSet([Task.classification("digit", 3), Task.regression("depth")])


def _out(b=4):
    return {
        "digit": torch.randn(b, 3, requires_grad=True),
        "depth": torch.randn(b, 1, requires_grad=True),
    }


def test_losses_match_hand_computed():
    ts = _ts()
    out = _out()
    batch = {"digit": torch.tensor([0, 1, 2, 0]), "depth": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    tl = ts.compute_losses(out, batch)
    ce = torch.nn.functional.cross_entropy(out["digit"], batch["digit"])
    mse = ((out["depth"].squeeze(1) - batch["depth"]) ** 2).mean()
    torch.testing.assert_close(tl.losses, torch.stack([ce, mse]))
    assert tl.counts.tolist() == [4, 4]


def test_mask_and_nan_targets_skip_samples():
    ts = _ts()
    out = _out()
    batch = {
        "digit": torch.tensor([0, 1, 2, 0]),
        "depth": torch.tensor([1.0, float("nan"), 3.0, 4.0]),
        "masks": {"digit": torch.tensor([True, False, False, True])},
    }
    tl = ts.compute_losses(out, batch)
    ce = torch.nn.functional.cross_entropy(out["digit"][[0, 3]], batch["digit"][[0, 3]])
    keep = torch.tensor([0, 2, 3])
    mse = ((out["depth"].squeeze(1)[keep] - batch["depth"][keep]) ** 2).mean()
    torch.testing.assert_close(tl.losses, torch.stack([ce, mse]))
    assert tl.counts.tolist() == [2, 3]


def test_task_without_any_label_gives_zero_loss_and_no_nan_gradient():
    ts = _ts()
    out = _out()
    batch = {
        "digit": torch.tensor([0, 1, 2, 0]),
        "masks": {"digit": torch.zeros(4, dtype=torch.bool)},
    }
    tl = ts.compute_losses(out, batch)  # depth key missing, digit fully masked
    assert tl.losses.tolist() == [0.0, 0.0]
    assert tl.counts.tolist() == [0, 0]
    total = tl.losses.sum() + out["digit"].sum() * 0
    total.backward()
    assert torch.isfinite(out["digit"].grad).all()


def test_wrong_task_names_are_named():
    ts = _ts()
    with pytest.raises(ValueError, match=r"missing \['depth'\], unexpected \['dept'\]"):
        ts.compute_losses({"digit": torch.randn(4, 3), "dept": torch.randn(4, 1)}, {})


def test_wrong_shapes_name_task_and_expected_shape():
    ts = _ts()
    batch = {"digit": torch.tensor([0, 1, 2, 0]), "depth": torch.ones(4)}
    with pytest.raises(ValueError, match=r"task 'digit'.*\[B, 3\]"):
        ts.compute_losses({"digit": torch.randn(4, 5), "depth": torch.randn(4, 1)}, batch)
    with pytest.raises(ValueError, match=r"task 'depth'.*\[B\] or \[B, 1\]"):
        ts.compute_losses({"digit": torch.randn(4, 3), "depth": torch.randn(4, 2)}, batch)
    with pytest.raises(ValueError, match=r"task 'depth'.*batch size 3"):
        ts.compute_losses({"digit": torch.randn(4, 3), "depth": torch.randn(3, 1)}, batch)


def test_duplicate_task_names():
    with pytest.raises(ValueError, match="duplicate"):
        TaskSet([Task.regression("a"), Task.regression("a")])


def test_metrics_use_torchmetrics_and_target_scale():
    ts = TaskSet([Task.classification("c", 2), Task.regression("r", target_scale=10.0)])
    ms = ts.make_metrics()
    out = {"c": torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "r": torch.tensor([[1.0], [2.0]])}
    ts.update_metrics(ms, out, {"c": torch.tensor([0, 0]), "r": torch.tensor([1.5, 2.0])})
    assert float(ms["c"]["acc"].compute()) == 0.5
    assert math.isclose(float(ms["r"]["mae"].compute()), 2.5, rel_tol=1e-6)  # (0.5*10 + 0)/2
    assert ts.higher_is_better() == {"c/acc": True, "r/mae": False, "r/mse": False}


def test_binary_probability_task_reads_probabilities():
    """ESMM-style tasks: the prediction is a probability, the loss is its binary cross-entropy
    (finite gradient at 0 and 1, autocast off) and metrics see it without a sigmoid."""
    import torch.nn.functional as F

    task = Task.binary("p", probability=True)
    assert task.kind == "binary" and task.output == "probability"
    pred = torch.tensor([[0.9], [0.2], [0.6], [0.4]], requires_grad=True)
    target = torch.tensor([1, 0, 0, 0])
    loss = task.loss(pred, target)
    torch.testing.assert_close(loss, F.binary_cross_entropy(pred.reshape(-1), target.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert task.loss(pred.bfloat16(), target).dtype == torch.float32
    edge = torch.tensor([0.0, 1.0], requires_grad=True)
    task.loss(edge, torch.tensor([1, 0])).backward()
    assert torch.isfinite(edge.grad).all()
    ts = TaskSet([task, Task.binary("l")])
    ms = ts.make_metrics()
    logits = torch.tensor([[2.0], [-2.0], [0.5], [-0.5]])  # sigmoid: 0.88, 0.12, 0.62, 0.38
    ts.update_metrics(ms, {"p": pred, "l": logits}, {"p": target, "l": target})
    # thresholded at 0.5 as they are (a sigmoid first would call every sample positive: 0.25)
    assert float(ms["p"]["acc"].compute()) == float(ms["l"]["acc"].compute()) == 0.75
    assert float(ms["p"]["auc"].compute()) == float(ms["l"]["auc"].compute()) == 1.0
    with pytest.raises(ValueError, match="output"):
        Task("x", F.mse_loss, output="odds")


def test_delta_m_sign_convention():
    # accuracy up 10% (good) and error up 10% (bad) cancel
    assert delta_m(
        {"a": 1.1, "e": 1.1}, {"a": 1.0, "e": 1.0}, {"a": True, "e": False}
    ) == pytest.approx(0.0)
    assert delta_m({"a": 0.5}, {"a": 1.0}, {"a": True}) == pytest.approx(50.0)
    assert delta_m({"e": 0.5}, {"e": 1.0}, {"e": False}) == pytest.approx(-50.0)
    with pytest.raises(KeyError):
        delta_m({"a": 1.0}, {}, {"a": True})


def test_mean_rank_with_ties():
    r = mean_rank({"x": {"m": 1.0}, "y": {"m": 1.0}, "z": {"m": 0.0}}, {"m": True})
    assert r == {"x": 1.5, "y": 1.5, "z": 3.0}
