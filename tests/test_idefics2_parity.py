"""fp32 logits and image features of the JAX model against transformers on random tiny Idefics2 checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_same_hf_weights, chat, hf_logits, rel_err
from flax import nnx
from transformers import AutoModelForImageTextToText, AutoProcessor

import idefics_jax
from idefics_jax.convert.hf_to_orbax import convert
from idefics_jax.convert.orbax_to_hf import export
import reference as testing
from idefics_jax.model.idefics import patch_mask

CASES = ["one_image_split", "batch_1_and_2_images", "batch_image_and_no_image", "text_only"]


@pytest.fixture(scope="module")
def ref2(tiny2_hf):
    return AutoModelForImageTextToText.from_pretrained(tiny2_hf).eval()


@pytest.fixture(scope="module")
def model2(tiny2_hf):
    return idefics_jax.load_pretrained(tiny2_hf)


@nnx.jit
def _image_features(model, pixel_values, pixel_attention_mask):
    return model.image_features(pixel_values, pixel_attention_mask)


def features_err(model, ref, inputs) -> float:
    """Connector outputs of the real images against the reference's, max |a - b| / max |b|.

    Far more sensitive to the vision and perceiver paths than the logits, where the text dominates."""
    pv, pam = inputs["pixel_values"], inputs["pixel_attention_mask"]
    with torch.no_grad():
        theirs = ref.model.get_image_features(pixel_values=torch.from_numpy(pv),
                                              pixel_attention_mask=torch.from_numpy(pam)).pooler_output
    theirs = torch.cat(list(theirs)).numpy()
    feats, real = _image_features(model, pv, pam)
    ours = np.asarray(feats)[np.asarray(real)].reshape(theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("case", CASES)
def test_parity(model2, ref2, cases2, case):
    """load_pretrained on the HF directory; logits over non-padded positions, and the image features."""
    inputs = cases2[case]
    ours = np.asarray(model2(**inputs))
    ref = hf_logits(ref2, inputs)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref, inputs["attention_mask"])
    print(f"{case}: logits rel err {err:.2e}")
    assert err <= 1e-4
    if "pixel_values" in inputs:
        ferr = features_err(model2, ref2, inputs)
        print(f"{case}: image features rel err {ferr:.2e}")
        assert ferr <= 1e-4


def test_sliding_window_shorter_than_prompt(tmp_path, cases2):
    """Mistral's window (key k kept for query q when k > q - W): 16 tokens, against left-padded prompts of 59 and
    125 tokens."""
    base = testing.tiny_idefics2_config()
    cfg = base.replace(text=dataclasses.replace(base.text, sliding_window=16))
    path = testing.save_hf_checkpoint(str(tmp_path / "window"), cfg, seed=5)
    inputs = cases2["batch_1_and_2_images"]
    assert inputs["attention_mask"].sum(axis=1).min() > 3 * 16
    model = idefics_jax.load_pretrained(path)
    assert model.config.text.sliding_window == 16
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    err = rel_err(np.asarray(model(**inputs)), hf_logits(hf, inputs),
                  inputs["attention_mask"])
    print(f"sliding window 16: logits rel err {err:.2e}")
    assert err <= 1e-4


def test_batched_image_equals_image_alone(model2, processor2):
    """An image batched with a larger one (so padded) gives the logits it gives alone (transformers #33499)."""
    rng = np.random.default_rng(1)
    image = testing.random_image(rng, 40, 27)  # original resized to 32x21: alone, its last pixel column is dropped
    prompt = chat(processor2, 1, "what is it?")
    alone = dict(processor2(text=[prompt], images=[[image]], return_tensors="np"))
    batch = dict(processor2(text=[prompt, chat(processor2, 1, "and this?")],
                            images=[[image], [testing.random_image(rng, 64, 64)]], return_tensors="np", padding=True))
    assert batch["pixel_values"].shape[-2:] != alone["pixel_values"].shape[-2:]
    # The case the rule exists for: counting a patch valid when any pixel is would add patches in the batch.
    p = model2.config.vision.patch_size
    n_any = lambda x: int(np.asarray(patch_mask(x["pixel_attention_mask"][0], p, all_pixels=False)).sum())  # noqa: E731
    n_all = lambda x: int(np.asarray(patch_mask(x["pixel_attention_mask"][0], p, all_pixels=True)).sum())  # noqa: E731
    assert n_any(batch) > n_any(alone) and n_all(batch) == n_all(alone)

    keep = batch["attention_mask"][0].astype(bool)
    assert keep.sum() == alone["input_ids"].shape[1]
    a = np.asarray(model2(**batch))[0, keep]
    b = np.asarray(model2(**alone))[0]
    err = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"batched vs alone: rel diff {err:.2e}")
    assert err <= 1e-5


def test_export_round_trip(tiny2_hf, tmp_path, cases2):
    """HF -> convert -> Orbax -> export -> HF: the same tensors; and Orbax logits match transformers on the export."""
    orbax_dir, out = str(tmp_path / "orbax"), str(tmp_path / "exported")
    convert(tiny2_hf, orbax_dir, progress=False)
    assert type(AutoProcessor.from_pretrained(orbax_dir)).__name__ == "Idefics2Processor"
    export(orbax_dir, out, progress=False)
    assert idefics_jax.from_hf_file(out) == idefics_jax.from_hf_file(tiny2_hf)
    assert_same_hf_weights(out, tiny2_hf)
    back = AutoModelForImageTextToText.from_pretrained(out).eval()
    model = idefics_jax.load_pretrained(orbax_dir)
    assert model.config == idefics_jax.from_hf_file(tiny2_hf)
    for case, inputs in cases2.items():
        err = rel_err(np.asarray(model(**inputs)), hf_logits(back, inputs), inputs["attention_mask"])
        print(f"{case} (orbax vs exported): logits rel err {err:.2e}")
        assert err <= 1e-4
