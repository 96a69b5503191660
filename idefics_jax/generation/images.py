"""Images from users and datasets -> 8-bit RGB PIL images, or a one-line error that names the file."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import PIL.Image

# PIL refuses more than twice its default pixel budget outright; 10000 x 10000 photos (100 M) are accepted.
MAX_PIXELS = 2 * 89_478_485


def load_image(image: Any) -> "PIL.Image.Image":
    """A PIL image, a path or a URL (or base64 data) -> an 8-bit RGB PIL image, or a one-line error naming it.

    Grayscale, palette, CMYK, 16-bit and float images are converted; transparent ones are put on white (what an
    image viewer shows, and what transformers' `convert_to_rgb` does); EXIF rotation is applied.
    """
    import PIL.Image

    name = str(image) if isinstance(image, (str, os.PathLike)) else None
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image, "image")
    if name is None:
        raise ValueError(f"images must be PIL images, paths or URLs; got {type(image).__name__}")
    if "://" in name or name.startswith("data:") or len(name) >= 1024:
        from transformers.image_utils import load_image as fetch  # URLs and base64 strings

        try:
            return to_rgb(fetch(name), name[:80])
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
    return to_rgb(img, name)


def to_rgb(img, name: str = "image"):
    """Any PIL image -> 8-bit RGB (see `load_image`); `name` goes into the error for an empty image."""
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
