"""The workflow end to end: a real Snakemake run of the smoke configuration, and the paper's DAG."""
import json

import pandas as pd

from conftest import REPO, job_counts, snakemake


def test_smoke_run_trains_and_evaluates(smoke_run):
    metrics = pd.read_csv(smoke_run / "results/models/tiny-s0/metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    summary = json.loads((smoke_run / "results/eval/tiny-s0/full.json").read_text())
    predictions = pd.read_csv(smoke_run / "results/eval/tiny-s0/full.csv")
    assert summary["n"] == len(predictions) == 100
    assert summary["accuracy"] == (predictions["prediction"] == predictions["label"]).mean()
    assert (predictions["label"].value_counts() == 10).all()  # class-balanced test subset
    for log in ("logs/train/tiny-s0.log", "results/benchmarks/train/tiny-s0.tsv"):
        assert (smoke_run / log).exists(), log


def test_smoke_run_is_complete(smoke_run):
    """Once run, nothing is left to do."""
    dry = snakemake(smoke_run, "-n", configfiles=(REPO / "config/smoke.yaml", smoke_run / "source.yaml"))
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_paper_configuration_builds_its_dag(tmp_path):
    dry = snakemake(tmp_path, "-n", configfiles=(REPO / "config/config.yaml",))
    counts = job_counts(dry.stdout)
    # 3 architectures x 3 replicate seeds plus one input-dropout model per architecture, from one download;
    # ensembles of each architecture's seeds and one across architectures are evaluated too.
    assert counts["download_cifar10"] == 1
    assert counts["train"] == 9 + 3
    assert counts["ensemble"] == 3 + 1
    assert counts["evaluate"] == 9 + 3 + 4
    for model in ("resnet20-s0", "resnet18-s1", "vgg16_bn-s2"):
        assert f"results/models/{model}/model.pt" in dry.stdout
