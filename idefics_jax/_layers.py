"""Shared building blocks.

Axis legend for every einsum and `x_XYZ` name in this package:
  B batch, I images, T query tokens, S key/source tokens, D model width, N query heads, K kv heads,
  G query heads per kv head, H head dim, F mlp width, V vocab, L layers, P patches per side;
  merged: E = N*H, X = B*K, Q = G*T.
"""

# Why a layer is a function over a dict of stacked weights (`Stacked` + `scan_layers`), not an NNX module stacked
# with nnx.scan / nnx.vmap (weighed in issue 13 and kept):
# - The flat paths ("text/layers/q") are a contract: the converter's name map, LoRA targets, weight decay's fan-in,
#   the training step's path-keyed parameter dicts and saved Orbax checkpoints all use them; modules would rename
#   them (".../attn/q/kernel") and orphan existing checkpoints.
# - One layer function takes every form of the weights without a second code path: the stacked arrays, training's
#   dicts with LoRA merged in, and the CPU decode path's per-layer zero-copy views or bf16 bits (`_cpu.py`, 2.5x
#   decode speed), which as module state would need a split/merge per layer and step; quantized weights slot in
#   the same way.
# - nnx.scan would lower to the same single lax.scan (compile time flat in depth): the change would be syntax only.

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax import _int4_cpu
from idefics_jax.config import RopeConfig
from idefics_jax.quantize import INT4_OFFSET, AdaptedWeight, QuantizedWeight, nibbles, stored_nibbles

Axes = Sequence[str | None]


