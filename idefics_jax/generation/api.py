"""`generate` and `generate_stream`: transformers' `generate` on the decode core (`decode.py`), every row of the
batch starting together. One jitted prefill (the vision tower runs here, once) and one jitted decode
`lax.while_loop`, the same tokens as transformers' `generate`.

Shapes are static: the prompt is left-padded to a bucketed length and the cache has a bucketed number of columns,
so new prompt lengths rarely recompile. The decode state (cache included) is donated to every decode call and
updated in place. Streaming runs the same loop in chunks of steps: the loop stays on the device (no host callback
per step) and a chunk costs one dispatch, so a chunk of one token is cheap on the CPU and a few tokens on an
accelerator; `generate` is one chunk of `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from idefics_jax.generation.cache import PromptCache
from idefics_jax.generation.decode import Core
from idefics_jax.generation.prompt import Tokens, bucket, prepare
from idefics_jax.generation.sampling import Rows, SamplingParams
from idefics_jax.generation.structured import Grammar, Grammars, RowMasks
from idefics_jax.model.idefics import IdeficsModel


def generate_stream(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None,
                    pixel_attention_mask=None, *, max_new_tokens: int, min_new_tokens: int = 0,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None, seed: int = 0, chunk_size: int = 1,
                    response_format: dict | Grammar | None = None, tokenizer=None,
                    cache: PromptCache | None = None) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new tokens as they come: arrays (B, n) of up to `chunk_size` steps each
    (rows already finished hold `pad_token_id`). The tokens are those `generate` returns, sampling included."""
    params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if not (isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    prompt = prepare(model, input_ids, attention_mask, pixel_values, pixel_attention_mask)
    B = prompt.ids.shape[0]
    # Row b draws with seed + b: a batch samples what its rows would alone with those seeds.
    rows = Rows.of([params if b == 0 else dataclasses.replace(params, seed=seed + b) for b in range(B)])
    core = Core(model, Tokens.of(model, eos_token_id, pad_token_id), params.config)
    masks = _constraints(model, core, B, params, response_format, tokenizer)
    allowed = masks.masks([0] * B)
    if cache is None:
        C, mask, kv, first, done = prompt.columns, prompt.mask, *core.prefill(prompt, rows, allowed)
    else:
        rows_c = [cache.row(prompt, b) for b in range(B)]
        for r in rows_c:
            cache.match(r)
        pre = cache.prefill(core, rows_c, rows, allowed)
        C, mask, kv, first, done = pre.mask_BC.shape[1], pre.mask_BC, pre.cache, pre.first_B, pre.done_B
    columns = bucket(C + max_new_tokens)
    state = core.empty(B, columns, t=C)
    state = core.insert(state, kv, np.arange(B), np.arange(B), mask, first, rows)
    if cache is not None:  # the prompts' new blocks: running requests share them
        for b, r in enumerate(rows_c):
            cache.keep(state.cache, b, r, pre.start_B[b] + np.arange(r.prompt_len))
    first, done = np.asarray(first), np.asarray(done)
    _advance(masks, first[:, None], np.ones(B, int), done)
    new = [first[:, None]]
    yield new[0]
    produced = 1
    while produced < max_new_tokens and not done.all():
        # A grammar's mask changes with every token: one step per call while a row follows one.
        steps = 1 if masks else min(chunk_size, max_new_tokens - produced)
        state, out, count = core.decode(state, steps, width=columns, allowed_BW=masks.masks([produced] * B))
        count, was_done = int(count), done
        out = np.asarray(out)[:, :count]
        done = np.asarray(state.done_B)
        _advance(masks, out, np.where(was_done, 0, count), done)
        new.append(out)
        yield out
        produced += count
    if cache is not None:  # the answers' blocks too: a conversation's next turn holds them
        new, counts = np.concatenate(new, axis=1), np.asarray(state.step_B)
        for b, r in enumerate(rows_c):
            n = r.prompt_len
            cache.extend(r, new[b, :counts[b] - 1])
            p = np.arange(len(r.ids))
            cache.keep(state.cache, b, r, np.where(p < n, pre.start_B[b] + p, C + p - n))


def _constraints(model, core: Core, rows: int, params: SamplingParams, response_format, tokenizer) -> RowMasks:
    """Each row's grammar state for `response_format` (none: free rows); ValueError for a bad format."""
    masks = RowMasks(rows, model.config.text.vocab_size)
    if response_format is None:
        return masks
    if params.min_new_tokens:
        raise ValueError("min_new_tokens cannot be combined with response_format (the grammar decides the end)")
    grammar = response_format
    if not isinstance(grammar, Grammar):
        if tokenizer is None:
            raise ValueError("response_format needs the tokenizer (tokenizer=processor.tokenizer), or use Chat")
        grammar = Grammars(tokenizer, model.config.text.vocab_size, core.tokens.eos).compile(response_format)
    if grammar is not None:
        for b in range(rows):
            masks.set(b, grammar.start(params.max_new_tokens))
    return masks


def _advance(masks: RowMasks, tokens_BN, counts_B, done_B) -> None:
    for b in list(masks.rows):
        masks.advance(b, tokens_BN[b, :counts_B[b]])
        if done_B[b]:
            masks.clear(b)


def generate(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0, response_format: dict | Grammar | None = None,
             tokenizer=None, cache: PromptCache | None = None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after the prompt, as transformers' `generate` does.

    Takes the processor's numpy outputs unchanged (left-padded batches; any number of images per sample).
    Greedy by default; `do_sample=True` draws with `temperature`, `top_k`, `top_p`, reproducibly from `seed` (row b
    of a batch from seed + b). Stops when every row has produced an eos token (`eos_token_id`: one id or several;
    default the checkpoint's generation config) or after `max_new_tokens`. Returns (B, T_prompt + n) with the
    prompt in front; rows that finished early are padded with `pad_token_id` (default the generation config's,
    else the first eos id). The prompt's attention backend is the model's (`IdeficsModel.set_attention`).

    `response_format` constrains every row's answer (`generation.structured`: a JSON schema, any JSON object, a
    regex or a fixed choice; with the `tokenizer` it is written in, or compiled already); the answer always
    completes it, even when `max_new_tokens` cuts it short (the closing is forced in time).
    With a `cache` (`generation.cache.PromptCache`), prompts reuse the keys and values of prefixes and the features
    of images it holds, and leave theirs (the answers' too) in it: the same tokens, less work.
    """
    chunks = list(generate_stream(
        model, input_ids, attention_mask, pixel_values, pixel_attention_mask, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, chunk_size=max_new_tokens,
        response_format=response_format, tokenizer=tokenizer, cache=cache))
    ids = np.asarray(input_ids)
    return np.concatenate([ids, *(c.astype(ids.dtype) for c in chunks)], axis=1)
