"""Configs from config.json in both transformers spellings; presets checked with jax.eval_shape."""

import copy

import pytest

import idefics_jax
from idefics_jax import PRESETS, from_hf_dict, to_hf_dict

# Parameter counts as published on each checkpoint's model page (rounded there; these are exact sums).
PUBLISHED = {
    "idefics3-8b-llama3": (8.46e9, 0.005e9),
    "smolvlm-256m": (256e6, 0.5e6),
    "smolvlm-500m": (507e6, 0.5e6),
    "smolvlm-2.2b": (2.25e9, 0.005e9),
}


def test_v4_and_v5_spellings_agree():
    v5 = to_hf_dict(PRESETS["idefics3-8b-llama3"])
    v4 = copy.deepcopy(v5)
    rope = v4["text_config"].pop("rope_parameters")
    v4["text_config"]["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")  # the oldest spelling
    v4["text_config"]["rope_scaling"] = rope
    v4["torch_dtype"] = "bfloat16"
    assert from_hf_dict(v4) == from_hf_dict(v5) == PRESETS["idefics3-8b-llama3"]


def test_text_config_values_are_read_not_assumed():
    d = to_hf_dict(PRESETS["smolvlm-256m"])
    d["text_config"]["rms_norm_eps"] = 1e-6
    assert from_hf_dict(d).text.rms_norm_eps == 1e-6


@pytest.mark.parametrize("bad, msg", [
    ({"model_type": "llava"}, "model_type 'llava' is not supported"),
    ({"model_type": "idefics3", "vision_config": {}}, "has no 'text_config'"),
])
def test_bad_configs(bad, msg):
    with pytest.raises(idefics_jax.ConfigError, match=msg):
        from_hf_dict(bad)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    """jax.eval_shape of the full-size model: the count equals transformers' for the same config.json and the
    published figure."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    ours = idefics_jax.param_count(PRESETS[name])
    d = to_hf_dict(PRESETS[name])
    mt = d.pop("model_type")
    d.pop("architectures")
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(AutoConfig.for_model(mt, **d))
    assert ours == sum(p.numel() for p in hf.parameters())
    published, rounding = PUBLISHED[name]
    print(f"{name}: {ours:,} parameters")
    assert abs(ours - published) <= rounding
