"""Rollouts for GRPO (and DPO pairs from the model's own answers): G completions per prompt, sampled by the
serving engine (continuous batching over the decode core) from the policy's current weights.

    engine = rollout_engine(model, processor, slots=16, max_len=256)
    with engine:
        groups = sample_groups(engine, prompts, group_size=8, max_new_tokens=16, temperature=1.0, seed=7)
        ...                                      # a policy update
        engine.update_weights(new_model)         # same shapes: no copy, no recompilation

Each completion draws from its own seed (`seed` + its index), so a batch repeats exactly for the same seed
whatever order the engine runs the requests in.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from idefics_jax.generation.prompt import bucket
from idefics_jax.serve.engine import Engine, Request


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One GRPO prompt: the conversation (chat-template messages), its images, and the reference answers the
    reward compares with."""

    messages: list
    images: list
    answers: tuple[str, ...]
    text: str = ""  # the question as the reward sees it


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[int, ...]  # the new tokens, the final eos included when it ended the answer
    finish_reason: str


def rollout_engine(model, processor, *, slots: int, max_len: int) -> Engine:
    """A serving engine for rollouts (decode steps per round 4: rollouts are short and many)."""
    return Engine(model, processor, slots=slots, max_len=max_len, steps=4, max_queue=max(64, slots * 4))


def sample_groups(engine: Engine, prompts: Sequence[Prompt], *, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float = 1.0, seed: int = 0) -> list[list[Completion]]:
    """`group_size` completions of every prompt -> [prompt][g]; temperature 0 is greedy. The engine must run."""
    requests = [Request(p.messages, p.images, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=(seed + i * group_size + g) % (2**31))
                for i, p in enumerate(prompts) for g in range(group_size)]
    results = [h.result() for h in engine.submit_all(requests)]
    done = [Completion(r.text.strip(), tuple(r.tokens), r.finish_reason) for r in results]
    return [done[i * group_size:(i + 1) * group_size] for i in range(len(prompts))]


def max_len_for(prompt_tokens: int, max_new_tokens: int) -> int:
    """Cache columns per slot for prompts up to `prompt_tokens` long and answers of `max_new_tokens`."""
    return bucket(prompt_tokens) + max_new_tokens
