"""DPO, `objective: dpo`: preference pairs {images, prompt, chosen, rejected}, the policy's and the frozen
reference's summed log-probabilities of both completions, and the loss of `train.preference`.

Pairs: data.train a JSONL file of {"images": [paths], "prompt": str, "chosen": str, "rejected": str} (TRL's vision
DPO / RLAIF-V layout; image paths relative to the file), or "shapes-color-count": pairs built from the starting
model's own sampled answers to the tiny-shapes colour-count question, a right answer chosen and a wrong one
rejected (prompts where the samples are all right or all wrong give no pair). The reference is the starting
model: with LoRA the base without its adapters (no second copy), else the starting weights kept beside the state.
WORKDIR/metrics.jsonl gets the loss, chosen and rejected rewards, their margin and the preference accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idefics_jax.checkpoints.paths import as_path, local_side_files
from idefics_jax.checkpoints.registry import RUN_CONFIG
from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.generation.prompt import bucket
from idefics_jax.ops import heap
from idefics_jax.train import config as config_lib
from idefics_jax.train import logprobs, optim, preference, rollouts, step as step_lib
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.grpo import _Position, one_source, shapes_color_count
from idefics_jax.train.loading import compute_dtype, load_model
from idefics_jax.train.records import read_jsonl
from idefics_jax.train.trainer import StopSignals, TrainingError, _Checkpoints, _Report

SAMPLES = 8  # answers sampled per prompt when pairs are built from the model's own answers
TEMPERATURE = 3.0  # their sampling temperature: the model is sure of its answers, hotter sampling finds other ones


@dataclasses.dataclass(frozen=True)
class Pair:
    messages: list
    images: list
    chosen: str
    rejected: str


def jsonl_pairs(path: str) -> list[Pair]:
    """{"images": [...], "prompt": str, "chosen": str, "rejected": str} lines -> pairs."""
    return read_jsonl(path, "a DPO record {images, prompt, chosen, rejected}", lambda r, images: Pair(
        user_turn(r["prompt"], len(images)), images, str(r["chosen"]), str(r["rejected"])))


def own_answer_pairs(engine, batch: int, n: int, seed: int, temperature: float = TEMPERATURE) -> list[Pair]:
    """`n` pairs from sampled answers of the engine's model to fresh colour-count prompts (batch `batch`)."""
    pairs, sub = [], 0
    while len(pairs) < n:
        prompts = shapes_color_count(batch * 1000 + sub, n, seed)
        groups = rollouts.sample_groups(engine, prompts, group_size=SAMPLES, max_new_tokens=3,
                                        temperature=temperature, seed=int(np.random.default_rng([seed, batch, sub])
                                                                          .integers(2**30)))
        for p, group in zip(prompts, groups):
            right = [c.text for c in group if c.text in p.answers]
            wrong = [c.text for c in group if c.text not in p.answers]
            if right and wrong and len(pairs) < n:
                pairs.append(Pair(p.messages, p.images, right[0], max(set(wrong), key=wrong.count)))
        sub += 1
    return pairs


