"""The benchmarks: how each sample is asked (prompt), how its answer is scored, and how many tokens it may take.

Prompts are lmms-eval's default ones (lmms_eval/tasks/<task>/*.yaml, `lmms_eval_specific_kwargs.default`), which
the SmolVLM and Idefics3 model cards' evaluations used: the question, then a one-line instruction. Generation
lengths are lmms-eval's `generation_kwargs.max_new_tokens` for the task.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from idefics_jax.evaluate import metrics
from idefics_jax.evaluate.data import Sample

SHORT = "\nAnswer the question using a single word or phrase."  # vqav2, textvqa, docvqa (lmms-eval defaults)
CHARTQA = "\nAnswer the question with a single word."  # lmms-eval chartqa.yaml
MMMU_CHOICE = "Answer with the option's letter from the given choices directly."  # lmms-eval mmmu utils
MMMU_OPEN = "Answer the question using a single word or phrase."


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def mmmu_prompt(s: Sample) -> str:
    """lmms-eval's mmmu `construct_prompt`: options as "A. text" lines, a blank line, the instruction."""
    if s.options:
        opts = "\n".join(f"{c}. {o}" for c, o in zip(letters(len(s.options)), s.options))
        return f"{s.question}\n{opts}\n\n{MMMU_CHOICE}"
    return f"{s.question}\n\n{MMMU_OPEN}"


def mmmu_parse(prediction: str, s: Sample) -> str:
    """The answer as MMMU scores it: a parsed letter for multiple choice, the text itself for open questions."""
    if not s.options:
        return prediction
    choices = letters(len(s.options))
    return metrics.parse_multi_choice_response(prediction, choices, dict(zip(choices, s.options)))


def mmmu_score(prediction: str, s: Sample) -> float:
    """Multiple choice: the parsed letter equals the answer letter (MMMU `eval_multi_choice`). Open questions
    (about 5% of MMMU) are compared case- and whitespace-insensitively, a simplification of MMMU's `eval_open`."""
    if s.options:
        return float(mmmu_parse(prediction, s) in s.answers)
    return metrics.exact_match(prediction, s.answers)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the score's name in results.json
    prompt: Callable[[Sample], str]
    score: Callable[[str, Sample], float]  # (prediction, sample) -> [0, 1]
    max_new_tokens: int
    by_subject: bool = False  # results.json also breaks the score down by Sample.subject
    parse: Callable[[str, Sample], str] | None = None  # what the metric reads from the answer (shown per sample)


def _suffix(text: str) -> Callable[[Sample], str]:
    return lambda s: s.question + text


TASKS = {
    "vqav2": Task("vqav2", "vqa_accuracy", _suffix(SHORT), lambda p, s: metrics.vqa_accuracy(p, s.answers), 16),
    "textvqa": Task("textvqa", "vqa_accuracy", _suffix(SHORT), lambda p, s: metrics.vqa_accuracy(p, s.answers), 16),
    "docvqa": Task("docvqa", "anls", _suffix(SHORT), lambda p, s: metrics.anls(p, s.answers), 32),
    "chartqa": Task("chartqa", "relaxed_accuracy", _suffix(CHARTQA),
                    lambda p, s: metrics.relaxed_accuracy(p, s.answers), 16),
    "mmmu": Task("mmmu", "accuracy", mmmu_prompt, mmmu_score, 16, by_subject=True, parse=mmmu_parse),
    # Custom data: the question as written, no instruction added.
    "exact_match": Task("exact_match", "exact_match", lambda s: s.question,
                        lambda p, s: metrics.exact_match(p, s.answers), 32),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]
