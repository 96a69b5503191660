"""Configs of the published checkpoints, and a tiny one for tests.

Values are those of each checkpoint's `config.json`; `tests/test_config.py` checks the parameter counts.
"""

import dataclasses

from idefics_jax.model.config import (ModelConfig, PerceiverConfig, PixelShuffleConfig, RopeConfig, TextConfig,
                                      VisionConfig)

_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16)
_SIGLIP_B16_512 = VisionConfig(
    hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=512, patch_size=16
)

# HuggingFaceM4/idefics2-8b and idefics2-8b-base share this config: Mistral-7B-v0.1 (plus 3 added tokens) and
# SigLIP so400m at 980 px. The perceiver's config sets no width, so it keeps its own eps (1e-6), not the text's.
IDEFICS2_8B = ModelConfig(
    model_type="idefics2",
    vision=VisionConfig(**_SIGLIP_SO400M, image_size=980, patch_size=14, patch_valid_if_all_pixels=True),
    text=TextConfig(
        vocab_size=32003, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=32768,
        rope=RopeConfig(theta=10000.0), sliding_window=4096,
    ),
    connector=PerceiverConfig(num_latents=64, depth=3, num_heads=16, head_dim=96, num_kv_heads=4, rms_norm_eps=1e-6),
    image_token_id=32001,
)

IDEFICS3_8B_LLAMA3 = ModelConfig(
    model_type="idefics3",
    vision=VisionConfig(**_SIGLIP_SO400M, image_size=364, patch_size=14),
    text=TextConfig(
        vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    connector=PixelShuffleConfig(scale_factor=2),
    image_token_id=128257,
)

SMOLVLM_256M = ModelConfig(
    model_type="idefics3",
    vision=_SIGLIP_B16_512,
    text=TextConfig(
        vocab_size=49280, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope=RopeConfig(theta=100000.0),
    ),
    connector=PixelShuffleConfig(scale_factor=4),
    image_token_id=49190,
)

SMOLVLM_500M = ModelConfig(
    model_type="idefics3",
    vision=_SIGLIP_B16_512,
    text=TextConfig(
        vocab_size=49280, hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15,
        num_kv_heads=5, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope=RopeConfig(theta=100000.0),
    ),
    connector=PixelShuffleConfig(scale_factor=4),
    image_token_id=49190,
)

# HuggingFaceTB/SmolVLM-Instruct.
SMOLVLM_2_2B = ModelConfig(
    model_type="idefics3",
    vision=VisionConfig(**_SIGLIP_SO400M, image_size=384, patch_size=14),
    text=TextConfig(
        vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32,
        num_kv_heads=32, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=16384,
        rope=RopeConfig(theta=273768.0),
    ),
    connector=PixelShuffleConfig(scale_factor=3),
    image_token_id=49153,
)

# SmolVLM2 (HuggingFaceTB/SmolVLM2-256M-Video-Instruct, -500M-Video-Instruct, -2.2B-Instruct): model_type
# "smolvlm", trained on video frames too. The 256M / 500M architectures are SmolVLM's; 2.2B has SmolVLM-Instruct's
# shapes with the 49280-token vocabulary. Values as in their config.json (test_config checks the counts against
# transformers' SmolVLM on the same dicts).
SMOLVLM2_256M = SMOLVLM_256M.replace(model_type="smolvlm")
SMOLVLM2_500M = SMOLVLM_500M.replace(model_type="smolvlm")
SMOLVLM2_2_2B = SMOLVLM_2_2B.replace(
    model_type="smolvlm",
    text=dataclasses.replace(SMOLVLM_2_2B.text, vocab_size=49280, max_position_embeddings=8192,
                             rope=RopeConfig(theta=130000.0)),
    image_token_id=49190,
)

# Small enough for CPU tests; head counts keep GQA (6 heads over 2 kv heads) and llama3 RoPE.
TINY = ModelConfig(
    model_type="idefics3",
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=4),
    text=TextConfig(
        vocab_size=160, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
        head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=512,
        rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64),
    ),
    connector=PixelShuffleConfig(scale_factor=2),
    image_token_id=5,  # `<image>` in tests.reference.char_tokenizer
)

# Idefics2 counterpart of TINY: Mistral with a sliding window longer than any test prompt, and a perceiver whose
# heads x head_dim (40) differ from the width (48) and whose eps differs from the text's.
TINY_IDEFICS2 = ModelConfig(
    model_type="idefics2",
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=4,
                        patch_valid_if_all_pixels=True),
    text=TextConfig(
        vocab_size=160, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
        head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=512, rope=RopeConfig(theta=10000.0),
        sliding_window=4096,
    ),
    connector=PerceiverConfig(num_latents=6, depth=2, num_heads=4, head_dim=10, num_kv_heads=2, rms_norm_eps=1e-6),
    image_token_id=5,  # `<image>` in tests.reference.char_tokenizer
)
