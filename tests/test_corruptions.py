"""CIFAR-10-C: the archive made offline, its conversion into the evaluation grid and the SIS sample (and the
errors a wrong archive gets), evaluation on it, the severity table, and the workflow's outputs."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from overinterp.corruptions import convert, evaluate, evaluate_sample, load_grid, severity_table
from overinterp.data import Normalizer, load_split
from overinterp.utils import DataError

SMOKE = yaml.safe_load((REPO / "config/smoke.yaml").read_text())["cifar10c"]
pytestmark = pytest.mark.usefixtures("one_thread")


def members(archive) -> dict[str, np.ndarray]:
    with tarfile.open(archive) as tar:
        return {m.name.split("/")[-1].removesuffix(".npy"): np.load(io.BytesIO(tar.extractfile(m).read()))
                for m in tar.getmembers()}


def write_archive(path, arrays: dict[str, np.ndarray], allow_pickle=False):
    with tarfile.open(path, "w") as tar:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=allow_pickle)
            info = tarfile.TarInfo(f"CIFAR-10-C/{name}.npy")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return path


def test_made_archive_has_the_release_layout_and_corrupts_more_with_severity(cifar10c_archive, cifar_npz):
    arrays = members(cifar10c_archive[0])
    test = np.load(cifar_npz)
    clean = test["test_images"].transpose(0, 2, 3, 1)
    assert sorted(arrays) == sorted(["labels", *SMOKE["corruptions"]])
    assert np.array_equal(arrays["labels"], np.tile(test["test_labels"], 5))
    for name in SMOKE["corruptions"]:
        images = arrays[name]
        assert images.shape == (5 * len(clean), 32, 32, 3) and images.dtype == np.uint8
        change = [np.abs(block.astype(float) - clean).mean() for block in np.split(images, 5)]
        assert change[0] > 0 and change[4] > change[0], (name, change)  # severity 5 departs most


def test_made_archive_is_reproducible_and_can_hold_only_a_runs_test_images(cifar_archive, cifar10c_archive,
                                                                          cifar_npz, tmp_path):
    from overinterp.corruptions import make_archive
    from overinterp.data import balanced_subset

    full = members(cifar10c_archive[0])["gaussian_noise"]
    again = make_archive(cifar_archive[0], tmp_path / "again.tar", ["gaussian_noise"], workers=2, chunk=70)
    assert np.array_equal(members(again)["gaussian_noise"], full)
    # an archive of the 100 test images a run with dataset.test_size 100 uses: the same corrupted images
    part = make_archive(cifar_archive[0], tmp_path / "part.tar", ["gaussian_noise"], test_size=100)
    held = balanced_subset(np.load(cifar_npz)["test_labels"], 100)
    assert np.array_equal(members(part)["gaussian_noise"].reshape(5, 100, 32, 32, 3),
                          full.reshape(5, 200, 32, 32, 3)[:, held])
    grids = []
    for archive in (cifar10c_archive[0], part):
        grid, sample = tmp_path / f"{archive.stem}-grid.npz", tmp_path / f"{archive.stem}-sample.npz"
        convert(archive, cifar_npz, grid, sample, ["gaussian_noise"], test_size=100, per_cell=20, sample_size=30)
        grids.append((load_grid(grid)["images"], np.load(sample)["test_images"]))
    assert all(np.array_equal(a, b) for a, b in zip(*grids))
    with pytest.raises(DataError, match=r"for the 200 test images of the dataset file \(or for its 200"):
        convert(part, cifar_npz, tmp_path / "g.npz", tmp_path / "s.npz", ["gaussian_noise"], sample_size=30)


def test_convert_keeps_the_split_images_under_every_corruption_and_draws_the_pooled_sample(
        cifar10c_archive, cifar_npz, tmp_path):
    grid_path, sample_path = tmp_path / "grid.npz", tmp_path / "sample.npz"
    convert(cifar10c_archive[0], cifar_npz, grid_path, sample_path, SMOKE["corruptions"], test_size=100,
            per_cell=20, sample_size=30, sample_seed=1234)
    grid, arrays = load_grid(grid_path), members(cifar10c_archive[0])
    split = load_split(cifar_npz, "test", 100)
    assert set(grid["index"]) <= set(split.index) and len(grid["index"]) == 20
    assert np.bincount(grid["labels"], minlength=10).tolist() == [2] * 10
    for c, name in enumerate(SMOKE["corruptions"]):
        for s in range(5):
            expected = arrays[name][s * 200 + grid["index"]].transpose(0, 3, 1, 2)
            assert np.array_equal(grid["images"][c, s], expected)
    sample = np.load(sample_path)
    assert sample["test_images"].shape == (30, 3, 32, 32) and len(sample["train_images"]) == 0
    for image, corruption, severity, source, label in zip(sample["test_images"], sample["test_corruption"],
                                                          sample["test_severity"], sample["test_source"],
                                                          sample["test_labels"]):
        assert source in split.index  # drawn from the run's test images only
        assert np.array_equal(image, arrays[corruption][(severity - 1) * 200 + source].transpose(2, 0, 1))
        assert label == arrays["labels"][source]
    assert len({(c, s, i) for c, s, i in zip(sample["test_corruption"], sample["test_severity"],
                                             sample["test_source"])}) == 30  # without replacement
    assert len(load_split(sample_path, "test")) == 30  # every stage reads it as a dataset file
    again = tmp_path / "again.npz"
    convert(cifar10c_archive[0], cifar_npz, tmp_path / "g2.npz", again, SMOKE["corruptions"], 100, 20, 30, 1234)
    assert np.array_equal(np.load(again)["test_source"], sample["test_source"])


def test_wrong_archives_are_refused_with_the_reason(cifar10c_archive, cifar_npz, tmp_path):
    arrays = members(cifar10c_archive[0])
    out = (tmp_path / "g.npz", tmp_path / "s.npz")
    shuffled = dict(arrays, labels=np.roll(arrays["labels"], 1))
    with pytest.raises(DataError, match="made from another test set"):
        convert(write_archive(tmp_path / "other.tar", shuffled), cifar_npz, *out, SMOKE["corruptions"])
    with pytest.raises(DataError, match=r"member 'CIFAR-10-C/fog.npy' is missing.*cifar10c.corruptions"):
        convert(write_archive(tmp_path / "part.tar", {k: v for k, v in arrays.items() if k != "fog"}),
                cifar_npz, *out, SMOKE["corruptions"])
    objects = dict(arrays, fog=np.array([{"payload": 1}] * 3, dtype=object))
    with pytest.raises(DataError, match="fog.npy' is not a readable array file"):  # never unpickled
        convert(write_archive(tmp_path / "pickle.tar", objects, allow_pickle=True), cifar_npz, *out,
                SMOKE["corruptions"])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(cifar10c_archive[0].read_bytes()[:300_000])
    with pytest.raises(DataError, match="truncated or corrupt|not a readable array file"):
        convert(truncated, cifar_npz, *out, SMOKE["corruptions"])
    with pytest.raises(DataError, match="the pool holds 3000"):
        convert(cifar10c_archive[0], cifar_npz, *out, SMOKE["corruptions"], sample_size=3001)
    assert not any(path.exists() for path in out)  # nothing half-written


class MeanColour(torch.nn.Module):
    """Predicts class 0 for dark images and 1 for bright ones: its accuracy moves with brightness alone."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # prediction reads the device from the parameters

    def forward(self, x):
        bright = self.scale * x.mean(dim=(1, 2, 3))
        return torch.stack([-bright, bright] + [torch.full_like(bright, -9)] * 8, dim=1)


