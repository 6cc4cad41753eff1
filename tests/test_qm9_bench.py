"""QM9 suite: the MPNN's invariances and gradient flow, and a tiny end-to-end run."""

import warnings

import pytest
import torch

import polytask
from polytask.bench import _suite
from polytask.data import collate_graphs
from polytask.models import MPNN, to_dense
from polytask.tasks import Task, TaskSet
from polytask.trainer import Trainer, TrainerConfig

TASKS = ["mu", "alpha", "homo"]


def molecule(n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.tensor([6, 8, 7, 9, 1])[torch.randint(0, 5, (n,), generator=g)]
    pos = torch.randn(n, 3, generator=g) * 1.5
    return {"z": z, "pos": pos, **{t: torch.randn((), generator=g) for t in TASKS}}


def small_model(**kw):
    torch.manual_seed(0)
    return MPNN(TASKS, dim=8, edge_hidden=6, n_rbf=5, **kw).double()


def inputs(samples):
    b = collate_graphs(samples)
    b["pos"] = b["pos"].double()
    return b


def test_to_dense_layout():
    b = inputs([molecule(3, 0), molecule(5, 1)])
    z, pos, mask = to_dense(b["z"], b["pos"], b["batch"], b["ptr"])
    assert z.shape == (2, 5) and pos.shape == (2, 5, 3)
    assert mask.sum(1).tolist() == [3, 5]
    assert torch.equal(z[0, :3], b["z"][:3]) and int(z[0, 3:].abs().sum()) == 0
    assert torch.equal(pos[1, :5], b["pos"][3:])
    # without ptr (derived from batch) and without batch (one molecule)
    z2, _, _ = to_dense(b["z"], b["pos"], b["batch"])
    assert torch.equal(z2, z)
    z3, _, m3 = to_dense(b["z"][:3], b["pos"][:3])
    assert z3.shape == (1, 3) and bool(m3.all())


@pytest.mark.parametrize("readout", ["set2set", "sum", "mean"])
def test_permutation_invariant_within_molecule(readout):
    m = small_model(readout=readout).eval()
    mol = molecule(7, 3)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    shuffled = {**mol, "z": mol["z"][perm], "pos": mol["pos"][perm]}
    a, b = m(inputs([mol])), m(inputs([shuffled]))
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=1e-10, atol=1e-10)


