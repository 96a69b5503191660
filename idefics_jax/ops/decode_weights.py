"""The decoder's layers as a loop reads them: the one decode-weights type (`Layers`), made here (`decode_layers`)
and read only by the layer loop (`Layers.scan`).

Everywhere but a single CPU device the loop reads the stacked weights as they are (`StackedLayers`). XLA:CPU reads them
best in one of two other forms:
- `LayerList`: XLA:CPU copies a layer's slice of a stacked weight before each matmul of a scan, which doubles a
  decode step's memory traffic. fp32 weights, and quantized weights with fp32 activations (whose codes the integer
  matmul reads as they are), go in as a list of layers (zero-copy views), run one after the other and read in
  place; the KV cache is then a list of layers too.
- `BitsLayers`: seeing bf16 matmul operands, XLA:CPU converts whole stacks to f32 once per call and streams the f32
  copies. As uint16 bits they stay stacked and are turned back into bf16 a layer at a time inside the loop
  (quantized weights with bf16 activations likewise: their bf16 leaves as bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.ops.platform import on_one_cpu
from idefics_jax.ops.quantize import QuantizedWeight


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StackedLayers:
    """Weights of L layers stacked on a leading axis, run by one `lax.scan`; the KV cache stacked the same way."""

    weights: Any

    def scan(self, fn: Callable, carry, xs=None):
        """Runs `fn(carry, w, x) -> (carry, y)` over the layers (and per-layer `xs`, each y shaped as its x: the
        KV cache) -> (carry, ys)."""
        if xs is None:
            return jax.lax.scan(lambda c, w: fn(c, self._layer(w), None), carry, self.weights)

        # The stacked cache rides in the loop's carry and each layer writes its slice back into it: as the scan's
        # inputs and outputs it would be read whole and written whole into a second buffer at every decode step.
        def body(c, wi):
            h, stacked = c
            w, i = wi
            h, y = fn(h, self._layer(w), jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), stacked))
            stacked = jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, i, 0), stacked, y)
            return (h, stacked), None

        L = jax.tree.leaves(xs)[0].shape[0]
        (carry, ys), _ = jax.lax.scan(body, (carry, xs), (self.weights, jnp.arange(L)))
        return carry, ys

    def _layer(self, w):
        return w

    def lay_out(self, cache_L):
        """A stacked per-layer array (L, ...) as this loop carries it."""
        return cache_L

    def for_prefill(self) -> "StackedLayers | None":
        """What a prompt's prefill reads: these weights, or None for the model's own stacked ones."""
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BitsLayers(StackedLayers):
    """StackedLayers weights whose bf16 leaves are stored as their uint16 bits."""

    def _layer(self, w):
        return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a, w)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerList:
    """A list of L per-layer weight trees (no layer axis), run one after the other; per-layer `xs` and the cache
    are lists too."""

    weights: list

    def scan(self, fn: Callable, carry, xs=None):
        ys = []
        for i, w in enumerate(self.weights):
            carry, y = fn(carry, w, jax.tree.map(lambda a: a[i], xs, is_leaf=lambda a: isinstance(a, list)))
            ys.append(y)
        return carry, jax.tree.map(lambda *y: list(y), *ys)

    def lay_out(self, cache_L):
        if isinstance(cache_L, list):
            return cache_L
        return [cache_L[i] for i in range(cache_L.shape[0])]

    def for_prefill(self) -> None:
        # Prefill is compute-bound: it scans the stacked weights.
        return None


Layers = StackedLayers | LayerList


def _cpu_view(a: jax.Array, index=None, dtype=None) -> jax.Array | None:
    """A zero-copy view of a CPU array (a slice of it, or its bits as another dtype), or None if the runtime
    would copy."""
    host = np.asarray(a)  # zero-copy on the CPU
    view = host if index is None else host[index]
    view = view if dtype is None else view.view(dtype)
    out = jax.device_put(view)
    return out if np.shares_memory(np.asarray(out), host) else None


def _complete(tree) -> bool:
    return not any(v is None for v in jax.tree.leaves(tree, is_leaf=lambda v: v is None))


def decode_layers(stacked: dict) -> Layers:
    """The form the decode loop reads the decoder's stacked layer weights {name: (L, ...)} in (see the module
    docstring)."""
    arrays = jax.tree.leaves(stacked)
    if not on_one_cpu(arrays):
        return StackedLayers(stacked)
    floats = [a for a in arrays if jnp.issubdtype(a.dtype, jnp.floating)]
    quantized = any(isinstance(w, QuantizedWeight) for w in stacked.values())
    if (quantized and any(a.itemsize < 4 for a in floats)) or all(a.dtype == jnp.bfloat16 for a in arrays):
        views = jax.tree.map(lambda a: _cpu_view(a, dtype=np.uint16) if a.dtype == jnp.bfloat16 else a, stacked)
        return BitsLayers(views) if _complete(views) else StackedLayers(stacked)
    if any(a.itemsize < 4 for a in floats):
        return StackedLayers(stacked)
    L = arrays[0].shape[0]
    groups = [jax.tree.map(lambda a: _cpu_view(a, i), stacked) for i in range(L)]
    return LayerList(groups) if _complete(groups) else StackedLayers(stacked)
