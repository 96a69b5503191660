"""Direct preference optimisation: the loss on summed completion log-probabilities, as TRL defines it.

With chosen / rejected log-probabilities under the policy (pc, pr) and the frozen reference (rc, rr):

    h = (pc - rc) - (pr - rr)
    sigmoid (DPO):  -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)   (eps: label smoothing)
    ipo:            (h - 1 / (2 * beta))^2, on log-probabilities averaged over each completion's tokens

averaged over the pairs. Rewards: beta * (pc - rc) and beta * (pr - rr); accuracy: the share of pairs whose
chosen reward is the larger.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from idefics_jax.train.config import DpoConfig


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, config: DpoConfig,
             chosen_tokens_B=None, rejected_tokens_B=None):
    """-> (mean loss, metrics). Log-probabilities are summed over each completion; `ipo` divides them by the
    completion's token counts (`*_tokens_B`), as TRL does for that loss."""
    pc, pr, rc, rr = policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B
    if config.loss == "ipo":
        nc, nr = jnp.maximum(chosen_tokens_B, 1), jnp.maximum(rejected_tokens_B, 1)
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    h = (pc - rc) - (pr - rr)
    if config.loss == "sigmoid":
        eps = config.label_smoothing
        losses = -(1 - eps) * jax.nn.log_sigmoid(config.beta * h) - eps * jax.nn.log_sigmoid(-config.beta * h)
    else:
        losses = (h - 1 / (2 * config.beta)) ** 2
    chosen = config.beta * jax.lax.stop_gradient(pc - rc)
    rejected = config.beta * jax.lax.stop_gradient(pr - rr)
    metrics = {"rewards_chosen": jnp.mean(chosen), "rewards_rejected": jnp.mean(rejected),
               "rewards_margin": jnp.mean(chosen - rejected),
               "preference_accuracy": jnp.mean((chosen > rejected).astype(jnp.float32))}
    return jnp.mean(losses), metrics
