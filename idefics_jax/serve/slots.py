"""The engine's rows of the decode core: requests come and go in a fixed set of slots of one ring cache
(`generation.decode`), each prepared, prefilled and decoded exactly as `generate` does it for that request alone.

    dec = SlotDecoder(model, slots=8, max_len=512)
    pre = dec.prefill(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                      sampling=SamplingParams(max_new_tokens=64))
    dec.insert(pre, slot=0)                          # pre.first: the first new token
    tokens_NC, n_N, done_N = dec.decode(steps=8)    # row r produced tokens_NC[r, :n_N[r]]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from idefics_jax.generation.cache import PromptCache, Row
from idefics_jax.generation.decode import Core
from idefics_jax.generation.prompt import Prompt, Tokens, bucket, prepare
from idefics_jax.generation.sampling import ANY, Rows, SamplingParams
from idefics_jax.generation.structured import Constraint, RowMasks
from idefics_jax.model.idefics import IdeficsModel, KVCache


@dataclasses.dataclass
class Prepared:
    """A checked request before its prefill: its prompt (batch 1, padded to its bucket) and its sampling."""

    prompt: Prompt
    sampling: SamplingParams
    constraint: Constraint | None = None  # its response format's grammar state
    row: Row | None = None  # with a cache: the prompt as it sees it (`SlotDecoder.prefill_many` sets it)


@dataclasses.dataclass
class Prefilled:
    """A request after its prefill, before insertion: its cache (the prompt's columns), first token and sampling."""

    cache: KVCache  # batch >= 1: this request's keys and values are row `row`
    mask_T: np.ndarray  # (Tb,) int32 key validity (left padding is 0)
    first: int
    done: bool  # the first token ended it (an eos, or max_new_tokens == 1)
    sampling: SamplingParams
    row: int = 0
    constraint: Constraint | None = None
    start: int = 0  # with a cache: the column of the prompt's first token
    cached: Row | None = None  # with a cache: the prompt as it sees it (`cached_tokens` from it)

    @property
    def prompt_tokens(self) -> int:
        return int(self.mask_T.sum())

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache."""
        return 0 if self.cached is None else self.cached.cached


class SlotDecoder:
    """`slots` requests decoding together in one preallocated cache of `max_len` columns per slot. Not
    thread-safe: one thread drives it. The prompts' attention backend is the model's. With a `cache`
    (`generation.cache.PromptCache`) prompts reuse cached prefixes and image features, and leave theirs and, once
    `retire`d, their answers' in it."""

    def __init__(self, model: IdeficsModel, *, slots: int, max_len: int, eos_token_id=None, pad_token_id=None,
                 cache: PromptCache | None = None):
        if not (isinstance(slots, int) and slots >= 1):
            raise ValueError(f"slots must be a positive integer; got {slots!r}")
        if not (isinstance(max_len, int) and max_len >= 2):
            raise ValueError(f"max_len must be an integer >= 2; got {max_len!r}")
        self.model, self.slots, self.max_len = model, slots, max_len
        self.core = Core(model, Tokens.of(model, eos_token_id, pad_token_id), ANY)
        self.eos_ids = self.core.tokens.eos
        self.state = self.core.empty(slots, max_len)
        self.masks = RowMasks(slots, model.config.text.vocab_size)
        self.cache = cache
        self._placed: dict[int, tuple[Row, int, int, int]] = {}  # slot -> (row, start, columns, t at insert)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether a prompt of this many tokens (padded to its bucket) and its answer fit a slot."""
        return prompt_columns(prompt_len) + max_new_tokens <= self.max_len

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                sampling: SamplingParams, constraint: Constraint | None = None) -> Prepared:
        """One request (batch 1, the processor's numpy outputs), checked and padded as `generate` pads it, ready
        for `prefill_many`; `constraint`: its response format's grammar state (`generation.structured`). Raises
        ValueError for a bad input or a request that does not fit."""
        if np.shape(input_ids)[0] != 1:
            raise ValueError(f"prefill takes one request (batch 1); got batch {np.shape(input_ids)[0]}")
        prompt = prepare(self.model, input_ids, attention_mask, pixel_values, pixel_attention_mask)
        T = np.shape(input_ids)[1]
        if not self.fits(T, sampling.max_new_tokens):
            raise ValueError(f"the prompt ({T} tokens, {prompt.columns} as a bucket) plus "
                             f"{sampling.max_new_tokens} new tokens exceed the {self.max_len} cache positions per slot")
        return Prepared(prompt, sampling, constraint)

    def prefill(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                sampling: SamplingParams) -> Prefilled:
        """Runs one request's prompt as `generate` does and picks its first token."""
        return self.prefill_many([self.prepare(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                               sampling=sampling)])[0]

    def prefill_many(self, requests: list[Prepared]) -> list[Prefilled]:
        """Prefills prepared requests; greedy ones with the same prompt bucket and image shapes run together as
        one batch (as many rows as `bucket(n, 1)`: few shapes to compile), the others one by one (a sampled first
        token is drawn with the request's own key, as `generate` draws it for that request alone). Batched, the
        prompts read the weights once: on a CPU a short prompt's prefill costs about a batch decode step, mostly
        weight reads. With a cache, greedy prompts group by the shape of their cached prefix and rest."""
        if self.cache is not None:
            return self._prefill_cached(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.prompt
            key = ("greedy", p.columns, None if p.pixel_values is None else p.pixel_values.shape) \
                if not r.sampling.do_sample else ("sampled", i)
            groups.setdefault(key, []).append(i)
        out: list[Prefilled | None] = [None] * len(requests)
        for idx in groups.values():
            for i, pre in zip(idx, self._prefill_batch([requests[i] for i in idx])):
                out[i] = pre
        return out

    def _prefill_batch(self, requests: list[Prepared]) -> list[Prefilled]:
        n = len(requests)
        batch = requests + [requests[0]] * (bucket(n, 1) - n)  # repeats of a real prompt: nothing new to check
        prompt = Prompt.concat([r.prompt for r in batch])
        masks = RowMasks(len(batch), self.model.config.text.vocab_size)
        for i, r in enumerate(requests):
            masks.set(i, r.constraint)
        cache, first, done = self.core.prefill(prompt, Rows.of([r.sampling for r in batch]),
                                               masks.masks([0] * len(batch)))
        first, done = np.asarray(first), np.asarray(done)
        for i in masks.rows:
            masks.advance(i, first[i:i + 1])
        return [Prefilled(cache, r.prompt.mask[0], int(first[i]), bool(done[i]), r.sampling, row=i,
                          constraint=r.constraint) for i, r in enumerate(requests)]

    def _prefill_cached(self, requests: list[Prepared]) -> list[Prefilled]:
        cache = self.cache
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            r.row = cache.row(r.prompt, 0)
            cache.match(r.row)
            cache.fit(r.row, self.max_len - r.sampling.max_new_tokens)  # the prompt and its answer fit the slot
            key = ("greedy", cache.shape([r.row])) if not r.sampling.do_sample else ("sampled", i)
            groups.setdefault(key, []).append(i)
        out: list[Prefilled | None] = [None] * len(requests)
        try:
            for idx in groups.values():
                n = len(idx)
                batch = [requests[i] for i in idx]
                batch += [batch[0]] * (bucket(n, 1) - n)
                masks = RowMasks(len(batch), self.model.config.text.vocab_size)
                for b, r in enumerate(batch[:n]):
                    masks.set(b, r.constraint)
                pre = cache.prefill(self.core, [r.row for r in batch], Rows.of([r.sampling for r in batch]),
                                    masks.masks([0] * len(batch)))
                for b in masks.rows:
                    masks.advance(b, np.asarray(pre.first_B[b:b + 1]))
                for b, i in enumerate(idx):
                    out[i] = Prefilled(pre.cache, pre.mask_BC[b], int(pre.first_B[b]), bool(pre.done_B[b]),
                                       requests[i].sampling, row=b, start=int(pre.start_B[b]),
                                       cached=requests[i].row, constraint=requests[i].constraint)
        finally:  # a failed batch leaves no block pinned
            for r in requests:
                cache.release(r.row)
        return out

    def insert(self, pre: Prefilled, slot: int) -> None:
        """Puts a prefilled request into `slot` (which must be free); it decodes from the next `decode` on."""
        self.state = self.core.insert(self.state, pre.cache, [pre.row], [slot], pre.mask_T[None], [pre.first],
                                      Rows.of([pre.sampling]))
        self.masks.set(slot, pre.constraint)
        if self.cache is not None and pre.cached is not None:
            t, C, row = int(self.state.t), len(pre.mask_T), pre.cached
            self._placed[slot] = (row, pre.start, C, t)
            # Its prompt's new blocks, for the requests that come while it runs.
            self.cache.keep(self.state.cache, slot, row, (t - C + pre.start + np.arange(row.prompt_len)) % self.max_len)

    def retire(self, slot: int, tokens) -> None:
        """`slot`'s request ended with these new tokens: the cache keeps its prompt's and answer's blocks whose
        keys and values are still in the slot (call it before the slot takes another request)."""
        placed = self._placed.pop(slot, None)
        if placed is None:
            return
        row, start, columns, t_insert = placed
        n = row.prompt_len
        self.cache.extend(row, list(tokens)[:-1])  # the last token produced was never fed
        # Token p was written by decode step `rel` after the insert (prompt tokens: before it, rel < 0); the ring
        # of S columns has since been written `elapsed` steps on, overwriting what step rel + S wrote.
        S, elapsed = self.max_len, int(self.state.t) - t_insert
        p = np.arange(len(row.ids))
        rel = np.where(p < n, start + p - columns, p - n)
        self.cache.keep(self.state.cache, slot, row, np.where(rel + S >= elapsed, (t_insert + rel) % S, -1))

    def update_weights(self, model: IdeficsModel) -> None:
        """Decodes with `model`'s weights from now on (see `Core.update`); requests in the slots keep the keys and
        values already cached."""
        self.model = model
        self.core.update(model)
        if self.cache is not None:
            self.cache.clear()

    def release(self, slot: int) -> None:
        """Stops `slot` (a cancelled request); it is free for `insert`."""
        self.state = self.core.release(self.state, slot)
        self.masks.clear(slot)

    def decode(self, steps: int, stop_on_finish: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to `steps` steps of every active slot -> (tokens (N, steps), new-token counts (N,), done (N,)):
        slot r produced tokens[r, :counts[r]] (its last one ends it when done[r]). With `stop_on_finish` the call
        returns as soon as some slot finishes. While a slot follows a response format, a call runs one step (its
        grammar's mask changes with each token)."""
        before = np.array(self.state.step_B)
        was_done = np.array(self.state.done_B)
        if self.masks:
            steps = 1
        self.state, out, _ = self.core.decode(self.state, steps, stop_on_finish, width=steps,
                                              allowed_BW=self.masks.masks(before))
        counts = np.where(was_done, 0, np.array(self.state.step_B) - before)
        out, done = np.array(out), np.array(self.state.done_B)
        for slot in list(self.masks.rows):
            self.masks.advance(slot, out[slot, :counts[slot]])
            if done[slot]:
                self.masks.clear(slot)
        return out, counts, done


def prompt_columns(prompt_len: int) -> int:
    """Cache columns a prompt of this many tokens takes (its bucket)."""
    return bucket(prompt_len)
