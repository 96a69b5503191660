"""Held-out accuracy of a tiny-shapes model: fresh images, every allowed question, greedy answers, per question type;
with `idefics_jax.generate` and, optionally, transformers on the same directory (agreement between the two)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from idefics_jax.runtime.progress import Progress
from idefics_jax.shapes import task as shapes

EVAL_SEED = 20261123  # training data uses seeds 0 (train) and 1_000_003 (eval split); these images are new


@dataclasses.dataclass
class Report:
    right: collections.Counter  # kind -> correct answers of idefics_jax
    total: collections.Counter  # kind -> questions
    agree: int = 0  # questions where transformers gave the same answer (when it was run)
    compared: int = 0
    mistakes: list = dataclasses.field(default_factory=list)  # (question, expected, ours)

    def accuracy(self, kind: str) -> float:
        return self.right[kind] / max(self.total[kind], 1)

    def table(self) -> str:
        kinds = [k for k in (*shapes.KINDS, shapes.COLOR_COUNT) if self.total[k]]
        rows = [f"{k:<6} {self.right[k]:>4}/{self.total[k]:<4} {self.accuracy(k):7.1%}" for k in kinds]
        if self.compared:
            rows.append(f"transformers agrees on {self.agree}/{self.compared} = {self.agree / self.compared:.1%}")
        return "\n".join(rows)


def questions(n_images: int, seed: int = EVAL_SEED, limit: int | None = None, kinds=shapes.KINDS):
    """(image, question) for every allowed question of `kinds` of `n_images` fresh images (the first `limit`);
    kind `shapes.COLOR_COUNT` asks each image all four colour counts."""
    rng = np.random.default_rng(seed)
    return [(ex.image, q) for ex in (shapes.sample(rng) for _ in range(n_images))
            for q in ex.questions + shapes.color_count_questions(ex.shapes) if q.kind in kinds][:limit]


def write_jsonl(folder: str, items) -> str:
    """`items` (from `questions`) as an `idefics-jax eval` JSONL file with PNG images beside it; returns its path."""
    import json
    import os

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    names: dict[int, str] = {}
    with open(path, "w") as f:
        for image, q in items:
            if id(image) not in names:  # an image's questions share its file
                names[id(image)] = f"images/{len(names):05d}.png"
                image.save(os.path.join(folder, names[id(image)]))
            f.write(json.dumps({"image": names[id(image)], "question": q.text, "answers": [q.answer],
                                "kind": q.kind}) + "\n")
    return path


def evaluate(path: str, n_images: int, *, seed: int = EVAL_SEED, transformers: bool = False, batch_size: int = 32,
             max_new_tokens: int = 3, progress: bool = False, limit: int | None = None, kinds=shapes.KINDS) -> Report:
    """Greedy answers of the model at `path` (a shipped name, an idefics-jax checkpoint or an HF directory)."""
    from idefics_jax.checkpoints.load import load_pretrained
    from idefics_jax.checkpoints.registry import resolve
    from transformers import AutoProcessor

    path = resolve(path)
    hf = None
    if transformers:
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    return evaluate_model(load_pretrained(path), AutoProcessor.from_pretrained(path), n_images,
                          seed=seed, hf=hf, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                          limit=limit, kinds=kinds)


def evaluate_model(model, processor, n_images: int, *, seed: int = EVAL_SEED, hf=None, batch_size: int = 32,
                   max_new_tokens: int = 3, progress: bool = False, limit: int | None = None,
                   kinds=shapes.KINDS) -> Report:
    """`evaluate` for a model in memory (a training run's, say); `hf`: a transformers model to compare with."""
    from idefics_jax.generation.chat import Chat, user_turn

    chat = Chat(model, processor)
    items = questions(n_images, seed, limit, kinds)
    report = Report(collections.Counter(), collections.Counter())
    bar = Progress("evaluating", len(items), unit="questions", enabled=progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        conversations = [(user_turn(q.text, 1), [image]) for image, q in chunk]
        ours = chat.answers(conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
        theirs = _hf_answers(chat, hf, conversations, max_new_tokens) if hf is not None else None
        for i, (_, q) in enumerate(chunk):
            report.total[q.kind] += 1
            report.right[q.kind] += ours[i] == q.answer
            if ours[i] != q.answer:
                report.mistakes.append((q.text, q.answer, ours[i]))
            if theirs is not None:
                report.compared += 1
                report.agree += theirs[i] == ours[i]
        bar.set(min(start + batch_size, len(items)))
    return report


def _hf_answers(chat, hf, conversations, max_new_tokens):
    """transformers' greedy answers to the same batch, decoded as ours are."""
    import torch

    inputs = chat.batch_inputs(conversations)
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, do_sample=False,
                          max_new_tokens=max_new_tokens).numpy()
    return chat.decode(out[:, inputs["input_ids"].shape[1]:])
