"""One training step (forward, backward, AdamW) of a random SmolVLM-256M-shaped model: ours against transformers +
torch on the same weights and batch, fp32 on this CPU, each side in its own process (so peak RSS is per side).

    python bench/train_step.py            # the issue's batch: 2 samples x 192 tokens, one 512 px image each
    python bench/train_step.py --smoke    # a tiny model, seconds
    python bench/train_step.py --text-layers 4 --vision-layers 3 --remat full --sides jax

Prints step time, tokens/s, MFU (matmul FLOPs of the step over the measured fp32 matmul peak), peak RSS, compile
time (ours: the first call's extra time), the first-step losses and minor page faults per step. Numbers on a
shared machine are noisy: run it when the machine is quiet and read the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(a):
    from idefics_jax import PRESETS
    import reference as testing
    from idefics_jax.model.config import VisionConfig

    if a.smoke:
        return testing.tiny_config()
    c = PRESETS["smolvlm-256m"].replace(image_token_id=testing.IMAGE_TOKEN_ID)
    text = c.text if a.text_layers is None else c.text.__class__(**{**c.text.__dict__, "num_layers": a.text_layers})
    vis = c.vision if a.vision_layers is None else VisionConfig(**{**c.vision.__dict__, "num_layers": a.vision_layers})
    return c.replace(text=text, vision=vis)


def step_flops(c, B: int, T: int, images: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward): every weight matmul and the attention products."""
    t, v = c.text, c.vision
    D, F, N, K, H = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    text = t.num_layers * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + D * t.vocab_size
    S = v.patches_per_side**2
    Dv = v.hidden_size
    vis = v.num_layers * (4 * Dv * Dv + 2 * Dv * v.intermediate_size)
    conn = Dv * c.connector.scale_factor**2 * D  # per image token
    fwd = 2 * B * T * text + 4 * B * T * T * N * H * t.num_layers
    fwd += images * (2 * S * vis + 4 * S * S * Dv * v.num_layers + 2 * (S // c.connector.scale_factor**2) * conn)
    return 3 * fwd


def make_batch(c, B: int, T: int, seed: int = 0) -> dict:
    """B samples of T tokens, each with one image (its image tokens after a short prompt); labels on the text
    after the image."""
    rng = np.random.default_rng(seed)
    n_img = c.image_seq_len
    ids = rng.integers(50, min(c.text.vocab_size, 40000), (B, T)).astype(np.int64)
    ids[:, 4:4 + n_img] = c.image_token_id
    labels = np.where(np.arange(T)[None] >= 4 + n_img + 8, ids, -100)
    P = c.vision.image_size
    return {"input_ids": ids, "attention_mask": np.ones((B, T), np.int64), "labels": labels,
            "pixel_values": rng.standard_normal((B, 1, 3, P, P)).astype(np.float32),
            "pixel_attention_mask": np.ones((B, 1, P, P), bool)}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def side_jax(a) -> dict:
    import optax

    import idefics_jax
    from idefics_jax.train import step as step_lib

    batch = dict(np.load(os.path.join(a.workdir, "batch.npz")))
    batch = {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in batch.items()}
    model = idefics_jax.load_pretrained(os.path.join(a.workdir, "ckpt")).set_attention(a.attention)
    parts = step_lib.split(model)
    del model
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.01))
    step = step_lib.make_train_step(parts, tx, remat=a.remat)
    state = step_lib.init_state(parts.trainable, tx)
    frozen = parts.frozen
    times, losses, faults = [], [], []
    for i in range(a.steps + 1):
        f0, t0 = _faults(), time.perf_counter()
        state, m = step(state, frozen, step_lib.put_batch(batch, None))
        loss = float(m["loss"])
        times.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
        losses.append(loss)
    return {"times": times, "losses": losses, "faults": faults, "compiles": step._cache_size()}


