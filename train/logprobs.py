"""Log-probabilities of completions given their prompt and images: what DPO and GRPO score.

A batch of sequences is a left-padded prompt batch (the chat template's generation prompt, as `Chat.batch_inputs`
makes it) with each row's completion tokens appended and right-padded:

    input_ids        (B, P + C)   [pad..pad prompt][completion pad..pad]
    attention_mask   (B, P + C)   1 on prompt and completion tokens
    completion_mask  (B, P + C)   1 on completion tokens only
    pixel_values, pixel_attention_mask as the processor gives them

Positions come from the attention mask, so the left padding does not shift them: every row is scored as it would
be alone. A completion's log-probability is the sum over its tokens of log p(token | everything before it).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.ops.weights import cast, dense
from idefics_jax.train import step as step_lib
from idefics_jax.train.config import LoraConfig

LOGP_CHUNK = 128  # positions whose vocabulary scores exist at once


def completion_tokens(tokenizer, text: str, eos_id: int | None) -> list[int]:
    """A completion's text -> its tokens, ended with `eos_id` as the model ends an answer (TRL's DPO appends the
    eos token the same way)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + ([int(eos_id)] if eos_id is not None else [])


def sequences(prompts: dict, completions: Sequence[Sequence[int]], pad_id: int, width: int | None = None,
              prompt_width: int | None = None) -> dict:
    """Prompt inputs (a left-padded batch, `Chat.batch_inputs`) with completion token rows appended -> the
    sequence batch of the module docstring; completions right-padded to `width` (default their longest), prompts
    left-padded to `prompt_width` (fixed shapes: fewer compilations)."""
    ids = np.asarray(prompts["input_ids"])
    mask = np.asarray(prompts["attention_mask"]) if prompts.get("attention_mask") is not None else np.ones_like(ids)
    if prompt_width is not None and prompt_width > ids.shape[1]:
        extra = prompt_width - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
    B = ids.shape[0]
    if len(completions) != B:
        raise ValueError(f"{len(completions)} completions for {B} prompts")
    C = width if width is not None else max(len(c) for c in completions)
    if any(len(c) > C for c in completions):
        raise ValueError(f"a completion is longer than the width {C}")
    comp = np.full((B, C), pad_id, np.int32)
    cmask = np.zeros((B, C), np.int32)
    for b, c in enumerate(completions):
        comp[b, :len(c)] = c
        cmask[b, :len(c)] = 1
    out = {"input_ids": np.concatenate([ids.astype(np.int32), comp], axis=1),
           "attention_mask": np.concatenate([mask.astype(np.int32), cmask], axis=1),
           "completion_mask": np.concatenate([np.zeros_like(mask, np.int32), cmask], axis=1)}
    for k in ("pixel_values", "pixel_attention_mask"):
        if prompts.get(k) is not None:
            out[k] = np.asarray(prompts[k])
    return out


def token_logps(h_BTD, w_DV, ids_BT, chunk: int = LOGP_CHUNK, temperature: float = 1.0):
    """log p(ids[:, t] | h[:, t - 1]) for t >= 1 -> (B, T - 1) float32, the vocabulary scores made `chunk`
    positions at a time and recomputed in the backward pass (no (B, T, V) array is kept). With `temperature`, of
    the distribution sampling at that temperature draws from (logits / temperature)."""
    h, y = h_BTD[:, :-1], ids_BT[:, 1:]
    B, T1, D = h.shape
    n = -(-T1 // chunk)
    pad = n * chunk - T1
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    y = jnp.pad(y, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(hy):
        h_BCD, y_BC = hy
        logits = jnp.einsum("BCD,DV->BCV", h_BCD, w_DV, preferred_element_type=jnp.float32) / temperature
        picked = jnp.take_along_axis(logits, y_BC[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(one, (h, y))  # (n, B, chunk)
    return out.swapaxes(0, 1).reshape(B, n * chunk)[:, :T1]


def model_token_logps(model, batch: dict, remat: str = "none", temperature: float = 1.0):
    """Per-token log-probabilities of `batch`'s tokens under `model` -> (B, T - 1), masked to the completion
    tokens (0 elsewhere)."""
    h = model.hidden(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                     batch.get("pixel_attention_mask"), remat=remat)
    w = dense(model.lm_weight(), h.dtype)
    logps = token_logps(h, w, batch["input_ids"], temperature=temperature)
    return logps * batch["completion_mask"][:, 1:]


def params_token_logps(s: step_lib.Split, params: dict, batch: dict, *, compute_dtype=None, remat: str = "none",
                       temperature: float = 1.0):
    """`model_token_logps` of the model around `params` (every parameter by path), cast to `compute_dtype`."""
    if compute_dtype is not None:
        params = {p: cast(v, compute_dtype) for p, v in params.items()}
    return model_token_logps(step_lib.merge(s, params), batch, remat, temperature)


def policy_params(s: step_lib.Split, trainable: dict, frozen: dict, lora: LoraConfig | None) -> dict:
    """The policy's parameters: the trainable ones over the frozen ones (with LoRA, the adapters applied)."""
    return step_lib.full_params(frozen, trainable, lora)


def reference_params(frozen: dict, start: dict | None) -> dict:
    """The frozen starting model's parameters. With LoRA (`start` None) that is the base without its adapters:
    the frozen parameters themselves, no second copy. Full fine-tuning keeps the starting trainable ones
    (`start`) beside the frozen ones."""
    return frozen if start is None else {**frozen, **start}


def completion_logps(model, batch: dict) -> np.ndarray:
    """Summed completion log-probabilities (B,) under `model` (eager, for checks and small jobs)."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return np.asarray(jnp.sum(model_token_logps(model, batch), axis=1))
