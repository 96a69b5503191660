"""The benchmarks' official metrics, written from their reference code (quirks included, each noted where kept).

- VQA accuracy (VQAv2): the VQA challenge's definition (visualqa.org/evaluation.html; GT-Vision-Lab/VQA
  `vqaEval.py`): the prediction and every human answer normalised (punctuation, number words, articles,
  contractions), then min(#other humans that gave the answer / 3, 1) averaged over the 10 leave-one-out subsets
  of the human answers.
- TextVQA accuracy: the same, with EvalAI's answer processor (TextVQA's leaderboard, mmf's
  `TextVQAAccuracyEvaluator`): lower case, commas and question marks deleted, "'s" split off, then as VQA.
- ANLS (DocVQA): the DocVQA / ST-VQA definition as in lmms-eval's `anls`: 1 - Levenshtein / max length, best over
  the references, 0 below the 0.5 threshold.
- Relaxed accuracy (ChartQA): pix2struct's `relaxed_correctness` (the metric of the ChartQA paper): numbers within
  5% of the target, anything else an exact (case-insensitive) match.
- MMMU: MMMU's own `eval/utils/eval_utils.py`: multiple choice by `parse_multi_choice_response` +
  `eval_multi_choice`, open questions by `parse_open_response` + `eval_open`.
- exact_match: case- and whitespace-insensitive string equality with any reference.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

# vqaEval.py's tables, verbatim (including its oddities, e.g. "somebody'd" -> "somebodyd").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# `(?!<=\d)` is vqaEval.py's (a typo for a lookbehind: it never matches, so every period not followed by a
# digit goes); kept, since the published numbers were computed with it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def vqa_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark touching a space (or any mark, in a text with a digit,digit comma) is
    deleted, else it becomes a space; then periods not before a digit go."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # vqaEval passes re.UNICODE as sub's third argument, which is `count`: at most 32 periods go. Kept.
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def vqa_digits_articles(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, number words -> digits, articles dropped, contractions restored."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(text: str) -> str:
    """vqaEval's processing of an answer (the prediction and each human answer alike)."""
    return vqa_digits_articles(vqa_punctuation(_vqa_clean(text)))


def evalai_normalize(text: str) -> str:
    """EvalAI's answer processor (TextVQA): lower case, commas and question marks deleted ("yes,no" -> "yesno"),
    "'s" split off as a word ("man's" -> "man 's"), then vqaEval's processing."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize=vqa_normalize) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2 and TextVQA), each normalised with
    `normalize` (`vqa_normalize` for VQAv2, `evalai_normalize` for TextVQA).

    Leaving out each human answer in turn, the prediction scores min(#matching other answers / 3, 1); the score is
    the mean over the left-out answers (answers are told apart by position: equal strings are different humans).
    With a single reference (custom data) it is a plain normalised match."""
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    pred = normalize(prediction)
    hits = [normalize(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction: the best over the references of
    1 - edit distance / max(len) (both lower-cased, whitespace collapsed), 0 when that is below `threshold`.

    As lmms-eval's `anls` (after the DocVQA / ST-VQA code): the length is that of the raw strings."""
    if not answers:
        raise ValueError("anls: no reference answers")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's ChartQA check: numbers ("12.5", "40%" = 0.4) within 5% of a nonzero numeric target; otherwise
    (text, or a zero target) a case-insensitive exact match."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the (stripped) prediction is relaxed-correct for any reference (ChartQA has one)."""
    if not answers:
        raise ValueError("relaxed_accuracy: no reference answers")
    return float(any(relaxed_correctness(prediction.strip(), a.strip()) for a in answers))


def parse_multi_choice_response(response: str, all_choices: Sequence[str], index2ans: dict[str, str],
                                rng: random.Random) -> str:
    """MMMU's answer parser: "(B)" first, then a bare letter " B ", then (for answers over 5 words) the text of
    an option; the last one in the response wins when several appear. When nothing matches, a letter drawn with
    `rng` (MMMU draws one per sample from its seeded stream; the caller seeds `rng` per sample)."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # so a letter matches only as a word
    index_ans, ans_with_brack = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    if candidates:
        ans_with_brack = True
    else:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [i for i, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = not candidates
    if not candidates:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def mmmu_normalize(text: str) -> list[str | float]:
    """MMMU's `normalize_str`: a number (commas ignored) -> [its float rounded to 2 decimals]; other text -> [it
    lower-cased], a single character as [" c", "c "] so that it only matches as a word."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


# MMMU's `extract_numbers`: numbers with thousands commas, in scientific notation, and plain ones, in that order.
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
# Where a sentence's answer starts: its shortest tail after one of these.
_ANSWER_CUES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _answer_parts(response: str) -> list[str]:
    """MMMU's `get_key_subresponses`: per line, the shortest tail after an answer cue ("is ", "so ", ... and, on
    the last line, "="); the whole (lower-cased) response when no line has one."""
    response = response.strip().strip(".").lower()
    # MMMU also splits at ". " before a capital letter, but after lower-casing there is none: lines only.
    lines = response.split("\n")
    parts = []
    for n, line in enumerate(lines):
        cues = _ANSWER_CUES + (("=",) if n == len(lines) - 1 else ())
        best = None
        for cue in cues:
            if cue in line:
                tail = line.split(cue)[-1].strip()
                # As MMMU: an empty tail found first is replaced by the next one, whatever its length.
                if not best or len(tail) < len(best):
                    best = tail
        if best and best.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            parts.append(best)
    return parts or [response]


def parse_open_response(response: str) -> list[str | float]:
    """MMMU's `parse_open_response`: the answer candidates of a free-form response, normalised (`mmmu_normalize`):
    the answer parts (`_answer_parts`) and every number in them; no duplicates."""
    parts = _answer_parts(response)
    texts = list(parts)
    for part in parts:
        texts += _NUM_COMMAS.findall(part) + _NUM_SCIENTIFIC.findall(part) + _NUM_PLAIN.findall(part)
    out: list[str | float] = []
    for text in texts:
        out += [v for v in mmmu_normalize(text) if v not in out]
    return out


def eval_open(answers: Sequence[str], parsed: Sequence[str | float]) -> bool:
    """MMMU's `eval_open`: a parsed number equal to a (normalised) numeric answer, or a parsed text containing a
    (normalised) text answer."""
    gold = [v for a in answers for v in mmmu_normalize(a)]
    for p in parsed:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in gold):
                return True
        elif p in gold:
            return True
    return False


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference ignoring case and runs of whitespace."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    return float(any(norm(prediction) == norm(a) for a in answers))
