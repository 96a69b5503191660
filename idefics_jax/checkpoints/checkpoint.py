"""Orbax checkpoints of the model's parameters: writing one parameter at a time, reading (sharded) whole."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.experimental import v1 as ocp1
from flax import nnx

from idefics_jax.model import sharding
from idefics_jax.model.config import ModelConfig
from idefics_jax.checkpoints.hf_config import from_hf_file, read_generation_defaults
from idefics_jax.model.idefics import IdeficsModel
from idefics_jax.checkpoints.orbax_adapter import chunked_writes, open_param_store
from idefics_jax.checkpoints.paths import as_path
from idefics_jax.ops.quantize import QuantizedWeight, check_format, eligible, leaf_axes, quantize
from idefics_jax.ops import weights

PARAMS_DIR = "params"
STATE_DIR = "state"  # where Orbax's partial save puts the tree inside PARAMS_DIR
META_FILE = "idefics_jax.json"  # written last: a directory without it is not a finished checkpoint
# Each dimension a mesh may split is stored in this many pieces (when it divides): a mesh splitting it 2, 4, 8 or
# 16 ways then finds each device's slice made of whole stored chunks, so a process reads its own slices only.
CHUNK_PARTS = 16
MIN_SPLIT_BYTES = 1 << 20  # smaller arrays stay one chunk: reading them whole costs nothing


class CheckpointError(ValueError):
    """A path that holds no readable model: missing, not a checkpoint, incomplete, damaged or at odds with its
    config.json (HF safetensors or ours); the message names the file and the problem in one line."""


def abstract_model(config: ModelConfig, dtype=jnp.float32,
                   partitioning: sharding.Partitioning | None = None) -> IdeficsModel:
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: IdeficsModel(config, rngs=nnx.Rngs(0), dtype=dtype, partitioning=partitioning))


def abstract_placed(config: ModelConfig, dtype, partitioning: sharding.Partitioning, quantize: str = "",
                    group: int | None = None) -> IdeficsModel:
    """The model with ShapeDtypeStruct leaves that carry the shardings their logical axes give on
    `partitioning`'s mesh (scalars replicated), as `load_pretrained` places them; with `quantize` ("int8" /
    "int4"), the matmul weights as abstract QuantizedWeights. What ahead-of-time compilation takes."""
    graphdef, state = nnx.split(abstract_model(config, dtype, partitioning))

    def leaf(p, v):
        sds, meta = v.get_value(), v.get_metadata()
        key = "/".join(map(str, p))
        if quantize and eligible(key, meta.get("fan_in")):
            q = quantized_shape(key, meta, quantize, group, sds.shape)
            where = quantized_shardings(q, meta, partitioning)
            return v.replace(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), q, where))
        axes = meta.get("axes")
        return v.replace(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=partitioning.sharding(axes, sds.shape)
                                              if axes else partitioning.sharding((), ())))

    return nnx.merge(graphdef, nnx.from_flat_state([(p, leaf(p, v)) for p, v in nnx.to_flat_state(state)]))


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes by path ("text/layers/q")."""
    state = nnx.state(abstract_model(config))
    return {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


def param_count(config: ModelConfig) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(config).values())


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        *head, last = path.split("/")
        d = out
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def model_from_arrays(config: ModelConfig, arrays: dict[str, np.ndarray], mesh=None, rules=sharding.RULES,
                      quantize: str | None = None, group: int | None = None):
    """Builds the model around host arrays keyed by path, placing each one (sharded when `mesh` is given), and
    quantizing the matmul weights as they come when `quantize` is "int8" or "int4" (see `quantize_param`).

    `arrays` may be any mapping that makes each array when asked for it: then one parameter exists at a time in
    full precision."""
    dtype = arrays.dtype if hasattr(arrays, "dtype") else next(iter(arrays.values())).dtype
    partitioning = sharding.partitioning(mesh, rules)
    model = abstract_model(config, dtype, partitioning)
    graphdef, state = nnx.split(model)

    def place(path, var):
        key = "/".join(map(str, path))
        arr, meta = arrays[key], var.get_metadata()
        if quantize and eligible(key, meta.get("fan_in")):
            return var.replace(quantize_param(key, arr, meta, quantize, group, partitioning))
        return var.replace(jax.device_put(arr, sharding.sharding_for(meta["axes"], arr.shape, partitioning)))

    flat = [(p, place(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _quantize_fn(path: str, meta: dict, fmt: str, group: int | None):
    axes = tuple(meta["axes"])
    lead = 1 if axes and axes[0] == "layers" else 0
    return functools.partial(quantize, fan_in=meta["fan_in"], fmt=fmt, group=group, lead=lead, where=path)


def quantized_shape(path: str, meta: dict, fmt: str, group: int | None, shape, dtype=jnp.float32) -> QuantizedWeight:
    """The QuantizedWeight of a weight of `shape`, with ShapeDtypeStruct leaves (nothing computed)."""
    return jax.eval_shape(_quantize_fn(path, meta, fmt, group), jax.ShapeDtypeStruct(shape, dtype))


def quantized_shardings(q: QuantizedWeight, meta: dict, partitioning: sharding.Partitioning | None) -> QuantizedWeight:
    """Where the leaves of a quantized weight go: by the logical axes `leaf_axes` derives from its weight's."""
    va, sa = leaf_axes(meta["axes"], meta["fan_in"], q.format)
    return dataclasses.replace(q, values=sharding.sharding_for(va, q.values.shape, partitioning),
                               scales=sharding.sharding_for(sa, q.scales.shape, partitioning))


def quantize_param(path: str, array, meta: dict, fmt: str, group: int | None,
                   partitioning: sharding.Partitioning | None = None):
    """One weight (host or device array, any sharding) -> its QuantizedWeight, placed (sharded over the mesh as
    its weight would be). Only this one weight is ever in full precision."""
    target = quantized_shape(path, meta, fmt, group, array.shape, array.dtype)
    where = quantized_shardings(target, meta, partitioning)
    return jax.jit(_quantize_fn(path, meta, fmt, group), out_shardings=where)(array)


def quantize_model(model: IdeficsModel, fmt: str, group: int | None = None) -> IdeficsModel:
    """A model in memory with its matmul weights quantized, one at a time, placed on the model's mesh (if any) as
    their weights are. Loading quantized (`load_pretrained(quantize=...)`) never holds the full-precision model;
    this is for models built in memory (random initialisation, training)."""
    check_quantize(model.config, fmt, group)
    partitioning = model.partitioning
    graphdef, state = nnx.split(model)

    def one(path, var):
        key, value = "/".join(map(str, path)), var.get_value()
        if weights.weight_format(value) is not None or not eligible(key, var.get_metadata().get("fan_in")):
            return var
        return var.replace(quantize_param(key, value, var.get_metadata(), fmt, group, partitioning))

    model = nnx.merge(graphdef, nnx.from_flat_state([(p, one(p, v)) for p, v in nnx.to_flat_state(state)]))
    return model


def check_quantize(config: ModelConfig, fmt: str, group: int | None) -> None:
    """Raises QuantizeError (one line) for a bad format, or an explicit group size that does not divide some
    quantized weight's contraction width, before anything is read or written."""
    check_format(fmt)
    shapes = param_shapes(config)
    for key, meta in param_metadata(config).items():
        if eligible(key, meta.get("fan_in")):
            quantized_shape(key, meta, fmt, group, shapes[key])


def quantized_format(model) -> str | None:
    """"int8" / "int4" when the model's matmul weights are quantized, else None."""
    formats = (weights.weight_format(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model)))
    return next((f for f in formats if f is not None), None)


def chunk_shape(shape, axes, itemsize: int, rules=sharding.RULES) -> tuple[int, ...]:
    """The stored chunk of a parameter: dimensions the rules may shard in up to CHUNK_PARTS pieces, others whole."""
    if math.prod(shape) * itemsize < MIN_SPLIT_BYTES:
        return tuple(shape)
    shardable = {name for name, target in rules if target}
    return tuple(d // math.gcd(d, CHUNK_PARTS) if a in shardable else d for d, a in zip(shape, axes))


def param_metadata(config: ModelConfig) -> dict[str, dict]:
    """Each parameter's metadata (`axes`, `fan_in`) by path."""
    return {"/".join(map(str, p)): v.get_metadata() for p, v in nnx.to_flat_state(nnx.state(abstract_model(config)))}


def save_partial(directory: str, path: str, array: np.ndarray, axes) -> None:
    """Adds one parameter to the Orbax checkpoint being written at `directory` (see `finalize_partial`), chunked so
    that the processes of a sharded restore read their own slices only (see CHUNK_PARTS).

    Saving the whole tree at once makes Orbax hold about one extra model-size of buffers; one array at a time it
    holds one array's.
    """
    with chunked_writes({path.replace("/", "."): chunk_shape(array.shape, axes, array.itemsize)}):
        ocp1.partial.save(os.path.abspath(directory), _nest({path: array}))


def finalize_partial(directory: str) -> None:
    ocp1.partial.finalize(os.path.abspath(directory))


def _check_stored(path: str, params_dir: epath.Path, target: dict) -> None:
    """Checks what the restore will read before it starts: the stored arrays' names and shapes (Orbax's metadata
    file) against the model's, and that the store's index and every array's metadata are there. Reads no array.

    Orbax runs a restore's reads as asyncio tasks on a loop that it closes as soon as one read fails, without
    cancelling the others: left pending, they fail later as unraisable exceptions (pages of TensorStore specs,
    "Event loop is closed"). So a checkpoint that does not match or is damaged is refused here, not by a read.
    """
    def damaged(e: Exception):
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return CheckpointError(f"{path}: parameters missing or damaged ({detail})")

    name = lambda p: "/".join(str(k.key) for k in p)  # noqa: E731
    wanted = {name(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(target)[0]}
    # TensorStore first, with its own futures (no asyncio loop to strand): the store's index, then every array's
    # metadata record. Orbax's metadata() below opens the arrays on its asyncio loop, so it must not be the read
    # that finds the damage.
    try:
        store = open_param_store(params_dir)
        keys = store.list().result()
        # Orbax names each array's store after its path with dots.
        present = {k.decode().split("/")[0] for k in keys if k.endswith(b"/zarr.json")}
        absent = sorted(n for n in wanted if n.replace("/", ".") not in present)
        extra = sorted(present - {n.replace("/", ".") for n in wanted})
        if extra:  # another model's arrays: the shapes check below would say the same, after Orbax's reads
            raise CheckpointError(f"{path}: parameters do not match config.json ({extra[0]} not in the model)")
        if absent:
            raise CheckpointError(f"{path}: parameters missing or damaged ({absent[0]} is not in the store)")
        for read in [store.read(k) for k in keys if k.endswith(b"/zarr.json")]:
            read.result()
        tree = ocp.PyTreeCheckpointHandler().metadata(as_path(params_dir)).tree
    except (ValueError, KeyError, OSError) as e:
        raise damaged(e) from None
    stored = {name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or extra:
        which = f"{missing[0]} missing" if missing else f"{extra[0]} not in the model"
        raise CheckpointError(f"{path}: parameters do not match config.json ({which})")
    for n, shape in wanted.items():
        if stored[n] != shape:
            raise CheckpointError(f"{path}: parameters do not match config.json ({n}: stored {stored[n]}, "
                            f"config.json gives {shape})")


def _flat_leaves(path: str, leaf) -> dict[str, object]:
    """A parameter's stored arrays by checkpoint path: the array itself, or a quantized weight's two."""
    return {path + suffix: a for suffix, a in weights.stored(leaf).items()}


def _restore(params_dir: str, target: dict, where: str, partial: bool = False) -> dict:
    """Restores the ShapeDtypeStruct leaves of `target` (keyed by checkpoint path) -> arrays by the same keys."""
    tree = _nest(target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(params_dir, args=ocp.args.PyTreeRestore(
            item=tree, partial_restore=partial, restore_args=jax.tree.map(
                lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), tree)))
    except (ValueError, KeyError, FileNotFoundError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        what = "missing or damaged" if re.search("not[ _]found", detail, re.I) else "do not match config.json"
        raise CheckpointError(f"{where}: parameters {what} ({detail})") from None
    return {k: _get(restored, k) for k in target}


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def read_meta(path: str) -> dict:
    """The checkpoint's own metadata (META_FILE): dtype, tied head, and `quantize` ({"format", "group_size"}) when
    its weights are stored quantized."""
    meta_path = as_path(path) / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint ({META_FILE} missing; was the conversion interrupted?)")
    return json.loads(meta_path.read_text())


def load_orbax(path: str, dtype=None, mesh=None, rules=sharding.RULES, quantize: str | None = None,
               group: int | None = None) -> IdeficsModel:
    """The model in an Orbax checkpoint directory written by `idefics-jax convert` (see `load_pretrained`).

    A quantized checkpoint loads quantized (its metadata says how). `quantize` ("int8" / "int4") quantizes an
    unquantized one while loading: one parameter at a time is read in full precision, quantized and placed.
    """
    meta = read_meta(path)
    config = from_hf_file(path)
    if meta.get("tie_word_embeddings") is not None:
        config = config.replace(tie_word_embeddings=bool(meta["tie_word_embeddings"]))
    stored_q = (meta.get("quantize") or {}).get("format")
    if quantize is not None:
        check_quantize(config, quantize, group)
        if stored_q and quantize != stored_q:
            raise CheckpointError(f"{path}: holds {stored_q} weights; load it without quantize= (or quantize the "
                            "unquantized model)")
    stored = jnp.dtype(meta["dtype"])
    dtype = jnp.dtype(dtype or stored)
    partitioning = sharding.partitioning(mesh, rules)
    graphdef, state = nnx.split(abstract_model(config, stored, partitioning))
    flat = nnx.to_flat_state(state)
    params_dir = as_path(path) / PARAMS_DIR / STATE_DIR

    def abstract(key, v):
        """The parameter as stored, with ShapeDtypeStruct leaves carrying their shardings."""
        m = v.get_metadata()
        if stored_q and eligible(key, m.get("fan_in")):
            q = quantized_shape(key, m, stored_q, meta["quantize"].get("group_size"), v.shape)
            where = quantized_shardings(q, m, partitioning)
            return jax.tree.map(lambda a, w: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=w), q, where)
        return jax.ShapeDtypeStruct(v.shape, dtype, sharding=sharding.sharding_for(m["axes"], v.shape, partitioning))

    shapes = {"/".join(map(str, p)): abstract("/".join(map(str, p)), v) for p, v in flat}
    target = {k: a for key, leaf in shapes.items() for k, a in _flat_leaves(key, leaf).items()}
    _check_stored(path, params_dir, _nest(target))
    values = {}
    if quantize and not stored_q:
        # One parameter at a time: Orbax restores the subtree asked for.
        for p, v in flat:
            key = "/".join(map(str, p))
            arr = _restore(params_dir, {key: shapes[key]}, path, partial=True)[key]
            m = v.get_metadata()
            if eligible(key, m.get("fan_in")):
                arr = quantize_param(key, arr, m, quantize, group, partitioning)
            values[key] = arr
            del arr
    else:
        restored = _restore(params_dir, target, path)
        for key, leaf in shapes.items():
            values[key] = weights.from_stored(leaf, {s: restored[key + s] for s in weights.stored(leaf)})
    new = [(p, v.replace(values["/".join(map(str, p))])) for p, v in flat]
    model = nnx.merge(graphdef, nnx.from_flat_state(new))
    model.generation_defaults = read_generation_defaults(path)
    return model
