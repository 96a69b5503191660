"""idefics-jax Orbax checkpoint -> HF safetensors directory that transformers loads."""

from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.checkpoints.checkpoint import quantized_format
from idefics_jax.convert import _names
from idefics_jax.convert._safetensors import write_file as write_safetensors
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.checkpoints.hf_config import to_hf_dict
from idefics_jax.checkpoints.paths import as_path, building, check_new, copy_side_files
from idefics_jax.checkpoints.registry import resolve
from idefics_jax.runtime.progress import bytes_progress
from idefics_jax.ops.weights import dense

SHARD_BYTES = 4 * 2**30


def model_to_hf_tensors(model) -> dict[str, np.ndarray]:
    """Our parameters -> HF tensors by name (an untied head is written out even when we tie it)."""
    config = model.config
    arrays = {"/".join(map(str, p)): _full(v[...], model.dtype) for p, v in nnx.to_flat_state(nnx.state(model))}
    out = {}
    for key, e in _names.entries(config, {k: v.shape for k, v in arrays.items()}).items():
        y = arrays[e.path] if e.layer is None else arrays[e.path][e.layer]
        out[key] = np.ascontiguousarray(e.transform.to_hf(y))
    if config.tie_word_embeddings:
        out["lm_head.weight"] = arrays["text/embed"]
    return out


def _full(value, dtype) -> np.ndarray:
    return np.asarray(dense(value, dtype))


def export(src: str, dst: str, progress: bool = True) -> None:
    """Orbax checkpoint (or HF directory) `src` -> HF directory `dst` (safetensors shards of at most 4 GiB, config,
    tokenizer). A training run's WORKDIR: `idefics_jax.train.export.export_run`. Quantized weights are written
    dequantized (HF checkpoints hold full-precision weights), with a notice."""
    check_new(dst)
    src = resolve(src)
    model = load_pretrained(src)
    fmt = quantized_format(model)
    if fmt:
        print(f"note: {src} holds {fmt} weights; writing them dequantized to {jnp.dtype(model.dtype).name}",
              file=sys.stderr)
    write_hf(model, src, dst, progress)


def write_hf(model, side_files: str, dst: str, progress: bool = True) -> None:
    """`model` -> HF directory `dst` (local or a bucket), with the tokenizer, processor and config files of
    directory `side_files`. Built in a temporary directory and published when complete
    (`idefics_jax.checkpoints.paths.building`): a bucket receives config.json last, so that neither
    `load_pretrained` nor transformers loads a partial upload."""
    tensors = model_to_hf_tensors(model)
    hf_config = _hf_config(side_files, model.config)
    with building(dst, "config.json", progress) as tmp:
        copy_side_files(side_files, tmp)
        for name in os.listdir(tmp):
            if name.startswith("idefics_jax"):
                os.remove(os.path.join(tmp, name))
        hf_config["tie_word_embeddings"] = False  # the head is always written out
        hf_config.setdefault("text_config", {})["tie_word_embeddings"] = False
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        shards, cur, size = [], {}, 0
        for k, v in tensors.items():
            if cur and size + v.nbytes > SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + v.nbytes
        shards.append(cur)
        bar = bytes_progress("exporting", sum(v.nbytes for v in tensors.values()), progress)
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0])
            bar.update(size)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, name), shard)
                weight_map.update({k: name for k in shard})
                bar.update(sum(v.nbytes for v in shard.values()))
            index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
    if progress:
        print(f"wrote {dst}", file=sys.stderr)


def _hf_config(src: str, model_config) -> dict:
    path = as_path(src) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    return to_hf_dict(model_config)
