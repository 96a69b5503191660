"""Packed against bucketed batches on a Cauldron-like length mix: real (non-padding) tokens per second of the
training step and the padding fraction, with the same per-record loss.

    python bench/packing.py            # a small random model (SmolVLM-shaped text, 4 layers), 2048-token rows
    python bench/packing.py --smoke    # the tiny test model, seconds

Records: lengths drawn uniformly from 30 to 1500 tokens (text plus image tokens), 0 to 2 images each. Batches
come from the training loader (`train.data.batches`) over the same records in the same order:
- bucketed: `data.packing: false`, `batch` records per step, padded to the smallest length bucket that fits;
- packed: `data.packing: true`, records packed into `batch` rows of up to the longest bucket from records read
  ahead (`--window` batches' worth of tokens; each row padded to its own length bucket);
- length-sorted buckets, for reference: as bucketed, but the records sorted by length first, so that each batch
  holds like lengths (the least padding buckets can give; the loader does not do it, it would order the data).
All run the same jitted step (compiled once per shape, compile excluded) until every record is seen. The machine
is shared: noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--window", type=float, default=3.0,
                   help="batches' worth of tokens the packer reads ahead (data.pack_window)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=4)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    from idefics_jax import PRESETS

    import reference as testing
    from idefics_jax.model.config import TextConfig, VisionConfig
    from idefics_jax.model.idefics import IdeficsModel
    from flax import nnx
    from idefics_jax.train import step as step_lib

    if a.smoke:
        c, buckets, lo, hi, n = testing.tiny_config(), (64, 128, 256), 10, 200, min(a.records, 12)
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

    def loader(packing: bool, examples):
        import grain

        from idefics_jax.train import data

        cfg = data.LoaderConfig(batch_size=a.batch, shuffle=False, num_epochs=1, drop_remainder=False,
                                packing=packing, pack_window=a.window)
        return list(data.Batches(grain.MapDataset.source([(0, e) for e in examples]).to_iter_dataset(), col, cfg,
                                 len(examples)))

    runs = (("bucketed", lambda: loader(False, recs)), ("packed", lambda: loader(True, recs)),
            ("length-sorted buckets", lambda: loader(False, sorted(recs, key=lambda e: len(e.input_ids)))))

    results = {}
    for name, make in runs:
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
    print(f"{len(recs)} records, lengths {lo}..{hi} tokens, 0-2 images; batch {a.batch}; buckets {buckets}; "
          f"text {c.text.num_layers} layers, fp32, remat full")
    print(f"{'':22} {'steps':>6} {'shapes':>7} {'seconds':>8} {'real tok/s':>11} {'padding':>8}")
    for name, (steps, dt, real, slots, shapes) in results.items():
        print(f"{name:22} {steps:6d} {shapes:7d} {dt:8.1f} {real / dt:11.1f} {1 - real / slots:8.1%}")
    speed = {name: real / dt for name, (_, dt, real, _, _) in results.items()}
    print(f"packed / bucketed real tokens/s: {speed['packed'] / speed['bucketed']:.2f}x "
          f"(/ length-sorted buckets: {speed['packed'] / speed['length-sorted buckets']:.2f}x)")


if __name__ == "__main__":
    main()
