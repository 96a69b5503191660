"""The official metrics on the examples and edge cases of their own evaluation code (no model, no torch)."""

import random

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
    # The VQA evaluation page's own examples: apostrophes and colons stay, a digit,digit comma goes.
    ("girl's", "girl's"), ("2:50 pm", "2:50 pm"), ("100,978", "100978"), ("Dont", "don't"),
])
def test_vqa_normalization(raw, want):
    assert m.vqa_normalize(raw) == want


def ten(*pairs):
    return [a for a, n in pairs for _ in range(n)]


def test_vqa_accuracy_counts_humans():
    assert m.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    # 3 of 10 humans: leaving out one of the three leaves 2 (2/3), leaving out another leaves 3 (1).
    assert m.vqa_accuracy("2", ten(("2", 3), ("3", 7))) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert m.vqa_accuracy("2", ten(("2", 1), ("3", 9))) == pytest.approx(9 * (1 / 3) / 10)
    assert m.vqa_accuracy("2", ten(("2", 2), ("3", 8))) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert m.vqa_accuracy("4", ten(("2", 5), ("3", 5))) == 0.0
    # The prediction is normalised: number words, articles, case.
    assert m.vqa_accuracy("Two", ten(("2", 4), ("3", 6))) == 1.0
    assert m.vqa_accuracy("the dog", ten(("dog", 3), ("cat", 7))) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # The human answers are normalised too ("Two" and "2" are the same answer).
    assert m.vqa_accuracy("2", ten(("Two", 2), ("2", 1), ("3", 7))) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # One reference (custom data): a plain normalised match.
    assert m.vqa_accuracy("a red one", ["Red One"]) == 1.0 and m.vqa_accuracy("red", ["blue"]) == 0.0


@pytest.mark.parametrize("normalize", [m.vqa_normalize, m.evalai_normalize])
@pytest.mark.parametrize("answer", ["Yes", "Two", "t-shirt", "T-Shirt,", "1/2", "www.google.com"])
def test_vqa_accuracy_ten_identical_answers(answer, normalize):
    """Ten humans agreeing: their answer, verbatim or in another case, scores 1 (both sides are normalised)."""
    assert m.vqa_accuracy(answer, [answer] * 10, normalize) == 1.0
    assert m.vqa_accuracy(answer.lower(), [answer] * 10, normalize) == 1.0
    assert m.vqa_accuracy("no idea", [answer] * 10, normalize) == 0.0


@pytest.mark.parametrize("raw, want", [
    ("yes,no", "yesno"), ("Red, White", "red white"), ("1,000", "1000"),  # commas deleted
    ("what?", "what"), ("man's hat", "man 's hat"),                       # "?" deleted, "'s" split off
    ("The T-Shirt.", "t shirt"), ("Two dogs", "2 dogs"),                  # then as vqaEval
])
def test_evalai_normalization(raw, want):
    assert m.evalai_normalize(raw) == want


def test_textvqa_accuracy_deletes_commas():
    assert m.vqa_accuracy("yes,no", ["yesno"] * 10, m.evalai_normalize) == 1.0
    assert m.vqa_accuracy("yes,no", ["yesno"] * 10) == 0.0  # VQAv2's processing: "yes no"
    assert TASKS["textvqa"].score("yes,no", Sample(0, "1", "q", [], ["yesno"] * 10)) == 1.0


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


class NoDraw(random.Random):
    def choice(self, seq):
        raise AssertionError("a parsable answer needs no random letter")


@pytest.mark.parametrize("response, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B", "B"), ("The answer is (C).", "C"),
    ("(A) or maybe (D)", "D"),                                     # several: the last one
    ("A or B", "B"),
    ("I think that the answer must be the green grass here", "C"),  # > 5 words: option text
    ("I looked at it: yellow sun, then blue sky in the end", "B"),   # option texts: the last one
    ("B:", "B"), ("'D'", "D"),
])
def test_mmmu_parse(response, want):
    assert m.parse_multi_choice_response(response, CHOICES, INDEX2ANS, NoDraw()) == want


