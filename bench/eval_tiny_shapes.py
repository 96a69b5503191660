"""Held-out accuracy of the shipped tiny-shapes model (issue 7's acceptance), idefics_jax vs transformers.

    python3 bench/eval_tiny_shapes.py [--model tiny-shapes] [--images 300]
    python3 bench/eval_tiny_shapes.py --images 2     # smallest: seconds

Fresh images from a seed the training never used; every allowed question of each image; greedy answers with
`idefics_jax.generate`, then transformers' `generate` on the same directory for the agreement rate.
"""

import argparse
import time

from idefics_jax.train import shapes_eval


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-shapes")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=shapes_eval.EVAL_SEED)
    a = p.parse_args()
    t = time.perf_counter()
    r = shapes_eval.evaluate(a.model, a.images, seed=a.seed, transformers=True, progress=True)
    print(f"{a.model}: {a.images} held-out images (seed {a.seed}), {sum(r.total.values())} questions, "
          f"{time.perf_counter() - t:.0f} s")
    print(r.table())
    for q, want, got in r.mistakes[:20]:
        print(f"  wrong: {q!r} expected {want!r} got {got!r}")


if __name__ == "__main__":
    main()
