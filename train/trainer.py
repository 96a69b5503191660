"""The fine-tuning program: `idefics-jax train CONFIG [key=value ...]` or `python -m idefics_jax.train CONFIG ...`.

`train` sets the run up (`_setup`), restores its newest checkpoint (`_Checkpoints`), then runs `_loop` until the
last step or a stop signal (`StopSignals`), reporting as it goes (`_Report`, `_Throughput`). The model comes from
`loading`, the records from `sources` (one, or a mixture), held-out metrics from `evaluate`, benchmark scores from
`benchmarks`. Writes the metrics of each logged step (`writers`: WORKDIR/metrics.jsonl, TensorBoard, W&B), Orbax
checkpoints in WORKDIR/checkpoints (trainable parameters, optimizer state, data-iterator state), and resumes from
the newest complete one when started again. SIGTERM and Ctrl-C save a checkpoint and stop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax.checkpoints.paths import as_path
from idefics_jax.checkpoints.registry import RUN_CHECKPOINTS, RUN_CONFIG
from idefics_jax.model import sharding
from idefics_jax.runtime.progress import Progress
from idefics_jax.train import config as config_lib
from idefics_jax.train import optim, sources, step as step_lib
from idefics_jax.train.collate import CollateConfig, Collator
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.benchmarks import Benchmarks
from idefics_jax.train.data import LoaderConfig, Mixture, batches
from idefics_jax.train.evaluate import Evaluator
from idefics_jax.train.loading import compute_dtype, load_model
from idefics_jax.train.writers import Writers, check_wandb


class TrainingError(ValueError):
    """The run cannot go on (a non-finite loss, say); the message says why and what was kept."""


def peak_flops(dtype, n: int = 1024) -> float:
    """Measured matmul throughput of the first device (n x n matmuls): the denominator of the MFU estimate on any
    backend."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        r = f(a)
    r.block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - t)


def flops_per_token(model) -> float:
    """6 x parameters (forward and backward matmuls), the usual estimate."""
    return 6 * sum(v[...].size for _, v in nnx.to_flat_state(nnx.state(model)))


class _StepLog:
    """Process 0 only, when stdout is not a terminal (nohup, a log file, `--worker=all` over ssh): one line per
    logged step on stdout; and on every process 0 a summary at the end. The terminal bar is `Progress`'s."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.main = jax.process_index() == 0
        self.lines = self.main and not sys.stdout.isatty()

    def show(self, step: int, loss: float, lr: float, tps: float):
        if self.lines:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3g} tokens/s {tps:,.0f} eta {_hms(eta)}",
                  flush=True)

    def summary(self, step: int, last: dict, workdir: str, stopped: str | None):
        if not self.main:
            return
        took = time.perf_counter() - self.t0
        evals = "".join(f" {k} {v:.4f}" for k, v in last.items() if k.startswith("eval_"))
        how = f"stopped by {stopped}" if stopped else "done"
        print(f"{how}: steps {self.start}->{step} of {self.total} in {_hms(took)}, "
              f"loss {last.get('loss', float('nan')):.4f}{evals}; checkpoints in {as_path(workdir) / RUN_CHECKPOINTS}",
              flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Throughput:
    """Tokens per second since the last logged step. Each process counts its own batch, times the process count:
    about the global batch. `tokens_per_second` counts every position the step computed, padding included;
    `real_tokens_per_second` only the tokens the attention mask keeps (not padding), and the MFU estimate counts
    those, the model's useful work."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak_flops, self.hosts = flops_per_token, peak_flops, jax.process_count()
        self.restart()

    def restart(self) -> None:
        self.t0, self.positions, self.real = time.perf_counter(), 0, 0

    def add(self, batch: dict) -> None:
        mask = batch["attention_mask"]  # 1 for a record's tokens, 0 for padding (packed rows too)
        self.positions += mask.size * self.hosts
        self.real += int(mask.sum()) * self.hosts

    def rates(self) -> dict:
        dt = time.perf_counter() - self.t0
        real = self.real / dt
        return {"tokens_per_second": self.positions / dt, "real_tokens_per_second": real,
                "real_token_fraction": self.real / max(self.positions, 1),
                "mfu": real * self.flops_per_token / self.peak_flops}


