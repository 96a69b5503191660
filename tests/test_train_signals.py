"""The training program as a launcher runs it: stdout is a log file, the run may be SIGKILLed while it builds a
data split, Ctrl-C (SIGINT) stops it like SIGTERM; `generate --model WORKDIR` answers with its newest checkpoint."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from orbax.checkpoint import CheckpointManager

from idefics_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(work):
    return [sys.executable, "-m", "idefics_jax.cli", "train", "configs/tiny.yaml", f"workdir={work}", "steps=4",
            "log_every=1", "save_every=1", "eval_every=2", "eval_batches=1", "data.num_records=48",
            "data.batch_size=4", "optim.warmup_steps=1"]


def _start(work, env):
    return subprocess.Popen(_cmd(work), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _wait_for(proc, done, what):
    while not done():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.005)


def _steps(work):
    path = os.path.join(work, "metrics.jsonl")
    return [json.loads(x)["step"] for x in open(path)] if os.path.exists(path) else []


def test_killed_while_building_a_split_resumes_and_ctrl_c_saves(tmp_path, capsys, program_env):
    work = str(tmp_path / "run")
    unfinished = os.path.join(work, "data-eval", "cauldron_records", "incomplete.*")
    proc = _start(work, program_env)
    _wait_for(proc, lambda: glob.glob(unfinished), "the eval split's build")  # first evaluation, step 2
    proc.kill()
    proc.communicate()
    assert glob.glob(unfinished) and not os.path.exists(os.path.join(work, "data-eval", "cauldron_records", "1.0.0"))
    kept = CheckpointManager(os.path.join(work, "checkpoints")).latest_step()  # step 1's async save may be unfinished

    proc = _start(work, program_env)  # resumes: rebuilds the unfinished split; then Ctrl-C at step 3
    _wait_for(proc, lambda: 3 in _steps(work), "step 3")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert kept is None or f"resumed from step {kept}" in err
    assert "KeyboardInterrupt" not in err + out
    assert not glob.glob(unfinished)
    stopped = max(_steps(work))
    assert stopped < 4 and CheckpointManager(os.path.join(work, "checkpoints")).latest_step() == stopped
    # stdout is a pipe: one line per logged step, and the summary; not TFDS's "Downloading and preparing".
    lines = out.strip().splitlines()
    assert any(x.startswith("step 3/4 loss ") and " lr " in x and " tokens/s " in x and " eta " in x for x in lines)
    assert lines[-1].startswith("stopped by SIGINT: steps ") and f"->{stopped} of 4" in lines[-1], lines[-1]
    assert "Downloading" not in out
    assert any("eval_loss" in json.loads(x) for x in open(os.path.join(work, "metrics.jsonl")))

    # The WORKDIR names its newest checkpoint for generation.
    assert cli.main(["generate", "--model", work, "--prompt", "What shape is it?", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
