"""Idefics3 / SmolVLM connector: pixel shuffle, then one projection into the text width."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from idefics_jax.model.config import ModelConfig
from idefics_jax.model.layers import param
from idefics_jax.ops.matmul import matmul


def pixel_shuffle(x_ISD, s: int):
    """(I, S, D) -> (I, S/s^2, D*s^2), the reference's reshape order ("b (h s1 w s2) d -> b (h w) (s1 s2 d)")."""
    I, S, D = x_ISD.shape
    side = int(round(S**0.5))
    x = x_ISD.reshape(I, side, side // s, D * s)
    x = x.transpose(0, 2, 1, 3).reshape(I, side // s, side // s, D * s * s)
    return x.transpose(0, 2, 1, 3).reshape(I, S // (s * s), D * s * s)


class PixelShuffleConnector(nnx.Module):
    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.scale_factor = c.connector.scale_factor
        d_in = c.vision.hidden_size * self.scale_factor**2
        self.proj = param(rngs, (d_in, c.text.hidden_size), ("mlp", "embed"), dtype=dtype, fan_in=1)

    def __call__(self, x_ISD, mask_IS):
        """Vision states (I, S, Dv) and their patch mask (I, S) -> image tokens (I, S/s^2, D); every patch is
        kept (padding patches' tokens are never read: their image's rows are)."""
        return matmul("ISF,FD->ISD", pixel_shuffle(x_ISD, self.scale_factor), self.proj[...])
