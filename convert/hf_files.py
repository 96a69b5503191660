"""The files beside an HF model's weights, built offline: tokenizer, processor, chat template, config.json and
generation config.

The random test checkpoints (`tests.reference`) and the tiny-shapes model (`idefics_jax.shapes.model`) are
both built from these: word-level tokenizers over the Idefics3 special tokens, and the PIL-backed HF processors.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from idefics_jax.model.config import ModelConfig
from idefics_jax.checkpoints.hf_config import to_hf_dict

# SmolVLM's template reduced to what the models here need: "User:<image>text<end_of_utterance>\nAssistant: ...".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# The Idefics3 processor's tokens, first in every vocabulary built here (so their ids are the same everywhere).
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
           "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IMAGE_TOKEN_ID = SPECIAL.index("<image>")


def _tokenizer(tokens: Iterable[str], pre_tokenizer, decoder, normalizer=None):
    """A fast tokenizer with one id per entry of SPECIAL + `tokens`; padding on the left, for generation."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<|im_start|>",
        eos_token="<end_of_utterance>", additional_special_tokens=SPECIAL[4:], padding_side="left",
    )


def char_tokenizer():
    """One token per printable ASCII character (and newline): any English prompt tokenizes (tests, demos)."""
    from tokenizers import Regex, decoders, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    return _tokenizer(chars, pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), decoders.Fuse())


def word_tokenizer(words: Iterable[str]):
    """One token per word of `words`, lowercased; punctuation splits off. Decoding joins words with spaces and
    tidies the space before punctuation."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return _tokenizer(words, pre, decoders.WordPiece(prefix="##"), normalizers.Lowercase())


def idefics3_processor(tokenizer, image_seq_len: int, *, tile: int, longest_edge: int,
                       do_image_splitting: bool = True):
    """The Idefics3 processor (PIL backend): images resized to `longest_edge`, split into `tile`-pixel tiles."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                   do_image_splitting=do_image_splitting)
    return Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def idefics2_processor(tokenizer, image_seq_len: int, *, image_size: int, do_image_splitting: bool = True):
    """The Idefics2 processor (PIL backend): images shrunk to at most `image_size` and grown to at least 378/980 of
    it, as Idefics2-8b does; with splitting, 4 crops + the original per image."""
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    ip = Idefics2ImageProcessorPil(size={"shortest_edge": round(image_size * 378 / 980), "longest_edge": image_size},
                                   do_image_splitting=do_image_splitting)
    return Idefics2Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def write_config(path: str, d: dict) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def write_model_files(path: str, config: ModelConfig, processor) -> str:
    """config.json, tokenizer, processor, chat template and generation config (bos / eos / pad of the tokenizer):
    an HF model directory without weights, which training initialises at random."""
    processor.save_pretrained(path)
    write_config(path, to_hf_dict(config))
    tok = processor.tokenizer
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}, f, indent=2)
    return path
