"""`idefics-jax serve --dry-run`: the serving engine's decode step compiled ahead of time for a mesh, with no
weights loaded (abstract arrays carrying their shardings): per-device memory of the weights, the slots' KV cache
and the step's temporaries, and whether they fit; for a TPU slice also the compiler's estimated decode step and
tokens/s, beside the HBM roofline (weights and cache read once per step).

`compile_decode_step` is the decode row of `bench/tpu_plan.py` too: one path for both."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax.checkpoints.checkpoint import abstract_placed
from idefics_jax.checkpoints.registry import architecture
from idefics_jax.generation import decode
from idefics_jax.generation.sampling import Rows, SamplingConfig, mask_words
from idefics_jax.model import sharding as shd
from idefics_jax.model.config import ModelConfig
from idefics_jax.model.idefics import KVCache
from idefics_jax.ops.decode_weights import StackedLayers
from idefics_jax.ops.platform import compile_lowered, size_text, target
from idefics_jax.runtime import tpu
from idefics_jax.runtime.hlo_cost import Cost, by_depth, program_cost, unrolled_scans

GiB = 2**30


def compile_decode_step(config: ModelConfig, dtype, part: shd.Partitioning, rows: int, columns: int, *,
                        quantize: str = "", group_size: int | None = None,
                        compiler_options: dict | None = None) -> dict:
    """One decode step (`generation.decode.step`, greedy) of `rows` slots over `columns` cache columns each, the
    weights and the cache laid out on `part`'s mesh as loading places them, lowered and compiled. -> the mesh,
    bytes per device of the parameters and the KV cache, and XLA's memory analysis (`ops.platform.compile_lowered`;
    `compiled` holds the program)."""
    graphdef, state = nnx.split(abstract_placed(config, dtype, part, quantize, group_size))
    devices = tuple(part.mesh.devices.flat)
    out = {"mesh": dict(zip(shd.MESH_AXES, part.mesh.devices.shape)), "params": shd.per_device_bytes(state)}
    t, B, S = config.text, rows, columns
    shape = (t.num_layers, B, t.num_kv_heads, S, t.head_dim)
    kv = jax.ShapeDtypeStruct(shape, dtype, sharding=part.sharding(KVCache.AXES, shape))
    out["kv_cache"] = shd.per_device_bytes(KVCache(kv, kv))
    rep = shd.replicated(part)

    def per_row(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=part.sharding(("batch",) + (None,) * (len(shape) - 1),
                                                                          shape))

    s = decode.DecodeState(
        KVCache(kv, kv), per_row((B, S), jnp.bool_), per_row((B, S), jnp.int32),
        rep(jax.ShapeDtypeStruct((), jnp.int32)), per_row((B,), jnp.int32), per_row((B,), jnp.int32),
        per_row((B,), jnp.int32), per_row((B,), jnp.bool_), jax.tree.map(rep, jax.eval_shape(lambda: Rows.empty(B))),
        per_row((B, mask_words(t.vocab_size)), jnp.int32))
    eos = rep(jax.ShapeDtypeStruct((1,), jnp.int32))

    def one_step(state, s, eos):
        m = nnx.merge(graphdef, state)
        s, nxt, _ = decode.step(m, StackedLayers(m.text.layers.weights()), s, eos, jnp.int32(0), SamplingConfig())
        return s, nxt

    t0 = time.time()
    args = (state, s, eos)
    lowered = jax.jit(one_step, donate_argnums=1).lower(*args)
    compile_lowered(lowered, devices, out, t0, shd.per_device_bytes(args), compiler_options)
    return out


def decode_step_cost(config: ModelConfig, dtype, part: shd.Partitioning, rows: int, columns: int, *,
                     quantize: str = "", group_size: int | None = None,
                     compiler_options: dict | None = None) -> Cost:
    """The compiler's cost of one decode step per device, every decoder layer counted (compiled with 1 and 2
    layers unrolled and extrapolated to the model's depth: `hlo_cost.by_depth`)."""
    def at(text: int, vision: int) -> Cost:
        with unrolled_scans():
            r = compile_decode_step(config.with_depth(text), dtype, part, rows, columns, quantize=quantize,
                                    group_size=group_size, compiler_options=compiler_options)
        return program_cost(r["compiled"])

    return by_depth(at, config.text.num_layers)


