"""Model flops of a step: the numerator of MFU. Two per parameter per token for each matmul pass (the token
embedding and the position tables are lookups), attention 4 x layers x heads x head_dim x T per token (PaLM's
convention: the causal half not discounted); the vision tower and connector count their patches."""

from __future__ import annotations

import math

from flax import nnx

from idefics_jax.model.config import ModelConfig
from idefics_jax.model.idefics import IdeficsModel


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of the decoder layers, the head, the vision layers and the connector."""
    model = nnx.eval_shape(lambda: IdeficsModel(config, rngs=nnx.Rngs(0)))
    counts = {"text_layers": 0, "lm_head": 0, "vision_layers": 0, "connector": 0}
    for p, v in nnx.to_flat_state(nnx.state(model)):
        path, n = "/".join(map(str, p)), math.prod(v.get_value().shape)
        for name, prefix in (("text_layers", "text/layers/"), ("vision_layers", "vision/layers/"),
                             ("connector", "connector/")):
            if path.startswith(prefix):
                counts[name] += n
        if path == "lm_head":
            counts["lm_head"] += n
    return counts


def model_flops(config: ModelConfig, B: int, T: int, images: int, *, text_passes: int = 1, vision_passes: int = 1,
                head_tokens: int | None = None) -> float:
    """Flops of B rows of T tokens and `images` sub-images each (all devices together). `text_passes` /
    `vision_passes`: 1 forward only, 2 forward and activation gradients (LoRA: the weights stay), 3 with the
    weight gradients too (full training; a frozen vision tower under trained layers is 1). `head_tokens`: the
    positions the head scores per row (a prefill scores its last one; default all T)."""
    c, t, v = param_counts(config), config.text, config.vision
    text = 2 * c["text_layers"] * B * T + 4 * t.num_layers * t.num_heads * t.head_dim * T * B * T
    head = 2 * c["lm_head"] * B * (T if head_tokens is None else head_tokens)
    patches = v.patches_per_side**2
    shuffle = getattr(config.connector, "scale_factor", 1)
    vision = B * images * (2 * c["vision_layers"] * patches + 4 * v.num_layers * v.hidden_size * patches * patches
                           + 2 * c["connector"] * patches // shuffle**2)
    return text_passes * (text + head) + vision_passes * vision
