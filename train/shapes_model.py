"""The `tiny-shapes` model's architecture, tokenizer and processor, written as an HF directory without weights.

`idefics-jax train configs/tiny-shapes.yaml` starts from this directory (random init from its config.json).
"""

from __future__ import annotations

import json
import os

from idefics_jax.config import ModelConfig, PixelShuffleConfig, RopeConfig, TextConfig, VisionConfig
from idefics_jax.hf_config import to_hf_dict
from idefics_jax.testing import CHAT_TEMPLATE
from idefics_jax.train.shapes import COLORS, SHAPES

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
           "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
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
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    assert len(vocab) <= CONFIG.text.vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces and tidies the space before punctuation
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<|im_start|>",
        eos_token="<end_of_utterance>", additional_special_tokens=SPECIAL[4:], padding_side="left",
    )


def processor():
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                                   do_image_splitting=False)
    return Idefics3Processor(image_processor=ip, tokenizer=tokenizer(), image_seq_len=CONFIG.image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def write_base(path: str) -> str:
    """config.json, tokenizer, processor, chat template and generation config; no weights."""
    os.makedirs(path, exist_ok=True)
    processor().save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_dict(CONFIG), f, indent=2)
    tok = tokenizer()
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}, f, indent=2)
    return path


# Shipped example images: (generator seed, the question the README and tests ask first).
EXAMPLES = ((15, "What shape is the blue object?"), (24, "How many shapes are there?"),
            (22, "What color is the triangle?"))


def write_examples(path: str) -> None:
    """examples/shapes-N.png and examples/questions.json (every allowed question with its answer) under `path`."""
    import numpy as np

    from idefics_jax.train import shapes

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
