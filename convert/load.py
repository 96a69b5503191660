"""`load_pretrained`: any model a user names, as an `IdeficsModel`."""

from __future__ import annotations

import os

from idefics_jax import sharding as shd
from idefics_jax.checkpoint import PARAMS_DIR, CheckpointError, load_orbax, model_from_arrays
from idefics_jax.convert.hub import resolve_model
from idefics_jax.convert.hf_to_orbax import read_hf_checkpoint
from idefics_jax.hf_config import read_generation_defaults
from idefics_jax.model import IdeficsModel


def load_pretrained(path: str, *, dtype=None, mesh=None, rules=shd.RULES) -> IdeficsModel:
    """Loads a model from an Orbax checkpoint written by `idefics-jax convert`, an HF directory, a model shipped
    with the package by name ("tiny-shapes"), a preset's published checkpoint ("smolvlm-256m") or a hub id
    ("HuggingFaceTB/SmolVLM-256M-Instruct", "org/name@revision"); see `idefics_jax.convert.hub.resolve_model`.

    dtype: parameter (and compute) dtype; None keeps the stored one. mesh: restore straight into arrays sharded
    over it by the logical-axis `rules`.
    """
    path = resolve_model(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.exists(os.path.join(path, PARAMS_DIR)):
        raise CheckpointError(f"{path}: a training run's WORKDIR; load it with "
                              "idefics_jax.train.loading.trained_model (or `idefics-jax generate --model WORKDIR`), "
                              "or `idefics-jax export` it first")
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return load_orbax(path, dtype, mesh, rules)
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path)):
        config, arrays = read_hf_checkpoint(path, dtype=dtype)
        model = model_from_arrays(config, arrays, mesh, rules)
    else:
        raise CheckpointError(f"{path}: neither an idefics-jax checkpoint ({PARAMS_DIR}/) nor an HF model "
                              "(*.safetensors)")
    model.generation_defaults = read_generation_defaults(path)
    return model
