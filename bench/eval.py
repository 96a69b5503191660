"""Throughput of `idefics-jax eval` next to a loop of transformers' `generate`, on the same random
SmolVLM-256M-shaped checkpoint and the same samples (what bench/generate.py builds: SigLIP-B/16 at 512 px, a
30-layer 576-wide decoder; one 512 px image and a short question per sample, greedy, a fixed answer length since a
random model rarely stops).

    python bench/eval.py [--workdir out/bench] [--samples 32] [--batch-size 8] [--new-tokens 16]
    python bench/eval.py --smoke --workdir /tmp/smoke    # the tiny test model: checks the script in seconds

idefics-jax eval answers through the serving engine (batch-size slots). It is timed twice in one process: the
first pass includes compiling, the second reuses the compiled functions (what every batch after the first of a
long run costs). transformers runs the same batches (the same processor outputs) through `generate`. The machine
may be shared: numbers are one run, noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py


def write_samples(folder: str, n: int, seed: int = 0) -> str:
    """`n` random 512 px images with short questions, as an eval JSONL file."""
    import reference as testing

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        for i in range(n):
            testing.random_image(rng, 384 + int(rng.integers(0, 128)), 512).save(os.path.join(folder, f"{i}.png"))
            f.write(json.dumps({"image": f"{i}.png", "question": f"What is in picture {i}?", "answers": ["x"]}) + "\n")
    return os.path.join(folder, "data.jsonl")


def time_hf(hf_dir: str, chat, data: str, batch_size: int, new_tokens: int) -> float:
    """Seconds for transformers' greedy `generate` over the samples of `data`, batch by batch (inputs included)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from idefics_jax.evaluate.data import Dataset
    from idefics_jax.evaluate.runner import messages_for

    model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    samples = list(Dataset(data))
    t = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        inputs = chat.batch_inputs([(messages_for(s.question, 1), s.load_images()) for s in batch])
        with torch.no_grad():
            model.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/bench")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="the tiny test model, 8 samples, batch 4, 4 tokens: checks "
                   "the script in seconds (the numbers mean nothing)")
    a = p.parse_args(argv)
    preset = "smolvlm-256m"
    if a.smoke:
        preset, a.samples, a.batch_size, a.new_tokens = "tiny", 8, 4, 4

    import torch

    from idefics_jax.generation.chat import Chat
    from idefics_jax.evaluate import run
    from idefics_jax.evaluate.runner import engine_answerer
    from idefics_jax.serve.engine import Engine

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from generate import ensure_checkpoint  # bench/generate.py's checkpoint (shared when --workdir is)

    hf_dir, orbax_dir = ensure_checkpoint(a.workdir, preset, progress=not a.smoke)
    data = write_samples(os.path.join(a.workdir, f"eval-samples-{a.samples}"), a.samples)
    chat = Chat.load(orbax_dir)
    ours = {}
    # eval's own engine (batch_size slots), kept for both passes; a fixed answer length for both sides: eos ends
    # nothing (ignore_eos here, min_new_tokens for transformers).
    with Engine(chat.model, chat, slots=a.batch_size) as engine:
        fixed = engine_answerer(engine, ignore_eos=True)
        for name in ("first (compiles)", "second"):
            out = os.path.join(a.workdir, "eval-out")
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            run(orbax_dir, "exact_match", data, out, batch_size=a.batch_size, max_new_tokens=a.new_tokens,
                answer_fn=fixed, progress=False)
            ours[name] = time.perf_counter() - t
    theirs = time_hf(hf_dir, chat, data, a.batch_size, a.new_tokens)
    print(f"{a.samples} samples, batch {a.batch_size}, {a.new_tokens} new tokens each, fp32, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    for name, s in ours.items():
        print(f"idefics-jax eval, {name:<16} {s:7.1f} s  {a.samples / s:6.2f} samples/s")
    print(f"transformers generate loop      {theirs:7.1f} s  {a.samples / theirs:6.2f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
