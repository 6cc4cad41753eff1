"""Benchmark runner, aggregation, reports and the ``bench`` CLI on a dummy suite (no training),
plus one tiny real trainer suite on synthetic data."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from polytask import bench, cli
from polytask.bench import Protocol, RunResult, Suite, aggregate, register_suite, run_suite
from polytask.bench._runner import MemoryMeter, gradient_conflict, resolve_methods, resolve_seeds
from polytask.data import DictDataset, MultiTaskData, TaskSpec
from polytask.tasks import Task, TaskSet

DUMMY = "_test_dummy"

# test metrics per (method, seed): hand-picked so that the aggregates are easy to check
VALUES = {
    ("stl", 0): {"a/acc": 0.80, "b/mae": 2.0},
    ("stl", 1): {"a/acc": 0.90, "b/mae": 1.0},
    ("stl", 2): {"a/acc": 0.85, "b/mae": 1.5},
    ("mean", 0): {"a/acc": 0.88, "b/mae": 2.2},  # Δm = 50 * (-0.1 + 0.1) = 0
    ("mean", 1): {"a/acc": 0.81, "b/mae": 0.8},  # Δm = 50 * (+0.1 - 0.2) = -5
    ("mean", 2): {"a/acc": 0.85, "b/mae": 1.5},
    ("pcgrad", 0): {"a/acc": 0.80, "b/mae": 2.0},
    ("pcgrad", 1): {"a/acc": 0.90, "b/mae": 1.0},
    ("pcgrad", 2): {"a/acc": 0.85, "b/mae": 1.5},
}
HIB = {"a/acc": True, "b/mae": False}


@register_suite(DUMMY)
class DummySuite(Suite):
    description = "a dummy suite for the tests"
    calls: ClassVar[list[tuple[str, int]]] = []
    setting = 1

    def protocol(self, quick: bool) -> Protocol:
        return Protocol(
            suite=self.name,
            version="1-quick" if quick else "1",
            settings={"setting": type(self).setting, "tuple": (1, 2)},
            seeds=(0, 1),
            default_methods=("mean", "pcgrad", "not_registered"),
        )

    def available_methods(self) -> list[str]:
        return ["mean", "pcgrad", "uw"]

    def _result(self, method: str, seed: int) -> RunResult:
        type(self).calls.append((method, seed))
        history = [
            {
                "epoch": e,
                "time": 0.1,
                "train/a/loss": 1.0 / e,
                "train/b/loss": 2.0 / e,
                **({"weight/a": 0.5, "weight/b": 0.5} if method != "stl" else {}),
            }
            for e in (1, 2, 3)
        ]
        extras = {}
        if method != "stl":
            extras["grad_conflict"] = {
                "tasks": ["a", "b"],
                "cosine": [[1.0, -0.2], [-0.2, 1.0]],
                "norms": [1.0, 2.0],
                "n_batches": 1,
            }
        return RunResult(
            method=method,
            seed=seed,
            test=dict(VALUES[(method, seed)]),
            higher_is_better=dict(HIB),
            time_per_epoch=1.0 + seed,
            peak_memory_mb=0.0,
            best_epoch=3,
            history=history,
            extras=extras,
        )

    def run(self, method: str, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        return self._result(method, seed)

    def run_baseline(self, seed: int, protocol: Protocol, work_dir: Path) -> RunResult:
        return self._result("stl", seed)

    def plots(self, results: dict[str, list[RunResult]], out_dir: Path) -> list[Path]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2, 2))
        FigureCanvasAgg(fig)
        fig.add_subplot().plot([0, 1], [0, 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / "dummy_extra.png")
        return [out_dir / "dummy_extra.png"]


@pytest.fixture(autouse=True)
def _reset_dummy():
    DummySuite.calls = []
    DummySuite.setting = 1
    yield


def _run(tmp_path, **kw):
    kw.setdefault("methods", ["mean", "pcgrad"])
    kw.setdefault("report", False)
    return run_suite(DUMMY, results_dir=tmp_path, progress=False, **kw)


# ------------------------------------------------------------------------------------ caching
def test_runs_are_cached_and_reused(tmp_path):
    s = _run(tmp_path)
    order = [("stl", 0), ("mean", 0), ("pcgrad", 0), ("stl", 1), ("mean", 1), ("pcgrad", 1)]
    assert DummySuite.calls == order  # per seed: baselines first, then each method
    stored = json.loads((tmp_path / DUMMY / "mean" / "seed1.json").read_text())
    assert stored["protocol"] == {
        "suite": DUMMY,
        "version": "1",
        "settings": {"setting": 1, "tuple": [1, 2]},
    }
    assert stored["result"]["test"] == VALUES[("mean", 1)]
    assert stored["result"]["extras"]["memory"]["kind"]
    DummySuite.calls = []
    s2 = _run(tmp_path)
    assert DummySuite.calls == []  # nothing rerun
    assert s2["rows"]["mean"]["delta_m"] == s["rows"]["mean"]["delta_m"]
    # a third seed only runs what is missing
    _run(tmp_path, seeds=3)
    assert DummySuite.calls == [("stl", 2), ("mean", 2), ("pcgrad", 2)]


def test_protocol_change_reruns(tmp_path):
    _run(tmp_path)
    DummySuite.calls = []
    DummySuite.setting = 2
    _run(tmp_path)
    assert len(DummySuite.calls) == 6
    stored = json.loads((tmp_path / DUMMY / "stl" / "seed0.json").read_text())
    assert stored["protocol"]["settings"]["setting"] == 2
    # one stored file from another protocol: only that run is redone
    path = tmp_path / DUMMY / "pcgrad" / "seed1.json"
    stored = json.loads(path.read_text())
    stored["protocol"]["version"] = "0"
    path.write_text(json.dumps(stored))
    DummySuite.calls = []
    _run(tmp_path)
    assert DummySuite.calls == [("pcgrad", 1)]


def test_quick_results_are_kept_apart(tmp_path):
    _run(tmp_path, quick=True)
    assert (tmp_path / f"{DUMMY}-quick" / "mean" / "seed0.json").exists()
    assert not (tmp_path / DUMMY).exists()


def test_report_only_does_not_train(tmp_path):
    s = _run(tmp_path, train=False, report=True)
    assert DummySuite.calls == [] and s["rows"] == {}
    assert any("not (yet) done" in n for n in s["notes"])
    assert (tmp_path / DUMMY / "report.md").exists()


# ------------------------------------------------------------------------------------ aggregation
def test_aggregation_against_hand_computed_numbers(tmp_path):
    s = _run(tmp_path)
    rows = s["rows"]
    assert list(rows) == ["stl", "mean", "pcgrad"]
    acc = rows["mean"]["metrics"]["a/acc"]
    assert (
        acc["mean"] == pytest.approx(0.845) and acc["se"] == pytest.approx(0.035) and acc["n"] == 2
    )
    mae = rows["mean"]["metrics"]["b/mae"]
    assert mae["mean"] == pytest.approx(1.5) and mae["se"] == pytest.approx(0.7)
    dm = rows["mean"]["delta_m"]
    assert dm["values"] == pytest.approx([0.0, -5.0])
    assert dm["mean"] == pytest.approx(-2.5) and dm["se"] == pytest.approx(2.5)
    assert rows["pcgrad"]["delta_m"]["mean"] == pytest.approx(0.0)
    assert rows["pcgrad"]["delta_m"]["se"] == pytest.approx(0.0)
    # a/acc: pcgrad 0.85 > mean 0.845; b/mae: tie at 1.5
    assert rows["mean"]["mean_rank"] == pytest.approx(1.75)
    assert rows["pcgrad"]["mean_rank"] == pytest.approx(1.25)
    assert "mean_rank" not in rows["stl"]
    tpe = rows["mean"]["time_per_epoch"]
    assert tpe["mean"] == pytest.approx(1.5) and tpe["se"] == pytest.approx(0.5)
    assert s["methods"] == ["mean", "pcgrad"] and s["seeds"] == [0, 1]


def test_aggregate_single_seed_and_missing_baseline():
    r = RunResult("mean", 0, {"a/acc": 0.9}, {"a/acc": True}, 1.0, 0.0)
    out = aggregate({"mean": [r]})
    assert out["rows"]["mean"]["delta_m"] is None  # no baseline: no Δm
    assert math.isnan(out["rows"]["mean"]["metrics"]["a/acc"]["se"])
    b = RunResult("stl", 1, {"a/acc": 1.0}, {"a/acc": True}, 1.0, 0.0)
    out = aggregate({"mean": [r]}, [b])  # the baseline is of another seed
    assert out["rows"]["mean"]["delta_m"] is None
    assert any("baseline missing" in n for n in out["notes"])


def test_default_methods_skip_unregistered_and_errors():
    suite = bench.get_suite(DUMMY)
    p = suite.protocol(False)
    assert resolve_methods(suite, p, None) == (["mean", "pcgrad"], ["not_registered"])
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(suite, p, ["mean", "nope"])
    with pytest.raises(ValueError, match="baseline"):
        resolve_methods(suite, p, ["stl"])
    assert resolve_seeds(p, None) == [0, 1]
    assert resolve_seeds(p, 3) == [0, 1, 2]
    assert resolve_seeds(p, [5, 7]) == [5, 7]
    with pytest.raises(ValueError):
        resolve_seeds(p, 0)


# ------------------------------------------------------------------------------------ reports
def test_report_files_and_self_contained_html(tmp_path):
    s = _run(tmp_path, report=True)
    out = tmp_path / DUMMY
    md = (out / "report.md").read_text()
    assert "| mean |" in md and "Δm%" in md and "-2.50 ± 2.50" in md
    assert "no published numbers" in md
    for name in ("pareto", "train_loss", "weights", "grad_conflict", "dummy_extra"):
        assert (out / "plots" / f"{name}.png").exists(), name
        assert f"plots/{name}.png" in md
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(imgs) == 5
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["suite"] == DUMMY
    assert s["report"]["html"].endswith("report.html")


def test_cli_bench_and_list(tmp_path, capsys):
    argv = [
        "bench",
        DUMMY,
        "--results",
        str(tmp_path),
        "--no-progress",
        "--seeds",
        "2",
        "--methods",
        "mean",
        "pcgrad",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| mean |" in out and "report.html" in out
    assert (tmp_path / DUMMY / "report.html").exists()
    assert cli.main(argv) == 0 and len(DummySuite.calls) == 6  # second call reuses everything
    assert cli.main(["bench", DUMMY, "--results", str(tmp_path), "--methods", "nope"]) == 2
    assert cli.main(["bench", "no_such_suite"]) == 2
    assert cli.main(["list", "suites"]) == 0
    listed = capsys.readouterr().out
    assert "multi_mnist" in listed and "census" in listed and DUMMY in listed


# ------------------------------------------------------------------------------------ measurements
def test_memory_meter_sees_an_allocation():
    with MemoryMeter("cpu") as m:
        x = torch.ones(20_000_000)  # 80 MB, touched
        x.add_(1)
        del x
    assert m.kind.startswith("cpu.")
    if m.kind == "cpu.rss_peak_growth":
        assert m.peak_mb > 60


def test_gradient_conflict_matches_autograd():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 4)
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})

        def forward(self, x):
            z = self.enc(x).tanh()
            return {k: h(z) for k, h in self.heads.items()}

        def shared_parameters(self):
            return self.enc.parameters()

    net = Net()
    tasks = TaskSet([Task.regression("a"), Task.regression("b")])
    batch = {"x": torch.randn(16, 3), "a": torch.randn(16), "b": torch.randn(16)}
    gc = gradient_conflict(net, tasks, [batch], n_batches=1)
    out = net(batch["x"])
    grads = []
    for t in ("a", "b"):
        loss = (out[t].reshape(-1) - batch[t]).pow(2).mean()
        g = torch.autograd.grad(loss, list(net.enc.parameters()), retain_graph=True)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert gc["tasks"] == ["a", "b"] and gc["n_batches"] == 1
    assert gc["cosine"][0][1] == pytest.approx(cos, abs=1e-5)
    assert gc["cosine"][1][0] == pytest.approx(cos, abs=1e-5)
    assert gc["cosine"][0][0] == pytest.approx(1.0)
    assert gc["norms"][0] == pytest.approx(grads[0].norm().item(), rel=1e-5)


# ------------------------------------------------------------------------------------ a real run
class TinySuite(bench.TrainerSuite):
    """Two classification tasks on synthetic data with a small MLP (real training, seconds)."""

    name = "_test_tiny"
    description = "tiny synthetic suite"

    def settings(self, quick: bool) -> dict:
        return {
            "data": {"name": "tiny", "batch_size": 32, "eval_batch_size": 64, "options": {}},
            "model": {"architecture": "hps", "encoder": "mlp", "hidden": [16]},
            "optimizer": {"name": "adam", "lr": 1e-2},
            "trainer": {"epochs": 2, "monitor": "val/loss"},
            "metrics": ["acc"],
            "grad_conflict_batches": 2,
        }

    def data(self, protocol):
        if not self._data:
            g = torch.Generator().manual_seed(0)

            def split(n):
                x = torch.randn(n, 6, generator=g)
                return DictDataset(
                    {"x": x, "a": (x[:, 0] > 0).long(), "b": (x[:, 1] + x[:, 0] > 0).long()}
                )

            self._data = {
                "tiny": MultiTaskData(
                    split(128),
                    split(64),
                    split(64),
                    [TaskSpec("a", "classification", 2), TaskSpec("b", "classification", 2)],
                    (6,),
                    "tiny",
                    "synthetic",
                )
            }
        return self._data["tiny"]


def test_trainer_suite_end_to_end(tmp_path):
    suite = TinySuite()
    s = bench.run_protocol(
        suite,
        suite.protocol(True),
        ["mean", "pcgrad"],
        1,
        out_dir=tmp_path,
        progress=False,
        threads=1,
        report=False,
    )
    assert set(s["rows"]) == {"stl", "mean", "pcgrad"}
    stored = json.loads((tmp_path / "pcgrad" / "seed0.json").read_text())["result"]
    r = RunResult.from_dict(stored)
    assert set(r.test) >= {"a/acc", "b/acc"} and r.best_epoch in (1, 2) and len(r.history) == 2
    assert "weight/a" in r.history[0] and r.time_per_epoch > 0 and r.peak_memory_mb >= 0
    cos = r.extras["grad_conflict"]["cosine"]
    assert cos[0][0] == pytest.approx(1.0) and cos[0][1] == pytest.approx(cos[1][0])
    stl = RunResult.from_dict(json.loads((tmp_path / "stl" / "seed0.json").read_text())["result"])
    assert set(stl.higher_is_better) == {"a/acc", "b/acc"}
    assert set(stl.extras["best_epoch"]) == {"a", "b"}
    # the same seed gives the same numbers (a second, uncached run)
    again = bench.run_protocol(
        suite, suite.protocol(True), ["pcgrad"], 1, out_dir=None, progress=False, threads=1
    )
    assert again["rows"]["pcgrad"]["metrics"]["a/acc"]["mean"] == r.test["a/acc"]


def test_every_suite_is_registered_and_listed(capsys):
    expected = {
        "toy",
        "multi_mnist",
        "multi_fashion",
        "multi_fashion_mnist",
        "qm9",
        "census",
        "census_ple",
        "rf1",
        "reviews",
        "reviews_minilm",
        "nyuv2",
        "cityscapes",
        "celeba",
    }
    assert expected <= set(bench.available_suites())
    assert cli.main(["list", "suites"]) == 0
    listed = capsys.readouterr().out
    assert all(re.search(rf"^\s+{n}\s", listed, re.M) for n in expected)
    for name in expected:
        suite = bench.get_suite(name)
        for quick in (False, True):
            p = suite.protocol(quick)
            json.dumps(p.key())
            assert len(p.default_methods) >= 8, (name, quick)
            assert set(p.default_methods) <= set(suite.available_methods())
            if name != "toy":  # deterministic: one seed (see ToySuite)
                assert len(p.seeds) >= 3, (name, quick)


def test_builtin_suites_have_quick_and_full_protocols():
    for name in (
        "multi_mnist",
        "multi_fashion",
        "multi_fashion_mnist",
        "census",
        "census_ple",
        "rf1",
        "reviews",
        "reviews_minilm",
        "nyuv2",
        "cityscapes",
        "celeba",
    ):
        suite = bench.get_suite(name)
        full, quick = suite.protocol(False), suite.protocol(True)
        assert full.key() != quick.key() and full.version != quick.version
        json.dumps(full.key())
        assert len(quick.default_methods) == 8
        assert set(quick.default_methods) <= set(suite.available_methods())
        assert quick.settings["trainer"]["epochs"] < full.settings["trainer"]["epochs"]


# ------------------------------------------------------------------------------------ toy suite
def _reference_toy(x1, x2, scale1=0.1):
    """An independent transcription of the reference ``Toy.forward`` (CAGrad / Nash-MTL)."""
    lower = 0.000005
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), lower)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), lower)) + 6
    c1 = max(math.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = max(math.tanh(-x2 * 0.5), 0)
    return scale1 * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2


def test_toy_losses_and_jacobian_match_the_reference_and_autograd():
    from polytask.bench.toy import toy_losses_and_jacobian, toy_losses_torch

    pts = [(1.0, 2.0), (-8.5, 7.5), (9.0, -1.0), (0.0, 0.0), (3.3, -8.4), (-2.0, 0.3)]
    for x1, x2 in pts:
        f, jac = toy_losses_and_jacobian([x1, x2], (0.1, 1.0))
        assert f == pytest.approx(_reference_toy(x1, x2), rel=1e-12, abs=1e-12)
        x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
        auto = torch.autograd.functional.jacobian(lambda v: toy_losses_torch(v, (0.1, 1.0)), x)
        assert jac == pytest.approx(auto.numpy(), rel=1e-9, abs=1e-12)


def test_toy_pareto_set_is_pareto_stationary():
    from polytask.bench.toy import distance_to_pareto, pareto_set, toy_losses_and_jacobian

    front = pareto_set()
    # the curve the reference draws as the line x2 = -8.3552 (its value at x1 = 0)
    assert front[len(front) // 2] == pytest.approx([0.0, -8.3552], abs=1e-3)
    assert front[0] == pytest.approx([-7.0, -8.4345], abs=1e-3)
    assert front[-1] == pytest.approx([7.0, -8.4345], abs=1e-3)
    _, jac = toy_losses_and_jacobian(front[1:-1:50])
    g1, g2 = jac[:, 0], jac[:, 1]
    cos = (g1 * g2).sum(-1) / (np.linalg.norm(g1, axis=-1) * np.linalg.norm(g2, axis=-1))
    assert np.all(cos < -0.999)  # opposite gradients: no common descent direction
    assert distance_to_pareto(front[::97]).max() < 1e-9
    assert distance_to_pareto([[0.0, 0.0]])[0] > 8


def test_run_toy_reaches_and_freezes_on_the_front():
    from polytask.bench.toy import run_toy

    out = run_toy(
        "mean",
        starts=[(0.0, -8.0), (9.0, 9.0)],
        steps=2500,
        lr=1e-2,
        stride=100,
        freeze=(250, 0.01),
    )
    # from (0, -8) LS slides to the minimum of 0.1 L1 + L2 on the front, x1 = -7 * 0.9 / 1.1
    assert out["reached"] == [True, False]
    assert out["final"][0][0] == pytest.approx(-7 * 0.9 / 1.1, abs=0.05)
    assert out["converged_step"][0] is not None and out["converged_step"][1] is None
    traj = np.asarray(out["trajectories"])
    assert traj.shape[0] == 2 and np.allclose(traj[:, 0], [[0.0, -8.0], [9.0, 9.0]])
    assert out["record_steps"][-1] == out["steps_run"] == 2500
    assert out["front_position"][0] == pytest.approx(out["final"][0][0] / 7)
    with pytest.raises(KeyError):
        run_toy("not_a_method", steps=2)


def test_toy_suite_protocol_seeds_and_report(tmp_path):
    from polytask.bench.toy import VARIANTS

    suite = bench.get_suite("toy")
    full, quick = suite.protocol(False), suite.protocol(True)
    assert full.settings["steps"] == 35000 and full.settings["lr"] == 1e-3
    assert full.settings["scale"] == [0.1, 1.0]
    assert [tuple(s) for s in full.settings["starts"]] == list(VARIANTS["nashmtl"]["starts"])
    assert full.version != quick.version and len(full.default_methods) >= 8
    assert {"mean", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo"} <= set(full.default_methods)
    assert suite.default_threads == 1
    # seed 0: the published starts; other seeds: small, seed-dependent jitter
    s0, s1, s2 = (suite.starts(full, k) for k in (0, 1, 2))
    assert np.array_equal(s0, np.asarray(full.settings["starts"]))
    assert 0 < np.abs(s1 - s0).max() < 0.6 and not np.allclose(s1, s2)

    s = dict(full.settings, steps=300, stride=50, freeze=None)
    proto = Protocol("toy", "test", s, seeds=(0,), default_methods=full.default_methods)
    summary = bench.run_protocol(
        suite, proto, ["mean", "pcgrad"], 2, out_dir=tmp_path, progress=False
    )
    assert set(summary["rows"]) == {"mean", "pcgrad"}
    r = RunResult.from_dict(json.loads((tmp_path / "mean" / "seed1.json").read_text())["result"])
    assert np.allclose(np.asarray(r.extras["starts"]), s1)
    # the default (two worker processes) and one process give the same runs
    serial = bench.run_protocol(suite, proto, ["mean", "pcgrad"], 2, out_dir=None,
                                progress=False, jobs=1)
    for m in ("mean", "pcgrad"):
        assert serial["rows"][m]["metrics"] == summary["rows"][m]["metrics"]
    md = (tmp_path / "report.md").read_text()
    assert "Which start reaches the Pareto front" in md and "qualitative findings" in md
    assert (tmp_path / "plots" / "toy_trajectories.png").stat().st_size > 10_000
    assert (
        "toy_loss_space.png" in md
        and "data:image/png;base64," in (tmp_path / "report.html").read_text()
    )


def test_toy_findings_are_checked_against_the_run():
    from polytask.bench.toy import FINDINGS

    def fake(method, reached, positions):
        return RunResult(
            method=method,
            seed=0,
            test={},
            higher_is_better={},
            time_per_epoch=0.0,
            peak_memory_mb=0.0,
            extras={"reached": reached, "front_position": positions},
        )

    runs = {
        "mean": [fake("mean", [False, True, True, True, True], [0, -0.8, -0.8, -0.8, -0.8])],
        "famo": [fake("famo", [True] * 5, [0.1, -0.2, 0.3, 0.0, 0.2])],
        "pcgrad": [fake("pcgrad", [True] * 5, [-0.5] * 5)],
        "cagrad": [fake("cagrad", [True, True, False, True, True], [0.2] * 5)],
        "mgda": [fake("mgda", [True] * 5, [0.9] * 5)],
    }
    verdicts = {f.claim[:30]: f.check(runs) for f in FINDINGS if all(m in runs for m in f.methods)}
    by_method = {f.methods: f.check(runs)[0] for f in FINDINGS if all(m in runs for m in f.methods)}
    assert by_method[("mean",)] is True  # 4 of 5, as FAMO reports
    assert by_method[("famo",)] is True
    assert by_method[("mgda",)] is True
    assert by_method[("mean", "pcgrad", "cagrad")] is False  # CAGrad's solutions sit on L1's side
    assert by_method[("cagrad",)] is False  # 4 of 5, not all
    assert all(isinstance(text, str) and text for _, text in verdicts.values())


# ---------------------------------------------------------------------------------- results script
def test_run_results_script_covers_every_cpu_suite_and_indexes_reports(tmp_path):
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "run_results.sh"
    dry = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    cmds = re.findall(r">>> polytask bench (\S+)(.*)", dry.stderr)
    cpu = [
        "toy",
        "multi_mnist",
        "multi_fashion",
        "multi_fashion_mnist",
        "qm9",
        "census",
        "rf1",
        "reviews",
    ]
    assert [c[0] for c in cmds] == cpu
    assert all(name in bench.available_suites() for name in cpu)
    assert "--seeds 3" in dict(cmds)["toy"]
    # a stand-in for the CLI that writes a report where the real one would
    fake = tmp_path / "fake_polytask"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "suite=$2; shift 2; dir=$suite; res=results\n"
        "while [[ $# -gt 0 ]]; do case $1 in --quick) dir=$suite-quick;; "
        "--results) res=$2; shift;; esac; shift; done\n"
        'mkdir -p "$res/$dir/plots"; echo "# $suite" > "$res/$dir/report.md"\n'
        'echo "<html>" > "$res/$dir/report.html"; echo "{}" > "$res/$dir/summary.json"\n'
        'printf PNG > "$res/$dir/plots/pareto.png"\n'
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "POLYTASK": str(fake),
        "RESULTS": str(tmp_path / "raw"),
        "OUT": str(tmp_path / "out"),
        "SUITES": "toy qm9",
    }
    subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
    out = tmp_path / "out"
    assert (out / "qm9" / "report.md").read_text() == "# qm9\n"
    assert (out / "toy" / "plots" / "pareto.png").exists()
    readme = (out / "README.md").read_text()
    assert "polytask bench qm9 --quick" in readme and "[toy](toy/report.md)" in readme
