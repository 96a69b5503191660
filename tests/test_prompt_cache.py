"""The prefix and image caches (`generation.cache`): with them, greedy answers are those without them, in the
serving engine, `generate` and `Chat.send`, on random Idefics3 and Idefics2 models and tiny-shapes: prompts that
repeat, a conversation's next turn, two images behind the same token ids (no false hit), and a pool that evicts."""

from __future__ import annotations

import numpy as np
import pytest

import reference as testing
from idefics_jax.generation.api import generate
from idefics_jax.generation.cache import BLOCK, GiB, PromptCache
from idefics_jax.generation.chat import Chat, user_turn
from idefics_jax.generation.prompt import bucket
from idefics_jax.serve.engine import Engine, Request

PREAMBLE = "Look at it closely, please. "


def picture_turn(question: str) -> list[dict]:
    """A user turn with text before its image (so that prompts share blocks before the image tokens)."""
    return [{"role": "user", "content": [{"type": "text", "text": PREAMBLE}, {"type": "image"},
                                         {"type": "text", "text": question}]}]


def fresh(chat: Chat, messages, images, max_tokens: int, **kw) -> list[int]:
    """The answer without caches: `generate` on the request alone, up to and including its first eos."""
    inputs = chat.inputs(messages, images)
    new = generate(chat.model, **inputs, max_new_tokens=max_tokens, **kw)[0, inputs["input_ids"].shape[1]:]
    eos = chat.model.generation_defaults.eos_token_ids
    ends = [i for i, t in enumerate(new) if t in eos]
    return new[:ends[0] + 1 if ends else len(new)].tolist()


def first_image_token(chat: Chat, messages, images) -> int:
    ids = chat.inputs(messages, images)["input_ids"][0]
    return int(np.flatnonzero(ids == chat.model.config.image_token_id)[0])


def workload(chat: Chat, rng) -> list[tuple[list[dict], list | None]]:
    """A picture question, the same question about another picture (the same token ids), the first again, its
    next turn (the question, its answer and a new message), and a text question."""
    a, b = testing.random_image(rng, 40, 40), testing.random_image(rng, 40, 40)
    first = picture_turn("What is in it?")
    answer = chat.decode([fresh(chat, first, [a], 10)])[0]
    second = first + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}] + \
        user_turn("And what colors does it have?")
    return [(first, [a]), (first, [b]), (first, [a]), (second, [a]), (user_turn("Tell me a story, please."), None)]


@pytest.fixture(scope="module")
def lively_chat(lively_hf):
    return Chat.load(lively_hf)


def test_engine_caches_keep_greedy_answers(lively_chat):
    chat = lively_chat
    requests = workload(chat, np.random.default_rng(0))
    want = [fresh(chat, m, i, 10) for m, i in requests]
    assert want[0] != want[1]  # the two pictures get different answers: a false hit would show
    with Engine(chat.model, chat, slots=2, max_len=320, prefix_cache_gb=0.01, image_cache_gb=0.01) as engine:
        got = [engine.submit(Request(m, i, max_tokens=10)).result() for m, i in requests]
        stats = engine.decoder.cache.stats
    assert [r.tokens for r in got] == want
    # The other picture shares the text before its image tokens, nothing after.
    assert got[1].cached_tokens == first_image_token(chat, *requests[1]) // BLOCK * BLOCK > 0
    assert got[2].cached_tokens == (got[2].prompt_tokens - 1) // BLOCK * BLOCK
    # The next turn finds the first one's prompt and the answer's tokens as far as the template repeats them (a
    # random model's special tokens drop out of the answer's text).
    turn1 = np.concatenate([chat.inputs(*requests[0])["input_ids"][0], got[0].tokens[:-1]])
    turn2 = chat.inputs(*requests[3])["input_ids"][0]
    same = np.flatnonzero(np.append(turn1[:len(turn2)] != turn2[:len(turn1)], True))[0]
    assert got[3].cached_tokens == min(same, len(turn2) - 1) // BLOCK * BLOCK >= got[0].prompt_tokens // BLOCK * BLOCK
    assert stats["cached_tokens"] == sum(r.cached_tokens for r in got)
    assert not engine.decoder.cache._pins  # nothing left pinned


