"""Generation against transformers' `generate` (greedy, fp32, token for token), the KV cache path, bucketing,
streaming, the chat helper and the CLI, on a random tiny Idefics3 whose output depends on the prompt."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForImageTextToText, AutoProcessor

import idefics_jax
import reference as testing
from idefics_jax.generation import decode as _decode
from idefics_jax.generation.prompt import bucket
from idefics_jax.model.decoder import Decoder, KVCache, causal_mask
from idefics_jax.model.idefics import positions_from_mask
from idefics_jax.ops.decode_weights import BitsLayers, LayerList, StackedLayers, decode_layers

CASES = ["one_image_split_padded", "batch_1_and_2_images", "text_only"]
N_NEW = 24


@pytest.fixture(scope="module")
def hf(lively_hf):
    return AutoModelForImageTextToText.from_pretrained(lively_hf).eval()


@pytest.fixture(scope="module")
def model(lively_hf):
    return idefics_jax.load_pretrained(lively_hf)


def hf_generate(hf, inputs, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                           do_sample=False, **kw).numpy()


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(hf, model, cases, case):
    """Token for token, eos and pad from the checkpoint's generation config on both sides."""
    inputs = cases[case]
    ref = hf_generate(hf, inputs, max_new_tokens=N_NEW)
    ours = idefics_jax.generate(model, **inputs, max_new_tokens=N_NEW)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    # Not vacuous: the rows say different things and do not repeat one token.
    new = ref[:, inputs["input_ids"].shape[1]:]
    assert len(np.unique(new)) > 4
    if len(new) > 1:
        assert (new[0] != new[1]).any()


def first_steps(row: np.ndarray) -> dict[int, int]:
    """token -> first step at which it appears in `row`."""
    out: dict[int, int] = {}
    for i, t in enumerate(row.tolist()):
        out.setdefault(t, i)
    return out


@pytest.mark.parametrize("case", ["batch_1_and_2_images", "text_only"])
def test_eos_stops_rows_at_different_steps(hf, model, cases, case):
    inputs = cases[case]
    T = inputs["input_ids"].shape[1]
    free = hf_generate(hf, inputs, max_new_tokens=N_NEW, eos_token_id=[])[:, T:]
    # An id both rows emit, first at different steps (the earliest such pair, so both rows stop early).
    a, b = first_steps(free[0]), first_steps(free[1])
    shared = [t for t in a if t in b and a[t] != b[t]]
    assert shared, "the random model emits no common token at different steps; pick another seed"
    eos = min(shared, key=lambda t: max(a[t], b[t]))
    ref = hf_generate(hf, inputs, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    ours = idefics_jax.generate(model, **inputs, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    assert ours.shape == ref.shape == (2, T + max(a[eos], b[eos]) + 1)
    np.testing.assert_array_equal(ours, ref)
    early = int(np.argmin([a[eos], b[eos]]))
    assert (ours[early, T + min(a[eos], b[eos]) + 1:] == 0).all()  # the row that finished first is padded

    # Several eos ids, and eos forbidden before min_new_tokens: still as transformers.
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[eos, int(free[0, 0])], pad_token_id=0,
              min_new_tokens=max(a[eos], b[eos]) + 2)
    np.testing.assert_array_equal(idefics_jax.generate(model, **inputs, **kw), hf_generate(hf, inputs, **kw))


def test_stream_chunks_equal_generate(model, cases):
    inputs = cases["batch_1_and_2_images"]
    whole = idefics_jax.generate(model, **inputs, max_new_tokens=10, eos_token_id=[])
    chunks = list(idefics_jax.generate_stream(model, **inputs, max_new_tokens=10, eos_token_id=[], chunk_size=3))
    assert [c.shape[1] for c in chunks] == [1, 3, 3, 3]  # the prefill's token, then chunks of the loop
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole[:, inputs["input_ids"].shape[1]:])


def test_prompt_lengths_share_a_bucket(model, processor):
    """Prompts of 33 and 37 tokens both pad to 40: no new compilation for the second one."""
    assert bucket(33) == bucket(37) == 40 and bucket(16) == 16
    ids = lambda n: np.asarray([[2] + [20 + (i % 50) for i in range(n - 1)]])  # noqa: E731
    idefics_jax.generate(model, ids(33), max_new_tokens=3, eos_token_id=[])
    compiled = lambda: [f._cache_size() for f in (_decode.prefill, _decode.insert, _decode.decode)]  # noqa: E731
    sizes = compiled()
    idefics_jax.generate(model, ids(37), max_new_tokens=3, eos_token_id=[])
    assert compiled() == sizes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_weight_views_change_nothing(lively_hf, cases, monkeypatch, dtype):
    """On the CPU decoding reads zero-copy per-layer views (fp32) or bf16 bits (bf16); the stacked weights, as
    used elsewhere, give the same tokens."""
    model = idefics_jax.load_pretrained(lively_hf, dtype=dtype)
    layers = decode_layers(model.text.layers.weights())
    assert type(layers) is (LayerList if dtype == "float32" else BitsLayers)  # Stacked would mean a copy was needed
    inputs = cases["batch_1_and_2_images"]
    a = idefics_jax.generate(model, **inputs, max_new_tokens=8, eos_token_id=[])
    monkeypatch.setattr(_decode, "decode_layers", StackedLayers)
    np.testing.assert_array_equal(a, idefics_jax.generate(model, **inputs, max_new_tokens=8, eos_token_id=[]))