@pytest.mark.parametrize("response", ["no idea", "AB", "C.\nBecause", "blue"])
def test_mmmu_parse_unparsable_is_drawn(response):
    """No "(X)", no " X " and no option text in an answer over 5 words: a random letter (MMMU's; lmms-eval would
    take "AB" as B and "C.\nBecause" as C)."""
    assert m.parse_multi_choice_response(response, CHOICES, INDEX2ANS, random.Random(3)) == \
        random.Random(3).choice(CHOICES)


def test_mmmu_fallback_drawn_per_sample():
    """Each sample draws its own letter for an unparsable answer, the same one every time it is scored."""
    def sample(i):
        return Sample(i, f"validation_Art_{i}", "q", [], ["A"], ["w", "x", "y", "z"], "Art")

    mmmu = TASKS["mmmu"]
    drawn = [mmmu.parse("no idea", sample(i)) for i in range(40)]
    assert set(drawn) == set(CHOICES)
    assert drawn == [mmmu.parse("no idea", sample(i)) for i in range(40)]


@pytest.mark.parametrize("response, gold, want", [
    ("1.5", "1.5", True), ("1.50", "1.5", True), ("1.5 m", "1.5", True), ("The answer is 1.5", "1.5", True),
    ("1.5.", "1.5", True), ("2", "1.5", False), ("1.499", "1.5", True),  # numbers compared at 2 decimals
    ("1,234", "1234", True), ("12,000 dollars", "12000", True),
    ("x = 3\nso the answer is 4", "4", True), ("x = 3\nso the answer is 4", "3", False),  # the last line's cue
    ("It is Blue.", "blue", True), ("The sky is light blue", "blue", True),  # a text answer inside the parsed text
    ("a", "a", True), ("cat", "a", False),                                  # one character matches only as a word
])
def test_mmmu_open(response, gold, want):
    assert m.eval_open([gold], m.parse_open_response(response)) is want


def test_mmmu_open_parse():
    assert m.parse_open_response("The answer is 1.5") == [1.5]
    assert m.parse_open_response("1.5 m") == ["1.5 m", 1.5]
    assert m.parse_open_response("Blue") == ["blue"]
    assert m.parse_open_response("So it is 3 kg") == ["3 kg", 3.0]


def test_exact_match():
    assert m.exact_match("  Red  Circle ", ["red circle"]) == 1.0
    assert m.exact_match("red", ["blue", "RED"]) == 1.0
    assert m.exact_match("red.", ["red"]) == 0.0


def test_prompts_and_mmmu_scoring():
    s = Sample(0, "validation_Art_1", "Which one? <image 1>", [], ["B"], ["cat", "dog"], "Art")
    assert mmmu_prompt(s) == ("Which one? <image 1>\nA. cat\nB. dog\n\n"
                              "Answer with the option's letter from the given choices directly.")
    assert TASKS["mmmu"].score("(B) dog", s) == 1.0 and TASKS["mmmu"].score("A", s) == 0.0
    o = Sample(1, "validation_Math_2", "How long? <image 1>", [], ["1.5"], None, "Math")
    assert mmmu_prompt(o) == "How long? <image 1>\n\nAnswer the question using a single word or phrase."
    assert TASKS["mmmu"].score("The answer is 1.50 m.", o) == 1.0 and TASKS["mmmu"].score("2", o) == 0.0
    q = Sample(0, "1", "what does the SIGN say?", [], ["x"])
    assert TASKS["vqav2"].prompt(q) == "what does the SIGN say?\nAnswer the question using a single word or phrase."
    # lmms-eval's textvqa: str.capitalize (the rest lower-cased).
    assert TASKS["textvqa"].prompt(q) == "What does the sign say?\nAnswer the question using a single word or phrase."
    assert TASKS["chartqa"].prompt(q) == "what does the SIGN say?\nAnswer the question with a single word."
    assert TASKS["exact_match"].prompt(q) == "what does the SIGN say?"
    assert {k: t.max_new_tokens for k, t in TASKS.items()} == {
        "vqav2": 16, "textvqa": 16, "docvqa": 32, "chartqa": 16, "mmmu": 128, "exact_match": 32}
