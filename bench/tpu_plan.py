"""Estimated speed of Idefics3-8B and SmolVLM-2.2B on TPU slices, from the TPU compiler's own cost model.

The programs of `bench/memory_plan.py` (a training step, full bf16 and LoRA; the prefill) and one decode step are
compiled ahead of time by libtpu for each slice's topology (no TPU needed, only `pip install -e '.[aot]'`). Per
chip: the compiled program's memory, and its cost analysis (flops, HBM bytes, the compiler's `optimal_seconds`)
with its collectives by kind (`idefics_jax.runtime.hlo_cost`). The cost analysis counts a loop body once, so the
costs come from the same program with its scans unrolled at 1 and 2 layers, extrapolated linearly to the model's
depth (`layered_cost`; `--smoke` checks this against a whole unrolled program). Derived: estimated MFU (model
flops, vision tower included, over estimated time x peak) and decode tokens/s against the HBM roofline. Every
figure is the compiler's estimate, not a measurement; a calibration (plain matmuls and copies against the chip's
peak, a Llama-3.1-8B-shaped training step against MaxText's published MFU) is printed first.

    python bench/tpu_plan.py [--slices v5e-8,v6e-8] [--models idefics3-8b] [--workloads "train, bf16"]
    python bench/tpu_plan.py --smoke    # the tiny model on 8 CPU devices, the layer arithmetic checked
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_plan as mp  # noqa: E402  (sets the CPU device count and platform before jax loads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from idefics_jax.checkpoints.checkpoint import abstract_placed  # noqa: E402

from idefics_jax.model import sharding as shd  # noqa: E402
from idefics_jax.model.config import ModelConfig  # noqa: E402
from idefics_jax.model.presets import IDEFICS3_8B_LLAMA3, SMOLVLM_2_2B, TINY  # noqa: E402
from idefics_jax.model.flops import model_flops  # noqa: E402
from idefics_jax.runtime import hlo_cost, tpu as tpu_lib  # noqa: E402
from idefics_jax.runtime.hlo_cost import Cost, by_depth, program_cost, unrolled_scans  # noqa: E402
from idefics_jax.serve import dry_run as serve_dry_run  # noqa: E402
from idefics_jax.train.dry_run import step_cost, step_flops  # noqa: E402

GiB = 2**30
Workload = mp.Workload


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 dense, per chip
    hbm_bytes_s: float  # HBM bandwidth, per chip


SMOKE_CHIP = Chip("simulated CPU device (v5e figures)", 197e12, 819e9)


@dataclasses.dataclass(frozen=True)
class Slice:
    platform: mp.Platform
    chip: Chip


SLICES = {name: Slice(mp.tpu_platform(name), Chip(f"TPU {name.split('-')[0]}", s.peak_flops, s.hbm_bytes_s))
          for name, s in tpu_lib.SLICES.items() if name in ("v5e-8", "v6e-8", "v5p-8", "v5e-256", "v6e-256")}
SMOKE_SLICE = Slice(mp.SMOKE_PLATFORMS[0], SMOKE_CHIP)
MODELS = {"idefics3-8b": ("Idefics3-8B", IDEFICS3_8B_LLAMA3), "smolvlm-2.2b": ("SmolVLM-2.2B", SMOLVLM_2_2B)}
# Smoke: the tiny model with more layers, so that loop iterations weigh in the check, and 8 heads of each kind, so
# that tensor parallelism over 8 devices splits them (as Idefics3-8B's 32 and 8 split over a v5e-8).
SMOKE_MODEL = dataclasses.replace(
    TINY, text=dataclasses.replace(TINY.text, num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8,
                                   num_kv_heads=8), vision=dataclasses.replace(TINY.vision, num_layers=3))
# Decode-step presets compared per slice: tensor parallelism over every chip, or FSDP + tensor 4.
DECODE_PRESETS = (("tensor", shd.TENSOR), ("FSDP_TP", shd.FSDP_TP))
DECODE_BATCHES = (1, 8, 64)


def workloads(devices: int, smoke: bool = False) -> tuple[Workload, ...]:
    """Training (one sample per chip), the prefill of 8 prompts, and one decode step per batch and preset."""
    # Smoke: fp32, which XLA:CPU computes as it is (its bf16 programs convert whole stacks to fp32 and back inside
    # loops, which the unrolled reference would not).
    T, I, S, dtype = (64, 1, 128, jnp.float32) if smoke else (2048, 5, 4096, jnp.bfloat16)
    out = [
        Workload("train, bf16 + AdamW", shd.FSDP, dtype, devices, T, I),
        Workload("train, LoRA r16", shd.FSDP, dtype, devices, T, I, lora=16),
        Workload("prefill, batch 8", shd.FSDP_TP, dtype, 8, T, I, cache_slots=S),
    ]
    for b in DECODE_BATCHES:
        for name, mesh in DECODE_PRESETS:
            out.append(Workload(f"decode step, batch {b}, {name}", mesh, dtype, b, 1, 0, cache_slots=S))
    return tuple(out)


def is_decode(w: Workload) -> bool:
    return w.name.startswith("decode")


def compile_decode_step(w: Workload, devices, config: ModelConfig) -> dict:
    """One decode step of `w.batch` rows over `w.cache_slots` columns: the program `idefics-jax serve --dry-run`
    compiles (`serve.dry_run.compile_decode_step`)."""
    part = shd.Partitioning(shd.make_mesh(w.mesh, devices))
    return serve_dry_run.compile_decode_step(config, w.dtype, part, w.batch, w.cache_slots,
                                             compiler_options=mp.CPU_OPTIONS) | {"platform": devices[0].platform,
                                                                                  "optimizer": 0}


def compile_workload(w: Workload, devices, config: ModelConfig) -> dict:
    return compile_decode_step(w, devices, config) if is_decode(w) else mp.compile_program(w, devices, config)


# ---- model flops ---------------------------------------------------------------------------------------------------
def workload_flops(w: Workload, config: ModelConfig) -> float:
    """Model flops of one step of `w` (`model.flops`): training as `train --dry-run` counts them
    (`train.dry_run.step_flops`); inference one pass, the prefill scoring its last token only."""
    if w.training:
        return step_flops(config, mp.train_config(w), w.batch, w.tokens, w.images)
    return model_flops(config, w.batch, w.tokens, w.images, head_tokens=1)


# ---- the plan ------------------------------------------------------------------------------------------------------
def layered_cost(w: Workload, devices, config: ModelConfig) -> Cost:
    """The cost of `w` with every layer and loop iteration counted (`hlo_cost.by_depth`: compiled with its scans
    unrolled at 1 and 2 decoder layers, and 1 and 2 vision layers where it runs the vision tower). Training: the
    estimate `train --dry-run` prints (`train.dry_run.step_cost`)."""
    part = shd.Partitioning(shd.make_mesh(w.mesh, devices))
    if w.training:
        return step_cost(config, mp.train_config(w), devices, mp.batch(w, part, True, config),
                         compiler_options=mp.CPU_OPTIONS)
    if is_decode(w):
        return serve_dry_run.decode_step_cost(config, w.dtype, part, w.batch, w.cache_slots,
                                              compiler_options=mp.CPU_OPTIONS)

    def cost(text: int, vision: int) -> Cost:
        with unrolled_scans():
            return program_cost(compile_workload(w, devices, config.with_depth(text, vision))["compiled"])

    return by_depth(cost, config.text.num_layers, config.vision.num_layers if w.images else 0)


def plan_row(sl: Slice, w: Workload, r: dict, config: ModelConfig, cost: Cost | None) -> dict:
    """The derived figures of `w` on slice `sl`: `r` the compiled program (memory), `cost` its layered cost."""
    row = {"peak": r["peak"], "oom": r.get("oom", False), "mesh": r["mesh"]}
    if cost is None:
        return row
    if cost.bytes < 0 or (cost.seconds is not None and cost.seconds < 0):  # see `calibrate`
        return dict(row, negative=True)
    n = sl.platform.devices
    # Off TPU there is no compiler time estimate: the roofline of the compiler's flops and bytes stands in.
    seconds = cost.seconds if cost.seconds else max(cost.flops / sl.chip.peak_flops, cost.bytes / sl.chip.hbm_bytes_s)
    row.update(cost=cost, seconds=seconds, timed_by="compiler" if cost.seconds else "roofline")
    if is_decode(w):
        roof = (r["params"] + r["kv_cache"]) / sl.chip.hbm_bytes_s
        row.update(tokens_s=w.batch / seconds, roofline_tokens_s=w.batch / roof)
    else:
        row["mfu"] = workload_flops(w, config) / (seconds * sl.chip.peak_flops * n)
        row["tokens_s"] = w.batch * w.tokens / seconds
    return row


def _gib(x) -> str:
    return f"{x / GiB:.2f}"


def _collectives(cost: Cost) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
             "collective-permute": "CP"}
    parts = [f"{short[k]} {v / 2**20:,.0f}" for k, v in sorted(cost.collective_bytes.items()) if v]
    return ", ".join(parts) or "none"


def table(rows) -> str:
    head = ("| model | slice | workload | mesh (data, fsdp, tensor) | peak GiB/chip | TFLOP/chip | HBM GiB/chip "
            "| collectives MiB/chip | est. step ms | est. MFU | est. tokens/s | HBM roofline tokens/s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    out = []
    for model, sl, w, row in rows:
        m = row["mesh"]
        mesh = f"({m['data']}, {m['fsdp']}, {m['tensor']})"
        if "cost" not in row:
            why = "the compiler's estimate is negative" if row.get("negative") else "does not fit"
            out.append(f"| {model} | {sl.platform.name} | {w.name} | {mesh} | {_gib(row['peak'])} ({why}) "
                       "| – | – | – | – | – | – | – |")
            continue
        c = row["cost"]
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "–"
        roof = f"{row['roofline_tokens_s']:,.0f}" if "roofline_tokens_s" in row else "–"
        ms = f"{1e3 * row['seconds']:.2f}" + ("" if row["timed_by"] == "compiler" else " (roofline)")
        out.append(f"| {model} | {sl.platform.name} | {w.name} | {mesh} | {_gib(row['peak'])} | {c.flops / 1e12:.3f} "
                   f"| {_gib(c.bytes)} | {_collectives(c)} | {ms} | {mfu} | {row['tokens_s']:,.0f} | {roof} |")
    return head + "\n".join(out) + "\n"


def mesh_choices(rows) -> str:
    """For each model, slice and decode batch: the preset with the shortest estimated step."""
    best: dict = {}
    for model, sl, w, row in rows:
        if not is_decode(w) or "seconds" not in row:
            continue
        key = (model, sl.platform.name, w.batch)
        preset = w.name.rsplit(", ", 1)[1]
        if key not in best or row["seconds"] < best[key][1]:
            best[key] = (preset, row["seconds"])
    lines = ["| model | slice | decode batch | preset (shortest estimated step) | est. step ms |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m} | {s} | {b} | {p} | {1e3 * sec:.2f} |" for (m, s, b), (p, sec) in best.items()]
    return "\n".join(lines) + "\n"


# ---- calibration ---------------------------------------------------------------------------------------------------
def calibrate(sl: Slice, devices) -> list[tuple[str, str, str, str]]:
    """Plain programs on one chip against its peak: a 4096^3 bf16 matmul (the compiler's flops over its estimated
    time), five decode-shaped matmuls (8 rows by a 4096 x 14336 weight each) and a 512 MiB copy (their arguments
    and results over the estimated time) -> rows (program, estimate, peak, ratio)."""
    one = SingleDeviceSharding(devices[0])
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=one)  # noqa: E731
    out = []

    def estimate(fn, *args):
        compiled = jax.jit(fn).lower(*args).compile()
        c = program_cost(compiled)
        # The HBM traffic of these programs is their arguments read and results written, once each.
        m = compiled.memory_analysis()
        c.bytes = m.argument_size_in_bytes + m.output_size_in_bytes
        return c, c.seconds or max(c.flops / sl.chip.peak_flops, c.bytes / sl.chip.hbm_bytes_s)

    c, s = estimate(lambda a, b: a @ b, sds(4096, 4096), sds(4096, 4096))
    out.append(("matmul 4096^3 bf16", f"{c.flops / s / 1e12:.0f} TFLOP/s", f"{sl.chip.peak_flops / 1e12:.0f}",
                f"{c.flops / s / sl.chip.peak_flops:.0%}"))
    # Five, not ten: v5e's cost model reports a negative time for ten (1.2 GB), as if a 32-bit count overflowed.
    ws = [sds(4096, 14336) for _ in range(5)]
    c, s = estimate(lambda x, ws: [x @ w for w in ws], sds(8, 4096), ws)
    out.append(("5 decode matmuls (8 x 4096 @ 4096 x 14336)", f"{c.bytes / s / 1e9:.0f} GB/s",
                f"{sl.chip.hbm_bytes_s / 1e9:.0f}", f"{c.bytes / s / sl.chip.hbm_bytes_s:.0%}"))
    c, s = estimate(lambda x: x * 2, sds(16384, 16384))
    out.append(("copy 512 MiB bf16 (x * 2)", f"{c.bytes / s / 1e9:.0f} GB/s", f"{sl.chip.hbm_bytes_s / 1e9:.0f}",
                f"{c.bytes / s / sl.chip.hbm_bytes_s:.0%}"))
    return out


LLAMA31_8B = dataclasses.replace(IDEFICS3_8B_LLAMA3,
                                 text=dataclasses.replace(IDEFICS3_8B_LLAMA3.text, vocab_size=128256))
# MaxText's published MFU for Llama-3.1-8B, training on a v6e-256 (its README's v6e table).
MAXTEXT_LLAMA31_8B_V6E = 0.455


def calibrate_llama(sl: Slice, devices, tokens: int) -> dict:
    """A Llama-3.1-8B-shaped text-only training step (bf16, AdamW, FSDP, remat per layer, one sample of `tokens`
    per chip) -> its layered cost, estimated seconds and MFU (its memory is not compiled)."""
    w = Workload(f"Llama-3.1-8B text-only train, {tokens} tokens", shd.FSDP, jnp.bfloat16, sl.platform.devices,
                 tokens, 0)
    cost = layered_cost(w, devices, LLAMA31_8B)
    seconds = cost.seconds or max(cost.flops / sl.chip.peak_flops, cost.bytes / sl.chip.hbm_bytes_s)
    return {"cost": cost, "seconds": seconds,
            "mfu": workload_flops(w, LLAMA31_8B) / (seconds * sl.chip.peak_flops * sl.platform.devices)}


# ---- smoke: the layer arithmetic against a whole unrolled program -------------------------------------------------
def check_layers(devices, config: ModelConfig, loads) -> list[tuple[str, float, float]]:
    """Each program's layered cost (`layered_cost`; `loads`: (workload, that cost) pairs) against the same program
    compiled with all its layers unrolled -> (name, flops ratio, bytes ratio); raises if a ratio is off by more
    than 5% (a decode step: its flops)."""
    out = []
    for w, est in loads:
        with unrolled_scans():
            r = compile_workload(w, devices, config)
        flat, loops = program_cost(r["compiled"]), hlo_cost.collectives(r["compiled"].as_text())[1]
        rf, rb = est.flops / flat.flops, est.bytes / flat.bytes
        out.append((w.name, rf, rb))
        # A decode step's bytes are not linear in depth on XLA:CPU (it copies the stacked KV cache around each
        # layer's update in the unrolled program): its flops are checked, its bytes printed.
        if not (0.95 <= rf <= 1.05 and (is_decode(w) or 0.95 <= rb <= 1.05)):
            raise RuntimeError(f"{w.name}: the layered cost gives {rf:.3f}x the unrolled program's flops and "
                               f"{rb:.3f}x its bytes")
        if any(x.trips and x.trips >= config.text.num_layers for x in loops):
            raise RuntimeError(f"{w.name}: the unrolled program still loops over its layers")
    return out


def check_sharding(devices, config: ModelConfig, train: tuple[Workload, dict], decode_tensor: dict,
                   decode_fsdp_tp: dict) -> list[str]:
    """The presets' collectives on the smoke programs (their compiled HLO, every loop iteration counted): the
    decode step under the tensor preset all-gathers no weight (its all-gathers, if any, carry the rows' tokens:
    under 1% of the weights a device holds), where FSDP_TP's gathers its weight shards; the FSDP training step's
    collective operand bytes are within 10% of the FSDP formula 2 P / n + P (P bytes of parameters over n
    devices: each device gathers its shards in the forward pass and again in the backward one, and contributes its
    whole gradient to the reduction). Raises when a check fails; -> the lines that say what was measured."""
    def gathered(r):
        return hlo_cost.collectives(r["compiled"].as_text())[0].bytes.get("all-gather", 0)

    out = []
    ag, ag_fsdp = gathered(decode_tensor), gathered(decode_fsdp_tp)
    if ag > 0.01 * decode_tensor["params"] or ag_fsdp < 0.1 * decode_fsdp_tp["params"]:
        raise RuntimeError(f"decode step all-gathers {ag:.0f} bytes under the tensor preset ({ag_fsdp:.0f} under "
                           f"FSDP_TP), against {decode_tensor['params']} bytes of weights per device")
    out.append(f"decode step, batch 8: all-gather {ag:.0f} bytes per device under tensor (weights "
               f"{decode_tensor['params']:,}), {ag_fsdp:,.0f} under FSDP_TP")
    w, r = train
    part = shd.Partitioning(shd.make_mesh(w.mesh, devices))
    P = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(nnx.state(abstract_placed(config, w.dtype, part))))
    n = part.mesh.size
    got = hlo_cost.collectives(r["compiled"].as_text())[0].bytes
    formula = 2 * P / n + P
    ratio = sum(got.values()) / formula
    if not 0.9 <= ratio <= 1.1:
        raise RuntimeError(f"{w.name}: collectives move {sum(got.values()):,.0f} operand bytes per device, "
                           f"{ratio:.3f}x the FSDP formula's {formula:,.0f}")
    kinds = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(got.items()))
    out.append(f"{w.name}, FSDP over {n}: collectives {kinds} bytes per device = {ratio:.3f}x the FSDP formula "
               f"2 P / n + P = {formula:,.0f} (P = {P:,} bytes of parameters)")
    return out


def smoke() -> int:
    sl, devices = SMOKE_SLICE, tuple(jax.devices()[:8])
    # The training step and one decode step (the other workloads compile as in bench/memory_plan.py --smoke).
    loads = [w for w in workloads(8, smoke=True)
             if w.training and not w.lora or w.name == "decode step, batch 8, tensor"]
    rows, costs, programs = [], [], []
    for w in loads:
        r = compile_workload(w, devices, SMOKE_MODEL)
        programs.append(r)
        costs.append((w, layered_cost(w, devices, SMOKE_MODEL)))
        rows.append(("tiny", sl, w, plan_row(sl, w, r, SMOKE_MODEL, costs[-1][1])))
    print(table(rows))
    print(mesh_choices(rows))
    print("| program (tiny model, 8 CPU devices) | layered flops / unrolled | layered bytes / unrolled |")
    print("| --- | --- | --- |")
    for name, rf, rb in check_layers(devices, SMOKE_MODEL, [costs[0], costs[-1]]):
        print(f"| {name} | {rf:.3f} | {rb:.3f} |")
    print("layered costs within 5% of the unrolled programs")
    fsdp_tp = next(w for w in workloads(8, smoke=True) if w.name == "decode step, batch 8, FSDP_TP")
    for line in check_sharding(devices, SMOKE_MODEL, (loads[0], programs[0]), programs[-1],
                               compile_workload(fsdp_tp, devices, SMOKE_MODEL)):
        print(line)
    print("sharding checks passed: no weight all-gather in the decode step under tensor; FSDP collectives as the "
          "formula")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny model on 8 CPU devices, loop arithmetic checked")
    ap.add_argument("--slices", default="v5e-8,v6e-8,v5p-8", help=f"comma-separated, of {', '.join(SLICES)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--workloads", default="", help="';'-separated prefixes of workload names to keep, in order")
    ap.add_argument("--calibrate", default="v5e-8", help="slices to calibrate on ('' for none)")
    ap.add_argument("--llama", default="", help="slice for the Llama-3.1-8B calibration step ('' for none)")
    a = ap.parse_args(argv)
    if a.smoke:
        return smoke()
    if not tpu_lib.have_libtpu():
        ap.error("the plan compiles TPU programs: pip install -e '.[aot]' (libtpu) first; --smoke runs without")
    t_start = time.time()
    for name in [s for s in a.calibrate.split(",") if s]:
        sl = SLICES[name]
        devices, _ = mp.target(sl.platform)
        print(f"calibration on {sl.platform.name} (compiler's estimates):")
        for row in calibrate(sl, devices):
            print("  " + " | ".join(row))
    rows = []
    keep = [x.strip() for x in a.workloads.split(";") if x.strip()]
    for key in [m for m in a.models.split(",") if m]:
        label, config = MODELS[key]
        for name in [s for s in a.slices.split(",") if s]:
            sl = SLICES[name]
            devices, compiler = mp.target(sl.platform)
            loads = workloads(sl.platform.devices)
            if keep:  # in the order named
                loads = [w for k in keep for w in loads if w.name.startswith(k)]
            for w in loads:
                t0 = time.time()
                r = compile_workload(w, devices, config)
                cost = layered_cost(w, devices, config) if "compiled" in r else None
                row = plan_row(sl, w, r, config, cost)
                rows.append((label, sl, w, row))
                print(table([rows[-1]]).splitlines()[-1] + f" compiled in {time.time() - t0:.0f} s", flush=True)
    if a.llama:
        sl = SLICES[a.llama]
        devices, _ = mp.target(sl.platform)
        t0 = time.time()
        r = calibrate_llama(sl, devices, 8192)
        print(f"Llama-3.1-8B training step on {sl.platform.name}: est. MFU {100 * r.get('mfu', 0):.1f}% "
              f"(MaxText published {100 * MAXTEXT_LLAMA31_8B_V6E:.1f}% on a v6e-256), step "
              f"{1e3 * r.get('seconds', 0):.0f} ms, compiled in {time.time() - t0:.0f} s", flush=True)
    print(table(rows))
    print(mesh_choices(rows))
    print(f"plan compiled in {time.time() - t_start:.0f} s on {os.cpu_count()} cores", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
