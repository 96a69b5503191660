"""The pieces, each against its definition written out in numpy: no torch, no transformers (checked below).

Attention masks and grouped-query attention, llama3 RoPE frequencies, pixel shuffle order, NaViT position ids,
image-feature merging and generation's bucket sizes.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from idefics_jax.model.connector import pixel_shuffle
from idefics_jax.model.decoder import causal_mask
from idefics_jax.model.layers import apply_rope, rope_inv_freq
from idefics_jax.ops.attention import attend
from idefics_jax.model.vision import position_ids
from idefics_jax.model.config import RopeConfig
from idefics_jax.generation.api import bucket
from idefics_jax.model.idefics import merge_image_features


# --- attention -------------------------------------------------------------------------------------------------

def _allowed(attention_mask_BS, window):
    """Query t may see key s: s <= t, key s is a token, and s within the window."""
    B, S = attention_mask_BS.shape
    out = np.zeros((B, S, S), bool)
    for b in range(B):
        for t in range(S):
            for s in range(S):
                out[b, t, s] = s <= t and attention_mask_BS[b, s] == 1 and (window is None or s > t - window)
    return out


def _attend_reference(q_BTNH, k_BSKH, v_BSKH, allowed_BTS):
    """Query head n reads kv head n // (N / K) (transformers' repeat_kv); softmax over the allowed keys."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            for t in range(T):
                keys = np.flatnonzero(allowed_BTS[b, t])
                if not len(keys):  # a padding query: sees nothing
                    continue
                scores = k_BSKH[b, keys, kv].astype(np.float64) @ q_BTNH[b, t, n] / math.sqrt(H)
                p = np.exp(scores - scores.max())
                out[b, t, n] = (p / p.sum()) @ v_BSKH[b, keys, kv]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_causal_mask_with_left_padding_and_window(window):
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(causal_mask(mask, window)), _allowed(mask, window))


