"""Prompt preparation, the one path into the decode core for `generate` and the serving engine: input checks,
left padding to a bucketed length, image counts padded to a bucket, and the eos / pad defaults."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from idefics_jax.model.idefics import IdeficsModel, check_inputs


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest of minimum * 2^k * {1, 5/4, 6/4, 7/4} that is >= n: at most 25% padding, few shapes."""
    b = minimum
    while True:
        for quarters in (4, 5, 6, 7):
            if b * quarters // 4 >= n:
                return b * quarters // 4
        b *= 2


@dataclasses.dataclass(frozen=True)
class Tokens:
    """The ids that end and pad answers: `eos` (E,) (none: only max tokens ends one) and `pad` (what finished rows
    produce)."""

    eos: tuple[int, ...]
    pad: int

    @classmethod
    def of(cls, model: IdeficsModel, eos_token_id: int | Sequence[int] | None = None,
           pad_token_id: int | None = None) -> "Tokens":
        """The checkpoint's generation defaults unless given; pad falls back to the first eos (transformers'
        order), else 0."""
        if eos_token_id is None:
            eos = tuple(model.generation_defaults.eos_token_ids)
        elif isinstance(eos_token_id, (int, np.integer)):
            eos = (int(eos_token_id),)
        else:
            eos = tuple(int(e) for e in eos_token_id)
        if pad_token_id is None:
            pad_token_id = model.generation_defaults.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        return cls(eos, int(pad_token_id))


@dataclasses.dataclass
class Prompt:
    """Checked model inputs, left-padded: ids and mask (B, Tb) int32 with Tb = bucket(T); images (B, bucket(I, 1),
    3, P, P) with all-zero padding images (the model skips them), or None."""

    ids: np.ndarray
    mask: np.ndarray
    pixel_values: np.ndarray | None
    pixel_mask: np.ndarray | None

    @property
    def columns(self) -> int:
        """Cache columns the prompt takes (its bucketed length)."""
        return self.ids.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        """Real prompt tokens per row (B,)."""
        return self.mask.sum(axis=1)

    def rows(self, index) -> "Prompt":
        """A sub-batch of these rows."""
        take = lambda a: None if a is None else a[index]  # noqa: E731
        return Prompt(self.ids[index], self.mask[index], take(self.pixel_values), take(self.pixel_mask))

    @staticmethod
    def concat(prompts: list["Prompt"]) -> "Prompt":
        """Prompts of one bucket and image shape as one batch."""
        cat = lambda xs: None if xs[0] is None else np.concatenate(xs)  # noqa: E731
        return Prompt(cat([p.ids for p in prompts]), cat([p.mask for p in prompts]),
                      cat([p.pixel_values for p in prompts]), cat([p.pixel_mask for p in prompts]))


def prepare(model: IdeficsModel, input_ids, attention_mask=None, pixel_values=None,
            pixel_attention_mask=None) -> Prompt:
    """The processor's numpy outputs (left-padded batches) checked and padded for the decode core. Raises
    ValueError naming the problem. Left padding up to the bucket changes nothing: padded keys are masked and
    positions come from the mask."""
    ids = np.asarray(input_ids)
    check_inputs(model.config, ids, attention_mask, pixel_values, pixel_attention_mask)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if not mask.any(axis=1).all():
        raise ValueError("every row needs at least one token (attention_mask has an all-zero row)")
    if mask[:, -1].min() == 0:
        raise ValueError("batches must be padded on the left (a row's last token is padding)")
    # Positions come from the mask, so left padding does not count; beyond the trained positions RoPE
    # extrapolates and the answer is garbage, so say so instead.
    longest = int(mask.sum(axis=1).max())
    limit = model.config.text.max_position_embeddings
    if longest > limit:
        raise ValueError(f"the prompt has {longest} tokens but the model has {limit} positions "
                         "(max_position_embeddings); shorten it or use fewer / smaller images")
    B, T = ids.shape
    Tb = bucket(T)
    fill = 0 if model.config.image_token_id != 0 else 1  # never an image token
    ids_b = np.concatenate([np.full((B, Tb - T), fill, np.int32), ids.astype(np.int32)], axis=1)
    mask_b = np.concatenate([np.zeros((B, Tb - T), np.int32), mask], axis=1)
    pv, pm = _pad_images(pixel_values, pixel_attention_mask)
    return Prompt(ids_b, mask_b, pv, pm)


def _pad_images(pixel_values, pixel_mask):
    """Pads the image axis to bucket(I, 1) with all-zero images: fewer prefill shapes."""
    if pixel_values is None:
        return None, None
    pixel_values = np.asarray(pixel_values)
    pixel_mask = None if pixel_mask is None else np.asarray(pixel_mask)
    extra = bucket(pixel_values.shape[1], 1) - pixel_values.shape[1]
    if extra == 0:
        return pixel_values, pixel_mask
    pad = lambda a: np.concatenate([a, np.zeros((a.shape[0], extra, *a.shape[2:]), a.dtype)], axis=1)  # noqa: E731
    return pad(pixel_values), None if pixel_mask is None else pad(pixel_mask)
