"""Random HF checkpoints built offline: a character tokenizer, the PIL image processor (`convert.hf_files`), random
weights.

Used by the tests, the demo and the benchmarks; nothing here touches a model hub. Needs torch.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from idefics_jax.model.config import ModelConfig, PerceiverConfig
from idefics_jax.convert import hf_files
from idefics_jax.convert.hf_files import IMAGE_TOKEN_ID, char_tokenizer
from idefics_jax.checkpoints.hf_config import to_hf_dict
from idefics_jax.model.presets import TINY, TINY_IDEFICS2


def processor(config: ModelConfig, tokenizer=None, tiles_per_side: int = 2, do_image_splitting: bool = True):
    """The Idefics3 processor for `config`: tiles of the vision image size, images resized so the longest edge is
    `tiles_per_side` tiles."""
    side = config.vision.image_size
    return hf_files.idefics3_processor(tokenizer or char_tokenizer(), config.image_seq_len, tile=side,
                                       longest_edge=side * tiles_per_side, do_image_splitting=do_image_splitting)


def idefics2_processor(config: ModelConfig, tokenizer=None, do_image_splitting: bool = True):
    """The Idefics2 processor for `config` (see `hf_files.idefics2_processor`)."""
    return hf_files.idefics2_processor(tokenizer or char_tokenizer(), config.image_seq_len,
                                       image_size=config.vision.image_size, do_image_splitting=do_image_splitting)


def make_processor(config: ModelConfig, tiles_per_side: int = 2):
    """The processor for `config`'s model family (`tiles_per_side` applies to Idefics3 only)."""
    if isinstance(config.connector, PerceiverConfig):
        return idefics2_processor(config)
    return processor(config, tiles_per_side=tiles_per_side)


def tiny_idefics2_config(**overrides) -> ModelConfig:
    """TINY_IDEFICS2 (vocab and image token already match `char_tokenizer`)."""
    return dataclasses.replace(TINY_IDEFICS2, **overrides)


def tiny_config(**overrides) -> ModelConfig:
    """TINY with vocab and image token matching `char_tokenizer`."""
    c = TINY.replace(image_token_id=IMAGE_TOKEN_ID)
    return dataclasses.replace(c, **overrides)


def hf_model(config: ModelConfig, seed: int = 0, weight_scale: float = 1.0):
    """A transformers model with random weights for `config` (norms and biases randomised too).

    `weight_scale` multiplies the weight matrices: at the default init (std 0.02) a random model's greedy output
    hardly depends on the prompt; around 8 it does, which generation tests need."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = to_hf_dict(config)
    mt = d.pop("model_type")
    d.pop("architectures")
    hf_config = AutoConfig.for_model(mt, **d)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-trivial norms, biases and perceiver latents (all ones at init), so a swapped or dropped one
            # shows in the logits.
            if name.endswith("bias") or "norm" in name or name.endswith("latents"):
                p.add_(0.1 * torch.randn_like(p))
            elif weight_scale != 1.0:
                p.mul_(weight_scale)
    return model


def save_hf_checkpoint(path: str, config: ModelConfig | None = None, *, seed: int = 0, max_shard_size=None,
                       drop_lm_head: bool = False, tiles_per_side: int = 2, weight_scale: float = 1.0) -> str:
    """Writes a random HF checkpoint (weights, config, tokenizer, processor, generation config) to `path`."""
    config = config or tiny_config()
    model = hf_model(config, seed, weight_scale)
    # Like the published checkpoints: generation stops at the chat template's `<end_of_utterance>`.
    tok = char_tokenizer()
    model.generation_config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    make_processor(config, tiles_per_side=tiles_per_side).save_pretrained(path)
    if drop_lm_head:
        _drop_tensor(path, "lm_head.weight")
    return path


def _drop_tensor(path: str, key: str) -> None:
    """Removes one tensor from a single-file checkpoint (a checkpoint saved with a tied head looks like this)."""
    from safetensors.numpy import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors[key]
    save_file(tensors, f, metadata={"format": "pt"})


def random_image(rng: np.random.Generator, height: int, width: int):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_hub_cache(cache_dir: str, repo_id: str, snapshots: dict[str, str], refs: dict[str, str],
                    repo_type: str = "model") -> str:
    """Lays out model directories as `huggingface_hub` caches a download, so loading by hub id can be tested offline:
    `cache_dir/models--org--name/` (`datasets--org--name/` for repo_type "dataset") with `blobs/` (files named by
    their hash: sha256 for weights and parquet shards, which the hub stores in LFS, the git blob sha1 for the rest),
    `snapshots/<commit>/` (relative symlinks into blobs/) and `refs/<branch or tag>` (a commit). `snapshots` maps a
    40-hex commit to a directory; returns the repo folder."""
    import hashlib

    repo = os.path.join(cache_dir, f"{repo_type}s--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for commit, src in snapshots.items():
        for root, _, files in os.walk(src):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), src)
                data = open(os.path.join(root, name), "rb").read()
                lfs = name.endswith((".safetensors", ".parquet"))
                digest = (hashlib.sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)).hexdigest()
                blob = os.path.join(repo, "blobs", digest)
                if not os.path.exists(blob):
                    with open(blob, "wb") as f:
                        f.write(data)
                link = os.path.join(repo, "snapshots", commit, rel)
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref, commit in refs.items():
        os.makedirs(os.path.dirname(os.path.join(repo, "refs", ref)), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)  # no newline, as huggingface_hub writes it
    return repo
