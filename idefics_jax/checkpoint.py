"""Orbax checkpoints of the model's parameters: writing one parameter at a time, reading (sharded) whole."""

from __future__ import annotations

import contextlib
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

from idefics_jax import sharding as shd
from idefics_jax.config import ModelConfig
from idefics_jax.hf_config import from_hf_file, read_generation_defaults
from idefics_jax.model import IdeficsModel

PARAMS_DIR = "params"
STATE_DIR = "state"  # where Orbax's partial save puts the tree inside PARAMS_DIR
META_FILE = "idefics_jax.json"  # written last: a directory without it is not a finished checkpoint
# Each dimension a mesh may split is stored in this many pieces (when it divides): a mesh splitting it 2, 4, 8 or
# 16 ways then finds each device's slice made of whole stored chunks, so a process reads its own slices only.
CHUNK_PARTS = 16
MIN_SPLIT_BYTES = 1 << 20  # smaller arrays stay one chunk: reading them whole costs nothing


def as_path(path) -> epath.Path:
    """A checkpoint, workdir or export location as a path object: local (made absolute, as Orbax wants) or a
    bucket (`gs://...`), both read and written through `etils.epath`, which Orbax uses."""
    if isinstance(path, epath.Path) or "://" in str(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


class CheckpointError(ValueError):
    """A path that holds no readable model: missing, not a checkpoint, incomplete, damaged or at odds with its
    config.json (HF safetensors or ours); the message names the file and the problem in one line."""


def abstract_model(config: ModelConfig, dtype=jnp.float32,
                   partitioning: shd.Partitioning | None = None) -> IdeficsModel:
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: IdeficsModel(config, rngs=nnx.Rngs(0), dtype=dtype, partitioning=partitioning))


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