def side_torch(a) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from idefics_jax.ops import heap

    heap.keep_freed_memory()  # what our side's make_train_step applies, for a like-for-like heap
    torch.set_num_threads(os.cpu_count())
    batch = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(a.workdir, "batch.npz")).items()}
    model = AutoModelForImageTextToText.from_pretrained(os.path.join(a.workdir, "ckpt"), dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    times, losses, faults = [], [], []
    for i in range(a.steps + 1):
        f0, t0 = _faults(), time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
    return {"times": times, "losses": losses, "faults": faults}


def matmul_peak() -> float:
    """fp32 FLOP/s of a large square matmul (numpy's BLAS and XLA alike reach about this)."""
    import jax.numpy as jnp

    from idefics_jax.train.trainer import peak_flops

    return peak_flops(jnp.float32, n=2048)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, tiny batch")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=192)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    p.add_argument("--text-layers", type=int, default=None)
    p.add_argument("--vision-layers", type=int, default=None)
    p.add_argument("--remat", default="full", choices=["none", "full", "matmuls"])
    p.add_argument("--attention", default=None, choices=["xla", "cudnn", "pallas"])
    p.add_argument("--sides", default="jax,torch")
    p.add_argument("--system-malloc", action="store_true",
                   help="both sides with glibc's default malloc settings (default: both with idefics_jax.ops.heap's)")
    p.add_argument("--workdir", default="/tmp/bench-train-step")
    p.add_argument("--side", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:
        a.tokens = min(a.tokens, 128)
    if a.side:  # a child: one side, JSON on the last line
        out = side_jax(a) if a.side == "jax" else side_torch(a)
        out["peak_rss_gib"] = _peak_rss_gib()
        print(json.dumps(out))
        return

    import reference as testing
    from idefics_jax.ops import heap

    c = _config(a)
    os.makedirs(a.workdir, exist_ok=True)
    testing.save_hf_checkpoint(os.path.join(a.workdir, "ckpt"), c)
    B, T = a.batch, a.tokens
    np.savez(os.path.join(a.workdir, "batch.npz"), **make_batch(c, B, T))
    flops = step_flops(c, B, T, B)
    peak = matmul_peak()
    results = {}
    for side in a.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side] + [x for x in sys.argv[1:] if x != "--smoke"]
        cmd += ["--smoke"] if a.smoke else []
        env = dict(os.environ)
        if a.system_malloc:
            env[heap.OPT_OUT] = "1"
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(f"{side} side failed:\n{r.stderr[-3000:]}")
        results[side] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"training step, fp32, {os.cpu_count()} CPU cores: batch {B} x {T} tokens, one "
          f"{c.vision.image_size} px image each; text {c.text.num_layers} layers, vision {c.vision.num_layers}; "
          f"ours: remat {a.remat}, attention {a.attention or 'default'}; malloc: "
          f"{'glibc defaults' if a.system_malloc else 'mallopt ' + ', '.join(f'{n}={v}' for _, v, n in heap.SETTINGS)}")
    print(f"matmul FLOPs per step {flops / 1e12:.3f} T; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'':10} {'step s':>8} {'tokens/s':>9} {'MFU':>6} {'peak RSS GiB':>13} {'compile s':>10} "
          f"{'faults/step':>12} {'first loss':>11}")
    for side, r in results.items():
        t = float(np.median(r["times"][1:]))
        comp = r["times"][0] - t
        print(f"{'ours' if side == 'jax' else 'torch':10} {t:8.2f} {B * T / t:9.1f} {flops / t / peak:6.1%} "
              f"{r['peak_rss_gib']:13.2f} {comp if side == 'jax' else 0:10.1f} {np.median(r['faults'][1:]):12.0f} "
              f"{r['losses'][0]:11.6f}")
    if len(results) == 2:
        tj, tt = (float(np.median(results[s]["times"][1:])) for s in ("jax", "torch"))
        print(f"ours / torch speed: {tt / tj:.2f}x; first-step loss difference "
              f"{abs(results['jax']['losses'][0] - results['torch']['losses'][0]):.1e}; "
              f"our step compiled {results['jax']['compiles']} time(s)")


if __name__ == "__main__":
    main()