def test_evaluate_scores_every_cell_and_positions_only_models_ignore_corruptions(cifar10c_archive, cifar_npz,
                                                                                 tmp_path):
    convert(cifar10c_archive[0], cifar_npz, tmp_path / "grid.npz", tmp_path / "s.npz", SMOKE["corruptions"],
            100, 20, 30)
    grid = load_grid(tmp_path / "grid.npz")
    clean = torch.from_numpy(np.load(cifar_npz)["test_images"][grid["index"]])
    results = evaluate(MeanColour(), Normalizer(), grid, clean)
    assert len(results) == 1 + 3 * 5 and results.loc[0, "corruption"] == "none"
    for _, row in results.iterrows():
        images = clean if row["corruption"] == "none" else torch.from_numpy(
            grid["images"][list(grid["corruptions"]).index(row["corruption"]), row["severity"] - 1])
        expected = (MeanColour()(Normalizer()(images)).argmax(1).numpy() == grid["labels"]).mean()
        assert row["accuracy"] == pytest.approx(expected)
    keep = torch.rand(20, 1, 32, 32) < 0.3
    positions = evaluate(MeanColour(), Normalizer(), grid, clean, keep, positions_only=True)
    assert positions["accuracy"].nunique() == 1


def test_the_sample_is_scored_per_cell_on_subsets_chosen_on_each_corrupted_image(cifar10c_archive, cifar_npz,
                                                                                 tmp_path):
    convert(cifar10c_archive[0], cifar_npz, tmp_path / "grid.npz", tmp_path / "s.npz", SMOKE["corruptions"],
            100, 20, 30)
    sample, shift = load_split(tmp_path / "s.npz", "test"), np.load(tmp_path / "s.npz")
    clean = load_split(cifar_npz, "test", 100)
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(30, 1, 32, 32, generator=generator) < 0.05
    clean_keep = torch.rand(100, 1, 32, 32, generator=generator) < 0.05
    results = evaluate_sample(MeanColour(), Normalizer(), sample, shift["test_corruption"], shift["test_severity"],
                              keep, clean, clean_keep)
    assert results.loc[0, "corruption"] == "none" and results.loc[0, "images"] == 100
    expected = (MeanColour()(Normalizer()(clean.images, clean_keep)).argmax(1) == clean.labels).float().mean()
    assert results.loc[0, "accuracy"] == pytest.approx(float(expected))
    assert results["images"][1:].sum() == 30  # every sample image in exactly one cell
    for _, row in results[1:].iterrows():
        rows = torch.from_numpy(np.flatnonzero((shift["test_corruption"] == row["corruption"])
                                               & (shift["test_severity"] == row["severity"])))
        predicted = MeanColour()(Normalizer()(sample.images[rows], keep[rows])).argmax(1)
        assert row["images"] == len(rows)
        assert row["accuracy"] == pytest.approx(float((predicted == sample.labels[rows]).float().mean()))
    # the subsets matter: the same images on other subsets score otherwise
    other = evaluate_sample(MeanColour(), Normalizer(), sample, shift["test_corruption"], shift["test_severity"],
                            ~keep, clean, ~clean_keep)
    assert not np.allclose(other["mean_confidence"], results["mean_confidence"])