@pytest.mark.parametrize("window", [None, 3])
def test_grouped_query_attention(window):
    """6 query heads over 2 kv heads (3 each), causal, a left-padded row, with and without a sliding window."""
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 7, 6, 2, 8
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    attention_mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * T])
    allowed = _allowed(attention_mask, window)
    got = np.asarray(attend(q, k, v, causal_mask(attention_mask, window)))
    real = attention_mask.astype(bool)  # rows of padding queries see no key: any finite value will do
    np.testing.assert_allclose(got[real], _attend_reference(q, k, v, allowed)[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()
    # The grouping matters: pairing query head n with kv head n % K instead gives other numbers.
    swapped = np.asarray(attend(q[:, :, [0, 3, 1, 4, 2, 5]], k, v, causal_mask(attention_mask, window)))
    assert not np.allclose(swapped[real][:, [0, 2, 4, 1, 3, 5]], got[real], atol=1e-3)


# --- RoPE ------------------------------------------------------------------------------------------------------

def _llama3_reference(theta, dim, factor, low, high, original):
    """Llama 3.1's frequency scaling, one frequency at a time, in float64."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:  # high frequencies: unchanged
            out.append(freq)
        elif wavelen > original / low:  # low frequencies: divided by the factor
            out.append(freq / factor)
        else:  # in between: interpolated
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_rope_frequencies():
    rope = RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)  # Llama 3.1
    got = rope_inv_freq(rope, 128)
    ref = _llama3_reference(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    assert got.dtype == np.float32 and got.shape == (64,)
    np.testing.assert_allclose(got, ref, rtol=2e-6)
    # All three regimes occur, so each branch was checked.
    plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    ratio = ref / plain
    assert (ratio == 1).any() and np.isclose(ratio, 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()


def test_default_rope_frequencies_and_rotation():
    got = rope_inv_freq(RopeConfig(theta=10000.0), 8)
    np.testing.assert_allclose(got, 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    # rotate_half: the pair (i, i + H/2) turns by position * freq_i.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 5, 11]])
    out = np.asarray(apply_rope(x, pos, got))
    for t in range(3):
        for i in range(4):
            a = pos[0, t] * got[i]
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + 4]
            np.testing.assert_allclose(out[0, t, :, i], x1 * c - x2 * s, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out[0, t, :, i + 4], x2 * c + x1 * s, rtol=1e-5, atol=1e-5)


# --- pixel shuffle ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side, s", [(4, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_order(side, s):
    """Patch (r, c) of the side x side grid, feature d, goes to token (r // s, c // s) of the (side/s)^2 grid,
    feature ((r % s) * s + c % s) * D + d."""
    I, D = 2, 3
    x = np.arange(I * side * side * D, dtype=np.float32).reshape(I, side * side, D)
    got = np.asarray(pixel_shuffle(x, s))
    ref = np.zeros((I, (side // s) ** 2, D * s * s), np.float32)
    for i in range(I):
        for r in range(side):
            for c in range(side):
                for d in range(D):
                    ref[i, (r // s) * (side // s) + c // s, ((r % s) * s + c % s) * D + d] = x[i, r * side + c, d]
    np.testing.assert_array_equal(got, ref)


# --- NaViT position ids ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w", [(8, 8), (5, 8), (8, 3), (1, 7), (4, 2), (7, 5)])
def test_navit_position_ids(h, w):
    """An image covering the top-left h x w patches of an 8 x 8 grid: valid patch (r, c) takes the table cell
    (floor(8 r / h), floor(8 c / w)), its fractional coordinate bucketed; padding patches take 0."""
    n = 8
    mask = np.zeros((1, n, n), bool)
    mask[0, :h, :w] = True
    got = np.asarray(position_ids(mask, n))[0]
    ref = np.zeros(n * n, np.int64)
    for r in range(h):
        for c in range(w):
            ref[r * n + c] = (n * r // h) * n + n * c // w
    np.testing.assert_array_equal(got, ref)


# --- image features into the text ------------------------------------------------------------------------------

def test_merge_image_features():
    """Image tokens, row-major over the batch, take the real images' features in (batch, image) order, each
    image's rows in turn; padding image slots are skipped; other tokens keep their embeddings."""
    rng = np.random.default_rng(2)
    IMG, Timg, D = 9, 2, 4
    ids = np.array([[1, IMG, IMG, 2, IMG, IMG, 3],     # sample 0: two images
                    [4, 5, 6, IMG, IMG, 7, 8]])        # sample 1: one image
    x = rng.standard_normal((2, 7, D)).astype(np.float32)
    feats = rng.standard_normal((4, Timg, D)).astype(np.float32)  # slots (batch, image): 2 per sample
    real = np.array([True, True, True, False])                     # sample 1's second slot is padding
    got = np.asarray(merge_image_features(x, ids, feats, real, IMG))
    ref = x.copy()
    slots, k = [i for i in range(4) if real[i]], 0
    for b in range(2):
        for t in range(7):
            if ids[b, t] == IMG:
                ref[b, t] = feats[slots[k // Timg], k % Timg]
                k += 1
    np.testing.assert_array_equal(got, ref)


# --- bucket sizes ----------------------------------------------------------------------------------------------

def test_bucket_sizes():
    """The smallest of 16 * 2^k * {1, 5/4, 6/4, 7/4} holding n: at most 25% padding above 16."""
    sizes = sorted({16 * 2**k * q // 4 for k in range(12) for q in (4, 5, 6, 7)})
    for n in range(1, 5000):
        b = bucket(n)
        assert b == min(s for s in sizes if s >= n), n
        assert n <= b <= max(16, 1.25 * n), n
    assert [bucket(n, minimum=8) for n in (1, 9, 11, 13, 15, 17)] == [8, 10, 12, 14, 16, 20]


def test_these_tests_need_no_torch():
    """This file's tests pass in a fresh interpreter (no conftest) that never imports torch or transformers."""
    code = ("import sys, pytest\n"
            f"rc = pytest.main([{__file__!r}, '-q', '-p', 'no:cacheprovider', '--noconftest', '-k', 'not no_torch'])\n"
            "leaked = sorted({'torch', 'transformers'} & set(sys.modules))\n"
            "assert rc == 0 and not leaked, (rc, leaked)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
