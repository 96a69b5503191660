"""The benchmarks: how each sample is asked (prompt), how its answer is scored, and how many tokens it may take.

Prompts and generation lengths are lmms-eval's defaults (lmms_eval/tasks/<task>: the yaml's
`lmms_eval_specific_kwargs.default` and `generation_kwargs.max_new_tokens`, the utils' `doc_to_text`), which the
SmolVLM and Idefics3 model cards' evaluations used: the question, then a one-line instruction. Where ours differ,
the reason is beside it. Which reference each metric follows: docs/evaluate.md.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

from idefics_jax.evaluate import metrics
from idefics_jax.evaluate.data import Sample

SHORT = "\nAnswer the question using a single word or phrase."  # vqav2, textvqa, docvqa (lmms-eval defaults)
CHARTQA = "\nAnswer the question with a single word."  # lmms-eval chartqa.yaml
MMMU_CHOICE = "Answer with the option's letter from the given choices directly."  # lmms-eval mmmu_val.yaml
MMMU_OPEN = "Answer the question using a single word or phrase."


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def textvqa_prompt(s: Sample) -> str:
    """lmms-eval's `textvqa_doc_to_text`: the question through str.capitalize (first letter upper, the rest lower
    case), then the instruction."""
    return s.question.capitalize() + SHORT


def mmmu_prompt(s: Sample) -> str:
    """lmms-eval's mmmu `construct_prompt`: options as "A. text" lines, a blank line, the instruction. The
    "<image i>" placeholders stay in the text and the images come first, as lmms-eval's idefics2 model (the
    Idefics family's) sends MMMU."""
    if s.options:
        opts = "\n".join(f"{c}. {o}" for c, o in zip(letters(len(s.options)), s.options))
        return f"{s.question}\n{opts}\n\n{MMMU_CHOICE}"
    return f"{s.question}\n\n{MMMU_OPEN}"


def mmmu_parse(prediction: str, s: Sample) -> str | list:
    """What MMMU scores: the parsed letter for multiple choice; for open questions the parsed candidates (texts
    and numbers, `metrics.parse_open_response`)."""
    if not s.options:
        return metrics.parse_open_response(prediction)
    choices = letters(len(s.options))
    # MMMU draws the letter for an unparsable answer from one stream seeded 42, so a draw depends on the samples
    # before it; seeded by the sample's id, a resumed or sharded run draws the same letter for it.
    rng = random.Random(f"mmmu:{s.id}")
    return metrics.parse_multi_choice_response(prediction, choices, dict(zip(choices, s.options)), rng)


def mmmu_score(prediction: str, s: Sample) -> float:
    """MMMU's `eval_multi_choice` (the parsed letter is the answer's) or `eval_open`."""
    parsed = mmmu_parse(prediction, s)
    if s.options:
        return float(parsed in s.answers)
    return float(metrics.eval_open(s.answers, parsed))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the score's name in results.json
    prompt: Callable[[Sample], str]
    score: Callable[[str, Sample], float]  # (prediction, sample) -> [0, 1]
    max_new_tokens: int
    by_subject: bool = False  # results.json also breaks the score down by Sample.subject
    parse: Callable[[str, Sample], str | list] | None = None  # what the metric reads from the answer (shown per sample)


def _suffix(text: str) -> Callable[[Sample], str]:
    return lambda s: s.question + text


def _vqa(p: str, s: Sample) -> float:
    return metrics.vqa_accuracy(p, s.answers)


def _textvqa(p: str, s: Sample) -> float:
    return metrics.vqa_accuracy(p, s.answers, metrics.evalai_normalize)


TASKS = {
    "vqav2": Task("vqav2", "vqa_accuracy", _suffix(SHORT), _vqa, 16),
    # lmms-eval sets no max_new_tokens for TextVQA, so its model class's default applies (idefics2's: 1024).
    # VQAv2's 16 instead: the instruction asks for a word or phrase, greedy answers end at eos long before, and an
    # answer that runs past 16 tokens is no human's (theirs are a few words): it scores 0 either way.
    "textvqa": Task("textvqa", "vqa_accuracy", textvqa_prompt, _textvqa, 16),
    "docvqa": Task("docvqa", "anls", _suffix(SHORT), lambda p, s: metrics.anls(p, s.answers), 32),
    "chartqa": Task("chartqa", "relaxed_accuracy", _suffix(CHARTQA),
                    lambda p, s: metrics.relaxed_accuracy(p, s.answers), 16),
    "mmmu": Task("mmmu", "accuracy", mmmu_prompt, mmmu_score, 128, by_subject=True, parse=mmmu_parse),
    # Custom data: the question as written, no instruction added.
    "exact_match": Task("exact_match", "exact_match", lambda s: s.question,
                        lambda p, s: metrics.exact_match(p, s.answers), 32),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]
