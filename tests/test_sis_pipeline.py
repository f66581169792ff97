"""The SIS command line: shard runs that survive SIGKILL, merging, and the exact-vs-gradient agreement."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from overinterp.cli import main
from overinterp.models import build_model, save_model
from overinterp.sis import BackSelect, BackSelectResult
from overinterp.sis_commands import agreement, partial_path, rank_correlation, run_shard
from overinterp.utils import load_npz

ARRAYS = ("index", "order", "values", "target", "full_confidence", "height", "width")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, build_model("tiny").eval(), "tiny")
    return path


def sis_args(data, model, out, *extra):
    return ["sis", "--data", str(data), "--model", str(model), "--split", "test", "--method", "gradient",
            "--batch-size", "1", "--pixels-per-step", "64", "--device", "cpu", "--out", str(out), *extra]


def assert_same_result(a, b):
    a, b = load_npz(a), load_npz(b)
    for key in ARRAYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shard_resumes_after_sigkill(cifar_npz, tiny_model, tmp_path):
    whole = tmp_path / "whole.npz"
    assert main(sis_args(cifar_npz, tiny_model, whole, "--limit", "4")) == 0

    out = tmp_path / "killed.npz"
    command = [sys.executable, "-m", "overinterp", *sis_args(cifar_npz, tiny_model, out, "--limit", "4",
                                                             "--checkpoint-seconds", "0")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not partial_path(out).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    done = len(load_npz(partial_path(out))["index"])
    assert 0 < done < 4

    resumed = subprocess.run(command, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 4 images already done" in resumed.stderr
    assert not partial_path(out).exists()
    assert_same_result(out, whole)


def test_shards_merge_into_the_whole_split(cifar_npz, tiny_model, tmp_path):
    whole = tmp_path / "whole.npz"
    assert main(sis_args(cifar_npz, tiny_model, whole, "--limit", "7")) == 0
    shards = [tmp_path / f"shard{i}.npz" for i in range(3)]
    for i, shard in enumerate(shards):
        assert main(sis_args(cifar_npz, tiny_model, shard, "--limit", "7", "--shard", str(i), "--shards", "3")) == 0
    assert [len(load_npz(s)["index"]) for s in shards] == [3, 2, 2]
    merged = tmp_path / "merged.npz"
    assert main(["sis-merge", "--out", str(merged), *map(str, shards[::-1])]) == 0
    assert_same_result(merged, whole)

    assert main(["sis-merge", "--out", str(tmp_path / "bad.npz"), str(shards[0]), str(shards[2])]) == 2
    other = tmp_path / "other.npz"
    assert main(sis_args(cifar_npz, tiny_model, other, "--limit", "7", "--shard", "1", "--shards", "3",
                         "--pixels-per-step", "128")) == 0
    assert main(["sis-merge", "--out", str(tmp_path / "bad.npz"), str(shards[0]), str(other), str(shards[2])]) == 2
    assert not (tmp_path / "bad.npz").exists()


def test_run_shard_exact_resumes_from_a_partial_file(tmp_path):
    """A partial file from an earlier run with the same settings is used; one with other settings is not."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 16, 3))
    images, index = torch.randn(5, 3, 4, 4), np.array([10, 11, 12, 13, 14])
    engine = BackSelect(model, batch_size=16, progress=False)
    whole = run_shard(engine, images, index, tmp_path / "whole.npz", {"run": 1})
    # An earlier run that finished images 1 and 3, with deliberately wrong orders so reuse is visible.
    earlier = whole.select([1, 3])
    earlier.order = earlier.order[:, ::-1].copy()
    earlier.meta = {"run": 1}
    earlier.save(partial_path(tmp_path / "out.npz"), compressed=False)
    resumed = run_shard(engine, images, index, tmp_path / "out.npz", {"run": 1})
    np.testing.assert_array_equal(resumed.order[[0, 2, 4]], whole.order[[0, 2, 4]])
    np.testing.assert_array_equal(resumed.order[[1, 3]], earlier.order)
    np.testing.assert_array_equal(resumed.index, index)
    assert not partial_path(tmp_path / "out.npz").exists()

    earlier.save(partial_path(tmp_path / "fresh.npz"), compressed=False)
    fresh = run_shard(engine, images, index, tmp_path / "fresh.npz", {"run": 2})
    np.testing.assert_array_equal(fresh.order, whole.order)


def test_agreement_measures():
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(100) for _ in range(3)])
    values = np.zeros((3, 100))
    a = BackSelectResult(order, values, [0, 1, 2], [1, 1, 1], 10, 10, index=[5, 6, 7])
    same = BackSelectResult(order[[1, 2]], values[:2], [1, 2], [1, 1], 10, 10, index=[6, 7])
    reverse = BackSelectResult(order[:, ::-1], values, [0, 1, 2], [1, 1, 1], 10, 10, index=[5, 6, 7])
    table, *_ = agreement(a, same, 0.05)
    assert table["index"].tolist() == [6, 7]
    assert (table["overlap"] == 1).all() and np.allclose(table["spearman"], 1)
    table, *_ = agreement(a, reverse, 0.05)
    assert (table["overlap"] == 0).all() and np.allclose(table["spearman"], -1)
    shuffled = BackSelectResult(np.stack([rng.permutation(100) for _ in range(3)]), values, [0, 1, 2], [1, 1, 1],
                                10, 10, index=[5, 6, 7])
    from scipy.stats import spearmanr

    expected = [spearmanr(np.argsort(order[i]), np.argsort(shuffled.order[i]))[0] for i in range(3)]
    np.testing.assert_allclose(rank_correlation(a, shuffled), expected)