def normal(std: float = 0.02):
    return jax.nn.initializers.normal(std)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, init=None, dtype=jnp.float32,
          fan_in: int | None = None) -> nnx.Param:
    """A parameter with its logical axis names (mapped to mesh axes by `idefics_jax.sharding`).

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


def checkpointed(fn: Callable, remat: bool | str) -> Callable:
    """`fn` with its activations recomputed in the backward pass: remat "full" (or True) keeps only its inputs;
    "matmuls" also keeps the matmul outputs (recomputes norms, activations, softmax); "none" (or False) keeps
    everything."""
    if remat in (False, None, "none"):
        return fn
    if remat in (True, "full"):
        return jax.checkpoint(fn)
    if remat == "matmuls":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat '{remat}' is not one of {', '.join(REMAT)}")


def scan_layers(fn: Callable, carry, weights: dict | list[dict], xs=None, remat: bool | str = False):
    """Runs `fn(carry, w, x) -> (carry, y)` over the stacked layers in `weights` (and per-layer `xs`).

    For generation on the CPU (see `_cpu.layer_weights`), `weights` may also be a list with one entry per
    layer (no layer axis), run one after the other; `xs` then holds lists with one entry per layer, and so do the
    `ys` returned. Weights given as uint16 are bf16 bit patterns, turned back into bf16 inside the loop body.
    """
    body = checkpointed(fn, remat)

    def step(c, wx):
        w, x = wx
        return body(c, jax.tree.map(_from_bits, w), x)

    if not isinstance(weights, list):
        return jax.lax.scan(step, carry, (weights, xs))
    ys = []
    for i, w in enumerate(weights):
        carry, y = step(carry, (w, jax.tree.map(lambda a: a[i], xs, is_leaf=lambda a: isinstance(a, list))))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: list(y), *ys)


def _from_bits(w):
    return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == jnp.uint16 else w


def matmul(eq: str, x, w):
    """`jnp.einsum(eq, x, w)` for a weight array or a `QuantizedWeight` (dequantized here, a layer at a time, in
    x's dtype): the one matmul of every layer.

    In the form all our layers use (x's trailing dims contracted with the weight's leading ones, in order, and the
    output ending with the weight's remaining dims: "BTD,DNH->BTNH", "ISNH,NHD->ISD") it is one 2-D contraction:
    left as (N, H), XLA:CPU transposes the weight at every call. Other forms (the patch embedding) go to einsum,
    unquantized only.
    """
    lhs, rhs, out = eq.replace("->", ",").split(",")
    n_in = len(set(lhs) & set(rhs))
    if isinstance(w, AdaptedWeight):  # QLoRA: the frozen quantized weight, plus the adapters' low-rank path
        x2 = x.reshape(*x.shape[:x.ndim - n_in], -1)
        low = (x2 @ w.a.astype(x.dtype)) @ w.b.astype(x.dtype)
        y = matmul(eq, x, w.base)
        return y + (w.scale * low).reshape(y.shape).astype(y.dtype)
    if n_in == 0 or lhs[-n_in:] != rhs[:n_in] or out != lhs[:-n_in] + rhs[n_in:]:
        if isinstance(w, QuantizedWeight):
            raise ValueError(f"matmul '{eq}': a quantized weight needs x's trailing dims contracted with its "
                             "leading ones")
        return jnp.einsum(eq, x, w)
    batch = x.shape[:x.ndim - n_in]
    x = x.reshape(*batch, -1)
    if not isinstance(w, QuantizedWeight):
        return (x @ w.reshape(x.shape[-1], -1)).reshape(*batch, *w.shape[n_in:])
    out_shape = w.values.shape[w.values.ndim - w.out_ndim:]
    C = x.shape[-1]
    if math.prod(batch) <= INT_ROWS and jax.default_backend() == "cpu":
        return _int_matmul(x.reshape(-1, C), w).reshape(*batch, *out_shape)
    return _dequantized_matmul(x, w).reshape(*batch, *out_shape)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees, in the form fused kernels take: query t sees key s when their segment ids are
    equal, and, if `causal`, s <= t, and, with a `window`, s > t - window.

    Segment ids carry key padding (NaViT patch masks: queries 1, keys 1 valid / 0 padding), padding of a batch
    (0 on padding tokens, 1 on real ones: a padding query then sees padding keys, never nothing) and packing (one
    id per record). Causal masks need T == S.
    """

    q_segment_BT: jax.Array  # int32
    kv_segment_BS: jax.Array  # int32
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def keys(cls, valid_BS, T: int) -> "Mask":
        """Every one of T queries sees the valid keys (encoder key padding)."""
        return cls(jnp.ones((valid_BS.shape[0], T), jnp.int32), valid_BS.astype(jnp.int32))

    @classmethod
    def decoder(cls, segment_BT, window: int | None = None) -> "Mask":
        """Causal self-attention within segments: `segment_BT` is the attention mask (1 token, 0 padding) or,
        for packed rows, one id per record (0 padding)."""
        seg = segment_BT.astype(jnp.int32)
        return cls(seg, seg, causal=True, window=window)

    def dense(self):
        """-> (B, T, S) bool."""
        allowed = self.q_segment_BT[:, :, None] == self.kv_segment_BS[:, None, :]
        T, S = self.q_segment_BT.shape[1], self.kv_segment_BS.shape[1]
        t, s = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
        if self.causal:
            allowed &= (s <= t)[None]
        if self.window is not None:
            allowed &= (s > t - self.window)[None]
        return allowed


BACKENDS = ("xla", "cudnn", "pallas")


def target_platform(part=None) -> str:
    """The platform the program is built for: that of `part`'s mesh (a `sharding.Partitioning`; its devices may
    be a TPU topology compiled for ahead of time from a CPU host, see bench/memory_plan.py), else jax's default
    backend."""
    if part is not None:
        return part.mesh.devices.flat[0].platform
    return jax.default_backend()


def default_backend(part=None) -> str:
    """The platform's fused attention: splash attention (Pallas) on TPUs, cuDNN (`jax.nn.dot_product_attention`)
    on GPUs, the einsum path on CPUs (the platform: `target_platform(part)`)."""
    return {"tpu": "pallas", "gpu": "cudnn"}.get(target_platform(part), "xla")


def check_backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is not one of {', '.join(BACKENDS)}")
    return name


def attend(q_BTNH, k_BSKH, v_BSKH, mask, backend: str | None = None, part=None):
    """Scaled dot-product attention with grouped kv heads; softmax in fp32. The one attention of the package.

    mask: a `Mask`, or a (B, T, S) bool array (True where query t may see key s; the decode loop's cache masks),
    which only the "xla" backend takes. backend: "xla" (einsum, scores materialised), "cudnn"
    (`jax.nn.dot_product_attention`: cuDNN flash attention on GPUs, XLA elsewhere), "pallas" (the splash
    attention TPU kernel; interpreted off TPUs, for tests); None: `default_backend(part)`.
    part: the model's `sharding.Partitioning`, if any: the kernel then runs on each device's shard of the batch
    and heads (XLA cannot partition a Mosaic kernel call: on a multi-device mesh it would not compile), and its
    devices' platform picks the default backend and kernel or interpreter.
    """
    backend = check_backend(backend) or default_backend(part)
    if not isinstance(mask, Mask) or backend == "xla":
        return _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask.dense() if isinstance(mask, Mask) else mask)
    if backend == "cudnn":
        window = None if mask.window is None else (mask.window - 1, 0)
        dense = (mask.q_segment_BT[:, :, None] == mask.kv_segment_BS[:, None, :])[:, None]
        out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=dense, is_causal=mask.causal,
                                           local_window_size=window)
        return out.astype(q_BTNH.dtype)
    return _attend_splash(q_BTNH, k_BSKH, v_BSKH, mask, part)


