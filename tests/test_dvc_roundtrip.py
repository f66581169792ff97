"""Sharing artifacts through DVC: run the smoke workflow, publish to a local directory remote, clone,
pull, and Snakemake has nothing to redo, while a later config change still reruns what depends on it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import BIN, REPO, job_counts, require_program, source_config
from overinterp.artifacts import HEAVY_DIRS, _folder_of, publish, workflow_outputs
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
    run(origin, *snakemake, "--cores", "2", *configs)

    # publish refuses without a remote, and refuses results the current configuration would rebuild
    with pytest.raises(DataError, match="dvc remote add -d"):
        publish(origin, configs)
    run(origin, *dvc, "remote", "add", "-d", "shared", remote)
    change = tmp_path / "change.yaml"
    change.write_text("train:\n  weight_decay: 0.00123\n")
    with pytest.raises(DataError, match=r"results/models/tiny-s0/model.pt \(params changed\)"):
        publish(origin, [*configs, str(change)])

    run(origin, *overinterp, "publish", "--", *configs)
    published = sorted(p.relative_to(origin).as_posix()[:-4]
                       for p in [origin / "data.dvc", *origin.glob("results/*.dvc")])
    assert "data" in published and "results/models" in published
    assert set(published) >= {d for d in HEAVY_DIRS if (origin / d).is_dir()}
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
    assert "train" in job_counts(run(clone, *snakemake, "-n", *configs).output)

    pulled = run(clone, *overinterp, "pull", "--", *configs).stdout
    assert "will rebuild" not in pulled
    for name in ("results/models/tiny-s0/model.pt", "data/cifar10/cifar10.npz"):
        assert (clone / name).read_bytes() == (origin / name).read_bytes()
    outputs = workflow_outputs(clone, configs)
    assert any(f.startswith("results/models/") for f in outputs)
    pending = sorted(f for f, (_, plan) in outputs.items() if plan != "no update")
    assert not [f for f in pending if _folder_of(f) in published], "a published file would be rebuilt"

    # What was not published (cheap evaluations, tables) is rebuilt; nothing published reruns.
    rebuilt = job_counts(run(clone, *snakemake, "--cores", "2", *configs).output)
    assert not {"download_cifar10", "convert_cifar10", "train"} & set(rebuilt)
    assert "Nothing to be done" in run(clone, *snakemake, "-n", *configs).output

    # Staleness stays visible: the publisher's params are restored, so a recipe change retrains.
    dry = run(clone, *snakemake, "-n", *configs, change).output
    counts = job_counts(dry)
    assert counts.get("train") == 1 and "evaluate" in counts
    assert not {"download_cifar10", "convert_cifar10"} & set(counts)
    assert "Params have changed since last execution" in dry
