"""Choosing the next token: transformers' logits processors (min-new-tokens, temperature, top-k, top-p) in JAX."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The static part of token choice (one compiled program per value). Temperature and top-p values are traced,
    so changing them does not recompile; `top_k` is a shape (`lax.top_k`), so it does."""

    do_sample: bool = False
    top_k: int | None = None
    use_top_p: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """The traced part: temperature and top_p (f32 scalars), min_new_tokens and pad (i32 scalars), eos ids (E,),
    and the PRNG key every step folds its index into (so a stream in chunks draws what one call draws)."""

    temperature: jax.Array
    top_p: jax.Array
    min_new_tokens: jax.Array
    pad_token_id: jax.Array
    eos_ids_E: jax.Array
    key: jax.Array


def is_eos(tokens_B, eos_ids_E):
    return jnp.any(tokens_B[:, None] == eos_ids_E[None, :], axis=-1)


def process_logits(logits_BV, step, cfg: SamplingConfig, p: SamplingParams):
    """The processed scores transformers samples from (or takes the argmax of), in its order: min-new-tokens
    (eos impossible before `min_new_tokens` new tokens), then, when sampling, temperature, top-k, top-p.
    Removed tokens get -inf. `step` is the number of new tokens already produced."""
    V = logits_BV.shape[-1]
    logits = logits_BV.astype(jnp.float32)
    eos_V = jnp.any(jnp.arange(V)[:, None] == p.eos_ids_E[None, :], axis=-1)
    logits = jnp.where((step < p.min_new_tokens) & eos_V[None], -jnp.inf, logits)
    if not cfg.do_sample:
        return logits
    logits = logits / p.temperature
    if cfg.top_k is not None:
        # Keep every token scoring at least the k-th best (ties with it included, as transformers does).
        kth = jax.lax.top_k(logits, min(cfg.top_k, V))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.use_top_p:
        # Ascending sort: the removed tokens are a prefix whose cumulative probability is <= 1 - top_p; the best
        # token always stays. Keep everything scoring at least the first kept one.
        sorted_BV = jnp.sort(logits, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        n_removed = jnp.minimum(jnp.sum(cum <= 1 - p.top_p, axis=-1), V - 1)
        cutoff = jnp.take_along_axis(sorted_BV, n_removed[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def choose_tokens(logits_BV, step, cfg: SamplingConfig, p: SamplingParams):
    """The next token of every row (B,) int32: argmax when greedy (first index on ties, as torch), else a draw
    from the processed distribution with the key for this step."""
    scores = process_logits(logits_BV, step, cfg, p)
    if not cfg.do_sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.random.categorical(jax.random.fold_in(p.key, step), scores, axis=-1).astype(jnp.int32)