def dry_run(model: str, *, slots: int = 8, max_len: int | None = None, dtype: str | None = None,
            quantize: str | None = None, group_size: int | None = None, mesh: str | None = None,
            slice_name: str | None = None, prefix_cache_gb: float = 0.0, image_cache_gb: float = 0.0) -> dict:
    """The decode step `idefics-jax serve` would run for `model` (a preset, a shipped model or a directory with
    config.json; its weights are not read): `slots` rows of `max_len` columns (the engine's default: the model's
    positions, at most 2048), in `dtype` (default bfloat16, as the published checkpoints store it), on `mesh` (a
    preset or axis sizes, `sharding.parse_mesh`; default one device) of this host's devices or of TPU slice
    `slice_name`. The prompt caches' budgets (`prefix_cache_gb`, `image_cache_gb`) live on one device and count
    there. -> `compile_decode_step`'s figures plus `caches` (their bytes), `capacity`, `fits` and `target`; for a
    TPU slice whose step fits, also `cost`, `seconds`, `tokens_s` and `roofline_tokens_s`."""
    config = architecture(model)
    if not (isinstance(slots, int) and slots >= 1):
        raise ValueError(f"--slots must be a positive integer; got {slots!r}")
    max_len = max_len or min(config.text.max_position_embeddings, 2048)
    dt = jnp.dtype(dtype or "bfloat16")
    devices, capacity, how = target(slice_name)
    shape = shd.parse_mesh(mesh) if mesh else shd.MeshShape()
    mesh_devices = devices if mesh else devices[:1]
    part = shd.Partitioning(shd.make_mesh(shape, mesh_devices))
    q = dict(quantize=quantize or "", group_size=group_size)
    out = compile_decode_step(config, dt, part, slots, max_len, **q)
    out.pop("compiled", None)
    caches = (prefix_cache_gb + image_cache_gb) * GiB
    out.update(caches=caches, capacity=capacity, fits=not out.get("oom") and out["peak"] + caches <= capacity,
               target=how, slots=slots, max_len=max_len, dtype=dt.name)
    if slice_name and out["fits"]:
        cost = decode_step_cost(config, dt, part, slots, max_len, **q)
        roofline = (out["params"] + out["kv_cache"]) / tpu.slice_named(slice_name).hbm_bytes_s
        out.update(cost=cost, seconds=cost.seconds, tokens_s=slots / cost.seconds, roofline_tokens_s=slots / roofline)
    return out


def report(r: dict) -> str:
    """The dry run in three lines, four with the estimated step; the last says whether it fits."""
    g = size_text
    mesh = ", ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [f"compiled for {r['target']}; mesh {mesh}; {r['slots']} slots of {r['max_len']} positions, "
             f"{r['dtype']} (lowered {r['lower_s']:.1f} s, compiled {r['compile_s']:.1f} s)",
             f"per device: weights {g(r['params'])}, KV cache {g(r['kv_cache'])}, decode step temporaries "
             f"{g(r['temporaries'])}; peak {g(r['peak'])}, with the prompt caches {g(r['peak'] + r['caches'])} of "
             f"{g(r['capacity'])}"]
    if "cost" in r:
        c = r["cost"]
        lines.append(f"the TPU compiler's estimate: decode step {1e3 * r['seconds']:.2f} ms, "
                     f"{r['tokens_s']:,.0f} tokens/s with every slot busy (HBM roofline {r['roofline_tokens_s']:,.0f});"
                     f" per device HBM {g(c.bytes)}, collectives {c.collectives_text(g)}")
    lines.append("fits" if r["fits"] else f"does not fit: peak {g(r['peak'] + r['caches'])} per device "
                 f"(prompt caches {g(r['caches'])} included), {g(r['capacity'])} available")
    return "\n".join(lines)
