"""Idefics2 connector: SwiGLU projection into the text width, then a Perceiver resampler to a fixed token count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax.model.config import ModelConfig, PerceiverConfig
from idefics_jax.model.layers import Stacked, attention_swiglu_spec, ones, param, rms_norm
from idefics_jax.ops.attention import Attention, Mask
from idefics_jax.ops.matmul import matmul

_ONES = jax.nn.initializers.ones


def _layer_spec(p: PerceiverConfig, D: int) -> dict:
    return {
        "latents_norm": ((D,), ("embed",), _ONES),
        "context_norm": ((D,), ("embed",), _ONES),
        **attention_swiglu_spec(D, p.num_heads, p.num_kv_heads, p.head_dim, 4 * D),
    }


def _swiglu(x, gate, up, down):
    h = jax.nn.silu(matmul("...D,DF->...F", x, gate)) * matmul("...D,DF->...F", x, up)
    return matmul("...F,FD->...D", h, down)


class PerceiverConnector(nnx.Module):
    """Vision states (I, S, Dv) and their patch mask (I, S) -> `num_latents` image tokens (I, T, D) per image."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attention: Attention = Attention()):
        p = c.connector
        self.config = p
        self.attention = attention
        Dv, D, F = c.vision.hidden_size, c.text.hidden_size, c.text.intermediate_size
        self.gate = param(rngs, (Dv, F), ("embed", "mlp"), dtype=dtype, fan_in=1)
        self.up = param(rngs, (Dv, F), ("embed", "mlp"), dtype=dtype, fan_in=1)
        self.down = param(rngs, (F, D), ("mlp", "embed"), dtype=dtype, fan_in=1)
        self.latents = param(rngs, (p.num_latents, D), (None, "embed"), dtype=dtype)
        self.layers = Stacked(p.depth, _layer_spec(p, D), rngs=rngs, dtype=dtype)
        self.norm = ones(rngs, (D,), ("embed",), dtype)

    def __call__(self, x_ISD, mask_IS):
        p = self.config
        eps = p.rms_norm_eps
        context = _swiglu(x_ISD, self.gate[...], self.up[...], self.down[...])
        I, S, D = context.shape
        T = p.num_latents
        latents = jnp.broadcast_to(self.latents[...].astype(context.dtype), (I, T, D))
        # The latents are keys too (attention runs over [context; latents]), so they are never masked.
        keys_valid = jnp.concatenate([mask_IS.astype(bool), jnp.ones((I, T), bool)], axis=1)
        mask = Mask.keys(keys_valid, T)

        def layer(lat_ITD, w, _):
            lat_normed = rms_norm(lat_ITD, w["latents_norm"], eps)
            # Each layer norms the same projected features afresh: only the latents are carried between layers.
            ctx_normed = rms_norm(context, w["context_norm"], eps)
            kv_in = jnp.concatenate([ctx_normed, lat_normed], axis=1)
            q = matmul("ITD,DNH->ITNH", lat_normed, w["q"])
            k = matmul("ISD,DKH->ISKH", kv_in, w["k"])
            v = matmul("ISD,DKH->ISKH", kv_in, w["v"])
            lat_ITD = lat_ITD + matmul("ITNH,NHD->ITD", self.attention(q, k, v, mask), w["o"])
            h = rms_norm(lat_ITD, w["mlp_norm"], eps)
            return lat_ITD + _swiglu(h, w["gate"], w["up"], w["down"]), None

        latents, _ = self.layers.loop().scan(layer, latents)
        return rms_norm(latents, self.norm[...], eps)
