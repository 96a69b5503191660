"""Configs from config.json in both transformers spellings; presets checked with jax.eval_shape."""

import copy

import pytest

import idefics_jax
from idefics_jax import PRESETS, from_hf_dict, to_hf_dict

# Parameter counts as published on each checkpoint's model page (rounded there; these are exact sums).
PUBLISHED = {
    "idefics2-8b": (8.4e9, 0.05e9),
    "idefics2-8b-base": (8.4e9, 0.05e9),
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


def _transformers_count(name: str, model_class: str | None = None) -> int:
    """Parameters of transformers' model built (on the meta device) from the preset's config.json."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = to_hf_dict(PRESETS[name])
    mt = d.pop("model_type")
    d.pop("architectures")
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(AutoConfig.for_model(mt, **d))
    if model_class:
        assert type(hf) is getattr(transformers, model_class)
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    """jax.eval_shape of the full-size model: the count equals transformers' for the same config.json and the
    published figure."""
    ours = idefics_jax.param_count(PRESETS[name])
    assert ours == _transformers_count(name)
    published, rounding = PUBLISHED[name]
    print(f"{name}: {ours:,} parameters")
    assert abs(ours - published) <= rounding


@pytest.mark.parametrize("name", ["smolvlm2-256m", "smolvlm2-500m", "smolvlm2-2.2b"])
def test_smolvlm2_preset_parameter_count(name):
    """SmolVLM2: jax.eval_shape's count equals transformers' SmolVLM (model_type smolvlm) on the same dict."""
    ours = idefics_jax.param_count(PRESETS[name])
    assert PRESETS[name].model_type == "smolvlm" and from_hf_dict(to_hf_dict(PRESETS[name])) == PRESETS[name]
    assert ours == _transformers_count(name, "SmolVLMForConditionalGeneration")
    print(f"{name}: {ours:,} parameters")


# HuggingFaceM4/idefics2-8b's config.json (4.x spellings, remote-code model_type leftovers, no perceiver width).
IDEFICS2_8B_HUB = {
    "architectures": ["Idefics2ForConditionalGeneration"],
    "image_token_id": 32001,
    "model_type": "idefics2",
    "perceiver_config": {"hidden_act": "silu", "model_type": "idefics2", "num_key_value_heads": 4,
                         "resampler_depth": 3, "resampler_head_dim": 96, "resampler_n_heads": 16,
                         "resampler_n_latents": 64},
    "text_config": {"hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
                    "torch_dtype": "bfloat16", "vocab_size": 32003},
    "torch_dtype": "float32",
    "use_cache": True,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}


def _as_transformers_reads_it(d: dict) -> dict:
    """`d` after transformers has parsed it (defaults filled in, perceiver width and eps overwritten or not)."""
    from transformers import AutoConfig

    d = copy.deepcopy(d)
    mt = d.pop("model_type")
    d.pop("architectures", None)
    return AutoConfig.for_model(mt, **d).to_dict()


def _idefics2_variants():
    hub = IDEFICS2_8B_HUB
    narrow = copy.deepcopy(hub)  # a perceiver width that differs: the reference takes the text's width and eps
    narrow["perceiver_config"].update(hidden_size=1024, rms_norm_eps=1e-3)
    same = copy.deepcopy(hub)  # the same width: the perceiver keeps its own eps
    same["perceiver_config"].update(hidden_size=4096, rms_norm_eps=1e-3)
    no_window = copy.deepcopy(hub)  # absent: Mistral's default 4096
    del no_window["text_config"]["sliding_window"]
    window_off = copy.deepcopy(hub)
    window_off["text_config"]["sliding_window"] = None
    v5 = to_hf_dict(PRESETS["idefics2-8b"])
    return {"hub": hub, "narrow_perceiver": narrow, "same_width_perceiver": same, "no_window": no_window,
            "window_off": window_off, "v5": v5}


def test_idefics2_hub_config_is_the_preset():
    assert from_hf_dict(IDEFICS2_8B_HUB) == PRESETS["idefics2-8b"] == PRESETS["idefics2-8b-base"]
    c = PRESETS["idefics2-8b"]
    assert (c.text.rms_norm_eps, c.connector.rms_norm_eps, c.text.sliding_window) == (1e-5, 1e-6, 4096)


@pytest.mark.parametrize("name", sorted(_idefics2_variants()))
def test_idefics2_config_reads_as_transformers_does(name):
    """The raw config.json and transformers' parsed view of it give the same config."""
    d = _idefics2_variants()[name]
    ours = from_hf_dict(d)
    assert ours == from_hf_dict(_as_transformers_reads_it(d))
    expected_eps = {"narrow_perceiver": 1e-5, "same_width_perceiver": 1e-3}.get(name, 1e-6)
    expected_window = {"window_off": None}.get(name, 4096)
    assert ours.connector.rms_norm_eps == expected_eps
    assert ours.text.sliding_window == expected_window


def test_idefics2_to_hf_dict_round_trips_through_transformers(tmp_path):
    """What we write, transformers saves back unchanged in meaning (perceiver keys, mistral text, v5 rope)."""
    from transformers import Idefics2Config

    for c in (PRESETS["idefics2-8b"], PRESETS["tiny-idefics2"]):
        d = to_hf_dict(c)
        assert from_hf_dict(d) == c
        assert d["text_config"]["model_type"] == "mistral" and "rope_parameters" in d["text_config"]
        d.pop("model_type"), d.pop("architectures")
        Idefics2Config(**d).save_pretrained(tmp_path)
        assert idefics_jax.from_hf_file(str(tmp_path)) == c
