"""The cluster and multi-GPU profiles stay in step with the workflow, and GPU jobs on one machine claim
different GPUs."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import yaml

from conftest import REPO, snakemake
from overinterp.utils import claim_gpu

SLURM_PROFILE = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())


def gpu_rules() -> set[str]:
    """Rules whose definition declares the gpu resource."""
    rules = set()
    for path in (REPO / "workflow/rules").glob("*.smk"):
        for match in re.finditer(r"^rule (\w+):(.*?)(?=^\S|\Z)", path.read_text(), re.S | re.M):
            if re.search(r"^\s+resources:\s*\n(\s+\w+=.*\n)*?\s+gpu=", match.group(2), re.M):
                rules.add(match.group(1))
    return rules


def test_slurm_profile_sizes_every_gpu_rule_and_names_only_real_rules(tmp_path):
    listed = snakemake(tmp_path, "--list-rules", configfiles=(REPO / "config/smoke.yaml",)).stdout.split()
    sized = SLURM_PROFILE["set-resources"]
    assert set(sized) <= set(listed), f"profiles/slurm names rules that do not exist: {set(sized) - set(listed)}"
    gpu = gpu_rules()
    assert {"train", "retrain", "sis_shard"} <= gpu
    missing = {rule for rule in gpu if "runtime" not in sized.get(rule, {})}
    assert not missing, f"GPU rules without a runtime in profiles/slurm/config.yaml: {sorted(missing)}"
    # The login node may have no GPU: the profile itself asks for one for every GPU rule.
    unasked = {rule for rule in gpu if sized[rule].get("gpu") != 1}
    assert not unasked, f"GPU rules without `gpu: 1` in profiles/slurm/config.yaml: {sorted(unasked)}"


def test_gpu_rules_claim_a_gpu_only_where_there_is_one(tmp_path):
    """A dry run prints each job's resources: without a visible GPU, no job says gpu=1; with the GPUs
    hidden by CUDA_VISIBLE_DEVICES neither."""
    config = (REPO / "config/smoke.yaml",)
    for env in ({}, {"CUDA_VISIBLE_DEVICES": ""}):
        out = snakemake(tmp_path, "-n", "--forceall", configfiles=config, env=env).stdout
        assert "rule train:" in out and "rule sis_shard:" in out
        has_gpu = shutil.which("nvidia-smi") is not None and not env
        assert ("gpu=1" in out) == has_gpu


def test_gpu_claims_are_exclusive_between_processes(tmp_path):
    ids = ["0", "1", "2"]
    code = ("import sys; from overinterp.utils import claim_gpu; "
            "print(claim_gpu(sys.argv[1].split(','), sys.argv[2]), flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, ",".join(ids), str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert claim_gpu(ids, tmp_path) == 1
        assert claim_gpu(ids, tmp_path) == 1  # a process keeps the GPU it claimed
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops a dead process's lock: the next process gets GPU 0 back.
    other = subprocess.run([sys.executable, "-c", code, ",".join(ids), str(tmp_path)], input="",
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "0"