def model_from_arrays(config: ModelConfig, arrays: dict[str, np.ndarray], mesh=None, rules=shd.RULES):
    """Builds the model around host arrays keyed by path, placing each one (sharded when `mesh` is given)."""
    dtype = next(iter(arrays.values())).dtype
    part = shd.partitioning(mesh, rules)
    model = abstract_model(config, dtype, part)
    graphdef, state = nnx.split(model)

    def place(path, var):
        arr = arrays["/".join(map(str, path))]
        return var.replace(jax.device_put(arr, shd.sharding_for(var.get_metadata()["axes"], arr.shape, part)))

    flat = [(p, place(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def chunk_shape(shape, axes, itemsize: int, rules=shd.RULES) -> tuple[int, ...]:
    """The stored chunk of a parameter: dimensions the rules may shard in up to CHUNK_PARTS pieces, others whole."""
    if math.prod(shape) * itemsize < MIN_SPLIT_BYTES:
        return tuple(shape)
    shardable = {name for name, target in rules if target}
    return tuple(d // math.gcd(d, CHUNK_PARTS) if a in shardable else d for d, a in zip(shape, axes))


@contextlib.contextmanager
def _chunked_writes(chunks: dict[str, tuple[int, ...]]):
    """Orbax's numpy writer with our chunk shapes (keyed by the array's tree path, "text.layers.q").

    Orbax would store each host array as one chunk (up to 2 GB), which every process must then read whole whatever
    its slice. Its partial save builds its own numpy handler, so the writer method is swapped for the duration of
    the save; `tests/test_sharding.py` measures the bytes each process reads and fails if this stops working.
    """
    handler = ocp.type_handlers.NumpyHandler
    original = handler._open_and_write

    async def write(self, value, tspec, ts_context):
        shape = chunks.get(tspec["kvstore"].get("path", ""))
        if shape is not None:
            tspec = {**tspec, "metadata": _with_read_chunks(tspec.get("driver"), tspec["metadata"], list(shape))}
        return await original(self, value, tspec, ts_context)

    handler._open_and_write = write
    try:
        yield
    finally:
        handler._open_and_write = original


def _with_read_chunks(driver: str, metadata: dict, shape: list[int]) -> dict:
    """zarr: the chunks themselves; zarr3 (what the partial save writes): the inner chunks of its sharding codec,
    which tensorstore reads one by one."""
    if driver == "zarr":
        return {**metadata, "chunks": shape}
    sharded = lambda c: {**c, "configuration": {**c["configuration"], "chunk_shape": shape}}  # noqa: E731
    codecs = [sharded(c) if c.get("name") == "sharding_indexed" else c for c in metadata.get("codecs", [])]
    return {**metadata, "codecs": codecs}


def param_axes(config: ModelConfig) -> dict[str, tuple]:
    """Logical axis names by parameter path."""
    flat = nnx.to_flat_state(nnx.state(abstract_model(config)))
    return {"/".join(map(str, p)): v.get_metadata()["axes"] for p, v in flat}


def save_partial(directory: str, path: str, array: np.ndarray, axes) -> None:
    """Adds one parameter to the Orbax checkpoint being written at `directory` (see `finalize_partial`), chunked so
    that the processes of a sharded restore read their own slices only (see CHUNK_PARTS).

    Saving the whole tree at once makes Orbax hold about one extra model-size of buffers; one array at a time it
    holds one array's.
    """
    with _chunked_writes({path.replace("/", "."): chunk_shape(array.shape, axes, array.itemsize)}):
        ocp1.partial.save(os.path.abspath(directory), _nest({path: array}))


def finalize_partial(directory: str) -> None:
    ocp1.partial.finalize(os.path.abspath(directory))


# Models shipped inside the package, by name (HF directories): `load_pretrained("tiny-shapes")`.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def shipped_models() -> list[str]:
    if not os.path.isdir(SHIPPED_DIR):
        return []
    return sorted(d for d in os.listdir(SHIPPED_DIR) if os.path.isfile(os.path.join(SHIPPED_DIR, d, "config.json")))


def resolve(path: str) -> str:
    """A shipped model's name -> its directory in the package; any other path unchanged (a local directory of
    the same name wins)."""
    path = os.fspath(path)
    if not os.path.exists(path) and path in shipped_models():
        return os.path.join(SHIPPED_DIR, path)
    return path


def _check_stored(path: str, params_dir: epath.Path, target: dict) -> None:
    """Checks what the restore will read before it starts: the stored arrays' names and shapes (Orbax's metadata
    file) against the model's, and that the store's index and every array's metadata are there. Reads no array.

    Orbax runs a restore's reads as asyncio tasks on a loop that it closes as soon as one read fails, without
    cancelling the others: left pending, they fail later as unraisable exceptions (pages of TensorStore specs,
    "Event loop is closed"). So a checkpoint that does not match or is damaged is refused here, not by a read.
    """
    import tensorstore as ts

    def damaged(e: Exception):
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return CheckpointError(f"{path}: parameters missing or damaged ({detail})")

    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(params_dir).tree
        # TensorStore takes a kvstore URL: gs://... as it is, a local (absolute) path as file://.
        base = str(params_dir) if "://" in str(params_dir) else f"file://{params_dir}"
        keys = ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()
    except (ValueError, KeyError, OSError) as e:
        raise damaged(e) from None
    name = lambda p: "/".join(str(k.key) for k in p)  # noqa: E731
    stored = {name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted = {name(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or extra:
        which = f"{missing[0]} missing" if missing else f"{extra[0]} not in the model"
        raise CheckpointError(f"{path}: parameters do not match config.json ({which})")
    for n, shape in wanted.items():
        if stored[n] != shape:
            raise CheckpointError(f"{path}: parameters do not match config.json ({n}: stored {stored[n]}, "
                            f"config.json gives {shape})")
    # Orbax names each array's store after its path with dots.
    present = {k.decode().split("/")[0] for k in keys if k.endswith(b"/zarr.json")}
    absent = sorted(n for n in stored if n.replace("/", ".") not in present)
    if absent:
        raise CheckpointError(f"{path}: parameters missing or damaged ({absent[0]} is not in the store)")


def load_orbax(path: str, dtype=None, mesh=None, rules=shd.RULES) -> IdeficsModel:
    """The model in an Orbax checkpoint directory written by `idefics-jax convert` (see `load_pretrained`)."""
    meta_path = as_path(path) / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint ({META_FILE} missing; was the conversion interrupted?)")
    meta = json.loads(meta_path.read_text())
    config = from_hf_file(path)
    if meta.get("tie_word_embeddings") is not None:
        config = config.replace(tie_word_embeddings=bool(meta["tie_word_embeddings"]))
    stored = jnp.dtype(meta["dtype"])
    dtype = jnp.dtype(dtype or stored)
    part = shd.partitioning(mesh, rules)
    graphdef, state = nnx.split(abstract_model(config, stored, part))
    flat = nnx.to_flat_state(state)
    target = _nest({
        "/".join(map(str, p)): jax.ShapeDtypeStruct(
            v.shape, dtype, sharding=shd.sharding_for(v.get_metadata()["axes"], v.shape, part))
        for p, v in flat
    })
    ckptr = ocp.PyTreeCheckpointer()
    params_dir = as_path(path) / PARAMS_DIR / STATE_DIR
    _check_stored(path, params_dir, target)
    try:
        restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(
                lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target)))
    except (ValueError, KeyError, FileNotFoundError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        what = "missing or damaged" if re.search("not[ _]found", detail, re.I) else "do not match config.json"
        raise CheckpointError(f"{path}: parameters {what} ({detail})") from None
    leaves = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.State(restored))}
    new = [(p, v.replace(leaves["/".join(map(str, p))])) for p, v in flat]
    model = nnx.merge(graphdef, nnx.from_flat_state(new))
    model.generation_defaults = read_generation_defaults(path)
    return model
