"""Held-out accuracy of the shipped tiny-shapes model, idefics_jax vs transformers.

    python3 bench/eval_tiny_shapes.py [--model tiny-shapes] [--images 300] [--questions N] [--jsonl DIR]
    python3 bench/eval_tiny_shapes.py --images 2     # smallest: seconds

`--jsonl DIR` also writes the same questions as DIR/data.jsonl, for `idefics-jax eval --task exact_match --data
DIR/data.jsonl` to score (the two accuracies agree).

Fresh images from a seed the training never used; every allowed question of each image; greedy answers with
`idefics_jax.generate`, then transformers' `generate` on the same directory for the agreement rate.
"""

import argparse
import sys
import time

from idefics_jax.shapes import evaluate as shapes_eval


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-shapes")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=shapes_eval.EVAL_SEED)
    p.add_argument("--questions", type=int, default=None, help="the first N questions only")
    p.add_argument("--jsonl", default=None, metavar="DIR", help="write the questions as DIR/data.jsonl too")
    a = p.parse_args()
    if a.jsonl:
        path = shapes_eval.write_jsonl(a.jsonl, shapes_eval.questions(a.images, a.seed, a.questions))
        print(f"wrote {path}", file=sys.stderr)
    t = time.perf_counter()
    r = shapes_eval.evaluate(a.model, a.images, seed=a.seed, transformers=True, progress=True, limit=a.questions)
    print(f"{a.model}: {a.images} held-out images (seed {a.seed}), {sum(r.total.values())} questions, "
          f"{time.perf_counter() - t:.0f} s")
    print(r.table())
    print(f"all: {sum(r.right.values())}/{sum(r.total.values())} = {sum(r.right.values()) / sum(r.total.values()):.4f}")
    for q, want, got in r.mistakes[:20]:
        print(f"  wrong: {q!r} expected {want!r} got {got!r}")


if __name__ == "__main__":
    main()
