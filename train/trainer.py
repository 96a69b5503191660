"""The fine-tuning program: `idefics-jax train CONFIG [key=value ...]` or `python -m idefics_jax.train CONFIG ...`.

The loop, its checkpoints and its signals; the model comes from `loading`, the records from `sources`, held-out
metrics from `evaluate`. Writes WORKDIR/metrics.jsonl (one JSON object per logged step), Orbax checkpoints in
WORKDIR/checkpoints (trainable parameters, optimizer state, data-iterator state), and resumes from the newest
complete one when started again. SIGTERM and Ctrl-C save a checkpoint and stop.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax.model import sharding as shd
from idefics_jax.checkpoints.paths import as_path, is_remote
from idefics_jax.runtime.progress import Progress
from idefics_jax.model.sharding import RULES, MeshShape
from idefics_jax.train import config as config_lib
from idefics_jax.train import optim, sources, step as step_lib
from idefics_jax.train.collate import CollateConfig, Collator
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.data import LoaderConfig, batches
from idefics_jax.train.evaluate import Evaluator
from idefics_jax.train.loading import CHECKPOINTS, load_model


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
              f"loss {last.get('loss', float('nan')):.4f}{evals}; checkpoints in {as_path(workdir) / CHECKPOINTS}",
              flush=True)


class _MetricsFile:
    """WORKDIR/metrics.jsonl, one line per logged step, kept across resumes. A local file is appended to. A bucket
    has no append, but writes each object whole: there the file is rewritten with every line (it stays small), so
    a killed run leaves the previous version, never half a line."""

    def __init__(self, path):
        self.path, self.remote = path, is_remote(path)
        self.text = path.read_text() if self.remote and path.exists() else ""

    def append(self, line: str) -> None:
        if self.remote:
            self.text += line + "\n"
            self.path.write_text(self.text)
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    as_path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    mesh = shd.make_mesh(MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) if jax.device_count() > 1 else None
    part = None if mesh is None else shd.Partitioning(mesh, RULES)
    model, model_dir = load_model(cfg, part)
    compute = {"float32": None, "bfloat16": jnp.bfloat16}[cfg.compute_dtype]
    parts = step_lib.split(model, cfg.freeze, cfg.lora, jax.random.key(cfg.seed))
    tx = optim.make(cfg.optim, cfg.steps, parts.fan_in, parts.trainable)
    train_step = step_lib.make_train_step(parts, tx, compute_dtype=compute, remat=cfg.remat, lora=cfg.lora,
                                          grad_accum=cfg.optim.grad_accum, attention=cfg.attention or None)
    schedule = optim.schedule(cfg.optim, cfg.steps)

    # data.batch_size is the global batch; each process loads its share (see train.data). Several processes pad
    # to the longest bucket: the rows of one global array must have one length on every host.
    hosts = jax.process_count()
    if cfg.data.batch_size % hosts:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} does not divide over {hosts} processes")
    buckets = tuple(cfg.data.length_buckets)[-1:] if hosts > 1 else tuple(cfg.data.length_buckets)
    collate_cfg = CollateConfig(length_buckets=buckets, max_images=cfg.data.max_images,
                                image_splitting=cfg.data.image_splitting, longest_edge=cfg.data.longest_edge or None)
    collator = Collator.from_pretrained(model_dir, collate_cfg)
    loader = batches(sources.source(cfg.data.train, "train", cfg), collator,
                     LoaderConfig(batch_size=cfg.data.batch_size // hosts, seed=cfg.data.shuffle_seed,
                                  packing=cfg.data.packing, pack_window=cfg.data.pack_window))
    it = iter(loader)
    evaluator = Evaluator(cfg, parts, collator, part) if cfg.eval_every and cfg.data.eval else None

    state = step_lib.init_state(parts.trainable, tx)
    frozen = parts.frozen
    manager = ocp.CheckpointManager(
        as_path(cfg.workdir) / CHECKPOINTS,  # a local directory or a bucket (gs://)
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=True),
    )
    start = manager.latest_step()
    if start is not None:
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
        state = restored.state
        it.set_state(restored.data)
        print(f"resumed from step {start} in {cfg.workdir}", file=sys.stderr)
    main_process = jax.process_index() == 0
    if main_process:
        (as_path(cfg.workdir) / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2))

    # SIGTERM (a preempted TPU VM) and Ctrl-C both finish the step, save and stop; a second Ctrl-C interrupts.
    stop = {"signal": None}

    def on_signal(sig, frame):
        stop["signal"] = signal.Signals(sig).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    saved = {"step": start}

    def save(step: int):
        if saved["step"] == step:  # a signal right after a scheduled save
            return
        saved["step"] = step
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(it.get_state())), force=True)

    flops_tok = flops_per_token(model)
    peak = peak_flops(compute or jnp.float32) * jax.device_count()
    del model
    # Process 0 only: the bar (a terminal) or a line every few seconds on stderr; one line per logged step on a
    # stdout that is not a terminal (_StepLog).
    progress = Progress("training", cfg.steps, unit="steps", rate=False, enabled=main_process)
    metrics = _MetricsFile(as_path(cfg.workdir) / "metrics.jsonl") if main_process else None
    last: dict = {}
    step = int(state.step)
    log = _StepLog(cfg.steps, step)
    t0, tokens_since, slots_since = time.perf_counter(), 0, 0
    try:
        while step < cfg.steps:
            host_batch = next(it)
            state, m = train_step(state, frozen, step_lib.put_batch(host_batch, part))
            step += 1
            loss = float(m["loss"])  # every step: a non-finite loss must stop the run before it is saved
            if not math.isfinite(loss):
                good = manager.latest_step()
                raise TrainingError(f"loss is {loss} at step {step}; stopped, last good checkpoint: "
                                    f"{'step ' + str(good) if good is not None else 'none'} in {cfg.workdir}")
            tokens_since += int(host_batch["attention_mask"].sum()) * hosts  # about: this host's share
            slots_since += host_batch["attention_mask"].size * hosts
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - t0
                tps = tokens_since / dt
                last = {"step": step, "loss": loss, "learning_rate": float(schedule(step - 1)),
                        "tokens_per_second": tps, "mfu": tps * flops_tok / peak, "grad_norm": float(m["grad_norm"]),
                        "real_tokens_per_second": tps, "real_token_fraction": tokens_since / max(slots_since, 1),
                        "skipped_records": sum(it.skipped.values())}
                if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last.update(evaluator(state, frozen))
                if metrics is not None:
                    metrics.append(json.dumps(last))
                progress.set(step, f"loss {loss:.4f}, {tps:,.0f} tok/s")
                log.show(step, loss, last["learning_rate"], tps)
                t0, tokens_since, slots_since = time.perf_counter(), 0, 0
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
            if stop["signal"] is not None:
                save(step)
                break
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.summary(step, last, cfg.workdir, stop["signal"])
    return last


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m idefics_jax.train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    cfg = config_lib.load(argv[0], argv[1:])
    last = train(cfg)
    print(json.dumps(last))
    return 0