class Dpo:
    def __init__(self, config: TrainConfig):
        self.config = config
        model, model_dir = load_model(config, None)
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(local_side_files(model_dir))
        self.defaults = model.generation_defaults
        self.chat = Chat(model, self.processor)
        self.parts = step_lib.split(model, config.freeze, config.lora, jax.random.key(config.seed))
        self.start = None if config.lora.rank > 0 else jax.tree.map(jnp.copy, self.parts.trainable)
        compute = compute_dtype(config)
        self.tx = optim.make(config.optim, config.steps, self.parts.fan_in, self.parts.trainable)
        self.state = step_lib.init_state(self.parts.trainable, self.tx)
        self.schedule = optim.schedule(config.optim, config.steps)
        self.step_fn = _make_step(self.parts, self.tx, config, compute)
        self.logps = jax.jit(lambda params, batch: jnp.sum(
            logprobs.params_token_logps(self.parts, params, batch, compute_dtype=compute), axis=1))
        self.engine = None
        if one_source(config) == "shapes-color-count":
            self.engine = rollouts.rollout_engine(model, self.processor, slots=32, max_len=rollouts.max_len_for(128, 3))
        else:
            pairs = jsonl_pairs(one_source(config))
            order = np.random.default_rng(config.data.shuffle_seed).permutation(len(pairs))
            self.records = [pairs[i] for i in order]

    def pairs(self, k: int) -> list[Pair]:
        B = self.config.data.batch_size
        if self.engine is not None:
            return own_answer_pairs(self.engine, k, B, self.config.seed)
        return [self.records[(k * B + i) % len(self.records)] for i in range(B)]

    def batch(self, k: int) -> dict:
        """Batch k: chosen rows then rejected rows, with the reference's summed log-probabilities."""
        pairs, tok = self.pairs(k), self.processor.tokenizer
        eos = (self.defaults.eos_token_ids or [None])[0]
        width = self.config.dpo.max_new_tokens
        comps = [logprobs.completion_tokens(tok, text, eos)[:width]
                 for text in [p.chosen for p in pairs] + [p.rejected for p in pairs]]
        inputs = self.chat.batch_inputs([(p.messages, p.images) for p in pairs] * 2)
        seqs = logprobs.sequences(inputs, comps, self.defaults.pad_token_id or 0, width=width,
                                  prompt_width=bucket(inputs["input_ids"].shape[1]))
        seqs = {key: jnp.asarray(v) for key, v in seqs.items()}
        ref = self.logps(logprobs.reference_params(self.parts.frozen, self.start), seqs)
        return {**seqs, "ref_logps": ref, "tokens": jnp.sum(seqs["completion_mask"], axis=1)}


def _make_step(s: step_lib.Split, tx: optax.GradientTransformation, config: TrainConfig, compute_dtype):
    heap.for_cpu_training()

    def loss_fn(trainable, frozen, batch):
        params = logprobs.policy_params(s, trainable, frozen, config.lora)
        lp = jnp.sum(logprobs.params_token_logps(s, params, batch, compute_dtype=compute_dtype, remat=config.remat),
                     axis=1)
        B = lp.shape[0] // 2
        ref, n = batch["ref_logps"], batch["tokens"]
        return preference.dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], config.dpo, n[:B], n[B:])

    def step(state: step_lib.TrainState, frozen, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        return (step_lib.TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state),
                {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics})

    return jax.jit(step, donate_argnums=(0,))


def train_dpo(config: TrainConfig) -> dict:
    """Runs (or resumes) a DPO run; returns the last logged metrics."""
    as_path(config.workdir).mkdir(parents=True, exist_ok=True)
    run = Dpo(config)
    checkpoints, position = _Checkpoints(config), _Position()
    run.state = checkpoints.restore(run.state, position)
    if jax.process_index() == 0:
        (as_path(config.workdir) / RUN_CONFIG).write_text(json.dumps(config_lib.to_dict(config), indent=2))
    step, last = int(run.state.step), {}
    with StopSignals() as stop:
        if run.engine is not None:
            run.engine.start()
        report = _Report(config, start=step)
        try:
            while step < config.steps:
                t0 = time.perf_counter()
                batch = run.batch(position.batches)
                position.batches += 1
                t1 = time.perf_counter()
                run.state, metrics = run.step_fn(run.state, run.parts.frozen, batch)
                step += 1
                row = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(row["loss"]):
                    raise TrainingError(f"loss is {row['loss']} at step {step}; stopped, last good checkpoint: "
                                        f"step {checkpoints.latest_step()} in {config.workdir}")
                took = time.perf_counter() - t1
                last = {"step": step, **row, "pairs_seconds": t1 - t0, "update_seconds": took,
                        "learning_rate": float(run.schedule(step - 1)),
                        "tokens_per_second": float(jnp.sum(batch["attention_mask"])) / took}
                if step % config.log_every == 0 or step == config.steps:
                    report.log(last)
                if step % config.save_every == 0 or step == config.steps or stop.received is not None:
                    checkpoints.save(step, run.state, position)
                if stop.received is not None:
                    break
        finally:
            if run.engine is not None:
                run.engine.stop()
            report.close()
            checkpoints.close()
    report.summary(step, last, stop.received)
    return last
