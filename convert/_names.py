"""HF checkpoint names <-> our parameter paths: a declarative map plus four small per-tensor transforms.

Our Linear weights are (in..., out...) with heads split out; HF Linear weights are (out, in); HF's conv is OIHW.
Per-layer HF tensors ({i}) fill slot i of our stacked (L, ...) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from idefics_jax.model.config import ModelConfig, PerceiverConfig, PixelShuffleConfig


@dataclass(frozen=True)
class Linear:
    """HF (out, in) <-> ours (*in_dims, *out_dims), `n_in` leading dims being the input."""

    n_in: int

    def hf_shape(self, t):
        return (prod(t[self.n_in:]), prod(t[: self.n_in]))

    def to_ours(self, x, t):
        return x.T.reshape(t)

    def to_hf(self, y):
        return y.reshape(prod(y.shape[: self.n_in]), -1).T


@dataclass(frozen=True)
class Conv:
    """HF OIHW <-> ours (C, p, p, D)."""

    def hf_shape(self, t):
        return (t[3], t[0], t[1], t[2])

    def to_ours(self, x, t):
        return x.transpose(1, 2, 3, 0)

    def to_hf(self, y):
        return y.transpose(3, 0, 1, 2)


@dataclass(frozen=True)
class Flat:
    """HF flat bias (N*H,) <-> ours (N, H)."""

    def hf_shape(self, t):
        return (prod(t),)

    def to_ours(self, x, t):
        return x.reshape(t)

    def to_hf(self, y):
        return y.reshape(-1)


@dataclass(frozen=True)
class Same:
    def hf_shape(self, t):
        return tuple(t)

    def to_ours(self, x, t):
        return x

    def to_hf(self, y):
        return y


IN, IN2, CONV, FLAT, SAME = Linear(1), Linear(2), Conv(), Flat(), Same()

_VIS = "model.vision_model."
_VL = _VIS + "encoder.layers.{i}."
VISION = [
    (_VIS + "embeddings.patch_embedding.weight", "vision/patch_embed", CONV),
    (_VIS + "embeddings.patch_embedding.bias", "vision/patch_bias", SAME),
    (_VIS + "embeddings.position_embedding.weight", "vision/pos_embed", SAME),
    (_VL + "layer_norm1.weight", "vision/layers/ln1_scale", SAME),
    (_VL + "layer_norm1.bias", "vision/layers/ln1_bias", SAME),
    *[(_VL + f"self_attn.{p}_proj.weight", f"vision/layers/{p}", IN) for p in "qkv"],
    *[(_VL + f"self_attn.{p}_proj.bias", f"vision/layers/{p}_bias", FLAT) for p in "qkv"],
    (_VL + "self_attn.out_proj.weight", "vision/layers/o", IN2),
    (_VL + "self_attn.out_proj.bias", "vision/layers/o_bias", SAME),
    (_VL + "layer_norm2.weight", "vision/layers/ln2_scale", SAME),
    (_VL + "layer_norm2.bias", "vision/layers/ln2_bias", SAME),
    (_VL + "mlp.fc1.weight", "vision/layers/fc1", IN),
    (_VL + "mlp.fc1.bias", "vision/layers/fc1_bias", SAME),
    (_VL + "mlp.fc2.weight", "vision/layers/fc2", IN),
    (_VL + "mlp.fc2.bias", "vision/layers/fc2_bias", SAME),
    (_VIS + "post_layernorm.weight", "vision/post_ln_scale", SAME),
    (_VIS + "post_layernorm.bias", "vision/post_ln_bias", SAME),
]



def _attention_and_swiglu(hf_layer: str, ours: str) -> list:
    """The GQA attention and SwiGLU MLP weights of a decoder or perceiver layer (same HF names in both)."""
    return [
        *[(hf_layer + f"self_attn.{p}_proj.weight", f"{ours}/{p}", IN) for p in "qkv"],
        (hf_layer + "self_attn.o_proj.weight", f"{ours}/o", IN2),
        (hf_layer + "post_attention_layernorm.weight", f"{ours}/mlp_norm", SAME),
        *[(hf_layer + f"mlp.{p}_proj.weight", f"{ours}/{p}", IN) for p in ("gate", "up", "down")],
    ]


_TL = "model.text_model.layers.{i}."
TEXT = [
    ("model.text_model.embed_tokens.weight", "text/embed", SAME),
    (_TL + "input_layernorm.weight", "text/layers/attn_norm", SAME),
    *_attention_and_swiglu(_TL, "text/layers"),
    ("model.text_model.norm.weight", "text/norm", SAME),
]

LM_HEAD = [("lm_head.weight", "lm_head", IN)]

PIXEL_SHUFFLE = [("model.connector.modality_projection.proj.weight", "connector/proj", IN)]

_PR = "model.connector.perceiver_resampler."
_PL = _PR + "layers.{i}."
PERCEIVER = [
    *[(f"model.connector.modality_projection.{p}_proj.weight", f"connector/{p}", IN) for p in ("gate", "up", "down")],
    (_PR + "latents", "connector/latents", SAME),
    (_PL + "input_latents_norm.weight", "connector/layers/latents_norm", SAME),
    (_PL + "input_context_norm.weight", "connector/layers/context_norm", SAME),
    *_attention_and_swiglu(_PL, "connector/layers"),
    (_PR + "norm.weight", "connector/norm", SAME),
]

# The connector's rules, chosen by the type of its config.
CONNECTOR_RULES: dict[type, list] = {PixelShuffleConfig: PIXEL_SHUFFLE, PerceiverConfig: PERCEIVER}


def _rules(config: ModelConfig) -> list:
    return VISION + CONNECTOR_RULES[type(config.connector)] + TEXT + ([] if config.tie_word_embeddings else LM_HEAD)


@dataclass(frozen=True)
class Entry:
    hf_key: str
    path: str
    layer: int | None  # slot in the stacked array, or None
    transform: object
    hf_shape: tuple[int, ...]


def entries(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Entry]:
    """Every HF key the model needs -> where it goes. `shapes` are our parameter shapes by path."""
    rules = _rules(config)
    out = {}
    for hf, path, tr in rules:
        shape = shapes[path]
        if "{i}" in hf:
            for i in range(shape[0]):
                out[hf.format(i=i)] = Entry(hf.format(i=i), path, i, tr, tr.hf_shape(shape[1:]))
        else:
            out[hf] = Entry(hf, path, None, tr, tr.hf_shape(shape))
    missing = set(shapes) - {path for _, path, _ in rules}
    assert not missing, f"parameters without a name rule: {sorted(missing)}"
    return out


def transforms(config: ModelConfig) -> dict[str, object]:
    """Our parameter path -> its transform: Linear / Conv ones are matmul weights, Same / Flat ones are not."""
    return {path: tr for _, path, tr in _rules(config)}


def to_ours(entry: Entry, x: np.ndarray, target_shape) -> np.ndarray:
    t = target_shape[1:] if entry.layer is not None else target_shape
    return entry.transform.to_ours(x, t)
