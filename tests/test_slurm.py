"""The Slurm profile on a real single-node Slurm (Debian's slurm-wlm and munge) brought up on localhost.

The node claims paper-sized CPUs and memory (``SlurmdParameters=config_overrides``) so that the
profile's requests are schedulable, and one GPU backed by /dev/null so that GPU rules submit with
``--gpus=1`` on a machine without GPUs. No cgroups or systemd: proctrack/linuxproc and task/none.

Job status comes from squeue, not sacct: sacct needs the accounting database (slurmdbd and MariaDB,
two more daemons and a database to bootstrap), while squeue keeps finished jobs for MinJobAge (300 s
here), far longer than the plugin's polling interval. The profile itself leaves the plugin's choice
alone, which is sacct on a cluster with accounting.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, job_counts, require_program, snakemake, source_config

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid_file: Path) -> None:
    """Terminate the daemon whose pid ``pid_file`` holds, and wait for it to go."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def slurm_cluster(tmp_path_factory, monkeypatch):
    """munged, slurmctld and slurmd on localhost, with SLURM_CONF set for the client commands."""
    for program in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel"):
        require_program(program)
    if os.geteuid() != 0:
        message = "the single-node Slurm runs its daemons as root"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=overinterp-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=300
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    (d / "gres.conf").write_text(f"NodeName={node} Name=gpu File=/dev/null\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    daemons = [
        ["munged", "--force", f"--socket={d}/munge.socket", f"--key-file={key}", f"--pid-file={d}/munged.pid",
         f"--log-file={d}/log/munged.log", f"--seed-file={d}/munged.seed"],
        ["slurmctld", "-f", conf],
        ["slurmd", "-f", conf, "-N", node],
    ]
    try:
        for command in daemons:  # each forks into the background once it is up
            subprocess.run(command, check=True, timeout=60)
        deadline = time.time() + 60
        while subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() != "idle":
            if time.time() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted((d / "log").glob("*.log")))
                pytest.fail(f"the Slurm node did not come up:\n{logs}")
            time.sleep(0.5)
        yield d
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(d / f"{name}.pid")


def slurm_jobs() -> list[dict[str, str]]:
    """Every job this Slurm has seen (finished ones stay for MinJobAge)."""
    out = subprocess.run(["squeue", "--states=all", "-h", "-O", "JobID:|,Comment:|,State:|,tres-per-job:"],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(("id", "comment", "state", "tres"), (f.strip() for f in line.split("|"))))
            for line in out.splitlines()]


@pytest.mark.slow
def test_workflow_runs_through_slurm_and_matches_local_run(slurm_cluster, smoke_run, cifar_archive, tmp_path):
    smoke = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    sis = f"results/sis/tiny-s0/{smoke['sis']['method']}/test.npz"
    # Training, evaluation, and SIS as shard jobs plus their merge: every kind of job, in well under
    # the time of the whole smoke workflow.
    targets = ["results/eval/tiny-s0/full.csv", sis]
    configs = (REPO / "config/smoke.yaml", source_config(tmp_path, *cifar_archive))
    run = snakemake(tmp_path, "--profile", str(REPO / "profiles/slurm"), "--slurm-status-command", "squeue",
                    "--slurm-init-seconds-before-status-checks", "1", *targets, configfiles=configs, timeout=600)
    output = run.stdout + run.stderr

    jobs = slurm_jobs()
    rules = sorted(j["comment"].split("_wildcards")[0].removeprefix("rule_") for j in jobs)
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    counts = job_counts(output)
    local = {"download_cifar10"}  # a localrule: compute nodes may lack internet access
    assert sorted(r for r, n in counts.items() for _ in range(n) if r not in local) == rules
    assert rules.count("sis_shard") == smoke["sis"]["shards"]  # one Slurm job per shard
    for job in jobs:  # GPU rules asked Slurm for a GPU, the others did not
        gpu_rule = job["comment"].startswith(("rule_train_", "rule_sis_shard_"))
        assert ("gpu:1" in job["tres"]) == gpu_rule, job
    for job in jobs:  # and Snakemake followed each through its Slurm job id
        assert f"submitted with SLURM jobid {job['id']} " in output

    # Same inputs, same seeds, CPU arithmetic: the same results as the local run.
    assert (tmp_path / targets[0]).read_text() == (smoke_run / targets[0]).read_text()
    with np.load(tmp_path / sis) as ours, np.load(smoke_run / sis) as theirs:
        assert ours.files == theirs.files
        for name in ours.files:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    ours, theirs = (torch.load(p / "results/models/tiny-s0/model.pt", map_location="cpu", weights_only=False)
                    for p in (tmp_path, smoke_run))
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name
