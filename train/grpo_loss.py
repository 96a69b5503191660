"""Group relative policy optimisation: advantages and the loss on fixed rollouts (DeepSeekMath; TRL's GRPO).

For G completions o_1..o_G of one prompt with rewards r_i, the advantage of every token of o_i is
A_i = (r_i - mean(r)) / (std(r) + 1e-4), the sample standard deviation of the group (ddof 1, as TRL). Per token,
with the ratio rho = exp(logp - logp_old) to the policy that drew the rollouts and the k3 estimate of the KL
divergence to the reference, k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1:

    l_t = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * k3

Loss normalisation (DeepSeekMath's 1/|o_i|, TRL's loss_type "grpo"): each completion's per-token losses are
averaged over its tokens, then the completions are averaged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def advantages(rewards_N: np.ndarray, group_size: int) -> np.ndarray:
    """Group-normalised advantages (N,) of rewards (N,) laid out group after group."""
    r = np.asarray(rewards_N, np.float32).reshape(-1, group_size)
    a = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return a.reshape(-1)


def grpo_loss(logps_NT, old_logps_NT, ref_logps_NT, advantages_N, mask_NT, *, beta: float, epsilon: float):
    """-> (loss, metrics) on per-token log-probabilities (N, T) of the completion tokens (`mask_NT` 1)."""
    mask = mask_NT.astype(jnp.float32)
    ratio = jnp.exp(logps_NT - old_logps_NT)
    a = advantages_N[:, None]
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -jnp.minimum(ratio * a, clipped * a)
    d = ref_logps_NT - logps_NT
    kl = jnp.exp(d) - d - 1
    per_token = per_token + beta * kl
    n = jnp.maximum(mask.sum(axis=1), 1)
    loss = jnp.mean(jnp.sum(per_token * mask, axis=1) / n)
    total = jnp.maximum(mask.sum(), 1)
    is_clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    metrics = {"kl": jnp.sum(kl * mask) / total, "clip_fraction": jnp.sum(is_clipped * mask) / total}
    return loss, metrics