def _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Fully masked rows give a uniform average, never NaN. The matmuls take keys and values as (B, K, S, H),
    the decoder's cache layout (its swap to (B, S, K, H) and this one cancel): batched over B and K, each head's
    (S, H) block contracted as it lies."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    G = N // K
    k, v = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    logits = jnp.einsum("BKQH,BKSH->BKQS", q, k).astype(jnp.float32).reshape(B, K, G, T, S) * (H**-0.5)
    logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(B, K, G * T, S)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


_BLOCK = 128  # the kernel's tile: sequences are padded to a multiple of it


def _attend_splash(q_BTNH, k_BSKH, v_BSKH, mask: Mask, part=None):
    """Splash attention: one kernel call per (sample, kv head) with its G query heads (MQA form), under vmap; on a
    mesh, under shard_map over the batch and kv heads as the rules lay them out.

    Sequences are padded to whole tiles; padding queries and keys get their own segment id (-1) so that no real
    row sees them and no padding row is empty.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    G = N // K
    Tp, Sp = -(-T // _BLOCK) * _BLOCK, -(-S // _BLOCK) * _BLOCK
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    qseg = jnp.pad(mask.q_segment_BT, ((0, 0), (0, Tp - T)), constant_values=-1)
    kseg = jnp.pad(mask.kv_segment_BS, ((0, 0), (0, Sp - S)), constant_values=-1)
    # The kernel takes no scale: it goes on the queries (in fp32 for the products, as the other backends).
    q = (pad(q_BTNH, Tp).astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype)
    q = q.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)  # B K G T H
    k, v = (jnp.swapaxes(pad(x, Sp), 1, 2) for x in (k_BSKH, v_BSKH))  # B K S H
    kernel = _splash_kernel(Tp, Sp, G, mask.causal, mask.window, target_platform(part) != "tpu")
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    def one(q_KGTH, k_KSH, v_KSH, qs_T, ks_S):
        seg = SegmentIds(qs_T, ks_S)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(q_KGTH, k_KSH, v_KSH)

    run = jax.vmap(one)
    if part is not None and part.mesh.size > 1:
        # Query heads n = k * G + g: splitting the kv heads splits the query heads with them.
        q_spec = part.spec(("batch", "kv_heads", None, None, None), q.shape)
        kv_spec = part.spec(("batch", "kv_heads", None, None), k.shape)
        seg_spec = part.spec(("batch", None), qseg.shape)
        run = jax.shard_map(run, mesh=part.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                            out_specs=q_spec, check_vma=False)
    out = run(q, k, v, qseg, kseg)  # B K G T H
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T].astype(q_BTNH.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, S: int, heads: int, causal: bool, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is not None:
        one = sm.LocalMask((T, S), (window - 1, 0 if causal else None), 0)
    elif causal:
        one = sm.CausalMask((T, S))
    else:
        one = sm.FullMask((T, S))
    bq, bkv = _tile(T), _tile(S)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * heads), block_sizes=blocks, interpret=interpret)


def _tile(n: int) -> int:
    return next(b for b in (512, 256, _BLOCK) if n % b == 0)
