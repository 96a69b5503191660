"""Training faults: a non-finite loss stops the run and keeps the last good checkpoint; SIGTERM saves and exits, and
a SIGKILL at any moment (saves included) leaves a checkpoint the next start resumes from; an empty dataset is a
clear error."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from idefics_jax import cli
from idefics_jax.train import config as config_lib, tfds_builder, trainer
from idefics_jax.shapes import task as shapes


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data") / "shapes")
    tfds_builder.build(d, {"train": tfds_builder.GeneratedSource(lambda: shapes.records(64, seed=13))})
    return d


def _args(workdir, data, steps, *extra):
    return [f"workdir={workdir}", f"data.train={data}", f"steps={steps}", "log_every=1", "data.eval=", "eval_every=0",
            "data.batch_size=4", "optim.warmup_steps=1", *extra]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes_data, capsys):
    work = str(tmp_path / "run")
    trainer.train(config_lib.load("configs/tiny.yaml", _args(work, shapes_data, 4, "save_every=2")))
    # Resumed with an absurd learning rate: one update sends the weights to ~1e30 and the next loss is not finite.
    code = cli.main(["train", "configs/tiny.yaml", *_args(work, shapes_data, 12, "save_every=2",
                                                           "optim.learning_rate=1e30", "optim.clip_norm=1e30")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "idefics-jax train: error: loss is" in line and "last good checkpoint: step 4" in line, line
    from orbax.checkpoint import CheckpointManager

    assert CheckpointManager(os.path.join(work, "checkpoints")).latest_step() == 4
    from idefics_jax.train.loading import trained_model

    trained_model(work)  # the kept checkpoint restores


def test_stopped_then_killed_at_any_moment_resumes_exactly(tmp_path, shapes_data, program_env):
    """SIGTERM between periodic saves: the run saves where it is and exits 0, and the next start resumes from that
    step. Then SIGKILLs that land in and between saves (saving every step): each leaves a checkpoint the next start
    resumes from. The last start reaches the uninterrupted run's losses, each step logged once (metrics.jsonl and
    TensorBoard's view of the event files of every start)."""
    steps = 12
    straight = str(tmp_path / "straight")
    trainer.train(config_lib.load("configs/tiny.yaml", _args(straight, shapes_data, steps, "save_every=4")))
    work = str(tmp_path / "killed")
    env = {**os.environ, **program_env}  # later starts load the compiled step from the tests' compilation cache

    def cmd(save_every):
        return [sys.executable, "-m", "train", "configs/tiny.yaml",
                *_args(work, shapes_data, steps, f"save_every={save_every}")]

    metrics = os.path.join(work, "metrics.jsonl")
    logged = lambda: len(open(metrics).readlines()) if os.path.exists(metrics) else 0  # noqa: E731

    proc = subprocess.Popen(cmd(4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and logged() < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0
    stopped_at = max(_losses(work))
    assert stopped_at < steps, "the run finished before it could be stopped"

    kills, log = 0, tmp_path / "start.log"
    for i, delay in enumerate((0.05, 0.13, 0.31)):  # saving every step, so kills land in and between saves
        start = logged()
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd(1), env=env, stdout=subprocess.DEVNULL, stderr=err)
            while proc.poll() is None and logged() <= start + 1:
                time.sleep(0.01)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        if i == 0:
            assert f"resumed from step {stopped_at}" in log.read_text(), log.read_text()[-2000:]
    assert kills
    r = subprocess.run(cmd(1), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _losses(straight), _losses(work)
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])
    with open(metrics) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, steps + 1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(work, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, steps + 1))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([b[s] for s in sorted(b)], rel=1e-6)


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    empty = str(tmp_path / "empty")
    with pytest.raises(ValueError):
        tfds_builder.build(empty, {"train": tfds_builder.GeneratedSource(lambda: iter(()))})
    code = cli.main(["train", "configs/tiny.yaml", f"workdir={tmp_path / 'w'}", f"data.train={empty}"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("idefics-jax train: error:"), line


def test_grpo_sigkill_resumes_to_the_same_rewards_and_losses(tmp_path, program_env):
    from idefics_jax.train import run

    steps = 4
    args = [f"steps={steps}", "save_every=1", "log_every=1", "grpo.prompts=2", "grpo.group_size=4", "grpo.slots=8",
            "data.train=shapes-mixed",
            "optim.warmup_steps=1"]
    straight = str(tmp_path / "straight")
    run.run(config_lib.load("configs/tiny-shapes-grpo.yaml", [f"workdir={straight}", *args]))
    work = str(tmp_path / "killed")
    env = {**os.environ, **program_env}
    cmd = [sys.executable, "-m", "train", "configs/tiny-shapes-grpo.yaml", f"workdir={work}", *args]
    metrics = os.path.join(work, "metrics.jsonl")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 2):
        time.sleep(0.01)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = lambda w: {m["step"]: m for m in map(json.loads, open(os.path.join(w, "metrics.jsonl")))}  # noqa: E731
    a, b = rows(straight), rows(work)
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        for key in ("loss", "reward_mean", "reward_std", "kl", "completion_length"):
            assert abs(a[s][key] - b[s][key]) <= 1e-5 * max(1.0, abs(a[s][key])), (s, key, a[s][key], b[s][key])
