"""Compile time of the full forward pass (vision + connector + decoder) of a SmolVLM-256M-shaped model.

Lowered and compiled from abstract shapes (no weights needed), at the preset's depth and at 2 layers, to show
that scanning the stacked layers keeps compile time flat in depth.

    python bench/compile_time.py [--preset smolvlm-256m] [--images 5] [--tokens 512]
    python bench/compile_time.py --preset tiny --images 1 --tokens 32    # smallest: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from idefics_jax import PRESETS
from idefics_jax.checkpoints.checkpoint import abstract_model


def compile_seconds(config, batch, images, tokens) -> tuple[float, float]:
    graphdef, state = nnx.split(abstract_model(config))
    side = config.vision.image_size

    @jax.jit
    def forward(state, ids, mask, pixels, pixel_mask):
        return nnx.merge(graphdef, state).forward(ids, mask, pixels, pixel_mask)

    args = (
        state,
        jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
        jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
        jax.ShapeDtypeStruct((batch, images, 3, side, side), jnp.float32),
        jax.ShapeDtypeStruct((batch, images, side, side), jnp.bool_),
    )
    t0 = time.perf_counter()
    lowered = forward.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smolvlm-256m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--tokens", type=int, default=512)
    a = p.parse_args()
    full = PRESETS[a.preset]
    shallow = full.replace(vision=dataclasses.replace(full.vision, num_layers=2),
                           text=dataclasses.replace(full.text, num_layers=2))
    print(f"{a.preset}: batch {a.batch}, {a.images} images of {full.vision.image_size} px, {a.tokens} tokens, "
          f"backend {jax.default_backend()}")
    for name, cfg in (("2 + 2 layers", shallow), (f"{full.vision.num_layers} + {full.text.num_layers} layers", full)):
        lower, comp = compile_seconds(cfg, a.batch, a.images, a.tokens)
        print(f"  {name:16s} lower {lower:5.2f} s   compile {comp:5.2f} s   total {lower + comp:5.2f} s")


if __name__ == "__main__":
    main()
