"""A final assistant message is continued, not closed: the prompt's token ids are transformers'
`apply_chat_template(..., continue_final_message=True)` for the Idefics2, Idefics3 and SmolVLM chat templates (on the
tiny test processors), and `Chat`, the engine and the `generate` command answer from that prompt."""

import copy
import os

import numpy as np
import pytest

import idefics_jax
from idefics_jax import cli
from idefics_jax.generation.api import generate_stream
from idefics_jax.generation.chat import Chat
from reference import random_image

# The published checkpoints' chat templates, verbatim: HuggingFaceM4/idefics2-8b, HuggingFaceM4/Idefics3-8B-Llama3,
# HuggingFaceTB/SmolVLM-Instruct (and SmolVLM-256M/500M-Instruct), and SmolVLM2's as transformers ships it.
IDEFICS2 = ("{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == "
            "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
            "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
            "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
IDEFICS3 = ("<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]"
            "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if "
            "line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
            "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SMOLVLM = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]"
           "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if "
           "line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
           "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def smolvlm2() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE


def conversations(rng) -> list[list[dict]]:
    """Conversations ending with an assistant message: after an image, after several turns (the prefix ends with a
    space), text only."""
    img = lambda h, w: {"type": "image", "image": random_image(rng, h, w)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        [{"role": "user", "content": [img(40, 30), text("What is wrong here?")]},
         {"role": "assistant", "content": [text("Let's fix this step by step")]}],
        [{"role": "user", "content": [img(30, 50), text("Describe it.")]},
         {"role": "assistant", "content": [text("A red square.")]},
         {"role": "user", "content": [text("And the colour of the circle?")]},
         {"role": "assistant", "content": [text("The circle is ")]}],
        [{"role": "system", "content": [text("Answer briefly.")]},
         {"role": "user", "content": [text("hello")]},
         {"role": "assistant", "content": [text("Hi")]}],
    ]


@pytest.mark.parametrize("family, template", [("idefics2", IDEFICS2), ("idefics3", IDEFICS3),
                                              ("smolvlm", SMOLVLM), ("smolvlm2", None)],
                         ids=["idefics2", "idefics3", "smolvlm", "smolvlm2"])
def test_a_final_assistant_message_is_continued_as_transformers_does(family, template, processor, processor2):
    p = copy.deepcopy(processor2 if family == "idefics2" else processor)
    p.chat_template = template or smolvlm2()
    chat = Chat(None, p)  # prompts only: no model needed
    tok = p.tokenizer
    for messages in conversations(np.random.default_rng(0)):
        ours = chat.inputs(messages)
        theirs = p.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=True,
                                       return_tensors="np")
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
        if "pixel_values" in theirs:
            np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
        # Continued: the prompt ends with the prefix's own tokens, no end of utterance, no new assistant turn.
        assert tok.decode(ours["input_ids"][0]).endswith(messages[-1]["content"][-1]["text"])
        # Asked to close it (as vLLM does by default), the prompt is transformers' with the generation prompt.
        closed = chat.inputs(messages, add_generation_prompt=True)
        want = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="np")
        np.testing.assert_array_equal(closed["input_ids"], want["input_ids"])
        assert closed["input_ids"].shape[1] > ours["input_ids"].shape[1]
        # A conversation ending with the user's turn still gets the generation prompt.
        asked = chat.inputs(messages[:-1])
        want = p.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="np")
        np.testing.assert_array_equal(asked["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="cannot both be true"):
        chat.inputs(messages, add_generation_prompt=True, continue_final_message=True)


EXAMPLES = os.path.join(idefics_jax.resolve("tiny-shapes"), "examples")
QUESTION = "What color is the square?"
PREFIX = "The square is"


@pytest.fixture(scope="module")
def tiny_chat():
    return Chat.load("tiny-shapes")


def continued(chat: Chat) -> tuple[list[dict], list[str], list[int]]:
    """A question about shapes-1.png with the answer's start, and the greedy tokens after it (the prompt built by
    transformers' template with continue_final_message=True)."""
    image = os.path.join(EXAMPLES, "shapes-1.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": PREFIX}]}]
    from idefics_jax.generation.images import load_image

    prompt = chat.processor.apply_chat_template(messages, continue_final_message=True)
    inputs = dict(chat.processor(text=[prompt], images=[[load_image(image)]], return_tensors="np"))
    # In steps of one token, as Chat.stream and the command run it (one compile for the three).
    new = np.concatenate(list(generate_stream(chat.model, **inputs, max_new_tokens=6)), axis=1)[0]
    return messages, [image], new.tolist()


def test_chat_and_the_cli_continue_the_answer(tiny_chat, capsys, monkeypatch):
    """Chat and `idefics-jax generate --assistant-prefix` answer from the continued prompt: the tokens are
    `generate`'s on transformers' continued prompt (the command prints the prefix, then the continuation). The
    server's continuation is tested in test_serve_endpoint.py."""
    from idefics_jax.train import loading

    messages, images, want = continued(tiny_chat)
    text = tiny_chat.processor.tokenizer.decode(want, skip_special_tokens=True)
    assert "".join(tiny_chat.stream(messages, images, max_new_tokens=6)) == text
    monkeypatch.setattr(loading, "load_chat", lambda *a, **k: tiny_chat)  # the same model: no second load
    argv = ["generate", "--prompt", QUESTION, "--image", images[0], "--assistant-prefix", PREFIX,
            "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # The command stops at the end of utterance; its text is the start of the continuation.
    assert printed.startswith(PREFIX) and printed.endswith("\n")
    answer = printed[len(PREFIX):-1]
    assert answer and text.startswith(answer), (answer, text)
