"""Chat: a model with its checkpoint's own processor and chat template; messages and images in, answer text out.

    chat = Chat.load("smolvlm-256m-orbax")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    print(chat(messages, images=["statue.jpg"], max_new_tokens=200))
    for piece in chat.stream(messages, images=["statue.jpg"]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from idefics_jax._checkpoint import load_pretrained
from idefics_jax._generate import generate_stream
from idefics_jax._images import load_image
from idefics_jax._model import IdeficsModel

# Content keys transformers' chat templates accept for an image given inline.
_IMAGE_KEYS = ("image", "url", "path")

class Chat:
    """`model` plus `processor` (the checkpoint's, with its chat template). Images are PIL images, paths or URLs,
    one per `{"type": "image"}` entry of `messages`, in order; they may also sit in those entries under "image",
    "url" or "path". `do_image_splitting` / `longest_edge` override the processor's image resizing."""

    def __init__(self, model: IdeficsModel, processor, *, do_image_splitting: bool | None = None,
                 longest_edge: int | None = None):
        self.model, self.processor = model, processor
        self.image_kwargs: dict[str, Any] = {}
        if do_image_splitting is not None:
            self.image_kwargs["do_image_splitting"] = do_image_splitting
        if longest_edge is not None:
            self.image_kwargs["size"] = {"longest_edge": int(longest_edge)}

    @classmethod
    def load(cls, path: str, *, dtype=None, do_image_splitting: bool | None = None,
             longest_edge: int | None = None) -> "Chat":
        """The model and processor of a checkpoint directory (an `idefics-jax convert` output or an HF one)."""
        from transformers import AutoProcessor

        model = load_pretrained(path, dtype=dtype)
        return cls(model, AutoProcessor.from_pretrained(path), do_image_splitting=do_image_splitting,
                   longest_edge=longest_edge)

    def inputs(self, messages: list[dict], images: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
        """The processor's numpy inputs for `messages`, with the generation prompt appended."""
        if images is None:
            images = [next(item[k] for k in _IMAGE_KEYS if k in item)
                      for m in messages if isinstance(m.get("content"), list)
                      for item in m["content"] if item.get("type") == "image" and any(k in item for k in _IMAGE_KEYS)]
        n_slots = sum(1 for m in messages if isinstance(m.get("content"), list)
                      for item in m["content"] if item.get("type") == "image")
        if len(images) != n_slots:
            raise ValueError(f"messages have {n_slots} image entries but {len(images)} images were given")
        images = [load_image(i) for i in images]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        kw = dict(images=images, **self.image_kwargs) if images else {}
        return dict(self.processor(text=prompt, return_tensors="np", **kw))

    def stream(self, messages: list[dict], images: Sequence[Any] | None = None, *, max_new_tokens: int = 256,
               **generate_kwargs) -> Iterator[str]:
        """Yields the answer text piece by piece as tokens are produced (special tokens dropped)."""
        tok = self.processor.tokenizer
        new: list[int] = []
        shown = ""
        for chunk in generate_stream(self.model, **self.inputs(messages, images), max_new_tokens=max_new_tokens,
                                     **generate_kwargs):
            new.extend(int(t) for t in chunk[0])
            text = tok.decode(new, skip_special_tokens=True)
            # A character split over tokens decodes to U+FFFD until its last byte arrives: wait for it. Text
            # already shown is never taken back.
            if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
                shown = text

    def __call__(self, messages: list[dict], images: Sequence[Any] | None = None, *, max_new_tokens: int = 256,
                 **generate_kwargs) -> str:
        """The answer text."""
        new = np.concatenate(list(generate_stream(
            self.model, **self.inputs(messages, images), max_new_tokens=max_new_tokens, chunk_size=max_new_tokens,
            **generate_kwargs)), axis=1)
        return self.processor.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
