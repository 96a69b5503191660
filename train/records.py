"""Training records in The Cauldron's shape: encoded images and user/assistant turns.

A row of HuggingFaceM4/the_cauldron is `{"images": [image, ...], "texts": [{"user", "assistant", "source"}, ...]}`,
where an image is the `datasets` Image struct `{"bytes": ..., "path": ...}` (or plain bytes). Images stay encoded
(PNG, JPEG, ...) until the collator needs pixels: records are small to store, shuffle and send between threads.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import numpy as np

from idefics_jax.generation.images import to_rgb

TURN_FIELDS = ("user", "assistant", "source")


class SkipRecord(ValueError):
    """A record that cannot be trained on: skipped and counted under `reason`, never fatal."""

    reason: ClassVar[str] = "skipped"


class MalformedRecord(SkipRecord):
    """Missing fields or values of the wrong type; the message names the field."""

    reason = "malformed"


class UndecodableImage(SkipRecord):
    reason = "undecodable_image"


@dataclasses.dataclass(frozen=True)
class Turn:
    user: str
    assistant: str
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Record:
    images: tuple[bytes, ...]
    texts: tuple[Turn, ...]


def _image_bytes(value: Any, where: str) -> bytes:
    # `datasets` stores an Image as a struct {"bytes", "path"}; a bare binary column is accepted too.
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise MalformedRecord(f"{where} is empty")
        return bytes(value)
    raise MalformedRecord(f"{where} is {type(value).__name__}, not encoded image bytes")


def _turn(value: Any, where: str) -> Turn:
    if not isinstance(value, Mapping):
        raise MalformedRecord(f"{where} is {type(value).__name__}, not a {{user, assistant, source}} mapping")
    out = {}
    for field in TURN_FIELDS:
        v = value.get(field, "" if field == "source" else None)
        if v is None:
            raise MalformedRecord(f"{where} has no '{field}'")
        if not isinstance(v, str):
            raise MalformedRecord(f"{where}.{field} is {type(v).__name__}, not str")
        out[field] = v
    return Turn(**out)


def _sequence(d: Mapping, key: str) -> Sequence:
    if key not in d or d[key] is None:
        raise MalformedRecord(f"record has no '{key}'")
    v = d[key]
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (Sequence, np.ndarray)):
        raise MalformedRecord(f"'{key}' is {type(v).__name__}, not a list")
    return v


def from_dict(d: Any) -> Record:
    """A Cauldron row (images as bytes or `{"bytes": ...}`) -> Record. Raises MalformedRecord naming the problem."""
    if not isinstance(d, Mapping):
        raise MalformedRecord(f"record is {type(d).__name__}, not a mapping")
    images = tuple(_image_bytes(v, f"images[{i}]") for i, v in enumerate(_sequence(d, "images")))
    texts = tuple(_turn(v, f"texts[{i}]") for i, v in enumerate(_sequence(d, "texts")))
    if not texts:
        raise MalformedRecord("record has no turns (empty 'texts')")
    return Record(images=images, texts=texts)


def to_dict(r: Record) -> dict:
    """The inverse of `from_dict`: the feature dict the TFDS builder writes."""
    return {
        "images": list(r.images),
        "texts": [{f: getattr(t, f) for f in TURN_FIELDS} for t in r.texts],
    }


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def from_example(ex: Mapping) -> Record:
    """What `tfds.data_source` returns for one record (texts as a dict of byte-string lists) -> Record."""
    try:
        texts = ex["texts"]
        columns = [list(texts[f]) for f in TURN_FIELDS]
        turns = tuple(Turn(*(_text(c[i]) for c in columns)) for i in range(len(columns[0])))
        images = tuple(bytes(b) for b in ex["images"])
    except (KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise MalformedRecord(f"stored record is not in the Cauldron shape ({type(e).__name__}: {e})") from None
    if not turns:
        raise MalformedRecord("record has no turns (empty 'texts')")
    return Record(images=images, texts=turns)


def decode_image(data: bytes):
    """Encoded bytes -> a fully decoded RGB PIL image. Raises UndecodableImage (truncated, not an image, ...)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode every pixel now: a truncated file fails here, not inside the processor
            return to_rgb(im)
    except Image.UnidentifiedImageError:
        raise UndecodableImage("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"image does not decode ({type(e).__name__}: {str(e)[:120]})") from None


def decode_images(r: Record) -> list:
    return [decode_image(b) for b in r.images]


T = TypeVar("T")


def read_jsonl(path: str, what: str, make: Callable[[dict, list[str]], T]) -> list[T]:
    """Each non-blank line of the JSONL file `path` as `make(record, images)`, its "images" as paths (relative
    ones beside the file). A line `make` cannot take is one error naming the file, the line and `what` it should
    be; a file without records is an error too."""
    folder, out = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                images = [im if os.path.isabs(im) else os.path.join(folder, im) for im in r.get("images", [])]
                out.append(make(r, images))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{i}: not {what} ({e})") from None
    if not out:
        raise ValueError(f"{path}: no records")
    return out
