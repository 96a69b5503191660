"""The two places where idefics-jax reaches under Orbax's public API, kept here and nowhere else.
`tests/test_orbax_adapter.py` checks both against the installed Orbax, so an upgrade that moves them fails there
by name instead of as a slow or failing restore.

1. `chunked_writes`: each parameter's stored chunk shape. A sharded restore reads whole chunks, so a parameter
   stored as one chunk (Orbax's default for a host array, up to 2 GB) is read whole by every process, whatever its
   slice. The public options (`chunk_byte_size`, `shard_axes`) pick chunk shapes by a byte budget, splitting the
   largest or chosen axes greedily down to size; the layout needed here (each shardable dimension in a fixed
   number of pieces, so that 2-, 4-, 8- or 16-way slices are whole chunks) cannot be asked for. And the partial
   save that writes one array at a time (what keeps conversion's memory to one array) builds its own numpy
   handler, so no handler of ours can be registered. What remains is the numpy writer method
   `NumpyHandler._open_and_write(self, value, tspec, ts_context)`, which receives the TensorStore spec before
   the array is created: the chunk shape is set there, for the duration of a save.
2. `open_param_store`: the parameter store (OCDBT) opened with TensorStore's own futures exactly as Orbax opens it
   for a restore, a bucket through its driver and a local directory through files:
   `tensorstore_utils.build_kvstore_tspec`. `checkpoint._check_stored` reads it to refuse a damaged checkpoint
   before Orbax's asyncio reads start.
"""

from __future__ import annotations

import contextlib
import os

import orbax.checkpoint as ocp
from orbax.checkpoint import serialization as ocp_serialization

@contextlib.contextmanager
def chunked_writes(chunks: dict[str, tuple[int, ...]]):
    """Within the block, Orbax's numpy writer stores the arrays named in `chunks` (by tree path with dots,
    "text.layers.q") in chunks of the given shapes; others as Orbax chooses. Not for concurrent saves: the
    writer is Orbax's class attribute."""
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
    which TensorStore reads one by one."""
    if driver == "zarr":
        return {**metadata, "chunks": shape}
    sharded = lambda c: {**c, "configuration": {**c["configuration"], "chunk_shape": shape}}  # noqa: E731
    codecs = [sharded(c) if c.get("name") == "sharding_indexed" else c for c in metadata.get("codecs", [])]
    return {**metadata, "codecs": codecs}


def open_param_store(directory):
    """The OCDBT key-value store of the parameters Orbax saved at `directory` (local or a bucket), opened with
    TensorStore (`tensorstore.KvStore`; its reads return TensorStore futures, not asyncio tasks). Each array is
    stored under its tree path with dots: "text.layers.q/zarr.json" is its metadata record."""
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils

    spec = tensorstore_utils.build_kvstore_tspec(os.fspath(directory), use_ocdbt=True)
    return ts.KvStore.open(spec, context=ocp_serialization.get_ts_context(use_ocdbt=True)).result()