def test_input_errors(model, cases):
    inputs = cases["text_only"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        idefics_jax.generate(model, **inputs, max_new_tokens=0)
    with pytest.raises(ValueError, match="left"):
        idefics_jax.generate(model, inputs["input_ids"], inputs["attention_mask"][:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        idefics_jax.generate(model, **inputs, max_new_tokens=2, do_sample=True, temperature=0.0)


def test_eos_default_comes_from_generation_config(lively_hf, model):
    assert model.generation_defaults == idefics_jax.GenerationDefaults(eos_token_ids=(3,), pad_token_id=0)


def test_decoder_cache_matches_full_forward():
    """Prompt in two pieces through a cache of more slots than tokens == one pass without a cache."""
    c = testing.tiny_config().text
    dec = Decoder(c, rngs=nnx.Rngs(0))
    B, T, S, T1 = 2, 11, 16, 7
    x = jax.random.normal(jax.random.key(1), (B, T, c.hidden_size))
    mask_BT = jnp.asarray(np.array([[0, 0, 0] + [1] * 8, [1] * 11]), jnp.int32)
    pos = positions_from_mask(mask_BT)
    full, _ = dec(x, pos, causal_mask(mask_BT, None))
    mask_BS = jnp.pad(mask_BT, ((0, 0), (0, S - T)))
    slot_mask = causal_mask(mask_BS, None)  # (B, S, S): query rows by slot
    cache = KVCache.zeros(c, B, S, jnp.float32)
    h1, cache = dec(x[:, :T1], pos[:, :T1], slot_mask[:, :T1], cache, 0)
    h2, cache = dec(x[:, T1:], pos[:, T1:], slot_mask[:, T1:T], cache, T1)
    keep = np.asarray(mask_BT, bool)
    got = np.concatenate([h1, h2], axis=1)
    assert np.abs(got - np.asarray(full))[keep].max() <= 1e-5 * np.abs(np.asarray(full)).max()
    assert cache.k.shape == (c.num_layers, B, c.num_kv_heads, S, c.head_dim)
    assert not np.asarray(cache.k[:, :, :, T:]).any()  # slots past the tokens are untouched


def test_chat_helper_uses_the_checkpoint_processor(lively_hf, model, tmp_path):
    processor = AutoProcessor.from_pretrained(lively_hf)
    chat = idefics_jax.generation.chat.Chat(model, processor)
    path = str(tmp_path / "img.png")
    testing.random_image(np.random.default_rng(0), 40, 50).save(path)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do we see?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A statue."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]},
    ]
    images = [path, testing.random_image(np.random.default_rng(1), 30, 30)]
    text = chat(messages, images, max_new_tokens=12)
    inputs = chat.inputs(messages, images)
    assert inputs["pixel_values"].shape[1] > 2  # split into tiles by the checkpoint's processor
    ids = idefics_jax.generate(model, **inputs, max_new_tokens=12)
    assert text == processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text and "".join(chat.stream(messages, images, max_new_tokens=12)) == text
    with pytest.raises(ValueError, match="2 image entries but 1"):
        chat(messages, images[:1], max_new_tokens=2)


def test_chat_answers_a_batch_as_one_by_one(lively_hf, model):
    # Left-padded batches of 3 (different image counts; image-less conversations batched apart) give each
    # conversation the answer it gets alone.
    from idefics_jax.generation.chat import user_turn

    chat = idefics_jax.generation.chat.Chat(model, AutoProcessor.from_pretrained(lively_hf), do_image_splitting=False)
    rng = np.random.default_rng(2)
    conversations = [
        (user_turn("What is it?", 1), [testing.random_image(rng, 40, 50)]),
        (user_turn("Hello there, how are you today?"), None),
        (user_turn("Compare these two pictures, please.", 2), [testing.random_image(rng, 30, 60),
                                                                testing.random_image(rng, 64, 32)]),
        (user_turn("Hi"), None),
        (user_turn("And this one?", 1), [testing.random_image(rng, 50, 50)]),
    ]
    alone = [chat(m, images, max_new_tokens=8).strip() for m, images in conversations]
    assert chat.answers(conversations, max_new_tokens=8, batch_size=3) == alone
    assert len(set(alone)) > 1  # the answers differ, so a mix-up would show
    with pytest.raises(ValueError, match="some conversations have images and some do not"):
        chat.batch_inputs(conversations[:2])


class _Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


def test_cli_streams(lively_hf, tmp_path, monkeypatch, capsys):
    from idefics_jax import cli
    from idefics_jax.generation.chat import Chat

    path = str(tmp_path / "img.png")
    testing.random_image(np.random.default_rng(0), 40, 50).save(path)
    out = _Recorder()
    monkeypatch.setattr("sys.stdout", out)
    argv = ["generate", "--model", lively_hf, "--image", path, "--prompt", "What is it?", "--max-new-tokens", "12",
            "--no-image-splitting"]
    assert cli.main(argv) == 0
    expected = Chat.load(lively_hf, do_image_splitting=False)(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], [path],
        max_new_tokens=12)
    assert out.getvalue() == expected + "\n"
    assert len([p for p in out.pieces if p.strip()]) >= 3  # streamed piece by piece, not printed at the end

    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 1
    assert "idefics-jax generate: error:" in capsys.readouterr().err
