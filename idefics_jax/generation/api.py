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
from idefics_jax.model.idefics import IdeficsModel


def generate_stream(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None,
                    pixel_attention_mask=None, *, max_new_tokens: int, min_new_tokens: int = 0,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None, seed: int = 0, chunk_size: int = 1,
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
    if cache is None:
        C, mask, kv, first, done = prompt.columns, prompt.mask, *core.prefill(prompt, rows)
    else:
        rows_c = [cache.row(prompt, b) for b in range(B)]
        for r in rows_c:
            cache.match(r)
        pre = cache.prefill(core, rows_c, rows)
        C, mask, kv, first, done = pre.mask_BC.shape[1], pre.mask_BC, pre.cache, pre.first_B, pre.done_B
    columns = bucket(C + max_new_tokens)
    state = core.empty(B, columns, t=C)
    state = core.insert(state, kv, np.arange(B), np.arange(B), mask, first, rows)
    if cache is not None:  # the prompts' new blocks: running requests share them
        for b, r in enumerate(rows_c):
            cache.keep(state.cache, b, r, pre.start_B[b] + np.arange(r.prompt_len))
    new = [np.asarray(first)[:, None]]
    yield new[0]
    produced, done = 1, np.asarray(done)
    while produced < max_new_tokens and not done.all():
        steps = min(chunk_size, max_new_tokens - produced)
        state, out, count = core.decode(state, steps, width=columns)
        count = int(count)
        new.append(np.asarray(out)[:, :count])
        yield new[-1]
        produced += count
        done = np.asarray(state.done_B)
    if cache is not None:  # the answers' blocks too: a conversation's next turn holds them
        new, counts = np.concatenate(new, axis=1), np.asarray(state.step_B)
        for b, r in enumerate(rows_c):
            n = r.prompt_len
            cache.extend(r, new[b, :counts[b] - 1])
            p = np.arange(len(r.ids))
            cache.keep(state.cache, b, r, np.where(p < n, pre.start_B[b] + p, C + p - n))


def generate(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0, cache: PromptCache | None = None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after the prompt, as transformers' `generate` does.

    Takes the processor's numpy outputs unchanged (left-padded batches; any number of images per sample).
    Greedy by default; `do_sample=True` draws with `temperature`, `top_k`, `top_p`, reproducibly from `seed` (row b
    of a batch from seed + b). Stops when every row has produced an eos token (`eos_token_id`: one id or several;
    default the checkpoint's generation config) or after `max_new_tokens`. Returns (B, T_prompt + n) with the
    prompt in front; rows that finished early are padded with `pad_token_id` (default the generation config's,
    else the first eos id). The prompt's attention backend is the model's (`IdeficsModel.set_attention`).
    With a `cache` (`generation.cache.PromptCache`), prompts reuse the keys and values of prefixes and the features
    of images it holds, and leave theirs (the answers' too) in it: the same tokens, less work.
    """
    chunks = list(generate_stream(
        model, input_ids, attention_mask, pixel_values, pixel_attention_mask, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, chunk_size=max_new_tokens, cache=cache))
    ids = np.asarray(input_ids)
    return np.concatenate([ids, *(c.astype(ids.dtype) for c in chunks)], axis=1)
