"""Choosing the next token: one request's sampling settings, checked once (`SamplingParams`), and transformers'
logits processors (min-new-tokens, temperature, top-k, top-p) applied per row in JAX."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request's new tokens are chosen, as transformers' `generate` takes it: greedy unless `do_sample`,
    then `temperature`, `top_k`, `top_p`, drawn reproducibly from `seed`; at least `min_new_tokens` and at most
    `max_new_tokens` new tokens; with `ignore_eos` only `max_new_tokens` ends the answer.

    The one place sampling settings are checked (the CLI, the Python API, the engine and `generate` all build
    one): a bad value raises ValueError naming it. `from_temperature` is the OpenAI spelling (temperature 0 =
    greedy)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self):
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (_is_int(self.min_new_tokens) and self.min_new_tokens >= 0):
            raise ValueError(f"min_new_tokens must be an integer >= 0; got {self.min_new_tokens!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False; got {self.do_sample!r}")
        if self.do_sample and not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature)
                                   and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 when sampling; got {self.temperature!r}")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None); got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None); got {self.top_p!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")

    @classmethod
    def from_temperature(cls, temperature: float = 0.0, top_p: float | None = None, **options) -> "SamplingParams":
        """The OpenAI spelling: `temperature` 0 is greedy, above 0 samples at that temperature."""
        if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
                and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy); got {temperature!r}")
        return cls(do_sample=temperature > 0, temperature=float(temperature) if temperature > 0 else 1.0,
                   top_p=top_p, **options)

    @property
    def config(self) -> "SamplingConfig":
        """The static part (one compiled program per value)."""
        return SamplingConfig(do_sample=bool(self.do_sample), top_k=self.top_k if self.do_sample else None,
                              use_top_p=bool(self.do_sample and self.top_p is not None and self.top_p < 1.0))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The static part of token choice (one compiled program per value): whether any row may sample, top-k (a
    shape, `lax.top_k`), whether top-p runs. Temperatures and top-p values are traced per row."""

    do_sample: bool = False
    top_k: int | None = None
    use_top_p: bool = False


# The engine's one program: any row may sample with top-p (greedy rows have temperature 0).
ANY = SamplingConfig(do_sample=True, use_top_p=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """Each row's sampling, traced: temperature (0 = greedy), top_p, min_new_tokens, max_new_tokens, ignore_eos, and
    the key data of `jax.random.key(seed)` that every step folds its index into (so a stream in chunks draws what
    one call draws)."""

    temperature_B: jax.Array  # f32
    top_p_B: jax.Array  # f32
    min_new_B: jax.Array  # i32
    limit_B: jax.Array  # i32
    ignore_eos_B: jax.Array  # bool
    key_B2: jax.Array  # uint32 key data

    @classmethod
    def of(cls, params: list[SamplingParams]) -> "Rows":
        """Host arrays for these requests, one row each."""
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(p.seed))) for p in params])
        return cls(np.asarray([p.temperature if p.do_sample else 0.0 for p in params], np.float32),
                   np.asarray([p.top_p or 1.0 for p in params], np.float32),
                   np.asarray([p.min_new_tokens for p in params], np.int32),
                   np.asarray([p.max_new_tokens for p in params], np.int32),
                   np.asarray([p.ignore_eos for p in params], bool), keys)

    @classmethod
    def empty(cls, n: int) -> "Rows":
        """`n` free rows (greedy, one token, ending at once)."""
        return cls(jnp.zeros(n, jnp.float32), jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.int32),
                   jnp.ones(n, jnp.int32), jnp.zeros(n, bool),
                   jnp.zeros((n, *jax.random.key_data(jax.random.key(0)).shape), jnp.uint32))


def mask_words(vocab_size: int) -> int:
    """Words of a packed token mask: bit v % 32 of word v // 32 allows token v."""
    return (vocab_size + 31) // 32


def allow(logits_BV, allowed_BW):
    """Each row's logits with the tokens its packed mask `allowed_BW` (int32 (B, W), see `mask_words`) forbids
    set to -inf: a structured-output row's grammar; all ones for a free row."""
    B, V = logits_BV.shape
    bits = (allowed_BW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return jnp.where(bits.reshape(B, -1)[:, :V] != 0, logits_BV, -jnp.inf)


def is_eos(tokens_B, eos_ids_E):
    return jnp.any(tokens_B[:, None] == eos_ids_E[None, :], axis=-1)


def process_logits(logits_BV, step_B, config: SamplingConfig, rows: Rows, eos_ids_E):
    """The processed scores transformers samples from (or takes the argmax of), in its order: min-new-tokens
    (eos impossible before `min_new_tokens` new tokens), then, when sampling, temperature, top-k, top-p.
    Removed tokens get -inf. `step_B` is each row's number of new tokens already produced."""
    V = logits_BV.shape[-1]
    logits = logits_BV.astype(jnp.float32)
    eos_V = jnp.any(jnp.arange(V)[:, None] == eos_ids_E[None, :], axis=-1)
    logits = jnp.where((step_B < rows.min_new_B)[:, None] & eos_V[None], -jnp.inf, logits)
    if not config.do_sample:
        return logits
    logits = logits / rows.temperature_B[:, None]
    if config.top_k is not None:
        # Keep every token scoring at least the k-th best (ties with it included, as transformers does).
        kth = jax.lax.top_k(logits, min(config.top_k, V))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.use_top_p:
        # Ascending sort: the removed tokens are a prefix whose cumulative probability is <= 1 - top_p; the best
        # token always stays. Keep everything scoring at least the first kept one.
        sorted_BV = jnp.sort(logits, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        n_removed = jnp.minimum(jnp.sum(cum <= 1 - rows.top_p_B[:, None], axis=-1), V - 1)
        cutoff = jnp.take_along_axis(sorted_BV, n_removed[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def choose_tokens(logits_BV, step_B, config: SamplingConfig, rows: Rows, eos_ids_E, active_B=None):
    """Each row's next token (B,) int32: the argmax (first index on ties, as torch) for greedy rows, else a draw
    from the row's processed distribution with its key folded with its step. The sampling branch runs only when
    some (active) row samples."""
    greedy = jnp.argmax(process_logits(logits_BV, step_B, SamplingConfig(), rows, eos_ids_E), axis=-1)
    greedy = greedy.astype(jnp.int32)
    if not config.do_sample:
        return greedy
    sampling = rows.temperature_B > 0

    def draw():
        scores = process_logits(logits_BV, step_B, config, rows, eos_ids_E)

        def one(scores_V, step, key2):
            key = jax.random.fold_in(jax.random.wrap_key_data(key2), step)
            return jax.random.categorical(key, scores_V[None], axis=-1)[0]

        return jax.vmap(one)(scores, step_B, rows.key_B2).astype(jnp.int32)

    wanted = sampling if active_B is None else sampling & active_B
    drawn = jax.lax.cond(jnp.any(wanted), draw, lambda: greedy)
    return jnp.where(sampling, drawn, greedy)
