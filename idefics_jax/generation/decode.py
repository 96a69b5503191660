"""The decode core: rows of one KV cache, each with its own request, prefilled, inserted and decoded together.
`generate` runs it with every row starting at once; the serving engine refills rows as requests come and go.

The cache is a ring of S columns shared by the rows. Decode step t writes every row's new key and value in column
t % S, so one scalar cache index serves all rows while each row keeps its own position counter and its own mask
of valid columns. A request's prompt is prefilled (`prefill`: the vision tower runs here, once, and picks the
first token), then its keys and values are written into a row in the columns that end just before the next one
written (`insert`); from then on it decodes with the others (`decode`, a `lax.while_loop` over `step`, the one
decode step). A request fits when its bucketed prompt plus its new tokens span at most S columns: a row's older
columns belong to earlier requests and are masked out. Attention sees the same keys in any column order, so a
row's tokens do not depend on where or when it was inserted.

Shapes are static: prompts are padded to buckets (`prompt.prepare`), so a steady stream of requests compiles one
prefill and one insert per bucket and one decode loop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax.generation.prompt import Prompt, Tokens
from idefics_jax.generation.sampling import Rows, SamplingConfig, allow, choose_tokens, is_eos, mask_words
from idefics_jax.model.idefics import IdeficsModel, KVCache, positions_from_mask
from idefics_jax.ops.decode_weights import Layers, decode_layers
from idefics_jax.ops.platform import one_image_at_a_time


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """B rows over S ring columns. Free and finished rows have done_B set (they still run, masked, unread)."""

    cache: KVCache  # (L, B, K, S, H), or per-layer lists (see `ops.decode_weights`)
    valid_BS: jax.Array  # bool: the column holds a key of the row's current request
    keypos_BS: jax.Array  # int32: position id of that key (sliding windows compare positions)
    t: jax.Array  # int32 scalar: decode steps run so far; the next one writes column t % S
    last_B: jax.Array  # int32: the newest token, fed next
    pos_B: jax.Array  # int32: its position id
    step_B: jax.Array  # int32: new tokens produced so far (the prefill's first one included)
    done_B: jax.Array  # bool
    rows: Rows  # each row's sampling and limits
    allowed_BW: jax.Array  # int32 packed: the tokens each row may pick next (`sampling.allow`; all ones: any)

    @property
    def columns(self) -> int:
        return self.valid_BS.shape[1]


def empty_state(model: IdeficsModel, rows: int, columns: int, layers: Layers, t: int = 0) -> DecodeState:
    """`rows` free rows over `columns` cache columns; the first decode step writes column `t`."""
    B, S = rows, columns
    return DecodeState(model.init_cache(B, S, layers), jnp.zeros((B, S), bool), jnp.zeros((B, S), jnp.int32),
                       jnp.int32(t), jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32),
                       jnp.ones(B, bool), Rows.empty(B), free_rows(B, model.config.text.vocab_size))


def free_rows(rows: int, vocab_size: int) -> jax.Array:
    """A packed token mask (rows, W) allowing every token."""
    return jnp.full((rows, mask_words(vocab_size)), -1, jnp.int32)


def first_tokens(logits_BV, rows: Rows, eos_E, allowed_BW, config: SamplingConfig):
    """A prefill's first tokens, picked among `allowed_BW`'s -> (tokens (B,), done (B,): the token ended the request:
    an eos, or a one-token limit)."""
    step = jnp.zeros(logits_BV.shape[0], jnp.int32)
    first = choose_tokens(allow(logits_BV, allowed_BW), step, config, rows, eos_E)
    return first, (is_eos(first, eos_E) & ~rows.ignore_eos_B) | (rows.limit_B <= 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "one_image_at_a_time"))
def prefill(graphdef, params, layers: Layers, ids_BT, mask_BT, pixel_values, pixel_mask, rows: Rows, eos_E,
            allowed_BW, *, config: SamplingConfig, one_image_at_a_time: bool):
    """Runs left-padded prompts (B, T) -> (their cache of T columns, first tokens (B,), done (B,): the first token
    ended the request: an eos, or a one-token limit). The first tokens are picked among `allowed_BW`'s."""
    model: IdeficsModel = nnx.merge(graphdef, params)
    logits, cache = model.prefill(ids_BT, mask_BT, pixel_values, pixel_mask, layers, one_image_at_a_time)
    return (cache, *first_tokens(logits, rows, eos_E, allowed_BW, config))


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def prefill_after(graphdef, params, layers: Layers, pool: KVCache, blocks_BN, prefix_mask_BP, ids_BT, mask_BT,
                  feats_BITD, offset_B, rows: Rows, eos_E, allowed_BW, *, config: SamplingConfig):
    """`prefill` for prompts whose first tokens' keys and values are cached: pool blocks blocks_BN (the pool's
    (L, N, K, block, H) keys and values, see `generation.cache`) then the rest of each prompt (B, T), padded on
    the right -> (their cache of N * block + T columns, first tokens (B,), done (B,)). The first tokens are picked
    among `allowed_BW`'s."""
    model: IdeficsModel = nnx.merge(graphdef, params)

    def gather(a):  # (L, N, K, b, H) -> (L, B, K, n * b, H)
        g = a[:, blocks_BN]
        L, B, n, K, b, H = g.shape
        return jnp.swapaxes(g, 2, 3).reshape(L, B, K, n * b, H)

    prefix = KVCache(gather(pool.k), gather(pool.v))
    logits, cache = model.prefill_after(prefix, prefix_mask_BP, ids_BT, mask_BT, feats_BITD, offset_B, layers)
    return (cache, *first_tokens(logits, rows, eos_E, allowed_BW, config))


