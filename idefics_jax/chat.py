"""Chat: a model with its checkpoint's own processor and chat template; messages and images in, answer text out.

    chat = Chat.load("smolvlm-256m-orbax")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    print(chat(messages, images=["statue.jpg"], max_new_tokens=200))
    for piece in chat.stream(messages, images=["statue.jpg"]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from idefics_jax._checkpoint import load_pretrained
from idefics_jax._generate import generate_stream
from idefics_jax._model import IdeficsModel

# Content keys transformers' chat templates accept for an image given inline.
_IMAGE_KEYS = ("image", "url", "path")

# PIL refuses more than twice its default pixel budget outright; 10000 x 10000 photos (100 M) are accepted.
MAX_PIXELS = 2 * 89_478_485


def load_image(image: Any) -> "PIL.Image.Image":
    """A PIL image, a path or a URL (or base64 data) -> an 8-bit RGB PIL image, or a one-line error naming it.

    Grayscale, palette, CMYK, 16-bit and float images are converted; transparent ones are put on white (what an
    image viewer shows, and what transformers' `convert_to_rgb` does); EXIF rotation is applied.
    """
    import PIL.Image
    import PIL.ImageOps

    name = str(image) if isinstance(image, (str, os.PathLike)) else None
    if isinstance(image, PIL.Image.Image):
        return _to_rgb(image, "image")
    if name is None:
        raise ValueError(f"images must be PIL images, paths or URLs; got {type(image).__name__}")
    if "://" in name or name.startswith("data:") or len(name) >= 1024:
        from transformers.image_utils import load_image as fetch  # URLs and base64 strings

        try:
            return _to_rgb(fetch(name), name[:80])
        except Exception as e:  # requests / base64 / PIL errors: said in one line
            raise ValueError(f"{name[:80]}: could not load the image ({type(e).__name__}: {e})") from e
    if not os.path.exists(name):
        raise FileNotFoundError(f"{name}: no such image file")
    if os.path.isdir(name):
        raise ValueError(f"{name}: is a directory, not an image file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            img = PIL.Image.open(name)
        except PIL.Image.UnidentifiedImageError:
            raise ValueError(f"{name}: not an image file (no image format recognises it)") from None
        except PIL.Image.DecompressionBombError:
            raise ValueError(f"{name}: image too large (over {MAX_PIXELS:,} pixels)") from None
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{name}: image too large ({img.width} x {img.height} pixels; at most "
                             f"{MAX_PIXELS:,})")
        try:
            img.load()
        except (OSError, SyntaxError) as e:  # PIL says "image file is truncated (N bytes not processed)" etc.
            raise ValueError(f"{name}: truncated or corrupt {img.format or 'image'} file ({e})") from None
    return _to_rgb(img, name)


def _to_rgb(img, name: str):
    import PIL.Image
    import PIL.ImageOps

    if img.width < 1 or img.height < 1:
        raise ValueError(f"{name}: empty image ({img.width} x {img.height})")
    img = PIL.ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own convert clips these to 0..255 (a 16-bit photo turns white); scale the 16-bit range instead.
        a = np.asarray(img, np.float64)
        a = a / 257.0 if img.mode != "F" else a * (255.0 if a.max() <= 1.0 else 1.0)
        img = PIL.Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = PIL.Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


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
