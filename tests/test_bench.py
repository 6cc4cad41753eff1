"""Benchmark runner, aggregation, reports and the ``bench`` CLI on a dummy suite (no training),
plus one tiny real trainer suite on synthetic data."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

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
    calls: list[tuple[str, int]] = []
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
            {"epoch": e, "time": 0.1, "train/a/loss": 1.0 / e, "train/b/loss": 2.0 / e,
             **({"weight/a": 0.5, "weight/b": 0.5} if method != "stl" else {})}
            for e in (1, 2, 3)
        ]
        extras = {}
        if method != "stl":
            extras["grad_conflict"] = {"tasks": ["a", "b"], "cosine": [[1.0, -0.2], [-0.2, 1.0]],
                                       "norms": [1.0, 2.0], "n_batches": 1}
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
    assert stored["protocol"] == {"suite": DUMMY, "version": "1", "settings": {"setting": 1, "tuple": [1, 2]}}
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
    assert acc["mean"] == pytest.approx(0.845) and acc["se"] == pytest.approx(0.035) and acc["n"] == 2
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
    argv = ["bench", DUMMY, "--results", str(tmp_path), "--no-progress", "--seeds", "2",
            "--methods", "mean", "pcgrad"]
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
                return DictDataset({"x": x, "a": (x[:, 0] > 0).long(), "b": (x[:, 1] + x[:, 0] > 0).long()})

            self._data = {"tiny": MultiTaskData(
                split(128), split(64), split(64),
                [TaskSpec("a", "classification", 2), TaskSpec("b", "classification", 2)],
                (6,), "tiny", "synthetic")}
        return self._data["tiny"]


def test_trainer_suite_end_to_end(tmp_path):
    suite = TinySuite()
    s = bench.run_protocol(suite, suite.protocol(True), ["mean", "pcgrad"], 1, out_dir=tmp_path,
                           progress=False, threads=1, report=False)
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
    again = bench.run_protocol(suite, suite.protocol(True), ["pcgrad"], 1, out_dir=None,
                               progress=False, threads=1)
    assert again["rows"]["pcgrad"]["metrics"]["a/acc"]["mean"] == r.test["a/acc"]


def test_builtin_suites_have_quick_and_full_protocols():
    for name in ("multi_mnist", "multi_fashion", "multi_fashion_mnist", "census", "census_ple",
                 "rf1", "reviews"):
        suite = bench.get_suite(name)
        full, quick = suite.protocol(False), suite.protocol(True)
        assert full.key() != quick.key() and full.version != quick.version
        json.dumps(full.key())
        assert 0 < len(quick.default_methods) <= 8
        assert set(quick.default_methods) <= set(suite.available_methods())
        assert quick.settings["trainer"]["epochs"] < full.settings["trainer"]["epochs"]
