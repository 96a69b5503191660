"""`idefics-jax train --dry-run CONFIG`: the config's training step compiled ahead of time for its mesh, with no
weights and no data loaded (abstract arrays carrying their shardings): per-device memory and whether it fits. On
this host's devices, or with `slice_name` for a TPU slice (libtpu compiles it; no TPU needed).

`compile_step` is the program `bench/memory_plan.py` reports too: one path for both."""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from idefics_jax.checkpoints.checkpoint import abstract_placed
from idefics_jax.checkpoints.hf_config import from_hf_file
from idefics_jax.checkpoints.paths import as_path
from idefics_jax.checkpoints.registry import PRESETS, shipped_models, SHIPPED_DIR
from idefics_jax.model import sharding as shd
from idefics_jax.model.config import ModelConfig
from idefics_jax.ops.platform import compile_ahead, describe, memory_limit
from idefics_jax.runtime import tpu
from idefics_jax.train import optim, step as step_lib
from idefics_jax.train.loading import compute_dtype, param_dtype
from idefics_jax.train.config import TrainConfig

GiB = 2**30


def per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (the largest shard, for uneven layouts)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def replicated(part: shd.Partitioning):
    return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(part.mesh, PartitionSpec()))


def batch_specs(part: shd.Partitioning, config: ModelConfig, B: int, T: int, images: int, *, labels: bool = True,
                packed: bool = False) -> dict:
    """A global batch of B rows of T tokens and `images` sub-images each, split over the mesh's batch axes."""
    P = config.vision.image_size
    shapes = {"input_ids": ((B, T), jnp.int32), "attention_mask": ((B, T), jnp.int32)}
    if images:
        shapes.update(pixel_values=((B, images, 3, P, P), jnp.float32),
                      pixel_attention_mask=((B, images, P, P), jnp.bool_))
    if labels:
        shapes["labels"] = ((B, T), jnp.int32)
    if packed:
        shapes["segment_ids"] = ((B, T), jnp.int32)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=part.sharding(("batch",) + (None,) * (len(s) - 1), s))
            for k, (s, d) in shapes.items()}


def compile_step(model_config: ModelConfig, cfg: TrainConfig, devices, batch: dict, *,
                 compiler_options: dict | None = None) -> dict:
    """Lowers and compiles `cfg`'s training step (its freeze, LoRA, quantized base, optimizer, remat, parameter and
    compute dtypes and gradient accumulation) on `devices` in `cfg.mesh`'s shape, for `batch` (`batch_specs`).
    Returns the mesh, bytes per device of the parameters and the optimizer state, and XLA's memory analysis of the
    per-device program (`arguments`, `outputs`, `aliased`, `temporaries`, `peak`), or `oom` with the temporaries
    the TPU compiler reports when it refuses a program larger than the chip."""
    mesh = shd.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    part = shd.Partitioning(shd.make_mesh(mesh, devices))
    model = abstract_placed(model_config, param_dtype(cfg), part, cfg.quantize, cfg.group_size or None)
    if cfg.attention:
        model = model.set_attention(cfg.attention)
    lora = cfg.lora if cfg.lora.rank > 0 else None
    t0 = time.time()
    parts = step_lib.split(model, cfg.freeze, lora, jax.random.key(cfg.seed))
    # Adapters are small and replicated; every other trainable parameter keeps its place.
    trainable = jax.tree.map(replicated(part), parts.trainable) if lora else parts.trainable
    tx = optim.make(cfg.optim, cfg.steps, parts.fan_in, trainable)
    # The moments are laid out like their parameters (as `step.init_state` makes them under jit).
    opt_state = optax.tree_map_params(
        tx, lambda m, p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=p.sharding),
        jax.eval_shape(tx.init, trainable), trainable, transform_non_params=replicated(part))
    state = step_lib.TrainState(replicated(part)(jax.ShapeDtypeStruct((), jnp.int32)), trainable, opt_state)
    compute = compute_dtype(cfg)
    train_step = step_lib.make_train_step(parts, tx, compute_dtype=compute, remat=cfg.remat, lora=lora,
                                          grad_accum=cfg.optim.grad_accum)
    args = (state, parts.frozen, batch)
    out = {"mesh": dict(zip(shd.MESH_AXES, part.mesh.devices.shape)), "target": describe(devices),
           "params": per_device_bytes((parts.frozen, trainable)),
           "optimizer": per_device_bytes(opt_state)}
    lowered = train_step.lower(*args)
    compile_lowered(lowered, devices, out, t0, args, compiler_options)
    return out


