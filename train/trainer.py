"""The fine-tuning program: `idefics-jax train CONFIG [key=value ...]` or `python -m idefics_jax.train CONFIG ...`.

The loop, its checkpoints and its signals; the model comes from `loading`, the records from `sources`, held-out
metrics from `evaluate`. Writes WORKDIR/metrics.jsonl (one JSON object per logged step), Orbax checkpoints in
WORKDIR/checkpoints (trainable parameters, optimizer state, data-iterator state), and resumes from the newest
complete one when started again. SIGTERM saves a checkpoint and stops.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax import sharding as shd
from idefics_jax.progress import Progress
from idefics_jax.sharding import RULES, MeshShape
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


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    os.makedirs(cfg.workdir, exist_ok=True)
    mesh = shd.make_mesh(MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) if jax.device_count() > 1 else None
    part = None if mesh is None else shd.Partitioning(mesh, RULES)
    model, model_dir = load_model(cfg, part)
    compute = {"float32": None, "bfloat16": jnp.bfloat16}[cfg.compute_dtype]
    parts = step_lib.split(model, cfg.freeze, cfg.lora, jax.random.key(cfg.seed))
    tx = optim.make(cfg.optim, cfg.steps, parts.fan_in, parts.trainable)
    train_step = step_lib.make_train_step(parts, tx, compute_dtype=compute, remat=cfg.remat, lora=cfg.lora,
                                          grad_accum=cfg.optim.grad_accum, attention=cfg.attention or None)
    schedule = optim.schedule(cfg.optim, cfg.steps)

    collate_cfg = CollateConfig(length_buckets=tuple(cfg.data.length_buckets), max_images=cfg.data.max_images,
                                image_splitting=cfg.data.image_splitting, longest_edge=cfg.data.longest_edge or None)
    collator = Collator.from_pretrained(model_dir, collate_cfg)
    loader = batches(sources.source(cfg.data.train, "train", cfg), collator,
                     LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.data.shuffle_seed,
                                  packing=cfg.data.packing, pack_window=cfg.data.pack_window))
    it = iter(loader)
    evaluator = Evaluator(cfg, parts, collator, part) if cfg.eval_every and cfg.data.eval else None

    state = step_lib.init_state(parts.trainable, tx)
    frozen = parts.frozen
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(cfg.workdir, CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=True),
    )
    start = manager.latest_step()
    if start is not None:
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
        state = restored.state
        it.set_state(restored.data)
        print(f"resumed from step {start} in {cfg.workdir}", file=sys.stderr)
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=2)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.__setitem__("signal", sig))

    def save(step: int):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(it.get_state())), force=True)

    flops_tok = flops_per_token(model)
    peak = peak_flops(compute or jnp.float32) * jax.device_count()
    del model
    progress = Progress("training", cfg.steps, unit="steps", rate=False)
    metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")
    last: dict = {}
    step = int(state.step)
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
            tokens_since += int(host_batch["attention_mask"].sum())
            slots_since += host_batch["attention_mask"].size
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - t0
                tps = tokens_since / dt
                last = {"step": step, "loss": loss, "learning_rate": float(schedule(step - 1)),
                        "tokens_per_second": tps, "mfu": tps * flops_tok / peak, "grad_norm": float(m["grad_norm"]),
                        "real_tokens_per_second": tps, "real_token_fraction": tokens_since / max(slots_since, 1),
                        "skipped_records": sum(it.skipped.values())}
                if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last.update(evaluator(state, frozen))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                progress.set(step, f"loss {loss:.4f}, {tps:,.0f} tok/s")
                t0, tokens_since, slots_since = time.perf_counter(), 0, 0
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
            if stop["signal"] is not None:
                save(step)
                progress.close()
                print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved", file=sys.stderr)
                break
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        signal.signal(signal.SIGTERM, previous)
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
