"""Keep-masks, the comparison tables and agreement with the selecting model."""
import numpy as np
import pandas as pd
import pytest

from overinterp.analysis import comparison_table, markdown_table, table1
from overinterp.evaluate import summarize
from overinterp.sis import kept_count
from overinterp.subsets import load_keep_masks, random_keep, save_keep_masks


def test_kept_count_matches_the_paper():
    assert kept_count(1024, 0.05) == 52
    assert kept_count(299 * 299, 0.1) == 8941
    assert kept_count(1024, 1.0) == 1024


def test_random_keep_counts_and_seed():
    a = random_keep(50, 1024, 52, seed=1234, chunk=7)
    assert (a.sum(1) == 52).all()
    assert np.array_equal(a, random_keep(50, 1024, 52, seed=1234))
    assert not np.array_equal(a, random_keep(50, 1024, 52, seed=5678))
    # Uniform over positions: every pixel is picked about equally often over many images.
    many = random_keep(4000, 64, 8, seed=0).mean(0)
    assert np.allclose(many, 8 / 64, atol=0.03)


def test_packed_random_keep_is_the_same_masks():
    from overinterp.subsets import pack_keep, random_keep_packed

    bits = random_keep_packed(600, 1024, 52, seed=1234, chunk=256)
    assert np.array_equal(bits, pack_keep(random_keep(600, 1024, 52, seed=1234)))
    assert random_keep_packed(3, 10, 0, seed=0).sum() == 0


def test_backselect_subsets_from_shards_by_pixels_or_steps(tmp_path):
    """`subsets backselect` takes a split's shard files in order; --by steps keeps whole steps."""
    from overinterp.cli import main
    from overinterp.sis import BackSelectResult

    rng = np.random.default_rng(0)
    orders = np.argsort(rng.random((5, 20)), axis=1)
    values = np.sort(rng.random((5, 20)), axis=1)[:, ::-1]
    result = BackSelectResult(orders, values, np.zeros(5), np.ones(5), 4, 5, pixels_per_step=3,
                              index=np.arange(100, 105))
    result.select(slice(0, 2)).save(tmp_path / "s0.npz", steps=True)
    result.select(slice(2, 5)).save(tmp_path / "s1.npz")
    for by, kept in (("pixels", 5), ("steps", 2 * 3 - 1)):  # 25% of 20 pixels; ceil(25% of 7 steps) = 2 steps
        out = tmp_path / f"{by}.npz"
        assert main(["subsets", "backselect", "--sis-test", str(tmp_path / "s0.npz"), str(tmp_path / "s1.npz"),
                     "--fraction", "0.25", "--by", by, "--out", str(out)]) == 0
        keep = load_keep_masks(out, "test", np.arange(100, 105)).numpy().reshape(5, -1)
        assert (keep.sum(1) == kept).all()
        # the pixels removed last; for steps, the last two steps (the last one holds 2 pixels)
        last = orders[:, 20 - kept:]
        assert all(set(np.flatnonzero(keep[b])) == set(last[b]) for b in range(5))


def test_keep_mask_file_round_trip_and_mismatch(tmp_path):
    keep = np.random.default_rng(0).random((6, 5 * 7)) < 0.2
    save_keep_masks(tmp_path / "m.npz", 5, 7, test=(np.arange(10, 16), keep))
    loaded = load_keep_masks(tmp_path / "m.npz", "test", np.arange(10, 16))
    assert loaded.shape == (6, 1, 5, 7) and np.array_equal(loaded.numpy().reshape(6, -1), keep)
    with pytest.raises(ValueError, match="other images"):
        load_keep_masks(tmp_path / "m.npz", "test", np.arange(6))
    with pytest.raises(ValueError, match="no keep-masks for the 'train' split"):
        load_keep_masks(tmp_path / "m.npz", "train")


