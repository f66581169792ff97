"""Sharing artifacts through DVC: run the smoke workflow, publish to a local directory remote, clone,
pull, and Snakemake has nothing to redo, while a later config change still reruns what depends on it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import BIN, REPO, job_counts, require_program, source_config
from overinterp.artifacts import publish, workflow_outputs
from overinterp.data import DataError

ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
           GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
           GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")


def run(cwd, *cmd, check=True) -> subprocess.CompletedProcess:
    """Run a command; ``.output`` holds stdout and stderr together (Snakemake logs to both)."""
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    result.output = result.stdout + result.stderr
    return result


def project_copy(dest):
    """The project's files as a fresh git repository (what a clone of it holds), outside /work/main's git."""
    listing = run(REPO, "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    run(dest, "git", "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "project")


@pytest.mark.slow
def test_publish_clone_pull_needs_no_rerun(tmp_path, cifar_archive):
    require_program("git")
    origin, clone, remote = tmp_path / "origin", tmp_path / "clone", tmp_path / "remote"
    origin.mkdir()
    project_copy(origin)
    configs = ["--configfile", "config/smoke.yaml", str(source_config(tmp_path, *cifar_archive))]
    snakemake, dvc, overinterp = ((sys.executable, "-m", tool) for tool in ("snakemake", "dvc", "overinterp"))
    # One evaluated model retrained on random subsets: data, training, evaluation, keep-masks and
    # retraining, whose evaluation compares with the original model's predictions (results/eval, which
    # is not a heavy folder and must be published with it). The whole smoke workflow would take minutes.
    retrained = [f for f in workflow_outputs(origin, configs)
                 if f.startswith("results/retrain/") and "random" in f and f.endswith(".json")]
    args = [min(retrained), *configs]
    run(origin, *snakemake, "--cores", "2", *args)

    # publish refuses without a remote, and refuses results the current configuration would rebuild
    with pytest.raises(DataError, match="dvc remote add -d"):
        publish(origin, args)
    run(origin, *dvc, "remote", "add", "-d", "shared", remote)
    change = tmp_path / "change.yaml"
    change.write_text("train:\n  weight_decay: 0.00123\n")
    with pytest.raises(DataError, match=r"results/models/tiny-s0/model.pt \(params changed\)"):
        publish(origin, [*args, str(change)])

    # ... files no rule made (a foreign model, a leftover of an interrupted write) ...
    foreign = [origin / "results/models/someone-else/model.pt", origin / "results/subsets/.random-0.05.npz.x.part"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not ours")
    with pytest.raises(DataError, match=r"made by no rule.*someone-else/model\.pt.*\.part"):
        publish(origin, args)
    for path in foreign:
        path.unlink()
    # ... and results of code with uncommitted changes.
    package = origin / "src/overinterp/__init__.py"
    package.write_text(package.read_text() + "# a local experiment\n")
    with pytest.raises(DataError, match=r"uncommitted changes.*src/overinterp/__init__\.py"):
        publish(origin, args)
    run(origin, "git", "checkout", "--", "src")

    # People's answers are personal data: they stay here unless publishing them is asked for.
    responses = origin / "data/humaneval/responses"
    responses.mkdir(parents=True)
    (responses / "p1.csv").write_text("participant_id,image_id,response\nalice,0123456789abcdef,cat\n")
    run(origin, *overinterp, "publish", "--", *args)
    published = sorted(p.relative_to(origin).as_posix()[:-4]
                       for p in [origin / "data.dvc", *origin.glob("results/*.dvc")])
    assert {"data", "results/eval", "results/models", "results/retrain", "results/subsets"} <= set(published)
    data_pointer = yaml.safe_load((origin / "data.dvc").read_text())
    assert [out["path"] for out in data_pointer["outs"]] == ["data/cifar10/cifar-10-python.tar.gz", "data/cifar10/cifar10.npz"]
    assert data_pointer["outs"][0]["md5"] == cifar_archive[1]  # the mirror's archive, not the official md5
    head = run(origin, "git", "rev-parse", "HEAD").stdout.strip()
    for pointer in [origin / "data.dvc", *origin.glob("results/*.dvc")]:
        text = pointer.read_text()
        assert str(tmp_path) not in text and "alice" not in text, pointer  # no local path, no response
        assert yaml.safe_load(text)["meta"]["source"] == {"commit": head, "uncommitted_changes": False}
    stored = [p.read_bytes() for p in remote.rglob("*") if p.is_file()]
    assert stored and not any(b"alice" in blob for blob in stored)
    run(origin, "git", "add", "-A")  # only the pointers and the remote's address: the data stays ignored
    assert run(origin, "git", "diff", "--cached", "--name-only").stdout.split() == [
        ".dvc/config", *(f"{p}.dvc" for p in published)]
    run(origin, "git", "commit", "-qm", "publish")

    run(tmp_path, "git", "clone", "-q", origin, clone)
    run(clone, *dvc, "pull")
    # DVC sets modification times in checkout order; make them as wrong as they can be: inputs newest.
    now = time.time()
    for folder, age in (("results", 3600), ("data", 0)):
        for path in (clone / folder).rglob("*"):
            os.utime(path, (now - age, now - age))
    assert "train" in job_counts(run(clone, *snakemake, "-n", *args).output)

    pulled = run(clone, *overinterp, "pull", "--", *args).stdout
    assert "will rebuild" not in pulled and "are up to date" in pulled
    for name in ("results/models/tiny-s0/model.pt", "data/cifar10/cifar10.npz", args[0]):
        assert (clone / name).read_bytes() == (origin / name).read_bytes()
    assert "Nothing to be done" in run(clone, *snakemake, "-n", *args).output

    # Staleness stays visible: the publisher's params are restored, so a recipe change retrains (the
    # original model and the retrained one) but leaves the data and the random keep-masks alone.
    dry = run(clone, *snakemake, "-n", *args, change).output
    counts = job_counts(dry)
    assert counts.get("train") == 1 and counts.get("retrain") == 1
    assert not {"download_cifar10", "dataset", "random_subsets"} & set(counts)
    assert "Params have changed since last execution" in dry
