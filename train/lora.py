"""LoRA adapters over our stacked parameters: W' = W + (alpha / r) * A @ B, computed inside the step.

Adapters live beside the model, keyed by parameter path ("text/layers/q"), so the model code is untouched; the
same `apply` merges them for export. A weight of shape (L, *in, *out) gets A (L, prod(in), r), B (L, r, prod(out)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from idefics_jax.ops.weights import adapt
from idefics_jax.train.config import LoraConfig


def _split(shape, n_in: int, stacked: bool):
    lead = 1 if stacked else 0
    return shape[:lead], math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:])


def init(fan_in: dict[str, int | None], params: dict[str, jax.Array], cfg: LoraConfig,
         key) -> dict[str, dict[str, jax.Array]]:
    """Adapters for every target path; B starts at zero so the model starts unchanged. `fan_in`: the parameters'
    matmul metadata (`idefics_jax.model.idefics.matmul_fan_in`)."""
    out = {}
    for i, path in enumerate(cfg.targets):
        if path not in params:
            raise ValueError(f"LoRA target '{path}' is not a parameter of this model")
        if fan_in.get(path) is None:
            raise ValueError(f"LoRA target '{path}' is not a matmul weight")
        lead, d_in, d_out = _split(params[path].shape, fan_in[path], "/layers/" in path)
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, cfg.rank), jnp.float32) / math.sqrt(d_in)
        out[path] = {"a": a, "b": jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)}
    return out


def apply(params: dict[str, jax.Array], adapters: dict, cfg: LoraConfig, merge: bool = False) -> dict[str, jax.Array]:
    """Parameters with the adapters folded in (differentiable in the adapters). A quantized base weight (QLoRA)
    keeps its adapter beside it (an `AdaptedWeight`: the layers add the low-rank path, the base stays quantized);
    `merge` folds it into a dequantized float32 weight instead (export)."""
    scale = cfg.alpha / cfg.rank
    out = dict(params)
    for path, ab in adapters.items():
        out[path] = adapt(params[path], ab["a"], ab["b"], scale, merge)
    return out
