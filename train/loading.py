"""The model a training run starts from, and the model a finished (or running) run has trained (`trained_model`;
as a Chat, `trained_chat`; `load_chat` takes a WORKDIR or anything `Chat.load` takes)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax.model import sharding as shd
from idefics_jax.checkpoints.checkpoint import quantize_model
from idefics_jax.checkpoints.hub import resolve_model
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.checkpoints.hf_config import from_hf_file, read_generation_defaults
from idefics_jax.model.idefics import IdeficsModel
from idefics_jax.checkpoints.paths import as_path, building, local_side_files
from idefics_jax.ops.quantize import QuantizedWeight
from idefics_jax.train import config as config_lib
from idefics_jax.train import optim, step as step_lib
from idefics_jax.train.config import TrainConfig

CHECKPOINTS = "checkpoints"


def is_run(path) -> bool:
    """Whether `path` (local, `gs://`, any path object) is a training WORKDIR (its checkpoints and the config it
    ran with)."""
    p = as_path(path)
    return (p / CHECKPOINTS).is_dir() and (p / "config.json").exists()


def _shapes_base(cfg: TrainConfig) -> str:
    """The tiny-shapes architecture, tokenizer and processor without weights, written once into WORKDIR/base (a
    local directory or a bucket) by process 0 while the others wait. Published whole, config.json last
    (`idefics_jax.checkpoints.paths.building`): a directory without it is a killed write, written again."""
    from idefics_jax.shapes import model as shapes_model

    path = as_path(cfg.workdir) / "base"
    if jax.process_index() == 0 and not (path / "config.json").exists():
        if path.exists():
            path.rmtree()
        with building(path, "config.json") as tmp:
            shapes_model.write_base(tmp)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("shapes-base")
    return os.fspath(path)


# Model specs that name a built-in architecture rather than a path: name -> writes its weightless HF directory for
# a run and returns it (randomly initialised from `seed` by `load_model`).
_BUILTIN: dict[str, Callable[[TrainConfig], str]] = {}


def register(name: str, write_base: Callable[[TrainConfig], str]) -> None:
    """Makes `name` a model spec (`model: NAME` in a training config)."""
    _BUILTIN[name] = write_base


register("shapes", _shapes_base)


def model_path(cfg: TrainConfig) -> str:
    """The directory `cfg.model` names: a registered built-in's weightless directory, another run's WORKDIR, or
    what `convert.hub.resolve_model` makes of it (a directory, a shipped model, a preset's or hub id's snapshot in
    the hub cache)."""
    write_base = _BUILTIN.get(cfg.model)
    if write_base is not None:
        return write_base(cfg)
    return cfg.model if is_run(cfg.model) else resolve_model(cfg.model)


def load_model(cfg: TrainConfig, part: shd.Partitioning | None):
    """A checkpoint or HF directory, a hub id or preset name; another run's WORKDIR (its newest step); a directory
    holding only config.json (and tokenizer/processor files): random initialisation from `seed`; or a registered
    built-in ("shapes": the tiny-shapes architecture), randomly initialised.
    With `quantize`, the matmul weights come quantized (QLoRA's frozen base).
    Returns the model and the directory its processor comes from."""
    model, model_dir = _load_model(cfg, part)
    if cfg.quantize:  # a checkpoint was quantized while loading; a random or trained model is quantized here
        model = quantize_model(model, cfg.quantize, cfg.group_size or None)
    return model, model_dir


def _load_model(cfg: TrainConfig, part: shd.Partitioning | None):
    path = model_path(cfg)
    if is_run(path):  # another run: continue from its newest checkpoint
        model, processor_dir = trained_model(path)
        return (model if part is None else _shard(model, part)), processor_dir
    p = as_path(path)
    if p.is_dir() and not any(f.name.endswith(".safetensors") or f.name == "params" for f in p.iterdir()):
        config = from_hf_file(path)
        model = IdeficsModel(config, rngs=nnx.Rngs(cfg.seed), partitioning=part)
        model = model if part is None else _shard(model, part)
        model.generation_defaults = read_generation_defaults(path)  # eos for evaluation
        return model, path
    return load_pretrained(path, dtype=jnp.float32, mesh=None if part is None else part.mesh,
                           quantize=cfg.quantize or None, group_size=cfg.group_size or None), path


def _shard(model, part: shd.Partitioning):
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: v.replace(jax.device_put(v[...], part.sharding(v.get_metadata()["axes"], v.shape))),
                         state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def trained_model(workdir: str, step: int | None = None):
    """-> (model, directory of its tokenizer / processor files) for the run in `workdir` (newest step by default)."""
    cfg = dataclasses.replace(config_lib.from_dict(json.loads((as_path(workdir) / "config.json").read_text())),
                              workdir=os.fspath(workdir))
    model, model_dir = load_model(cfg, None)
    parts = step_lib.split(model, cfg.freeze, cfg.lora, jax.random.key(cfg.seed))
    tx = optim.make(cfg.optim, cfg.steps, parts.fan_in, parts.trainable)
    target = step_lib.init_state(parts.trainable, tx)
    manager = ocp.CheckpointManager(as_path(workdir) / CHECKPOINTS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{workdir}: no complete checkpoint to export")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    manager.close()
    # A quantized base is dequantized under its adapters here (export writes those weights).
    return step_lib.merge(parts, step_lib.full_params(parts.frozen, state.trainable, cfg.lora, merge=True)), model_dir


def trained_chat(workdir: str, *, step: int | None = None, dtype=None, quantize: str | None = None,
                 group_size: int | None = None, **chat_options):
    """A Chat over the model of the run in `workdir` (newest step by default, LoRA adapters merged), cast to
    `dtype` and quantized with `quantize` / `group_size` as `Chat.load` does, keeping the run's generation defaults
    (eos, pad); `chat_options` as `Chat.load` (do_image_splitting, longest_edge, ...)."""
    from transformers import AutoProcessor

    from idefics_jax.generation.chat import Chat

    model, model_dir = trained_model(workdir, step)
    defaults = model.generation_defaults  # a model rebuilt below does not carry them
    if dtype is not None:  # the full-precision weights; a QLoRA run's quantized base stays as it is
        graphdef, state = nnx.split(model)
        cast = lambda x: x if isinstance(x, QuantizedWeight) else x.astype(dtype)  # noqa: E731
        model = nnx.merge(graphdef, jax.tree.map(cast, state, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
    if quantize:
        model = quantize_model(model, quantize, group_size)
    model.generation_defaults = defaults
    return Chat(model, AutoProcessor.from_pretrained(local_side_files(model_dir)), **chat_options)


def load_chat(name: str, **options):
    """A Chat for a training WORKDIR (`trained_chat`) or anything `Chat.load` takes (a checkpoint directory, local
    or in a bucket, a shipped model, a preset, a hub id); `options` as theirs. What `idefics-jax generate --model`
    loads."""
    from idefics_jax.generation.chat import Chat

    return trained_chat(name, **options) if is_run(name) else Chat.load(name, **options)
