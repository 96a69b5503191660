"""Llama / Mistral decoder: pre-RMSNorm, GQA with RoPE, SwiGLU; layers stacked and scanned."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax.model.config import TextConfig
from idefics_jax.model.layers import (Stacked, apply_rope, attention_swiglu_spec, checkpointed, ones, param, rms_norm,
                                       rope_inv_freq)
from idefics_jax.ops.attention import Attention, Mask
from idefics_jax.ops.decode_weights import Layers
from idefics_jax.ops.matmul import matmul
from idefics_jax.model.sharding import Partitioning, constrain

_ONES = jax.nn.initializers.ones


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, preallocated to S slots: k, v (L, B, K, S, H), or lists of L arrays
    (B, K, S, H) when the layer loop runs the layers one by one (`ops.decode_weights.LayerList`). Heads before
    slots: attention contracts each head's (S, H) block as it lies (with slots first, XLA:CPU copies the whole
    cache into that order at every decode step)."""

    k: jax.Array
    v: jax.Array

    AXES = ("layers", "batch", "kv_heads", None, "head_dim")

    @classmethod
    def zeros(cls, c: TextConfig, batch: int, slots: int, dtype, partitioning: Partitioning | None = None) -> "KVCache":
        """With `partitioning`, allocated sharded (batch over data/fsdp, kv heads over tensor) on its mesh."""
        shape = (c.num_layers, batch, c.num_kv_heads, slots, c.head_dim)
        where = partitioning.sharding(cls.AXES, shape) if partitioning else None
        return cls(jnp.zeros(shape, dtype, device=where), jnp.zeros(shape, dtype, device=where))

    def laid_out(self, layers: Layers) -> "KVCache":
        """This cache as `layers`' loop carries it (stacked, or a list of layers)."""
        return KVCache(layers.lay_out(self.k), layers.lay_out(self.v))


def _layer_spec(c: TextConfig) -> dict:
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return {"attn_norm": ((D,), ("embed",), _ONES), **attention_swiglu_spec(D, N, K, H, F)}


def causal_mask(attention_mask_BS, sliding_window: int | None = None):
    """(B, S) key validity -> (B, S, S): causal, valid keys only, and within the window if one is set."""
    S = attention_mask_BS.shape[1]
    q, k = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed[None] & attention_mask_BS[:, None, :].astype(bool)


class Decoder(nnx.Module):
    def __init__(self, c: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, partitioning: Partitioning | None = None,
                 attention: Attention = Attention()):
        self.config = c
        self.partitioning = partitioning
        self.attention = attention
        self.embed = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dtype=dtype)
        self.layers = Stacked(c.num_layers, _layer_spec(c), rngs=rngs, dtype=dtype)
        self.norm = ones(rngs, (c.hidden_size,), ("embed",), dtype)

    def __call__(self, x_BTD, pos_BT, mask: Mask | jax.Array, cache: KVCache | None = None, cache_index=None,
                 remat: str = "none", layers: Layers | None = None):
        """Runs all layers on embeddings (B, T, D).

        Without a cache, keys are the T tokens themselves and `mask` a `Mask` (or (B, T, T) bool). With a cache,
        the new keys and values are written at slots [cache_index, cache_index + T) and `mask` covers all S slots
        (a (B, T, S) bool array unless S == T). `layers`: the layer loop over this module's weights in another form
        (`ops.decode_weights.decode_layers`); default their stacked form.
        Returns the final-normed hidden states (B, T, D) and the updated cache (or None).
        """
        c = self.config
        inv_freq = rope_inv_freq(c.rope, c.head_dim)
        # Batch over data/fsdp, heads and MLP width over tensor; the residual stream is whole on each tensor shard.
        shard = lambda x, *axes: constrain(x, axes, self.partitioning)  # noqa: E731
        x_BTD = shard(x_BTD, "batch", None, None)

        def layer(x, w, kv):
            h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            heads, kv_heads = ("batch", None, "heads", None), ("batch", None, "kv_heads", None)
            q = shard(apply_rope(matmul("BTD,DNH->BTNH", h, w["q"]), pos_BT, inv_freq), *heads)
            k = shard(apply_rope(matmul("BTD,DKH->BTKH", h, w["k"]), pos_BT, inv_freq), *kv_heads)
            v = shard(matmul("BTD,DKH->BTKH", h, w["v"]), *kv_heads)
            if kv is not None:
                start = (0, 0, cache_index, 0)
                put = lambda c, x: jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), start)  # noqa: E731
                kv = (shard(put(kv[0], k), *KVCache.AXES[1:]), shard(put(kv[1], v), *KVCache.AXES[1:]))
                k, v = (jnp.swapaxes(x, 1, 2) for x in kv)  # attention's (B, S, K, H); undone inside, not copied
            o = self.attention(q, k, v, mask)
            o = matmul("BTNH,NHD->BTD", o, w["o"])  # one (N*H)-wide contraction (see matmul)
            x = shard(x + o, "batch", None, None)
            h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
            h = jax.nn.silu(matmul("BTD,DF->BTF", h, w["gate"])) * matmul("BTD,DF->BTF", h, w["up"])
            h = shard(h, "batch", None, "mlp")
            return shard(x + matmul("BTF,FD->BTD", h, w["down"]), "batch", None, None), kv

        kv_in = None if cache is None else (cache.k, cache.v)
        layers = self.layers.loop() if layers is None else layers
        x, kv_out = layers.scan(checkpointed(layer, remat), x_BTD, kv_in)
        new_cache = None if cache is None else KVCache(*kv_out)
        return rms_norm(x, self.norm[...], c.rms_norm_eps), new_cache
