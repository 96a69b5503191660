"""The jitted generation loop: `prefill` runs the prompt and picks the first token, `decode` feeds one token at a
time inside a `lax.while_loop` over a small state, until a step limit or every row is done."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax.ops.decode_weights import per_layer
from idefics_jax.model.idefics import IdeficsModel, KVCache, Mask, positions_from_mask
from idefics_jax.generation.sampling import SamplingParams, choose_tokens, is_eos


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


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "slots", "cpu", "attention"))
def prefill(graphdef, params, lw, ids_BT, mask_BT, pixel_values, pixel_mask, sp: SamplingParams, *, cfg, slots,
            cpu, attention=None):
    model: IdeficsModel = nnx.merge(graphdef, params)
    c = model.config.text
    B, T = ids_BT.shape
    x = model.embed(ids_BT, pixel_values, pixel_mask, one_image_at_a_time=cpu, attention=attention)
    # A cache of exactly T slots keeps prefill attention at T x T; it grows to all slots once, below. Prefill is
    # compute-bound: it scans the stacked weights (as bits when bf16), whatever groups decoding uses.
    cache = KVCache.zeros(c, B, T, model.dtype, model.partitioning)
    h, cache = model.text(x, positions_from_mask(mask_BT), Mask.decoder(mask_BT, c.sliding_window), cache, 0,
                          layer_weights=None if isinstance(lw, list) else lw, attention=attention)
    grow = ((0, 0), (0, 0), (0, 0), (0, slots - T), (0, 0))
    cache = per_layer(KVCache(jnp.pad(cache.k, grow), jnp.pad(cache.v, grow)), lw)
    first = choose_tokens(model.lm_logits(h[:, -1:])[:, 0], 0, cfg, sp)
    tokens = jnp.zeros((B, slots), jnp.int32).at[:, :T].set(ids_BT).at[:, T].set(first)
    valid = jnp.zeros((B, slots), bool).at[:, :T].set(mask_BT.astype(bool))
    return DecodeState(cache, tokens, valid, pos_B=jnp.sum(mask_BT, axis=-1, dtype=jnp.int32),
                       done_B=is_eos(first, sp.eos_ids_E), step=jnp.int32(1), start=jnp.int32(T))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("state",))
def decode(graphdef, params, lw, state: DecodeState, limit, sp: SamplingParams, *, cfg):
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
