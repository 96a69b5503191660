"""SigLIP vision encoder with NaViT-style position ids from the patch mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.model.config import VisionConfig
from idefics_jax.model.layers import Stacked, checkpointed, layer_norm, normal, ones, param, zeros
from idefics_jax.ops.attention import Attention, Mask
from idefics_jax.ops.matmul import matmul
from idefics_jax.model.sharding import Partitioning, constrain

_ONES, _ZEROS = jax.nn.initializers.ones, jax.nn.initializers.zeros


def _layer_spec(c: VisionConfig) -> dict:
    # SigLIP's own initialisation (Xavier for the matmuls; see VisionEncoder): it only matters when training from
    # scratch (loaded checkpoints replace it), and there the flat 0.02 leaves a ViT stuck for thousands of steps.
    D, F, N, H = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim
    attn, mlp = normal((2 / (D + N * H)) ** 0.5), normal((2 / (D + F)) ** 0.5)
    return {
        "ln1_scale": ((D,), ("embed",), _ONES), "ln1_bias": ((D,), ("embed",), _ZEROS),
        "q": ((D, N, H), ("embed", "heads", "head_dim"), attn, 1), "q_bias": ((N, H), ("heads", "head_dim"), _ZEROS),
        "k": ((D, N, H), ("embed", "heads", "head_dim"), attn, 1), "k_bias": ((N, H), ("heads", "head_dim"), _ZEROS),
        "v": ((D, N, H), ("embed", "heads", "head_dim"), attn, 1), "v_bias": ((N, H), ("heads", "head_dim"), _ZEROS),
        "o": ((N, H, D), ("heads", "head_dim", "embed"), attn, 2), "o_bias": ((D,), ("embed",), _ZEROS),
        "ln2_scale": ((D,), ("embed",), _ONES), "ln2_bias": ((D,), ("embed",), _ZEROS),
        "fc1": ((D, F), ("embed", "mlp"), mlp, 1), "fc1_bias": ((F,), ("mlp",), _ZEROS),
        "fc2": ((F, D), ("mlp", "embed"), mlp, 1), "fc2_bias": ((D,), ("embed",), _ZEROS),
    }


def _layer(eps: float, partitioning: Partitioning | None, attention: Attention):
    # Images over data/fsdp (they are the batch here), heads and MLP width over tensor.
    shard = lambda x, *axes: constrain(x, axes, partitioning)  # noqa: E731

    def fn(x_ISD, w, mask: Mask):
        h = layer_norm(x_ISD, w["ln1_scale"], w["ln1_bias"], eps)
        q = shard(matmul("ISD,DNH->ISNH", h, w["q"]) + w["q_bias"], "batch", None, "heads", None)
        k = shard(matmul("ISD,DNH->ISNH", h, w["k"]) + w["k_bias"], "batch", None, "heads", None)
        v = shard(matmul("ISD,DNH->ISNH", h, w["v"]) + w["v_bias"], "batch", None, "heads", None)
        a = attention(q, k, v, mask)
        x_ISD = shard(x_ISD + matmul("ISNH,NHD->ISD", a, w["o"]) + w["o_bias"], "batch", None, None)
        h = layer_norm(x_ISD, w["ln2_scale"], w["ln2_bias"], eps)
        h = jax.nn.gelu(matmul("ISD,DF->ISF", h, w["fc1"]) + w["fc1_bias"], approximate=True)
        h = shard(h, "batch", None, "mlp")
        return shard(x_ISD + matmul("ISF,FD->ISD", h, w["fc2"]) + w["fc2_bias"], "batch", None, None)

    return fn


def patch_mask(pixel_mask_IHW, patch: int, all_pixels: bool):
    """Pixel validity (I, H, W) -> patch validity (I, H/p, W/p); leftover pixels are dropped."""
    I, Hp, Wp = pixel_mask_IHW.shape[0], pixel_mask_IHW.shape[1] // patch, pixel_mask_IHW.shape[2] // patch
    m = pixel_mask_IHW[:, : Hp * patch, : Wp * patch].reshape(I, Hp, patch, Wp, patch).astype(jnp.int32)
    count = m.sum(axis=(2, 4))
    return count == patch * patch if all_pixels else count > 0


def position_ids(mask_IPP, n: int):
    """NaViT position ids: each valid patch's fractional coordinate bucketed into the n x n table.

    Float32 throughout, with searchsorted(side='right'), to match the reference bit for bit.
    """
    boundaries = jnp.asarray((np.arange(1, n) / n).astype(np.float32))

    def bucket(length, valid_count):
        frac = jnp.arange(length, dtype=jnp.float32)[None] * (1.0 / valid_count.astype(jnp.float32))[:, None]
        frac = jnp.minimum(frac, jnp.float32(1.0 - 1e-6))
        return jnp.searchsorted(boundaries, frac, side="right")

    I, Ph, Pw = mask_IPP.shape
    bh = bucket(Ph, mask_IPP[:, :, 0].sum(axis=1))
    bw = bucket(Pw, mask_IPP[:, 0, :].sum(axis=1))
    pos = (bh[:, :, None] * n + bw[:, None, :]).reshape(I, -1)
    return jnp.where(mask_IPP.reshape(I, -1), pos, 0)


class VisionEncoder(nnx.Module):
    def __init__(self, c: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, partitioning: Partitioning | None = None,
                 attention: Attention = Attention()):
        self.config = c
        self.partitioning = partitioning
        self.attention = attention
        D, p, n = c.hidden_size, c.patch_size, c.patches_per_side
        # LeCun normal for the patch projection, 1/sqrt(D) for positions: position signals as strong as content
        # ones, so attention can learn locality (shape) and not just pool colour.
        fan_in = c.num_channels * p * p
        self.patch_embed = param(rngs, (c.num_channels, p, p, D), (None, None, None, "embed"),
                                 normal(fan_in**-0.5), dtype, fan_in=3)  # a matmul over (C, p, p) patches
        self.patch_bias = zeros(rngs, (D,), ("embed",), dtype)
        self.pos_embed = param(rngs, (n * n, D), (None, "embed"), normal(D**-0.5), dtype)
        self.layers = Stacked(c.num_layers, _layer_spec(c), rngs=rngs, dtype=dtype)
        self.post_ln_scale = ones(rngs, (D,), ("embed",), dtype)
        self.post_ln_bias = zeros(rngs, (D,), ("embed",), dtype)

    def __call__(self, pixels_ICHW, mask_IPP, remat: str = "none"):
        """pixels (I, C, H, W) normalised; mask (I, H/p, W/p) valid patches -> hidden states (I, S, D)."""
        c = self.config
        p = c.patch_size
        I, C, Hpx, Wpx = pixels_ICHW.shape
        Ph, Pw = Hpx // p, Wpx // p
        x = pixels_ICHW[:, :, : Ph * p, : Pw * p].reshape(I, C, Ph, p, Pw, p).astype(self.patch_embed.dtype)
        x = jnp.einsum("ICYpXq,CpqD->IYXD", x, self.patch_embed[...]) + self.patch_bias[...]
        x = x.reshape(I, Ph * Pw, -1)
        pos_embed = constrain(self.pos_embed[...], (None, None), self.partitioning)  # whole, as for the text embeddings
        x = x + jnp.take(pos_embed, position_ids(mask_IPP, c.patches_per_side), axis=0)
        x = constrain(x, ("batch", None, None), self.partitioning)
        key_mask = Mask.keys(mask_IPP.reshape(I, -1), Ph * Pw)
        layer = _layer(c.layer_norm_eps, self.partitioning, self.attention)
        x, _ = self.layers.loop().scan(checkpointed(lambda x, w, _: (layer(x, w, key_mask), None), remat), x)
        return layer_norm(x, self.post_ln_scale[...], self.post_ln_bias[...], c.layer_norm_eps)
