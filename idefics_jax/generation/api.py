"""Generation with a static KV cache: one jitted prefill (the vision tower runs here, once) and one jitted decode
`lax.while_loop`, the same tokens as transformers' `generate`.

Shapes are static: the prompt is left-padded to a bucketed length and the cache has a bucketed number of slots, so
new prompt lengths rarely recompile. The decode state (cache included) is donated to every decode call and updated
in place. Streaming runs the same loop in chunks of steps: the loop stays on the device (no host callback per
step) and a chunk costs one dispatch, so a chunk of one token is cheap on the CPU and a few tokens on an
accelerator; `generate` is one chunk of `max_new_tokens`.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.ops.decode_weights import layer_weights, on_cpu
from idefics_jax.generation.decode import decode, prefill
from idefics_jax.model.idefics import IdeficsModel, check_attention, check_inputs
from idefics_jax.generation.sampling import SamplingConfig, SamplingParams


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest of minimum * 2^k * {1, 5/4, 6/4, 7/4} that is >= n: at most 25% padding, few shapes."""
    b = minimum
    while True:
        for quarters in (4, 5, 6, 7):
            if b * quarters // 4 >= n:
                return b * quarters // 4
        b *= 2


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return model.generation_defaults.eos_token_ids
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_arguments(*, max_new_tokens, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=None,
                    top_p=None, chunk_size=1, seed=0) -> None:
    """Every generation argument error as a ValueError that names it; needs no model (the CLI checks its
    arguments with it before loading one)."""
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    if not (_is_int(min_new_tokens) and min_new_tokens >= 0):
        raise ValueError(f"min_new_tokens must be an integer >= 0; got {min_new_tokens!r}")
    if do_sample and not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling; got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None); got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None); got {top_p!r}")
    if not (_is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer; got {seed!r}")


def _check_prompt(model, mask_BT) -> None:
    if not mask_BT.any(axis=1).all():
        raise ValueError("every row needs at least one token (attention_mask has an all-zero row)")
    if mask_BT[:, -1].min() == 0:
        raise ValueError("batches must be padded on the left (a row's last token is padding)")
    # Positions come from the mask, so left padding does not count; beyond the trained positions RoPE
    # extrapolates and the answer is garbage, so say so instead.
    longest = int(mask_BT.sum(axis=1).max())
    limit = model.config.text.max_position_embeddings
    if longest > limit:
        raise ValueError(f"the prompt has {longest} tokens but the model has {limit} positions "
                         "(max_position_embeddings); shorten it or use fewer / smaller images")


def generate_stream(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None,
                    pixel_attention_mask=None, *, max_new_tokens: int, min_new_tokens: int = 0,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None, seed: int = 0, chunk_size: int = 1,
                    attention: str | None = None) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new tokens as they come: arrays (B, n) of up to `chunk_size` steps each
    (rows already finished hold `pad_token_id`). The tokens are those `generate` returns, sampling included."""
    check_attention(attention)
    ids = np.asarray(input_ids)
    check_inputs(model.config, ids, attention_mask, pixel_values, pixel_attention_mask)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    check_arguments(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, chunk_size=chunk_size, seed=seed)
    _check_prompt(model, mask)

    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:  # transformers' order: the generation config's pad, else the first eos
        pad_token_id = model.generation_defaults.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    cfg = SamplingConfig(do_sample=bool(do_sample), top_k=top_k if do_sample else None,
                         use_top_p=bool(do_sample and top_p is not None and top_p < 1.0))
    sp = SamplingParams(
        temperature=jnp.float32(temperature if do_sample else 1.0), top_p=jnp.float32(top_p or 1.0),
        min_new_tokens=jnp.int32(min_new_tokens), pad_token_id=jnp.int32(pad_token_id),
        eos_ids_E=jnp.asarray(eos, jnp.int32).reshape(-1), key=jax.random.key(seed))

    # Left padding up to the bucket changes nothing: padded keys are masked and positions come from the mask.
    B, T = ids.shape
    Tb = bucket(T)
    fill = 0 if model.config.image_token_id != 0 else 1  # never an image token
    ids_b = np.concatenate([np.full((B, Tb - T), fill, np.int32), ids.astype(np.int32)], axis=1)
    mask_b = np.concatenate([np.zeros((B, Tb - T), np.int32), mask], axis=1)
    slots = bucket(Tb + max_new_tokens)

    graphdef, params = nnx.split(model)
    lw = layer_weights(model)
    cpu = on_cpu(jax.tree.leaves(params))
    state = prefill(graphdef, params, lw, ids_b, mask_b, pixel_values, pixel_attention_mask, sp, cfg=cfg,
                     slots=slots, cpu=cpu, attention=attention)
    produced = 0
    while True:
        # Copies (np.array), not views: `state` is donated to the next call.
        step, tokens_BS, done_B = (np.array(a) for a in (state.step, state.tokens_BS, state.done_B))
        yield tokens_BS[:, Tb + produced:Tb + step]
        produced = int(step)
        if produced >= max_new_tokens or done_B.all():
            return
        limit = jnp.int32(min(produced + chunk_size, max_new_tokens))
        state = decode(graphdef, params, lw, state, limit, sp, cfg=cfg)


def generate(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0, attention: str | None = None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after the prompt, as transformers' `generate` does.

    Takes the processor's numpy outputs unchanged (left-padded batches; any number of images per sample).
    Greedy by default; `do_sample=True` draws with `temperature`, `top_k`, `top_p`, reproducibly from `seed`.
    Stops when every row has produced an eos token (`eos_token_id`: one id or several; default the checkpoint's
    generation config) or after `max_new_tokens`. Returns (B, T_prompt + n) with the prompt in front; rows that
    finished early are padded with `pad_token_id` (default the generation config's, else the first eos id).
    `attention`: the prompt's attention backend ("xla", "cudnn", "pallas"; default the platform's, see
    `_layers.attend`); single-token decode steps always use "xla".
    """
    chunks = list(generate_stream(
        model, input_ids, attention_mask, pixel_values, pixel_attention_mask, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, chunk_size=max_new_tokens,
        attention=attention))
    ids = np.asarray(input_ids)
    return np.concatenate([ids, *(c.astype(ids.dtype) for c in chunks)], axis=1)
