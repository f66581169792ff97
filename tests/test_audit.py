"""`overinterp audit` on real CIFAR-10 PNGs with a model trained here and saved in every form an auditor has.

The model is the project's tiny network trained for a few epochs at 16x16 (so that exact backward selection
of one image takes a fraction of a second). Every form of the same weights must give the same audit: the
adapters change how a model is read, never what it computes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from overinterp.classifiers import load_classifier
from overinterp.cli import main
from overinterp.data import CIFAR10_MEAN, CIFAR10_STD, Normalizer, Split
from overinterp.datasets import ImageFolder, class_balanced, open_dataset
from overinterp.models import TinyNet, build_model, save_model
from overinterp.sis import BackSelectResult
from overinterp.train import Recipe, train_model

pytestmark = pytest.mark.usefixtures("one_thread")
FRAME = ["--crop", "16"]
FACTORY = '''
import torch
from torch import nn
from overinterp.data import CIFAR10_MEAN, CIFAR10_STD
from overinterp.models import TinyNet


class RawInput(nn.Module):
    """Takes [0, 1] images and normalises them itself, as deployed models often do."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        # float64 constants, so that a float64 audit computes exactly what the project's normalisation does
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def tiny():
    return TinyNet()


def tiny_softmax():
    return nn.Sequential(TinyNet(), nn.Softmax(dim=1))


def feature_maps():
    return nn.Conv2d(3, 10, 3)
