"""Shared building blocks: parameters with their logical axes, stacked layers, remat, norms, rotary embeddings.

Axis legend for every einsum and `x_XYZ` name in this package:
  B batch, I images, T query tokens, S key/source tokens, D model width, N query heads, K kv heads,
  G query heads per kv head, H head dim, F mlp width, V vocab, L layers, P patches per side;
  merged: E = N*H, X = B*K, Q = G*T.
"""

# Why a layer is a function over a dict of stacked weights (`Stacked`, run by a `Layers` loop), not an NNX module
# stacked with nnx.scan / nnx.vmap:
# - The flat paths ("text/layers/q") are a contract: the converter's name map, LoRA targets, weight decay's fan-in,
#   the training step's path-keyed parameter dicts and saved Orbax checkpoints all use them; modules would rename
#   them (".../attn/q/kernel") and orphan existing checkpoints.
# - One layer function takes every form of the weights without a second code path: the stacked arrays, training's
#   dicts with LoRA merged in, and the decode loop's forms of them (`ops.decode_weights`: per-layer zero-copy views
#   or bf16 bits on the CPU), which as module state would need a split/merge per layer and step; quantized weights
#   slot in the same way.
# - nnx.scan would lower to the same single lax.scan (compile time flat in depth): the change would be syntax only.

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.model.config import RopeConfig
from idefics_jax.ops.decode_weights import StackedLayers

Axes = Sequence[str | None]


def normal(std: float = 0.02):
    return jax.nn.initializers.normal(std)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, init=None, dtype=jnp.float32,
          fan_in: int | None = None) -> nnx.Param:
    """A parameter with its logical axis names (mapped to mesh axes by `idefics_jax.model.sharding`).

    fan_in: for a matmul weight, how many of its leading (non-layer) dimensions are contracted with the input
    (`o` (N, H, D): 2); None for everything else. Weight decay and LoRA read it (see `matmul_fan_in`).
    """
    assert len(shape) == len(axes), (shape, axes)
    init = init or normal()
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes), fan_in=fan_in)


def ones(rngs: nnx.Rngs, shape, axes, dtype=jnp.float32) -> nnx.Param:
    return param(rngs, shape, axes, jax.nn.initializers.ones, dtype)


def zeros(rngs: nnx.Rngs, shape, axes, dtype=jnp.float32) -> nnx.Param:
    return param(rngs, shape, axes, jax.nn.initializers.zeros, dtype)


class Stacked(nnx.Module):
    """Parameters of `L` identical layers, stacked on a leading `layers` axis so one `lax.scan` runs them.

    `spec` maps a name to (per-layer shape, logical axes, init[, fan_in]) (see `param`).
    """

    def __init__(self, num_layers: int, spec: dict, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self._names = tuple(spec)
        for name, (shape, axes, init, *fan_in) in spec.items():
            setattr(self, name, param(rngs, (num_layers, *shape), ("layers", *axes), init, dtype, *fan_in))

    def weights(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n)[...] for n in self._names}

    def loop(self) -> StackedLayers:
        """These layers as the layer loop runs them (`lax.scan` over the layer axis)."""
        return StackedLayers(self.weights())


def attention_swiglu_spec(D: int, N: int, K: int, H: int, F: int) -> dict:
    """`Stacked` spec of a pre-norm GQA attention + SwiGLU MLP layer (decoder and perceiver alike)."""
    w = normal()
    return {
        "q": ((D, N, H), ("embed", "heads", "head_dim"), w, 1),
        "k": ((D, K, H), ("embed", "kv_heads", "head_dim"), w, 1),
        "v": ((D, K, H), ("embed", "kv_heads", "head_dim"), w, 1),
        "o": ((N, H, D), ("heads", "head_dim", "embed"), w, 2),
        "mlp_norm": ((D,), ("embed",), jax.nn.initializers.ones),
        "gate": ((D, F), ("embed", "mlp"), w, 1),
        "up": ((D, F), ("embed", "mlp"), w, 1),
        "down": ((F, D), ("mlp", "embed"), w, 1),
    }


REMAT = ("none", "full", "matmuls")


def checkpointed(fn: Callable, remat: str) -> Callable:
    """`fn` with its activations recomputed in the backward pass: remat "full" keeps only its inputs; "matmuls"
    also keeps the matmul outputs (recomputes norms, activations, softmax); "none" keeps everything."""
    if remat == "none":
        return fn
    if remat == "full":
        return jax.checkpoint(fn)
    if remat == "matmuls":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat '{remat}' is not one of {', '.join(REMAT)}")


def rms_norm(x, w, eps: float):
    # fp32 statistics, cast back before the weight, as in the reference.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def layer_norm(x, w, b, eps: float):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # the two-pass form, not E[x^2] - E[x]^2
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies (H/2,), float32, with llama3 scaling when configured."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if rope.type == "llama3":
        orig, lo, hi = rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor
        factor = rope.factor
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = orig / lo, orig / hi
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        mid = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)
    return inv


def apply_rope(x_BTNH, pos_BT, inv_freq):
    """Half-split ("rotate_half") rotary embedding; angles in fp32, applied in the input dtype."""
    ang = pos_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
    cos = jnp.cos(ang).astype(x_BTNH.dtype)[:, :, None, :]
    sin = jnp.sin(ang).astype(x_BTNH.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
