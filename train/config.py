"""Training configs: frozen dataclasses read from a YAML file (a shipped one by name), any field overridable as
key=value.

    cfg = load("tiny", ["steps=20", "optim.learning_rate=1e-3", "workdir=/tmp/run"])
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

import yaml

from idefics_jax import configs
from idefics_jax.model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The synthetic task's generator, for data "shapes" (a curriculum narrows it)."""
    shapes_per_image: tuple[int, ...] = (1, 2, 3, 4)
    questions: tuple[str, ...] = ("count", "color", "shape")  # the kinds asked
    questions_per_image: int = 0  # turns per record; 0 = every allowed question of the image


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of the training data and its share of the records (`weight`, relative to the others')."""
    source: str = ""  # a data spec (see `train.sources`)
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A TFDS data directory written by `train.tfds_builder`, or "shapes" for the synthetic task; or a mixture:
    # [{source: SPEC, weight: W}, ...]. A plain string is one source.
    train: tuple[SourceConfig, ...] = ()
    eval: str = ""  # held-out data (same forms); "" = no evaluation
    batch_size: int = 8
    max_length: int = 512  # longer records are skipped and counted, never truncated
    length_buckets: tuple[int, ...] = (128, 256, 512)
    image_splitting: bool = True
    longest_edge: int = 0  # 0 = the processor's own
    max_images: int = 4
    packing: bool = False  # several records per row up to the longest bucket (segment ids keep them apart)
    pack_window: float = 3.0  # packing: batches' worth of tokens read ahead to fill the rows from
    shuffle_seed: int = 0
    num_records: int = 0  # for generated data ("shapes"): how many records to write
    shapes: ShapesConfig = ShapesConfig()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.01  # not applied to norms, biases and embeddings
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 1
    # The decoder's (text/, lm_head) learning rate relative to vision + connector. Below 1 when the vision tower
    # learns from scratch: a language model whose read-out moves as fast as the features it reads keeps the vision
    # tower from learning anything but colour (tiny-shapes: 0.1 learns shape in ~500 steps, 1.0 not in 2000).
    text_lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0 = no LoRA: train the (unfrozen) weights themselves
    alpha: float = 16.0
    targets: tuple[str, ...] = ("text/layers/q", "text/layers/k", "text/layers/v", "text/layers/o")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all devices not used by the other axes
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class EvalTaskConfig:
    """A benchmark scored during training, as `idefics-jax eval --task TASK --data DATA --limit LIMIT` scores it."""
    task: str = ""  # docvqa, vqav2, textvqa, chartqa, mmmu, exact_match
    data: str = ""  # what `idefics-jax eval --data` takes
    limit: int = 0  # the first N samples; 0 = all
    name: str = ""  # the metric's name is eval_NAME_METRIC; "" = the task's name


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[EvalTaskConfig, ...] = ()  # scored every `eval_every` steps
    batch_size: int = 16  # requests the serving engine decodes together


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True  # event files in WORKDIR/tensorboard
    wandb: str = ""  # a Weights & Biases project to log to ("" = none); WANDB_MODE=offline etc. are honoured


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """objective "dpo": the loss on preference records {images, prompt, chosen, rejected} (train.preference)."""
    loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid only: the assumed share of flipped preference labels
    max_new_tokens: int = 16  # completions longer than this many tokens are cut


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """objective "grpo": rollouts, rewards and the clipped, KL-penalised update (train.grpo)."""
    group_size: int = 8  # G: completions sampled per prompt
    prompts: int = 4  # prompts per rollout batch (G x prompts rollouts)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL penalty to the reference (k3 estimator)
    epsilon: float = 0.2  # ratio clipping
    updates: int = 1  # policy updates (optimizer steps) per batch of rollouts
    reward: str = "exact"  # exact, numeric, regex:PATTERN or module:function (train.rewards)
    slots: int = 16  # the rollout engine's decode slots


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = ""  # HF directory, idefics-jax checkpoint, another run's WORKDIR (its newest step), or "shapes"
    workdir: str = "out/train"
    steps: int = 1000
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": bf16 compute over fp32 master weights
    # "bfloat16": the weights themselves, their gradients and the AdamW moments in bf16: half the memory (a full
    # fine-tune of an 8B model on a v4-8), at bf16's precision in every update.
    param_dtype: str = "float32"
    remat: str = "full"  # "none", "full" (recompute each layer in the backward pass) or "matmuls" (keep matmuls)
    attention: str = ""  # "xla", "cudnn" or "pallas"; "" = the platform's (pallas on TPU, cudnn on GPU, xla on CPU)
    freeze: tuple[str, ...] = ()  # any of "vision", "connector", "text"
    # "int8" / "int4": the matmul weights are loaded quantized and stay frozen (QLoRA with lora.rank > 0); the
    # adapters and whatever else is unfrozen train on top. "" = full precision.
    quantize: str = ""
    group_size: int = 0  # int4 group size; 0 = the default (see idefics_jax.ops.quantize)
    log_every: int = 10
    eval_every: int = 0  # 0 = never
    eval_batches: int = 4
    eval_generate_tokens: int = 8  # greedy answer length for exact-match accuracy
    save_every: int = 200
    keep: int = 3
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    lora: LoraConfig = LoraConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    objective: str = "sft"  # "sft" (next-token loss on answers), "dpo" or "grpo"
    dpo: DpoConfig = DpoConfig()
    grpo: GrpoConfig = GrpoConfig()


def _coerce(value: Any, hint, where: str):
    origin = typing.get_origin(hint)
    if hint is SourceConfig and isinstance(value, str):
        value = {"source": value}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return _build(hint, value, where)
    if origin is tuple:
        (inner, *_) = typing.get_args(hint)
        if isinstance(value, str) and dataclasses.is_dataclass(inner):  # one item (data.train: one source)
            value = [value] if value else []
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where}: '{value}' is not a boolean")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: '{value}' is not a {hint.__name__}") from None
    return value


