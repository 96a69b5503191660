"""The shipped tiny-shapes model: found by name, small, right on fresh images with idefics_jax, the same answers in
transformers, and the README's main command answers about a shipped example image correctly.
(The full 300-image evaluation is `bench/eval_tiny_shapes.py`.)"""

import json
import os

import pytest

import idefics_jax
from idefics_jax import cli
from idefics_jax.shapes import task as shapes
from idefics_jax.shapes import evaluate as shapes_eval

MODEL_DIR = idefics_jax.resolve("tiny-shapes")
EXAMPLES = os.path.join(MODEL_DIR, "examples")


def test_shipped_by_name_and_small():
    assert os.path.isdir(MODEL_DIR) and MODEL_DIR.startswith(os.path.dirname(idefics_jax.__file__))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL_DIR) for f in fs)
    assert size < 12e6, size
    model = idefics_jax.load_pretrained("tiny-shapes")
    assert model.config.model_type == "idefics3"
    assert model.generation_defaults.eos_token_ids  # answers end by themselves
    with pytest.raises(idefics_jax.CheckpointError,
                       match="tiny-shapez: no such directory, and not a shipped model, a preset \\(tiny-shapes"):
        idefics_jax.load_pretrained("tiny-shapez")


def test_held_out_accuracy_and_transformers_agreement():
    # New images (neither the training seeds nor the 300 of bench/eval_tiny_shapes.py): 100 images, ~350 questions.
    report = shapes_eval.evaluate("tiny-shapes", 100, seed=shapes_eval.EVAL_SEED + 1, transformers=True)
    assert min(report.total[k] for k in shapes.KINDS) >= 80, report.total
    for kind in shapes.KINDS:
        assert report.accuracy(kind) >= 0.95, report.table()
    assert report.agree >= 0.99 * report.compared, report.table()


def _examples():
    with open(os.path.join(EXAMPLES, "questions.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("i", range(3))
def test_cli_answers_about_the_shipped_examples(capsys, i):
    ex = _examples()[i]
    question, answer = ex["questions"][0]["text"], ex["questions"][0]["answer"]
    argv = ["generate", "--image", os.path.join(EXAMPLES, ex["image"]), "--prompt", question]  # default model
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == answer


def test_example_questions_are_the_tasks_own():
    for ex in _examples():
        from PIL import Image

        img = Image.open(os.path.join(EXAMPLES, ex["image"]))
        assert 64 <= min(img.size) and max(img.size) <= 160
        assert {q["text"] for q in ex["questions"]} <= {
            "How many shapes are there?", *(f"What color is the {s}?" for s in shapes.SHAPES),
            *(f"What shape is the {c} object?" for c in shapes.COLORS)}