def test_agreement_commands(cifar_npz, tiny_model, tmp_path):
    exact, coarse, fine = tmp_path / "exact.npz", tmp_path / "coarse.npz", tmp_path / "fine.npz"
    assert main(sis_args(cifar_npz, tiny_model, exact, "--limit", "1", "--method", "exact", "--batch-size", "512")) == 0
    assert main(sis_args(cifar_npz, tiny_model, coarse, "--limit", "3", "--pixels-per-step", "256")) == 0
    assert main(sis_args(cifar_npz, tiny_model, fine, "--limit", "3", "--pixels-per-step", "16")) == 0
    common = ["--data", str(cifar_npz), "--model", str(tiny_model), "--device", "cpu"]
    assert main(["sis-agreement", "--exact", str(exact), "--gradient", str(coarse), *common,
                 "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["sis-agreement", "--exact", str(fine), "--gradient", str(fine), *common,
                 "--out", str(tmp_path / "same.csv")]) == 0
    a, same = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "same.csv")
    assert len(a) == 1 and a["kept_pixels"].eq(52).all() and a["overlap"].between(0, 1).all()
    # f on the exact method's kept 52 pixels is BackSelect's own value after the first 972 removals.
    exact_result = BackSelectResult.load(exact)
    assert exact_result.meta["method"] == "exact"
    assert exact_result.meta["evaluator"].startswith("incremental"), exact_result.meta  # tiny: all local
    assert a["exact_kept_confidence"].iloc[0] == pytest.approx(exact_result.values[0, 1024 - 52 - 1], abs=1e-5)
    assert same["overlap"].eq(1).all() and np.allclose(same["spearman"], 1)
    assert np.allclose(same["exact_kept_confidence"], same["gradient_kept_confidence"])
    assert main(["sis-agreement-table", "--csv", str(tmp_path / "t.csv"), "--markdown", str(tmp_path / "t.md"),
                 f"m1={tmp_path / 'a.csv'}", f"m2={tmp_path / 'same.csv'}"]) == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert table["model"].tolist() == ["m1", "m2"] and table["overlap_mean"].iloc[1] == 1
    assert table["overlap_chance"].iloc[0] == pytest.approx(52 / 1024)
    assert "kept pixels shared, mean (%)" in (tmp_path / "t.md").read_text()  # the readable form


def test_step_form_shards_merge_and_size_random_subsets_by_steps(cifar_npz, tiny_model, tmp_path):
    """`sis --steps` stores the gradient steps; `sis-merge` keeps that form; `subsets random --by steps`
    keeps as many pixels as `subsets backselect --by steps`, and the exact method refuses --steps."""
    shards = [tmp_path / f"shard{i}.npz" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main(sis_args(cifar_npz, tiny_model, shard, "--limit", "4", "--steps", "--shard", str(i),
                             "--shards", "2")) == 0
    orders = tmp_path / "orders.npz"
    assert main(sis_args(cifar_npz, tiny_model, orders, "--limit", "4")) == 0
    merged = tmp_path / "merged.npz"
    assert main(["sis-merge", "--out", str(merged), *map(str, shards)]) == 0
    stored = load_npz(merged)
    assert "order" not in stored and stored["removal_step"].shape == (4, 1024)
    steps, full = BackSelectResult.load(merged), BackSelectResult.load(orders)
    np.testing.assert_array_equal(steps.removal_step(), full.removal_step())
    np.testing.assert_allclose(steps.values, full.values, rtol=1e-6)
    assert steps.meta["storage"] == "steps" and full.meta["storage"] == "orders"
    # 10% of the 16 steps of 64 pixels: ceil(1.6) = 2 steps = 128 pixels, for both kinds of subset.
    bs, random = tmp_path / "bs.npz", tmp_path / "random.npz"
    assert main(["subsets", "backselect", "--sis-test", str(merged), "--fraction", "0.1", "--by", "steps",
                 "--out", str(bs)]) == 0
    assert main(["subsets", "random", "--data", str(cifar_npz), "--fraction", "0.1", "--by", "steps",
                 "--pixels-per-step", "64", "--out", str(random)]) == 0
    assert (np.unpackbits(load_npz(bs)["test_keep"], axis=1).sum(1) == 128).all()
    assert (np.unpackbits(load_npz(random)["test_keep"], axis=1).sum(1) == 128).all()
    exact = sis_args(cifar_npz, tiny_model, tmp_path / "exact.npz", "--limit", "1", "--steps")
    exact[exact.index("gradient")] = "exact"
    assert main(exact) == 2
