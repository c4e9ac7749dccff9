"""Med-VQA metrics in the LLaVA-Med protocol: closed (yes/no) accuracy and open-question token recall, and the
precision / recall / F1 of finding claims.

Differences from LLaVA-Med's script, on purpose: containment is by whole words (its substring test counts
"no" inside "nodule" as a hit) and recall clips repeated words (its count of a word the prediction repeats
can push recall above what the answer supports).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence

YES_NO = frozenset({"yes", "no"})
# As the VQA / LLaVA-Med normaliser: articles are dropped, number words up to ten become digits.
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


def normalize_answer(text: str) -> str:
    """Lowercase, every Unicode punctuation character → space, drop articles (a, an, the), number words
    zero..ten → digits, collapse whitespace. "The  Nodule, on the LEFT!" → "nodule on left"."""
    spaced = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    words = [NUMBER_WORDS.get(word, word) for word in spaced.split() if word not in ARTICLES]
    return " ".join(words)


def closed_hit(prediction: str, answer: str, *, strict: bool = False) -> bool:
    """Hit when the normalised answer occurs in the normalised prediction as whole consecutive words.

    "No, there is no nodule" hits "no"; "There is a nodule" does not (no word "no"). An empty answer
    never hits. ``strict`` (LLaVA-Med's yes/no guard, tightened): when the answer is "yes" or "no", the
    prediction must also commit to it, i.e. contain no other yes/no word, so a hedge ("yes or no", "yes, no
    doubt") misses both answers instead of hitting both; other answers are scored as without ``strict``.
    """
    target = normalize_answer(answer)
    words = normalize_answer(prediction)
    hit = bool(target) and f" {target} " in f" {words} "
    if not (strict and target in YES_NO):
        return hit
    return hit and set(words.split()) & YES_NO == {target}


def open_recall(prediction: str, answer: str) -> float:
    """Fraction of the answer's words found in the prediction, after normalisation (clipped counts).

    ``Σ_w min(count_pred(w), count_answer(w)) / Σ_w count_answer(w)``; an answer with no words → 0.0.
    """
    answer_words = Counter(normalize_answer(answer).split())
    if not answer_words:
        return 0.0
    found = answer_words & Counter(normalize_answer(prediction).split())
    return sum(found.values()) / sum(answer_words.values())


def precision_recall_f1(*, correct: int, claimed: int, recalled: int, expected: int) -> dict[str, float | None]:
    """Claim precision ``correct / claimed``, recall ``recalled / expected`` and their harmonic mean
    ``F1 = 2PR / (P + R)`` (0 when P + R = 0); each ``None`` when its denominator is 0 (F1: when P or R is)."""
    precision = correct / claimed if claimed else None
    recall = recalled / expected if expected else None
    if precision is None or recall is None:
        return {"precision": precision, "recall": recall, "f1": None}
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def first_yes_no(prediction: str) -> str | None:
    """The first of the words "yes" / "no" in the normalised prediction, or ``None`` if neither occurs."""
    return next((word for word in normalize_answer(prediction).split() if word in ("yes", "no")), None)


def yes_rate(predictions: Sequence[str]) -> float:
    """Fraction of predictions whose first yes/no word is "yes" (a language-prior gauge); NaN if empty.

    "Yes, there is no doubt" counts as yes; a prediction with neither word counts as not yes.
    """
    if not predictions:
        return math.nan
    return sum(first_yes_no(p) == "yes" for p in predictions) / len(predictions)
