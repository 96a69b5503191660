"""Frozen model configs, one dataclass per component (`hf_config` builds them from an HF `config.json`)."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A config this package cannot use (a model's config.json, a training YAML file or override), with the
    reason in one line."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP encoder with NaViT-style patch masks."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    # Idefics2 keeps a patch only when all its pixels are valid; Idefics3 when any is.
    patch_valid_if_all_pixels: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama / Mistral decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = RopeConfig()
    sliding_window: int | None = None


@dataclasses.dataclass(frozen=True)
class PixelShuffleConfig:
    """Idefics3 connector: pixel shuffle by `scale_factor`, then one projection."""

    scale_factor: int


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Idefics2 connector: SwiGLU projection, then a Perceiver resampler."""

    num_latents: int = 64
    depth: int = 3
    num_heads: int = 16
    head_dim: int = 96
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole vision-language model. `model_type` is the HF name it round-trips to."""

    model_type: str
    vision: VisionConfig
    text: TextConfig
    connector: PixelShuffleConfig | PerceiverConfig
    image_token_id: int
    tie_word_embeddings: bool = False

    @property
    def image_seq_len(self) -> int:
        """Tokens each image becomes after the connector."""
        if isinstance(self.connector, PerceiverConfig):
            return self.connector.num_latents
        return self.vision.patches_per_side**2 // self.connector.scale_factor**2

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_depth(self, text: int, vision: int | None = None) -> "ModelConfig":
        """This architecture with `text` decoder layers (and `vision` vision layers; None keeps them)."""
        vision = self.vision.num_layers if vision is None else vision
        return self.replace(text=dataclasses.replace(self.text, num_layers=text),
                            vision=dataclasses.replace(self.vision, num_layers=vision))


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What `generate` falls back to when the caller names no eos / pad token: the checkpoint's own choice."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
