"""Idefics2, Idefics3 and SmolVLM in JAX / Flax NNX.

The public names, gathered from the layers (see docs/layout.md): the model core, conversion, and
generation. Modules inside the package import from the module that defines a name, never from here.
"""

from importlib.metadata import PackageNotFoundError, version

from idefics_jax.checkpoints.checkpoint import CheckpointError, param_count
from idefics_jax.checkpoints.registry import PRESETS, resolve
from idefics_jax.model.config import (ConfigError, GenerationDefaults, ModelConfig, PerceiverConfig, PixelShuffleConfig,
                                RopeConfig, TextConfig, VisionConfig)
from idefics_jax.checkpoints.hf_config import from_hf_dict, from_hf_file, read_generation_defaults, to_hf_dict
from idefics_jax.model.idefics import IdeficsModel, KVCache
from idefics_jax.model import sharding
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.generation.api import generate, generate_stream
from idefics_jax.generation.chat import Chat

try:
    __version__ = version("idefics-jax")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Chat", "CheckpointError", "ConfigError", "GenerationDefaults", "IdeficsModel", "KVCache", "ModelConfig", "PRESETS",
    "PerceiverConfig", "PixelShuffleConfig", "RopeConfig", "TextConfig", "VisionConfig", "from_hf_dict",
    "from_hf_file", "generate", "generate_stream", "load_pretrained", "param_count", "read_generation_defaults",
    "resolve", "sharding", "to_hf_dict",
]
