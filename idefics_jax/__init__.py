"""Idefics2, Idefics3 and SmolVLM in JAX / Flax NNX."""

from idefics_jax._checkpoint import LoadError, load_pretrained, param_count, resolve
from idefics_jax._config import (ConfigError, ModelConfig, PerceiverConfig, PixelShuffleConfig, RopeConfig,
                                 TextConfig, VisionConfig, from_hf_dict, from_hf_file, to_hf_dict)
from idefics_jax._decoder import KVCache
from idefics_jax._generate import generate, generate_stream
from idefics_jax._model import IdeficsModel
from idefics_jax._presets import PRESETS
from idefics_jax._sampling import GenerationDefaults
from idefics_jax.chat import Chat

__all__ = [
    "Chat", "ConfigError", "GenerationDefaults", "IdeficsModel", "KVCache", "LoadError", "ModelConfig", "PRESETS",
    "PerceiverConfig", "PixelShuffleConfig", "RopeConfig", "TextConfig", "VisionConfig", "from_hf_dict",
    "from_hf_file", "generate", "generate_stream", "load_pretrained", "param_count", "resolve", "to_hf_dict",
]
