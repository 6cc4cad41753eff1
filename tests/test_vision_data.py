"""Vision loaders on small fixtures written in the real on-disk layouts (no download)."""

import json
import urllib.error

import numpy as np
import pytest
import torch

from polytask.data import MultiTaskData, vision
from polytask.data.vision import VisionDataMissing, celeba, cityscapes, nyuv2, verify

H, W = 12, 16


def write_npy_split(root, split, n, folders, rng):
    for i in range(n):
        for folder in folders:
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            if folder == "image":
                a = rng.random((H, W, 3)).astype(np.float32)
            elif folder.startswith("label"):
                k = 13 if folder == "label" else int(folder.split("_")[1])
                a = rng.integers(-1, k, (H, W)).astype(np.float32)  # float with -1, as MTAN's
            elif folder == "depth":
                a = (rng.random((H, W, 1)) * 5).astype(np.float32)
                a[0, 0, 0] = 0.0  # a missing pixel
            else:  # normal
                v = rng.normal(size=(H, W, 3))
                a = (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
                a[0, 0] = 0.0
            np.save(d / f"{i}.npy", a)


@pytest.fixture
def nyu_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "nyuv2"
    write_npy_split(root, "train", 6, ["image", "label", "depth", "normal"], rng)
    write_npy_split(root, "val", 4, ["image", "label", "depth", "normal"], rng)
    return root


@pytest.fixture
def city_root(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    for split, n in (("train", 5), ("val", 3)):
        write_npy_split(root, split, n, ["image", "label_7", "depth", "label_19"], rng)
    return root


def test_nyuv2_shapes_ranges_and_splits(nyu_root):
    data = nyuv2(nyu_root)
    assert isinstance(data, MultiTaskData)
    assert [t.name for t in data.tasks] == ["segmentation", "depth", "normal"]
    assert data.tasks[0].n_classes == 13 and data.input_shape == (3, H, W)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 4, 4)
    assert data.extras["val_is_test"] and data.val is data.test
    s = data.train[2]
    assert s["x"].shape == (3, H, W) and s["x"].dtype == torch.float32
    assert s["segmentation"].shape == (H, W) and s["segmentation"].dtype == torch.int64
    seg = s["segmentation"]
    assert int(seg.min()) >= -1 and int(seg.max()) <= 12 and bool((seg == -1).any())
    assert s["depth"].shape == (1, H, W) and float(s["depth"][0, 0, 0]) == 0.0
    assert s["normal"].shape == (3, H, W)
    norms = s["normal"].norm(dim=0)
    assert torch.allclose(norms[1:], torch.ones_like(norms[1:]), atol=1e-5)
    # the same pixels as the file (HWC -> CHW)
    raw = np.load(nyu_root / "train" / "image" / "2.npy")
    assert torch.equal(s["x"], torch.from_numpy(raw).permute(2, 0, 1))
    assert data.extras["target_shapes"]["depth"] == (1, H, W)
    # batching with the default collate
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=3)))
    assert batch["x"].shape == (3, 3, H, W) and batch["segmentation"].shape == (3, H, W)


def test_nyuv2_held_out_validation(nyu_root):
    data = nyuv2(nyu_root, val_size=2, seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 4)
    assert not data.extras["val_is_test"]
    assert set(data.train.indices).isdisjoint(data.val.indices)
    assert sorted(data.train.indices + data.val.indices) == list(range(6))
    with pytest.raises(ValueError):
        nyuv2(nyu_root, val_size=6)


def test_nyuv2_nested_archive_folder(tmp_path, nyu_root):
    outer = tmp_path / "download"
    outer.mkdir()
    nyu_root.rename(outer / "nyuv2_unpacked")
    data = nyuv2(outer)
    assert len(data.train) == 6


def test_cityscapes(city_root):
    data = cityscapes(city_root)
    assert [t.name for t in data.tasks] == ["segmentation", "depth"]
    assert data.tasks[0].n_classes == 7
    assert (len(data.train), len(data.test)) == (5, 3)
    s = data.test[0]
    assert s["x"].shape == (3, H, W) and s["depth"].shape == (1, H, W)
    assert int(s["segmentation"].min()) >= -1 and int(s["segmentation"].max()) <= 6
    d19 = cityscapes(city_root, n_classes=19)
    assert d19.tasks[0].n_classes == 19 and int(d19.train[0]["segmentation"].max()) <= 18
    with pytest.raises(ValueError):
        cityscapes(city_root, n_classes=5)
    assert verify("cityscapes", city_root)["sizes"] == {"train": 5, "val": 3}


