"""Generation speed of idefics-jax next to transformers, on the same random SmolVLM-256M-shaped Idefics3.

SigLIP-B/16 at 512 px (12 layers), 30-layer 576-wide Llama decoder (9 heads / 3 kv heads), vocab 49280, pixel
shuffle 4: built with transformers, saved, converted with `idefics-jax convert`, then for fp32 and bf16 at batch 1
and 8 (one 512 px image and a short question per sample): prefill latency (time to the first token, vision
included), decode tokens/s (all rows, after the first token), compile time, and decode speed as a share of the
memory-bandwidth roofline: decoder + head weight bytes read per step / the read bandwidth measured here (the best
of streaming read kernels: a jitted sum and a matvec over 512 MiB); a STREAM-style copy figure (bytes read + written)
is shown in brackets.

    python bench/generate.py [--workdir out/bench] [--new-tokens 32] [--repeats 3]
    python bench/generate.py --smoke --workdir /tmp/smoke    # the tiny test model, once: checks the script

Times are the best of `--repeats` (the machine may be shared). transformers runs with torch's default thread
count and with one thread; its better figure is the one compared against.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py

GiB = 2**30


def measure_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of simple streaming kernels, best of `repeats`: copies (bytes read + written, as STREAM counts
    them; numpy on one thread, jax in place on all) and a jitted jax sum (read only, like a decode step's weight
    streaming)."""
    import jax
    import jax.numpy as jnp

    def best(fn):
        fn()
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    out = {"numpy copy": 2 * nbytes / best(lambda: np.copyto(dst, src))}
    state = {"x": jnp.asarray(src)}
    scale = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # in place: reads and writes every byte

    def jax_copy():
        state["x"] = scale(state["x"])
        state["x"].block_until_ready()

    out["jax copy"] = 2 * nbytes / best(jax_copy)
    total = jax.jit(jnp.sum)
    out["jax sum (read)"] = nbytes / best(lambda: total(state["x"]).block_until_ready())
    m, v = state["x"].reshape(-1, 4096), jnp.ones(4096, jnp.float32)
    matvec = jax.jit(jnp.matmul)
    out["jax matvec (read)"] = nbytes / best(lambda: matvec(m, v).block_until_ready())
    return out


def decode_weight_bytes(model) -> int:
    """Bytes a decode step must read: every decoder layer, the final norm and the output head (one embedding
    row per token is negligible)."""
    import jax

    text = model.text
    n = sum(a.nbytes for a in jax.tree.leaves(text.layers.weights())) + text.norm[...].nbytes
    head = text.embed[...] if model.config.tie_word_embeddings else model.lm_head[...]
    return n + head.nbytes


