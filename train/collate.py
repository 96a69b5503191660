"""Collation: Cauldron records -> fixed-shape numpy batches, with the checkpoint's own chat template and processor.

Loss masking: each assistant turn's characters are found by rendering the conversation turn by turn with the chat
template (the prompt up to turn k with the generation prompt, then with turn k's answer; the difference is what the
model must write, ending in the end-of-turn token), and a token is labelled when its first character lies in such
a span. Offsets come from tokenizing the rendered text; the processor's output equals that tokenization except that
each image placeholder becomes a run of image tokens. Images all sit in the first user turn, before every answer,
so the labelled suffix is carried over to the processor's tokens unchanged (and checked to be identical).

Shapes are static so that a jitted step compiles once per bucket: token length is padded to the smallest of
`length_buckets` that fits, sub-image slots to the smallest of `image_buckets`, sub-images to `image_size` square.
A record that does not fit is skipped (`TooLong`, `TooManyImages`), never truncated.

Labels are aligned with input_ids, not shifted (as transformers expects): position t's logits are scored against
labels[t + 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from idefics_jax.train import records
from idefics_jax.train.records import Record, SkipRecord

IGNORE_INDEX = -100  # label of a token that is not trained on (the convention of transformers; `step` skips it)

Render = Callable[[list, bool], str]


class TooManyImages(SkipRecord):
    reason = "too_many_images"


class TooLong(SkipRecord):
    reason = "too_long"


class BlankImage(SkipRecord):
    """An image that is all zeros after normalisation: the model would take it for a padding image."""

    reason = "blank_image"


class TemplateError(ValueError):
    """A chat template whose renderings are not prefixes of each other: assistant turns cannot be located."""


@dataclasses.dataclass(frozen=True)
class CollateConfig:
    length_buckets: tuple[int, ...] = (512, 1024, 2048)  # the largest is the maximum sequence length
    max_images: int = 1  # per record; records with more are skipped
    image_splitting: bool | None = None  # None: the processor's own setting
    longest_edge: int | None = None  # images resized to this longest edge before splitting; None: the processor's
    image_buckets: tuple[int, ...] = ()  # sub-image slots per sample; (): only the worst case for max_images

    def __post_init__(self):
        for name in ("length_buckets", "image_buckets"):
            b = getattr(self, name)
            if list(b) != sorted(set(b)) or any(x < 1 for x in b):
                raise ValueError(f"{name} must be increasing positive integers, got {b}")
        if not self.length_buckets:
            raise ValueError("length_buckets is empty")
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")

    @property
    def max_length(self) -> int:
        return self.length_buckets[-1]


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded record, unpadded."""

    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX outside the assistant turns
    pixel_values: np.ndarray  # (N, C, h, w) float32, one row per sub-image; N = 0 for a text-only record
    pixel_attention_mask: np.ndarray  # (N, h, w) bool


def to_messages(record: Record) -> list[dict]:
    """Chat messages for `record`: its images in the first user turn, before the text (as the HF recipes do)."""
    msgs = []
    for i, t in enumerate(record.texts):
        images = [{"type": "image"}] * (len(record.images) if i == 0 else 0)
        msgs.append({"role": "user", "content": images + [{"type": "text", "text": t.user}]})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": t.assistant}]})
    return msgs