def compile_lowered(lowered, devices, out: dict, t0: float, args, compiler_options: dict | None = None) -> None:
    """Compiles `lowered` for `devices` (lowered since `t0` from the abstract `args`) and adds the times, XLA's
    per-device memory analysis and the number of TPU kernel calls (Mosaic custom calls: the splash attention) to
    `out`. When the TPU compiler refuses a program whose temporaries alone exceed the chip, the temporaries it
    reports are kept (`out["oom"]`) with the arguments' exact bytes (outputs not counted: a training step's alias
    its donated state)."""
    out["lower_s"] = time.time() - t0
    t0 = time.time()
    compiled, temporaries = compile_ahead(lowered, devices, compiler_options)
    out["compile_s"] = time.time() - t0
    if compiled is None:
        out.update(oom=True, kernels=lowered.as_text().count("@tpu_custom_call"), arguments=per_device_bytes(args),
                   outputs=0, aliased=0, temporaries=temporaries)
        out["peak"] = out["arguments"] + out["temporaries"]
        return
    m = compiled.memory_analysis()
    out["compiled"] = compiled
    out["kernels"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes)
    out["peak"] = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


# ---- the command ---------------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture `cfg.model` names, read without its weights: a preset name, a directory holding
    config.json (a checkpoint, an HF directory, a shipped model), or the built-in "shapes"."""
    if cfg.model == "shapes":
        from idefics_jax.shapes import model as shapes_model

        return shapes_model.CONFIG
    if cfg.model in PRESETS:
        return PRESETS[cfg.model]
    path = os.path.join(SHIPPED_DIR, cfg.model) if cfg.model in shipped_models() else cfg.model
    if (as_path(path) / "config.json").exists():  # a local directory or a bucket
        return from_hf_file(path)
    raise ValueError(f"model '{cfg.model}': no config.json there; a dry run needs only the architecture: name a "
                     f"preset (model=NAME; {', '.join(sorted(PRESETS))})")


def image_slots(config: ModelConfig, cfg: TrainConfig) -> int:
    """Sub-images per sample in the largest batch the collator makes: `max_images` images, each split into the
    most tiles its longest edge allows plus the global image (Idefics3 / SmolVLM: tiles of the vision input side
    over `data.longest_edge`, default 4 x that side as their processors do; Idefics2: 4 + 1)."""
    d = cfg.data
    if d.max_images == 0:
        return 0
    if d.image_splitting is False:
        per_image = 1
    elif config.model_type == "idefics2":
        per_image = 5
    else:
        side = config.vision.image_size
        default = side if cfg.model == "shapes" else 4 * side  # the built-in's processor resizes to one tile
        n = math.ceil((d.longest_edge or default) / side)
        per_image = 1 if n == 1 else n * n + 1  # an image within one tile is not split
    return d.max_images * per_image


def dry_run(cfg: TrainConfig, slice_name: str | None = None) -> dict:
    """Compiles `cfg`'s step for the largest batch its data config makes (the longest length bucket, the most
    sub-images), on this host's devices or, with `slice_name` ("v5e-8"), for that TPU slice. -> `compile_step`'s
    figures plus `capacity` (bytes per device: the slice's HBM, an accelerator's memory limit, or this host's
    memory for CPU devices), `fits`, `batch` (B, T, images) and `target`."""
    config = model_config(cfg)
    if slice_name:
        s = tpu.slice_named(slice_name)
        devices, capacity, how = tpu.devices(s), s.hbm_gib * GiB, f"TPU {s.name} (libtpu, ahead of time)"
    else:
        devices = tuple(jax.devices())
        capacity = memory_limit(devices[0]) or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)
        how = describe(devices)
    B, T, images = cfg.data.batch_size, max(cfg.data.length_buckets), image_slots(config, cfg)
    part = shd.Partitioning(shd.make_mesh(shd.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices))
    batch = batch_specs(part, config, B, T, images, packed=cfg.data.packing)
    out = compile_step(config, cfg, devices, batch)
    out.pop("compiled", None)
    out.update(capacity=capacity, fits=not out.get("oom") and out["peak"] <= capacity, batch=(B, T, images),
               target=how)
    return out


def _size(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def report(r: dict) -> str:
    """The dry run in three lines; the last says whether it fits (with the per-device peak when it does not)."""
    g = _size
    B, T, images = r["batch"]
    mesh = ", ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [f"compiled for {r['target']}; mesh {mesh}; batch {B} x {T} tokens, {images} sub-images per sample "
             f"(lowered {r['lower_s']:.1f} s, compiled {r['compile_s']:.1f} s)",
             f"per device: parameters {g(r['params'])}, optimizer state {g(r['optimizer'])}, arguments "
             f"{g(r['arguments'])}, temporaries {g(r['temporaries'])}; peak {g(r['peak'])} of {g(r['capacity'])}"]
    if r["fits"]:
        lines.append("fits")
    else:
        lines.append(f"does not fit: peak {g(r['peak'])} per device, {g(r['capacity'])} available")
    return "\n".join(lines)
