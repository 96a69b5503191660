"""TPU slices the programs can be compiled for ahead of time, on any host with libtpu installed (the `[aot]` extra):
their topology as `jax.experimental.topologies` names it (as MaxText's accelerator table does), the memory of one
chip and its published bf16 peak. Nothing here needs a TPU."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # what users call it: v5e-8
    devices: int  # as jax sees them: a v4 or v5p chip is one device (megacore)
    hbm_gib: float  # per device
    peak_flops: float  # bf16 dense, per device
    hbm_bytes_s: float  # HBM bandwidth, per device
    topology: str  # jax.experimental.topologies' name
    chip_config: str
    chips_per_host: tuple[int, int, int]


SLICES = {s.name: s for s in (
    Slice("v5e-8", 8, 16, 197e12, 819e9, "v5e:2x4", "default", (2, 2, 1)),
    Slice("v6e-8", 8, 32, 918e12, 1640e9, "v6e:2x4", "default", (2, 2, 1)),
    Slice("v4-8", 4, 32, 275e12, 1228e9, "v4:2x2x1", "megacore", (2, 2, 1)),
    Slice("v5p-8", 4, 95, 459e12, 2765e9, "v5:2x2x1", "megacore", (2, 2, 1)),
    Slice("v5e-1", 1, 16, 197e12, 819e9, "v5e:1x1", "default", (1, 1, 1)),
    Slice("v5e-256", 256, 16, 197e12, 819e9, "v5e:16x16", "default", (2, 2, 1)),
    Slice("v6e-256", 256, 32, 918e12, 1640e9, "v6e:16x16", "default", (2, 2, 1)),
)}


def have_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def slice_named(name: str) -> Slice:
    if name not in SLICES:
        raise ValueError(f"unknown TPU slice '{name}' (known: {', '.join(SLICES)})")
    return SLICES[name]


@functools.lru_cache(maxsize=None)
def devices(s: Slice) -> tuple:
    """The devices of slice `s` for ahead-of-time compilation (libtpu's compiler; no TPU needed)."""
    if not have_libtpu():
        raise ValueError(f"compiling for {s.name} needs libtpu: pip install 'idefics-jax[aot]'")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=s.topology, chip_config_name=s.chip_config,
                                        chips_per_host_bounds=s.chips_per_host, num_slices=1)
    if len(desc.devices) != s.devices:
        raise ValueError(f"topology {s.topology} has {len(desc.devices)} devices, {s.name} {s.devices}")
    return tuple(desc.devices)
