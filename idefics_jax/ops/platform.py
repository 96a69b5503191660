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


def compile_ahead(lowered, devices, cpu_options: dict | None = None):
    """Compiles `lowered` for `devices` -> (compiled program, None), or (None, bytes of temporaries) when the TPU
    compiler refuses a program whose temporaries alone exceed the chip's memory (it reports their size). TPU
    programs keep the compiler's defaults (what a run on the chips gets); CPU ones take `cpu_options`."""
    import re

    tpu = devices[0].platform == "tpu"
    try:
        return lowered.compile(None if tpu else cpu_options), None
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
        if not (tpu and "RESOURCE_EXHAUSTED" in str(e) and need):
            raise
        return None, float(need[1]) * 2**30


def describe(devices) -> str:
    """'8 local CPU devices (cpu)' or 'TPU v5 lite' for the devices a program is compiled for."""
    d = devices[0]
    if d.platform == "tpu":
        return f"{len(devices)} {d.device_kind} devices"
    return f"{len(devices)} local {d.platform.upper()} device{'s' if len(devices) > 1 else ''} ({d.device_kind})"


def memory_limit(device) -> float | None:
    """An accelerator's memory per device as its runtime reports it; None for CPU devices."""
    return (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
