"""The fine-tuning program: `idefics-jax train CONFIG [key=value ...]` or `python -m idefics_jax.train CONFIG ...`.

Writes WORKDIR/metrics.jsonl (one JSON object per logged step), Orbax checkpoints in WORKDIR/checkpoints (trainable
parameters, optimizer state, data-iterator state), and resumes from the newest complete one when started again.
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
from idefics_jax.sharding import RULES, MeshShape
from idefics_jax.train import config as config_lib
from idefics_jax.train import optim, step as step_lib
from idefics_jax.train.collate import CollateConfig, Collator
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.data import LoaderConfig, batches
from idefics_jax.train.loading import CHECKPOINTS, load_model

EVAL_RECORDS = 2048  # generated held-out records ("shapes"): more than any evaluation reads


class TrainingError(ValueError):
    """The run cannot go on (a non-finite loss, say); the message says why and what was kept."""


def data_source(spec: str, split: str, cfg: TrainConfig):
    """`spec` is "DIR" or "DIR:SPLIT", a TFDS data directory written by `train.tfds_builder` (SPLIT defaults to
    `split`); or "shapes", the synthetic task, written once into WORKDIR/data-<split>."""
    from idefics_jax.train import tfds_builder

    if spec == "shapes":
        from idefics_jax.train import shapes

        path = os.path.join(cfg.workdir, f"data-{split}")
        if not os.path.isdir(path) or not any(os.scandir(path)):
            seed = cfg.data.shuffle_seed + (0 if split == "train" else 1_000_003)  # held-out images: other seeds
            n = cfg.data.num_records or 1000
            n = n if split == "train" else min(n, EVAL_RECORDS)  # evaluation reads eval_batches batches of them
            sc = cfg.data.shapes
            tfds_builder.build(path, {split: tfds_builder.GeneratedSource(lambda: shapes.records(
                n, seed, sc.questions_per_image or None, tuple(sc.shapes_per_image), tuple(sc.questions)))})
        spec = path
    directory, _, name = spec.partition(":")
    return tfds_builder.data_source(directory, name or split)


def peak_flops(dtype) -> float:
    """Measured matmul throughput of the first device: the denominator of the MFU estimate on any backend."""
    n = 1024
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


class _Progress:
    def __init__(self, total: int):
        self.total, self.tty = total, sys.stderr.isatty()

    def show(self, step: int, loss: float, tps: float):
        if self.tty:
            done = int(30 * step / max(self.total, 1))
            print(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{self.total} loss {loss:.4f} {tps:,.0f} tok/s",
                  end="" if step < self.total else "\n", file=sys.stderr, flush=True)


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
    loader = batches(data_source(cfg.data.train, "train", cfg), collator,
                     LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.data.shuffle_seed,
                                  packing=cfg.data.packing))
    it = iter(loader)

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
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(it.get_state())),
                     force=True)

    flops_tok = flops_per_token(model)
    peak = peak_flops(compute or jnp.float32) * jax.device_count()
    del model
    progress = _Progress(cfg.steps)
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
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last.update(evaluate(cfg, parts, state, frozen, collator, part))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                progress.show(step, loss, tps)
                t0, tokens_since, slots_since = time.perf_counter(), 0, 0
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
            if stop["signal"] is not None:
                save(step)
                print(f"\nstopped by signal {stop['signal']} at step {step}; checkpoint saved", file=sys.stderr)
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        signal.signal(signal.SIGTERM, previous)
    return last


def evaluate(cfg: TrainConfig, parts, state, frozen, collator, part) -> dict:
    """Held-out loss over `eval_batches` batches (the same ones each time)."""
    if not cfg.data.eval:
        return {}
    loss_fn = step_lib.make_loss(parts, lora=cfg.lora)
    source = data_source(cfg.data.eval, "eval", cfg)
    it = iter(batches(source, collator, LoaderConfig(batch_size=cfg.data.batch_size, shuffle=False, num_epochs=1,
                                                     drop_remainder=False)))
    total = count = 0.0
    for _ in range(cfg.eval_batches):
        try:
            b = next(it)
        except StopIteration:
            break
        t, c = loss_fn(state.trainable, frozen, step_lib.put_batch(b, part))
        total, count = total + float(t), count + float(c)
    n = cfg.eval_batches * cfg.data.batch_size
    return {"eval_loss": total / max(count, 1), "eval_exact_match": exact_match(cfg, parts, state, frozen, collator, source, n)}


def exact_match(cfg: TrainConfig, parts, state, frozen, collator, source, n: int) -> float:
    """Fraction of the first `n` held-out records whose first question is answered exactly (greedy decoding)."""
    from idefics_jax.chat import Chat, user_turn
    from idefics_jax.train import lora as lora_lib
    from idefics_jax.train.records import decode_images, from_example

    params = lora_lib.apply(frozen, state.trainable, cfg.lora) if cfg.lora.rank > 0 else {**frozen, **state.trainable}
    chat = Chat(step_lib.merge(parts, params), collator.processor)
    chat.image_kwargs = dict(collator._image_kwargs)  # the images as training sees them
    records = [from_example(source[i]) for i in range(min(n, len(source)))]
    images = [decode_images(r) for r in records]
    tok = collator.processor.tokenizer
    answers = chat.answers([(user_turn(r.texts[0].user, len(ims)), ims) for r, ims in zip(records, images)],
                           max_new_tokens=cfg.eval_generate_tokens, batch_size=cfg.data.batch_size,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    right = sum(a == r.texts[0].assistant.strip() for a, r in zip(answers, records))
    return right / max(len(records), 1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m idefics_jax.train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    cfg = config_lib.load(argv[0], argv[1:])
    last = train(cfg)
    print(json.dumps(last))
    return 0
