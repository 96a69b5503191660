"""One optimisation step: next-token cross-entropy on `labels` (-100 ignored) and an optax AdamW update.

The batch is a dict of the HF processor's arrays (`input_ids`, `attention_mask`, `pixel_values`,
`pixel_attention_mask`) plus `labels` (B, T): the token each position should predict *after shifting*, as in
transformers, i.e. the logits at t are scored against `labels[:, t + 1]`; -100 marks tokens that carry no loss
(prompt, padding, image tokens).

On a mesh the step needs nothing more: parameters and optimizer state carry their shardings, the model
constrains its activations, and the compiler inserts the collectives.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from idefics_jax import sharding as shd

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")


def cross_entropy(logits_BTV, labels_BT):
    """-> (summed loss, number of scored tokens); positions t predict labels t + 1, -100 ignored.

    A sum and a count rather than a mean, so that gradient accumulation can weigh micro-batches by tokens.
    """
    # Labels shifted left rather than logits sliced: no copy of the (B, T, V) logits.
    labels = jnp.pad(labels_BT[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def loss_fn(model, batch: dict, remat: bool = False):
    """Mean next-token loss over the scored tokens of the batch (0 when there are none)."""
    logits = model.forward(*(batch.get(k) for k in MODEL_INPUTS), remat=remat)
    total, count = cross_entropy(logits, batch["labels"])
    return total / jnp.maximum(count, 1)


def make_optimizer(model, learning_rate=1e-5, *, weight_decay: float = 0.0, **adamw) -> nnx.Optimizer:
    """AdamW over every parameter. Its moments are created like the parameters, so they share their shardings."""
    return nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=weight_decay, **adamw), wrt=nnx.Param)


def step(model, optimizer: nnx.Optimizer, batch: dict, remat: bool = False):
    """One AdamW step on `batch`, updating `model` and `optimizer` in place; returns the loss before the step."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, remat)
    optimizer.update(model, grads)
    return loss


# The old parameters and optimizer state are donated: at 8B they are most of the device memory.
train_step = nnx.jit(step, donate_argnums=(0, 1), static_argnames="remat")


def put_batch(batch: dict, model) -> dict:
    """A host batch, the same on every process, as global arrays split over the batch axes of the model's mesh."""
    part = model.partitioning
    return {k: shd.put(v, ("batch",) + (None,) * (np.ndim(v) - 1), part) for k, v in batch.items() if v is not None}

