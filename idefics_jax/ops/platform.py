"""Where a program runs: the platform of a mesh (which may be a TPU topology compiled for ahead of time from a CPU
host, see bench/memory_plan.py) or of the arrays at hand."""

from __future__ import annotations

import jax


def target_platform(partitioning=None) -> str:
    """The platform the program is built for: that of `part`'s mesh (a `sharding.Partitioning`), else jax's
    default backend."""
    if partitioning is not None:
        return partitioning.mesh.devices.flat[0].platform
    return jax.default_backend()


def on_one_cpu(arrays) -> bool:
    """Whether all `arrays` live on one CPU device."""
    return all(isinstance(a, jax.Array) and len(a.devices()) == 1 and next(iter(a.devices())).platform == "cpu"
               for a in arrays)


def one_image_at_a_time(arrays) -> bool:
    """Whether the vision tower should run one image after another for a model with these parameters: on one CPU
    device, all images at once materialise every layer's attention scores for all of them (GBs at batch 8) and run
    slower."""
    return on_one_cpu(arrays)
