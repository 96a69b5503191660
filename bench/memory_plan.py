"""Per-device memory of Idefics3-8B for fine-tuning and inference on TPU v5e-8, v4-8, v5p-8 and 8x H100.

Each program is lowered and compiled for the full-size model with abstract inputs (nothing is allocated), and
XLA's memory analysis of the compiled per-device program is printed next to a hand estimate. With libtpu
installed (`pip install -e '.[aot]'`, no TPU needed) the TPU rows are compiled ahead of time by the TPU compiler
for the real chip topology (as MaxText's train_compile.py does), with the TPU's default attention, the splash
attention Pallas kernel; without it, and for the GPU rows, they are compiled for simulated CPU devices
(XLA:CPU, the XLA attention path), and the table says which. (libtpu warns that it finds no TPU worker
hostnames or accelerator type: there is no TPU to find; the compiler needs none.)

    python bench/memory_plan.py [--out docs/memory-plan.md]
    python bench/memory_plan.py --quantized [--out docs/memory-plan.md]   # int8 / int4 / QLoRA rows only
    python bench/memory_plan.py --configs [--out docs/memory-plan.md]     # the shipped TPU configs (libtpu)
    python bench/memory_plan.py --smoke     # the same programs (quantized ones too) for the tiny test model: seconds

Caveats: the CPU compiler is not the TPU or GPU one. It schedules, fuses and pads differently (TPU pads the
two minor dimensions to tiles) and computes some bf16 operations in fp32, so treat its compiled temporaries as
the right order of magnitude, not an exact budget. Arguments (parameters, optimizer state, cache) are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# The host's own devices are CPUs even with libtpu installed: TPU programs are compiled for a topology, not run.
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from idefics_jax.model import sharding as shd  # noqa: E402
from idefics_jax.checkpoints.checkpoint import abstract_model, abstract_placed  # noqa: E402
from idefics_jax.model.config import ModelConfig  # noqa: E402
from idefics_jax.model.idefics import KVCache, Mask, positions_from_mask  # noqa: E402
from idefics_jax.model.presets import IDEFICS3_8B_LLAMA3, TINY  # noqa: E402
from idefics_jax.runtime import tpu as tpu_lib  # noqa: E402
from idefics_jax.train import step as train  # noqa: E402
from idefics_jax.train.config import LoraConfig, MeshConfig, OptimConfig, TrainConfig  # noqa: E402
from idefics_jax.model.sharding import per_device_bytes  # noqa: E402
from idefics_jax.ops.platform import compile_lowered  # noqa: E402
from idefics_jax.train.dry_run import batch_specs, compile_step  # noqa: E402

GiB = 2**30
# XLA:CPU compiles the 8B programs several times faster without its backend optimisations; the TPU compiler keeps
# its defaults (they are what a run on the chips gets).
CPU_OPTIONS = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    devices: int  # as jax sees them: a v4 or v5p chip is one device (megacore)
    hbm_gib: float
    # The TPU slice compiled for when libtpu is installed (`runtime.tpu`). None: CPU devices.
    tpu: tpu_lib.Slice | None = None


def tpu_platform(name: str) -> Platform:
    s = tpu_lib.SLICES[name]
    return Platform(f"TPU {name}", s.devices, s.hbm_gib, s)


PLATFORMS = (tpu_platform("v5e-8"), tpu_platform("v4-8"), tpu_platform("v5p-8"),
             Platform("8x H100 80GB", 8, 74.5))  # 80 GB


def target(p: Platform) -> tuple[tuple, str]:
    """-> (the devices `p`'s programs compile for, how they are compiled, for the table): its TPU topology when
    libtpu is installed, else the host's simulated CPU devices."""
    if p.tpu is not None and tpu_lib.have_libtpu():
        devices = tpu_lib.devices(p.tpu)
        return devices, f"libtpu ({devices[0].device_kind})"
    return tuple(jax.devices()[: p.devices]), f"XLA:CPU ({p.devices} CPU devices)"


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    mesh: shd.MeshShape
    dtype: object
    batch: int  # global
    tokens: int  # prompt / training sequence length, image tokens included
    images: int  # image tiles per sample (2x2 split + the global image = 5)
    cache_slots: int = 0  # KV cache length for inference (prompt + generated)
    quantize: str = ""  # "int8" / "int4": matmul weights quantized (QLoRA when training)
    lora: int = 0  # LoRA rank (adapters on the decoder's attention); 0: full fine-tuning

    @property
    def training(self) -> bool:
        return not self.cache_slots


# --smoke: the same programs for the tiny test model, compiled in seconds.
SMOKE_PLATFORMS = (Platform("8 simulated devices", 8, 16),)


def smoke_workloads(devices: int) -> tuple[Workload, ...]:
    return (
        Workload("fine-tune, fp32 params + AdamW", shd.FSDP, jnp.float32, devices, 64, 1),
        Workload("LoRA r4, bf16", shd.FSDP, jnp.bfloat16, devices, 64, 1, lora=4),
        Workload("inference, bf16, batch 8", shd.FSDP_TP, jnp.bfloat16, 8, 64, 1, cache_slots=128),
    )


def workloads(devices: int) -> tuple[Workload, ...]:
    return (
        # Full fine-tuning, AdamW, remat per layer, one sample per device.
        Workload("fine-tune, fp32 params + AdamW", shd.FSDP, jnp.float32, devices, 2048, 5),
        Workload("fine-tune, bf16 params + AdamW", shd.FSDP, jnp.bfloat16, devices, 2048, 5),
        Workload("fine-tune, bf16 params + AdamW, 8192 tokens", shd.FSDP, jnp.bfloat16, devices, 8192, 5),
        Workload("LoRA r16, bf16, 2048 tokens", shd.FSDP, jnp.bfloat16, devices, 2048, 5, lora=16),
        Workload("LoRA r16, bf16, 8192 tokens", shd.FSDP, jnp.bfloat16, devices, 8192, 5, lora=16),
        # Serving batch 8: prefill of a 2048-token prompt into a 4096-slot cache.
        Workload("inference, bf16, batch 8", shd.FSDP_TP, jnp.bfloat16, 8, 2048, 5, cache_slots=4096),
    )


def batch(w: Workload, part: shd.Partitioning, labels: bool, config: ModelConfig) -> dict:
    return batch_specs(part, config, w.batch, w.tokens, w.images, labels=labels)


def train_config(w: Workload, lora: LoraConfig | None = None, compute_dtype: str = "float32") -> TrainConfig:
    """The training config whose step `w` compiles: remat per layer, AdamW, `w`'s mesh, LoRA and quantized base."""
    mesh = MeshConfig(w.mesh.data, w.mesh.fsdp, w.mesh.tensor)
    lora = lora or LoraConfig(rank=w.lora)
    return TrainConfig(steps=1000, remat="full", quantize=w.quantize, compute_dtype=compute_dtype, lora=lora,
                       mesh=mesh, optim=OptimConfig(learning_rate=1e-5, weight_decay=0.1),
                       param_dtype=jnp.dtype(w.dtype).name)


def compile_program(w: Workload, devices, config: ModelConfig) -> dict:
    """Lowers and compiles `w` on `devices`; returns bytes per device by component and XLA's analysis. Training:
    the program `idefics-jax train --dry-run` compiles (`train.dry_run.compile_step`)."""
    part = shd.Partitioning(shd.make_mesh(w.mesh, devices))
    if w.training:
        # The model's attention is the platform's default (`ops.attention.default_backend`): splash on TPU devices.
        out = compile_step(config, train_config(w), devices, batch(w, part, labels=True, config=config),
                           compiler_options=CPU_OPTIONS) | {"platform": devices[0].platform}
    else:
        graphdef, state = nnx.split(abstract_placed(config, w.dtype, part, w.quantize))
        out = {"mesh": dict(zip(shd.MESH_AXES, part.mesh.devices.shape)), "platform": devices[0].platform,
               "params": per_device_bytes(state), "optimizer": 0}
        t0 = time.time()
        inputs = batch(w, part, labels=False, config=config)
        t = config.text
        shape = (t.num_layers, w.batch, t.num_kv_heads, w.cache_slots, t.head_dim)
        kv = jax.ShapeDtypeStruct(shape, w.dtype, sharding=part.sharding(KVCache.AXES, shape))
        out["kv_cache"] = per_device_bytes(KVCache(kv, kv))

        def prefill(state, batch):
            # As `generate` prefills: the prompt's T tokens attend over a cache of T slots (a causal `Mask`, so
            # the platform's kernel), which then grows to all S slots for the tokens to come.
            m = nnx.merge(graphdef, state)
            x = m.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"))
            mask = batch["attention_mask"]
            cache = KVCache.zeros(t, w.batch, w.tokens, w.dtype, part)
            h, cache = m.text(x, positions_from_mask(mask), Mask.decoder(mask, t.sliding_window), cache, 0)
            grow = ((0, 0), (0, 0), (0, 0), (0, w.cache_slots - w.tokens), (0, 0))
            return m.lm_logits(h[:, -1:]), KVCache(jnp.pad(cache.k, grow), jnp.pad(cache.v, grow))

        jitted = jax.jit(prefill, out_shardings=(None, KVCache(kv.sharding, kv.sharding)))
        args = (state, inputs)
        compile_lowered(jitted.lower(*args), devices, out, t0, per_device_bytes(args), CPU_OPTIONS)
    # On TPUs the attention is the splash kernel (`ops.attention.attend`), which holds no (heads, T, T) scores.
    out["hand"] = hand_estimate(w, out["mesh"], config, fused_attention=out["platform"] == "tpu")
    return out


def hand_estimate(w: Workload, mesh: dict, config: ModelConfig, fused_attention: bool = False) -> dict:
    """Back-of-the-envelope bytes per device: parameters split evenly, plus the buffers that dominate.

    Activation terms (B samples per device, T tokens, S cache slots, L layers, N heads per device):
    training (remat per layer): gradients (like the parameters) + two vocabulary-sized matrices live at once
    (lm_head gathered whole and its gradient: the vocabulary, 128259, divides by no mesh axis; the embedding
    table stays width-sharded) + one layer input saved per layer + one layer recomputed (its weights gathered
    twice over, fp32 attention logits B*N*T*T 3 times unless `fused_attention` (the splash kernel keeps only
    tiles of them), MLP) + fp32 scores of one loss chunk twice (scores, gradient).
    Prefill: the embedding table and lm_head gathered whole + the prompt's T-slot cache (grown to S slots after)
    + fp32 attention logits B*N*T*T 3 times (none with `fused_attention`) + one layer's weights and MLP.
    """
    t, v = config.text, config.vision
    b = jnp.dtype(w.dtype).itemsize
    P = sum(math.prod(s.shape) for s in jax.tree.leaves(nnx.state(abstract_model(config))))
    tp = mesh["tensor"]
    est = {"params": P * b / (mesh["fsdp"] * tp)}
    B = w.batch / (mesh["data"] * mesh["fsdp"])  # samples per device
    T, D, V, F, L, H = w.tokens, t.hidden_size, t.vocab_size, t.intermediate_size, t.num_layers, t.head_dim
    N = t.num_heads / tp if t.num_heads % tp == 0 else t.num_heads
    imgs, S_img = B * w.images, v.patches_per_side**2
    layer = (D * (t.num_heads + 2 * t.num_kv_heads) * H + t.num_heads * H * D + 3 * D * F) * b / tp
    vocab = 2 * V * D * b  # embedding table and lm_head, whole
    mlp = B * T * 3 * F / tp * 4
    vision = imgs * S_img * (v.hidden_size + v.intermediate_size / tp) * 4 * 2
    if w.training:
        # AdamW mu and nu in the parameter dtype, and the gradients; LoRA adapters are negligible.
        est["optimizer"] = 0 if w.lora else 2 * est["params"]
        grads = 0 if w.lora else est["params"]
        saved = L * B * T * D * b + v.num_layers * imgs * S_img * v.hidden_size * b
        scores = 0 if fused_attention else 3 * B * N * T * T * 4
        one_layer = 2 * layer + scores + 2 * mlp + vision
        # The loss holds one chunk's fp32 scores (and their gradient), never the whole (B, T, V) logits.
        est["activations"] = grads + vocab + saved + one_layer + 2 * min(B * T, train.LOSS_CHUNK) * V * 4
    else:
        est["optimizer"] = 0
        S = w.cache_slots
        K = t.num_kv_heads / tp if t.num_kv_heads % tp == 0 else t.num_kv_heads
        est["kv_cache"] = 2 * L * B * S * K * H * b
        scores = 0 if fused_attention else 3 * B * N * T * T * 4
        est["activations"] = vocab + est["kv_cache"] * T / S + scores + layer + mlp + vision
    est["total"] = sum(est.values())
    return est


def _g(x) -> str:
    return "–" if x is None else f"{x / GiB:.2f}"


def table(results: list[tuple[Platform, Workload, dict]]) -> str:
    head = ("| platform (devices × HBM) | workload | mesh (data, fsdp, tensor) | params | optimizer | KV cache "
            "| activations: compiled temp / hand | peak: compiled / hand | fits | compiled by, attention |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    rows = []
    for p, w, r in results:
        h = r["hand"]
        mesh = r["mesh"]
        budget = 0.9 * p.hbm_gib * GiB
        fits = "yes" if r["peak"] <= budget else "by hand only" if h["total"] <= budget else "**no**"
        rows.append(
            f"| {p.name} ({p.devices} × {p.hbm_gib:g} GiB) | {w.name} "
            f"| ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) "
            f"| {_g(r['params'])} / {_g(h['params'])} | {_g(r['optimizer'])} / {_g(h['optimizer'])} "
            f"| {_g(r.get('kv_cache'))} / {_g(h.get('kv_cache'))} | {_temp(r)} / {_g(h['activations'])} "
            f"| {_g(r['peak'])} / {_g(h['total'])} | {fits} | {r['compiler']}, {_attention(r)} |")
    return head + "\n".join(rows) + "\n"


def _temp(r: dict) -> str:
    """The compiled temporaries; * where the TPU compiler stopped, out of HBM, and reported only their size."""
    return _g(r["temporaries"]) + ("*" if r.get("oom") else "")


def _attention(r: dict) -> str:
    return "splash kernel" if r["kernels"] else "XLA attention"


def _peak(results, platform: str, workload: str) -> str:
    return next(_g(r["peak"]) for p, w, r in results if p.name == platform and w.name == workload)


def document(results, seconds: float) -> str:
    """The whole of docs/memory-plan.md (`seconds`: how long compiling its programs took)."""
    tpu = list(dict.fromkeys(f"{p.tpu.topology} {p.tpu.chip_config} for the {p.name.removeprefix('TPU ')}"
                             for p, _, r in results if r["platform"] == "tpu"))
    cpu_tpu = sorted({p.name for p, _, r in results if p.tpu and r["platform"] != "tpu"})
    v5e = lambda name: _peak(results, "TPU v5e-8", name)  # noqa: E731
    full_8k = v5e("fine-tune, bf16 params + AdamW, 8192 tokens")
    programs = len({id(r) for _, _, r in results})
    fallback = (f"\n**This file was generated without libtpu: the {', '.join(cpu_tpu)} rows are XLA:CPU compiles of "
                "the XLA attention path, not TPU programs (see the CPU caveat below).**\n") if cpu_tpu else ""
    return f"""# Memory plan: Idefics3-8B on one TPU host or one 8-GPU machine

Per-device GiB for full fine-tuning and for inference of Idefics3-8B-Llama3 (8,462,086,384 parameters). Each
cell reads **compiled / hand**: *compiled* is XLA's memory analysis of the full-size program, lowered with
abstract inputs and compiled (`bench/memory_plan.py`; nothing is allocated); *hand* is the back-of-the-envelope
estimate beside it. The last column says which compiler made each row:

- **TPU rows: the TPU compiler (libtpu)**, ahead of time on a CPU host, for the real chip topology
  (`jax.experimental.topologies`, as MaxText's train_compile.py does): bf16 computed as bf16, TPU tiling and
  scheduling, and the TPU's default attention, the **splash attention Pallas kernel** (the compiled programs
  hold its Mosaic calls; the script checks). No TPU is needed, only libtpu. Without libtpu installed the
  script falls back to XLA:CPU for these rows and says so in the column. Topologies compiled for:
  {", ".join(tpu) or "none in this run"}.
- **8x H100 rows: XLA:CPU** on 8 simulated CPU devices, with the XLA attention path (see the CPU caveat below).
{fallback}
```bash
pip install -e '.[aot]'     # = jax[tpu]: the libtpu matching jax (libtpu==0.0.42.* for jax 0.10.2)
python bench/memory_plan.py --out docs/memory-plan.md
```

Compiling this table's {programs} programs took {seconds / 60:.0f} minutes on a {os.cpu_count()}-core CPU (most of it
the TPU compiler, half a minute to three minutes a training program; the XLA:CPU rows take seconds each).

Parameters, optimizer state and KV cache under *compiled* are the exact bytes of each device's shards; the
activations column is the compiled program's temporaries (activations, gradients, gathered weights); the peak is
arguments + outputs - donated + temporaries. A temporaries figure marked * is the one the TPU compiler reported
when it refused the program because its temporaries alone exceed the chip's HBM; its peak adds the arguments.
"Fits": *yes* when the compiled peak is under 90% of the device's HBM, *by hand only* when only the hand estimate
is, *no* when neither is.

Workloads: fine-tuning is one AdamW step (`train/step.py`'s loss) with remat per layer, one sample per device of
2048 (or 8192) tokens with 5 image tiles (a 2x2 split plus the global image, 364 px, 845 image tokens), mesh
preset `FSDP`.
Inference is the prefill of a batch of 8 such prompts as `generate` runs it: the prompt attends over a cache of
its own 2048 slots, which then grows to the 4096 slots per sample of 2048 prompt + 2048 new tokens; bf16, mesh
preset `FSDP_TP` (tensor 4, the rest FSDP). A v4-8 or v5p-8 is 4 chips, which jax sees as 4 devices (megacore).
LoRA: rank-16 adapters on the decoder's q, k, v, o, everything else frozen.

## How the plan is built

- **The TPU rows are TPU programs**, compiled by libtpu ahead of time. Compiled for simulated CPU devices (the
  H100 rows), the Pallas kernel cannot be lowered and XLA:CPU computes bf16 in fp32 (it converts whole stacked
  bf16 weights, gradients and saved layer inputs to fp32 outside the layer loops: about 5 GiB per device at the
  peak), so those rows measure the CPU compiler as much as the model: on a v5e-8 the same full bf16 fine-tuning
  at 2048 tokens reads 15.76 GiB there against
  **{v5e("fine-tune, bf16 params + AdamW")} GiB** from libtpu, and LoRA at 8192 tokens 36.89 GiB against
  **{v5e("LoRA r16, bf16, 8192 tokens")} GiB** per chip.
- **The splash kernel runs on a mesh.** XLA cannot split a Mosaic kernel call over devices ("Mosaic kernels
  cannot be automatically partitioned"), so `ops.attention.attend` runs it under `shard_map`, each device on its
  own samples and kv heads (as the mesh's rules lay them out; tested on 8 simulated devices), and picks kernel or
  interpreter by the platform of the model's mesh rather than of the host: a program compiled ahead of time for
  TPU devices from a CPU host holds the kernel, not its interpreter.
- **Inference is the prefill `generate` runs**: the prompt attends over its own columns with a causal mask and
  the platform's kernel, and the cache grows afterwards. A prefill attending over all 4096 cache columns through
  a dense (B, T, S) mask would hold fp32 scores of B x heads x 2048 x 4096 (2 GiB per copy on a v4-8).
- **The loss holds no logits.** Cross-entropy runs over the vocabulary 512 tokens at a time, each chunk's
  gradient taken at once (`train.step.chunked_cross_entropy`, a custom VJP): one chunk's scores (0.25 GiB)
  instead of the fp32 (B, T, 128259) logits held about three times (3 GiB per 2048-token sample).
- **The token embedding stays sharded.** Each device looks up its eighth of the width for every token id and
  the rows move to their batch shard; the gradient lands in the device's own slice. Gathering the 128,259 x 4096
  table whole on every device, with a scatter-add gradient into a whole table, would take 3.7 GiB of
  temporaries at once.
- **Full bf16 fine-tuning at 8192 tokens does not fit a v5e-8** ({full_8k} GiB). From the compiled
  program's buffer assignment (XLA dump, memory-usage report), beside the 6 GiB of parameters and moments: the
  remat boundaries, one layer input per layer (32 x 8192 x 4096 bf16 = 2 GiB), the gradients (2 GiB, the
  stacked MLP ones 1.3 GiB of it), the recomputed layer's MLP activations (8192 x 14336 bf16 = 224 MiB each,
  about ten live) and three of the loss's 512 x 128,259 fp32 chunks (0.75 GiB). What would take it under:
  offloading the saved layer inputs to host memory, or splitting the MLP's recompute over the sequence; LoRA
  at 8192 tokens (no weight gradients, no moments) fits as it is, and so does full fine-tuning on a v4-8 or
  v5p-8.

{table(results)}
## Reading it

- **Parameters**: 15.8 GiB in bf16, 31.5 GiB in fp32. They divide by the number of devices except the embedding
  table and lm_head (1 GiB each in bf16): their vocabulary, 128,259, is odd, so they split over `fsdp` along the
  width only, never over `tensor`. That is why inference (tensor 4) holds more than 1/8 of the model per device.
- **Optimizer**: AdamW keeps two moments in the parameter dtype: twice the parameters.
- **KV cache**: 2 x 32 layers x 8 kv heads x 128 x 2 bytes = 128 KiB per token; split over the batch (`fsdp`)
  and the kv heads (`tensor`).
- **Activations** (training): the gradients, one saved layer input per layer (remat), the layer being
  recomputed (its gathered weights and MLP activations), one 512-token chunk of fp32 scores over 128,259 tokens
  in the loss and the lm_head's gradient. With the splash kernel (TPU rows) attention adds only its blocks; with
  XLA's attention (the H100 rows here) it holds fp32 scores of the recomputed layer, 32 heads x T^2 x 4 bytes
  per sample, a few copies: 0.5 GiB each at 2048 tokens and 8 GiB at 8192, most of the 8192-token H100
  rows' temporaries (cuDNN's fused attention on a real H100 would not hold them).
- **The CPU compiler is not the TPU or GPU one** (the H100 rows, and the TPU rows without libtpu): it computes
  bf16 matmuls in fp32, so bf16 programs carry fp32 copies of gathered weights and gradients (the bf16
  fine-tuning temporaries exceed the fp32 ones there); it neither pads to TPU tiles nor schedules like the
  TPU or GPU compiler. Read those rows' temporaries as an upper bound; the argument columns are exact.
- **The hand estimate** splits the parameters evenly and adds the terms above; on TPU rows it counts no
  attention scores (the kernel's). It ignores the TPU compiler's tiling and scheduling, so the compiled figure
  is the one to plan with.

## What fits

- **Full fine-tuning in fp32** (31.5 GiB of parameters, 63 GiB of moments) needs a v5p-8 or an 8x H100: a v5e-8
  (16 GiB) or a v4-8 (32 GiB) cannot even hold the parameters, moments and gradients.
- **Full fine-tuning in bf16** (parameters and moments in bf16, 6 GiB of 16 on a v5e-8) fits a v5e-8 at 2048
  tokens ({v5e("fine-tune, bf16 params + AdamW")} GiB), and every other platform at 8192 tokens.
- **LoRA** keeps the 16 GiB of bf16 weights sharded and trains 0.1 GiB of adapters: it fits everywhere, a v5e-8
  at 8192 tokens included ({v5e("LoRA r16, bf16, 8192 tokens")} GiB).
- **Inference** (batch 8, 2048-token prompts, 4096-slot cache) fits everywhere; the largest terms are the
  parameters (the vocabulary-sized matrices do not split over `tensor`) and the KV cache.

Regenerate with `python bench/memory_plan.py --out docs/memory-plan.md`.
"""


ONE_16 = Platform("one 16 GiB device (TPU v5e-1, T4, L4)", 1, 16, tpu_lib.SLICES["v5e-1"])
V5E_8 = PLATFORMS[0]
QLORA = LoraConfig(rank=16, alpha=32.0)  # q, k, v, o of the decoder


def quantized_workloads(smoke: bool = False) -> tuple[tuple[Platform, Workload], ...]:
    """Issue 15: Idefics3-8B inference int8 / int4 on one 16 GiB device (one prompt, 4096-slot cache) and QLoRA
    int4 fine-tuning on one 16 GiB device and on a v5e-8 (one 2048-token sample per device). `smoke`: the same
    programs for the tiny test model on 1 and 8 simulated devices."""
    one = shd.MeshShape()
    if smoke:
        one_dev, eight = Platform("one simulated device", 1, 16), SMOKE_PLATFORMS[0]
        return (
            (one_dev, Workload("inference, int8 weights, batch 1", one, jnp.bfloat16, 1, 64, 1, 128, "int8")),
            (one_dev, Workload("inference, int4 weights, batch 1", one, jnp.bfloat16, 1, 64, 1, 128, "int4")),
            (one_dev, Workload("QLoRA int4, rank 16, bf16 compute", one, jnp.float32, 1, 64, 1, quantize="int4")),
            (eight, Workload("QLoRA int4, rank 16, bf16 compute", shd.FSDP, jnp.float32, 8, 64, 1, quantize="int4")),
        )
    return (
        (ONE_16, Workload("inference, int8 weights, batch 1", one, jnp.bfloat16, 1, 2048, 5, 4096, "int8")),
        (ONE_16, Workload("inference, int4 weights, batch 1", one, jnp.bfloat16, 1, 2048, 5, 4096, "int4")),
        (ONE_16, Workload("QLoRA int4, rank 16, bf16 compute", one, jnp.float32, 1, 2048, 5, quantize="int4")),
        (V5E_8, Workload("QLoRA int4, rank 16, bf16 compute", shd.FSDP, jnp.float32, 8, 2048, 5, quantize="int4")),
    )


def compile_qlora(w: Workload, devices, config: ModelConfig) -> dict:
    """One QLoRA step (`train/step.py`: frozen quantized base, LoRA adapters + AdamW, remat, bf16 compute) lowered
    and compiled like `compile_program`."""
    part = shd.Partitioning(shd.make_mesh(w.mesh, devices))
    out = compile_step(config, train_config(w, QLORA, "bfloat16"), devices,
                       batch(w, part, labels=True, config=config), compiler_options=CPU_OPTIONS)
    return out | {"platform": devices[0].platform}


def quantized_table(results) -> str:
    head = ("| platform | workload | mesh (data, fsdp, tensor) | params | optimizer | KV cache | compiled temp "
            "| compiled peak | fits (peak < 90% HBM) | compiled by, attention |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    rows = []
    for p, w, r in results:
        mesh = r["mesh"]
        fits = "yes" if r["peak"] <= 0.9 * p.hbm_gib * GiB else "**no**"
        rows.append(f"| {p.name} | {w.name} | ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | {_g(r['params'])} "
                    f"| {_g(r['optimizer'])} | {_g(r.get('kv_cache'))} | {_temp(r)} | {_g(r['peak'])} "
                    f"| {fits} | {r['compiler']}, {_attention(r)} |")
    return head + "\n".join(rows) + "\n"


QUANT_BEGIN, QUANT_END = "<!-- quantized: begin -->", "<!-- quantized: end -->"


def quantized_section(results) -> str:
    return f"""{QUANT_BEGIN}
## Quantized weights (int8 / int4, QLoRA)

Idefics3-8B with its matmul weights quantized (`load_pretrained(quantize=...)`, `convert --quantize`; int8 per
output channel, int4 in groups of 128 along the contraction), compiled as above, the TPU rows by libtpu when it
is installed (the last column says; `python bench/memory_plan.py --quantized --out docs/memory-plan.md` rewrites
this section only). GiB per device. Inference: the prefill of one 2048-token prompt (5 tiles) as `generate` runs
it, into a 4096-slot bf16 KV cache, activations in bf16; the embedding table stays bf16.
QLoRA: one step of `train/step.py` with the int4 base frozen, rank-16 adapters on the decoder's q, k, v, o
(AdamW, fp32), remat per layer, bf16 compute, one 2048-token sample per device; the norms and embedding table
are fp32 master weights (frozen).

{quantized_table(results)}
- int8 holds the decoder at 1 byte per weight and int4 at about 0.53 (codes plus one fp32 scale per 128); the
  bf16 embedding table (1 GiB, not quantized: a lookup) is the largest single full-precision piece.
- QLoRA keeps each adapted weight quantized: the layers add the adapters' low-rank path beside the dequantized
  layer (`idefics_jax.ops.quantize.AdaptedWeight`), so no full-precision copy of the base nor of its gradient exists.
  What remains is the fp32 embedding table (2 GiB; it is frozen and could be bf16), the loss's chunk of fp32
  scores over 128,259 tokens and its gradient, and the remat boundaries. Rows compiled by XLA:CPU compute bf16
  matmuls in fp32 (see above): read their temporaries as an upper bound.
{QUANT_END}
"""


def quantized_main(out_path: str | None, config: ModelConfig, smoke: bool = False) -> int:
    results = []
    for p, w in quantized_workloads(smoke):
        devices, compiler = target(p)
        print(f"compiling {w.name} for {p.name}: {compiler} ...", file=sys.stderr, flush=True)
        fn = compile_qlora if w.training else compile_program
        r = dict(fn(w, devices, config), compiler=compiler)
        if r["platform"] == "tpu" and not r["kernels"]:
            raise RuntimeError(f"{w.name} on {p.name}: the TPU program has no splash attention kernel")
        print(f"  peak {_g(r['peak'])} GiB (compiled in {r['compile_s']:.0f} s)", file=sys.stderr, flush=True)
        results.append((p, w, r))
    section = quantized_section(results)
    print(section)
    if out_path:
        text = open(out_path).read() if os.path.exists(out_path) else ""
        with open(out_path, "w") as f:
            f.write(_with_section(text, section))
    return 0


def _with_section(text: str, section: str, begin: str = QUANT_BEGIN, end: str = QUANT_END) -> str:
    """`text` with its section between `begin` and `end` replaced by `section` (appended where it has none)."""
    if begin in text:
        return text[:text.index(begin)] + section.rstrip("\n") + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + section


# ---- the shipped TPU configs, as `idefics-jax train --dry-run` compiles them ----------------------------------------
CONFIGS_BEGIN, CONFIGS_END = "<!-- shipped configs: begin -->", "<!-- shipped configs: end -->"
SHIPPED = (("idefics3-8b-v5e8-lora", "v5e-8"), ("idefics3-8b-v4-8-full", "v4-8"))
PRESET = "model=idefics3-8b-llama3"  # the configs name a converted checkpoint; the dry run needs the architecture


def configs_table(rows) -> str:
    head = ("| config | compiled for | mesh (data, fsdp, tensor) | batch x tokens, sub-images | params | optimizer | "
            "arguments | temporaries | peak | fits |\n" + "|---" * 10 + "|\n")
    return head + "".join(
        f"| `{name}` | {r['target']} | ({', '.join(str(v) for v in r['mesh'].values())}) | {r['batch'][0]} x "
        f"{r['batch'][1]}, {r['batch'][2]} | {_g(r['params'])} | {_g(r['optimizer'])} | {_g(r['arguments'])} | "
        f"{_g(r['temporaries'])} | {_g(r['peak'])} of {_g(r['capacity'])} | {'yes' if r['fits'] else '**no**'} |\n"
        for name, r in rows)


def configs_main(out_path: str | None, smoke: bool = False) -> int:
    """The shipped TPU configs' training steps for their slices (libtpu), as `idefics-jax train --dry-run CONFIG
    model=idefics3-8b-llama3 --topology SLICE` prints them: the same function. `smoke`: the tiny config on this
    host's devices."""
    from idefics_jax.train import config as config_lib
    from idefics_jax.train.dry_run import dry_run

    if not smoke and not tpu_lib.have_libtpu():
        raise SystemExit("--configs compiles for TPU slices: pip install -e '.[aot]' (libtpu)")
    rows = []
    t0 = time.time()
    for name, slice_name in ([("tiny", None)] if smoke else SHIPPED):
        print(f"compiling {name} for {slice_name or 'this host'} ...", file=sys.stderr, flush=True)
        rows.append((name, dry_run(config_lib.load(name, [] if smoke else [PRESET]), slice_name)))
    elapsed = time.time() - t0
    print(configs_table(rows))
    if out_path:
        section = f"""{CONFIGS_BEGIN}
## The shipped TPU configs

What `idefics-jax train --dry-run CONFIG {PRESET} --topology SLICE` prints for the shipped TPU configs (the same
function, `train/dry_run.py`): each config's own step (its batch, longest bucket and most sub-images, freezing,
LoRA, parameter and compute dtypes, remat, gradient accumulation), compiled by libtpu for its slice. GiB per
device. `python bench/memory_plan.py --configs --out docs/memory-plan.md` rewrites this section
({time.strftime('%Y-%m-%d')}, {elapsed:.0f} s).

{configs_table(rows)}
{CONFIGS_END}
"""
        with open(out_path) as f:
            text = f.read()
        with open(out_path, "w") as f:
            f.write(_with_section(text, section, CONFIGS_BEGIN, CONFIGS_END))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the whole memory plan (markdown) to this file")
    ap.add_argument("--smoke", action="store_true", help="the tiny test model on 1 and 8 devices (checks the "
                    "programs, the quantized ones too)")
    ap.add_argument("--quantized", action="store_true", help="only the quantized rows: rewrites their "
                    "section of --out")
    ap.add_argument("--configs", action="store_true", help="only the shipped TPU configs, as `train --dry-run` "
                    "compiles them (libtpu): rewrites their section of --out")
    ap.add_argument("--platforms", default="", help="comma-separated platform names to keep (default: all)")
    a = ap.parse_args(argv)
    if a.smoke and a.out:
        ap.error("--smoke measures the tiny model, not Idefics3-8B: no --out")
    config, platforms, loads = (TINY, SMOKE_PLATFORMS, smoke_workloads) if a.smoke else \
        (IDEFICS3_8B_LLAMA3, PLATFORMS, workloads)
    if a.quantized:
        return quantized_main(a.out, config, a.smoke)
    if a.configs:
        return configs_main(a.out, a.smoke)
    compiled: dict = {}
    results = []
    keep = [x.strip() for x in a.platforms.split(",") if x.strip()]
    t_start = time.time()
    for p in [p for p in platforms if not keep or p.name in keep]:
        devices, compiler = target(p)
        for w in loads(p.devices):
            key = (devices, w)
            if key not in compiled:  # the same program for the same devices compiles once
                print(f"compiling {w.name} for {p.name}: {compiler} ...", file=sys.stderr, flush=True)
                r = compiled[key] = dict(compile_program(w, devices, config), compiler=compiler)
                print(f"  lowered in {r['lower_s']:.0f} s, compiled in {r['compile_s']:.0f} s; arguments "
                      f"{_g(r['arguments'])} GiB, temporaries {_g(r['temporaries'])} GiB, peak {_g(r['peak'])} GiB "
                      f"({_attention(r)}{', out of HBM' if r.get('oom') else ''})", file=sys.stderr, flush=True)
                if r["platform"] == "tpu" and not r["kernels"]:
                    raise RuntimeError(f"{w.name} on {p.name}: the TPU program has no splash attention kernel")
            results.append((p, w, compiled[key]))
    elapsed = time.time() - t_start
    print(f"compiled {len(compiled)} programs in {elapsed:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    if a.smoke:
        return quantized_main(None, config, smoke=True) or configs_main(None, smoke=True)
    if a.out:
        # The quantized section (`--quantized`) is compiled separately: an existing one is kept.
        old = open(a.out).read() if os.path.exists(a.out) else ""
        text = document(results, elapsed)
        for begin, end in ((QUANT_BEGIN, QUANT_END), (CONFIGS_BEGIN, CONFIGS_END)):
            if begin in old:
                text = _with_section(text, old[old.index(begin):old.index(end) + len(end)], begin, end)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
