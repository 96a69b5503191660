"""The official metrics on the examples and edge cases of their own evaluation code (no model, no torch)."""

import pytest

from idefics_jax.evaluate import metrics as m
from idefics_jax.evaluate.data import Sample
from idefics_jax.evaluate.tasks import TASKS, mmmu_prompt


@pytest.mark.parametrize("raw, want", [
    ("two", "2"), ("None", "0"), ("ten dogs", "10 dogs"),          # manualMap: number words
    ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"),     # articles dropped, lower case
    ("dont", "don't"), ("isnt it", "isn't it"), ("Im", "im"),  # contractions; vqaEval lower-cases
    # first, so its capitalised keys ("Im") never match: kept
    ("yes.", "yes"), ("3.5", "3.5"), ("no!", "no"),                  # periods not before a digit, other marks
    ("red, white", "red white"), ("1,000", "1000"),                  # ", " touches a space: deleted; digit,digit
    ("black/white", "black white"), ("t-shirt", "t shirt"),          # a mark inside a word becomes a space
    ("left - right", "left right"),                                  # one touching a space is deleted
    ("  yes\n", "yes"), ("a\tdog", "dog"),
])
def test_vqa_normalization(raw, want):
    assert m.vqa_normalize(raw) == want


def test_vqa_accuracy_counts_humans():
    ten = lambda *pairs: [a for a, n in pairs for _ in range(n)]  # noqa: E731
    assert m.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    # 3 of 10 humans: leaving out one of the three leaves 2 (2/3), leaving out another leaves 3 (1).
    assert m.vqa_accuracy("2", ten(("2", 3), ("3", 7))) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert m.vqa_accuracy("2", ten(("2", 1), ("3", 9))) == pytest.approx(9 * (1 / 3) / 10)
    assert m.vqa_accuracy("2", ten(("2", 2), ("3", 8))) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert m.vqa_accuracy("4", ten(("2", 5), ("3", 5))) == 0.0
    # The prediction is normalised: number words, articles, case.
    assert m.vqa_accuracy("Two", ten(("2", 4), ("3", 6))) == 1.0
    assert m.vqa_accuracy("the dog", ten(("dog", 3), ("cat", 7))) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # References that disagree are normalised too ("Two" and "2" are the same answer).
    assert m.vqa_accuracy("2", ten(("Two", 2), ("2", 1), ("3", 7))) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # One reference (custom data): a plain normalised match.
    assert m.vqa_accuracy("a red one", ["Red One"]) == 1.0 and m.vqa_accuracy("red", ["blue"]) == 0.0


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("kitten", "sitting", 3), ("abc", "", 3), ("flaw", "lawn", 2),
                                     ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert m.levenshtein(a, b) == d == m.levenshtein(b, a)


def test_anls():
    assert m.anls("Dr. Smith", ["dr. smith"]) == 1.0                    # case
    assert m.anls("  dr.   smith ", ["dr. smith"]) == pytest.approx(1 - 0 / 14)  # whitespace collapsed
    assert m.anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)    # 0.571: kept
    assert m.anls("abcd", ["abce"]) == pytest.approx(0.75)
    # Exactly at the threshold is kept, just under is 0 (the DocVQA code: `if score < threshold: 0`).
    assert m.anls("ab", ["ac"]) == pytest.approx(0.5)
    assert m.anls("abc", ["axy"]) == 0.0                                # 1 - 2/3 = 0.33 < 0.5
    assert m.anls("1990", ["1989", "1990"]) == 1.0                      # best reference
    assert m.anls("", ["x"]) == 0.0


@pytest.mark.parametrize("pred, target, ok", [
    ("100", "104", True), ("100", "105.3", False), ("95", "100", True), ("94.9", "100", False),
    ("40%", "0.41", True), ("0.4", "40%", True), ("12", "12.0", True),
    ("0", "0", True), ("0.01", "0", False),       # zero target: string comparison
    ("Yes", "yes", True), ("No", "yes", False),   # text: case-insensitive exact match
    ("1,000", "1000", False),                     # not a float: compared as text
])
def test_relaxed_correctness(pred, target, ok):
    assert m.relaxed_correctness(pred, target) is ok


def test_relaxed_accuracy_strips():
    assert m.relaxed_accuracy(" 21 ", ["20.5"]) == 1.0


CHOICES = ["A", "B", "C", "D"]
INDEX2ANS = {"A": "a red apple", "B": "blue sky", "C": "green grass", "D": "yellow sun"}


@pytest.mark.parametrize("response, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B", "B"), ("The answer is (C).", "C"),
    ("(A) or maybe (D)", "D"),                                     # several: the last one
    ("A or B", "B"),
    ("I think that the answer must be the green grass here", "C"),  # > 5 words: option text
    ("I looked at it: yellow sun, then blue sky in the end", "B"),   # option texts: the last one
    ("B:", "B"), ("'D'", "D"),
])
def test_mmmu_parse(response, want):
    assert m.parse_multi_choice_response(response, CHOICES, INDEX2ANS) == want


def test_mmmu_parse_nothing_is_a_seeded_guess():
    got = {m.parse_multi_choice_response("no idea", CHOICES, INDEX2ANS) for _ in range(5)}
    assert len(got) == 1 and got <= set(CHOICES)


def test_exact_match():
    assert m.exact_match("  Red  Circle ", ["red circle"]) == 1.0
    assert m.exact_match("red", ["blue", "RED"]) == 1.0
    assert m.exact_match("red.", ["red"]) == 0.0


def test_prompts_and_mmmu_scoring():
    s = Sample(0, "validation_Art_1", "Which one? <image 1>", [], ["B"], ["cat", "dog"], "Art")
    assert mmmu_prompt(s) == ("Which one? <image 1>\nA. cat\nB. dog\n\n"
                              "Answer with the option's letter from the given choices directly.")
    assert TASKS["mmmu"].score("(B) dog", s) == 1.0 and TASKS["mmmu"].score("A", s) == 0.0
    q = Sample(0, "1", "What is it?", [], ["x"])
    assert TASKS["vqav2"].prompt(q) == "What is it?\nAnswer the question using a single word or phrase."
    assert TASKS["chartqa"].prompt(q) == "What is it?\nAnswer the question with a single word."
    assert TASKS["exact_match"].prompt(q) == "What is it?"
