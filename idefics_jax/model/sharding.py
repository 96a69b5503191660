"""Logical axis names -> mesh axes `data`, `fsdp`, `tensor`.

Every parameter names its logical axes where it is created (`axes=` metadata), and activations name theirs
where they are computed; the rules table `RULES` below maps both. A logical axis whose mesh axes do
not divide its size stays replicated on that dimension (e.g. 6 heads over `tensor=4`), so every mesh runs every
model, at the cost of memory when the sizes do not divide.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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


def _check_target(where: str, name, target) -> None:
    ok = target is None or isinstance(target, str) or (
        isinstance(target, (tuple, list)) and all(isinstance(a, str) for a in target))
    if not isinstance(name, str) or not ok:
        raise TypeError(f"{where}: a rule maps a logical axis name to a mesh axis, a tuple of mesh axes or None; "
                        f"got {name!r} -> {target!r}")


def _check_rules(where: str, rules) -> None:
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Sequence):
        raise TypeError(f"{where}: rules must be a tuple of (logical axis, mesh axes) pairs like RULES; "
                        f"got {type(rules).__name__}")
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise TypeError(f"{where}: rules must be (logical axis, mesh axes) pairs like RULES; got {rule!r}")
        _check_target(where, *rule)


def override(rules: Rules, **changes) -> Rules:
    """`rules` with some names remapped (a tuple of mesh axes, one axis, or None to replicate)."""
    _check_rules("override", rules)
    for name, target in changes.items():
        _check_target("override", name, target)
    unknown = set(changes) - {name for name, _ in rules}
    out = tuple((name, changes.get(name, target)) for name, target in rules)
    return out + tuple((name, changes[name]) for name in sorted(unknown))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices along each mesh axis; at most one -1, which takes all the remaining devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if not _is_int(size):
                raise TypeError(f"MeshShape: {name} must be an int (a number of devices, or -1 for all the rest); "
                                f"got {size!r} ({type(size).__name__})")
            if size < -1 or size == 0:
                raise ValueError(f"MeshShape: {name} must be a positive number of devices or -1; got {size}")
            object.__setattr__(self, name, int(size))  # numpy integers too: sizes go into jax and hash

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """-> (data, fsdp, tensor) sizes whose product is `n_devices`; ValueError when they cannot be."""
        if not _is_int(n_devices) or n_devices < 1:
            raise ValueError(f"MeshShape.resolve: n_devices must be a positive int; got {n_devices!r}")
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
# Tensor parallelism over all devices: what decoding wants (each step reads every weight once, split over the
# chips, with two all-reduces per layer and no weight all-gather; docs/tpu-plan.md).
TENSOR = MeshShape(tensor=-1)
PRESET_MESHES = {"fsdp": FSDP, "fsdp_tp": FSDP_TP, "data": DATA_PARALLEL, "tensor": TENSOR}


def parse_mesh(text: str) -> MeshShape:
    """A mesh as the command line names it: a preset (fsdp, fsdp_tp, data, tensor) or axis sizes
    ("tensor=8", "data=2,tensor=4"; axes left out have size 1, one size may be -1: the remaining devices)."""
    if text in PRESET_MESHES:
        return PRESET_MESHES[text]
    sizes = {}
    for part in text.split(","):
        name, eq, size = part.partition("=")
        if not eq or name.strip() not in MESH_AXES or not re.fullmatch(r"-?\d+", size.strip()):
            raise ValueError(f"mesh '{text}': name a preset ({', '.join(PRESET_MESHES)}) or sizes as "
                             f"axis=N,... over the axes {', '.join(MESH_AXES)}")
        sizes[name.strip()] = int(size)
    return MeshShape(**sizes)



def mesh_shape(shape: MeshShape | Mapping[str, int] | Sequence[int]) -> MeshShape:
    """`shape` as a MeshShape: one already, a dict of axis name -> size (axes left out have size 1), or the
    (data, fsdp, tensor) sizes. A size of -1 takes all the remaining devices."""
    if isinstance(shape, MeshShape):
        return shape
    if isinstance(shape, Mapping):
        unknown = [k for k in shape if k not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh shape: unknown axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}")
        return MeshShape(**shape)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, np.ndarray)):
        raise TypeError(f"mesh shape must be a MeshShape, a dict of axis name -> size or the (data, fsdp, tensor) "
                        f"sizes; got {type(shape).__name__}")
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape: {len(shape)} sizes given, one per axis ({', '.join(MESH_AXES)}) needed")
    return MeshShape(*shape)


def make_mesh(shape: MeshShape | Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes). `shape`: a MeshShape,
    a dict of axis name -> size (`{"fsdp": -1, "tensor": 4}`; axes left out have size 1) or the three sizes
    (`(1, 2, 4)`); at most one size is -1, which takes the remaining devices, and the sizes' product must be the
    number of devices.

    `jax.make_mesh` orders the devices so that `tensor`, the innermost axis, stays within a host and on the
    fastest links.
    """
    shape = mesh_shape(shape)
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, (jax.Device, str)) or not isinstance(devices, (Sequence, np.ndarray)):
        raise TypeError(f"make_mesh: devices must be a list of jax devices (or None for all); "
                        f"got {type(devices).__name__}")
    devices = list(np.ravel(np.asarray(devices, dtype=object))) if isinstance(devices, np.ndarray) else list(devices)
    if not devices:
        raise ValueError("make_mesh: devices is empty")
    bad = next((d for d in devices if not isinstance(d, jax.Device)), None)
    if bad is not None:
        raise TypeError(f"make_mesh: devices must be jax devices (jax.devices()); got {bad!r} ({type(bad).__name__})")
    sizes = shape.resolve(len(devices))
    # Auto axes: the compiler propagates shardings between our constraints.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        # Several TPU slices (multi-slice, joined by the data-center network): `data` spans them, so only the
        # gradient reduction crosses DCN; fsdp and tensor stay inside a slice, on ICI.
        if sizes[0] % slices:
            raise ValueError(f"mesh {shape}: the devices span {slices} TPU slices, so the data axis must be a "
                             f"multiple of {slices} (mesh.data={slices} puts one replica on each); got data={sizes[0]}")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, *sizes[1:]), (slices, 1, 1), devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return jax.make_mesh(sizes, MESH_AXES, devices=devices, axis_types=auto)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules = RULES) -> PartitionSpec:
    """The PartitionSpec for an array with logical `axes`. Each mesh axis is used at most once (first come);
    a dimension takes the longest prefix of its mesh axes whose product divides it."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name else None
        names = [target] if isinstance(target, str) else list(target or ())
        names = [n for n in names if mesh.shape.get(n, 1) > 1 and n not in used]
        while names and size % int(np.prod([mesh.shape[n] for n in names])):
            names.pop()
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else tuple(names))
    return PartitionSpec(*out)


def known_axes(rules: Rules) -> set[str]:
    """The mesh axis names `rules` can map onto: data, fsdp, tensor and any other axis a rule names."""
    named = {a for _, t in rules for a in ((t,) if isinstance(t, str) else (t or ()))}
    return set(MESH_AXES) | named


def auto_mesh(mesh: Mesh, rules: Rules = RULES) -> Mesh:
    """`mesh` (same devices and axis names) with Auto axis types, after checking its axis names.

    `jax.make_mesh` gives Explicit axes by default, where arrays carry their sharding in their type and
    `with_sharding_constraint` may not name those axes; the model places its parameters and constrains its
    activations itself and lets the compiler propagate between them, which is what Auto axes mean. A mesh may
    name a subset of the axes (e.g. data and tensor only): rules naming a missing axis leave that dimension
    unsplit along it.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (make_mesh(shape) makes one from a MeshShape, a dict of "
                        f"axis name -> size or three sizes); got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in known_axes(rules)]
    if unknown:
        raise ValueError(f"mesh axis {unknown[0]!r} is unknown: the sharding rules map onto "
                         f"{', '.join(sorted(known_axes(rules)))}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """A mesh and the rules mapping logical axis names onto it.

    The model holds one (static, so part of every jit cache key) and constrains its activations with it; a
    model without one runs wherever its arrays are, unconstrained. Any mesh is accepted (Auto or Explicit axes,
    any subset of data / fsdp / tensor); it is kept as `auto_mesh(mesh)`.
    """

    mesh: Mesh
    rules: Rules = RULES

    def __post_init__(self):
        _check_rules("Partitioning", self.rules)
        # Tuples throughout: the model's graph definition must hash.
        object.__setattr__(self, "rules", tuple((n, tuple(t) if isinstance(t, list) else t) for n, t in self.rules))
        object.__setattr__(self, "mesh", auto_mesh(self.mesh, self.rules))

    def spec(self, axes, shape) -> PartitionSpec:
        return spec_for(axes, shape, self.mesh, self.rules)

    def sharding(self, axes, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))


def partitioning(mesh: Mesh | None, rules: Rules = RULES) -> Partitioning | None:
    return None if mesh is None else Partitioning(mesh, rules)


def sharding_for(axes, shape, partitioning: Partitioning | None):
    """Where an array with logical `axes` goes: laid out over the mesh, or on the first local device."""
    if partitioning is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return partitioning.sharding(axes, shape)


def constrain(x: jax.Array, axes: Sequence[str | None], partitioning: Partitioning | None) -> jax.Array:
    """`x` laid out by its logical `axes` (inside jit); the identity when there is no mesh."""
    if partitioning is None:
        return x
    return jax.lax.with_sharding_constraint(x, partitioning.sharding(axes, x.shape))


def put(x, axes: Sequence[str | None], partitioning: Partitioning | None) -> jax.Array:
    """A host array, the same on every process, as a global array laid out by `axes`; each process places
    only its own devices' slices."""
    x = np.asarray(x)
    if partitioning is None:
        return jax.device_put(x)
    return jax.make_array_from_callback(x.shape, partitioning.sharding(axes, x.shape), lambda index: x[index])


def put_process_local(x, axes: Sequence[str | None], partitioning: Partitioning | None) -> jax.Array:
    """This process's rows of a global array split over processes along axis 0 (each host its own data): the
    global array has process_count times the rows, laid out by `axes`. One process: `put`."""
    if partitioning is None or jax.process_count() == 1:
        return put(x, axes, partitioning)
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(partitioning.sharding(axes, shape), x, shape)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (the largest shard, for uneven layouts)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def replicated(part: Partitioning):
    """-> a function giving an abstract array (ShapeDtypeStruct) a copy on every device of `part`'s mesh."""
    return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(part.mesh, PartitionSpec()))


def param_bytes_per_device(model) -> dict:
    """Bytes of parameters each device holds (device -> bytes), from the arrays' actual shards."""
    out: dict = {}
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for leaf in jax.tree.leaves(v.get_value()):  # a quantized weight: its codes and scales
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