def assistant_spans(render: Render, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each assistant turn's character span in it.

    A span runs from the end of the generation prompt to the end of the turn as the template writes it, trailing
    whitespace excluded: the answer and the end-of-turn token (`<end_of_utterance>`, `<|eot_id|>`, ...).
    """
    full = render(messages, False)
    spans = []
    for k in range(1, len(messages), 2):
        prompt = render(messages[:k], True)
        turn = render(messages[: k + 1], False)
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise TemplateError(
                "chat template renders turns inconsistently: the prompt with the generation prompt is not a prefix "
                f"of the conversation with the answer (turn {k // 2}); assistant tokens cannot be located"
            )
        end = len(turn.rstrip())
        if end <= len(prompt):
            raise TemplateError(f"chat template writes nothing for assistant turn {k // 2}")
        spans.append((len(prompt), end))
    return full, spans


def _label_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    ends = np.array([e for _, e in offsets], dtype=np.int64)
    inside = np.zeros(len(offsets), bool)
    for a, b in spans:
        inside |= (starts >= a) & (starts < b)
    return inside & (ends > starts)  # tokens the tokenizer added itself (BOS) have empty offsets


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Collator:
    """Encodes records with `processor` (an Idefics3 / SmolVLM / Idefics2 processor) and pads them into batches.

    image_size: the vision encoder's input side (the model config's `vision.image_size`); every sub-image is
    padded to it, so pixel_values are (batch, slots, 3, image_size, image_size).
    """

    def __init__(self, processor, config: CollateConfig, image_size: int):
        self.processor = processor
        self.config = config
        self.image_size = image_size
        tok = processor.tokenizer
        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_id = int(tok.pad_token_id)
        self.image_token = processor.image_token
        self.image_token_id = int(tok.convert_tokens_to_ids(self.image_token))
        self.image_seq_len = int(processor.image_seq_len)
        # Texts holding these would make image tokens without images, or end a turn early.
        special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        self._reserved = tuple(sorted(special | set(tok.all_special_tokens) | {self.image_token}))
        self._image_kwargs = self._image_kwargs_for(processor.image_processor, config)
        self.channels, slots_per_image = self._probe()
        worst = max(1, config.max_images * slots_per_image)
        self.image_buckets = config.image_buckets or (worst,)
        # Fails now, not on the first record, if the template cannot be used for loss masking. Encoding once also
        # settles the tokenizer's padding / truncation state here: changing it later, while reader threads
        # encode, would race ("Already borrowed").
        probe = Record(images=(), texts=(records.Turn("a", "b"), records.Turn("c", "d")))
        try:
            self.encode(probe)
        except TooLong:
            pass

    @classmethod
    def from_pretrained(cls, path: str, config: CollateConfig) -> "Collator":
        """The processor and vision input size of a checkpoint directory (HF or `idefics-jax convert` output; local
        or in a bucket)."""
        from transformers import AutoProcessor

        from idefics_jax.checkpoints.hf_config import from_hf_file
        from idefics_jax.checkpoints.paths import local_side_files

        return cls(AutoProcessor.from_pretrained(local_side_files(path)), config, from_hf_file(path).vision.image_size)

    @staticmethod
    def _image_kwargs_for(image_processor, config: CollateConfig) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if config.image_splitting is not None:
            kw["do_image_splitting"] = config.image_splitting
        if config.longest_edge is not None:
            size = image_processor.size
            size = dict(size) if isinstance(size, Mapping) else {k: v for k, v in vars(size).items() if v is not None}
            # Idefics2 also needs its shortest edge: only the longest one changes.
            kw["size"] = {**size, "longest_edge": config.longest_edge}
        return kw

    def _probe(self) -> tuple[int, int]:
        """(channels, sub-images per image at most). Idefics3 resizes every image to the longest edge before
        splitting, so a square image has the most tiles; Idefics2 always makes the same number."""
        from PIL import Image

        side = max(self.image_size, self.config.longest_edge or 0)
        img = Image.new("RGB", (side, side), (127, 127, 127))
        pv = np.asarray(self.processor.image_processor(images=[[img]], return_tensors="np",
                                                       **self._image_kwargs)["pixel_values"])
        return int(pv.shape[2]), int(pv.shape[1])

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def image_kwargs(self) -> dict[str, Any]:
        """The image processor's arguments the collator passes (splitting, size): for generating on the same images."""
        return dict(self._image_kwargs)

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """Every (tokens, image slots) a batch can have: the shapes a jitted step compiles for."""
        return [(t, n) for t in self.config.length_buckets for n in self.image_buckets]

    def encode(self, record: Record) -> Example:
        """One record -> Example. Raises a SkipRecord subclass for a record that cannot be used."""
        c = self.config
        if len(record.images) > c.max_images:
            raise TooManyImages(f"{len(record.images)} images (max_images={c.max_images})")
        for t in record.texts:
            for text in (t.user, t.assistant):
                bad = next((s for s in self._reserved if s in text), None)
                if bad is not None:
                    raise records.MalformedRecord(f"text contains the special token {bad!r}")
        images = records.decode_images(record)
        full, spans = assistant_spans(self._render, to_messages(record))
        tok = self.processor.tokenizer(full, return_offsets_mapping=True)
        text_ids = np.asarray(tok["input_ids"], np.int64)
        # Each image adds at least image_seq_len - 1 tokens: a cheap early exit before any image work.
        if len(text_ids) + len(images) * (self.image_seq_len - 1) > c.max_length:
            raise TooLong(f"at least {len(text_ids) + len(images) * (self.image_seq_len - 1)} tokens "
                          f"(max {c.max_length})")
        text_labels = np.where(_label_mask(tok["offset_mapping"], spans), text_ids, IGNORE_INDEX)
        out = self.processor(text=[full], images=[images] if images else None, return_tensors="np",
                             **self._image_kwargs)
        ids = np.asarray(out["input_ids"][0], np.int64)
        if len(ids) > c.max_length:
            raise TooLong(f"{len(ids)} tokens (max {c.max_length})")
        labels = self._carry_labels(ids, text_ids, text_labels)
        if images:
            pv = np.asarray(out["pixel_values"][0], np.float32)
            mask = out.get("pixel_attention_mask")
            mask = np.ones(pv.shape[:1] + pv.shape[2:], bool) if mask is None else np.asarray(mask[0], bool)
        else:
            pv = np.zeros((0, self.channels, self.image_size, self.image_size), np.float32)
            mask = np.zeros((0, self.image_size, self.image_size), bool)
        if len(pv) and not pv.reshape(len(pv), -1).any(axis=1).all():
            raise BlankImage("a sub-image is all zeros after normalisation (the mark of a padding image)")
        if pv.shape[0] > self.image_buckets[-1]:
            raise TooManyImages(f"{pv.shape[0]} sub-images (largest image bucket {self.image_buckets[-1]})")
        if max(pv.shape[2:], default=0) > self.image_size:
            raise ValueError(f"the processor made {pv.shape[2:]} sub-images, larger than image_size "
                             f"{self.image_size}: processor and model config disagree")
        n_tokens = int((ids == self.image_token_id).sum())
        if n_tokens != pv.shape[0] * self.image_seq_len:
            raise ValueError(f"{n_tokens} image tokens for {pv.shape[0]} sub-images x {self.image_seq_len}")
        return Example(ids.astype(np.int32), labels.astype(np.int32), pv, mask)

    def _carry_labels(self, ids: np.ndarray, text_ids: np.ndarray, text_labels: np.ndarray) -> np.ndarray:
        """Labels of the text tokenization -> labels of the processor's tokens (see the module docstring)."""
        where = np.flatnonzero(text_ids == self.image_token_id)
        k = len(text_ids) - (int(where[-1]) + 1 if len(where) else 0)  # tokens after the last image placeholder
        if (text_labels[: len(text_ids) - k] != IGNORE_INDEX).any():
            raise TemplateError("an assistant turn comes before an image placeholder")
        if k > len(ids) or not np.array_equal(ids[len(ids) - k:], text_ids[len(text_ids) - k:]):
            raise TemplateError("the processor's tokens differ from the tokenizer's outside the image placeholders")
        labels = np.full(len(ids), IGNORE_INDEX, np.int64)
        labels[len(ids) - k:] = text_labels[len(text_ids) - k:]
        return labels

    def collate(self, examples: Sequence[Example], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Pads examples (on the right) into one batch; `batch_size` adds empty rows (attention 0, labels
        IGNORE_INDEX).

        Returns input_ids, attention_mask, labels (B, T) int32; pixel_values (B, N, C, S, S) float32 with all-zero
        padding images; pixel_attention_mask (B, N, S, S) bool.
        """
        return self._pad(examples, batch_size, _bucket(max((len(e.pixel_values) for e in examples), default=0),
                                                       self.image_buckets))

    def _pad(self, examples: Sequence[Example], batch_size: int | None, N: int) -> dict[str, np.ndarray]:
        B = batch_size or len(examples)
        if not examples or B < len(examples):
            raise ValueError(f"cannot collate {len(examples)} examples into a batch of {B}")
        T = _bucket(max(len(e.input_ids) for e in examples), self.config.length_buckets)
        S = self.image_size
        input_ids = np.full((B, T), self.pad_id, np.int32)
        attention_mask = np.zeros((B, T), np.int32)
        labels = np.full((B, T), IGNORE_INDEX, np.int32)
        pixel_values = np.zeros((B, N, self.channels, S, S), np.float32)
        pixel_mask = np.zeros((B, N, S, S), bool)
        for b, e in enumerate(examples):
            n, (h, w) = len(e.input_ids), e.pixel_values.shape[2:]
            input_ids[b, :n] = e.input_ids
            attention_mask[b, :n] = 1
            labels[b, :n] = e.labels
            i = len(e.pixel_values)
            pixel_values[b, :i, :, :h, :w] = e.pixel_values
            pixel_mask[b, :i, :h, :w] = e.pixel_attention_mask
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "pixel_attention_mask": pixel_mask, "labels": labels}

    @property
    def packed_image_buckets(self) -> tuple[int, ...]:
        """Sub-image slots of a packed row: powers of two up to the most image tokens a row can hold."""
        top = max(1, self.config.max_length // self.image_seq_len)
        return tuple(sorted({b for b in (2**i for i in range(top.bit_length())) if b < top} | {top}))

    def fits(self, row: Sequence[Example], e: Example) -> bool:
        """Whether `e` still fits into a packed row holding `row`."""
        return sum(len(x.input_ids) for x in row) + len(e.input_ids) <= self.config.max_length

    def collate_packed(self, rows: Sequence[Sequence[Example]], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Packs each row's examples one after another (on the right: padding), as `collate` pads one example.

        Adds segment_ids (B, T) int32: k for the tokens of the row's k-th example, 0 for padding; the model keeps
        attention within a segment and restarts positions at each. Each row's images follow its examples'
        order, as their image tokens do. The first token of each example carries no label (it would be scored
        against the previous example's last logits).
        """
        merged = []
        for row in rows:
            ids = np.concatenate([e.input_ids for e in row])
            labels = np.concatenate([np.concatenate([[IGNORE_INDEX], e.labels[1:]]) for e in row]).astype(np.int32)
            merged.append(Example(ids, labels, np.concatenate([e.pixel_values for e in row]),
                                  np.concatenate([e.pixel_attention_mask for e in row])))
        N = _bucket(max(len(e.pixel_values) for e in merged), self.packed_image_buckets)
        out = self._pad(merged, batch_size, N)
        segments = np.zeros_like(out["input_ids"])
        for b, row in enumerate(rows):
            lengths = [len(e.input_ids) for e in row]
            segments[b, : sum(lengths)] = np.repeat(np.arange(1, len(row) + 1), lengths)
        out["segment_ids"] = segments
        return out
