"""The attention entry point: every backend gives the einsum path's outputs and gradients for every mask kind.

The Pallas (splash attention) TPU kernel runs interpreted on the CPU; "cudnn" is `jax.nn.dot_product_attention`,
which runs its XLA implementation here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idefics_jax.ops.attention import Mask, attend

B, T, N, K, H = 2, 40, 4, 2, 8  # GQA (2 query heads per kv head); T is no multiple of the kernel's tile


def _left_padded():
    valid = np.ones((B, T), np.int32)
    valid[0, :7] = 0  # left padding
    return Mask.decoder(jnp.asarray(valid))


def _packed():
    seg = np.zeros((B, T), np.int32)
    seg[0, :12], seg[0, 12:30], seg[0, 30:] = 1, 2, 0  # two records, then padding
    seg[1, :25], seg[1, 25:] = 1, 2
    return Mask.decoder(jnp.asarray(seg))


def _key_padding():
    valid = np.ones((B, T), bool)
    valid[1, 29:] = False  # NaViT: the patches outside the image
    return Mask.keys(jnp.asarray(valid), T)


MASKS = {
    "causal, left padding": _left_padded,
    "sliding window": lambda: Mask.decoder(jnp.ones((B, T), jnp.int32), window=9),
    "patch mask (key padding)": _key_padding,
    "segment ids (packing)": _packed,
    "cross (perceiver: 16 queries over T keys)":
        lambda: Mask.keys(jnp.asarray(np.arange(T) < 33)[None].repeat(B, 0), 16),
}


@pytest.mark.parametrize("backend", ["pallas", "cudnn"])
@pytest.mark.parametrize("kind", list(MASKS))
def test_backend_matches_xla_outputs_and_gradients(kind, backend):
    mask = MASKS[kind]()
    Tq = mask.q_segment_BT.shape[1]
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, Tq, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)
    cot = jax.random.normal(kg, (B, Tq, N, H), jnp.float32)

    def run(name):
        f = lambda q, k, v: jnp.sum(attend(q, k, v, mask, name) * cot)  # noqa: E731
        return attend(q, k, v, mask, name), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    (ref, ref_g), (out, g) = run("xla"), run(backend)
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(out - ref).max()) <= 1e-5 * scale
    for a, b, name in zip(g, ref_g, "qkv"):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max()), name
    if mask.causal:  # the mask was honoured: a query's output does not depend on later keys
        later = attend(q, k.at[:, -1].add(5.0), v.at[:, -1].add(5.0), mask, backend)
        np.testing.assert_array_equal(np.asarray(later[:, :-1]), np.asarray(out[:, :-1]))


def test_dense_mask_of_each_kind():
    """The masks themselves, written out: padding never sees a record, records never see each other."""
    d = np.asarray(_packed().dense())
    assert d[0, 15, 11] == 0 and d[0, 15, 12] == 1 and d[0, 15, 16] == 0 and d[0, 35, 29] == 0
    w = np.asarray(Mask.decoder(jnp.ones((1, 20), jnp.int32), window=4).dense())[0]
    assert w[10].nonzero()[0].tolist() == [7, 8, 9, 10]
    kp = np.asarray(_key_padding().dense())
    assert kp[1, :, 29:].sum() == 0 and kp[1, :, :29].all()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention backend 'flash' is not one of xla, cudnn, pallas"):
        attend(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)), _packed(), "flash")


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from idefics_jax.model import sharding as shd
from idefics_jax.ops.attention import Mask, attend, default_backend

B, T, N, K, H = 4, 40, 8, 2, 8
part = shd.Partitioning(shd.make_mesh((2, 2, 2)))
assert default_backend(part) == "xla", default_backend(part)  # the mesh's devices are CPUs
seg = np.ones((B, T), np.int32)
seg[0, :7] = 0
seg[3, 20:] = 2  # two records
kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
q, cot = (jax.random.normal(x, (B, T, N, H), jnp.float32) for x in (kq, kg))
k, v = (jax.random.normal(x, (B, T, K, H), jnp.float32) for x in (kk, kv))
q, cot = (jax.device_put(x, part.sharding(("batch", None, "heads", None), x.shape)) for x in (q, cot))
k, v = (jax.device_put(x, part.sharding(("batch", None, "kv_heads", None), x.shape)) for x in (k, v))

def run(backend, p):
    def f(q, k, v, seg):
        return jnp.sum(attend(q, k, v, Mask.decoder(seg), backend, p) * cot)
    step = jax.jit(lambda q, k, v, seg: (attend(q, k, v, Mask.decoder(seg), backend, p),
                                         jax.grad(f, argnums=(0, 1, 2))(q, k, v, seg)))
    return step, step(q, k, v, jnp.asarray(seg))

_, (ref, ref_g) = run("xla", None)
step, (out, g) = run("pallas", part)
# The kernel runs once per device on its own samples and kv heads: nothing gathers the batch or the heads.
hlo = step.lower(q, k, v, jnp.asarray(seg)).as_text()
assert "shard_map" in hlo or "manual" in hlo.lower(), "no shard_map around the kernel"
err = max(float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max()),
          *(float(jnp.abs(a - b).max()) / float(jnp.abs(b).max()) for a, b in zip(g, ref_g)))
assert out.sharding.spec == part.spec(("batch", None, "heads", None), out.shape), out.sharding.spec
print("max rel err", err)
assert err <= 1e-5, err
"""


def test_pallas_on_a_mesh_runs_per_device_shard():
    """On a (2, 2, 2) mesh the kernel runs under shard_map over the batch and kv heads (the compiler cannot split a
    kernel call) and still gives the einsum path's outputs and gradients."""
    import os
    import subprocess
    import sys

    import programs

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=600,
                       env=programs.env(8, PYTHONPATH=root))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "max rel err" in r.stdout
