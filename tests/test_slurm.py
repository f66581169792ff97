"""The Slurm profile on a real single-node Slurm (Debian's slurm-wlm and munge) brought up on localhost.

The configuration goes where Debian's Slurm looks for it, /etc/slurm (commands run inside a job, such
as the plugin's srun, do not see SLURM_CONF), and is removed afterwards; the test refuses to replace a
configuration it did not write. The node claims paper-sized CPUs and memory
(``SlurmdParameters=config_overrides``) so that the profile's requests are schedulable, and one GPU
backed by /dev/null so that GPU rules submit with ``--gpus=1`` on a machine without GPUs. No cgroups or
systemd: proctrack/linuxproc and task/none.

Job status comes from squeue, not sacct: sacct needs the accounting database (slurmdbd and MariaDB,
two more daemons and a database to bootstrap), while squeue keeps finished jobs for MinJobAge (300 s
here), far longer than the plugin's polling interval. The profile itself leaves the plugin's choice
alone, which is sacct on a cluster with accounting.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_counts, require_program, snakemake, source_config

CONF_DIR = Path("/etc/slurm")
MARK = "# Written by the overinterp test suite (tests/test_slurm.py); removed when the test ends.\n"


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
    """munged, slurmctld and slurmd on localhost; yields the folder with their state and logs."""
    for program in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel"):
        require_program(program)
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the tests as root: the single-node Slurm's daemons run as root")
        pytest.skip("the single-node Slurm runs its daemons as root")
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    # One test cluster per machine at a time: they would share /etc/slurm.
    lock = open(CONF_DIR / ".overinterp-test.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    conf, gres = CONF_DIR / "slurm.conf", CONF_DIR / "gres.conf"
    for path in (conf, gres):
        if path.exists() and not path.read_text().startswith(MARK):
            lock.close()
            pytest.skip(f"{path} exists: this machine has a Slurm configuration the test will not replace")
    conf.write_text(MARK + f"""\
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
    gres.write_text(MARK + f"NodeName={node} Name=gpu File=/dev/null\n")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    daemons = [
        ["munged", "--force", f"--socket={d}/munge.socket", f"--key-file={key}", f"--pid-file={d}/munged.pid",
         f"--log-file={d}/log/munged.log", f"--seed-file={d}/munged.seed"],
        ["slurmctld"],
        ["slurmd", "-N", node],
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
        conf.unlink(missing_ok=True)
        gres.unlink(missing_ok=True)
        lock.close()


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
    # squeue for job states (see above); a first status check after 5 s rather than 40; and as many
    # threads per job as the local reference run had (--cores 2), so that CPU arithmetic is the same.
    run = snakemake(tmp_path, "--profile", str(REPO / "profiles/slurm"), "--slurm-status-command", "squeue",
                    "--slurm-init-seconds-before-status-checks", "5", "--max-threads", "2", *targets,
                    configfiles=configs, timeout=600)
    output = run.stdout + run.stderr

    jobs = slurm_jobs()
    rules = sorted(j["comment"].split("_wildcards")[0].removeprefix("rule_") for j in jobs)
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    counts = {rule: n for rule, n in job_counts(output).items() if rule != "total"}
    # Every job went through Slurm but the download, a localrule (compute nodes may lack internet access).
    assert counts.pop("download_cifar10") == 1
    assert sorted(rule for rule, n in counts.items() for _ in range(n)) == rules
    assert rules.count("sis_shard") == smoke["sis"]["shards"]  # one Slurm job per shard
    for job in jobs:  # GPU rules asked Slurm for a GPU, the others did not
        gpu_rule = job["comment"].startswith(("rule_train_", "rule_sis_shard_"))
        assert ("gpu:1" in job["tres"]) == gpu_rule, job
    for job in jobs:  # and Snakemake followed each through its Slurm job id
        assert f"submitted with SLURM jobid {job['id']} " in output

    # Same inputs, seeds and threads on the same CPU: the same results as the local run, byte for byte.
    for name in ("results/models/tiny-s0/model.pt", *targets):
        assert (tmp_path / name).read_bytes() == (smoke_run / name).read_bytes(), name
