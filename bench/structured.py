"""Structured output: the grammar libraries' mask speed on our tokenizers, 200 schema-constrained requests through
the engine (all must parse and validate), and the cost of a constrained decode step at batch 8, in one run.

1. Mask speed: the time to compute one step's token mask (and take the token) for an extraction schema, on random
   walks through it, with llguidance (the library used) and, when installed, xgrammar and outlines-core; on the
   random test models' character tokenizer, tiny-shapes' word tokenizer and a SmolLM-like 49k byte-level BPE
   trained offline on the Python sources at hand (in --workdir).
2. Requests: `--requests` chat requests over 5 JSON schemas (greedy and sampled, max_tokens 48-160) through
   `Engine(slots=8)` on the random tiny Idefics3 (character tokenizer): every answer is parsed and validated with
   `jsonschema`; finish reasons counted.
3. Step cost: 8 slots of the random SmolVLM-256M-shaped model (bench/generate.py's, built offline in --workdir)
   decoding with and without a schema (masks from the 49k BPE: a real vocabulary's cost): ms per decode step,
   free rows running `--steps` steps per call and one step per call, constrained rows one step per call with
   their masks computed on the host and sent to the device each step.

    python bench/structured.py [--workdir out/bench] [--requests 200]
    python bench/structured.py --smoke      # tiny model and a few requests (seconds)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                      "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "vendor": {"type": "string"}, "total": {"type": "number"}, "paid": {"type": "boolean"},
        "items": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["name", "qty"]}}},
     "required": ["vendor", "total", "paid", "items"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shape": {"enum": ["circle", "square"]}, "count": {"type": "integer"}},
     "required": ["color", "shape", "count"]},
    {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "boolean"}, {"type": "null"},
                                                           {"type": "number"}]},
                                      "why": {"type": "string"}}, "required": ["answer"]},
]


def bpe_tokenizer(workdir: str):
    """A byte-level BPE of 49152 tokens (SmolLM's size and kind) trained on this Python's own sources: realistic
    token bytes for mask timing, offline."""
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(workdir, "bpe-49k")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        print("training a 49k byte-level BPE on the Python sources ...", file=sys.stderr, flush=True)
        files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))[:3000]

        def texts():
            for f in files:
                try:
                    with open(f, encoding="utf-8") as fh:
                        yield fh.read()
                except (UnicodeDecodeError, OSError):
                    pass

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>"]
        tok.train_from_iterator(texts(), trainers.BpeTrainer(
            vocab_size=49152, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
                                bos_token="<|im_start|>").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _walk_times(fill, consume, reset, V: int, eos: int, steps: int, rng) -> np.ndarray:
    """Seconds per mask over random walks (a token uniform among the allowed ones) until `steps` masks."""
    times = []
    while len(times) < steps:
        reset()
        for _ in range(300):
            t0 = time.perf_counter()
            mask = fill()
            times.append(time.perf_counter() - t0)
            ids = np.flatnonzero(np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), bitorder="little")[:V])
            if not len(ids) or len(times) >= steps:
                break
            t = int(rng.choice(ids))
            if t == eos:
                break
            consume(t)
    return np.asarray(times)


def mask_speed(tokenizers: dict, steps: int) -> list[tuple]:
    """(tokenizer, library, vocab, tokenizer s, compile ms, mean us, p50 us, p99 us) per pair that runs: the
    library's view of the tokenizer is built once per tokenizer, the schema compiled once per schema."""
    import llguidance
    import llguidance.numpy as llnp

    from idefics_jax.generation.structured import Grammars, grammar_source

    schema = SCHEMAS[1]
    rows = []
    for tname, tok in tokenizers.items():
        V, eos = len(tok), tok.eos_token_id
        rng = np.random.default_rng(0)
        grammars = Grammars(tok, V, [eos])
        t0 = time.perf_counter()
        grammars.lltokenizer
        tok_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(grammars.lltokenizer, grammar_source(
            {"type": "json_schema", "json_schema": {"schema": schema}}), log_level=0)
        compile_ms = (time.perf_counter() - t0) * 1e3
        if m.is_error():  # tiny-shapes' words cannot write JSON
            rows.append((tname, "llguidance", V, tok_s, compile_ms, None, None, None))
            continue
        bm = np.zeros((1, (V + 31) // 32), np.int32)

        def fill():
            llnp.fill_next_token_bitmask(m, bm, 0)
            return bm[0]

        t = _walk_times(fill, m.consume_token, m.reset, V, eos, steps, rng) * 1e6
        rows.append((tname, "llguidance", V, tok_s, compile_ms, t.mean(), np.median(t), np.percentile(t, 99)))
        try:
            import xgrammar as xgr

            t0 = time.perf_counter()
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
            compiler = xgr.GrammarCompiler(info, max_threads=1)
            tok_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            xm = xgr.GrammarMatcher(compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False))
            compile_ms = (time.perf_counter() - t0) * 1e3
            xb = xgr.allocate_token_bitmask(1, V)

            def xfill():
                xm.fill_next_token_bitmask(xb)
                return xb.numpy()[0]

            t = _walk_times(xfill, xm.accept_token, xm.reset, V, eos, steps, rng) * 1e6
            rows.append((tname, "xgrammar", V, tok_s, compile_ms, t.mean(), np.median(t), np.percentile(t, 99)))
        except ImportError:
            pass
        try:
            from outlines_core import Guide, Index, Vocabulary
            from outlines_core.json_schema import build_regex_from_schema

            t0 = time.perf_counter()
            vocab: dict[bytes, list[int]] = {}
            for s, i in tok.get_vocab().items():
                if i != eos and s not in tok.all_special_tokens:
                    vocab.setdefault(tok.convert_tokens_to_string([s]).encode(), []).append(i)
            vocabulary = Vocabulary(eos, vocab)
            tok_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            gd = Guide(Index(build_regex_from_schema(json.dumps(schema)), vocabulary))
            compile_ms = (time.perf_counter() - t0) * 1e3
            ob = np.zeros((1, (V + 31) // 32), np.int32)

            def ofill():
                gd.write_mask_into(ob.ctypes.data, ob.size, ob.itemsize)
                return ob[0]

            t = _walk_times(ofill, gd.advance, gd.reset, V, eos, steps, rng) * 1e6
            rows.append((tname, "outlines-core", V, tok_s, compile_ms, t.mean(), np.median(t), np.percentile(t, 99)))
        except ImportError:
            pass
        except ValueError:  # its regex needs characters the vocabulary lacks
            rows.append((tname, "outlines-core", V, tok_s, None, None, None, None))
    return rows


def requests_run(chat, n: int, seed: int = 0) -> tuple[int, dict, float, int]:
    """n requests over SCHEMAS through the engine -> (valid answers, finish reasons, seconds, tokens)."""
    import jsonschema

    from idefics_jax.generation.chat import user_turn
    from idefics_jax.serve.engine import Engine, Request

    rng = np.random.default_rng(seed)
    questions = ["Extract the fields.", "Describe the image as JSON.", "What is in it?", "List the parts."]
    reqs = []
    for i in range(n):
        schema = SCHEMAS[i % len(SCHEMAS)]
        reqs.append((schema, Request(user_turn(questions[i % 4] + " " * int(rng.integers(0, 3))),
                                     max_tokens=int(rng.integers(48, 161)), temperature=float(i % 2),
                                     seed=i, response_format={"type": "json_schema",
                                                              "json_schema": {"name": f"s{i % 5}", "schema": schema}})))
    valid, reasons, tokens = 0, {}, 0
    with Engine(chat.model, chat, slots=8, max_len=256, max_queue=n) as engine:
        t0 = time.perf_counter()
        handles = [(schema, engine.submit(r, wait=True)) for schema, r in reqs]
        for schema, h in handles:
            r = h.result()
            reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
            tokens += len(r.tokens)
            try:
                jsonschema.validate(json.loads(r.text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as e:
                print(f"INVALID ({r.finish_reason}): {r.text!r}: {e}", file=sys.stderr)
        seconds = time.perf_counter() - t0
    return valid, reasons, seconds, tokens


def step_cost(chat, grammars, steps: int, tokens: int, repeats: int) -> dict:
    """ms per decode step of 8 slots: free rows (`steps` per call, and 1 per call) and constrained rows; each
    configuration timed `repeats` times interleaved, the median kept. Also the host's mask work per step."""
    from idefics_jax.generation.sampling import SamplingParams
    from idefics_jax.serve.slots import SlotDecoder

    inputs = chat.inputs("Extract the fields of this invoice as JSON.")
    T = inputs["input_ids"].shape[1]
    dec = SlotDecoder(chat.model, slots=8, max_len=bucket_of(T) + tokens)
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMAS[1]}}
    grammar = grammars.compile(fmt)

    def run(kind: str) -> float:
        constrained = kind == "schema"
        sampling = SamplingParams(max_new_tokens=tokens, do_sample=True, temperature=1.0, ignore_eos=not constrained)
        pres = dec.prefill_many([dec.prepare(**inputs, sampling=sampling, constraint=grammar.start(tokens)
                                             if constrained else None) for _ in range(8)])
        for slot, pre in enumerate(pres):
            dec.insert(pre, slot)
        per_call = 1 if kind != "free" else steps
        n_steps = 0
        t0 = time.perf_counter()
        while not np.all(np.asarray(dec.state.done_B)):
            _, counts, _ = dec.decode(per_call)
            n_steps += int(counts.max())
        elapsed = time.perf_counter() - t0
        return elapsed / max(n_steps, 1) * 1e3

    for kind in ("free", "free-1", "schema"):  # compile
        run(kind)
    times: dict[str, list[float]] = {"free": [], "free-1": [], "schema": []}
    for _ in range(repeats):
        for kind in times:
            times[kind].append(run(kind))
    # The host's share: masks for 8 rows and taking their tokens, per step, on random walks.
    rng = np.random.default_rng(0)
    from idefics_jax.generation.structured import RowMasks

    masks = RowMasks(8, chat.model.config.text.vocab_size)
    for r in range(8):
        masks.set(r, grammar.start(tokens))
    V = grammars.vocab_size
    host, produced = [], 0
    while produced < tokens - 1 and masks:
        t0 = time.perf_counter()
        allowed = masks.masks([produced] * 8)
        t1 = time.perf_counter()
        picks = []  # the model's part: a token among the allowed ones (not timed)
        for r in list(masks.rows):
            ids = np.flatnonzero(np.unpackbits(allowed[r].view(np.uint8), bitorder="little")[:V])
            picks.append((r, int(rng.choice(ids))))
        t2 = time.perf_counter()
        for r, t in picks:
            masks.advance(r, [t])
            if t in grammars.eos:
                masks.clear(r)
        host.append(time.perf_counter() - t2 + (t1 - t0))
        produced += 1
    return {k: float(np.median(v)) for k, v in times.items()} | {"host": float(np.mean(host) * 1e3)}


def bucket_of(T: int) -> int:
    from idefics_jax.generation.prompt import bucket

    return bucket(T)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/bench")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--mask-steps", type=int, default=3000, help="masks timed per tokenizer and library")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per slot in the step-cost runs")
    p.add_argument("--steps", type=int, default=4, help="decode steps per call for free rows (the engine's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="masks,requests,steps", help="which of the three to run (comma-separated)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 5 requests, no BPE (a minute)")
    a = p.parse_args(argv)

    from idefics_jax.convert.hf_files import char_tokenizer
    from idefics_jax.generation.chat import Chat
    from idefics_jax.shapes.model import tokenizer as shapes_tokenizer
    import reference as testing

    print(f"{cpu_model()}, {os.cpu_count()} cores", flush=True)
    tokenizers = {"character (tests)": char_tokenizer(), "tiny-shapes words": shapes_tokenizer()}
    if a.smoke:
        a.requests, a.mask_steps, a.tokens, a.repeats = 5, 200, 64, 1
    else:
        tokenizers["49k byte-level BPE"] = bpe_tokenizer(a.workdir)

    parts = set(a.parts.split(","))
    if "masks" in parts:
        print_mask_speed(tokenizers, a.mask_steps)
    tiny = os.path.join(a.workdir, "tiny-lively-hf")
    if not os.path.exists(os.path.join(tiny, "config.json")):
        testing.save_hf_checkpoint(tiny, seed=1, weight_scale=8.0)
    chat = Chat.load(tiny)
    valid = a.requests
    if "requests" in parts:
        valid, reasons, seconds, tokens = requests_run(chat, a.requests)
        print(f"\n## {a.requests} requests over {len(SCHEMAS)} schemas, random tiny Idefics3, engine with 8 slots\n")
        print(f"valid (parsed and validated with jsonschema): {valid}/{a.requests}; finish reasons {reasons}; "
              f"{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s)", flush=True)
    if "steps" in parts:
        print_step_cost(a, chat, tokenizers)
    return 0 if valid == a.requests else 1


def print_mask_speed(tokenizers: dict, steps: int) -> None:
    print("\n## mask per step (extraction schema, random walks)\n")
    print("| tokenizer | library | vocab | tokenizer s | schema ms | mask mean us | p50 us | p99 us |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for tname, lib, V, ts, c, mean, p50, p99 in mask_speed(tokenizers, steps):
        print(f"| {tname} | {lib} | {V} | {fmt(ts, '.2f')} | {fmt(c, '.1f')} | {fmt(mean, '.1f')} | "
              f"{fmt(p50, '.1f')} | {fmt(p99, '.1f')} |", flush=True)


def print_step_cost(a, chat, tokenizers: dict) -> None:
    from idefics_jax.generation.chat import Chat
    from idefics_jax.generation.structured import Grammars
    import reference as testing

    if a.smoke:
        name, big, grammars = "random tiny Idefics3", chat, chat.grammars
    else:
        from idefics_jax.checkpoints.registry import PRESETS
        from idefics_jax.convert.hf_to_orbax import convert

        hf_dir, path = os.path.join(a.workdir, "smolvlm-256m-hf"), os.path.join(a.workdir, "smolvlm-256m-orbax")
        if not os.path.exists(os.path.join(hf_dir, "config.json")):
            print(f"building a random SmolVLM-256M-shaped checkpoint in {hf_dir} ...", file=sys.stderr)
            config = PRESETS["smolvlm-256m"].replace(image_token_id=testing.IMAGE_TOKEN_ID)
            testing.save_hf_checkpoint(hf_dir, config, seed=0, tiles_per_side=1)
        if not os.path.exists(path):
            convert(hf_dir, path)
        big = Chat.load(path)
        bpe = tokenizers["49k byte-level BPE"]
        name = "random SmolVLM-256M-shaped, fp32, masks of the 49k BPE"
        grammars = Grammars(bpe, big.model.config.text.vocab_size, big.model.generation_defaults.eos_token_ids)
    cost = step_cost(big, grammars, a.steps, a.tokens, a.repeats)
    print(f"\n## decode step at batch 8: {name}\n")
    print("| rows | ms per step |\n|---|---:|")
    print(f"| free, {a.steps} steps per call | {cost['free']:.2f} |\n| free, 1 step per call | {cost['free-1']:.2f} |\n"
          f"| JSON schema, 1 step per call | {cost['schema']:.2f} |")
    print(f"\nschema vs free ({a.steps} steps per call): {100 * (cost['schema'] / cost['free'] - 1):+.1f}% per step; "
          f"host mask work {cost['host']:.2f} ms per step for 8 rows ({100 * cost['host'] / cost['free']:.1f}% "
          "of a free step)")


if __name__ == "__main__":
    sys.exit(main())
