"""Generation with a static KV cache: one jitted prefill (the vision tower runs here, once) and one jitted decode
`lax.while_loop`, the same tokens as transformers' `generate`.

Shapes are static: the prompt is left-padded to a bucketed length and the cache has a bucketed number of slots, so
new prompt lengths rarely recompile. The decode state (cache included) is donated to every decode call and updated
in place. Streaming runs the same loop in chunks of steps: the loop stays on the device (no host callback per
step) and a chunk costs one dispatch, so a chunk of one token is cheap on the CPU and a few tokens on an
accelerator; `generate` is one chunk of `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax._decoder import KVCache, causal_mask
from idefics_jax._model import IdeficsModel, check_inputs, merge_image_features, positions_from_mask, real_images
from idefics_jax._sampling import SamplingConfig, SamplingParams, choose_tokens, is_eos


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries. Slots [0, start) hold the left-padded prompt, new token i sits at slot
    start + i of `tokens_BS`, and the cache holds the keys and values of every slot fed to the model so far."""

    cache: KVCache
    tokens_BS: jax.Array  # int32
    valid_BS: jax.Array  # bool: the slot holds a real (not padding) token
    pos_B: jax.Array  # position id of the next token fed (the mask's cumsum, as transformers)
    done_B: jax.Array  # bool: the row produced an eos token
    step: jax.Array  # int32 scalar: new tokens produced so far
    start: jax.Array  # int32 scalar: slot of the first new token


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest of minimum * 2^k * {1, 5/4, 6/4, 7/4} that is >= n: at most 25% padding, few shapes."""
    b = minimum
    while True:
        for quarters in (4, 5, 6, 7):
            if b * quarters // 4 >= n:
                return b * quarters // 4
        b *= 2


def _cpu_view(a: jax.Array, index=None, dtype=None) -> jax.Array | None:
    """A zero-copy view of a CPU array (a slice of it, or its bits as another dtype), or None if the runtime
    would copy."""
    host = np.asarray(a)  # zero-copy on the CPU
    view = host if index is None else host[index]
    view = view if dtype is None else view.view(dtype)
    out = jax.device_put(view)
    return out if np.shares_memory(np.asarray(out), host) else None


def _on_cpu(arrays) -> bool:
    return all(isinstance(a, jax.Array) and len(a.devices()) == 1 and next(iter(a.devices())).platform == "cpu"
               for a in arrays)


def _embed_prompt(model: IdeficsModel, ids_BT, pixel_values, pixel_mask, one_image_at_a_time: bool):
    """`model.embed`, optionally running the vision tower on one image at a time: on the CPU, all images at once
    materialise every layer's attention scores for all of them (GBs at batch 8) and run slower."""
    if pixel_values is None or not one_image_at_a_time:
        return model.embed(ids_BT, pixel_values, pixel_mask)
    B, I = pixel_values.shape[:2]
    single = lambda a: None if a is None else a.reshape(B * I, 1, 1, *a.shape[2:])  # noqa: E731
    feats = jax.lax.map(lambda pair: model.image_features(*pair)[0][0], (single(pixel_values), single(pixel_mask)))
    x = jnp.take(model.text.embed[...], ids_BT, axis=0)
    return merge_image_features(x, ids_BT, feats, real_images(pixel_values), model.config.image_token_id)


def layer_weights(model: IdeficsModel):
    """The decoder weights as the decode loop reads them best on the CPU; None elsewhere (the stacked weights).

    XLA:CPU copies a layer's slice of a stacked weight before each matmul of a scan, which doubles a decode
    step's memory traffic: fp32 weights go in as a list of layers (zero-copy views), read in place. bf16
    weights stay stacked but go in as uint16 bits: seeing bf16 matmul operands, XLA:CPU converts whole stacks to
    f32 once per call and streams the f32 copies; as bits they are converted a layer at a time inside the loop.
    """
    stacked = model.text.layers.weights()
    arrays = jax.tree.leaves(stacked)
    if not _on_cpu(arrays):
        return None
    if all(a.dtype == jnp.bfloat16 for a in arrays):
        views = {n: _cpu_view(a, dtype=np.uint16) for n, a in stacked.items()}
        return None if any(v is None for v in views.values()) else views
    if any(a.dtype.itemsize < 4 for a in arrays):
        return None
    L = model.config.text.num_layers
    groups = [{n: _cpu_view(a, i) for n, a in stacked.items()} for i in range(L)]
    return None if any(v is None for g in groups for v in g.values()) else groups


def _per_layer(cache: KVCache, lw) -> KVCache:
    """The cache as lists of per-layer arrays when the layers run one by one (updated in place, layer by layer)."""
    if not isinstance(lw, list):
        return cache
    split = lambda a: [a[i] for i in range(a.shape[0])]  # noqa: E731
    return KVCache(split(cache.k), split(cache.v))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "slots", "cpu"))
