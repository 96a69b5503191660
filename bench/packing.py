"""Packed against bucketed batches on a Cauldron-like length mix: real (non-padding) tokens per second of the
training step and the padding fraction, with the same per-record loss.

    python bench/packing.py            # a small random model (SmolVLM-shaped text, 4 layers), 2048-token rows
    python bench/packing.py --smoke    # the tiny test model, seconds

Records: lengths drawn uniformly from 30 to 1500 tokens (text plus image tokens), 0 to 2 images each. Bucketed:
each record padded to the smallest of the length buckets that fits, `batch` records per step. Packed: records
first-fit into `batch` rows of the longest bucket (`data.packing: true`). Both run the same jitted step (compiled
once per shape, compile excluded) over the same records until all are seen. The machine is shared: noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idefics_jax.train.heap import reexec_with_tunables  # noqa: E402

reexec_with_tunables()


def records(c, n: int, lo: int, hi: int, seed: int = 0):
    """Encoded-like examples: random tokens, image tokens for each image, labels on the last third."""
    from idefics_jax.train.collate import IGNORE_INDEX, Example

    rng = np.random.default_rng(seed)
    S, seq = c.vision.image_size, c.image_seq_len
    out = []
    for _ in range(n):
        images = int(rng.integers(0, 3))
        T = max(int(rng.integers(lo, hi + 1)), images * seq + 8)
        ids = rng.integers(50, min(c.text.vocab_size, 30000), T).astype(np.int32)
        for i in range(images):
            ids[2 + i * seq: 2 + (i + 1) * seq] = c.image_token_id
        labels = np.where(np.arange(T) >= 2 * T // 3, ids, IGNORE_INDEX).astype(np.int32)
        out.append(Example(ids, labels, rng.standard_normal((images, 3, S, S)).astype(np.float32),
                           np.ones((images, S, S), bool)))
    return out


def _collator(c, buckets):
    """`train.collate.Collator`'s padding and packing, without a processor (the records are encoded already)."""
    from idefics_jax.train.collate import CollateConfig, Collator

    col = Collator.__new__(Collator)
    col.config = CollateConfig(length_buckets=tuple(buckets), max_images=2)
    col.image_size, col.channels, col.pad_id, col.image_seq_len = c.vision.image_size, 3, 0, c.image_seq_len
    col.image_buckets = (2,)
    return col


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=4)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    from idefics_jax import PRESETS, testing
    from idefics_jax.config import TextConfig, VisionConfig
    from idefics_jax.model import IdeficsModel
    from flax import nnx
    from idefics_jax.train import step as step_lib

    if a.smoke:
        c, buckets, lo, hi, n = testing.tiny_config(), (64, 128, 256), 10, 200, 12
    else:
        base = PRESETS["smolvlm-256m"]
        c = base.replace(image_token_id=testing.IMAGE_TOKEN_ID,
                         text=TextConfig(**{**base.text.__dict__, "num_layers": a.text_layers}),
                         vision=VisionConfig(**{**base.vision.__dict__, "num_layers": 1, "image_size": 256}))
        buckets, lo, hi, n = (512, 1024, 2048), 30, 1500, a.records
    recs = records(c, n, lo, hi)
    col = _collator(c, buckets)
    model = IdeficsModel(c, rngs=nnx.Rngs(0))
    parts = step_lib.split(model)
    tx = optax.adamw(1e-5)
    step = step_lib.make_train_step(parts, tx, remat="full")

    def bucketed():
        order = sorted(range(len(recs)), key=lambda i: len(recs[i].input_ids))  # like lengths together
        return [col.collate([recs[i] for i in order[j:j + a.batch]], a.batch) for j in range(0, len(order), a.batch)]

    def packed():
        out, rows = [], []
        for e in recs:
            row = next((r for r in rows if col.fits(r, e)), None)
            if row is not None:
                row.append(e)
            elif len(rows) < a.batch:
                rows.append([e])
            else:
                out.append(col.collate_packed(rows, a.batch))
                rows = [[e]]
        return out + [col.collate_packed(rows, a.batch)] if rows else out

    results = {}
    for name, make in (("bucketed", bucketed), ("packed", packed)):
        batches = make()
        state = step_lib.init_state(jax.tree.map(jnp.copy, parts.trainable), tx)
        seen = set()
        for b in batches:  # compile every shape first
            key = (b["input_ids"].shape, b["pixel_values"].shape)
            if key not in seen:
                seen.add(key)
                state, m = step(state, parts.frozen, step_lib.put_batch(b, None))
                float(m["loss"])
        state = step_lib.init_state(jax.tree.map(jnp.copy, parts.trainable), tx)
        t0 = time.perf_counter()
        for b in batches:
            state, m = step(state, parts.frozen, step_lib.put_batch(b, None))
            float(m["loss"])
        dt = time.perf_counter() - t0
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        slots = sum(b["attention_mask"].size for b in batches)
        results[name] = (len(batches), dt, real, slots, len(seen))
        jax.clear_caches()
    print(f"{len(recs)} records, lengths {lo}..{hi} tokens, 0-2 images; batch {a.batch}; buckets {buckets}; "
          f"text {c.text.num_layers} layers, fp32, remat full")
    print(f"{'':10} {'steps':>6} {'shapes':>7} {'seconds':>8} {'real tok/s':>11} {'padding':>8}")
    for name, (steps, dt, real, slots, shapes) in results.items():
        print(f"{name:10} {steps:6d} {shapes:7d} {dt:8.1f} {real / dt:11.1f} {1 - real / slots:8.1%}")
    (_, tb, rb, _, _), (_, tp, rp, _, _) = results["bucketed"], results["packed"]
    print(f"packed / bucketed real tokens/s: {(rp / tp) / (rb / tb):.2f}x")


if __name__ == "__main__":
    main()