'''


@pytest.fixture(scope="module")
def forms(cifar_imagefolder, tmp_path_factory) -> dict:
    """The same trained weights as a project model file, a state dict, TorchScript (raw [0, 1] inputs), a
    factory, a softmax-terminated factory, and a whole pickled module (which must be refused)."""
    out = tmp_path_factory.mktemp("forms")
    train = ImageFolder(cifar_imagefolder, frame=(16, 16)).load("train")
    split = Split(train.images, torch.from_numpy(train.labels), np.arange(len(train)), list(train.classes))
    normalizer = Normalizer()
    recipe = Recipe(epochs=10, batch_size=32, lr=0.05, milestones=[7], crop_padding=2)
    model, _ = train_model("tiny", split, recipe, 0, normalizer, torch.device("cpu"), progress=False)
    model = model.eval().to(memory_format=torch.contiguous_format)
    save_model(out / "tiny.pt", model, "tiny", resize=16, crop=16,
               normalize={"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)})
    torch.save(model.state_dict(), out / "state.pt")
    torch.save(nn.Sequential(model, nn.Softmax(dim=1)).state_dict(), out / "softmax_state.pt")
    torch.save(model, out / "module.pt")
    (out / "pkg").mkdir()
    (out / "pkg" / "usernets.py").write_text(FACTORY)
    sys.path.insert(0, str(out / "pkg"))
    try:
        import usernets

        torch.jit.script(usernets.RawInput(model.double())).save(str(out / "raw.ts"))
        model.float()
    finally:
        sys.path.remove(str(out / "pkg"))
        sys.modules.pop("usernets", None)
    return {"dir": out, "data": cifar_imagefolder}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def audit(forms, out: Path, *args: str, check: bool = True, limit: int = 20) -> Run:
    """``overinterp audit ...`` through the command line's own entry point (in this process: the imports are
    paid once; the tests below that need a real process start one)."""
    argv = ["audit", *args, "--data", str(forms["data"]), "--limit", str(limit), "--tau", "0.5", "--taus", "0.3,0.5",
            "--dtype", "float64", "--out", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.path.insert(0, str(forms["dir"] / "pkg"))
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = main(argv)
            except SystemExit as exit:  # argparse's usage errors
                returncode = exit.code
    finally:
        sys.path.remove(str(forms["dir"] / "pkg"))
        sys.modules.pop("usernets", None)
    run = Run(returncode, stdout.getvalue(), stderr.getvalue())
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def form_audits(forms, tmp_path_factory) -> dict:
    """The same 10 test images audited through every form of the same model: {form: (out dir, result, summary)}."""
    d = forms["dir"]
    runs = {
        "project file": ["--model", str(d / "tiny.pt")],
        "architecture + state dict": ["--model", "tiny", "--weights", str(d / "state.pt"), *FRAME],
        # A raw-input model does not say what data it was trained on: its mean colour is given.
        "TorchScript, raw inputs": ["--model", str(d / "raw.ts"), "--normalize", "none", *FRAME,
                                    "--mean-colour", ",".join(map(str, CIFAR10_MEAN))],
        "factory + state dict": ["--model", "usernets:tiny", "--weights", str(d / "state.pt"),
                                 "--normalize", "cifar10", *FRAME],
        "softmax factory": ["--model", "usernets:tiny_softmax", "--weights", str(d / "softmax_state.pt"),
                            "--normalize", "cifar10", *FRAME],
        "softmax factory, --output logits": ["--model", "usernets:tiny_softmax", "--weights",
                                             str(d / "softmax_state.pt"), "--normalize", "cifar10", *FRAME,
                                             "--output", "logits"],
    }
    audits = {}
    for name, args in runs.items():
        out = tmp_path_factory.mktemp("audit")
        audit(forms, out, *args, limit=10)
        audits[name] = (out, BackSelectResult.load(out / "backselect.npz"),
                        json.loads((out / "summary.json").read_text()))
    return audits


def test_every_form_of_the_same_model_gives_the_same_audit(form_audits):
    results = {name: result for name, (_, result, _) in form_audits.items() if "--output" not in name}
    summaries = {name: summary for name, (_, _, summary) in form_audits.items()}
    reference = results["project file"]
    assert reference.height == reference.width == 16 and len(reference) == 10
    for name, result in results.items():
        # float64 runs, stored as float32: equal to a float32 ulp or two.
        np.testing.assert_array_equal(result.target, reference.target, err_msg=name)
        np.testing.assert_allclose(result.full_confidence, reference.full_confidence, rtol=0, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(result.values, reference.values, rtol=0, atol=1e-7, err_msg=name)
        assert (result.order == reference.order).mean() > 0.99, name
        assert summaries[name]["accuracy"] == summaries["project file"]["accuracy"]
    # Same arithmetic in the same order: bit for bit.
    for name in ("architecture + state dict", "factory + state dict"):
        np.testing.assert_array_equal(results[name].order, reference.order, err_msg=name)
    assert summaries["softmax factory"]["output"] == "probabilities"
    assert summaries["project file"]["output"] == "logits"
    assert summaries["TorchScript, raw inputs"]["normalize"] is None
    # Every form masks with the same colour: the mean the model was normalised with.
    for name, summary in summaries.items():
        np.testing.assert_allclose(summary["mean_colour"], CIFAR10_MEAN)


def test_a_probability_output_is_not_put_through_a_second_softmax(forms, form_audits):
    d = forms["dir"]
    detected = pd.read_csv(form_audits["softmax factory"][0] / "predictions.csv")
    forced = pd.read_csv(form_audits["softmax factory, --output logits"][0] / "predictions.csv")
    model = TinyNet()
    model.load_state_dict(torch.load(d / "state.pt", weights_only=True))
    images = ImageFolder(forms["data"], frame=(16, 16)).load("test", 10)
    true = model.eval()(Normalizer()(images.images)).softmax(1).max(1).values.detach().numpy()
    np.testing.assert_allclose(detected["confidence"], true, atol=1e-5)
    # Re-softmaxing squashes every confidence towards 1/10: the error the detection prevents.
    assert (forced["confidence"] < detected["confidence"] - 0.01).all()
    assert forced["confidence"].max() < 0.25


def test_the_report_opens_with_the_headline_and_every_number_is_in_a_file(forms, tmp_path):
    done = audit(forms, tmp_path, "--model", str(forms["dir"] / "tiny.pt"), "--fractions", "0.05,0.2", limit=30)
    summary = json.loads((tmp_path / "summary.json").read_text())
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    sizes = pd.read_csv(tmp_path / "sis_sizes.csv")
    sweep = pd.read_csv(tmp_path / "subsets.csv")
    assert len(predictions) == 30 and predictions["label"].value_counts().eq(3).all()  # class-balanced
    assert summary["accuracy"] == pytest.approx(predictions["correct"].mean())
    assert summary["accuracy"] > 0.2  # the trained model is better than chance (0.1)
    size = predictions["sis_percent_tau0.5"]
    assert summary["overinterpretation_share"] == pytest.approx((size <= 5).mean())
    assert sizes["tau"].tolist() == [0.3, 0.5]
    assert sizes.loc[1, "confident"] == size.notna().sum()
    assert sizes.loc[1, "correct"] + sizes.loc[1, "misclassified"] == size.notna().sum()
    assert sorted(sweep["fraction"].unique()) == [0.05, 0.2] and set(sweep["subset"]) == {"backselect", "random"}
    assert sweep["pixels"].tolist() == [13, 13, 52, 52]  # ceil(5% of 256), ceil(20% of 256)
    # Its own last-removed pixels keep the model far more confident than as many random pixels.
    bs, random = (sweep[(sweep.subset == s) & (sweep.fraction == 0.2)].iloc[0] for s in ("backselect", "random"))
    assert bs["confidence"] > random["confidence"] + 0.05
    page = (tmp_path / "report.html").read_text()
    head = page[: page.index("<h2>")]
    assert f"{100 * summary['accuracy']:.1f}%" in head
    assert f"{100 * summary['overinterpretation_share']:.1f}%" in head
    assert page.count('src="data:image/png;base64,') == 3 and not re.search(r"(src|href)=\"?http", page)
    assert "report.html" in done.stdout and "accuracy" in done.stdout
    result = BackSelectResult.load(tmp_path / "backselect.npz")
    assert result.meta["model"].startswith("model file") and result.meta["evaluator"] == "full-forward"


def test_a_killed_audit_resumes_and_a_finished_one_is_reused(forms, tmp_path):
    args = [sys.executable, "-m", "overinterp", "--threads", "1", "audit", "--model", str(forms["dir"] / "tiny.pt"),
            "--data", str(forms["data"]), "--limit", "16", "--dtype", "float64", "--checkpoint-seconds", "0",
            "--out", str(tmp_path / "killed")]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = tmp_path / "killed" / "backselect.partial.npz"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if partial.exists() and len(BackSelectResult.load(partial)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(BackSelectResult.load(partial))
    assert 3 <= done_before < 16
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} of 16 images already done" in resumed.stderr
    whole = subprocess.run(args[:-1] + [str(tmp_path / "whole")], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0
    a, b = (BackSelectResult.load(tmp_path / name / "backselect.npz") for name in ("killed", "whole"))
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.values, b.values)
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert "reusing the orderings" in again.stderr and "BackSelect:" not in again.stderr


def _error(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("overinterp audit: error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_bad_models_get_one_line_errors_that_name_the_fix(forms, tmp_path):
    d = forms["dir"]
    cases = {
        ("--model", str(d / "module.pt")): ["pickled Python object", "could run code", "state_dict()", "TorchScript"],
        ("--model", str(d / "state.pt")): ["holds weights but no architecture", "--model ARCH --weights"],
        ("--model", "cifar_resnet20", "--weights", str(d / "state.pt")): ["does not fit the architecture",
                                                                          "missing (e.g. ", "unexpected (e.g. "],
        ("--model", "nowhere.factories:build"): ["cannot import 'nowhere.factories'", "PYTHONPATH"],
        ("--model", "usernets:missing"): ["usernets has no callable 'missing'"],
        ("--model", "usernets:feature_maps", *FRAME): ["returns shape (", "expected (N, classes)"],
        ("--model", "no_such_net"): ["unknown model 'no_such_net'", "TorchScript file"],
        ("--model", str(d / "tiny.pt"), "--classes", "cat,dog"): ["not in the given class list"],
        ("--model", str(d / "tiny.pt"), "--normalize", "0.5,0.5"): ["--normalize '0.5,0.5'", "six numbers"],
    }
    for args, phrases in cases.items():
        line = _error(audit(forms, tmp_path, *args, check=False, limit=4))
        for phrase in phrases:
            assert phrase in line, (args, line)


def test_bad_image_folders_get_one_line_errors_that_list_the_files(forms, tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / "test" / name).mkdir(parents=True)
        for k, source in enumerate(sorted((forms["data"] / "test" / name).iterdir())[:3]):
            (root / "test" / name / f"{k}.png").write_bytes(source.read_bytes())
    (root / "test" / "cat" / "notes.txt").write_text("not an image")
    good = (root / "test" / "dog" / "0.png").read_bytes()
    (root / "test" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    args = ["--model", "usernets:tiny", "--weights", str(forms["dir"] / "state.pt"), *FRAME]

    def run(*extra):
        return audit({**forms, "data": root}, tmp_path / "out", *args, *extra, check=False)

    # Once as a user runs it, in a process of its own: one line on stderr, exit status 2, no traceback.
    process = subprocess.run([sys.executable, "-m", "overinterp", "audit", *args, "--data", str(root), "--out",
                              str(tmp_path / "out")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(forms["dir"] / "pkg")})
    assert "2 file(s)" in _error(process)
    line = _error(run())
    assert "2 file(s)" in line and "not readable images" in line
    assert "notes.txt" in run().stderr and "truncated.png" in run().stderr
    (root / "test" / "cat" / "notes.txt").unlink()
    (root / "test" / "dog" / "truncated.png").unlink()
    (root / "test" / "bird").mkdir()
    assert "hold no images" in _error(run()) and "bird" in _error(run())
    (root / "test" / "bird").rmdir()
    # Two classes for a ten-class model: the class count is checked before any work.
    assert "has 10 outputs but the dataset has 2 classes" in _error(run())
    assert "has no split 'val'" in _error(run("--split", "val"))


def test_image_folder_adapter_reads_the_same_pixels_as_the_cifar10_adapter(cifar_imagefolder, cifar_npz, tmp_path):
    folder = ImageFolder(cifar_imagefolder).load("test")
    assert folder.classes == tuple(sorted(folder.classes)) and len(folder) == 100
    assert folder.images.shape[1:] == (3, 32, 32) and folder.images.dtype == torch.uint8
    assert all(i.startswith("test/") and i.endswith(".png") for i in folder.ids)
    # The class list fixes the label numbers: reversed names, reversed labels.
    reversed_names = list(reversed(folder.classes))
    relabelled = ImageFolder(cifar_imagefolder, classes=reversed_names).load("test")
    np.testing.assert_array_equal(relabelled.labels, 9 - folder.labels)
    cifar = open_dataset(str(cifar_npz)).load("test")
    assert cifar.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    # Every PNG of a class is one of the converted dataset's images of that class, pixel for pixel.
    for c, name in enumerate(folder.classes):
        pngs = {bytes(im.numpy().tobytes()) for im in folder.images[folder.labels == c]}
        arrays = {bytes(im.numpy().tobytes()) for im in cifar.images[cifar.labels == cifar.classes.index(name)]}
        assert len(pngs) == 10 and pngs <= arrays, name


def test_class_balanced_limits_are_prefixes_of_one_ordering():
    labels = np.array([0, 0, 0, 1, 2, 2, 1, 0, 2])
    assert class_balanced(labels, 3, 3).tolist() == [0, 3, 4]
    assert set(class_balanced(labels, 3, 3)) <= set(class_balanced(labels, 6, 3))
    assert sorted(labels[class_balanced(labels, 6, 3)].tolist()) == [0, 0, 1, 1, 2, 2]
    assert class_balanced(labels, None, 3).tolist() == list(range(9))


def test_old_architecture_names_still_load_with_a_deprecation_message(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        model = build_model("resnet20")
    assert "deprecated" in caplog.text and "cifar_resnet20" in caplog.text
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_model("cifar_resnet20").parameters())
    torch.save({"arch": "resnet20", "state_dict": model.state_dict(), "meta": {}}, tmp_path / "old.pt")
    classifier = load_classifier(str(tmp_path / "old.pt"))
    assert classifier.normalize == (CIFAR10_MEAN, CIFAR10_STD)  # files of earlier versions: the CIFAR convention
    save_model(tmp_path / "new.pt", model, "resnet20")
    assert torch.load(tmp_path / "new.pt", weights_only=True)["arch"] == "cifar_resnet20"


def test_torchvision_models_by_name_take_a_state_dict_with_the_datasets_class_count(tmp_path):
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "finetuned.pt")
    classifier = load_classifier("torchvision:resnet18", str(tmp_path / "finetuned.pt"), num_classes=3)
    assert classifier.module.fc.out_features == 3 and not classifier.module.training
    assert classifier.source.startswith("torchvision:resnet18")
    with pytest.raises(Exception, match="has no weights 'NOPE'; it has IMAGENET1K_V1"):
        load_classifier("torchvision:resnet18", "NOPE")
    with pytest.raises(Exception, match="torchvision has no model 'resnet19'"):
        load_classifier("torchvision:resnet19", "IMAGENET1K_V1")


def test_the_readme_audit_example_names_options_that_exist():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Audit your own model"):]
    section = section[: section.index("\n## ", 4)]
    help_text = subprocess.run([sys.executable, "-m", "overinterp", "audit", "--help"], capture_output=True,
                               text=True).stdout
    audit_lines = [line for line in section.splitlines()
                   if not line.startswith("snakemake") and "overinterp publish" not in line]
    used = set(re.findall(r"(--[a-z][a-z-]+)", "\n".join(audit_lines)))
    assert used and all(option in help_text for option in used), used - set(help_text.split())


def test_every_subcommand_is_mapped_to_the_module_that_defines_it():
    import argparse

    from overinterp import cli

    for module in set(cli.COMMANDS.values()):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        __import__(f"overinterp.{module}", fromlist=["add_commands"]).add_commands(sub)
        for name in sub.choices:
            assert cli.COMMANDS.get(name) == module, name
    assert sorted(cli.build_parser()._subparsers._group_actions[0].choices) == sorted(cli.COMMANDS)
    assert cli._command_in(["--threads", "1", "audit", "--model", "x"]) == "audit"


def test_the_workflow_runs_a_sharded_audit_that_equals_a_single_one(forms, tmp_path):
    """config `audits` through Snakemake: two shard jobs and the audit job; the same numbers as one process."""
    from conftest import REPO, job_counts, snakemake

    settings = {"model": str(forms["dir"] / "tiny.pt"), "data": str(forms["data"]), "limit": 12, "tau": 0.5,
                "taus": [0.3, 0.5], "dtype": "float64", "fractions": [0.05, 0.2]}
    config = tmp_path / "audit.yaml"
    config.write_text(json.dumps({"cifar10": {"enabled": False}, "audits": {"mine": {**settings, "shards": 2}}}))
    run = snakemake(tmp_path, "--cores", "2", configfiles=(REPO / "config/config.yaml", config))
    counts = job_counts(run.stdout + run.stderr)
    assert counts["audit_orderings"] == 2 and counts["audit_report"] == 1
    out = tmp_path / "results/audit/mine"
    single = tmp_path / "single"
    audit(forms, single, "--model", settings["model"], "--fractions", "0.05,0.2", limit=12)
    a, b = BackSelectResult.load(out / "backselect.npz"), BackSelectResult.load(single / "backselect.npz")
    np.testing.assert_array_equal(a.order, b.order)
    assert json.loads((out / "summary.json").read_text())["accuracy"] == json.loads(
        (single / "summary.json").read_text())["accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "subsets.csv"), pd.read_csv(single / "subsets.csv"))
    for shard in ("0000", "0001"):
        assert (tmp_path / f"logs/audit/sis/mine/{shard}.log").exists()
        assert (tmp_path / f"results/benchmarks/audit/sis/mine/{shard}.tsv").exists()
    # Nothing left to do; the report job's page is in the Snakemake report's audit category.
    assert job_counts(snakemake(tmp_path, "-n", configfiles=(REPO / "config/config.yaml", config)).stdout) == {}


def test_the_audit_configuration_chains_training_and_audit(tmp_path):
    from conftest import REPO, job_counts, snakemake

    dry = snakemake(tmp_path, "-n", configfiles=(REPO / "config/audit.yaml",))
    counts = job_counts(dry.stdout)
    assert counts["train"] == 1 and counts["audit_orderings"] == 8 and counts["audit_report"] == 1
    assert "results/models/cifar_resnet20-s0/model.pt" in dry.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("audits:\n  x:\n    data: /data\n")
    failed = snakemake(tmp_path, "-n", configfiles=(REPO / "config/audit.yaml", bad), check=False)
    assert failed.returncode != 0 and "'model' is a required property" in failed.stdout + failed.stderr
