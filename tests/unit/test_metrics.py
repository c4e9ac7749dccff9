"""Med-VQA metrics (hscr/metrics.py), with the traps of substring matching."""

from __future__ import annotations

import math

import pytest

from hscr.metrics import closed_hit, first_yes_no, normalize_answer, open_recall, precision_recall_f1, yes_rate


def test_normalize_answer() -> None:
    assert normalize_answer("The  Nodule, on the LEFT!") == "nodule on left"
    assert normalize_answer("Two nodules.") == "2 nodules"
    assert normalize_answer("right-sided\teffusion") == "right sided effusion"
    assert normalize_answer("  ?! ") == ""


def test_closed_hit_no_does_not_hit_inside_nodule() -> None:
    # Substring matching ("no" in "there is a nodule") would count this; whole words do not.
    assert not closed_hit("There is a nodule.", "no")
    assert closed_hit("No, there is no nodule.", "no")
    assert not closed_hit("Nope", "no")


def test_closed_hit_yes_with_punctuation_and_phrases() -> None:
    assert closed_hit("Yes, there is.", "yes")
    assert closed_hit("YES", "Yes")
    assert not closed_hit("yesterday it was seen", "yes")
    assert closed_hit("The lesion is in the left lung", "left lung")
    assert not closed_hit("The lesion is in the lung, left side", "left lung")
    assert not closed_hit("anything", "")


def test_open_recall() -> None:
    # Answer words {left, lower, lobe}; the prediction has left and lobe → 2/3.
    assert open_recall("The mass is in the left upper lobe", "left lower lobe") == pytest.approx(2 / 3)
    # "Two" normalises to "2": answer {2, nodules}, prediction {2} → 1/2.
    assert open_recall("two", "2 nodules") == 0.5
    # Clipped counts: answer [left, left], prediction [left] → 1/2, and repeating in the prediction never
    # exceeds what the answer holds: answer [left], prediction [left, left, left] → 1.
    assert open_recall("left", "left left") == 0.5
    assert open_recall("left left left", "left") == 1.0
    assert open_recall("CT", "CT.") == 1.0
    assert open_recall("anything", "the") == 0.0  # the answer has no words after dropping articles


def test_yes_rate_first_yes_no_word_decides() -> None:
    predictions = ["Yes, there is.", "No.", "yes", "There is no nodule, yes", "A nodule is present"]
    # first yes/no word: yes, no, yes, no, none → 2 of 5
    assert [first_yes_no(p) for p in predictions] == ["yes", "no", "yes", "no", None]
    assert yes_rate(predictions) == pytest.approx(0.4)
    assert math.isnan(yes_rate([]))


def test_strict_closed_hit_refuses_a_hedge() -> None:
    # contains: "yes or no" hits both answers; strict: it commits to neither, so it misses both
    assert closed_hit("yes or no", "yes") and closed_hit("yes or no", "no")
    assert not closed_hit("yes or no", "yes", strict=True) and not closed_hit("yes or no", "no", strict=True)
    assert closed_hit("No, there is no nodule.", "no", strict=True)  # "no" twice, never "yes"
    assert not closed_hit("Yes, there is no doubt", "yes", strict=True)  # says both words: a miss when strict
    assert not closed_hit("There is a nodule.", "no", strict=True)
    # answers other than yes/no are scored as without strict
    assert closed_hit("left, not right", "left", strict=True)


def test_precision_recall_f1_by_hand() -> None:
    # 3 of 6 claims true: P = 0.5; 3 of 4 expected named: R = 0.75; F1 = 2·0.5·0.75 / 1.25 = 0.6
    out = precision_recall_f1(correct=3, claimed=6, recalled=3, expected=4)
    assert out == {"precision": 0.5, "recall": 0.75, "f1": pytest.approx(0.6)}
    # saying nothing: precision undefined, recall 0 -> F1 undefined; claiming only wrong things: F1 = 0
    assert precision_recall_f1(correct=0, claimed=0, recalled=0, expected=4) == {"precision": None, "recall": 0.0,
                                                                                  "f1": None}  # fmt: skip
    assert precision_recall_f1(correct=0, claimed=2, recalled=0, expected=4)["f1"] == 0.0
