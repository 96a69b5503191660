"""The logical-axis rules table and the mesh presets.

Parameters and activations name their axes logically where they are created (`embed`, `heads`, ...); `RULES`
maps each name to mesh axes. A name whose mesh axes are absent, of size 1, or do not divide the dimension stays
replicated on that dimension, so one table serves every preset: the mesh shape alone decides the strategy.

Override by passing another table (`load_pretrained(path, mesh=mesh, rules=...)`), e.g.
`override(RULES, mlp=None)` to keep MLP weights whole on each tensor shard.
"""

from __future__ import annotations

import dataclasses

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

MESH_AXES = ("data", "fsdp", "tensor")

RULES: Rules = (
    ("batch", ("data", "fsdp")),  # activations: examples split over data and fsdp
    ("embed", "fsdp"),            # FSDP (ZeRO-3): each weight split along the model width, gathered per layer
    ("vocab", "tensor"),
    ("heads", "tensor"),          # Megatron-style tensor parallelism over heads and the MLP width
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),             # scanned: every device holds its slice of every layer
    ("head_dim", None),
)


def override(rules: Rules, **changes) -> Rules:
    """`rules` with some names remapped (a tuple of mesh axes, one axis, or None to replicate)."""
    unknown = set(changes) - {name for name, _ in rules}
    out = tuple((name, changes.get(name, target)) for name, target in rules)
    return out + tuple((name, changes[name]) for name in sorted(unknown))


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices along each mesh axis; at most one -1, which takes all the remaining devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = (self.data, self.fsdp, self.tensor)
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes) or n_devices % known:
            raise ValueError(f"mesh {self} does not fit {n_devices} devices")
        out = tuple(n_devices // known if s == -1 else s for s in sizes)
        if out[0] * out[1] * out[2] != n_devices:
            raise ValueError(f"mesh {self} uses {out[0] * out[1] * out[2]} devices, not the {n_devices} available")
        return out


# Pure FSDP: every weight split over all devices along its width; no tensor parallelism.
FSDP = MeshShape(fsdp=-1)
# FSDP + tensor parallelism: heads and MLP over 4 devices (Idefics3-8B: 32 heads, 8 kv heads, 16 vision heads),
# the rest FSDP.
FSDP_TP = MeshShape(fsdp=-1, tensor=4)
# Data parallelism: weights replicated, the batch split over all devices.
DATA_PARALLEL = MeshShape(data=-1)