def _prefill(graphdef, params, lw, ids_BT, mask_BT, pixel_values, pixel_mask, sp: SamplingParams, *, cfg, slots,
             cpu):
    model: IdeficsModel = nnx.merge(graphdef, params)
    c = model.config.text
    B, T = ids_BT.shape
    x = _embed_prompt(model, ids_BT, pixel_values, pixel_mask, one_image_at_a_time=cpu)
    # A cache of exactly T slots keeps prefill attention at T x T; it grows to all slots once, below. Prefill is
    # compute-bound: it scans the stacked weights (as bits when bf16), whatever groups decoding uses.
    cache = KVCache.zeros(c, B, T, model.dtype)
    h, cache = model.text(x, positions_from_mask(mask_BT), causal_mask(mask_BT, c.sliding_window), cache, 0,
                          layer_weights=None if isinstance(lw, list) else lw)
    grow = ((0, 0), (0, 0), (0, slots - T), (0, 0), (0, 0))
    cache = _per_layer(KVCache(jnp.pad(cache.k, grow), jnp.pad(cache.v, grow)), lw)
    first = choose_tokens(model.lm_logits(h[:, -1:])[:, 0], 0, cfg, sp)
    tokens = jnp.zeros((B, slots), jnp.int32).at[:, :T].set(ids_BT).at[:, T].set(first)
    valid = jnp.zeros((B, slots), bool).at[:, :T].set(mask_BT.astype(bool))
    return DecodeState(cache, tokens, valid, pos_B=jnp.sum(mask_BT, axis=-1, dtype=jnp.int32),
                       done_B=is_eos(first, sp.eos_ids_E), step=jnp.int32(1), start=jnp.int32(T))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("state",))
def _decode(graphdef, params, lw, state: DecodeState, limit, sp: SamplingParams, *, cfg):
    """Decodes until `limit` new tokens exist or every row is done."""
    model: IdeficsModel = nnx.merge(graphdef, params)
    window = model.config.text.sliding_window
    slot_S = jnp.arange(state.tokens_BS.shape[1])

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done_B)

    def body(s: DecodeState):
        q = s.start + s.step - 1  # slot of the token fed now (the newest one)
        tok_B1 = jax.lax.dynamic_slice_in_dim(s.tokens_BS, q, 1, axis=1)
        valid = s.valid_BS | (slot_S == q)[None]
        mask = valid if window is None else valid & (slot_S > q - window)[None]
        h, cache = model.text(model.embed(tok_B1), s.pos_B[:, None], mask[:, None, :], s.cache, q, layer_weights=lw)
        nxt = choose_tokens(model.lm_logits(h)[:, 0], s.step, cfg, sp)
        nxt = jnp.where(s.done_B, sp.pad_token_id, nxt)  # finished rows are padded, as in transformers
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens_BS, nxt[:, None], q + 1, axis=1)
        return DecodeState(cache, tokens, valid, s.pos_B + 1, s.done_B | is_eos(nxt, sp.eos_ids_E), s.step + 1,
                           s.start)

    return jax.lax.while_loop(cond, body, state)


def _eos_ids(model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return model.generation_defaults.eos_token_ids
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_arguments(model, mask_BT, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                     chunk_size, seed) -> None:
    """Every argument error as a ValueError that names it, before anything is compiled or run."""
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
                    pad_token_id: int | None = None, seed: int = 0, chunk_size: int = 1) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new tokens as they come: arrays (B, n) of up to `chunk_size` steps each
    (rows already finished hold `pad_token_id`). The tokens are those `generate` returns, sampling included."""
    ids = np.asarray(input_ids)
    check_inputs(model.config, ids, attention_mask, pixel_values, pixel_attention_mask)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    _check_arguments(model, mask, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, chunk_size,
                     seed)

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
    cpu = _on_cpu(jax.tree.leaves(params))
    state = _prefill(graphdef, params, lw, ids_b, mask_b, pixel_values, pixel_attention_mask, sp, cfg=cfg,
                     slots=slots, cpu=cpu)
    produced = 0
    while True:
        # Copies (np.array), not views: `state` is donated to the next call.
        step, tokens_BS, done_B = (np.array(a) for a in (state.step, state.tokens_BS, state.done_B))
        yield tokens_BS[:, Tb + produced:Tb + step]
        produced = int(step)
        if produced >= max_new_tokens or done_B.all():
            return
        limit = jnp.int32(min(produced + chunk_size, max_new_tokens))
        state = _decode(graphdef, params, lw, state, limit, sp, cfg=cfg)


def generate(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after the prompt, as transformers' `generate` does.

    Takes the processor's numpy outputs unchanged (left-padded batches; any number of images per sample).
    Greedy by default; `do_sample=True` draws with `temperature`, `top_k`, `top_p`, reproducibly from `seed`.
    Stops when every row has produced an eos token (`eos_token_id`: one id or several; default the checkpoint's
    generation config) or after `max_new_tokens`. Returns (B, T_prompt + n) with the prompt in front; rows that
    finished early are padded with `pad_token_id` (default the generation config's, else the first eos id).
    """
    chunks = list(generate_stream(
        model, input_ids, attention_mask, pixel_values, pixel_attention_mask, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, chunk_size=max_new_tokens))
    ids = np.asarray(input_ids)
    return np.concatenate([ids, *(c.astype(ids.dtype) for c in chunks)], axis=1)
