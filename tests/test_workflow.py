"""The workflow end to end: a real Snakemake run of the smoke configuration, and the paper's DAG."""
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import BIN, REPO, job_counts, snakemake


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
    # 3 architectures x 3 replicate seeds plus one input-dropout and one adversarially trained model per
    # architecture, from one download; ensembles of each architecture's seeds and one across architectures
    # are evaluated too.
    assert counts["download_cifar10"] == 1
    assert counts["train"] == 9 + 3 + 3
    assert counts["ensemble"] == 3 + 1
    # (and the 6 selecting models on the CIFAR-10-C sample)
    assert counts["evaluate"] == 9 + 3 + 3 + 4 + 6
    assert counts["robustness"] == 3 + 3 and counts["control_masking_retrain"] == 3 * 3 * 3 * 3
    # models retrained on the 6 selecting models' BS, random and positions-only subsets at 4 fractions with 3
    # seeds, but an adversarial model's random-subset models are the standard model's, copied (same masks)
    assert counts["retrain"] == 6 * 3 * 4 * 3 - 3 * 4 * 3 and counts["share_random_retrain"] == 3 * 4 * 3
    # CIFAR-10-C: one download and conversion; every full-image model, and the models retrained on the
    # 6 selecting models' BS, random and positions-only subsets at Table 1's fraction (3 retrain seeds)
    assert counts["download_cifar10c"] == counts["cifar10c_dataset"] == 1
    assert counts["corruptions_full_image"] == 9 + 3 + 3 + 4
    assert counts["corruptions_retrained"] == 6 * 3 * 3
    # and on subsets chosen on each corrupted image of the sample: each selecting model, and the models
    # retrained on its BS and positions-only subsets
    assert counts["corruptions_chosen_on_corrupted"] == 6 * (1 + 2 * 3)
    assert "results/sis/cifar_resnet18-adv-s0/exact/cifar10c.npz" in dry.stdout
    for model in ("cifar_resnet20-s0", "cifar_resnet18-s1", "cifar_vgg16_bn-s2"):
        assert f"results/models/{model}/model.pt" in dry.stdout


# ------------------------------------------------------------------------------ configuration checks
def dry_run(tmp_path, *config):
    return snakemake(tmp_path, "-n", *(["--config", *config] if config else []),
                     configfiles=(REPO / "config/smoke.yaml",), check=False)


@pytest.mark.parametrize("override, message", [
    ("sis={seed: 7}", r"config `sis.seed`: 7 is not one of models.seeds \[0, 1\]"),
    ("humaneval={bs: {count: 80}}", r"config `humaneval`: .*need up to 11 test images per class, but "
                                    r"dataset.test_size = 100 has 10 per class"),
    ("sis={compare_sample: many}", r"'many' is not of type 'integer'"),
])
def test_inconsistent_configurations_fail_before_any_job(tmp_path, override, message):
    result = dry_run(tmp_path, override)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and re.search(message, output), output[-2000:]
    assert not (tmp_path / "results").exists()


def test_numeric_config_overrides_reach_the_rules(tmp_path):
    """`--config sis='{compare_sample: 3}'`: Snakemake hands the 3 over as a string; the schema's types apply."""
    result = dry_run(tmp_path, "sis={compare_sample: 3, shards: 3, tau: 0.5}", "subsets={fractions: [0.00001]}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "--limit 3" in snakemake(tmp_path, "-n", "-p", "--config", "sis={compare_sample: 3}",
                                    configfiles=(REPO / "config/smoke.yaml",)).stdout
    assert "shard2.npz" in out and "random-0.00001.npz" in out and "1e-05" not in out


def test_every_config_value_a_rule_uses_is_a_rerun_trigger(smoke_run):
    """Changing the comparison sample or the shard count reruns the rules that use them (params)."""
    configs = (REPO / "config/smoke.yaml", smoke_run / "source.yaml")
    dry = snakemake(smoke_run, "-n", "--config", "sis={compare_sample: 3}", configfiles=configs)
    assert {"sis_compare", "sis_agreement"} <= set(job_counts(dry.stdout)), dry.stdout[-2000:]
    assert "Params have changed" in dry.stdout + dry.stderr


