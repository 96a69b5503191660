"""Quantized weights: decode speed and quality, fp32 / bf16 / int8 / int4 side by side in one run.

    python bench/quantize.py speed [--workdir out/bench] [--new-tokens 32] [--repeats 3]
    python bench/quantize.py speed --smoke --workdir /tmp/smoke    # the tiny test model: checks the script
    python bench/quantize.py quality [--images 300]

speed: the random SmolVLM-256M-shaped Idefics3 of `bench/generate.py` (built offline, converted once), loaded in
each format (int8 / int4 quantized while loading from the fp32 checkpoint, computing in fp32): decode tokens/s at
batch 1 and 8 (one 512 px image and a short question per sample), the bytes a decode step reads (decoder layers,
final norm, head), and decode speed as a share of each format's own roofline (batch x read bandwidth / its bytes
per step; the read bandwidth measured here as in `bench/generate.py`). Then the logits' relative error against
fp32 (max |diff| / max |fp32 logit|, same inputs, real tokens only) per format.

quality: the shipped tiny-shapes model on fresh images (every allowed question of each), greedy answers in fp32,
int8 and int4: accuracy per question type, and how often each format's answer equals fp32's.

Times are the best of `--repeats`; the machine may be shared with other work, so they are noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import numpy as np

FORMATS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
           "int8": dict(dtype="float32", quantize="int8"), "int4": dict(dtype="float32", quantize="int4")}


def speed(a) -> int:
    import jax

    import generate as gen  # bench/generate.py
    import idefics_jax
    from transformers import AutoProcessor

    preset, probe_bytes = "smolvlm-256m", 512 * 2**20
    if a.smoke:
        preset, probe_bytes = "tiny", 16 * 2**20
        a.new_tokens, a.repeats, a.batches = 4, 1, [1]
    hf_dir, orbax_dir = gen.ensure_checkpoint(a.workdir, preset, progress=not a.smoke)
    processor = AutoProcessor.from_pretrained(orbax_dir)
    bw = gen.measure_bandwidth(probe_bytes)
    read_bw = max(bw["jax sum (read)"], bw["jax matvec (read)"])
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; read bandwidth {read_bw / 1e9:.1f} GB/s")
    inputs = {B: gen.make_inputs(processor, B) for B in a.batches}
    probe = inputs[min(a.batches)]
    rows, ref_logits = [], None
    for name in a.formats:
        print(f"{name} ...", file=sys.stderr, flush=True)
        model = idefics_jax.load_pretrained(orbax_dir, **FORMATS[name])
        logits = np.asarray(model(**probe), np.float32)
        keep = probe["attention_mask"].astype(bool)
        if ref_logits is None and name == "float32":
            ref_logits = logits
        err = None if ref_logits is None else float(np.abs(logits[keep] - ref_logits[keep]).max()
                                                     / np.abs(ref_logits[keep]).max())
        nbytes = gen.decode_weight_bytes(model)
        for B in a.batches:
            r = gen.time_jax(model, inputs[B], a.new_tokens, a.repeats)
            roofline = B * read_bw / nbytes
            rows.append({"format": name, "batch": B, "weight_bytes": nbytes, "logits_rel_err": err, **r,
                         "roofline_tok_s": roofline, "roofline_pct": 100 * r["decode_tok_s"] / roofline})
        del model
        gc.collect()

    base = {r["batch"]: r["decode_tok_s"] for r in rows if r["format"] == "float32"}
    print(f"\n{a.new_tokens} new tokens, best of {a.repeats}; roofline = batch x {read_bw / 1e9:.1f} GB/s / "
          "bytes read per step\n")
    head = (f"{'format':9} {'batch':>5} {'MiB/step':>9} {'decode tok/s':>12} {'vs fp32':>8} {'% roofline':>10} "
            f"{'prefill s':>9} {'logits rel err':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = f"{r['decode_tok_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        err = "-" if r["logits_rel_err"] is None else f"{r['logits_rel_err']:.2e}"
        print(f"{r['format']:9} {r['batch']:>5} {r['weight_bytes'] / 2**20:>9.1f} {r['decode_tok_s']:>12.2f} "
              f"{vs:>8} {r['roofline_pct']:>9.0f}% {r['prefill_s']:>9.3f} {err:>14}")
    with open(os.path.join(a.workdir, "quantize.json"), "w") as f:
        json.dump({"bandwidth": bw, "new_tokens": a.new_tokens, "rows": rows}, f, indent=2)
    return 0


def quality(a) -> int:
    from transformers import AutoProcessor

    from idefics_jax.generation.chat import Chat, user_turn
    from idefics_jax.checkpoints.load import load_pretrained
    from idefics_jax.checkpoints.registry import resolve
    from idefics_jax.shapes import task as shapes
    from idefics_jax.shapes import evaluate as shapes_eval

    path = resolve(a.model)
    processor = AutoProcessor.from_pretrained(path)
    items = shapes_eval.questions(a.images, a.seed)
    conversations = [(user_turn(q.text, 1), [image]) for image, q in items]
    answers = {}
    for name in ("float32", "int8", "int4"):
        print(f"{name}: {len(items)} questions ...", file=sys.stderr, flush=True)
        chat = Chat(load_pretrained(path, **FORMATS[name]), processor)
        answers[name] = chat.answers(conversations, max_new_tokens=3, batch_size=32)
    print(f"{a.model}: {a.images} fresh images (seed {a.seed}), {len(items)} questions, greedy answers\n")
    print(f"{'format':8} " + " ".join(f"{k:>16}" for k in shapes.KINDS) + f" {'agrees with fp32':>17}")
    for name, got in answers.items():
        cells = []
        for kind in shapes.KINDS:
            idx = [i for i, (_, q) in enumerate(items) if q.kind == kind]
            right = sum(got[i] == items[i][1].answer for i in idx)
            cells.append(f"{right:>5}/{len(idx):<4} {100 * right / max(len(idx), 1):5.1f}%")
        agree = sum(x == y for x, y in zip(got, answers["float32"]))
        print(f"{name:8} " + " ".join(f"{c:>16}" for c in cells) + f" {100 * agree / len(items):>16.1f}%")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--workdir", default="out/bench")
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    s.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    s.add_argument("--smoke", action="store_true", help="the tiny test model, 4 tokens, once, batch 1, a small "
                   "bandwidth probe: checks the script in seconds (the numbers mean nothing)")
    s.set_defaults(fn=speed)
    q = sub.add_parser("quality")
    q.add_argument("--model", default="tiny-shapes")
    q.add_argument("--images", type=int, default=300)
    q.add_argument("--seed", type=int, default=None)
    q.set_defaults(fn=quality)
    a = p.parse_args(argv)
    if a.part == "quality" and a.seed is None:
        from idefics_jax.shapes import evaluate as shapes_eval

        a.seed = shapes_eval.EVAL_SEED
    return a.fn(a)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
