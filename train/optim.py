"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay on matmul weights only."""

from __future__ import annotations

import optax

from convert._names import Conv, Linear, transforms
from idefics_jax._config import ModelConfig
from train.config import OptimConfig


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, max(steps - 1, 0)),
        decay_steps=max(steps, 1), end_value=cfg.learning_rate * cfg.min_learning_rate_ratio)


def decay_mask(config: ModelConfig, trainable: dict) -> dict:
    """True for matmul weights (Linear / Conv in the name map); norms, biases, embeddings and latents are not
    decayed. LoRA adapters ({"a", "b"} under a weight's path) are decayed like their weight."""
    trs = transforms(config)
    return {path: {k: True for k in v} if isinstance(v, dict) else isinstance(trs.get(path), (Linear, Conv))
            for path, v in trainable.items()}


def make(cfg: OptimConfig, steps: int, config: ModelConfig, trainable: dict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask(config, trainable)),
    )