class _Report:
    """What a run shows and keeps, from process 0 only: the progress bar (a terminal) or a line every few seconds
    on stderr; one line per logged step on a stdout that is not a terminal (`_StepLog`); the metrics (`Writers`:
    WORKDIR/metrics.jsonl, TensorBoard, W&B)."""

    def __init__(self, config: TrainConfig, start: int):
        main = jax.process_index() == 0
        self.progress = Progress("training", config.steps, unit="steps", rate=False, enabled=main)
        self.metrics = Writers(config, start)
        self.lines = _StepLog(config.steps, start)
        self.workdir = config.workdir

    def log(self, row: dict) -> None:
        self.metrics.write(row)
        tps = row["tokens_per_second"]
        self.progress.set(row["step"], f"loss {row['loss']:.4f}, {tps:,.0f} tok/s")
        self.lines.show(row["step"], row["loss"], row["learning_rate"], tps)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()

    def summary(self, step: int, last: dict, stopped: str | None) -> None:
        self.lines.summary(step, last, self.workdir, stopped)


class StopSignals:
    """SIGTERM (a preempted TPU VM) and Ctrl-C ask the loop to finish its step, save and stop (`received` names
    the signal); a second Ctrl-C interrupts at once. The previous handlers come back when the block ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, sig, frame) -> None:
        self.received = signal.Signals(sig).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _Checkpoints:
    """WORKDIR/checkpoints (a local directory or a bucket): the trainable state and the data iterator's position,
    saved asynchronously, the newest `keep` kept."""

    def __init__(self, config: TrainConfig):
        self.workdir = config.workdir
        self.manager = ocp.CheckpointManager(
            as_path(config.workdir) / RUN_CHECKPOINTS,
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=True))
        self.saved: int | None = None

    def restore(self, state, data):
        """`state` and the position of iterator `data` as the newest checkpoint holds them (unchanged without one)."""
        step = self.manager.latest_step()
        if step is None:
            return state
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
        data.set_state(restored.data)
        self.saved = step
        print(f"resumed from step {step} in {self.workdir}", file=sys.stderr)
        return restored.state

    def save(self, step: int, state, data) -> None:
        if self.saved == step:  # a signal right after a scheduled save
            return
        self.saved = step
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data.get_state())), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@dataclasses.dataclass
class _Setup:
    """A run ready to step: the mesh's partitioning, the model split into trainable and frozen parts, the jitted
    step, the data, the evaluator and the initial state."""

    partitioning: sharding.Partitioning | None
    parts: step_lib.Split
    train_step: Callable
    schedule: Callable[[int], float]
    data: Iterator[dict]
    evaluators: tuple[Callable[..., dict], ...]  # (state, frozen) -> eval metrics: held-out loss, benchmarks
    state: step_lib.TrainState
    throughput: _Throughput


def _setup(config: TrainConfig) -> _Setup:
    mesh_shape = sharding.MeshShape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    mesh = sharding.make_mesh(mesh_shape) if jax.device_count() > 1 else None
    partitioning = None if mesh is None else sharding.Partitioning(mesh, sharding.RULES)
    model, model_dir = load_model(config, partitioning)
    compute = compute_dtype(config)
    parts = step_lib.split(model, config.freeze, config.lora, jax.random.key(config.seed))
    tx = optim.make(config.optim, config.steps, parts.fan_in, parts.trainable)
    train_step = step_lib.make_train_step(parts, tx, compute_dtype=compute, remat=config.remat, lora=config.lora,
                                          grad_accum=config.optim.grad_accum)
    collator, data = _data(config, model_dir)
    evaluators = []
    if config.eval_every and config.data.eval:
        evaluators.append(Evaluator(config, parts, collator, partitioning))
    if config.eval_every and config.eval.tasks:
        evaluators.append(Benchmarks(config, parts, collator))
    throughput = _Throughput(flops_per_token(model), peak_flops(compute or jnp.float32) * jax.device_count())
    return _Setup(partitioning, parts, train_step, optim.schedule(config.optim, config.steps), data, tuple(evaluators),
                  step_lib.init_state(parts.trainable, tx), throughput)


def _data(config: TrainConfig, model_dir: str) -> tuple[Collator, Iterator[dict]]:
    """The collator of the model's processor, and the training batches (an iterator whose position checkpoints
    keep). data.batch_size is the global batch; each process loads its share (see train.data). Several processes
    pad to the longest bucket: the rows of one global array must have one length on every host."""
    hosts = jax.process_count()
    if config.data.batch_size % hosts:
        raise ValueError(f"data.batch_size {config.data.batch_size} does not divide over {hosts} processes")
    buckets = tuple(config.data.length_buckets)[-1:] if hosts > 1 else tuple(config.data.length_buckets)
    collator = Collator.from_pretrained(model_dir, CollateConfig(
        length_buckets=buckets, max_images=config.data.max_images, image_splitting=config.data.image_splitting,
        longest_edge=config.data.longest_edge or None))
    if not config.data.train:
        raise ValueError("data.train: name the training data (a data directory, a registered source, or a mixture)")
    records = [sources.source(s.source, "train", config) for s in config.data.train]
    source = records[0] if len(records) == 1 else Mixture(tuple(records), tuple(s.weight for s in config.data.train))
    loader = batches(source, collator,
                     LoaderConfig(batch_size=config.data.batch_size // hosts, seed=config.data.shuffle_seed,
                                  packing=config.data.packing, pack_window=config.data.pack_window))
    return collator, iter(loader)


def _shares(config: TrainConfig, data) -> dict:
    """A mixture's sources' shares of the records read so far (process 0's, over the whole run)."""
    if len(config.data.train) < 2:
        return {}
    counts = data.records_by_source
    total = max(sum(counts.values()), 1)
    return {f"data_share/{s.source}": counts.get(i, 0) / total for i, s in enumerate(config.data.train)}


def _loop(config: TrainConfig, run: _Setup, checkpoints: _Checkpoints, stop: StopSignals,
          report: _Report) -> tuple[int, dict]:
    """Steps until `config.steps` or a stop signal; logs, evaluates and saves on schedule. -> (the last step, the
    last logged metrics)."""
    step, last = int(run.state.step), {}
    run.throughput.restart()
    while step < config.steps:
        batch = next(run.data)
        run.state, metrics = run.train_step(run.state, run.parts.frozen, step_lib.put_batch(batch, run.partitioning))
        step += 1
        loss = float(metrics["loss"])  # every step: a non-finite loss must stop the run before it is saved
        if not math.isfinite(loss):
            good = checkpoints.latest_step()
            raise TrainingError(f"loss is {loss} at step {step}; stopped, last good checkpoint: "
                                f"{'step ' + str(good) if good is not None else 'none'} in {config.workdir}")
        run.throughput.add(batch)
        if step % config.log_every == 0 or step == config.steps:
            last = {"step": step, "loss": loss, "learning_rate": float(run.schedule(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]), **run.throughput.rates(),
                    "skipped_records": sum(run.data.skipped.values()), **_shares(config, run.data)}
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                for evaluate in run.evaluators:
                    last.update(evaluate(run.state, run.parts.frozen))
            report.log(last)
            run.throughput.restart()
        if step % config.save_every == 0 or step == config.steps:
            checkpoints.save(step, run.state, run.data)
        if stop.received is not None:
            checkpoints.save(step, run.state, run.data)
            break
    return step, last


def train(config: TrainConfig) -> dict:
    """Runs (or resumes) supervised training; returns the last logged metrics (every objective: `run.run`)."""
    if config.objective != "sft":
        raise ValueError(f"objective '{config.objective}': run it with idefics_jax.train.run.run")
    check_wandb(config)
    as_path(config.workdir).mkdir(parents=True, exist_ok=True)
    run = _setup(config)
    checkpoints = _Checkpoints(config)
    run.state = checkpoints.restore(run.state, run.data)
    if jax.process_index() == 0:
        (as_path(config.workdir) / RUN_CONFIG).write_text(json.dumps(config_lib.to_dict(config), indent=2))
    with StopSignals() as stop:
        report = _Report(config, start=int(run.state.step))
        try:
            step, last = _loop(config, run, checkpoints, stop, report)
        finally:
            report.close()
            checkpoints.close()
    report.summary(step, last, stop.received)
    return last


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m idefics_jax.train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    last = train(config_lib.load(argv[0], argv[1:]))
    print(json.dumps(last))
    return 0
