"""Model inputs that cannot be right are refused on the host, with a clear ValueError, before any device work."""

import numpy as np
import pytest

import idefics_jax


@pytest.fixture(scope="module")
def model(tiny_hf):
    return idefics_jax.load_pretrained(tiny_hf)


def test_token_ids_out_of_vocab(model, cases):
    inputs = dict(cases["text_only"])
    inputs["input_ids"] = inputs["input_ids"].copy()
    inputs["input_ids"][0, -1] = model.config.text.vocab_size
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 160\)"):
        model(**inputs)


def test_image_tokens_without_images(model, cases):
    inputs = {k: v for k, v in cases["one_image_split_padded"].items() if "pixel" not in k}
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(**inputs)


def test_image_token_count_mismatch(model, cases):
    inputs = dict(cases["batch_1_and_2_images"])
    inputs["pixel_values"] = inputs["pixel_values"].copy()
    inputs["pixel_values"][1, 1] = 0  # one real image fewer than the prompt announces
    with pytest.raises(ValueError, match="image tokens and images do not match"):
        model(**inputs)


@pytest.mark.parametrize("key, bad, msg", [
    ("input_ids", lambda a: a[0], "input_ids must be a 2-D integer array"),
    ("input_ids", lambda a: a.astype(np.float32), "input_ids must be a 2-D integer array"),
    ("attention_mask", lambda a: a[:, 1:], "attention_mask shape"),
    ("pixel_values", lambda a: a[0], "pixel_values must be 5-D"),
    ("pixel_attention_mask", lambda a: a[..., 1:], "pixel_attention_mask shape"),
])
def test_wrong_rank_or_dtype(model, cases, key, bad, msg):
    inputs = dict(cases["one_image_split_padded"])
    inputs[key] = bad(inputs[key])
    with pytest.raises(ValueError, match=msg):
        model(**inputs)
