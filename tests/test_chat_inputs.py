"""Chat's inputs: a plain string is one user turn with the given images; wrong types are one-line TypeErrors
naming the argument. On the shipped tiny-shapes model."""

import os

import numpy as np
import pytest

import idefics_jax
from idefics_jax.generation.chat import Chat

IMAGE = os.path.join(idefics_jax.resolve("tiny-shapes"), "examples", "shapes-1.png")
QUESTION, ANSWER = "What color is the square?", "blue"  # examples/questions.json


@pytest.fixture(scope="module")
def chat():
    return Chat.load("tiny-shapes")


def _turn(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def test_a_string_is_a_user_turn_with_the_images(chat):
    for images in ([IMAGE], [IMAGE, IMAGE], (IMAGE,)):
        got, want = chat.inputs(QUESTION, images), chat.inputs(_turn(QUESTION, len(images)), list(images))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    text_only = chat.inputs("Hello")
    np.testing.assert_array_equal(text_only["input_ids"], chat.inputs(_turn("Hello", 0))["input_ids"])
    assert "pixel_values" not in text_only
    # A message's content may be a string: one text entry.
    np.testing.assert_array_equal(chat.inputs([{"role": "user", "content": "Hello"}])["input_ids"],
                                  text_only["input_ids"])
    batch = chat.batch_inputs([(QUESTION, [IMAGE]), (_turn("How many shapes are there?", 1), [IMAGE])])
    assert batch["input_ids"].shape[0] == 2


def test_a_string_is_answered(chat):
    answer = chat(QUESTION, images=[IMAGE], max_new_tokens=8)
    assert answer.strip().lower().startswith(ANSWER), answer
    assert "".join(chat.stream(QUESTION, [IMAGE], max_new_tokens=8)) == answer
    assert chat.answers([(QUESTION, [IMAGE])], max_new_tokens=8) == [answer.strip()]


@pytest.mark.parametrize("messages, images, says", [
    ({"role": "user", "content": "hi"}, None, "messages must be a string (one user turn) or a list"),
    (["What color is the square?"], [IMAGE], "messages[0] must be a dict with a 'role'"),
    ([{"content": "hi"}], None, "messages[0] must be a dict with a 'role'"),
    ([{"role": "user", "content": 3}], None, "messages[0]['content'] must be a string or a list"),
    ([{"role": "user", "content": ["hi"]}], None, "messages[0]['content'][0] must be a dict with a 'type'"),
    (QUESTION, IMAGE, "images must be a list of images"),
    (QUESTION, [3], "images[0] must be one of images"),
    (QUESTION, np.zeros((8, 8, 3), np.uint8), "images must be a list of images"),
    (3, None, "messages must be a string"),
])
def test_wrong_types_are_named(chat, messages, images, says):
    for call in (lambda: chat(messages, images, max_new_tokens=2), lambda: chat.inputs(messages, images),
                 lambda: next(chat.stream(messages, images, max_new_tokens=2))):
        with pytest.raises(TypeError) as e:
            call()
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_wrong_videos_and_batches_are_named(chat):
    with pytest.raises(TypeError, match=r"^videos must be a list of video files"):
        chat.inputs(QUESTION, videos="clip.mp4")
    with pytest.raises(TypeError, match=r"^conversations must be a list"):
        chat.batch_inputs(QUESTION)
    with pytest.raises(TypeError, match=r"^conversations\[0\] must be a \(messages, images\)"):
        chat.answers([QUESTION])
    with pytest.raises(TypeError, match=r"^conversations\[1\]: images must be a list"):
        chat.batch_inputs([(QUESTION, [IMAGE]), (QUESTION, IMAGE)])