@functools.partial(jax.jit, static_argnames=("graphdef", "one_image_at_a_time"))
def encode_images(graphdef, params, pixels_NCHW, mask_NHW, *, one_image_at_a_time: bool):
    """The vision tower and connector on N images -> their features (N, Ti, D) (all-zero images: unread rows)."""
    model: IdeficsModel = nnx.merge(graphdef, params)
    if not one_image_at_a_time:
        return model.image_features(pixels_NCHW[None], None if mask_NHW is None else mask_NHW[None])[0]
    one = lambda pm: model.image_features(pm[0][None, None], None if pm[1] is None else pm[1][None, None])[0][0]  # noqa: E731
    return jax.lax.map(one, (pixels_NCHW, mask_NHW))


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state: DecodeState, cache: KVCache, src_R, dst_R, mask_RT, first_R, rows: Rows) -> DecodeState:
    """Puts prefilled requests into rows: `cache`'s row src_R[r] (its T prompt columns) into row dst_R[r], in the
    T columns that end just before the next one written; with its first token, its prompt mask (T,) and its
    sampling (`rows`, one entry per request). They decode from the next `decode` on."""
    S, T = state.columns, mask_RT.shape[1]
    cols_T = (state.t - T + jnp.arange(T)) % S

    def put(a, b):  # (..., B, K, S, H): stacked (a layer axis first) or one layer
        # Two index arrays apart: numpy puts their (R, T) dims first in the indexed view.
        return a.at[..., dst_R[:, None], :, cols_T[None, :], :].set(
            jnp.moveaxis(b[..., src_R, :, :T, :], (-4, -2), (0, 1)).astype(a.dtype))

    cache = jax.tree.map(put, state.cache, cache)
    valid = state.valid_BS.at[dst_R].set(False).at[dst_R[:, None], cols_T[None, :]].set(mask_RT.astype(bool))
    keypos = state.keypos_BS.at[dst_R[:, None], cols_T[None, :]].set(positions_from_mask(mask_RT))
    return dataclasses.replace(
        state, cache=cache, valid_BS=valid, keypos_BS=keypos, last_B=state.last_B.at[dst_R].set(first_R),
        pos_B=state.pos_B.at[dst_R].set(jnp.sum(mask_RT, axis=1, dtype=jnp.int32)),
        step_B=state.step_B.at[dst_R].set(1), done_B=state.done_B.at[dst_R].set(False),
        rows=jax.tree.map(lambda a, b: a.at[dst_R].set(b), state.rows, rows))


@functools.partial(jax.jit, donate_argnames=("state",))
def release(state: DecodeState, row) -> DecodeState:
    """Stops `row` (a cancelled request); it is free for `insert`."""
    return dataclasses.replace(state, done_B=state.done_B.at[row].set(True))


def step(model: IdeficsModel, layers: Layers, s: DecodeState, eos_E, pad, config: SamplingConfig):
    """The one decode step of every row: feeds each active row's newest token, picks its next one -> (state, next
    tokens (B,) (pad for inactive rows), rows that ended now (B,))."""
    window = model.config.text.sliding_window
    q = s.t % s.columns
    active = ~s.done_B
    valid = s.valid_BS.at[:, q].set(active)
    keypos = s.keypos_BS.at[:, q].set(s.pos_B)
    mask = valid if window is None else valid & (keypos > s.pos_B[:, None] - window)
    logits, cache = model.step(s.last_B, s.pos_B, mask, s.cache, q, layers)
    logits = allow(logits, s.allowed_BW)
    nxt = jnp.where(active, choose_tokens(logits, s.step_B, config, s.rows, eos_E, active), pad)
    ends = active & ((is_eos(nxt, eos_E) & ~s.rows.ignore_eos_B) | (s.step_B + 1 >= s.rows.limit_B))
    s = dataclasses.replace(
        s, cache=cache, valid_BS=valid, keypos_BS=keypos, t=s.t + 1, last_B=jnp.where(active, nxt, s.last_B),
        pos_B=s.pos_B + active, step_B=s.step_B + active, done_B=s.done_B | ends)
    return s, nxt, ends


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "width"), donate_argnames=("state",))
def decode(graphdef, params, layers: Layers, state: DecodeState, steps, stop_on_finish, eos_E, pad, *,
           config: SamplingConfig, width: int):
    """Up to `steps` (<= width) decode steps of every row; stops early when every row is done, or when
    `stop_on_finish` and some row finished (so that a waiting request can take it). Returns the state, the
    tokens produced (B, width) (the first `count` columns written) and `count`."""
    model: IdeficsModel = nnx.merge(graphdef, params)

    def cond(carry):
        s, _, i, finished = carry
        return (i < steps) & ~jnp.all(s.done_B) & ~(stop_on_finish & finished)

    def body(carry):
        s, out, i, finished = carry
        s, nxt, ends = step(model, layers, s, eos_E, pad, config)
        return s, out.at[:, i].set(nxt), i + 1, finished | jnp.any(ends)

    out = jnp.zeros((state.done_B.shape[0], width), jnp.int32)
    state, out, count, _ = jax.lax.while_loop(cond, body, (state, out, jnp.int32(0), jnp.bool_(False)))
    return state, out, count


