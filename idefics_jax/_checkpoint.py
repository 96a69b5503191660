"""Orbax checkpoints of the model's parameters, and `load_pretrained`."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax import sharding as shd
from idefics_jax._config import ModelConfig, from_hf_file
from idefics_jax._model import IdeficsModel
from idefics_jax._sampling import GenerationDefaults

PARAMS_DIR = "params"
META_FILE = "idefics_jax.json"  # written last: a directory without it is not a finished checkpoint


class LoadError(ValueError):
    """A path that holds no loadable model, with the reason in one line."""


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> IdeficsModel:
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: IdeficsModel(config, rngs=nnx.Rngs(0), dtype=dtype))


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


def model_from_arrays(config: ModelConfig, arrays: dict[str, np.ndarray], mesh=None, rules=shd.DEFAULT_RULES):
    """Builds the model around host arrays keyed by path, placing each one (sharded when `mesh` is given)."""
    dtype = next(iter(arrays.values())).dtype
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)

    def place(path, var):
        arr = arrays["/".join(map(str, path))]
        return var.replace(jax.device_put(arr, shd.sharding_for(var.get_metadata()["axes"], arr.shape, mesh, rules)))

    flat = [(p, place(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_params(directory: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes the parameters (host arrays keyed by path) as an Orbax checkpoint at `directory`."""
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(os.path.abspath(directory), _nest(arrays))


def load_pretrained(path: str, *, dtype=None, mesh=None, rules=shd.DEFAULT_RULES) -> IdeficsModel:
    """Loads a model from an Orbax checkpoint written by `idefics-jax convert`, or from an HF directory.

    dtype: parameter (and compute) dtype; None keeps the stored one. mesh: restore straight into arrays sharded
    over it by the logical-axis `rules`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise LoadError(f"{path}: not a directory")
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        model = _load_orbax(path, dtype, mesh, rules)
    elif any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path)):
        from convert.hf_to_orbax import read_hf_checkpoint

        config, arrays = read_hf_checkpoint(path, dtype=dtype)
        model = model_from_arrays(config, arrays, mesh, rules)
    else:
        raise LoadError(f"{path}: neither an idefics-jax checkpoint ({PARAMS_DIR}/) nor an HF model (*.safetensors)")
    model.generation_defaults = GenerationDefaults.from_dir(path)
    return model


def _load_orbax(path: str, dtype, mesh, rules) -> IdeficsModel:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise LoadError(f"{path}: incomplete checkpoint ({META_FILE} missing; was the conversion interrupted?)")
    with open(meta_path) as f:
        meta = json.load(f)
    config = from_hf_file(path)
    if meta.get("tie_word_embeddings") is not None:
        config = config.replace(tie_word_embeddings=bool(meta["tie_word_embeddings"]))
    stored = jnp.dtype(meta["dtype"])
    dtype = jnp.dtype(dtype or stored)
    graphdef, state = nnx.split(abstract_model(config, stored))
    flat = nnx.to_flat_state(state)
    target = _nest({
        "/".join(map(str, p)): jax.ShapeDtypeStruct(
            v.shape, dtype, sharding=shd.sharding_for(v.get_metadata()["axes"], v.shape, mesh, rules))
        for p, v in flat
    })
    ckptr = ocp.PyTreeCheckpointer()
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    try:
        restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(
                lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target)))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise LoadError(f"{path}: parameters do not match config.json ({str(e).splitlines()[0][:200]})") from None
    leaves = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.State(restored))}
    new = [(p, v.replace(leaves["/".join(map(str, p))])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new))
