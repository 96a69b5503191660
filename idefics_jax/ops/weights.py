"""What other layers ask of a weight without knowing how it is stored: an array, a `QuantizedWeight` or an
`AdaptedWeight` (QLoRA). Each question is answered here by the weight's type, so nothing outside ops/ branches on
the representation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from idefics_jax.ops.quantize import AdaptedWeight, QuantizedWeight

WRAPPERS = (QuantizedWeight, AdaptedWeight)


def is_leaf(x) -> bool:
    """For tree maps over parameters: a wrapped weight is one leaf, not its codes and scales."""
    return isinstance(x, WRAPPERS)


@functools.singledispatch
def dense(w, dtype=jnp.float32):
    """The weight as one full-precision array: an array as it is; a quantized one dequantized to `dtype`."""
    return w


@dense.register(QuantizedWeight)
@dense.register(AdaptedWeight)
def _(w, dtype=jnp.float32):
    return w.dequantize(dtype)


@functools.singledispatch
def cast(w, dtype):
    """A float array cast to `dtype`; anything else (integer arrays, quantized weights, which compute in the
    activations' dtype by themselves) as it is."""
    if isinstance(w, jax.Array) and jnp.issubdtype(w.dtype, jnp.floating):
        return w.astype(dtype)
    return w


@cast.register(QuantizedWeight)
@cast.register(AdaptedWeight)
def _(w, dtype):
    return w


@functools.singledispatch
def weight_format(w) -> str | None:
    """"int8" / "int4" for a quantized weight, None for an array."""
    return None


@weight_format.register
def _(w: QuantizedWeight) -> str | None:
    return w.format


@functools.singledispatch
def adapt(w, a, b, scale: float, merge: bool = False):
    """w with a low-rank update scale * a @ b (a (*lead, C, r), b (*lead, r, O)): added in for an array; for a
    quantized base (QLoRA) kept beside it as an `AdaptedWeight` (the layers add the low-rank path, the base stays
    quantized), or with `merge` folded into a dequantized float32 weight (export)."""
    delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
    return w + delta.reshape(w.shape).astype(w.dtype)


@adapt.register
def _(w: QuantizedWeight, a, b, scale: float, merge: bool = False):
    adapted = AdaptedWeight(w, a, b, scale)
    return adapted.dequantize() if merge else adapted


@functools.singledispatch
def stored(w) -> dict[str, object]:
    """The arrays a checkpoint stores for a weight, by suffix of its path: the array itself (""), or a quantized
    weight's "/values" and "/scales"."""
    return {"": w}


@stored.register
def _(w: QuantizedWeight) -> dict[str, object]:
    return {"/values": w.values, "/scales": w.scales}


@functools.singledispatch
def from_stored(template, arrays: dict[str, object]):
    """The weight shaped like `template` (an array or abstract array) from its stored arrays (see `stored`)."""
    return arrays[""]


@from_stored.register
def _(template: QuantizedWeight, arrays: dict[str, object]):
    return dataclasses.replace(template, values=arrays["/values"], scales=arrays["/scales"])