def test_missing_npy_files_give_a_clear_error(tmp_path, nyu_root):
    with pytest.raises(VisionDataMissing) as err:
        nyuv2(tmp_path / "nowhere")
    msg = str(err.value)
    assert "missing folder" in msg and "dropbox.com" in msg and "nyuv2" in msg
    (nyu_root / "val" / "normal" / "1.npy").unlink()
    with pytest.raises(VisionDataMissing, match=r"not numbered|different file counts"):
        nyuv2(nyu_root)
    assert isinstance(err.value, FileNotFoundError)


# ------------------------------------------------------------------------------------------------
# CelebA
# ------------------------------------------------------------------------------------------------
def write_celeba(root, n=12, official=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    img_dir = root / ("Img/img_align_celeba" if official else "img_align_celeba")
    anno = root / ("Anno" if official else "")
    evald = root / ("Eval" if official else "")
    for d in (img_dir, anno, evald):
        d.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    values = rng.choice([-1, 1], size=(n, 40))
    for name in names:
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(img_dir / name)
    lines = [str(n), " ".join(vision.CELEBA_ATTRIBUTES)]
    lines += [
        name + " " + " ".join(f"{v:2d}" for v in row)
        for name, row in zip(names, values, strict=False)
    ]
    (anno / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    parts = [0] * (n - 5) + [1, 1, 2, 2, 2]
    (evald / "list_eval_partition.txt").write_text(
        "\n".join(f"{name} {p}" for name, p in zip(names, parts, strict=False)) + "\n"
    )
    return values


@pytest.mark.parametrize("official", [False, True])
def test_celeba_layouts_shapes_and_labels(tmp_path, official):
    values = write_celeba(tmp_path, official=official)
    data = celeba(tmp_path)
    assert len(data.tasks) == 40 and data.tasks[0].name == "5_o_Clock_Shadow"
    assert all(t.kind == "classification" and t.n_classes == 2 for t in data.tasks)
    assert (len(data.train), len(data.val), len(data.test)) == (7, 2, 3)
    s = data.train[3]
    assert s["x"].shape == (3, 64, 64) and 0.0 <= float(s["x"].min()) <= float(s["x"].max()) <= 1.0
    labels = torch.stack([s[a] for a in vision.CELEBA_ATTRIBUTES])
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.from_numpy((values[3] > 0).astype(np.int64)))
    # validation images are the partition-1 rows
    assert torch.equal(data.val[0]["Male"], torch.tensor(int(values[7, 20] > 0)))


def test_celeba_subsets_attributes_and_full_size(tmp_path):
    write_celeba(tmp_path)
    data = celeba(tmp_path, attributes=["Smiling", "Young"], n_train=4, image_size=None)
    assert [t.name for t in data.tasks] == ["Smiling", "Young"]
    assert len(data.train) == 4 and set(data.train[0]) == {"x", "Smiling", "Young"}
    assert data.train[0]["x"].shape == (3, 218, 178) and data.input_shape == (3, 218, 178)
    with pytest.raises(ValueError, match="unknown CelebA attributes"):
        celeba(tmp_path, attributes=["Nope"])
    report = verify("celeba", tmp_path)
    assert report["sizes"] == {"train": 7, "val": 2, "test": 3}
    assert (
        "MD5 mismatch" in report["checksums"]["list_attr_celeba.txt"]
    )  # a fixture, not the real file


def test_celeba_missing_files(tmp_path):
    with pytest.raises(VisionDataMissing) as err:
        celeba(tmp_path)
    msg = str(err.value)
    assert "list_attr_celeba.txt" in msg and "drive.google.com" in msg and "mmlab" in msg
    write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(VisionDataMissing, match="1 of 12 images absent"):
        celeba(tmp_path)


def test_download_without_network_names_the_source(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no route to host (test)")

    monkeypatch.setattr(vision.urllib.request, "urlopen", refuse)
    for name, host in (
        ("nyuv2", "dropbox.com"),
        ("cityscapes", "dropbox.com"),
        ("celeba", "drive.google.com"),
    ):
        with pytest.raises(VisionDataMissing) as err:
            vision.download(name, tmp_path / name)
        assert "could not download" in str(err.value) and host in str(err.value)
    with pytest.raises(KeyError):
        vision.download("imagenet", tmp_path)


def test_download_is_a_no_op_for_a_complete_copy(nyu_root, monkeypatch):
    monkeypatch.setattr(vision.urllib.request, "urlopen", pytest.fail)
    assert vision.download("nyuv2", nyu_root) == nyu_root


def test_sources_keep_upstream_locations_and_checksums():
    celeba_files = {f.filename: f for f in vision.SOURCES["celeba"].files}
    assert celeba_files["list_eval_partition.txt"].md5 == "d32c9cbf5e040fd4025c592c306e6668"
    assert vision.SOURCES["nyuv2"].sizes == {"train": 795, "val": 654}
    assert vision.SOURCES["cityscapes"].sizes == {"train": 2975, "val": 500}
    assert all(f.url.startswith("https://") for s in vision.SOURCES.values() for f in s.files)


# ------------------------------------------------------------------------------------------------
# the GPU suites, end to end on the fixtures (CPU, tiny network)
# ------------------------------------------------------------------------------------------------
def _tiny(suite, **over):
    import json as _json

    from polytask.bench import Protocol

    s = _json.loads(_json.dumps(suite.protocol(True).settings))
    s["trainer"]["epochs"] = 2
    s["data"]["batch_size"] = s["data"]["eval_batch_size"] = 2
    s["data"]["num_workers"] = 0
    for k, v in over.items():
        s[k] = v
    return Protocol(suite.name, "test", s, seeds=(0,))


@pytest.mark.parametrize("name", ["nyuv2", "cityscapes"])
def test_dense_suites_run_end_to_end_on_fixtures(tmp_path, monkeypatch, nyu_root, city_root, name):
    from polytask import bench

    root = nyu_root if name == "nyuv2" else city_root
    monkeypatch.setenv(f"POLYTASK_{name.upper()}_ROOT", str(root))
    suite = bench.get_suite(name)
    full = suite.protocol(False).settings
    assert full["trainer"]["epochs"] == 200 and full["optimizer"] == {"name": "adam", "lr": 1e-4}
    assert full["scheduler"] == {"name": "step", "step_size": 100, "gamma": 0.5}
    assert full["network"]["filters"] == [64, 128, 256, 512, 512]
    assert full["data"]["batch_size"] == (2 if name == "nyuv2" else 8)
    proto = _tiny(suite, network={"name": "segnet_mtan", "filters": [4, 8]})
    proto.settings["data"]["options"]["val_size"] = 1
    proto.settings["trainer"]["epochs"] = 1
    proto.settings["grad_conflict_batches"] = 1
    summary = bench.run_protocol(
        suite, proto, ["pcgrad"], 1, out_dir=tmp_path / "res", progress=False, threads=1
    )
    tasks = ["segmentation", "depth"] + (["normal"] if name == "nyuv2" else [])
    rows = summary["rows"]
    assert set(rows) == {"stl", "pcgrad"}
    expect = {"segmentation/miou", "segmentation/pix_acc", "depth/abs_err", "depth/rel_err"}
    if name == "nyuv2":
        expect |= {
            "normal/mean_angle",
            "normal/median_angle",
            "normal/within_11.25",
            "normal/within_22.5",
            "normal/within_30",
        }
    assert set(summary["metrics"]) == expect
    for m in ("pcgrad",):
        vals = {k: rows[m]["metrics"][k]["mean"] for k in expect}
        assert all(v == v for v in vals.values())  # no NaN
        assert 0 <= vals["segmentation/miou"] <= vals["segmentation/pix_acc"] <= 1
        assert rows[m]["delta_m"] is not None
    stl = json.loads((tmp_path / "res" / "stl" / "seed0.json").read_text())["result"]
    assert set(stl["extras"]["best_epoch"]) == set(tasks)
    report = (tmp_path / "res" / "report.md").read_text()
    assert "Published numbers" in report and "does NOT match" in report
    if name == "nyuv2":
        assert "Nash-MTL" in report and "0.3830" in report  # the published STL metrics


def test_celeba_suite_runs_end_to_end_on_fixtures(tmp_path, monkeypatch):
    from polytask import bench

    write_celeba(tmp_path / "celeba", n=13)  # 8 training images: no batch of one for BN
    monkeypatch.setenv("POLYTASK_CELEBA_ROOT", str(tmp_path / "celeba"))
    suite = bench.get_suite("celeba")
    full = suite.protocol(False).settings
    assert full["trainer"]["epochs"] == 15 and full["optimizer"]["lr"] == 3e-4
    assert full["data"]["batch_size"] == 256 and full["data"]["options"]["image_size"] == [64, 64]
    proto = _tiny(suite, network={"name": "celeba_cnn", "width": 0.0625})
    proto.settings["data"]["options"] = {
        "image_size": [16, 16],
        "attributes": ["Smiling", "Male", "Young"],
    }
    summary = bench.run_protocol(
        suite, proto, ["mean"], 1, out_dir=tmp_path / "res", progress=False, threads=1
    )
    assert set(summary["metrics"]) == {"Smiling/f1", "Male/f1", "Young/f1"}
    f1 = summary["rows"]["mean"]["metrics"]["Smiling/f1"]["mean"]
    assert 0.0 <= f1 <= 1.0
    # Δm needs non-zero STL F1 scores; a tiny fixture may give zero, which the notes then say
    assert summary["rows"]["mean"]["delta_m"] is not None or any(
        "no Δm" in n for n in summary["notes"]
    )
    assert "FAMO" in (tmp_path / "res" / "report.md").read_text()


def test_dense_metrics_against_hand_computed_values():
    from polytask.bench.vision import DepthError, NormalAngle, SegmentationScore, normal_task

    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=rng)
    target = torch.randint(-1, 4, (2, 3, 5), generator=rng)
    pred = logits.argmax(1)
    valid = target >= 0
    m_acc, m_iou = SegmentationScore(4, "pix_acc"), SegmentationScore(4, "miou")
    for m in (m_acc, m_iou):
        m.update(logits[:1], target[:1])
        m.update(logits[1:], target[1:])
    assert float(m_acc.compute()) == pytest.approx(float((pred == target)[valid].float().mean()))
    ious = []
    for c in range(4):
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        if union:
            ious.append(float(inter) / float(union))
    assert float(m_iou.compute()) == pytest.approx(np.mean(ious))

    d_pred = torch.rand(2, 1, 3, 5, generator=rng) + 0.5
    d_true = torch.rand(2, 1, 3, 5, generator=rng) + 0.5
    d_true[0, 0, 0, 0] = 0.0
    mask = d_true != 0
    m = DepthError("rel")
    m.update(d_pred, d_true)
    ref = ((d_pred - d_true).abs() / d_true)[mask].mean()
    assert float(m.compute()) == pytest.approx(float(ref), rel=1e-6)

    n_true = torch.nn.functional.normalize(torch.randn(1, 3, 20, 20, generator=rng), dim=1)
    n_pred = torch.nn.functional.normalize(torch.randn(1, 3, 20, 20, generator=rng), dim=1)
    ang = torch.rad2deg(torch.acos((n_true * n_pred).sum(1).clamp(-1, 1))).flatten().double()
    for which, ref in (
        ("mean", ang.mean()),
        ("median", ang.median()),
        ("within_22.5", (ang < 22.5).double().mean()),
    ):
        m = NormalAngle(which)
        m.update(n_pred, n_true)
        assert float(m.compute()) == pytest.approx(float(ref), abs=0.02)
    task = normal_task("normal")
    assert float(task.loss(n_true, n_true)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="normal"):
        task.loss(n_true[:, :2], n_true[:, :2])


def test_scale_crop_flip_keeps_targets_consistent(nyu_root):
    import random as _random

    from polytask.bench.vision import ScaleCropFlip

    data = nyuv2(nyu_root)
    aug = ScaleCropFlip(data.train, scales=(1.5,), flip=True)
    _random.seed(3)
    for i in range(len(data.train)):
        s = aug[i]
        assert s["x"].shape == (3, H, W) and s["segmentation"].shape == (H, W)
        assert s["segmentation"].dtype == torch.int64
        assert set(s["segmentation"].unique().tolist()) <= set(range(-1, 13))
        assert s["depth"].shape == (1, H, W) and s["normal"].shape == (3, H, W)
    # scale 1 without flip is the identity
    ident = ScaleCropFlip(data.train, scales=(1.0,), flip=False)[0]
    assert torch.allclose(ident["x"], data.train[0]["x"]) and torch.equal(
        ident["segmentation"], data.train[0]["segmentation"]
    )