def test_the_sample_is_refused_without_both_subsets(tmp_path, capsys):
    from overinterp.cli import main

    assert main(["corruptions", "evaluate", "--sample", "s.npz", "--data", "d.npz", "--model", "m.pt",
                 "--keep-masks", "t.npz", "--out", str(tmp_path / "out.csv")]) == 2
    assert "--sample needs --sample-keep-masks" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


def test_severity_table_averages_corruptions_then_models():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for corruption, drop in (("fog", 0.1), ("snow", 0.3)):
            rows.append({"corruption": "none", "severity": 0, "accuracy": 0.8 + shift})
            rows += [{"corruption": corruption, "severity": s, "accuracy": 0.8 + shift - drop * s} for s in (1, 2)]
        for row in rows[-6:]:
            row.update(architecture="net", kind="single", subset="full", fraction=np.nan, model_id=f"m{seed}")
    rows += [{"corruption": c, "severity": s, "accuracy": 0.5, "architecture": "net", "kind": "single",
              "subset": "positions", "fraction": 0.05, "model_id": "p"}
             for c, s in (("none", 0), ("fog", 1), ("fog", 2))]
    table = severity_table(pd.DataFrame(rows)).set_index("condition")
    full = table.loc["full image"]
    assert full["models"] == 2 and full["clean"] == pytest.approx(0.85)
    assert full["severity 1"] == pytest.approx(0.85 - 0.2) and full["severity 2"] == pytest.approx(0.85 - 0.4)
    assert full["kept of clean"] == pytest.approx((0.65 + 0.45) / 2 / 0.85)
    assert table.loc["positions-only 5%", "kept of clean"] == pytest.approx(1.0)
    named = severity_table(pd.DataFrame(rows).assign(evaluated="original", chosen_on="corrupted"))
    assert "selecting model on BS 5% (corrupted image's subsets)" in set(named["condition"])