def _build(cls, d: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config field '{(where + '.' if where else '') + unknown[0]}'")
    return cls(**{k: _coerce(v, hints[k], (where + "." if where else "") + k) for k, v in d.items()})


def _set(d: dict, dotted: str, value: str) -> None:
    *head, last = dotted.split(".")
    for h in head:
        d = d.setdefault(h, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{dotted}': '{h}' is not a section")
    d[last] = yaml.safe_load(value) if value else ""


def load(path: str, overrides: list[str] = ()) -> TrainConfig:
    """Reads a YAML config (a path, or the name of a shipped one: "tiny") and applies `key=value` overrides
    (nested keys with dots)."""
    if not os.path.exists(path):
        shipped = configs.find(path)
        if shipped is None:
            raise ConfigError(f"{path}: no such config file (nor a shipped config: {', '.join(configs.names())})")
        path = shipped
    with open(path) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not key=value")
        k, v = o.split("=", 1)
        _set(d, k.strip(), v.strip())
    cfg = _build(TrainConfig, d)
    if cfg.remat not in ("none", "full", "matmuls"):
        raise ConfigError(f"remat: '{cfg.remat}' is not one of none, full, matmuls")
    if cfg.attention not in ("", "xla", "cudnn", "pallas"):
        raise ConfigError(f"attention: '{cfg.attention}' is not one of xla, cudnn, pallas (or empty: the platform's)")
    for name in ("compute_dtype", "param_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16"):
            raise ConfigError(f"{name}: '{getattr(cfg, name)}' is not one of float32, bfloat16")
    if cfg.quantize not in ("", "int8", "int4"):
        raise ConfigError(f"quantize: '{cfg.quantize}' is not one of int8, int4 (or empty)")
    if cfg.group_size < 0 or cfg.group_size % 2:
        raise ConfigError(f"group_size: {cfg.group_size} is not an even number (or 0 for the default)")
    if cfg.optim.grad_accum < 1 or cfg.data.batch_size % cfg.optim.grad_accum:
        raise ConfigError(f"optim.grad_accum: {cfg.optim.grad_accum} micro-batches do not divide data.batch_size "
                          f"{cfg.data.batch_size}")
    _check_objective(cfg)
    unknown = set(cfg.freeze) - {"vision", "connector", "text"}
    if unknown:
        raise ConfigError(f"freeze: '{sorted(unknown)[0]}' is not one of vision, connector, text")
    _check_mixture(cfg.data.train)
    _check_eval_tasks(cfg.eval)
    return cfg


def _check_mixture(train: tuple[SourceConfig, ...]) -> None:
    for i, s in enumerate(train):
        if not s.source:
            raise ConfigError(f"data.train[{i}]: name a source")
        if not (math.isfinite(s.weight) and s.weight > 0):
            raise ConfigError(f"data.train[{i}] ({s.source}): weight {s.weight} is not a positive number")
    seen = [s.source for s in train]
    twice = sorted({s for s in seen if seen.count(s) > 1})
    if twice:
        raise ConfigError(f"data.train: source '{twice[0]}' is named twice (give it one weight)")


def _check_eval_tasks(ev: EvalConfig) -> None:
    from idefics_jax.evaluate.tasks import TASKS  # names only: no jax import

    names = []
    for i, t in enumerate(ev.tasks):
        if t.task not in TASKS:
            raise ConfigError(f"eval.tasks[{i}]: task '{t.task}' is not one of {', '.join(TASKS)}")
        if not t.data:
            raise ConfigError(f"eval.tasks[{i}] ({t.task}): name its data (what `idefics-jax eval --data` takes)")
        if t.limit < 0:
            raise ConfigError(f"eval.tasks[{i}] ({t.task}): limit {t.limit} is negative (0 = all samples)")
        names.append(t.name or t.task)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"eval.tasks: two tasks are named '{twice[0]}' (give each a `name`)")
    if ev.batch_size < 1:
        raise ConfigError(f"eval.batch_size: {ev.batch_size} is not a positive number")


def _check_objective(cfg: TrainConfig) -> None:
    if cfg.objective not in ("sft", "dpo", "grpo"):
        raise ConfigError(f"objective: '{cfg.objective}' is not one of sft, dpo, grpo")
    d, g = cfg.dpo, cfg.grpo
    if d.loss not in ("sigmoid", "ipo"):
        raise ConfigError(f"dpo.loss: '{d.loss}' is not one of sigmoid, ipo")
    if d.beta <= 0 or not 0 <= d.label_smoothing < 0.5:
        raise ConfigError("dpo.beta must be positive and dpo.label_smoothing in [0, 0.5)")
    for name in ("prompts", "max_new_tokens", "updates", "slots"):
        if getattr(g, name) < 1:
            raise ConfigError(f"grpo.{name}: {getattr(g, name)} must be at least 1")
    if g.group_size < 2:
        raise ConfigError("grpo.group_size: at least 2 completions per prompt (advantages compare them)")
    if g.temperature <= 0 or g.beta < 0 or g.epsilon <= 0:
        raise ConfigError("grpo.temperature and grpo.epsilon must be positive, grpo.beta >= 0")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    """The inverse of `to_dict` (a run's WORKDIR/config.json); raises ConfigError naming a bad field."""
    return _build(TrainConfig, d)
