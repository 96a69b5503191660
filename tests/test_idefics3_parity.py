"""fp32 logits of the JAX model against transformers on random tiny Idefics3 checkpoints."""

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from transformers import AutoModelForImageTextToText

import idefics_jax
from idefics_jax.convert.hf_to_orbax import convert

CASES = ["one_image_split_padded", "batch_1_and_2_images", "text_only"]


@pytest.fixture(scope="module")
def converted_sharded(tiny_hf_sharded, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("orbax") / "tiny-sharded")
    convert(tiny_hf_sharded, dst, progress=False)
    return dst


@pytest.mark.parametrize("case", CASES)
def test_parity_hf_directory(tiny_hf, cases, case):
    """load_pretrained on the HF directory itself (in-memory conversion, unsharded source)."""
    inputs = cases[case]
    ours = np.asarray(idefics_jax.load_pretrained(tiny_hf)(**inputs))
    ref = hf_logits(AutoModelForImageTextToText.from_pretrained(tiny_hf).eval(), inputs)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref, inputs["attention_mask"])
    print(f"{case}: rel err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_parity_converted_sharded(tiny_hf_sharded, converted_sharded, cases, case):
    """Sharded HF checkpoint -> `convert` -> Orbax -> load_pretrained."""
    inputs = cases[case]
    model = idefics_jax.load_pretrained(converted_sharded)
    assert model.config.image_token_id == 5
    ours = np.asarray(model(**inputs))
    ref = hf_logits(AutoModelForImageTextToText.from_pretrained(tiny_hf_sharded).eval(), inputs)
    err = rel_err(ours, ref, inputs["attention_mask"])
    print(f"{case}: rel err {err:.2e}")
    assert err <= 1e-4


def test_padding_image_changes_nothing(tiny_hf, processor, cases):
    """Sample 0 of the batch has an all-zero padding image slot; alone it has none. Same logits."""
    batch = cases["batch_1_and_2_images"]
    assert batch["pixel_values"].shape[1] > 1 and not batch["pixel_values"][0, -1].any()
    model = idefics_jax.load_pretrained(tiny_hf)
    keep = batch["attention_mask"][0].astype(bool)
    alone = {k: v[:1] for k, v in batch.items()}
    n_real = int(np.any(alone["pixel_values"][0].reshape(alone["pixel_values"].shape[1], -1) != 0, axis=1).sum())
    alone["pixel_values"] = alone["pixel_values"][:, :n_real]
    alone["pixel_attention_mask"] = alone["pixel_attention_mask"][:, :n_real]
    alone = {k: v[:, keep] if k in ("input_ids", "attention_mask") else v for k, v in alone.items()}
    a = np.asarray(model(**batch))[0, keep]
    b = np.asarray(model(**alone))[0]
    assert np.abs(a - b).max() / np.abs(b).max() <= 1e-5


def test_tied_head_when_checkpoint_has_none(tmp_path, cases):
    """A checkpoint saved with tied embeddings has no lm_head.weight; we tie too."""
    import reference as testing

    cfg = testing.tiny_config(tie_word_embeddings=True)
    path = testing.save_hf_checkpoint(str(tmp_path / "tied"), cfg, seed=3)
    inputs = cases["one_image_split_padded"]
    model = idefics_jax.load_pretrained(path)
    assert model.config.tie_word_embeddings and not hasattr(model, "lm_head")
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    err = rel_err(np.asarray(model(**inputs)), hf_logits(hf, inputs),
                  inputs["attention_mask"])
    assert err <= 1e-4


def test_default_rope_and_untied(tmp_path, cases):
    """The default RoPE type (SmolVLM) also matches."""
    from idefics_jax import RopeConfig
    import reference as testing
    import dataclasses

    base = testing.tiny_config()
    cfg = base.replace(text=dataclasses.replace(base.text, rope=RopeConfig(theta=100000.0)))
    path = testing.save_hf_checkpoint(str(tmp_path / "default-rope"), cfg, seed=4)
    inputs = cases["batch_1_and_2_images"]
    model = idefics_jax.load_pretrained(path)
    assert model.config.text.rope.type == "default"
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    err = rel_err(np.asarray(model(**inputs)), hf_logits(hf, inputs),
                  inputs["attention_mask"])
    assert err <= 1e-4
