"""The one matmul of every layer: dense weights, quantized weights (integer matmuls on the CPU, dequantized
elsewhere) and LoRA-adapted quantized weights."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from idefics_jax.ops import int4_cpu as _int4_cpu
from idefics_jax.ops.quantize import INT4_OFFSET, AdaptedWeight, QuantizedWeight, nibbles, stored_nibbles


def matmul(eq: str, x, w):
    """`jnp.einsum(eq, x, w)` for any weight the layers hold: an array, a `QuantizedWeight` (multiplied as integers
    or dequantized a layer at a time, in x's dtype) or an `AdaptedWeight` (QLoRA). The one matmul of every layer.

    In the form all our layers use (x's trailing dims contracted with the weight's leading ones, in order, and the
    output ending with the weight's remaining dims: "BTD,DNH->BTNH", "ISNH,NHD->ISD") it is one 2-D contraction
    (`contract`, by the weight's type): left as (N, H), XLA:CPU transposes the weight at every call. Other forms
    (the patch embedding) go to einsum, arrays only.
    """
    lhs, rhs, out = eq.replace("->", ",").split(",")
    n_in = len(set(lhs) & set(rhs))
    if n_in == 0 or lhs[-n_in:] != rhs[:n_in] or out != lhs[:-n_in] + rhs[n_in:]:
        if not isinstance(w, jax.Array):
            raise ValueError(f"matmul '{eq}': a {type(w).__name__} needs x's trailing dims contracted with its "
                             "leading ones")
        return jnp.einsum(eq, x, w)
    batch = x.shape[:x.ndim - n_in]
    return contract(w, x.reshape(*batch, -1)).reshape(*batch, *out_dims(w, n_in))


@functools.singledispatch
def contract(w, x):
    """x (..., C) @ w seen as (C, O) -> (..., O), by the weight's type; an array here."""
    return x @ w.reshape(x.shape[-1], -1)


@functools.singledispatch
def out_dims(w, n_in: int) -> tuple[int, ...]:
    """The weight's output dims: those after its `n_in` contracted ones."""
    return tuple(w.shape[n_in:])


@out_dims.register
def _(w: QuantizedWeight, n_in: int) -> tuple[int, ...]:
    return tuple(w.values.shape[w.values.ndim - w.out_ndim:])


@out_dims.register
def _(w: AdaptedWeight, n_in: int) -> tuple[int, ...]:
    return out_dims(w.base, n_in)


@contract.register
def _(w: QuantizedWeight, x):
    if math.prod(x.shape[:-1]) <= INT_ROWS and jax.default_backend() == "cpu":
        return _int_matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1)
    return _dequantized_matmul(x, w)


@contract.register
def _(w: AdaptedWeight, x):
    """QLoRA: the frozen quantized weight, plus the adapters' low-rank path."""
    low = (x @ w.a.astype(x.dtype)) @ w.b.astype(x.dtype)
    y = contract(w.base, x)
    return y + (w.scale * low).reshape(y.shape).astype(y.dtype)


@functools.singledispatch
def tie_to_input(w, x):
    """(x, w) for a matmul outside any layer loop (the vocabulary projection): a quantized weight is tied to the
    step's input, or XLA hoists its dequantization out of the decode loop and every step reads a full-precision
    copy of it."""
    return x, w


@tie_to_input.register
def _(w: QuantizedWeight, x):
    return jax.lax.optimization_barrier((x, w))


def _dequantized_matmul(x, w: QuantizedWeight):
    """x (..., C) @ w dequantized to x's dtype -> (..., O)."""
    batch = x.shape[:-1]
    C, O = x.shape[-1], math.prod(w.values.shape[w.values.ndim - w.out_ndim:])
    if w.bits == 8:  # per output channel: the scales multiply the output, the codes go in as they are
        values, scales = w.values.reshape(C, O), w.scales.reshape(1, O)

        def part(v, s):
            return (x @ v.astype(x.dtype)) * s.astype(x.dtype)
    else:
        k, h = w.values.shape[:2]  # groups, half a group
        values, scales = w.values.reshape(k, h, O), w.scales.reshape(k, 1, O)
        xs = x.reshape(*batch, k, 2, h)
        x_lo, x_hi = xs[..., 0, :].reshape(*batch, k * h), xs[..., 1, :].reshape(*batch, k * h)

        def part(v, s):
            lo, hi = nibbles(v, x.dtype)
            s = s.astype(x.dtype)
            return x_lo @ (lo * s).reshape(k * h, -1) + x_hi @ (hi * s).reshape(k * h, -1)
    n = _column_blocks(C, O)
    if n == 1:
        return part(values, scales)
    # A big weight (the head) in column blocks: each block's dequantized copy stays in the CPU's cache instead of a
    # full-precision copy of the whole weight going through memory at every step.
    c = O // n

    def block(j, y):
        cols = lambda a: jax.lax.dynamic_slice_in_dim(a, j * c, c, axis=a.ndim - 1)  # noqa: E731
        return jax.lax.dynamic_update_slice_in_dim(y, part(cols(values), cols(scales)), j * c, axis=y.ndim - 1)

    return jax.lax.fori_loop(0, n, block, jnp.zeros((*batch, O), x.dtype))


# Up to this many rows (decode steps of up to 32 sequences), XLA:CPU multiplies quantized weights as integers; more
# rows (prefill) are compute-bound and dequantize instead.
INT_ROWS = 32


@jax.custom_vjp
def _int_matmul(x_RC, w: QuantizedWeight):
    """x (R, C) @ w (C, O) -> (R, O) in x's dtype, reading the codes as they are: XLA:CPU multiplies int8 matrices
    with int32 sums (VNNI / AMX on x86) at a quarter of fp32's bytes, where a dequantized weight is written and
    read again in full precision at every call.

    x goes in as int8 digits: x = sum_k unit_k * d_k, |d_k| <= 127, unit_{k+1} = unit_k / 254, unit_0 = max|x_r| /
    127 per row. Three digits leave x's error at max|x_r| * 2^-24 (fp32's own rounding), two at 2^-16 (enough for
    bf16); each digit is one more row of the same integer matmul, which still reads the weight once. The integer
    sums are exact; the float work is the few output rows.

    int4 goes to the CPU kernel (`_int4_cpu`: the packed nibbles unpacked in registers, x in fp32) where it builds
    and the process has one device (XLA cannot split a custom call over a mesh); else as above, group by group.
    """
    R, C = x_RC.shape
    O = math.prod(w.values.shape[w.values.ndim - w.out_ndim:])
    if w.bits == 4 and jax.device_count() == 1 and _int4_cpu.available():
        k = w.values.shape[0]
        return _int4_cpu.matmul(x_RC, w.values.reshape(k, -1, O), w.scales.reshape(k, O)).astype(x_RC.dtype)
    n = 3 if jnp.finfo(x_RC.dtype).nmant > 10 else 2
    x32 = x_RC.astype(jnp.float32)
    unit = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127
    unit = jnp.where(unit > 0, unit, 1.0)
    r, digits, units = x32 / unit, [], []
    for _ in range(n):
        d = jnp.round(r)
        digits.append(d.astype(jnp.int8))
        units.append(unit)
        r, unit = (r - d) * 254, unit / 254
    d_MC = jnp.concatenate(digits)  # M = n * R rows
    if w.bits == 8:
        s_MO = jax.lax.dot(d_MC, w.values.reshape(C, O), preferred_element_type=jnp.int32).astype(jnp.float32)
        s_MO = s_MO * w.scales.reshape(1, O)
    else:
        # Each group's sums times its scale: matmuls batched over the groups, one per half of a group (low and
        # high nibbles). The codes go in as stored, 0..15 (no concatenation of the halves, no offset per weight:
        # XLA:CPU runs either elementwise pass 5x slower than the matmul); the offset comes off the sums, times the
        # digits' sum over each half.
        k = w.values.shape[0]
        # Tied to this call's input, or XLA hoists the unpacking out of the decode loop: an unpacked (int8) copy
        # of every layer for the whole loop, read at every step instead of the packed bytes.
        d_MC, v = jax.lax.optimization_barrier((d_MC, w.values.reshape(k, -1, O)))
        d_Mk2h = d_MC.reshape(n * R, k, 2, -1)
        s_kMO = sum(jnp.einsum("Mkh,khO->kMO", d_Mk2h[:, :, i], c, preferred_element_type=jnp.int32)
                    for i, c in enumerate(stored_nibbles(v, jnp.int8)))
        s_kMO = s_kMO - INT4_OFFSET * jnp.sum(d_Mk2h, axis=(2, 3), dtype=jnp.int32).T[:, :, None]
        scales = w.scales.reshape(k, 1, O)
        # Unrolled: as a reduction over the leading axis, XLA:CPU spends more on this sum than on the matmuls.
        s_MO = sum(s_kMO[i].astype(jnp.float32) * scales[i] for i in range(k))
    y = sum(u * s for u, s in zip(units, s_MO.reshape(n, R, O)))
    return y.astype(x_RC.dtype)


def _int_matmul_fwd(x, w):
    return _int_matmul(x, w), (x, w)


def _int_matmul_bwd(res, g):
    # The digits' rounding has no useful derivative: gradients are those of the dequantized product (QLoRA trains
    # through frozen quantized weights).
    return jax.vjp(_dequantized_matmul, *res)[1](g)


_int_matmul.defvjp(_int_matmul_fwd, _int_matmul_bwd)


BLOCK_ELEMENTS = 1 << 18  # dequantized weight elements per block: 1 MiB in fp32


def _column_blocks(C: int, O: int) -> int:
    """How many column blocks a (C, O) quantized weight is multiplied in: 1 up to BLOCK_ELEMENTS, else the fewest
    blocks (a divisor of O) of at most that many elements each."""
    if C * O <= 4 * BLOCK_ELEMENTS:
        return 1
    for n in range(2, O + 1):
        if O % n == 0 and C * (O // n) <= BLOCK_ELEMENTS:
            return n
    return 1
