"""The `tiny-shapes` model's architecture, tokenizer and processor, written as an HF directory without weights.

`idefics-jax train configs/tiny-shapes.yaml` starts from this directory (random init from its config.json).
"""

from __future__ import annotations

import json
import os

from idefics_jax.model.config import ModelConfig, PixelShuffleConfig, RopeConfig, TextConfig, VisionConfig
from idefics_jax.convert import hf_files
from idefics_jax.convert.hf_files import SPECIAL
from idefics_jax.shapes.task import COLORS, SHAPES

WORDS = (["user", "assistant", ":", "?", ".", ",", "!", "how", "many", "shapes", "are", "there", "what", "color",
          "is", "the", "shape", "object", "a", "an", "of", "in", "this", "image"]
         + list(SHAPES) + list(COLORS) + [str(d) for d in range(10)])
IMAGE_SIZE = 96  # images are resized to one 96 x 96 tile (no splitting): 14 px shapes stay >= 8 px, one patch

CONFIG = ModelConfig(
    model_type="idefics3",
    vision=VisionConfig(hidden_size=96, intermediate_size=384, num_layers=4, num_heads=4, image_size=IMAGE_SIZE,
                        patch_size=8),
    text=TextConfig(vocab_size=96, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=1024, rope=RopeConfig(theta=10000.0)),
    connector=PixelShuffleConfig(scale_factor=2),
    image_token_id=SPECIAL.index("<image>"),
)


def tokenizer():
    """Word-level, lowercased: one token per word of the task, so each answer is one token then the end token."""
    tok = hf_files.word_tokenizer(WORDS)
    assert len(tok) <= CONFIG.text.vocab_size
    return tok


def processor():
    return hf_files.idefics3_processor(tokenizer(), CONFIG.image_seq_len, tile=IMAGE_SIZE, longest_edge=IMAGE_SIZE,
                                       do_image_splitting=False)


def write_base(path: str) -> str:
    """config.json, tokenizer, processor, chat template and generation config; no weights."""
    return hf_files.write_model_files(path, CONFIG, processor())


# Shipped example images: (generator seed, the question the README and tests ask first).
EXAMPLES = ((15, "What shape is the blue object?"), (24, "How many shapes are there?"),
            (22, "What color is the triangle?"))


def write_examples(path: str) -> None:
    """examples/shapes-N.png and examples/questions.json (every allowed question with its answer) under `path`."""
    import numpy as np

    from idefics_jax.shapes import task as shapes

    out = os.path.join(path, "examples")
    os.makedirs(out, exist_ok=True)
    listing = []
    for i, (seed, first) in enumerate(EXAMPLES, 1):
        ex = shapes.sample(np.random.default_rng(seed))
        name = f"shapes-{i}.png"
        ex.image.save(os.path.join(out, name))
        qs = sorted(ex.questions, key=lambda q: q.text != first)
        assert qs[0].text == first, (seed, first)
        listing.append({"image": name, "questions": [{"text": q.text, "answer": q.answer} for q in qs]})
    with open(os.path.join(out, "questions.json"), "w") as f:
        json.dump(listing, f, indent=2)
