"""GRPO, `objective: grpo`: sample G completions of every prompt from the policy through the serving engine, reward
them, normalise the rewards within each group, and take `grpo.updates` clipped, KL-penalised policy steps on them
(the loss: `train.grpo_loss`). Log-probabilities are those of the sampling distribution (logits divided by
`grpo.temperature`, as TRL computes them).

One training step is one optimizer update; a batch of rollouts is drawn every `grpo.updates` steps from the
policy's current weights (the engine reads the training state's arrays: no copy, no recompilation). Batch k's
prompts and sampling seeds follow from (`seed`, k) alone, so a run resumed from a checkpoint (saved at batch
boundaries) draws what the uninterrupted run drew. Prompts: data.train "shapes-color-count" (the tiny-shapes
colour-count question, fresh images), "shapes-mixed" (half of them the old tiny-shapes questions) or a JSONL
file of {"images": [paths], "prompt": str, "answers": [str]} (image paths relative to the file).
WORKDIR/metrics.jsonl gets per step: loss, reward mean and spread, accuracy (share of rewards >= 1), KL, clip
fraction, completion length, rollout and update seconds.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idefics_jax.checkpoints.paths import as_path
from idefics_jax.checkpoints.registry import RUN_CONFIG
from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.generation.prompt import bucket
from idefics_jax.ops import heap
from idefics_jax.train import config as config_lib
from idefics_jax.train import grpo_loss, logprobs, optim, rewards, rollouts, step as step_lib
from idefics_jax.train.config import TrainConfig
from idefics_jax.train.loading import compute_dtype, load_model
from idefics_jax.train.records import read_jsonl
from idefics_jax.train.trainer import StopSignals, TrainingError, _Checkpoints, _Report


def one_source(config: TrainConfig) -> str:
    """`data.train` as the one source DPO and GRPO read (they take no mixtures)."""
    if len(config.data.train) != 1:
        raise ValueError(f"data.train: {config.objective} reads one source, not a mixture of "
                         f"{len(config.data.train)}")
    return config.data.train[0].source


def shapes_color_count(batch: int, n: int, seed: int) -> list[rollouts.Prompt]:
    """`n` tiny-shapes prompts of batch `batch`: a fresh image each, one of its four colour counts asked."""
    from idefics_jax.shapes import task as shapes

    rng = np.random.default_rng([seed, batch, 0x5EED])
    out = []
    for _ in range(n):
        ex = shapes.sample(rng)
        q = shapes.color_count_questions(ex.shapes)[int(rng.integers(len(shapes.COLORS)))]
        out.append(rollouts.Prompt(user_turn(q.text, 1), [ex.image], (q.answer,), q.text))
    return out


def shapes_mixed(batch: int, n: int, seed: int) -> list[rollouts.Prompt]:
    """`shapes_color_count`'s prompts, every other one replaced by one of the image's old questions (count, colour,
    shape), so that the rewards keep those answers right while the new question is learned."""
    from idefics_jax.shapes import task as shapes

    out = shapes_color_count(batch, n, seed)
    rng = np.random.default_rng([seed, batch, 0x01D])
    for i in range(1, n, 2):
        ex = shapes.sample(rng)
        q = ex.questions[int(rng.integers(len(ex.questions)))]
        out[i] = rollouts.Prompt(user_turn(q.text, 1), [ex.image], (q.answer,), q.text)
    return out


def jsonl_prompts(path: str) -> list[rollouts.Prompt]:
    """{"images": [...], "prompt": str, "answers": [...]} lines -> prompts (images as paths beside the file)."""
    return read_jsonl(path, "a GRPO record {images, prompt, answers}", lambda r, images: rollouts.Prompt(
        user_turn(r["prompt"], len(images)), images, tuple(str(a) for a in r["answers"]), r["prompt"]))


def prompt_source(config: TrainConfig) -> Callable[[int], list[rollouts.Prompt]]:
    """Batch index -> its prompts."""
    n = config.grpo.prompts
    if one_source(config) == "shapes-color-count":
        return lambda k: shapes_color_count(k, n, config.seed)
    if one_source(config) == "shapes-mixed":
        return lambda k: shapes_mixed(k, n, config.seed)
    if not os.path.isfile(one_source(config)):
        raise ValueError(f"data.train: '{one_source(config)}' is not shapes-color-count, shapes-mixed or a JSONL file")
    records = jsonl_prompts(one_source(config))
    order = np.random.default_rng(config.data.shuffle_seed).permutation(len(records))
    return lambda k: [records[order[(k * n + i) % len(records)]] for i in range(n)]


class _Position:
    """The data position a checkpoint keeps: the number of rollout batches drawn (prompts follow from it)."""

    def __init__(self):
        self.batches = 0

    def get_state(self) -> dict:
        return {"batches": self.batches}

    def set_state(self, state: dict) -> None:
        self.batches = int(state["batches"])


def make_grpo_step(s: step_lib.Split, tx: optax.GradientTransformation, config: TrainConfig, compute_dtype):
    """-> jitted `step(state, frozen, batch) -> (state, metrics)`: one clipped, KL-penalised update on a batch of
    sequences with `advantages` (N,), `old_logps` and `ref_logps` (N, T - 1)."""
    g = config.grpo
    heap.for_cpu_training()

    def loss_fn(trainable, frozen, batch):
        params = logprobs.policy_params(s, trainable, frozen, config.lora)
        lp = logprobs.params_token_logps(s, params, batch, compute_dtype=compute_dtype, remat=config.remat,
                                         temperature=g.temperature)
        old = batch["old_logps"] if g.updates > 1 else jax.lax.stop_gradient(lp)
        return grpo_loss.grpo_loss(lp, old, batch["ref_logps"], batch["advantages"], batch["completion_mask"][:, 1:],
                                   beta=g.beta, epsilon=g.epsilon)

    def step(state: step_lib.TrainState, frozen, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return (step_lib.TrainState(state.step + 1, trainable, opt_state),
                {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics})

    return jax.jit(step, donate_argnums=(0,))


def make_logps(s: step_lib.Split, compute_dtype, temperature: float):
    """-> jitted `logps(params, batch) -> (N, T - 1)` per-token completion log-probabilities at the sampling
    temperature."""
    return jax.jit(lambda params, batch: logprobs.params_token_logps(s, params, batch, compute_dtype=compute_dtype,
                                                                     temperature=temperature))


class Grpo:
    """A GRPO run in memory: the model split for training, the rollout engine over the policy, the jitted update."""

    def __init__(self, config: TrainConfig):
        self.config, g = config, config.grpo
        model, model_dir = load_model(config, None)
        from transformers import AutoProcessor

        from idefics_jax.checkpoints.paths import local_side_files

        self.processor = AutoProcessor.from_pretrained(local_side_files(model_dir))
        self.defaults = model.generation_defaults
        self.parts = step_lib.split(model, config.freeze, config.lora, jax.random.key(config.seed))
        # The reference: with LoRA the frozen base itself; else the starting weights, kept apart from the state
        # the update donates.
        lora = config.lora.rank > 0
        self.start = None if lora else jax.tree.map(jnp.copy, self.parts.trainable)
        self.compute = compute_dtype(config)
        self.tx = optim.make(config.optim, config.steps, self.parts.fan_in, self.parts.trainable)
        self.update = make_grpo_step(self.parts, self.tx, config, self.compute)
        self.logps = make_logps(self.parts, self.compute, g.temperature)
        self.state = step_lib.init_state(self.parts.trainable, self.tx)
        self.chat = Chat(model, self.processor)
        self.prompts = prompt_source(config)
        self.reward = rewards.reward_function(g.reward)
        probe = self.chat.inputs(self.prompts(0)[0].messages, self.prompts(0)[0].images)["input_ids"].shape[1]
        self.engine = rollouts.rollout_engine(self.policy(), self.processor, slots=g.slots,
                                              max_len=rollouts.max_len_for(2 * probe, g.max_new_tokens))
        self.schedule = optim.schedule(config.optim, config.steps)

    def policy(self):
        """The model around the training state's current parameters (the same arrays)."""
        model = step_lib.merge(self.parts, logprobs.policy_params(self.parts, self.state.trainable, self.parts.frozen,
                                                                  self.config.lora))
        model.generation_defaults = self.defaults
        return model

    def batch(self, k: int) -> tuple[dict, dict]:
        """Rollout batch k: its sequences (with advantages, reference and old log-probabilities) and its
        rollout metrics."""
        g, pad = self.config.grpo, self.defaults.pad_token_id or 0
        prompts = self.prompts(k)
        t0 = time.perf_counter()
        self.engine.update_weights(self.policy())
        groups = rollouts.sample_groups(self.engine, prompts, group_size=g.group_size, max_new_tokens=g.max_new_tokens,
                                        temperature=g.temperature, top_p=g.top_p,
                                        seed=int(np.random.default_rng([self.config.seed, k]).integers(2**30)))
        t_roll = time.perf_counter() - t0
        r = np.array([self.reward(p.text, c.text, p.answers) for p, grp in zip(prompts, groups) for c in grp],
                     np.float32)
        inputs = self.chat.batch_inputs([(p.messages, p.images) for p in prompts for _ in range(g.group_size)])
        seqs = logprobs.sequences(inputs, [list(c.tokens) for grp in groups for c in grp], pad,
                                  width=g.max_new_tokens, prompt_width=bucket(inputs["input_ids"].shape[1]))
        seqs = {k_: jnp.asarray(v) for k_, v in seqs.items()}
        zeros = jnp.zeros_like(seqs["completion_mask"][:, 1:], jnp.float32)
        ref = logprobs.reference_params(self.parts.frozen, self.start)
        policy = logprobs.policy_params(self.parts, self.state.trainable, self.parts.frozen, self.config.lora)
        batch = {**seqs, "advantages": jnp.asarray(grpo_loss.advantages(r, g.group_size)),
                 "ref_logps": self.logps(ref, seqs) if g.beta > 0 else zeros,
                 "old_logps": self.logps(policy, seqs) if g.updates > 1 else zeros}
        lengths = np.array([len(c.tokens) for grp in groups for c in grp])
        spread = float(r.reshape(-1, g.group_size).std(axis=1, ddof=1).mean())
        return batch, {"reward_mean": float(r.mean()), "reward_std": spread, "accuracy": float((r >= 1).mean()),
                       "completion_length": float(lengths.mean()), "completion_tokens": int(lengths.sum()),
                       "rollout_seconds": t_roll}


