"""Launch scripts: --help, and --dry-run prints the commands a v5e-8 TPU VM and a 2-node SLURM job run;
shellcheck finds nothing (CI installs it: .ci/run)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU, NODE, SLURM = "scripts/tpu-vm/tpu.sh", "scripts/gpu/node.sh", "scripts/gpu/slurm.sbatch"
XPK = "scripts/xpk/xpk.sh"


def sh(*args, env=None):
    r = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": "/usr/bin:/bin", **(env or {})})  # no gcloud / sbatch needed
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


@pytest.mark.parametrize("script", [TPU, NODE, SLURM, XPK])
def test_help(script):
    assert any("--dry-run" in line for line in sh(script, "--help"))


def test_tpu_vm_dry_run_v5e_8():
    common = ["--dry-run", "--name", "t1", "--zone", "us-west4-a", "--type", "v5e-8"]
    assert sh(TPU, *common, "create") == [
        "gcloud compute tpus tpu-vm create t1 --zone us-west4-a --accelerator-type v5litepod-8 "
        "--version v2-alpha-tpuv5-lite"]
    assert sh(TPU, *common, "--queued", "--spot", "create") == [
        "gcloud compute tpus queued-resources create t1 --node-id t1 --zone us-west4-a --accelerator-type "
        "v5litepod-8 --runtime-version v2-alpha-tpuv5-lite --spot"]
    scp, pip = sh(TPU, *common, "install")
    assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse ") and scp.endswith("--worker=all")
    assert "--worker=all" in pip and "jax[tpu]" in pip and "pip install -e ~/idefics-jax" in pip and "[gcs]" in pip
    (run,) = sh(TPU, *common, "run", "train", "configs/idefics3-8b-v5e8-lora.yaml", "steps=10")
    assert run.startswith("gcloud compute tpus tpu-vm ssh t1 --zone us-west4-a --worker=all --command ")
    assert "IDEFICS_JAX_DISTRIBUTED=1" in run
    assert "idefics-jax train configs/idefics3-8b-v5e8-lora.yaml steps=10 > ~/idefics-jax.log" in run
    (logs,) = sh(TPU, *common, "logs")
    assert "--worker=all" in logs and "tail" in logs
    assert sh(TPU, *common, "delete") == ["gcloud compute tpus tpu-vm delete t1 --zone us-west4-a --quiet"]
    (create,) = sh(TPU, "--dry-run", "--type", "v4-8", "create")
    assert "--accelerator-type v4-8 --version tpu-ubuntu2204-base" in create


def test_gpu_dry_runs():
    assert sh(NODE, "--dry-run", "train", "configs/smolvlm-256m-gpu.yaml") == [
        "env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 idefics-jax train configs/smolvlm-256m-gpu.yaml"]
    assert sh(NODE, "--dry-run", "install")[0] == "python3 -m pip install -U 'jax[cuda12]'"
    submit, _, srun = sh(SLURM, "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "train", "configs/x.yaml")
    assert submit == f"sbatch --nodes=2 --gpus-per-node=8 {ROOT}/{SLURM} train configs/x.yaml"
    assert srun == "srun --kill-on-bad-exit=1 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 idefics-jax train configs/x.yaml"
    # Inside the job (SLURM_JOB_ID set): srun on every node; jax.distributed starts from SLURM's variables.
    assert sh(SLURM, "--dry-run", "train", "configs/x.yaml", env={"SLURM_JOB_ID": "7"}) == [srun]


def test_xpk_dry_runs_one_and_two_v5e_256_slices():
    common = ["--dry-run", "--project", "p1", "--cluster", "c1", "--type", "v5e-256"]
    where = "--zone us-west4-a --project p1"
    assert sh(XPK, *common, "image") == [f"docker build -t gcr.io/p1/idefics-jax:latest {ROOT}",
                                         "docker push gcr.io/p1/idefics-jax:latest"]
    assert sh(XPK, *common, "--slices", "2", "create") == [
        f"xpk cluster create --cluster c1 --tpu-type v5litepod-256 --num-slices 2 {where}"]
    run = "idefics-jax train configs/idefics3-8b-v5e8-lora.yaml mesh.fsdp=-1"
    head = ("xpk workload create --cluster c1 --workload idefics-jax-run --docker-image gcr.io/p1/idefics-jax:latest "
            "--tpu-type v5litepod-256")
    one = sh(XPK, *common, "run", *run.split()[1:])
    assert one == [f"{head} --num-slices 1 {where} --command 'IDEFICS_JAX_DISTRIBUTED=1 {run}'"]
    # Two slices: the data axis spans them.
    two = sh(XPK, *common, "--slices", "2", "run", *run.split()[1:])
    assert two == [f"{head} --num-slices 2 {where} --command 'IDEFICS_JAX_DISTRIBUTED=1 {run} mesh.data=2'"]
    logs = sh(XPK, *common, "logs")
    assert logs[-1] == "kubectl logs --tail=50 --prefix -l jobset.sigs.k8s.io/jobset-name=idefics-jax-run"
    assert sh(XPK, *common, "delete") == [f"xpk workload delete --cluster c1 --workload idefics-jax-run {where}",
                                          f"xpk cluster delete --cluster c1 {where}"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/run installs it)")
def test_shellcheck():
    r = subprocess.run(["shellcheck", TPU, NODE, SLURM, XPK], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
