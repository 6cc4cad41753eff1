"""The command line: list, train (config validation, checkpoint contents, resume)."""

import json

import pytest
import torch
import yaml

from polytask import cli
from polytask.config import ConfigError, load_config


def _cfg(tmp_path, **over):
    raw = {
        "data": {"name": "multi_mnist", "batch_size": 64, "options": {"n_train": 256, "n_val": 128, "n_test": 128}},
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
    for word in ("methods", "mgda" if "mgda" in out else "mean", "architectures", "hps", "datasets", "multi_mnist"):
        assert word in out


def test_unknown_key_is_an_error(tmp_path):
    path = _cfg(tmp_path, trainer={"epochz": 3})
    with pytest.raises(ConfigError, match=r"trainer: unknown key\(s\) \['epochz'\]"):
        load_config(path)
    assert cli.main(["train", str(path)]) == 2


def test_bad_type_and_unknown_balancer(tmp_path):
    with pytest.raises(ConfigError, match="trainer.epochs: expected an integer"):
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