def make_inputs(processor, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    import reference as testing

    rng = np.random.default_rng(seed)
    texts, images = [], []
    for i in range(batch):
        q = "What do we see in this image?" + " Describe it." * (i % 3)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.append([testing.random_image(rng, 512, 512)])
    return dict(processor(text=texts, images=images, return_tensors="np", padding=True))


def time_jax(model, inputs, new_tokens: int, repeats: int) -> dict[str, float]:
    import idefics_jax

    B = inputs["input_ids"].shape[0]

    def once():
        t0 = time.perf_counter()
        it = idefics_jax.generate_stream(model, **inputs, max_new_tokens=new_tokens, eos_token_id=[],
                                         chunk_size=new_tokens)
        first = next(it)
        t1 = time.perf_counter()
        rest = next(it)
        t2 = time.perf_counter()
        assert first.shape[1] + rest.shape[1] == new_tokens
        return t1 - t0, t2 - t1

    cold_prefill, cold_decode = once()
    runs = [once() for _ in range(repeats)]
    prefill, decode = min(r[0] for r in runs), min(r[1] for r in runs)
    return {"prefill_s": prefill, "decode_tok_s": B * (new_tokens - 1) / decode,
            "compile_s": (cold_prefill - prefill) + (cold_decode - decode)}


def time_hf(model, inputs, new_tokens: int, repeats: int) -> dict[str, float]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        """Called once per step, right after the step's forward pass."""

        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    B = inputs["input_ids"].shape[0]
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def once():
        stamp = Stamp()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**tensors, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                                 pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
        return stamp.t[0] - t0, stamp.t[-1] - stamp.t[0]

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    prefill, decode = min(r[0] for r in runs), min(r[1] for r in runs)
    return {"prefill_s": prefill, "decode_tok_s": B * (new_tokens - 1) / decode}


def ensure_checkpoint(workdir: str, preset: str = "smolvlm-256m", progress: bool = True) -> tuple[str, str]:
    """A random `preset`-shaped checkpoint (HF directory, its Orbax conversion), built once in `workdir`."""
    from idefics_jax import PRESETS
    import reference as testing
    from idefics_jax.convert.hf_to_orbax import convert

    hf_dir, orbax_dir = os.path.join(workdir, f"{preset}-hf"), os.path.join(workdir, f"{preset}-orbax")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        print(f"building a random {preset}-shaped checkpoint in {hf_dir} ...", file=sys.stderr)
        config = PRESETS[preset].replace(image_token_id=testing.IMAGE_TOKEN_ID)
        testing.save_hf_checkpoint(hf_dir, config, seed=0, tiles_per_side=1)
    if not os.path.exists(orbax_dir):
        convert(hf_dir, orbax_dir, progress=progress)
    return hf_dir, orbax_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/bench")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--smoke", action="store_true", help="the tiny test model, 4 tokens, once, fp32, batches 1 and "
                   "2, a small bandwidth probe: checks the script in seconds (the numbers mean nothing)")
    a = p.parse_args(argv)
    preset, probe_bytes = "smolvlm-256m", 512 * 2**20
    if a.smoke:
        preset, probe_bytes = "tiny", 16 * 2**20
        a.new_tokens, a.repeats, a.batches, a.dtypes = 4, 1, [1, 2], ["float32"]

    import jax
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import idefics_jax

    hf_dir, orbax_dir = ensure_checkpoint(a.workdir, preset, progress=not a.smoke)
    processor = AutoProcessor.from_pretrained(orbax_dir)

    bw = measure_bandwidth(probe_bytes)
    # A decode step only reads weights: its roofline is the read bandwidth. Copies count bytes read + written.
    copy_bw = max(bw["numpy copy"], bw["jax copy"])
    read_bw = max(bw["jax sum (read)"], bw["jax matvec (read)"])
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; torch threads by default: "
          f"{torch.get_num_threads()}")
    print("bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))

    rows = []
    for dtype in a.dtypes:
        model = idefics_jax.load_pretrained(orbax_dir, dtype=dtype)
        weight_bytes = decode_weight_bytes(model)
        results = {}
        for B in a.batches:
            print(f"idefics-jax {dtype} batch {B} ...", file=sys.stderr, flush=True)
            inputs = make_inputs(processor, B)
            results[B] = (inputs, time_jax(model, inputs, a.new_tokens, a.repeats))
        del model
        gc.collect()
        hf = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
        default_threads = torch.get_num_threads()
        for B in a.batches:
            inputs, ours = results[B]
            theirs = {}
            for threads in sorted({default_threads, 1}, reverse=True):
                print(f"transformers {dtype} batch {B} threads {threads} ...", file=sys.stderr, flush=True)
                torch.set_num_threads(threads)
                theirs[threads] = time_hf(hf, inputs, a.new_tokens, a.repeats)
            torch.set_num_threads(default_threads)
            best_hf = max(theirs.values(), key=lambda r: r["decode_tok_s"])
            roofline = B * read_bw / weight_bytes
            rows.append({
                "dtype": dtype, "batch": B, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "weight_bytes": weight_bytes, "jax": ours, "transformers": {str(k): v for k, v in theirs.items()},
                "decode_speedup": ours["decode_tok_s"] / best_hf["decode_tok_s"],
                "prefill_speedup": min(r["prefill_s"] for r in theirs.values()) / ours["prefill_s"],
                "roofline_tok_s": roofline, "roofline_pct": 100 * ours["decode_tok_s"] / roofline,
                "copy_roofline_pct": 100 * ours["decode_tok_s"] * weight_bytes / (B * copy_bw),
            })
        del hf
        gc.collect()

    print(f"\n{a.new_tokens} new tokens, best of {a.repeats}; roofline = batch x {read_bw / 1e9:.1f} GB/s (read) / "
          f"weight bytes per step, in brackets against {copy_bw / 1e9:.1f} GB/s (copy, read + written); "
          "transformers at torch threads T\n")
    head = (f"{'dtype':9} {'batch':>5} {'prompt':>6}  {'impl':16} {'prefill s':>9} {'decode tok/s':>12} "
            f"{'compile s':>9} {'% roofline':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        j = r["jax"]
        print(f"{r['dtype']:9} {r['batch']:>5} {r['prompt_tokens']:>6}  {'idefics-jax':16} {j['prefill_s']:>9.3f} "
              f"{j['decode_tok_s']:>12.2f} {j['compile_s']:>9.1f} {r['roofline_pct']:>8.0f}% "
              f"({r['copy_roofline_pct']:.0f}%)")
        for t, h in r["transformers"].items():
            pct = 100 * h["decode_tok_s"] / r["roofline_tok_s"]
            print(f"{'':9} {'':>5} {'':>6}  {'transformers T=' + t:16} {h['prefill_s']:>9.3f} "
                  f"{h['decode_tok_s']:>12.2f} {'':>9} {pct:>8.0f}%")
        print(f"{'':9} {'':>5} {'':>6}  {'jax / best hf':16} {r['prefill_speedup']:>8.2f}x "
              f"{r['decode_speedup']:>11.2f}x")
    with open(os.path.join(a.workdir, "generate.json"), "w") as f:
        json.dump({"bandwidth": bw, "new_tokens": a.new_tokens, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
