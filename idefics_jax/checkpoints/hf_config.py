"""HF `config.json` (transformers 4.x and 5.x spellings) and `generation_config.json` <-> our frozen configs."""

from __future__ import annotations

import json
import os
from typing import Any

from idefics_jax.model.config import (ConfigError, GenerationDefaults, ModelConfig, PerceiverConfig, PixelShuffleConfig,
                                RopeConfig, TextConfig, VisionConfig)
from idefics_jax.checkpoints.paths import as_path

_SUPPORTED = ("idefics3", "smolvlm", "idefics2")


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where} has no '{key}'")
    return d[key]


def _rope_from_hf(t: dict) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x writes `rope_theta` + `rope_scaling`.
    params = dict(t.get("rope_parameters") or {})
    scaling = t.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", t.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "llama3"):
        raise ConfigError(f"text_config rope type '{kind}' is not supported (supported: default, llama3)")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta),
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _text_from_hf(t: dict, model_type: str) -> TextConfig:
    w = "text_config"
    hidden = int(_need(t, "hidden_size", w))
    heads = int(_need(t, "num_attention_heads", w))
    default_eps = 1e-6 if model_type == "idefics2" else 1e-5
    # Idefics2's decoder is Mistral, whose class default window (4096) applies when the key is absent; an
    # explicit null turns the window off. Llama has no window.
    is_mistral = t.get("model_type") == "mistral" or (model_type == "idefics2" and "model_type" not in t)
    window = t.get("sliding_window", 4096) if is_mistral else None
    return TextConfig(
        vocab_size=int(_need(t, "vocab_size", w)),
        hidden_size=hidden,
        intermediate_size=int(_need(t, "intermediate_size", w)),
        num_layers=int(_need(t, "num_hidden_layers", w)),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=int(t.get("head_dim") or hidden // heads),
        rms_norm_eps=float(t.get("rms_norm_eps", default_eps)),
        max_position_embeddings=int(t.get("max_position_embeddings", 4096)),
        rope=_rope_from_hf(t),
        sliding_window=int(window) if window else None,
    )


def _vision_from_hf(v: dict, model_type: str) -> VisionConfig:
    w = "vision_config"
    return VisionConfig(
        hidden_size=int(_need(v, "hidden_size", w)),
        intermediate_size=int(_need(v, "intermediate_size", w)),
        num_layers=int(_need(v, "num_hidden_layers", w)),
        num_heads=int(_need(v, "num_attention_heads", w)),
        image_size=int(_need(v, "image_size", w)),
        patch_size=int(_need(v, "patch_size", w)),
        num_channels=int(v.get("num_channels", 3)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        patch_valid_if_all_pixels=model_type == "idefics2",
    )


def from_hf_dict(d: dict) -> ModelConfig:
    """Builds the config from a parsed HF `config.json`. Raises ConfigError naming what is wrong."""
    if not isinstance(d, dict):
        raise ConfigError("config.json is not a JSON object")
    mt = d.get("model_type")
    if mt not in _SUPPORTED:
        raise ConfigError(f"model_type '{mt}' is not supported (supported: {', '.join(_SUPPORTED)})")
    t, v = _need(d, "text_config", "config.json"), _need(d, "vision_config", "config.json")
    text, vision = _text_from_hf(t, mt), _vision_from_hf(v, mt)
    if mt == "idefics2":
        p = d.get("perceiver_config") or {}
        # The reference takes the text model's width and eps only when the perceiver's own width (default 4096)
        # differs from it; otherwise the perceiver keeps its own eps (default 1e-6), e.g. 1e-6 beside the text's
        # 1e-5 in Idefics2-8b.
        if int(p.get("hidden_size", 4096)) != text.hidden_size:
            perceiver_eps = text.rms_norm_eps
        else:
            perceiver_eps = float(p.get("rms_norm_eps", 1e-6))
        connector: PixelShuffleConfig | PerceiverConfig = PerceiverConfig(
            num_latents=int(p.get("resampler_n_latents", 64)),
            depth=int(p.get("resampler_depth", 3)),
            num_heads=int(p.get("resampler_n_heads", 16)),
            head_dim=int(p.get("resampler_head_dim", 96)),
            num_kv_heads=int(p.get("num_key_value_heads", 4)),
            rms_norm_eps=perceiver_eps,
        )
        default_image_token = 32001
    else:
        connector = PixelShuffleConfig(scale_factor=int(d.get("scale_factor", 2)))
        default_image_token = 128257
    return ModelConfig(
        model_type=mt,
        vision=vision,
        text=text,
        connector=connector,
        image_token_id=int(d.get("image_token_id", default_image_token)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def from_hf_file(path: str) -> ModelConfig:
    """Reads `path` (a config.json, or a directory holding one; local or in a bucket)."""
    p = as_path(path)
    if p.is_dir():
        p, path = p / "config.json", os.path.join(os.fspath(path), "config.json")
    if not p.exists():
        raise ConfigError(f"{path}: missing")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: malformed value ({e})") from None


def to_hf_dict(c: ModelConfig) -> dict:
    """The transformers 5 `config.json` for `c` (what `export` writes when no original is at hand)."""
    t = c.text
    rope: dict[str, Any] = {"rope_type": t.rope.type, "rope_theta": t.rope.theta}
    if t.rope.type == "llama3":
        rope.update(
            factor=t.rope.factor,
            low_freq_factor=t.rope.low_freq_factor,
            high_freq_factor=t.rope.high_freq_factor,
            original_max_position_embeddings=t.rope.original_max_position_embeddings,
        )
    text = {
        "model_type": "mistral" if c.model_type == "idefics2" else "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": c.tie_word_embeddings,
    }
    if c.model_type == "idefics2":
        text["sliding_window"] = t.sliding_window
    v = c.vision
    vision = {
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
    }
    out: dict[str, Any] = {
        "model_type": c.model_type,
        "architectures": [
            "Idefics2ForConditionalGeneration" if c.model_type == "idefics2" else
            "SmolVLMForConditionalGeneration" if c.model_type == "smolvlm" else "Idefics3ForConditionalGeneration"
        ],
        "image_token_id": c.image_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "text_config": text,
        "vision_config": vision,
    }
    if isinstance(c.connector, PixelShuffleConfig):
        out["scale_factor"] = c.connector.scale_factor
    else:
        p = c.connector
        out["perceiver_config"] = {
            "resampler_n_latents": p.num_latents,
            "resampler_depth": p.depth,
            "resampler_n_heads": p.num_heads,
            "resampler_head_dim": p.head_dim,
            "num_key_value_heads": p.num_kv_heads,
            "hidden_size": t.hidden_size,
            "rms_norm_eps": p.rms_norm_eps,
            "hidden_act": "silu",
        }
    return out


def read_generation_defaults(path: str) -> GenerationDefaults:
    """Reads `generation_config.json` in `path`; without one, the ids in `config.json` (its text config first), as
    transformers derives a generation config from the model config."""
    gen, cfg = as_path(path) / "generation_config.json", as_path(path) / "config.json"
    if gen.exists():
        d = json.loads(gen.read_text())
    elif cfg.exists():
        top = json.loads(cfg.read_text())
        d = {**top, **(top.get("text_config") or {})}
    else:
        return GenerationDefaults()
    eos = d.get("eos_token_id")
    eos = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
    pad = d.get("pad_token_id")
    return GenerationDefaults(eos, None if pad is None else int(pad))
