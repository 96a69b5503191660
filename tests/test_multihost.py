"""Several hosts: `idefics-jax train` joins jax.distributed by itself (coordinator variables here; SLURM and TPU
pod variables are detected too), each process reads its share of the data, and the losses are those of one process
training on the same global batch."""

import json
import os
import socket
import subprocess
import sys

from idefics_jax.runtime import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["steps=3", "log_every=1", "eval_every=0", "data.eval=", "data.num_records=32", "data.batch_size=4",
        "save_every=3", "optim.warmup_steps=1"]


def _losses(work):
    with open(os.path.join(work, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def test_two_processes_train_like_one(tmp_path, program_env):
    env = {**os.environ, **program_env}  # one CPU device per process
    cmd = [sys.executable, "-m", "idefics_jax.cli", "train", "configs/tiny.yaml", *ARGS]
    one = subprocess.run(cmd + [f"workdir={tmp_path / 'one'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd + [f"workdir={tmp_path / 'two'}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])
    # Only process 0 prints its progress lines.
    assert "step 3/3 loss" in outs[0][0] and "step 3/3 loss" not in outs[1][0]


def test_multihost_environments_are_detected():
    assert distributed.wanted({}) is None
    assert distributed.wanted({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM (v5e-8, v4-8)
    assert distributed.wanted({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
    assert distributed.wanted({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}) == "slurm"
    assert distributed.wanted({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    coord = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.wanted(coord) == "coordinator"
    assert distributed.wanted({**coord, "IDEFICS_JAX_DISTRIBUTED": "0"}) is None
    assert distributed.wanted({"IDEFICS_JAX_DISTRIBUTED": "1"}) == "forced"
