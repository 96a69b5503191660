"""The model a training run starts from, and the model a finished (or running) run has trained (`trained_model`;
as a Chat, `trained_chat`; `load_chat` takes a WORKDIR or anything `Chat.load` takes). Names resolve through
`idefics_jax.checkpoints.registry.resolve`, which gives a WORKDIR's newest checkpoint; this layer builds its model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from idefics_jax.checkpoints.checkpoint import quantize_model
from idefics_jax.checkpoints.hf_config import from_hf_file, read_generation_defaults
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.checkpoints.paths import as_path, building, local_side_files
from idefics_jax.checkpoints.registry import RUN_CHECKPOINTS, RUN_CONFIG, resolve, run_step
from idefics_jax.model.idefics import IdeficsModel
from idefics_jax.model.sharding import Partitioning
from idefics_jax.ops.weights import cast, is_leaf
from idefics_jax.train import config as config_lib
from idefics_jax.train import optim, step as step_lib
from idefics_jax.train.config import TrainConfig


def _shapes_base(config: TrainConfig) -> str:
    """The tiny-shapes architecture, tokenizer and processor without weights, written once into WORKDIR/base (a
    local directory or a bucket) by process 0 while the others wait. Published whole, config.json last
    (`idefics_jax.checkpoints.paths.building`): a directory without it is a killed write, written again."""
    from idefics_jax.shapes import model as shapes_model

    path = as_path(config.workdir) / "base"
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


def model_path(config: TrainConfig) -> str:
    """The directory `config.model` names: a registered built-in's weightless directory, or what
    `idefics_jax.checkpoints.registry.resolve` makes of it (a directory, a shipped model, another run's newest
    checkpoint, a preset's or hub id's snapshot in the hub cache)."""
    write_base = _BUILTIN.get(config.model)
    return write_base(config) if write_base is not None else resolve(config.model)


def load_model(config: TrainConfig, partitioning: Partitioning | None):
    """A checkpoint or HF directory, a hub id or preset name; another run's WORKDIR (its newest step); a directory
    holding only config.json (and tokenizer/processor files): random initialisation from `seed`; or a registered
    built-in ("shapes": the tiny-shapes architecture), randomly initialised.
    With `quantize`, the matmul weights come quantized (QLoRA's frozen base).
    Returns the model and the directory its processor comes from."""
    model, model_dir = _load_model(config, partitioning)
    if config.quantize:  # a checkpoint was quantized while loading; a random or trained model is quantized here
        model = quantize_model(model, config.quantize, config.group_size or None)
    return model.set_attention(config.attention or None), model_dir


def param_dtype(config: TrainConfig):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.param_dtype]


def compute_dtype(config: TrainConfig):
    """What the step casts the parameters to: None keeps them as they are (fp32)."""
    return {"float32": None, "bfloat16": jnp.bfloat16}[config.compute_dtype]


def _load_model(config: TrainConfig, partitioning: Partitioning | None):
    path = model_path(config)
    run = run_step(path)
    if run is not None:  # another run: continue from its newest checkpoint
        model, processor_dir = trained_model(run.workdir, run.step)
        return (model if partitioning is None else _shard(model, partitioning)), processor_dir
    p = as_path(path)
    if p.is_dir() and not any(f.name.endswith(".safetensors") or f.name == "params" for f in p.iterdir()):
        model = IdeficsModel(from_hf_file(path), rngs=nnx.Rngs(config.seed), dtype=param_dtype(config),
                             partitioning=partitioning)
        model = model if partitioning is None else _shard(model, partitioning)
        model.generation_defaults = read_generation_defaults(path)  # eos for evaluation
        return model, path
    return load_pretrained(path, dtype=param_dtype(config), mesh=None if partitioning is None else partitioning.mesh,
                           quantize=config.quantize or None, group_size=config.group_size or None), path


def _shard(model, partitioning: Partitioning):
    graphdef, state = nnx.split(model)
    place = lambda v: v.replace(  # noqa: E731
        jax.device_put(v[...], partitioning.sharding(v.get_metadata()["axes"], v.shape)))
    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def trained_model(workdir: str, step: int | None = None):
    """-> (model, directory of its tokenizer / processor files) for the run in `workdir` (newest step by default)."""
    config = dataclasses.replace(config_lib.from_dict(json.loads((as_path(workdir) / RUN_CONFIG).read_text())),
                                 workdir=os.fspath(workdir))
    model, model_dir = load_model(config, None)
    parts = step_lib.split(model, config.freeze, config.lora, jax.random.key(config.seed))
    tx = optim.make(config.optim, config.steps, parts.fan_in, parts.trainable)
    target = step_lib.init_state(parts.trainable, tx)
    manager = ocp.CheckpointManager(as_path(workdir) / RUN_CHECKPOINTS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{workdir}: no complete checkpoint to export")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    manager.close()
    # A quantized base is dequantized under its adapters here (export writes those weights).
    trained = step_lib.full_params(parts.frozen, state.trainable, config.lora, merge=True)
    return step_lib.merge(parts, trained), model_dir


def trained_chat(workdir: str, *, step: int | None = None, dtype=None, quantize: str | None = None,
                 group_size: int | None = None, attention: str | None = None, mesh=None, **chat_options):
    """A Chat over the model of the run in `workdir` (newest step by default, LoRA adapters merged), cast to
    `dtype`, quantized with `quantize` / `group_size` and with the `attention` backend as `Chat.load` does, keeping
    the run's generation defaults (eos, pad); `chat_options` as `Chat.load` (do_image_splitting, longest_edge,
    ...)."""
    from transformers import AutoProcessor

    from idefics_jax.generation.chat import Chat

    if mesh is not None:
        raise ValueError(f"{workdir}: a training run's WORKDIR loads onto one device; `idefics-jax export` it to "
                         "spread it over a mesh")
    model, model_dir = trained_model(workdir, step)
    defaults = model.generation_defaults  # a model rebuilt below does not carry them
    if dtype is not None:  # the full-precision weights; a QLoRA run's quantized base stays as it is
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.tree.map(lambda x: cast(x, dtype), state, is_leaf=is_leaf))
    if quantize:
        model = quantize_model(model, quantize, group_size)
    model.generation_defaults = defaults
    return Chat(model.set_attention(attention), AutoProcessor.from_pretrained(local_side_files(model_dir)),
                **chat_options)


def load_chat(name: str, **options):
    """A Chat for a training WORKDIR (`trained_chat`; its newest checkpoint) or anything `Chat.load` takes (a
    checkpoint directory, local or in a bucket, a shipped model, a preset, a hub id); `options` as theirs. What
    `idefics-jax generate --model` loads."""
    from idefics_jax.generation.chat import Chat

    path = resolve(name)
    run = run_step(path)
    return trained_chat(run.workdir, step=run.step, **options) if run is not None else Chat.load(path, **options)