def test_a_prefix_is_cut_to_fit_a_tight_slot(lively_chat):
    """Slots just long enough for the prompt and its answer: a cached prefix whose bucketed layout (cached blocks
    and the rest, each padded to a bucket) would not fit is cut to a bucket's size, not dropped."""
    chat = lively_chat

    def conversation(words: int, i: int) -> list[dict]:
        return [{"role": "system", "content": [{"type": "text", "text": "Rules: " + "alpha beta " * words}]},
                {"role": "user", "content": [{"type": "text", "text": f"Question {i}?"}]}]

    for words in range(4, 200):  # a system prompt whose whole shared prefix would overflow the slot
        a, b = (chat.inputs(conversation(words, i))["input_ids"][0] for i in (1, 2))
        shared = int(np.flatnonzero(np.append(a[:len(b)] != b[:len(a)], True))[0])
        hit, P = min(shared, len(b) - 1) // BLOCK, max(len(a), len(b))
        if hit and bucket(hit, 1) * BLOCK + bucket(len(b) - hit * BLOCK) > bucket(P):
            break
    want = fresh(chat, conversation(words, 2), None, 8)
    with Engine(chat.model, chat, slots=1, max_len=bucket(P) + 8, prefix_cache_gb=0.01) as engine:
        engine.submit(Request(conversation(words, 1), None, max_tokens=8)).result()
        got = engine.submit(Request(conversation(words, 2), None, max_tokens=8)).result()
        assert not engine.decoder.cache._pins
    assert got.tokens == want
    assert 0 < got.cached_tokens < hit * BLOCK and bucket(got.cached_tokens // BLOCK, 1) * BLOCK == got.cached_tokens


def test_generate_with_a_cache_on_idefics2(tmp_path):
    path = testing.save_hf_checkpoint(str(tmp_path / "idefics2"), testing.tiny_idefics2_config(), seed=1,
                                      weight_scale=8.0)
    chat = Chat.load(path)
    requests = workload(chat, np.random.default_rng(1))
    want = [fresh(chat, m, i, 10) for m, i in requests]
    block_bytes = PromptCache(chat.model, prefix_cache_gb=0, image_cache_gb=0).block_bytes
    # A pool two blocks larger than the first prompt: the second evicts the first's last blocks.
    blocks = chat.inputs(*requests[0])["input_ids"].shape[1] // BLOCK + 2
    cache = PromptCache(chat.model, prefix_cache_gb=blocks * block_bytes / GiB, image_cache_gb=0.01)
    got = []
    for messages, images in requests:
        inputs = chat.inputs(messages, images)
        before = cache.stats["cached_tokens"]
        new = generate(chat.model, **inputs, max_new_tokens=10, cache=cache)[0, inputs["input_ids"].shape[1]:]
        got.append((new[:len(want[len(got)])].tolist(), cache.stats["cached_tokens"] - before))
    assert [g for g, _ in got] == want
    assert got[1][1] == first_image_token(chat, *requests[1]) // BLOCK * BLOCK  # no false hit
    assert got[2][1] > got[1][1] and cache.stats["evicted"] > 0 and not cache._pins


def test_chat_send_keeps_the_conversation():
    chat = Chat.load("tiny-shapes")
    image = testing.random_image(np.random.default_rng(2), 64, 64)
    turns = [("What shape is the red object?", [image]), ("How many shapes are there?", None),
             ("What color is the circle?", None)]
    for text, images in turns:
        history, history_images = chat.history, chat.history_images + (images or [])
        before = chat.cache.stats["cached_tokens"] if chat.cache else 0
        answer = chat.send(text, images=images, max_new_tokens=8)
        afresh = chat(history + user_turn(text, len(images or ())), history_images, max_new_tokens=8).strip()
        assert answer == afresh
        if history:  # later turns run little more than their new message
            cached = chat.cache.stats["cached_tokens"] - before
            prompt = chat.inputs(chat.history[:-1], history_images)["input_ids"].shape[1]
            assert cached >= prompt - 40, (cached, prompt)
    assert len(chat.history) == 6 and chat.history[-1]["role"] == "assistant"
    chat.reset()
    assert chat.history == [] and chat.send("What shape is the red object?", images=[image], max_new_tokens=8) \
        == chat(user_turn("What shape is the red object?", 1), [image], max_new_tokens=8).strip()


def test_cache_sizes_are_checked(lively_chat):
    with pytest.raises(ValueError, match="prefix_cache_gb must be a number of GiB >= 0; got -1"):
        Engine(lively_chat.model, lively_chat, prefix_cache_gb=-1)