def test_agreement_with_reference():
    table = pd.DataFrame({"index": [0, 1, 2, 3], "label": [0, 1, 2, 3], "prediction": [0, 1, 5, 6],
                          "confidence": [0.9, 0.8, 0.7, 0.6]})
    reference = table.assign(prediction=[0, 4, 5, 3])  # wrong on images 1 and 2
    s = summarize(table, reference)
    assert s["accuracy"] == 0.5 and s["agreement"] == 0.5
    assert s["reference_errors"] == 2 and s["agreement_on_reference_errors"] == 0.5


def summaries():
    rows = []
    for seed, acc in enumerate([0.90, 0.92]):
        rows.append(dict(architecture="resnet20", evaluated="trained", subset="full", seed=seed, accuracy=acc,
                         mean_confidence=0.95))
    for fraction in (0.05, 0.2):
        for subset, accs in (("bs", [0.7, 0.8]), ("random", [0.4, 0.5]), ("positions", [0.6, 0.6])):
            for seed, acc in enumerate(accs):
                rows.append(dict(architecture="resnet20", evaluated="trained", subset=subset, fraction=fraction,
                                 seed=seed, accuracy=acc + fraction, mean_confidence=0.5, agreement=0.9,
                                 agreement_on_reference_errors=0.8))
        for subset in ("bs", "random"):
            rows.append(dict(architecture="resnet20", evaluated="original", subset=subset, fraction=fraction,
                             accuracy=0.3, mean_confidence=0.6))
    return pd.DataFrame(rows)


def test_table1_means_and_spreads():
    table = table1(summaries(), 0.05).set_index("condition")
    assert table.loc["full images", "accuracy_mean"] == pytest.approx(0.91)
    assert table.loc["full images", "accuracy_std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert table.loc["backward selection (trained and tested)", "accuracy_mean"] == pytest.approx(0.80)
    assert table.loc["random (trained and tested)", "replicates"] == 2
    assert table.loc["backward selection (original model)", "mean_confidence"] == pytest.approx(0.6)
    assert table.loc["mask positions only (trained and tested)", "agreement_on_its_errors"] == pytest.approx(0.8)
    assert len(table) == 6  # the 0.2 rows are not in Table 1
    md = markdown_table(table.reset_index())
    assert "91.0 ± 1.4" in md["test accuracy (%)"].tolist()


def test_fraction_sweep_has_every_fraction():
    sweep = comparison_table(summaries()[lambda d: d["subset"] != "full"])
    assert sorted(sweep["fraction"].unique()) == [0.05, 0.2]
    bs = sweep[sweep["condition"] == "backward selection (trained and tested)"].set_index("fraction")
    assert bs.loc[0.2, "accuracy_mean"] == pytest.approx(0.95)


def test_mitigation_table():
    from overinterp.analysis import mitigation_table

    summaries = pd.DataFrame([
        dict(model="m-s0", kind="single", evaluated="trained", subset="full", accuracy=0.9),
        dict(model="m-s0", kind="single", evaluated="original", subset="bs", fraction=0.05, accuracy=0.8,
             mean_confidence=0.7),
        dict(model="m-s0", kind="single", evaluated="trained", subset="bs", fraction=0.05, accuracy=0.6),
        dict(model="ensemble-m", kind="ensemble", evaluated="trained", subset="full", accuracy=0.92),
        dict(model="ensemble-m", kind="ensemble", evaluated="original", subset="bs", fraction=0.05, accuracy=0.5,
             mean_confidence=0.4),
    ])
    sizes = {"m-s0": pd.DataFrame({"sis_fraction": [0.01, 0.03]}),
             "ensemble-m": pd.DataFrame({"sis_fraction": [0.1, 0.2, 0.3]})}
    table = mitigation_table(summaries, sizes, 0.99).set_index("model")
    assert table.loc["ensemble-m", "sis_fraction_median"] == pytest.approx(0.2)
    assert table.loc["ensemble-m", "images_at_tau"] == 3
    assert table.loc["m-s0", "own_bs_confidence"] == pytest.approx(0.7)
    assert table.loc["m-s0", "retrained_bs_accuracy"] == pytest.approx(0.6)
    assert np.isnan(table.loc["ensemble-m", "retrained_bs_accuracy"])
