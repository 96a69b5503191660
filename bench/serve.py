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

`--workload caches` measures the prefix and image caches instead, each way on an engine with them off and one
with them on, each run first on a throwaway engine (it compiles what the measured run, on a fresh engine with
empty caches, runs), the answers checked to be the same:

- multi-turn: a 4-turn conversation about one 512 px image (time to the first token of each turn);
- shared prefix: `--shared-requests` requests behind one long system prompt, all at once (throughput, and the
  time to the first token).

    python bench/serve.py --workload caches [--workdir out/bench]
    python bench/serve.py --workload caches --smoke
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


QUESTIONS = ["What is in this picture?", "What colors do you see in it?", "Is there any text in it?",
             "Describe the background, please.", "What would you call it?"]


def conversation(engine, image, turns: int, max_tokens: int):
    """One conversation about `image`, a turn at a time -> [(time to first token, tokens, cached, prompt)]."""
    from idefics_jax.serve.engine import Request

    history, out = [], []
    for i, q in enumerate((QUESTIONS * turns)[:turns]):
        turn = [{"role": "user", "content": [{"type": "image"}] * (i == 0) + [{"type": "text", "text": q}]}]
        r = engine.submit(Request(history + turn, [image], max_tokens=max_tokens, ignore_eos=True)).result()
        out.append((r.t_first - r.t_submit, r.tokens, r.cached_tokens, r.prompt_tokens))
        history += turn + [{"role": "assistant", "content": [{"type": "text", "text": r.text.strip()}]}]
    return out


def system_prompt(words: int, seed: int) -> str:
    """A long system prompt; other seeds give others of the same length in characters."""
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "bravo", "delta", "gamma", "kappa", "omega", "sigma", "theta"]
    return "You are a helpful assistant. Follow these rules: " + " ".join(rng.choice(vocab, words)) + "."


def shared_prefix(engine, n: int, system: str, max_tokens: int):
    """n requests behind one system prompt, all at once -> (wall time, [(ttft, tokens, cached, prompt)])."""
    from idefics_jax.serve.engine import Request

    t0 = time.perf_counter()
    handles = [engine.submit(Request([{"role": "system", "content": [{"type": "text", "text": system}]},
                                      {"role": "user", "content": [{"type": "text", "text": f"Question {i}: "
                                                                     f"{QUESTIONS[i % len(QUESTIONS)]}"}]}],
                                     None, max_tokens=max_tokens, ignore_eos=True), wait=True) for i in range(n)]
    results = [h.result() for h in handles]
    return time.perf_counter() - t0, [(r.t_first - r.t_submit, r.tokens, r.cached_tokens, r.prompt_tokens)
                                      for r in results]


