"""Where a program runs: the platform of a mesh (which may be a TPU topology compiled for ahead of time from a CPU
host, see bench/memory_plan.py) or of the arrays at hand."""

from __future__ import annotations

import time

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


def compile_lowered(lowered, devices, out: dict, t0: float, arguments_bytes: int,
                    compiler_options: dict | None = None) -> None:
    """Compiles `lowered` for `devices` (lowered since `t0`) and adds the times, XLA's per-device memory analysis
    and the number of TPU kernel calls (Mosaic custom calls: the splash attention) to `out`. When the TPU compiler
    refuses a program whose temporaries alone exceed the chip, the temporaries it reports are kept (`out["oom"]`)
    with the arguments' bytes per device (outputs not counted: a step's outputs alias its donated state)."""
    out["lower_s"] = time.time() - t0
    t0 = time.time()
    compiled, temporaries = compile_ahead(lowered, devices, compiler_options)
    out["compile_s"] = time.time() - t0
    if compiled is None:
        out.update(oom=True, kernels=lowered.as_text().count("@tpu_custom_call"), arguments=arguments_bytes,
                   outputs=0, aliased=0, temporaries=temporaries)
        out["peak"] = out["arguments"] + out["temporaries"]
        return
    m = compiled.memory_analysis()
    out["compiled"] = compiled
    out["kernels"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes)
    out["peak"] = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def target(slice_name: str | None = None) -> tuple[tuple, float, str]:
    """What a dry run compiles for -> (devices, memory per device in bytes, a description): TPU slice
    `slice_name` ahead of time (libtpu; no TPU needed), else this host's devices (an accelerator's memory limit,
    or for CPU devices this host's memory shared among them)."""
    import os

    from idefics_jax.runtime import tpu

    if slice_name:
        s = tpu.slice_named(slice_name)
        return tpu.devices(s), s.hbm_gib * 2**30, f"TPU {s.name} (libtpu, ahead of time)"
    devices = tuple(jax.devices())
    capacity = memory_limit(devices[0]) or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)
    return devices, capacity, describe(devices)


def size_text(b: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def describe(devices) -> str:
    """'8 local CPU devices (cpu)' or 'TPU v5 lite' for the devices a program is compiled for."""
    d = devices[0]
    if d.platform == "tpu":
        return f"{len(devices)} {d.device_kind} devices"
    return f"{len(devices)} local {d.platform.upper()} device{'s' if len(devices) > 1 else ''} ({d.device_kind})"


def memory_limit(device) -> float | None:
    """An accelerator's memory per device as its runtime reports it; None for CPU devices."""
    return (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
