"""Decoding many requests at once in a fixed set of slots of one KV cache: the device side of continuous batching.

The cache is a ring of S columns shared by N slots. Decode step t writes every slot's new key and value in column
t % S, so one scalar cache index serves all slots (the decoder is the one `generate` runs) while each slot keeps
its own position counter and its own mask of valid columns. A request is prefilled alone, exactly as `generate`
prefills it (same bucketed left padding, same first token), and its prompt's keys and values are written into a
free slot's row in the columns that end just before the current one; from then on it decodes with the others.
A request fits when its bucketed prompt plus its new tokens span at most S columns: a row's older columns belong
to earlier requests and are masked out. Attention sees the same keys as in `generate` (in another column order),
so greedy tokens are `generate`'s; sampled ones are too, drawn per slot from `fold_in(key(seed), step)`.
Attention is the package's one entry point (`_layers.attend`): the prompt runs with the `attention` backend given
(default the platform's), the one-token decode steps with per-slot column masks on its "xla" path.

    dec = SlotDecoder(model, slots=8, max_len=512)
    pre = dec.prefill(input_ids, attention_mask, pixel_values, pixel_attention_mask, max_new_tokens=64)
    dec.insert(pre, slot=0)                          # pre.first: the first new token
    tokens_NC, n_N, done_N = dec.decode(steps=8)    # row r produced tokens_NC[r, :n_N[r]]

Shapes are static: prompts are padded to `bucket` lengths and image counts to `bucket(I, 1)`, so a steady stream
of requests compiles one prefill and one insert per bucket and one decode, once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.ops.decode_weights import layer_weights, on_cpu, per_layer
from idefics_jax.generation.decode import prefill as _prefill
from idefics_jax.generation.api import _check_prompt, _eos_ids, bucket, check_arguments
from idefics_jax.model.idefics import IdeficsModel, KVCache, check_attention, check_inputs, positions_from_mask
from idefics_jax.generation.sampling import SamplingConfig, SamplingParams, choose_tokens, is_eos

_GREEDY = SamplingConfig()
_SAMPLE = SamplingConfig(do_sample=True, use_top_p=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """N slots over S ring columns. Free and finished slots have done_N set (they still run, masked, unread)."""

    cache: KVCache  # (L, N, K, S, H), or per-layer lists on the CPU fast path
    valid_NS: jax.Array  # bool: the column holds a key of the slot's current request
    keypos_NS: jax.Array  # int32: position id of that key (sliding windows compare positions)
    t: jax.Array  # int32 scalar: decode steps run so far; the next one writes column t % S
    last_N: jax.Array  # int32: the newest token, fed next
    pos_N: jax.Array  # int32: its position id
    step_N: jax.Array  # int32: new tokens produced so far (the prefill's first one included)
    limit_N: jax.Array  # int32: max new tokens
    done_N: jax.Array  # bool
    temperature_N: jax.Array  # f32; 0 = greedy
    top_p_N: jax.Array  # f32
    key_N2: jax.Array  # uint32 key data of jax.random.key(seed)
    ignore_eos_N: jax.Array  # bool: only max tokens ends the request


@dataclasses.dataclass
class Prefilled:
    """A request after its prefill, before insertion: its cache (Tb columns), first token and sampling."""

    cache: KVCache  # batch >= 1: this request's keys and values are row `row`
    mask_T: np.ndarray  # (Tb,) int32 key validity (left padding is 0)
    first: int
    done: bool  # the first token ended it (an eos, or max_new_tokens == 1)
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    ignore_eos: bool
    row: int = 0

    @property
    def prompt_tokens(self) -> int:
        return int(self.mask_T.sum())


@dataclasses.dataclass
class Prompt:
    """A checked request before its prefill: its prompt left-padded to its bucket, and its sampling."""

    ids: np.ndarray  # (1, Tb) int32
    mask: np.ndarray  # (1, Tb) int32
    pixel_values: np.ndarray | None  # (1, bucket(I, 1), 3, P, P)
    pixel_mask: np.ndarray | None
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int
    ignore_eos: bool


def _pad_images(pixel_values, pixel_mask):
    """Pads the image axis to bucket(I, 1) with all-zero images (the model skips them): fewer prefill shapes."""
    if pixel_values is None:
        return None, None
    I = pixel_values.shape[1]
    extra = bucket(I, 1) - I
    if extra == 0:
        return pixel_values, pixel_mask
    pad = lambda a: np.concatenate([a, np.zeros((a.shape[0], extra, *a.shape[2:]), a.dtype)], axis=1)  # noqa: E731
    return pad(np.asarray(pixel_values)), None if pixel_mask is None else pad(np.asarray(pixel_mask))


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert(state: SlotState, cache: KVCache, row, mask_T, slot, first, limit, temperature, top_p, key2,
            ignore_eos):
    S = state.valid_NS.shape[1]
    T = mask_T.shape[0]
    cols = (state.t - T + jnp.arange(T)) % S  # the T columns that end just before the next one written

    def put(a, b):  # stacked (L, N, K, S, H) or per-layer (N, K, S, H); b's row `row`, its first T columns
        if a.ndim == 5:
            return a.at[:, slot].set(a[:, slot].at[:, :, cols].set(b[:, row, :, :T]))
        return a.at[slot].set(a[slot].at[:, cols].set(b[row, :, :T]))

    cache = jax.tree.map(put, state.cache, cache)
    valid = state.valid_NS.at[slot].set(False).at[slot, cols].set(mask_T.astype(bool))
    keypos = state.keypos_NS.at[slot, cols].set(positions_from_mask(mask_T[None])[0])
    return dataclasses.replace(
        state, cache=cache, valid_NS=valid, keypos_NS=keypos, last_N=state.last_N.at[slot].set(first),
        pos_N=state.pos_N.at[slot].set(jnp.sum(mask_T, dtype=jnp.int32)), step_N=state.step_N.at[slot].set(1),
        limit_N=state.limit_N.at[slot].set(limit), done_N=state.done_N.at[slot].set(False),
        temperature_N=state.temperature_N.at[slot].set(temperature), top_p_N=state.top_p_N.at[slot].set(top_p),
        key_N2=state.key_N2.at[slot].set(key2), ignore_eos_N=state.ignore_eos_N.at[slot].set(ignore_eos))


@functools.partial(jax.jit, donate_argnames=("state",))
def _release(state: SlotState, slot):
    return dataclasses.replace(state, done_N=state.done_N.at[slot].set(True))


def _choose(logits_NV, s: SlotState, pad, eos_E):
    """Each slot's next token, as `choose_tokens` picks it for that request alone (batch 1, its own step and
    key); the sampling branch runs only when some active slot samples."""

    def rows(cfg):
        def one(logits_V, step, temperature, top_p, key2):
            sp = SamplingParams(temperature, top_p, jnp.int32(0), pad, eos_E, jax.random.wrap_key_data(key2))
            return choose_tokens(logits_V[None], step, cfg, sp)[0]
        return jax.vmap(one)(logits_NV, s.step_N, s.temperature_N, s.top_p_N, s.key_N2)

    greedy = rows(_GREEDY)
    sampling = s.temperature_N > 0
    drawn = jax.lax.cond(jnp.any(sampling & ~s.done_N), lambda: rows(_SAMPLE), lambda: greedy)
    return jnp.where(sampling, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("state",))
def _decode(graphdef, params, lw, state: SlotState, stop_on_finish, pad, eos_E, *, steps):
    """Up to `steps` decode steps of every slot; stops early when every slot is done, or when `stop_on_finish`
    and some slot finished (so that a waiting request can take it). Returns the state, the tokens produced
    (N, steps) (row r's new ones first) and the step count."""
    model: IdeficsModel = nnx.merge(graphdef, params)
    window = model.config.text.sliding_window
    N, S = state.valid_NS.shape

    def cond(carry):
        s, _, i, finished = carry
        return (i < steps) & ~jnp.all(s.done_N) & ~(stop_on_finish & finished)

    def body(carry):
        s, out, i, finished = carry
        q = s.t % S
        active = ~s.done_N
        valid = s.valid_NS.at[:, q].set(active)
        keypos = s.keypos_NS.at[:, q].set(s.pos_N)
        mask = valid if window is None else valid & (keypos > s.pos_N[:, None] - window)
        h, cache = model.text(model.embed(s.last_N[:, None]), s.pos_N[:, None], mask[:, None, :], s.cache, q,
                              layer_weights=lw)
        nxt = jnp.where(active, _choose(model.lm_logits(h)[:, 0], s, pad, eos_E), pad)
        ends = active & ((is_eos(nxt, eos_E) & ~s.ignore_eos_N) | (s.step_N + 1 >= s.limit_N))
        s = dataclasses.replace(
            s, cache=cache, valid_NS=valid, keypos_NS=keypos, t=s.t + 1, last_N=jnp.where(active, nxt, s.last_N),
            pos_N=s.pos_N + active, step_N=s.step_N + active, done_N=s.done_N | ends)
        return s, out.at[:, i].set(nxt), i + 1, finished | jnp.any(ends)

    out = jnp.zeros((N, steps), jnp.int32)
    state, out, i, _ = jax.lax.while_loop(cond, body, (state, out, jnp.int32(0), jnp.bool_(False)))
    return state, out, i


class SlotDecoder:
    """`slots` requests decoding together in one preallocated cache of `max_len` columns per slot (see the
    module docstring). Not thread-safe: one thread drives it. `attention`: the prompts' attention backend
    ("xla", "cudnn", "pallas"; None: the platform's), as `generate`'s."""

    def __init__(self, model: IdeficsModel, *, slots: int, max_len: int, eos_token_id=None, pad_token_id=None,
                 attention: str | None = None):
        if not (isinstance(slots, int) and slots >= 1):
            raise ValueError(f"slots must be a positive integer; got {slots!r}")
        if not (isinstance(max_len, int) and max_len >= 2):
            raise ValueError(f"max_len must be an integer >= 2; got {max_len!r}")
        self.model, self.slots, self.max_len, self.attention = model, slots, max_len, check_attention(attention)
        self.graphdef, self.params = nnx.split(model)
        self.lw = layer_weights(model)
        self.cpu = on_cpu(jax.tree.leaves(self.params))
        eos = _eos_ids(model, eos_token_id)
        if pad_token_id is None:  # as `generate`
            pad_token_id = model.generation_defaults.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        self.eos_ids = eos
        self.pad = jnp.int32(pad_token_id)
        self.eos_E = jnp.asarray(eos, jnp.int32).reshape(-1)
        c = model.config.text
        cache = per_layer(KVCache.zeros(c, slots, max_len, model.dtype, model.partitioning), self.lw)
        N, S = slots, max_len
        self.state = SlotState(
            cache, jnp.zeros((N, S), bool), jnp.zeros((N, S), jnp.int32), jnp.int32(0), jnp.zeros(N, jnp.int32),
            jnp.zeros(N, jnp.int32), jnp.zeros(N, jnp.int32), jnp.ones(N, jnp.int32), jnp.ones(N, bool),
            jnp.zeros(N, jnp.float32), jnp.ones(N, jnp.float32),
            jnp.zeros((N, *jax.random.key_data(jax.random.key(0)).shape), jnp.uint32), jnp.zeros(N, bool))

    def prompt_columns(self, prompt_len: int) -> int:
        """Cache columns a prompt of this many tokens takes (its bucket)."""
        return bucket(prompt_len)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return self.prompt_columns(prompt_len) + max_new_tokens <= self.max_len

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                ignore_eos: bool = False) -> Prompt:
        """One request (batch 1, the processor's numpy outputs), checked and padded to its bucket as `generate`
        pads it, ready for `prefill_many`. temperature 0 is greedy; with `ignore_eos` only `max_new_tokens` ends
        the request (as `generate(eos_token_id=[])`). Raises ValueError for a bad argument or a request that does
        not fit."""
        ids = np.asarray(input_ids)
        check_inputs(self.model.config, ids, attention_mask, pixel_values, pixel_attention_mask)
        if ids.shape[0] != 1:
            raise ValueError(f"prefill takes one request (batch 1); got batch {ids.shape[0]}")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        sample = temperature is not None and temperature > 0
        check_arguments(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p,
                        seed=seed)
        _check_prompt(self.model, mask)
        if not self.fits(ids.shape[1], max_new_tokens):
            raise ValueError(f"the prompt ({ids.shape[1]} tokens, {bucket(ids.shape[1])} as a bucket) plus "
                             f"{max_new_tokens} new tokens exceed the {self.max_len} cache positions per slot")
        T = ids.shape[1]
        Tb = bucket(T)
        fill = 0 if self.model.config.image_token_id != 0 else 1  # as `generate`: never an image token
        ids_b = np.concatenate([np.full((1, Tb - T), fill, np.int32), ids.astype(np.int32)], axis=1)
        mask_b = np.concatenate([np.zeros((1, Tb - T), np.int32), mask], axis=1)
        pv, pm = _pad_images(pixel_values, pixel_attention_mask)
        return Prompt(ids_b, mask_b, pv, pm, max_new_tokens, float(temperature if sample else 0.0), float(top_p),
                      int(seed), bool(ignore_eos))

    def prefill(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                **options) -> Prefilled:
        """Runs one request's prompt as `generate` does and picks its first token (`prepare`'s arguments)."""
        return self.prefill_many([self.prepare(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                               **options)])[0]

    def prefill_many(self, prompts: list[Prompt]) -> list[Prefilled]:
        """Prefills prepared requests; greedy ones with the same prompt bucket and image shapes run together as
        one batch (as many rows as `bucket(n, 1)`: few shapes to compile), the others one by one (a sampled first
        token is drawn with the request's own key, as `generate` draws it for that request alone). Batched, the
        prompts read the weights once: on a CPU a short prompt's prefill costs about a batch decode step, mostly
        weight reads."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            key = (p.ids.shape[1], None if p.pixel_values is None else p.pixel_values.shape) if p.temperature == 0 \
                else ("sampled", i)
            groups.setdefault(key, []).append(i)
        out: list[Prefilled | None] = [None] * len(prompts)
        for idx in groups.values():
            for i, pre in zip(idx, self._prefill_batch([prompts[i] for i in idx])):
                out[i] = pre
        return out

    def _prefill_batch(self, prompts: list[Prompt]) -> list[Prefilled]:
        B, first = len(prompts), prompts[0]
        rows = prompts + [first] * (bucket(B, 1) - B)  # repeats of a real prompt: nothing new to check
        cat = lambda xs: None if xs[0] is None else np.concatenate(xs)  # noqa: E731
        ids, mask = cat([p.ids for p in rows]), cat([p.mask for p in rows])
        pv, pm = cat([p.pixel_values for p in rows]), cat([p.pixel_mask for p in rows])
        sample = first.temperature > 0
        cfg = SamplingConfig(do_sample=sample, use_top_p=bool(sample and first.top_p < 1.0))
        sp = SamplingParams(
            temperature=jnp.float32(first.temperature if sample else 1.0), top_p=jnp.float32(first.top_p),
            min_new_tokens=jnp.int32(0), pad_token_id=self.pad, eos_ids_E=self.eos_E, key=jax.random.key(first.seed))
        Tb = ids.shape[1]
        # One column more than the prompt: where `prefill` writes the first token (the cache's extra column is
        # not inserted).
        st = _prefill(self.graphdef, self.params, self.lw, ids, mask, pv, pm, sp, cfg=cfg, slots=Tb + 1,
                      cpu=self.cpu, attention=self.attention)
        tokens, ends = np.asarray(st.tokens_BS)[:, Tb], np.asarray(st.done_B)
        return [Prefilled(st.cache, p.mask[0], int(tokens[r]), (bool(ends[r]) and not p.ignore_eos)
                          or p.max_new_tokens == 1, p.max_new_tokens, p.temperature, p.top_p, p.seed, p.ignore_eos,
                          row=r)
                for r, p in enumerate(prompts)]

    def insert(self, pre: Prefilled, slot: int) -> None:
        """Puts a prefilled request into `slot` (which must be free); it decodes from the next `decode` on."""
        key2 = jax.random.key_data(jax.random.key(pre.seed))
        self.state = _insert(self.state, pre.cache, jnp.int32(pre.row), jnp.asarray(pre.mask_T), jnp.int32(slot),
                             jnp.int32(pre.first),
                             jnp.int32(pre.max_new_tokens), jnp.float32(pre.temperature), jnp.float32(pre.top_p),
                             key2, jnp.bool_(pre.ignore_eos))

    def release(self, slot: int) -> None:
        """Stops `slot` (a cancelled request); it is free for `insert`."""
        self.state = _release(self.state, jnp.int32(slot))

    def decode(self, steps: int, stop_on_finish: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to `steps` steps of every active slot -> (tokens (N, steps), new-token counts (N,), done (N,)):
        slot r produced tokens[r, :counts[r]] (its last one ends it when done[r]). With `stop_on_finish` the call
        returns as soon as some slot finishes."""
        before = np.array(self.state.step_N)
        was_done = np.array(self.state.done_N)
        self.state, out, _ = _decode(self.graphdef, self.params, self.lw, self.state, jnp.bool_(stop_on_finish),
                                     self.pad, self.eos_E, steps=steps)
        counts = np.where(was_done, 0, np.array(self.state.step_N) - before)
        return np.array(out), counts, np.array(self.state.done_N)
