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


def _docker_excluded(path: str, patterns: list[str]) -> bool:
    """Whether `docker build` leaves `path` (relative, '/'-separated) out of the context under .dockerignore
    `patterns`, by Docker's rules: Go's filepath.Match per pattern (`*` and `?` stop at '/') plus `**` for any
    number of directories, a leading `!` re-including, the last matching pattern deciding, and a path excluded
    when it or a directory above it matches."""
    import re

    def regex(p: str) -> str:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(p[i], re.escape(p[i])), i + 1
        return out

    rules = [(p.startswith("!"), re.compile(regex(p.lstrip("!").strip("/")) + "$")) for p in patterns]
    parts = path.split("/")
    excluded = False
    for keep, rx in rules:
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not keep
    return excluded


def test_docker_context_holds_the_package_and_nothing_else():
    """The files `docker build` sends (scripts/xpk/xpk.sh's image): what the Dockerfile copies, the shipped model's
    weights included; no tests, caches, git history, build output or checkpoints, wherever a run left them."""
    patterns = [line.strip() for line in open(os.path.join(ROOT, ".dockerignore"))
                if line.strip() and not line.startswith("#")]
    present = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs]
    # What a user's clone may hold besides: caches, checkpoints and run outputs.
    strays = ["tests/test_x.py", "idefics_jax/__pycache__/a.pyc", "train/__pycache__/b.pyc", ".pytest_cache/v",
              "ckpt/idefics3-8b/params/x", "out/run1/checkpoints/1/x", "eval-out/docvqa/x.jsonl", "m.orbax/x",
              "model.safetensors", "idefics_jax.egg-info/PKG-INFO", ".git/HEAD", ".venv/bin/python"]
    context = [p for p in present + strays if not _docker_excluded(p, patterns)]
    assert not [p for p in context if p.split("/")[0] in ("tests", ".git", "ckpt", "out", "eval-out", ".venv")
                or "__pycache__" in p or ".egg-info" in p or p.endswith((".orbax/x", ".pytest_cache/v"))
                or p == "model.safetensors"], context
    copied = [line.split()[1] for line in open(os.path.join(ROOT, "Dockerfile")) if line.startswith("COPY ")]
    sources = [s for line in open(os.path.join(ROOT, "Dockerfile")) if line.startswith("COPY ")
               for s in line.split()[1:-1]]
    assert copied and all(any(p == s or p.startswith(s + "/") for p in context) for s in sources), sources
    assert "idefics_jax/models/tiny-shapes/model.safetensors" in context
    assert {p.split("/")[0] for p in context} <= {"idefics_jax", "convert", "train", "configs", "pyproject.toml",
                                                  "README.md", "LICENSE", "Dockerfile", ".dockerignore"}, \
        sorted({p.split("/")[0] for p in context})
