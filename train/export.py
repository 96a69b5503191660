"""A training run's newest checkpoint as a model: base weights, trained parameters, LoRA adapters merged."""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from train import config as config_lib
from train import lora as lora_lib
from train import optim, step as step_lib
from train.config import TrainConfig
from train.trainer import CHECKPOINTS, load_model


def trained_model(workdir: str, step: int | None = None):
    """-> (model, directory of its tokenizer / processor files) for the run in `workdir` (newest step by default)."""
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = config_lib._build(TrainConfig, json.load(f))
    cfg = config_lib.dataclasses.replace(cfg, workdir=workdir)
    model, model_dir = load_model(cfg, None)
    parts = step_lib.split(model, cfg.freeze, cfg.lora, jax.random.key(cfg.seed))
    tx = optim.make(cfg.optim, cfg.steps, model.config, parts.trainable)
    target = step_lib.init_state(parts.trainable, tx)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS)))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{workdir}: no complete checkpoint to export")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    manager.close()
    if cfg.lora.rank > 0:
        params = lora_lib.apply(parts.frozen, state.trainable, cfg.lora)
    else:
        params = {**parts.frozen, **state.trainable}
    return step_lib.merge(parts, params), model_dir