@pytest.mark.slow
def test_smoke_run_evaluates_every_model_on_cifar10c_and_selects_on_its_sample(smoke_run):
    results = smoke_run / "results"
    table = pd.read_csv(results / "tables/corruptions.csv")
    chosen = " (corrupted image's subsets)"
    assert set(table["condition"]) == {"full image", "input dropout", "ensemble", "retrained on BS 5%",
                                       "retrained on random 5%", "positions-only 5%",
                                       "selecting model on BS 5%" + chosen, "retrained on BS 5%" + chosen,
                                       "positions-only 5%" + chosen}
    assert table.set_index("condition").loc["full image", "models"] == 2  # both seeds, averaged
    positions = table.set_index("condition").loc["positions-only 5%"]
    assert positions["kept of clean"] == pytest.approx(1.0)  # a corruption moves values, not positions
    cells = pd.read_csv(results / "tables/corruptions-cells.csv")
    assert set(cells["corruption"]) == {"none", *SMOKE["corruptions"]}
    grid = cells[cells["chosen_on"] != "corrupted"]
    assert (grid["images"] == SMOKE["images_per_cell"]).all()
    # on the sample: its images spread over the cells, the clean row the test split on its own subsets
    sample = cells[(cells["chosen_on"] == "corrupted") & (cells["model"] == "tiny-s0")]
    for _, rows in sample.groupby(["evaluated", "subset", "seed"]):
        assert rows["images"].iloc[1:].sum() == SMOKE["sample"]["size"]
        assert rows["images"].iloc[0] == 100 and rows["corruption"].iloc[0] == "none"
    assert len(sample.groupby(["evaluated", "subset", "seed"])) == 1 + 2 * 2  # selecting model; BS, positions x 2 seeds
    for image in ("png", "pdf"):
        assert (results / f"figures/corruptions.{image}").stat().st_size > 10_000
    # backward selection of the sample, and its misclassified-vs-correct rows beside the test images'
    sis = np.load(results / "sis/tiny-s0/gradient/cifar10c.npz")
    assert len(sis["index"]) == SMOKE["sample"]["size"]
    misclassified = pd.read_csv(results / "tables/misclassified_sis.csv")
    assert {"tiny-s0", "tiny-s0 on CIFAR-10-C"} <= set(misclassified["model"])
    summary = json.loads((results / "eval/tiny-s0/cifar10c.json").read_text())
    assert summary["n"] == SMOKE["sample"]["size"]


def test_a_wrong_checksum_names_the_cifar10c_entry(cifar10c_archive, tmp_path):
    from overinterp.data import download

    with pytest.raises(DataError, match=r"set `cifar10c.md5`"):
        download(cifar10c_archive[0].as_uri(), tmp_path / "CIFAR-10-C.tar", "0" * 32, config_key="cifar10c")
    assert not (tmp_path / "CIFAR-10-C.tar").exists()
