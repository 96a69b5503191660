"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay on matmul weights only."""

from __future__ import annotations

import optax

from idefics_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, max(steps - 1, 0)),
        decay_steps=max(steps, 1), end_value=cfg.learning_rate * cfg.min_learning_rate_ratio)


def decay_mask(fan_in: dict[str, int | None], trainable: dict) -> dict:
    """True for matmul weights (their `fan_in` metadata is set); norms, biases, embeddings and latents are not
    decayed. LoRA adapters ({"a", "b"} under a weight's path) are decayed like their weight."""
    return {path: {k: True for k in v} if isinstance(v, dict) else fan_in.get(path) is not None
            for path, v in trainable.items()}


def _group(path: str) -> str:
    return "text" if path == "lm_head" or path.startswith("text/") else "rest"


def make(cfg: OptimConfig, steps: int, fan_in: dict[str, int | None], trainable: dict) -> optax.GradientTransformation:
    """`fan_in`: the parameters' matmul metadata (`Split.fan_in`), which decides weight decay."""
    mask = decay_mask(fan_in, trainable)

    def adamw(scale: float):
        sched = schedule(cfg, steps)
        return optax.adamw(lambda n: scale * sched(n), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask)

    if cfg.text_lr_scale == 1.0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw(1.0))
    # LoRA adapters ({"a", "b"} under a weight's path) go with their weight.
    labels = {p: {k: _group(p) for k in v} if isinstance(v, dict) else _group(p) for p, v in trainable.items()}
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.multi_transform({"rest": adamw(1.0), "text": adamw(cfg.text_lr_scale)}, labels))
