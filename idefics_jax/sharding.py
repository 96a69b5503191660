"""Logical axis names -> mesh axes `data`, `fsdp`, `tensor`.

Every parameter names its logical axes where it is created (`axes=` metadata); this one table maps them.
A logical axis whose size the mesh axis does not divide stays replicated on that dimension.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
        total = 1
        for n in names:
            total *= mesh.shape[n]
        if not names or size % total:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def sharding_for(axes, shape, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))
