"""SIS sizes of misclassified vs correct images: effect sizes, bootstrap intervals, several thresholds."""
import numpy as np
import pandas as pd
import pytest

from overinterp.analysis import cliffs_delta, misclassified_comparison, sis_sizes
from overinterp.cli import main
from overinterp.sis import BackSelectResult


def test_cliffs_delta_counts_pairs():
    assert cliffs_delta(np.array([1, 2]), np.array([3, 4])) == -1
    assert cliffs_delta(np.array([3, 4]), np.array([1, 2])) == 1
    # a = [1, 3] against b = [2]: one pair above, one below
    assert cliffs_delta(np.array([1, 3]), np.array([2])) == 0
    assert np.isnan(cliffs_delta(np.array([]), np.array([1.0])))


def test_smaller_sis_of_errors_is_found_with_an_interval_that_excludes_zero():
    rng = np.random.default_rng(0)
    sizes = pd.DataFrame({"sis_fraction": np.r_[rng.uniform(0.1, 0.2, 200), rng.uniform(0.02, 0.12, 40)],
                          "correct": np.r_[np.ones(200, bool), np.zeros(40, bool)]})
    row = misclassified_comparison(sizes, draws=500)
    assert (row["correct_n"], row["incorrect_n"]) == (200, 40)
    assert row["median_difference_low"] <= row["median_difference"] <= row["median_difference_high"] < 0
    assert -1 <= row["cliffs_delta_low"] <= row["cliffs_delta"] <= row["cliffs_delta_high"] < -0.5
    assert row["p_value"] < 1e-6
    # two errors amid the correct ones: no interval can be drawn from them (three possible medians)
    few = pd.concat([sizes.iloc[:200], pd.DataFrame({"sis_fraction": [0.12, 0.18], "correct": [False, False]})])
    row = misclassified_comparison(few, draws=500)
    assert row["incorrect_n"] == 2 and np.isnan(row["cliffs_delta_low"]) and np.isfinite(row["cliffs_delta"])
    # twelve errors drawn like the correct ones: the interval holds 0
    alike = pd.concat([sizes.iloc[:200], pd.DataFrame({"sis_fraction": rng.uniform(0.1, 0.2, 12),
                                                       "correct": False})])
    row = misclassified_comparison(alike, draws=500)
    assert row["cliffs_delta_low"] < 0 < row["cliffs_delta_high"]


def test_the_command_compares_at_every_threshold(tmp_path):
    # 4 images of 4 pixels, one pixel a step: f after each step, full confidences 0.995, 0.95, 0.8, 0.75
    values = np.array([[0.999, 0.995, 0.98, 0.5], [0.96, 0.92, 0.6, 0.3], [0.85, 0.75, 0.72, 0.5],
                       [0.74, 0.72, 0.71, 0.2]])
    order = np.tile(np.arange(4), (4, 1))
    result = BackSelectResult(order, values, np.zeros(4, int), np.array([0.995, 0.95, 0.8, 0.75]), 2, 2,
                              index=np.arange(4))
    result.save(tmp_path / "sis.npz")
    pd.DataFrame({"index": range(4), "label": [0, 1, 0, 1], "prediction": [0, 0, 0, 0]}).to_csv(
        tmp_path / "pred.csv", index=False)
    assert main(["tables", "misclassified", "--taus", "0.99", "0.9", "0.7", "--draws", "50",
                 "--entry", "m", str(tmp_path / "sis.npz"), str(tmp_path / "pred.csv"),
                 "--out", str(tmp_path / "mis")]) == 0
    table = pd.read_csv(tmp_path / "mis.csv").set_index("tau")
    assert table["images_at_tau"].to_dict() == {0.99: 1, 0.9: 2, 0.7: 4}
    assert table.loc[0.7, ["correct_n", "incorrect_n"]].tolist() == [2, 2]
    images = pd.read_csv(tmp_path / "mis-images.csv")
    # at 0.9 image 1 keeps f >= 0.9 for two removals: its SIS is 2 of 4 pixels
    assert images.query("tau == 0.9 and index == 1")["sis_fraction"].item() == pytest.approx(0.5)
    assert main(["figures", "misclassified", "--table", str(tmp_path / "mis.csv"),
                 "--images", str(tmp_path / "mis-images.csv"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 10_000