def train_grpo(config: TrainConfig) -> dict:
    """Runs (or resumes) a GRPO run; returns the last logged metrics."""
    as_path(config.workdir).mkdir(parents=True, exist_ok=True)
    run = Grpo(config)
    checkpoints, position = _Checkpoints(config), _Position()
    run.state = checkpoints.restore(run.state, position)
    if jax.process_index() == 0:
        (as_path(config.workdir) / RUN_CONFIG).write_text(json.dumps(config_lib.to_dict(config), indent=2))
    U, step, last = config.grpo.updates, int(run.state.step), {}
    with StopSignals() as stop, run.engine:
        report = _Report(config, start=step)
        try:
            while step < config.steps:
                batch, roll = run.batch(position.batches)
                position.batches += 1
                t0, sums = time.perf_counter(), {}
                for _ in range(min(U, config.steps - step)):
                    run.state, metrics = run.update(run.state, run.parts.frozen, batch)
                    step += 1
                    sums = {k: sums.get(k, 0.0) + float(v) for k, v in metrics.items()}
                    if not math.isfinite(sums["loss"]):
                        raise TrainingError(f"loss is {sums['loss']} at step {step}; stopped, last good checkpoint: "
                                            f"step {checkpoints.latest_step()} in {config.workdir}")
                n = max(1, step - (position.batches - 1) * U)
                took = time.perf_counter() - t0
                last = {"step": step, **{k: v / n for k, v in sums.items()}, **roll, "update_seconds": took,
                        "learning_rate": float(run.schedule(step - 1)),
                        "tokens_per_second": roll["completion_tokens"] / (took + roll["rollout_seconds"])}
                if step % config.log_every < U or step == config.steps:
                    report.log(last)
                if step % config.save_every < U or step == config.steps or stop.received is not None:
                    checkpoints.save(step, run.state, position)
                if stop.received is not None:
                    break
        finally:
            report.close()
            checkpoints.close()
    report.summary(step, last, stop.received)
    return last
