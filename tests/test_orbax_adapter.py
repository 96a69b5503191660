"""The Orbax internals `idefics_jax.checkpoints.orbax_adapter` relies on, checked against the installed Orbax: when
an upgrade moves or reshapes one, these fail by name (and the chunk test shows what a checkpoint would lose)."""

import inspect
import json

import numpy as np

import orbax.checkpoint as ocp

from idefics_jax.checkpoints import checkpoint, orbax_adapter


def test_numpy_writer_hook_is_there():
    """`chunked_writes` replaces this coroutine method and calls it with the same arguments."""
    writer = ocp.type_handlers.NumpyHandler._open_and_write
    assert inspect.iscoroutinefunction(writer)
    assert list(inspect.signature(writer).parameters) == ["self", "value", "tspec", "ts_context"]


def test_kvstore_spec_builder_is_there():
    from orbax.checkpoint._src.serialization import tensorstore_utils

    parameters = inspect.signature(tensorstore_utils.build_kvstore_tspec).parameters
    assert list(parameters)[0] == "directory" and "use_ocdbt" in parameters


def test_saved_parameters_have_our_chunks(tmp_path):
    """One parameter through the partial save, as conversion writes it: the stored read chunks are
    `checkpoint.chunk_shape`'s, the values come back, and the writer is Orbax's own again afterwards."""
    original = ocp.type_handlers.NumpyHandler._open_and_write
    axes = ("embed", "mlp")
    array = np.arange(256 * 2048, dtype=np.float32).reshape(256, 2048)  # 2 MiB: over MIN_SPLIT_BYTES
    want = checkpoint.chunk_shape(array.shape, axes, array.itemsize)
    assert want != array.shape  # the default (one chunk) would pass unnoticed otherwise
    directory = tmp_path / checkpoint.PARAMS_DIR
    checkpoint.save_partial(str(directory), "text/mlp/up", array, axes)
    checkpoint.finalize_partial(str(directory))
    assert ocp.type_handlers.NumpyHandler._open_and_write is original

    store = orbax_adapter.open_param_store(directory / checkpoint.STATE_DIR)
    meta = json.loads(store.read(b"text.mlp.up/zarr.json").result().value)
    inner = [c["configuration"]["chunk_shape"] for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    assert inner == [list(want)], meta["codecs"]
    restored = ocp.PyTreeCheckpointer().restore(str(directory / checkpoint.STATE_DIR))
    np.testing.assert_array_equal(restored["text"]["mlp"]["up"], array)
