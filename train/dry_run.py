"""`idefics-jax train --dry-run CONFIG`: the config's training step compiled ahead of time for its mesh, with no
weights and no data loaded (abstract arrays carrying their shardings): per-device memory and whether it fits. On
this host's devices, or with `slice_name` for a TPU slice (libtpu compiles it; no TPU needed).

With a cost model (`runtime.hlo_cost`), the step's flops, HBM bytes and collectives per device, every layer
counted; on a TPU slice also the compiler's estimated step time and the MFU it implies.

`compile_step` is the program `bench/memory_plan.py` reports too: one path for both."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import optax

from idefics_jax.checkpoints.checkpoint import abstract_placed
from idefics_jax.checkpoints.registry import architecture
from idefics_jax.model import sharding as shd
from idefics_jax.model.config import ModelConfig
from idefics_jax.model.flops import model_flops
from idefics_jax.ops.platform import compile_lowered, describe, size_text, target
from idefics_jax.runtime import tpu
from idefics_jax.runtime.hlo_cost import Cost, by_depth, program_cost, unrolled_scans
from idefics_jax.train import optim, step as step_lib
from idefics_jax.train.loading import compute_dtype, param_dtype
from idefics_jax.train.config import TrainConfig

GiB = 2**30


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
    trainable = jax.tree.map(shd.replicated(part), parts.trainable) if lora else parts.trainable
    tx = optim.make(cfg.optim, cfg.steps, parts.fan_in, trainable)
    # The moments are laid out like their parameters (as `step.init_state` makes them under jit).
    opt_state = optax.tree_map_params(
        tx, lambda m, p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=p.sharding),
        jax.eval_shape(tx.init, trainable), trainable, transform_non_params=shd.replicated(part))
    state = step_lib.TrainState(shd.replicated(part)(jax.ShapeDtypeStruct((), jnp.int32)), trainable, opt_state)
    compute = compute_dtype(cfg)
    train_step = step_lib.make_train_step(parts, tx, compute_dtype=compute, remat=cfg.remat, lora=lora,
                                          grad_accum=cfg.optim.grad_accum)
    args = (state, parts.frozen, batch)
    out = {"mesh": dict(zip(shd.MESH_AXES, part.mesh.devices.shape)), "target": describe(devices),
           "params": shd.per_device_bytes((parts.frozen, trainable)),
           "optimizer": shd.per_device_bytes(opt_state)}
    lowered = train_step.lower(*args)
    compile_lowered(lowered, devices, out, t0, shd.per_device_bytes(args), compiler_options)
    return out


# ---- the estimated step ------------------------------------------------------------------------------------------
def step_cost(model_config: ModelConfig, cfg: TrainConfig, devices, batch: dict, *,
              compiler_options: dict | None = None) -> Cost:
    """The compiler's cost of `cfg`'s step per device with every layer, loss chunk and micro-batch counted: the
    cost analysis counts a loop body once, so the step is compiled with its scans unrolled at 1 and 2 decoder
    (and vision) layers and extrapolated to the model's depth (`hlo_cost.by_depth`)."""
    def at(text: int, vision: int) -> Cost:
        with unrolled_scans():
            r = compile_step(model_config.with_depth(text, vision), cfg, devices, batch,
                             compiler_options=compiler_options)
        return program_cost(r["compiled"])

    images = "pixel_values" in batch
    return by_depth(at, model_config.text.num_layers, model_config.vision.num_layers if images else 0)


def step_flops(model_config: ModelConfig, cfg: TrainConfig, B: int, T: int, images: int) -> float:
    """Model flops of one step (`model.flops`; remat's recomputation not counted, as MFU defines it): a tower
    whose weights train makes 3 passes (forward, activation and weight gradients), one whose weights stay under
    trained layers above it 2 (LoRA adapters' own flops are negligible), a frozen vision tower 1."""
    lora = cfg.lora.rank > 0
    text_passes = 2 if lora or "text" in cfg.freeze else 3
    vision_lora = lora and any(t.startswith(("vision/", "connector/")) for t in cfg.lora.targets)
    vision_frozen = "vision" in cfg.freeze or (lora and not vision_lora)
    vision_passes = 1 if vision_frozen else (2 if lora else 3)
    return model_flops(model_config, B, T, images, text_passes=text_passes, vision_passes=vision_passes)


# ---- the command ---------------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture `cfg.model` names (`checkpoints.registry.architecture`), or the built-in "shapes"."""
    if cfg.model == "shapes":
        from idefics_jax.shapes import model as shapes_model

        return shapes_model.CONFIG
    return architecture(cfg.model)


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
    devices, capacity, how = target(slice_name)
    B, T, images = cfg.data.batch_size, max(cfg.data.length_buckets), image_slots(config, cfg)
    out = compile_step(config, cfg, devices, _batch(cfg, config, devices, B, T, images))
    out.pop("compiled", None)
    out.update(capacity=capacity, fits=not out.get("oom") and out["peak"] <= capacity, batch=(B, T, images),
               target=how)
    return out


def _batch(cfg: TrainConfig, config: ModelConfig, devices, B: int, T: int, images: int) -> dict:
    part = shd.Partitioning(shd.make_mesh(shd.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices))
    return batch_specs(part, config, B, T, images, packed=cfg.data.packing)


def estimate(cfg: TrainConfig, slice_name: str, plan: dict) -> dict:
    """The TPU compiler's estimate of the step `dry_run` compiled (`plan`) for TPU slice `slice_name` (only the TPU
    compiler estimates time): `cost` (per device, the whole step: `step_cost`, three more compiles), `model_flops`,
    `seconds` and `mfu`."""
    config = model_config(cfg)
    devices, _, _ = target(slice_name)
    cost = step_cost(config, cfg, devices, _batch(cfg, config, devices, *plan["batch"]))
    flops = step_flops(config, cfg, *plan["batch"])
    peak = tpu.slice_named(slice_name).peak_flops
    return {"cost": cost, "model_flops": flops, "seconds": cost.seconds,
            "mfu": flops / (cost.seconds * peak * len(devices))}


def report(r: dict) -> str:
    """The dry run in three lines; the last says whether it fits (with the per-device peak when it does not)."""
    g = size_text
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


def estimate_report(plan: dict, e: dict) -> str:
    """`estimate`'s figures in one line."""
    g = size_text
    B, T, _ = plan["batch"]
    c = e["cost"]
    return (f"the TPU compiler's estimate: step {1e3 * e['seconds']:,.0f} ms, MFU {100 * e['mfu']:.1f}%, "
            f"{B * T / e['seconds']:,.0f} tokens/s; per device {c.flops / 1e12:.2f} TFLOP, HBM {g(c.bytes)}, "
            f"collectives {c.collectives_text(g)} (every layer counted; model {e['model_flops'] / 1e12:.1f} TFLOP "
            "per step)")
