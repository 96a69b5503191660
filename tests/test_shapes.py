"""The synthetic shapes task obeys its specification."""

import collections
import io

import numpy as np
from PIL import Image

from idefics_jax.shapes import task as shapes


def _pixels_of(image, color):
    a = np.asarray(image).astype(int)
    return np.all(np.abs(a - np.array(shapes.COLORS[color])) < 8, axis=-1)


def test_images_follow_the_rules():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(300):
        ex = shapes.sample(rng)
        w, h = ex.image.size
        assert ex.image.mode == "RGB" and 64 <= w <= 160 and 64 <= h <= 160
        assert 1 <= len(ex.shapes) <= 4
        for i, s in enumerate(ex.shapes):
            x0, y0, x1, y1 = s.box
            assert x1 - x0 >= 14 and y1 - y0 >= 14 and 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h
            for t in ex.shapes[i + 1:]:
                assert shapes._overlaps(s.box, t.box, gap=0) is False
        # Every shape is visible in its colour and the rest of the image is white.
        covered = np.zeros((h, w), bool)
        for s in ex.shapes:
            x0, y0, x1, y1 = s.box
            m = _pixels_of(ex.image, s.color)[y0:y1, x0:x1]
            assert m.sum() >= 0.4 * (x1 - x0) * (y1 - y0)
            covered[y0:y1, x0:x1] = True
        assert np.all(np.asarray(ex.image)[~covered] == 255)
        for q in ex.questions:
            kinds.add(q.kind)
            if q.kind == "count":
                assert q.text == "How many shapes are there?" and q.answer == str(len(ex.shapes))
            elif q.kind == "color":
                kind = q.text.removeprefix("What color is the ").removesuffix("?")
                match = [s for s in ex.shapes if s.kind == kind]
                assert len(match) == 1 and q.answer == match[0].color
            else:
                color = q.text.removeprefix("What shape is the ").removesuffix(" object?")
                match = [s for s in ex.shapes if s.color == color]
                assert len(match) == 1 and q.answer == match[0].kind
            assert q.answer == q.answer.lower() and " " not in q.answer
    assert kinds == {"count", "color", "shape"}


def test_records_are_deterministic_cauldron_records():
    a, b = list(shapes.records(5, seed=3)), list(shapes.records(5, seed=3))
    assert a == b and a != list(shapes.records(5, seed=4))
    for r in a:
        assert Image.open(io.BytesIO(r["images"][0])).mode == "RGB"
        assert all(set(t) == {"user", "assistant", "source"} for t in r["texts"])


def test_curriculum_narrows_shape_counts_and_question_kinds():
    rs = list(shapes.records(30, seed=5, questions_per_image=1, counts=(1,), kinds=("shape",)))
    assert len(rs) == 30
    for r in rs:
        assert len(r["texts"]) == 1 and r["texts"][0]["source"] == "shapes-shape"
        assert r["texts"][0]["assistant"] in shapes.SHAPES
    assert {len(shapes.sample(np.random.default_rng(s), (2, 3)).shapes) for s in range(20)} == {2, 3}


def test_one_question_per_record_draws_the_kind_first():
    # 4-shape images allow one count question among up to 7 colour and shape ones; drawn by kind, counting is
    # asked about a third of the time (more when a kind is missing), not one time in eight.
    rs = list(shapes.records(600, seed=6, questions_per_image=1, counts=(4,)))
    share = collections.Counter(r["texts"][0]["source"] for r in rs)
    assert 0.3 < share["shapes-count"] / len(rs) < 0.5, share
    assert min(share.values()) > 0.2 * len(rs), share
    two = list(shapes.records(200, seed=6, questions_per_image=2, counts=(4,)))
    assert all(r["texts"][0] != r["texts"][-1] for r in two if len(r["texts"]) == 2)  # fewer when fewer are allowed
    assert sum(len(r["texts"]) == 2 for r in two) > 0.9 * len(two)
