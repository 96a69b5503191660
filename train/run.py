"""The training program for every objective: `idefics-jax train CONFIG [key=value ...]` and
`python -m idefics_jax.train CONFIG ...` run `run(config)`: supervised fine-tuning (`trainer`), DPO (`dpo`) or GRPO
(`grpo`) as `objective` says."""

from __future__ import annotations

import json
import sys

from idefics_jax.train import config as config_lib
from idefics_jax.train.config import TrainConfig


def run(config: TrainConfig) -> dict:
    """Runs (or resumes) the training `config` describes; returns the last logged metrics."""
    if config.objective == "grpo":
        from idefics_jax.train.grpo import train_grpo

        return train_grpo(config)
    if config.objective == "dpo":
        from idefics_jax.train.dpo import train_dpo

        return train_dpo(config)
    from idefics_jax.train.trainer import train

    return train(config)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m idefics_jax.train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    print(json.dumps(run(config_lib.load(argv[0], argv[1:]))))
    return 0
