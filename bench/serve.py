"""Serving throughput: the continuous-batching engine vs one `generate` at a time vs fixed batches, one run.

The same requests (text questions of a few lengths, answer lengths `max_tokens` drawn uniformly from 4..64, eos
ignored so that every answer has exactly its length: a random model's eos would come at random) all arrive at
once (answer lengths uniform, or log-uniform with --lengths) and are answered three ways on the random SmolVLM-256M-shaped checkpoint of bench/generate.py (built
offline in --workdir if missing):

- sequential: `generate` on one request after another;
- fixed batches of N: `generate` on N requests at a time (as `Chat.answers` batches them), each batch running to
  its longest answer;
- engine: `Engine(slots=N)`, finished slots refilled from the queue at once.

Each way runs twice; the second (warm, nothing compiles) run is reported: throughput = answer tokens / wall time,
and p50 / p95 of the request latency (from the common start to its last token). The engine's answers are checked
to be the sequential ones, token for token.

    python bench/serve.py [--workdir out/bench] [--requests 32] [--slots 8]
    python bench/serve.py --smoke      # a random tiny model, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py


def make_requests(n: int, lo: int, hi: int, lengths: str = "uniform", seed: int = 0):
    """n text questions -> [(messages, max_tokens)]; max_tokens uniform or log-uniform (many short answers, a
    few long ones) in [lo, hi]."""
    rng = np.random.default_rng(seed)
    if lengths == "uniform":
        ms = rng.integers(lo, hi + 1, size=n)
    else:
        ms = np.minimum(np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=n)).astype(int), hi)
    subjects = ["a cat", "the sea at night", "a busy market street", "an old red bicycle", "snow on a mountain"]
    out = []
    for i in range(n):
        q = f"Write a short story about {subjects[i % len(subjects)]}." + " Make it vivid." * int(rng.integers(0, 3))
        out.append(([{"role": "user", "content": [{"type": "text", "text": q}]}], int(ms[i])))
    return out


def sequential(chat, requests, slots):
    from idefics_jax.generation.api import generate

    t0, done, answers = time.perf_counter(), [], []
    for messages, m in requests:
        inputs = chat.inputs(messages)
        answers.append(generate(chat.model, **inputs, max_new_tokens=m, eos_token_id=[])[0, -m:].tolist())
        done.append(time.perf_counter() - t0)
    return done, answers


def fixed_batches(chat, requests, slots):
    from idefics_jax.generation.api import generate

    t0, done, answers = time.perf_counter(), [], []
    for start in range(0, len(requests), slots):
        batch = requests[start:start + slots]
        inputs = chat.batch_inputs([(messages, None) for messages, _ in batch])
        longest = max(m for _, m in batch)
        out = generate(chat.model, **inputs, max_new_tokens=longest, eos_token_id=[])
        T = inputs["input_ids"].shape[1]
        answers += [out[i, T:T + m].tolist() for i, (_, m) in enumerate(batch)]
        done += [time.perf_counter() - t0] * len(batch)
    return done, answers


def engine_run(engine):
    from idefics_jax.serve.engine import Request

    def run(chat, requests, slots):
        t0 = time.perf_counter()
        handles = [engine.submit(Request(messages, None, max_tokens=m, ignore_eos=True), wait=True)
                   for messages, m in requests]
        results = [h.result() for h in handles]
        return [r.t_done - t0 for r in results], [r.tokens for r in results]
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/bench")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--lengths", choices=["uniform", "log-uniform"], default="uniform",
                   help="how answer lengths are drawn in [min, max]")
    p.add_argument("--smoke", action="store_true", help="a random tiny model and 8 short requests (seconds)")
    a = p.parse_args(argv)

    import jax

    from idefics_jax.generation.chat import Chat
    from idefics_jax.generation.api import bucket
    from idefics_jax.checkpoints.registry import PRESETS
    import reference as testing
    from idefics_jax.serve.engine import Engine

    if a.smoke:
        path = os.path.join(a.workdir, "tiny-hf")
        if not os.path.exists(os.path.join(path, "config.json")):
            testing.save_hf_checkpoint(path, seed=1, weight_scale=8.0)
        a.requests, a.slots, a.min_tokens, a.max_tokens = 8, 4, 2, 12
        name = "random tiny Idefics3"
    else:
        from idefics_jax.convert.hf_to_orbax import convert

        hf_dir, path = os.path.join(a.workdir, "smolvlm-256m-hf"), os.path.join(a.workdir, "smolvlm-256m-orbax")
        if not os.path.exists(os.path.join(hf_dir, "config.json")):
            print(f"building a random SmolVLM-256M-shaped checkpoint in {hf_dir} ...", file=sys.stderr)
            config = PRESETS["smolvlm-256m"].replace(image_token_id=testing.IMAGE_TOKEN_ID)
            testing.save_hf_checkpoint(hf_dir, config, seed=0, tiles_per_side=1)
        if not os.path.exists(path):
            convert(hf_dir, path)
        name = "random SmolVLM-256M-shaped, fp32"
    chat = Chat.load(path)
    requests = make_requests(a.requests, a.min_tokens, a.max_tokens, a.lengths)
    tokens = sum(m for _, m in requests)
    # Slots as long as the longest request needs (its prompt's bucket + max tokens): every decode step attends
    # over all of a slot's columns, so spare columns cost time at every step.
    longest_prompt = max(bucket(chat.inputs(msgs)["input_ids"].shape[1]) for msgs, _ in requests)
    engine = Engine(chat.model, chat, slots=a.slots, max_len=longest_prompt + a.max_tokens,
                    max_queue=a.requests).start()
    ways = [("sequential generate", sequential), (f"fixed batches of {a.slots}", fixed_batches),
            (f"engine, {a.slots} slots", engine_run(engine))]
    print(f"{name}; {a.requests} requests, answers {a.min_tokens}-{a.max_tokens} tokens, {a.lengths} ({tokens} in all); "
          f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores", flush=True)
    rows, answers = [], {}
    try:
        for label, fn in ways:
            print(f"{label} ...", file=sys.stderr, flush=True)
            fn(chat, requests, a.slots)  # compiles
            done, answers[label] = fn(chat, requests, a.slots)
            rows.append((label, tokens / max(done), np.percentile(done, 50), np.percentile(done, 95)))
    finally:
        engine.stop()
    same = answers[ways[2][0]] == answers[ways[0][0]]
    print(f"\n| {'':24} | tokens/s | p50 latency | p95 latency |\n|{'-' * 26}|---------:|------------:|------------:|")
    for label, tps, p50, p95 in rows:
        print(f"| {label:24} | {tps:8.1f} | {p50:9.2f} s | {p95:9.2f} s |")
    print(f"\nengine vs fixed batches: {rows[2][1] / rows[1][1]:.2f}x throughput; vs sequential: "
          f"{rows[2][1] / rows[0][1]:.2f}x. Engine answers = sequential generate's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
