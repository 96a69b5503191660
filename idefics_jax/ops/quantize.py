"""Weight-only quantization of the matmul weights: int8 per output channel, int4 in groups along the contraction.

A quantized weight is a `QuantizedWeight` pytree (codes + scales) that takes the array's place inside its
`nnx.Param`, under the same path and metadata (`axes`, `fan_in`). Everything that walks parameters as pytrees
works on it unchanged: stacking and `lax.scan` over layers (both leaves keep the leading layer axis), Orbax
(two arrays per weight, "<path>/values" and "<path>/scales"), and sharding (each leaf has logical axes derived
from its weight's: `leaf_axes`). The layers multiply with `ops.matmul.matmul`, which dequantizes inside the layer:
a decode step reads the codes and dequantizes one layer at a time, never a whole full-precision copy.

Layouts, for a weight (*lead, *in, *out) with `fan_in` = len(in) contracted dims of total width C:
  int8: values int8 (*lead, *in, *out), scales float32 (*lead, *out): w = values * scales (symmetric, per output
        channel; the scale multiplies the matmul's output, so the codes go into the matmul as they are).
  int4: values uint8 (*lead, C/g, g/2, *out), scales float32 (*lead, C/g, 1, *out), g the group size: within each
        group of g contraction rows, row j < g/2 is the low nibble of byte j and row g/2 + j its high nibble,
        stored as code + 8 (codes in [-8, 7]). Halves rather than neighbours: unpacking is two elementwise ops on
        the packed array (no interleave, which XLA:CPU runs ~4x slower), and each half is one matmul.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

FORMATS = ("int8", "int4")
DEFAULT_GROUP = 128
# The patch embedding is a convolution stem (its einsum contracts non-trailing input dims) and is tiny: kept as is.
SKIP = ("vision/patch_embed",)


class QuantizeError(ValueError):
    """A bad quantization request (format, group size), in one line."""


def check_format(fmt) -> str:
    if fmt not in FORMATS:
        raise QuantizeError(f"quantize must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return fmt


def _static():
    return dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Codes and scales of one matmul weight (see the module docstring for the layouts)."""

    values: jax.Array
    scales: jax.Array
    in_shape: tuple[int, ...] = _static()  # the contracted dims of the full-precision weight
    out_ndim: int = _static()  # how many output dims follow them
    bits: int = _static()  # 8 or 4

    def __getitem__(self, key):
        # `param[...]` reads a Variable's value: the weight itself, as for arrays.
        if key is not Ellipsis:
            raise TypeError("a QuantizedWeight is indexed only with [...]")
        return self

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @property
    def lead(self) -> int:
        """Leading (layer) dims before the contraction: 1 for stacked weights, 0 inside the scan."""
        return self.values.ndim - (len(self.in_shape) if self.bits == 8 else 2) - self.out_ndim

    @property
    def group(self) -> int:
        """Contraction rows per scale (the whole width for int8)."""
        return math.prod(self.in_shape) if self.bits == 8 else 2 * self.values.shape[self.lead + 1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The full-precision weight's shape."""
        return (*self.values.shape[:self.lead], *self.in_shape, *self.values.shape[self.values.ndim - self.out_ndim:])

    @property
    def size(self) -> int:
        """Weights it stands for (as an array's size; FLOP counts read it)."""
        return math.prod(self.shape)

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The full-precision weight (*lead, *in, *out), for export and tests (the layers never build it)."""
        if self.bits == 8:
            lead = self.values.shape[:self.lead]
            s = self.scales.reshape(*lead, *(1,) * len(self.in_shape), *self.scales.shape[len(lead):])
            return (self.values.astype(jnp.float32) * s).astype(dtype)
        lo, hi = nibbles(self.values, jnp.float32)
        w = jnp.stack([lo * self.scales, hi * self.scales], axis=self.lead + 1)  # (*lead, C/g, 2, g/2, *out)
        return w.reshape(self.shape).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptedWeight:
    """A frozen quantized weight with a low-rank update, w + scale * a @ b, kept apart (QLoRA): `ops.matmul.matmul`
    computes x @ w + scale * (x @ a) @ b, so the base stays quantized and no full-precision copy of it (or of its
    gradient) is ever made. a (*lead, C, r), b (*lead, r, O) for a weight (*lead, *in, *out) of width C -> O."""

    base: QuantizedWeight
    a: jax.Array
    b: jax.Array
    scale: float = _static()

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("an AdaptedWeight is indexed only with [...]")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def dtype(self):
        return self.base.dtype

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The merged full-precision weight (export)."""
        delta = jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (self.base.dequantize(jnp.float32) + self.scale * delta.reshape(self.shape)).astype(dtype)


INT4_OFFSET = 8  # a code c in [-8, 7] is stored as the nibble c + 8


def stored_nibbles(packed, dtype):
    """Packed int4 bytes -> (low, high) nibbles as stored, in [0, 15], as `dtype`: the codes plus INT4_OFFSET."""
    return (packed & 15).astype(dtype), (packed >> 4).astype(dtype)


def nibbles(packed, dtype):
    """Packed int4 bytes -> (low, high) codes in [-8, 7] as `dtype`."""
    return tuple(n - INT4_OFFSET for n in stored_nibbles(packed, dtype))


def group_size(width: int, requested: int | None = None, where: str = "") -> int:
    """int4 group: `requested` (which must divide `width` and be even), else 128 or, where 128 does not divide the
    width, the largest power of two below it that does."""
    if requested is not None:
        if requested < 2 or requested % 2 or width % requested:
            raise QuantizeError(f"group size {requested} does not divide the contraction width {width} of {where} "
                                "(it must be an even divisor)")
        return requested
    g = DEFAULT_GROUP
    while width % g:
        g //= 2
    if g < 2:
        raise QuantizeError(f"int4 needs an even contraction width; {where} has {width}")
    return g


def quantize(w, fan_in: int, fmt: str, group: int | None = None, lead: int = 0, where: str = "") -> QuantizedWeight:
    """Weight (*lead, *in, *out) with `fan_in` contracted dims -> QuantizedWeight (symmetric, round to nearest).

    Runs under jit or eagerly, on numpy or jax arrays."""
    check_format(fmt)
    shape = tuple(w.shape)
    lead_shape, in_shape, out_shape = shape[:lead], shape[lead:lead + fan_in], shape[lead + fan_in:]
    w32 = jnp.asarray(w).astype(jnp.float32)
    if fmt == "int8":
        if group is not None:
            raise QuantizeError("a group size applies to int4 only (int8 has one scale per output channel)")
        amax = jnp.max(jnp.abs(w32), axis=tuple(range(lead, lead + fan_in)))
        scales = jnp.where(amax > 0, amax / 127, 1.0)
        s = scales.reshape(*lead_shape, *(1,) * fan_in, *out_shape)
        q = jnp.clip(jnp.round(w32 / s), -127, 127).astype(jnp.int8)
        return QuantizedWeight(q, scales, in_shape, len(out_shape), 8)
    C = math.prod(in_shape)
    g = group_size(C, group, where)
    x = w32.reshape(*lead_shape, C // g, 2, g // 2, *out_shape)
    amax = jnp.max(jnp.abs(x), axis=(lead + 1, lead + 2), keepdims=True)
    s = jnp.where(amax > 0, amax / 7, 1.0)
    q = (jnp.clip(jnp.round(x / s), -8, 7) + INT4_OFFSET).astype(jnp.uint8)
    lo, hi = jnp.take(q, 0, axis=lead + 1), jnp.take(q, 1, axis=lead + 1)
    return QuantizedWeight(lo | (hi << 4), s[(slice(None),) * (lead + 1) + (0,)], in_shape, len(out_shape), 4)


def leaf_axes(axes, fan_in: int, fmt: str) -> tuple[tuple, tuple]:
    """Logical axes of (values, scales) of a weight with logical `axes`: the scales go with their output channels
    (and int4 groups with the first contracted dim), so a mesh splits them as it splits the weight."""
    axes = tuple(axes)
    lead = 1 if axes and axes[0] == "layers" else 0
    head, ins, outs = axes[:lead], axes[lead:lead + fan_in], axes[lead + fan_in:]
    if fmt == "int8":
        return axes, head + outs
    return head + (ins[0], None) + outs, head + (ins[0], None) + outs


def eligible(path: str, fan_in: int | None) -> bool:
    """Whether the parameter at `path` is quantized: every matmul weight but those in SKIP."""
    return fan_in is not None and path not in SKIP
