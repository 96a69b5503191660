"""HF safetensors (one file or shards, bf16 or fp32) -> idefics-jax Orbax checkpoint.

Streams tensor by tensor into preallocated output arrays, so peak host memory is the output plus one tensor.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

from idefics_jax.checkpoints.checkpoint import (META_FILE, PARAMS_DIR, CheckpointError, check_quantize,
                                                finalize_partial, param_metadata, param_shapes, quantize_param,
                                                save_partial)
from idefics_jax.checkpoints.hf_config import from_hf_file
from idefics_jax.checkpoints.paths import as_path, building, check_new, copy_side_files
from idefics_jax.checkpoints.registry import resolve
from idefics_jax.convert import _names
from idefics_jax.convert._safetensors import TensorInfo, read_header, read_tensor
from idefics_jax.model.config import ModelConfig
from idefics_jax.ops.quantize import eligible, leaf_axes
from idefics_jax.runtime.progress import Progress, bytes_progress

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `config` holds, by name, with its shape (the name map's order)."""
    return {k: e.hf_shape for k, e in _names.entries(config, param_shapes(config)).items()}


def hf_tensors(src: str) -> dict[str, TensorInfo]:
    """Every tensor of an HF checkpoint (a local directory or a bucket's), from `model.safetensors` or the shards
    its index names."""
    index = as_path(src) / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: malformed index (no weight_map)") from None
        out: dict[str, TensorInfo] = {}
        for name in files:
            shard = as_path(src) / name
            if not shard.exists():
                raise CheckpointError(f"{name}: missing shard named in model.safetensors.index.json")
            out.update(read_header(os.fspath(shard)))
        return out
    single = as_path(src) / "model.safetensors"
    if single.exists():
        return read_header(os.fspath(single))
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


class HFCheckpoint:
    """An HF directory checked against its config: every key present, none left over, every shape right.

    `array(path)` assembles one of our parameters (all layers of a stacked one) from the HF tensors it needs.
    """

    def __init__(self, src: str, dtype=None):
        self.src = src
        config = from_hf_file(src)
        self.tensors = hf_tensors(src)
        if "lm_head.weight" not in self.tensors:
            config = config.replace(tie_word_embeddings=True)  # the reference ties when the head is absent
        self.config = config
        self.shapes = param_shapes(config)
        wanted = _names.entries(config, self.shapes)
        missing = sorted(set(wanted) - set(self.tensors))
        leftover = sorted(set(self.tensors) - set(wanted))
        if missing:
            raise CheckpointError(
                f"{src}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. '{missing[0]}'")
        if leftover:
            raise CheckpointError(
                f"{src}: checkpoint has {len(leftover)} tensor(s) the config does not use, e.g. '{leftover[0]}'")
        for key, e in wanted.items():
            if self.tensors[key].shape != e.hf_shape:
                raise CheckpointError(
                    f"{os.path.basename(self.tensors[key].file)}: '{key}' has shape {self.tensors[key].shape}, "
                    f"config.json implies {e.hf_shape}")
        if dtype is None:
            dtype = self.tensors["model.text_model.embed_tokens.weight"].dtype
        self.dtype = DTYPES.get(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        if self.dtype is None:
            raise ValueError(f"unsupported dtype '{dtype}' (use one of {', '.join(DTYPES)})")
        self.by_path: dict[str, list[_names.Entry]] = {}
        for e in wanted.values():
            self.by_path.setdefault(e.path, []).append(e)
        self.nbytes = sum(self.tensors[k].nbytes for k in wanted)

    def array(self, path: str, progress: Progress | None = None) -> np.ndarray:
        out = np.empty(self.shapes[path], self.dtype)
        for e in self.by_path[path]:
            info = self.tensors[e.hf_key]
            x = _names.to_ours(e, read_tensor(info), self.shapes[path]).astype(self.dtype, copy=False)
            if e.layer is None:
                out[...] = x
            else:
                out[e.layer] = x
            if progress:
                progress.update(info.nbytes)
        return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_side_files(src: str) -> None:
    """The output must run on its own, so the tokenizer has to come along."""
    if not any((as_path(src) / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{src}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); "
                              "the converted checkpoint could not run on its own")


def convert(src: str, dst: str, dtype: str | None = None, progress: bool = True, quantize: str | None = None,
            group_size: int | None = None) -> ModelConfig:
    """HF directory `src` -> Orbax checkpoint directory `dst` (config and tokenizer files beside the params).

    quantize: "int8" or "int4" stores the matmul weights quantized (see `idefics_jax.ops.quantize`; `group_size` for
    int4), each one quantized as it is read: the full-precision model never exists in memory. The checkpoint's
    metadata records the format, so it loads quantized by itself.

    Built in a temporary directory and published when complete (`idefics_jax.checkpoints.paths.building`): renamed
    to a local `dst`; uploaded to a bucket (`gs://...`) with the metadata file, which loading requires, last. A
    failure leaves nothing loadable. `src` may also name a preset's published checkpoint or a hub id
    (`idefics_jax.checkpoints.registry.resolve`), or a directory in a bucket.
    """
    check_new(dst)
    src = resolve(src)
    if not as_path(src).is_dir():
        raise CheckpointError(f"{src}: not a directory")
    check_side_files(src)
    ckpt = HFCheckpoint(src, dtype)
    if quantize is not None:
        check_quantize(ckpt.config, quantize, group_size)
    tmp = None
    try:
        with building(dst, META_FILE, progress) as tmp:
            copy_side_files(src, tmp)
            bar = bytes_progress("converting", ckpt.nbytes, progress)
            params = os.path.join(tmp, PARAMS_DIR)
            # One parameter at a time: build it, write it, free it. Peak memory is the largest parameter.
            metas = param_metadata(ckpt.config)
            for path in ckpt.shapes:
                array, m = ckpt.array(path, bar), metas[path]
                if quantize and eligible(path, m.get("fan_in")):
                    q = quantize_param(path, array, m, quantize, group_size)
                    va, sa = leaf_axes(m["axes"], m["fan_in"], quantize)
                    save_partial(params, f"{path}/values", np.asarray(q.values), va)
                    save_partial(params, f"{path}/scales", np.asarray(q.scales), sa)
                else:
                    save_partial(params, path, array, m["axes"])
                del array
            finalize_partial(params)
            dtype_name = "bfloat16" if ckpt.dtype == DTYPES["bfloat16"] else "float32"
            meta = {"format": 1, "dtype": dtype_name, "tie_word_embeddings": ckpt.config.tie_word_embeddings}
            if quantize:
                meta["quantize"] = {"format": quantize, "group_size": group_size}
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f)
    except BaseException as e:
        if tmp is not None and _disk_full(e):
            free = shutil.disk_usage(os.path.dirname(tmp)).free
            raise OSError(f"{dst}: no space left on device while writing ({free / 2**20:,.1f} MiB free in "
                          f"{os.path.dirname(tmp)}; the output needs about {ckpt.nbytes / 2**20:,.1f} MiB)") from None
        raise
    return ckpt.config


def _disk_full(e: BaseException) -> bool:
    # Orbax reports tensorstore's ENOSPC as a ValueError carrying the OS message.
    return (isinstance(e, OSError) and e.errno == 28) or "No space left on device" in str(e)