def test_lint_finds_only_the_justified_finding():
    result = subprocess.run([str(BIN / "snakemake"), "--lint", "--configfile", "config/smoke.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    findings = re.findall(r"^\s+\* (.*):$", result.stdout + result.stderr, re.M)
    # the mirror addresses are deliberately not parameters (workflow/rules/data.smk says why)
    assert findings == [f"Shell command directly uses variable {name} from outside of the rule"
                        for name in ("CIFAR10_URL", "CIFAR10C_URL")], findings


def test_rules_are_snakefmt_formatted():
    snakefmt = shutil.which("snakefmt", path=str(BIN)) or pytest.fail("snakefmt is a test dependency")
    result = subprocess.run([snakefmt, "--check", "Snakefile", "workflow"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args, expected", [
    ("", "--configfile config/quick.yaml"),
    ("--configfile config/smoke.yaml mirror.yaml", "--configfile config/smoke.yaml mirror.yaml"),
    ("--cores 1 --configfile mirror.yaml", "--cores 1 --configfile mirror.yaml"),
])
def test_make_passes_config_files_as_snakemake_would(args, expected):
    """Config files in ARGS replace the Makefile's default (config/quick.yaml) instead of merging over it."""
    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", "run", f"ARGS={args}"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    command = [line for line in result.stdout.splitlines() if "snakemake" in line][-1]
    assert command.strip().endswith(expected) and ("quick.yaml" in command) == ("quick.yaml" in expected), command


def test_make_run_shows_a_failed_jobs_error_on_the_console(cifar_archive, tmp_path):
    """The message is in the job's log; `make run` prints that log, not just its path."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"cifar10:\n  url: {cifar_archive[0].resolve().as_uri()}\n  md5: {'f' * 32}\n")
    args = f"--configfile {REPO / 'config/smoke.yaml'} {bad} --directory {tmp_path / 'run'} data/cifar10/cifar-10-python.tar.gz"
    result = subprocess.run(["make", "-o", ".venv/.installed", "run", f"ARGS={args}", "CORES=1"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    console = result.stdout + result.stderr
    assert result.returncode != 0 and "Checksum mismatch" in console and "verify the source" in console, console[-3000:]


def test_references_to_readme_sections_name_existing_sections():
    headings = set(re.findall(r"^#{2,3} (.+)$", (REPO / "README.md").read_text(), re.M))
    cited = []
    for folder in ("config", "workflow", "src", "profiles"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".yaml", ".smk", ".py", ".rst", ".md"):
                text = path.read_text()
                quoted = r"""(?:"[^"\n]+"|'[^'\n]+')"""
                for match in re.finditer(rf"README,?\s*#?\s*((?:{quoted}(?:,? (?:and )?)?)+)", text):
                    cited += [(path.name, name[1:-1]) for name in re.findall(quoted, match.group(1))]
    assert ("config.yaml", "Configurations") in cited  # a reference that wraps onto the next comment line
    missing = [(f, name) for f, name in cited if name not in headings]
    assert not missing, missing


# -------------------------------------------------------------------------------- a dataset of one's own
def three_class_folder(cifar_imagefolder, root):
    """Three of CIFAR-10's class folders as a user's dataset: train/ and val/ (the test split's name varies)."""
    for split, name in (("train", "train"), ("test", "val")):
        for cls in ("bird", "cat", "ship"):
            shutil.copytree(cifar_imagefolder / split / cls, root / name / cls)
    return root


def folder_config(path, folder, **dataset):
    entry = {"adapter": "imagefolder", "root": str(folder), "test_split": "val", "crop": 24, "resize": 24,
             "train_size": None, "test_size": None, **dataset}
    lines = ["dataset:"] + [f"  {k}: {json.dumps(v)}" for k, v in entry.items()]
    lines += ["models: {architectures: [tiny], seeds: [0]}", "subsets: {fractions: [0.05], retrain_seeds: [0]}",
              "humaneval: {enabled: false}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_an_image_folder_of_its_own_classes_runs_the_same_chain(cifar_imagefolder, tmp_path):
    """`dataset.adapter: imagefolder` is all it takes: three classes at 24x24 go through the same rules as
    CIFAR-10 (dataset file, training, SIS, subsets, retraining, Table 1, the front page)."""
    root = three_class_folder(cifar_imagefolder, tmp_path / "birds-cats-ships")
    config = folder_config(tmp_path / "folder.yaml", root)
    targets = ["results/tables/table1.md", "results/report-front.rst", "results/figures/table1.png"]
    snakemake(tmp_path / "run", "--cores", "2", *targets, configfiles=(REPO / "config/smoke.yaml", config))
    run = tmp_path / "run"
    import numpy as np
    import torch

    arrays = np.load(run / "data/imagefolder/dataset.npz")
    assert arrays["train_images"].shape == (90, 3, 24, 24) and arrays["test_images"].shape == (30, 3, 24, 24)
    assert arrays["classes"].tolist() == ["bird", "cat", "ship"] and arrays["frame"].tolist() == [24, 24]
    model = torch.load(run / "results/models/tiny-s0/model.pt", weights_only=True)
    assert model["state_dict"]["head.weight"].shape[0] == 3  # as many outputs as the folder has classes
    assert model["meta"]["classes"] == ["bird", "cat", "ship"] and model["meta"]["crop"] == 24
    table1 = pd.read_csv(run / "results/tables/table1.csv")
    assert {"full images", "backward selection (trained and tested)", "random (trained and tested)"} <= set(
        table1["condition"])
    assert (table1["test_images"] == 30).all()
    front = (run / "results/report-front.rst").read_text()
    assert "the image folder birds-cats-ships (3 classes)" in front and "(chance 33.3%)" in front
    assert not (run / "data/cifar10").exists()  # nothing of CIFAR-10 was fetched

    # `stream: true`: the dataset file lists the files and every stage reads them from the folder; the same
    # rules give the same models, SIS and Table 1.
    streamed = tmp_path / "streamed"
    config = folder_config(tmp_path / "streamed.yaml", root, stream=True)
    snakemake(streamed, "--cores", "2", "results/tables/table1.md", configfiles=(REPO / "config/smoke.yaml", config))
    listed = np.load(streamed / "data/imagefolder/dataset.npz")
    assert "train_images" not in listed and len(listed["train_files"]) == 90
    for path in ("results/models/tiny-s0/model.pt", "results/retrain/tiny-s0/gradient-bs-0.05-s0/model.pt"):
        a, b = (torch.load(r / path, weights_only=True)["state_dict"] for r in (run, streamed))
        assert all(torch.equal(a[k], b[k]) for k in a), path
    pd.testing.assert_frame_equal(table1, pd.read_csv(streamed / "results/tables/table1.csv"))


def test_an_image_folder_entry_is_checked_before_anything_runs(cifar_imagefolder, tmp_path):
    root = three_class_folder(cifar_imagefolder, tmp_path / "mine")
    smoke = REPO / "config/smoke.yaml"
    cases = [
        ({"root": str(tmp_path / "absent")}, "has no train/ folder"),
        ({"root": None}, "`dataset.root`: is not set"),
        ({"train_size": 100}, "100 is not a multiple of the 3 classes"),
    ]
    for override, message in cases:
        config = folder_config(tmp_path / "bad.yaml", root, **override)
        done = snakemake(tmp_path / "run", "-n", configfiles=(smoke, config), check=False)
        assert done.returncode != 0 and message in done.stdout + done.stderr, done.stdout[-2000:]
    # The study offers number keys: more than ten classes need humaneval.enabled: false.
    many = tmp_path / "many"
    for k in range(11):
        (many / "train" / f"c{k}").mkdir(parents=True)
    config = folder_config(tmp_path / "bad.yaml", many)
    config.write_text(config.read_text().replace("humaneval: {enabled: false}", "humaneval: {enabled: true}"))
    done = snakemake(tmp_path / "run", "-n", configfiles=(smoke, config), check=False)
    assert done.returncode != 0 and "Set humaneval.enabled: false" in done.stdout + done.stderr
    # A test split that is not there is named by the dataset job.
    config = folder_config(tmp_path / "bad.yaml", root, test_split="test")
    done = snakemake(tmp_path / "run", "--cores", "1", "--show-failed-logs", "data/imagefolder/dataset.npz",
                     configfiles=(smoke, config), check=False)
    assert done.returncode != 0 and "the workflow needs 'train' and 'test'" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_pretrained_selecting_model_goes_through_the_same_chain(cifar_imagefolder, tmp_path):
    """`models.pretrained`: a torchvision network with the user's state dict (three classes) is made a model
    file for the dataset and selects the subsets; fresh networks of its architecture retrain on them."""
    import numpy as np
    import torch
    import torchvision

    root = three_class_folder(cifar_imagefolder, tmp_path / "birds-cats-ships")
    torch.manual_seed(0)
    weights = tmp_path / "mine.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    config = folder_config(tmp_path / "pretrained.yaml", root)
    config.write_text(config.read_text().replace(
        "models: {architectures: [tiny], seeds: [0]}",
        f"models: {{architectures: [], seeds: [0], pretrained: {{mine: {{model: 'torchvision:resnet18', "
        f"weights: '{weights}'}}}}}}"))
    run = tmp_path / "run"
    targets = ["results/tables/table1.md", "results/report-front.rst"]
    snakemake(run, "--cores", "2", *targets, configfiles=(REPO / "config/smoke.yaml", config))
    model = torch.load(run / "results/models/pretrained-mine/model.pt", weights_only=True)
    assert model["arch"] == "torchvision:resnet18" and model["meta"]["classes"] == ["bird", "cat", "ship"]
    assert model["meta"]["pretrained"] == {"model": "torchvision:resnet18", "weights": str(weights)}
    given = torch.load(weights, weights_only=True)
    assert all(torch.equal(given[k], model["state_dict"][k]) for k in given)
    retrained = torch.load(run / "results/retrain/pretrained-mine/gradient-bs-0.05-s0/model.pt", weights_only=True)
    assert retrained["arch"] == "torchvision:resnet18" and retrained["state_dict"]["fc.weight"].shape[0] == 3
    table1 = pd.read_csv(run / "results/tables/table1.csv")
    assert set(table1["architecture"]) == {"pretrained-mine"}
    assert {"full images", "backward selection (trained and tested)", "random (trained and tested)",
            "backward selection (original model)"} <= set(table1["condition"])
    full = table1[table1["condition"] == "full images"]
    predictions = pd.read_csv(run / "results/eval/pretrained-mine/full.csv")
    assert np.isclose(full["accuracy_mean"].item(), (predictions["prediction"] == predictions["label"]).mean())
    assert "pretrained-mine" in (run / "results/report-front.rst").read_text()
    assert not (run / "results/models/tiny-s0").exists()  # nothing trained from scratch


def test_smoke_run_runs_the_four_controls(smoke_run):
    results = smoke_run / "results"
    smoothed = pd.read_csv(results / "controls/smoothed/tiny-s0.csv")
    assert set(smoothed["subset"]) >= {"bs"} and (smoothed["dilated_kept"] >= smoothed["kept"]).all()
    targeted = pd.read_csv(results / "controls/targeted/tiny-s0.csv")
    assert len(targeted) == 4 * 10 and targeted.groupby("index")["predicted"].sum().eq(1).all()
    swap = pd.read_csv(results / "controls/swap/tiny-s0.csv")
    assert set(swap["model"]) == {"original", "retrained on BS s0", "retrained on BS s1",
                                  "retrained on random s0", "retrained on random s1"}
    assert (swap["label"] != swap["partner_label"]).all() and len(swap) == 5 * 100
    # the masking control: backward selection under each fill at the control's size (90/30 images, fewer
    # than the run's: the mean colour too), and models retrained under it
    for fill in ("mean", "noise", "impute"):
        for split, size in (("train", 90), ("test", 30)):
            shards = sorted((results / f"sis/tiny-s0/gradient-{fill}/{split}").glob("shard*.npz"))
            rows = 0
            for shard in shards:
                with np.load(shard) as sis:
                    assert json.loads(str(sis["meta"])).get("fill", "mean") == fill
                    rows += len(sis["index"])
            assert len(shards) == 2 and rows == size
    summaries = [json.loads(p.read_text()) for p in sorted((results / "controls/masking").rglob("test.json"))]
    assert sorted((s["fill"], s["subset"]) for s in summaries) == sorted(
        (f, k) for f in ("mean", "noise", "impute") for k in ("bs", "random", "positions"))
    assert all(s["n"] == 30 for s in summaries)
    table = pd.read_csv(results / "tables/controls_masking.csv")
    assert list(table["fill"]) == ["mean", "noise", "impute"]
    np.testing.assert_allclose(table["bs_minus_random"], table["bs_accuracy"] - table["random_accuracy"])
    for name in ("smoothed", "targeted", "masking", "swap"):
        assert (smoke_run / f"logs/controls/{name}-report.log").exists()
    assert (results / "benchmarks/controls/targeted/tiny-s0.tsv").exists()