class Core:
    """The decode core of one model: its split parameters, the layer loop's form of its weights (made once, see
    `ops.decode_weights`), the eos / pad ids and the static sampling config, with the jitted functions above
    called on them. `generate` and the serving engine both drive one."""

    def __init__(self, model: IdeficsModel, tokens: Tokens, config: SamplingConfig):
        self.model, self.tokens, self.config = model, tokens, config
        self.graphdef, self.params = nnx.split(model)
        self.layers = decode_layers(model.text.layers.weights())
        self.one_image_at_a_time = one_image_at_a_time(jax.tree.leaves(self.params))
        self.eos_E = jnp.asarray(tokens.eos, jnp.int32).reshape(-1)
        self.pad = jnp.int32(tokens.pad)

    def update(self, model: IdeficsModel) -> None:
        """Decodes with `model`'s weights from now on: the same architecture, shapes and placement (a training
        step's new parameters), so the compiled functions are reused and nothing is copied."""
        _, self.params = nnx.split(model)
        self.model, self.layers = model, decode_layers(model.text.layers.weights())

    def empty(self, rows: int, columns: int, t: int = 0) -> DecodeState:
        return empty_state(self.model, rows, columns, self.layers, t)

    def prefill(self, prompt: Prompt, rows: Rows, allowed_BW=None):
        """-> (cache of the prompt's columns, first tokens (B,), done (B,)), on the device. `allowed_BW`: the
        rows' packed token masks for the first token (default: any token)."""
        if allowed_BW is None:
            allowed_BW = free_rows(prompt.ids.shape[0], self.model.config.text.vocab_size)
        return prefill(self.graphdef, self.params, self.layers, prompt.ids, prompt.mask, prompt.pixel_values,
                       prompt.pixel_mask, rows, self.eos_E, jnp.asarray(allowed_BW, jnp.int32), config=self.config,
                       one_image_at_a_time=self.one_image_at_a_time)

    def prefill_after(self, pool: KVCache, blocks_BN, prefix_mask_BP, ids_BT, mask_BT, feats_BITD, offset_B,
                      rows: Rows, allowed_BW=None):
        """-> (cache of the prefix's and the rest's columns, first tokens (B,), done (B,)), on the device.
        `allowed_BW` as for `prefill`."""
        i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
        if allowed_BW is None:
            allowed_BW = free_rows(ids_BT.shape[0], self.model.config.text.vocab_size)
        return prefill_after(self.graphdef, self.params, self.layers, pool, i32(blocks_BN), i32(prefix_mask_BP),
                             i32(ids_BT), i32(mask_BT), feats_BITD, None if offset_B is None else i32(offset_B),
                             rows, self.eos_E, i32(allowed_BW), config=self.config)

    def encode_images(self, pixels_NCHW, mask_NHW):
        """-> image features (N, Ti, D) on the device."""
        return encode_images(self.graphdef, self.params, pixels_NCHW, mask_NHW,
                             one_image_at_a_time=self.one_image_at_a_time)

    def insert(self, state: DecodeState, cache: KVCache, src, dst, mask_RT, first_R, rows: Rows) -> DecodeState:
        i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
        return insert(state, cache, i32(src), i32(dst), i32(mask_RT), i32(first_R), rows)

    def release(self, state: DecodeState, row: int) -> DecodeState:
        return release(state, jnp.int32(row))

    def decode(self, state: DecodeState, steps: int, stop_on_finish: bool = False, *, width: int, allowed_BW=None):
        """-> (state, tokens (B, width) on the device, count). `allowed_BW`: the rows' packed token masks from now
        on (default: those already set); a mask holds for every step of the call, so a grammar that changes
        with each token runs one step per call."""
        if allowed_BW is not None:
            state = dataclasses.replace(state, allowed_BW=jnp.asarray(allowed_BW, jnp.int32))
        return decode(self.graphdef, self.params, self.layers, state, jnp.int32(steps), jnp.bool_(stop_on_finish),
                      self.eos_E, self.pad, config=self.config, width=width)