def test_rotation_and_translation_invariant():
    m = small_model().eval()
    mol = molecule(6, 4)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))
    moved = {**mol, "pos": mol["pos"] @ q.T.float() + torch.tensor([3.0, -1.0, 2.0])}
    a, b = m(inputs([mol])), m(inputs([moved]))
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cutoff", [None, 2.0])
def test_molecules_in_a_batch_do_not_interact(cutoff):
    m = small_model(cutoff=cutoff).eval()
    mols = [molecule(n, s) for s, n in enumerate([4, 9, 1, 6])]
    together = m(inputs(mols))
    for i, mol in enumerate(mols):
        alone = m(inputs([mol]))
        for t in TASKS:
            torch.testing.assert_close(together[t][i : i + 1], alone[t], rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter_and_contract():
    m = small_model()
    out = m(inputs([molecule(5, 0), molecule(3, 1)]))
    assert set(out) == set(TASKS) and all(v.shape == (2, 1) for v in out.values())
    sum(o.pow(2).sum() for o in out.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    shared = {id(p) for p in m.shared_parameters()}
    heads = {id(p) for t in TASKS for p in m.task_parameters(t)}
    assert not shared & heads
    assert shared | heads == {id(p) for p in m.parameters()}
    with pytest.raises(KeyError):
        m.task_parameters("nope")


class Molecules(torch.utils.data.Dataset):
    def __init__(self, n):
        self.items = [molecule(3 + i % 5, i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(
    ("method", "mode"), [("mean", None), ("pcgrad", "params"), ("imtl", "representation")]
)
def test_engine_modes_run_on_the_mpnn(method, mode):
    torch.manual_seed(0)
    model = MPNN(TASKS, dim=8, edge_hidden=6, n_rbf=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tasks = TaskSet([Task.regression(t) for t in TASKS])
    trainer = Trainer(
        model,
        tasks,
        polytask.balancers.create(method, len(TASKS)),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        config=TrainerConfig(
            epochs=1, input_key=["z", "pos", "batch", "ptr"], mode=mode, progress=False
        ),
    )
    loader = torch.utils.data.DataLoader(Molecules(12), batch_size=4, collate_fn=collate_graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to one backward per task
        trainer.fit(loader)
    for n, p in model.named_parameters():
        if n != "embed.weight":  # padding row 0 and absent elements never move
            assert not torch.equal(p.detach(), before[n]), n


def qm9_available():
    try:
        from polytask.data.qm9 import load_qm9_arrays

        load_qm9_arrays()
    except Exception:
        return False
    return True


def tiny_protocol():
    suite = _suite.get_suite("qm9") if "qm9" in _suite.available_suites() else None
    if suite is None:
        from polytask.bench import qm9  # noqa: F401 - registers the suite

        suite = _suite.get_suite("qm9")
    proto = suite.protocol(quick=True)
    s = dict(proto.settings)
    s.update(
        n_molecules=120,
        n_val=20,
        n_test=20,
        epochs=2,
        batch_size=25,
        model={
            "dim": 8,
            "edge_hidden": 8,
            "n_rbf": 6,
            "rbf_max": 8.0,
            "cutoff": None,
            "steps": 2,
            "readout": "set2set",
        },
        targets=["mu", "homo", "U0"],
        device="cpu",
    )
    return suite, _suite.Protocol("qm9", "test", s, seeds=(0,))


def test_quick_protocol_is_registered_and_sized():
    from polytask.bench import qm9  # noqa: F401

    suite = _suite.get_suite("qm9")
    assert suite.has_baselines
    quick, full = suite.protocol(True), suite.protocol(False)
    assert quick.version != full.version
    assert full.settings["epochs"] == 300 and full.settings["n_val"] == 10000
    assert full.settings["scheduler"] == {
        "name": "plateau",
        "factor": 0.7,
        "patience": 5,
        "min_lr": 1e-5,
    }
    # the quick protocol shrinks data and width only; the training rules are the full ones
    for k in ("lr", "scheduler", "selection", "energies", "loss", "targets"):
        assert quick.settings[k] == full.settings[k]
    assert len(quick.seeds) >= 3 and len(full.seeds) >= 3
    assert len(quick.default_methods) >= 8 and len(full.default_methods) >= 8
    assert quick.settings["n_molecules"] < 130_831 and full.settings["n_molecules"] is None
    assert suite.planned_epochs("stl", quick) == 11 * quick.settings["epochs"]


@pytest.mark.skipif(not qm9_available(), reason="QM9 files not available offline")
def test_tiny_end_to_end_run_and_baseline(tmp_path):
    from polytask.bench.qm9 import build_qm9

    suite, proto = tiny_protocol()
    data = build_qm9(proto.settings)
    # atomization energies: standardised with training statistics, a few eV per heavy atom
    mean_u0, std_u0 = data["stats"]["U0"]
    assert -200 < mean_u0 < -20 and 1 < std_u0 < 30
    assert data["sizes"] == {"train": 80, "val": 20, "test": 20}
    res = suite.run("mean", 0, proto, tmp_path)
    assert set(res.test) == {"mu/mae", "homo/mae", "U0/mae"}
    assert all(v > 0 and v == v for v in res.test.values())
    assert len(res.history) == 2 and res.best_epoch in (1, 2)
    assert res.time_per_epoch > 0
    stl = suite.run_baseline(0, proto, tmp_path)
    assert stl.method == "stl" and set(stl.test) == set(res.test)
    assert set(stl.extras["per_task"]) == {"mu", "homo", "U0"}