def caches_main(a, chat, name: str) -> int:
    """The caches workload (see the module docstring)."""
    import jax

    import reference as testing
    from idefics_jax.generation.api import bucket
    from idefics_jax.serve.engine import Engine

    rng = np.random.default_rng(0)
    image = testing.random_image(rng, a.image_size, a.image_size)
    system = system_prompt(a.system_words, 1)
    # Slots as long as the longest request needs: the last turn (its answers at most 4 characters a token).
    history = []
    for q in (QUESTIONS * a.turns)[:a.turns]:
        history += [{"role": "user", "content": [{"type": "text", "text": q}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "x" * 4 * a.answer_tokens}]}]
    if history:
        history[0]["content"] = [{"type": "image"}] + history[0]["content"]
        turn_len = bucket(chat.inputs(history[:-1], [image])["input_ids"].shape[1]) + a.answer_tokens
    shared_len = bucket(chat.inputs([{"role": "system", "content": system}, {"role": "user", "content": "x" * 60}])
                        ["input_ids"].shape[1]) + a.answer_tokens
    print(f"{name}; caches off vs on (--prefix-cache-gb {a.prefix_cache_gb}, --image-cache-gb {a.image_cache_gb}); "
          f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores", flush=True)
    turns, shared = {}, {}
    for label, gb, igb in (("off", 0.0, 0.0), ("on", a.prefix_cache_gb, a.image_cache_gb)):
        print(f"multi-turn, caches {label} ...", file=sys.stderr, flush=True)
        for _ in range(2 if a.turns else 0):
            with Engine(chat.model, chat, slots=1, max_len=turn_len, prefix_cache_gb=gb, image_cache_gb=igb) as e:
                turns[label] = conversation(e, image, a.turns, a.answer_tokens)
        print(f"shared prefix, caches {label} ...", file=sys.stderr, flush=True)
        for _ in range(2 if a.shared_requests else 0):
            with Engine(chat.model, chat, slots=a.slots, max_len=shared_len, max_queue=a.shared_requests,
                        prefix_cache_gb=gb, image_cache_gb=igb) as e:
                shared[label] = shared_prefix(e, a.shared_requests, system, a.answer_tokens)
    same = [t[1] for t in turns.get("off", [])] == [t[1] for t in turns.get("on", [])] and \
        [r[1] for r in shared.get("off", (0, []))[1]] == [r[1] for r in shared.get("on", (0, []))[1]]
    if a.turns:
        print_turns(a, turns)
    if a.shared_requests:
        print_shared(a, shared)
    print(f"\nAnswers the same with the caches and without: {same}")
    return 0 if same else 1


def print_turns(a, turns) -> None:
    print(f"\nmulti-turn: {a.turns} turns about one {a.image_size} px image, answers of {a.answer_tokens} tokens\n")
    print("| turn | prompt tokens | cached | time to first token, off | on | speedup |\n"
          "|-----:|--------------:|-------:|-------------------------:|---:|--------:|")
    for i, (off, on) in enumerate(zip(turns["off"], turns["on"])):
        print(f"| {i + 1} | {on[3]} | {on[2]} | {off[0]:.3f} s | {on[0]:.3f} s | {off[0] / on[0]:.1f}x |")
    speedups = [off[0] / on[0] for off, on in zip(turns["off"][1:], turns["on"][1:])]
    if speedups:
        print(f"\nturns 2-{a.turns}: {min(speedups):.1f}x to {max(speedups):.1f}x faster to the first token with "
              "the caches")


def print_shared(a, shared) -> None:
    n_tok = a.shared_requests * a.answer_tokens
    print(f"\nshared prefix: {a.shared_requests} requests, one system prompt, {a.slots} slots, answers of "
          f"{a.answer_tokens} tokens\n")
    print("| caches | prompt tokens | cached | tokens/s | mean time to first token |\n"
          "|--------|--------------:|-------:|---------:|-------------------------:|")
    for label in ("off", "on"):
        wall, rs = shared[label]
        print(f"| {label} | {sum(r[3] for r in rs)} | {sum(r[2] for r in rs)} | {n_tok / wall:.1f} | "
              f"{np.mean([r[0] for r in rs]):.2f} s |")
    print(f"\nshared prefix: {shared['off'][0] / shared['on'][0]:.2f}x throughput with the caches")


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
    p.add_argument("--workload", choices=["batching", "caches"], default="batching",
                   help="batching: the engine vs generate (default); caches: prefix and image caches off vs on")
    p.add_argument("--turns", type=int, default=4, help="caches: turns of the conversation (0: none)")
    p.add_argument("--image-size", type=int, default=512, help="caches: the conversation's image, pixels a side")
    p.add_argument("--shared-requests", type=int, default=64,
                   help="caches: requests sharing a system prompt (0: none)")
    p.add_argument("--system-words", type=int, default=80, help="caches: words of the system prompt")
    p.add_argument("--answer-tokens", type=int, default=16, help="caches: tokens of every answer")
    p.add_argument("--prefix-cache-gb", type=float, default=1.0)
    p.add_argument("--image-cache-gb", type=float, default=0.25)
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
        a.turns, a.image_size, a.shared_requests, a.system_words, a.answer_tokens = 3, 64, 8, 10, 4
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
    if a.workload == "caches":
        return caches_main(a, chat, name)
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
