"""`load_pretrained`: any model a user names, as an `IdeficsModel`."""

from __future__ import annotations

from idefics_jax.checkpoints.checkpoint import (PARAMS_DIR, CheckpointError, check_quantize, load_orbax,
                                                model_from_arrays)
from idefics_jax.checkpoints.hf_config import read_generation_defaults
from idefics_jax.checkpoints.paths import as_path
from idefics_jax.checkpoints.registry import resolve, run_step
from idefics_jax.convert.hf_to_orbax import HFCheckpoint
from idefics_jax.model import sharding
from idefics_jax.model.idefics import IdeficsModel
from idefics_jax.ops.attention import check_backend


def load_pretrained(path: str, *, dtype=None, mesh=None, rules=sharding.RULES, quantize: str | None = None,
                    group_size: int | None = None, attention: str | None = None) -> IdeficsModel:
    """Loads a model from an Orbax checkpoint written by `idefics-jax convert`, an HF directory, a model shipped
    with the package by name ("tiny-shapes"), a preset's published checkpoint ("smolvlm-256m") or a hub id
    ("HuggingFaceTB/SmolVLM-256M-Instruct", "org/name@revision"); see `idefics_jax.checkpoints.registry.resolve`.

    dtype: parameter (and compute) dtype; None keeps the stored one. mesh: restore straight into arrays sharded
    over it by the logical-axis `rules`. quantize: "int8" (per output channel) or "int4" (groups of `group_size`
    along the contraction; default 128, or the largest power of two below it that divides the width) quantizes
    the matmul weights while loading, one tensor at a time; a checkpoint written by `convert --quantize` loads
    quantized without it. attention: the backend of the model's attention ("xla", "cudnn", "pallas"; None: the
    platform's; `IdeficsModel.set_attention` changes it later).
    """
    check_backend(attention)
    name, path = path, resolve(path)
    if run_step(path) is not None:  # the run's trainable state: its model is built by the training layer
        raise CheckpointError(f"{name}: a training run's WORKDIR; load it with "
                              "idefics_jax.train.loading.trained_model or load_chat (or `idefics-jax generate "
                              "--model WORKDIR`), or `idefics-jax export` it first")
    p = as_path(path)
    if not p.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (p / PARAMS_DIR).is_dir():
        return load_orbax(path, dtype, mesh, rules, quantize, group_size).set_attention(attention)
    if any(f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json") for f in p.iterdir()):
        ckpt = HFCheckpoint(path, dtype)
        if quantize is not None:
            check_quantize(ckpt.config, quantize, group_size)
        model = model_from_arrays(ckpt.config, _Lazy(ckpt), mesh, rules, quantize, group_size)
    else:
        raise CheckpointError(f"{path}: neither an idefics-jax checkpoint ({PARAMS_DIR}/) nor an HF model "
                              "(*.safetensors)")
    model.generation_defaults = read_generation_defaults(path)
    return model.set_attention(attention)


class _Lazy:
    """An HF checkpoint's parameters by path, each read when asked for (one in memory at a time)."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt, self.dtype = ckpt, ckpt.dtype

    def __getitem__(self, path: str):
        return self.ckpt.array(path)
