"""The CPU fast path of decoding: the decoder's weights as the decode loop reads them best on XLA:CPU.

Elsewhere (accelerators, meshes) the loop reads the model's stacked weights as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.model import IdeficsModel, KVCache
from idefics_jax.quantize import QuantizedWeight


def _cpu_view(a: jax.Array, index=None, dtype=None) -> jax.Array | None:
    """A zero-copy view of a CPU array (a slice of it, or its bits as another dtype), or None if the runtime
    would copy."""
    host = np.asarray(a)  # zero-copy on the CPU
    view = host if index is None else host[index]
    view = view if dtype is None else view.view(dtype)
    out = jax.device_put(view)
    return out if np.shares_memory(np.asarray(out), host) else None


def on_cpu(arrays) -> bool:
    return all(isinstance(a, jax.Array) and len(a.devices()) == 1 and next(iter(a.devices())).platform == "cpu"
               for a in arrays)


def layer_weights(model: IdeficsModel):
    """The decoder weights as the decode loop reads them best on the CPU; None elsewhere (the stacked weights).

    XLA:CPU copies a layer's slice of a stacked weight before each matmul of a scan, which doubles a decode
    step's memory traffic: fp32 weights, and quantized weights with fp32 activations (whose codes the integer
    matmul reads as they are, see `_layers.matmul`), go in as a list of layers (zero-copy views), read in place.
    bf16 weights stay stacked but go in as uint16 bits: seeing bf16 matmul operands, XLA:CPU converts whole stacks
    to f32 once per call and streams the f32 copies; as bits they are converted a layer at a time inside the loop.
    Quantized weights with bf16 activations stay stacked the same way (bf16 leaves as bits).
    """
    stacked = model.text.layers.weights()
    arrays = jax.tree.leaves(stacked)
    if not on_cpu(arrays):
        return None
    floats = [a for a in arrays if jnp.issubdtype(a.dtype, jnp.floating)]
    if any(isinstance(w, QuantizedWeight) for w in stacked.values()) and any(a.itemsize < 4 for a in floats):
        views = jax.tree.map(lambda a: _cpu_view(a, dtype=np.uint16) if a.dtype == jnp.bfloat16 else a, stacked)
        return None if any(v is None for v in jax.tree.leaves(views, is_leaf=lambda v: v is None)) else views
    if all(a.dtype == jnp.bfloat16 for a in arrays):
        views = {n: _cpu_view(a, dtype=np.uint16) for n, a in stacked.items()}
        return None if any(v is None for v in views.values()) else views
    if any(a.itemsize < 4 for a in floats):
        return None
    L = model.config.text.num_layers
    groups = [jax.tree.map(lambda a: _cpu_view(a, i), stacked) for i in range(L)]
    return None if any(v is None for v in jax.tree.leaves(groups, is_leaf=lambda v: v is None)) else groups


def per_layer(cache: KVCache, lw) -> KVCache:
    """The cache as lists of per-layer arrays when the layers run one by one (updated in place, layer by layer)."""
    if not isinstance(lw, list):
        return cache
    split = lambda a: [a[i] for i in range(a.shape[0])]  # noqa: E731
    return KVCache(split(cache.k), split(cache.v))
