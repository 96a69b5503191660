"""Sampling: the same filters as transformers' warpers, the softmax distribution, reproducible from the seed, and
generated tokens that stay inside top-k / top-p of the model's own logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import idefics_jax
from idefics_jax.generation.sampling import Rows, SamplingConfig, choose_tokens, process_logits


def rows(n, temperature=1.0, top_p=1.0, min_new_tokens=0, seed=0):
    """n rows with these settings, each with its own key."""
    keys = jax.random.key_data(jax.random.split(jax.random.key(seed), n))
    return Rows(jnp.full(n, temperature, jnp.float32), jnp.full(n, top_p, jnp.float32),
                jnp.full(n, min_new_tokens, jnp.int32), jnp.full(n, 1000, jnp.int32), jnp.zeros(n, bool), keys)


def eos(*ids):
    return jnp.asarray(ids, jnp.int32).reshape(-1)


def step(n, i):
    return jnp.full(n, i, jnp.int32)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.9), (1.3, 20, 0.5),
                                                     (1.0, None, 0.05), (2.0, 1, 0.99)])
def test_filters_remove_what_transformers_removes(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 100)).astype(np.float32) * 3
    ref = torch.from_numpy(logits)
    for w in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
             ([TopPLogitsWarper(top_p)] if top_p else []):
        ref = w(None, ref)
    cfg = SamplingConfig(do_sample=True, top_k=top_k, use_top_p=top_p is not None)
    ours = np.asarray(process_logits(jnp.asarray(logits), step(6, 0), cfg, rows(6, temperature, top_p or 1.0), eos()))
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    assert kept.sum(1).min() >= 1 and (top_k is None and top_p is None or (~kept).any())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    cfg = SamplingConfig(do_sample=True, use_top_p=True)
    for p, kept in [(0.5, 1), (0.79, 2), (0.81, 3), (0.96, 4)]:
        out = np.asarray(process_logits(jnp.log(probs), step(1, 0), cfg, rows(1, top_p=p), eos()))
        assert np.isfinite(out).sum() == kept, p


def test_min_new_tokens_forbids_eos_until_reached():
    logits = jnp.asarray([[0.0, 5.0, 1.0, 4.0]])
    greedy = SamplingConfig()
    p = rows(1, min_new_tokens=2)
    assert int(choose_tokens(logits, step(1, 1), greedy, p, eos(1, 3))[0]) == 2
    assert int(choose_tokens(logits, step(1, 2), greedy, p, eos(1, 3))[0]) == 1


def test_draws_follow_the_softmax():
    """20000 rows of the same logits, each with its own key: frequencies within 4 standard errors of
    softmax(logits / T)."""
    logits = jnp.asarray(np.log([0.1, 0.2, 0.3, 0.4]) * 2.0, jnp.float32)
    n = 20000
    draws = np.asarray(choose_tokens(jnp.tile(logits, (n, 1)), step(n, 3), SamplingConfig(do_sample=True), rows(n, 2.0),
                                     eos()))
    freq = np.bincount(draws, minlength=4) / n
    want = np.array([0.1, 0.2, 0.3, 0.4])
    assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / n)), freq


@pytest.fixture(scope="module")
def lively(lively_hf):
    return idefics_jax.load_pretrained(lively_hf)


def model_logits(model, out, inputs) -> np.ndarray:
    """Logits of the full forward pass (no cache) over prompt + generated tokens, at the positions that chose them."""
    T = inputs["input_ids"].shape[1]
    mask = np.concatenate([inputs["attention_mask"], np.ones((out.shape[0], out.shape[1] - T), np.int64)], axis=1)
    logits = model(out, mask, inputs.get("pixel_values"), inputs.get("pixel_attention_mask"))
    return np.asarray(logits)[:, T - 1:-1]


def test_sampling_reproducible_and_inside_top_k_top_p(lively, cases):
    inputs = cases["batch_1_and_2_images"]
    T = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=16, do_sample=True, eos_token_id=[])
    a = idefics_jax.generate(lively, **inputs, **kw, temperature=1.5, top_k=4, seed=7)
    np.testing.assert_array_equal(a, idefics_jax.generate(lively, **inputs, **kw, temperature=1.5, top_k=4, seed=7))
    assert (a != idefics_jax.generate(lively, **inputs, **kw, temperature=1.5, top_k=4, seed=8)).any()
    streamed = list(idefics_jax.generate_stream(lively, **inputs, **kw, temperature=1.5, top_k=4, seed=7))
    np.testing.assert_array_equal(np.concatenate(streamed, axis=1), a[:, T:])

    logits = model_logits(lively, a, inputs)  # (B, 16, V)
    new = a[:, T:]
    chosen = np.take_along_axis(logits, new[..., None], -1)[..., 0]
    rank = (logits > chosen[..., None] + 1e-4).sum(-1)  # how many tokens score clearly higher
    assert rank.max() < 4  # inside the top 4
    assert rank.max() > 0  # and not just greedy: the test would catch a top-k that keeps too much

    b = idefics_jax.generate(lively, **inputs, **kw, temperature=1.0, top_p=0.6, seed=3)
    logits = model_logits(lively, b, inputs)
    probs = jax.nn.softmax(logits, axis=-1)
    chosen = np.take_along_axis(np.asarray(probs), b[:, T:, None], -1)[..., 0]
    # Mass strictly above the chosen token must be below top_p, or the token would have been cut.
    above = np.where(np.asarray(probs) > chosen[..., None] * (1 + 1e-4), np.asarray(probs), 0).sum(-1)
    assert above.max() < 0.6 + 1e-4
    assert above.max() > 0  # some draws were not the argmax

    greedy = idefics_jax.generate(lively, **inputs, max_new_tokens=16, eos_token_id=[])
    np.testing.assert_array_equal(idefics_jax.generate(lively, **inputs, **kw, top_k=1, seed=11), greedy)
