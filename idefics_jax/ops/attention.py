"""Attention: the key mask in the form fused kernels take, and the one attention entry point with its backends (XLA
einsums, cuDNN, the Pallas splash kernel under `shard_map` on a mesh)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from idefics_jax.ops.platform import target_platform


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


def default_backend(partitioning=None) -> str:
    """The platform's fused attention: splash attention (Pallas) on TPUs, cuDNN (`jax.nn.dot_product_attention`)
    on GPUs, the einsum path on CPUs (the platform: `target_platform(part)`)."""
    return {"tpu": "pallas", "gpu": "cudnn"}.get(target_platform(partitioning), "xla")


def check_backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is not one of {', '.join(BACKENDS)}")
    return name


@dataclasses.dataclass(frozen=True)
class Attention:
    """The attention of one model, chosen once: the backend (None: the platform's, `default_backend`) and, on a
    mesh, the model's partitioning (the kernel then runs per shard; its devices' platform picks the default). The
    model's towers hold it and call it; nothing else passes a backend around."""

    backend: str | None = None
    partitioning: object = None

    def __post_init__(self):
        check_backend(self.backend)

    def __call__(self, q_BTNH, k_BSKH, v_BSKH, mask):
        return attend(q_BTNH, k_BSKH, v_BSKH, mask, self.backend, self.partitioning)


def attend(q_BTNH, k_BSKH, v_BSKH, mask, backend: str | None = None, partitioning=None):
    """Scaled dot-product attention with grouped kv heads; softmax in fp32. The one attention of the package.

    mask: a `Mask`, or a (B, T, S) bool array (True where query t may see key s; the decode loop's cache masks),
    which only the "xla" backend takes. backend: "xla" (einsum, scores materialised), "cudnn"
    (`jax.nn.dot_product_attention`: cuDNN flash attention on GPUs, XLA elsewhere), "pallas" (the splash
    attention TPU kernel; interpreted off TPUs, for tests); None: `default_backend(part)`.
    part: the model's `sharding.Partitioning`, if any: the kernel then runs on each device's shard of the batch
    and heads (XLA cannot partition a Mosaic kernel call: on a multi-device mesh it would not compile), and its
    devices' platform picks the default backend and kernel or interpreter.
    """
    backend = check_backend(backend) or default_backend(partitioning)
    if not isinstance(mask, Mask) or backend == "xla":
        return _attend_xla(q_BTNH, k_BSKH, v_BSKH, mask.dense() if isinstance(mask, Mask) else mask)
    if backend == "cudnn":
        window = None if mask.window is None else (mask.window - 1, 0)
        dense = (mask.q_segment_BT[:, :, None] == mask.kv_segment_BS[:, None, :])[:, None]
        out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=dense, is_causal=mask.causal,
                                           local_window_size=window)
        return out.astype(q_BTNH.dtype)
    return _attend_splash(q_BTNH, k_BSKH, v_BSKH, mask, partitioning)


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


def _attend_splash(q_BTNH, k_BSKH, v_BSKH, mask: Mask, partitioning=None):
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
    kernel = _splash_kernel(Tp, Sp, G, mask.causal, mask.window, target_platform(partitioning) != "tpu")
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    def one(q_KGTH, k_KSH, v_KSH, qs_T, ks_S):
        seg = SegmentIds(qs_T, ks_S)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(q_KGTH, k_KSH, v_KSH)

    run = jax.vmap(one)
    if partitioning is not None and partitioning.mesh.size > 1:
        # Query heads n = k * G + g: splitting the kv heads splits the query heads with them.
        q_spec = partitioning.spec(("batch", "kv_heads", None, None, None), q.shape)
        kv_spec = partitioning.spec(("batch", "kv_heads", None, None), k.shape)
        seg_spec = partitioning.spec(("batch", None), qseg.shape)
        run = jax.shard_map(run, mesh=partitioning.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
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
