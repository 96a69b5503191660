"""The synthetic visual task behind the `tiny-shapes` model.

White RGB images, 64-160 px a side, with 1-4 non-overlapping filled circles, squares and triangles in red, green,
blue or yellow, each at least 14 px across. Three exactly worded questions, each answered with one lowercase word:
  "How many shapes are there?"              -> "3"
  "What color is the circle?"               -> "red"       (only when exactly one circle is present)
  "What shape is the blue object?"          -> "triangle"  (only when exactly one shape has that colour)
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
MIN_SIDE, MAX_SIDE, MIN_SIZE = 64, 160, 14
KINDS = ("count", "color", "shape")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive of x0/y0, exclusive of x1/y1


@dataclasses.dataclass(frozen=True)
class Question:
    kind: str  # "count", "color" or "shape"
    text: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Example:
    image: Image.Image
    shapes: tuple[Shape, ...]
    questions: tuple[Question, ...]


def questions_for(shapes) -> tuple[Question, ...]:
    """Every question the task allows for these shapes."""
    qs = [Question("count", "How many shapes are there?", str(len(shapes)))]
    for kind in SHAPES:
        same = [s for s in shapes if s.kind == kind]
        if len(same) == 1:
            qs.append(Question("color", f"What color is the {kind}?", same[0].color))
    for color in COLORS:
        same = [s for s in shapes if s.color == color]
        if len(same) == 1:
            qs.append(Question("shape", f"What shape is the {color} object?", same[0].kind))
    return tuple(qs)


COLOR_COUNT = "color-count"  # a question the supervised data never asks (post-training teaches it: docs/posttrain.md)


def color_count_questions(shapes) -> tuple[Question, ...]:
    """"How many red (green, blue, yellow) shapes are there?" -> "0".."4", one per colour."""
    return tuple(Question(COLOR_COUNT, f"How many {c} shapes are there?", str(sum(s.color == c for s in shapes)))
                 for c in COLORS)


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    fill = COLORS[s.color]
    if s.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif s.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def _overlaps(a, b, gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def sample(rng: np.random.Generator, counts: tuple[int, ...] = (1, 2, 3, 4)) -> Example:
    """One random image with its shapes (as many as one of `counts`, uniformly) and every allowed question."""
    while True:
        w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
        n = int(counts[rng.integers(len(counts))])
        shapes: list[Shape] = []
        for _ in range(200):  # rejection sampling of non-overlapping boxes
            if len(shapes) == n:
                break
            size = int(rng.integers(MIN_SIZE, max(MIN_SIZE + 1, min(w, h) // 2) + 1))
            x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            box = (x, y, x + size, y + size)
            if any(_overlaps(box, s.box) for s in shapes):
                continue
            shapes.append(Shape(SHAPES[rng.integers(3)], list(COLORS)[rng.integers(4)], box))
        if len(shapes) == n:
            break
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw(draw, s)
    return Example(image, tuple(shapes), questions_for(shapes))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pick(rng: np.random.Generator, qs: list[Question], k: int) -> list[Question]:
    """`k` of `qs`, each a uniformly drawn kind, then one of its questions. Drawing questions uniformly would ask a
    4-shape image (up to 3 colour and 4 shape questions) to count once in 8 times: the hardest counts, least taught."""
    left = {kind: [q for q in qs if q.kind == kind] for kind in KINDS}
    picked = []
    for _ in range(k):
        kinds = [kind for kind in KINDS if left[kind]]
        pool = left[kinds[rng.integers(len(kinds))]]
        picked.append(pool.pop(int(rng.integers(len(pool)))))
    return picked


def records(n: int, seed: int, questions_per_image: int | None = None, counts: tuple[int, ...] = (1, 2, 3, 4),
            kinds: tuple[str, ...] = KINDS):
    """`n` records in The Cauldron's shape: {"images": [png bytes], "texts": [{user, assistant, source}]}.

    Each record asks its image's questions as successive turns (all of them, or `questions_per_image` of them, the
    kind drawn first and then a question of that kind).
    `counts`: how many shapes an image may hold; `kinds`: the question kinds asked (a curriculum narrows both).
    """
    rng = np.random.default_rng(seed)
    made = 0
    while made < n:
        ex = sample(rng, counts)
        qs = [q for q in ex.questions if q.kind in kinds]
        if not qs:  # e.g. no shape question when every colour repeats
            continue
        made += 1
        if questions_per_image is not None and len(qs) > questions_per_image:
            qs = _pick(rng, qs, questions_per_image)
        rng.shuffle(qs)
        yield {
            "images": [png_bytes(ex.image)],
            "texts": [{"user": q.text, "assistant": q.answer, "source": f"shapes-{q.kind}"} for q in qs],
        }
