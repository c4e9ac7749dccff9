"""Evaluation metrics (platform/evaluation/metrics.py) against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from hscr_platform.evaluation.metrics import (
    bleu,
    expected_claims,
    finding_claims,
    group_scores,
    hallucinated_claims,
    hallucination,
    mentioned_kinds,
    model_metrics,
    predicted_count,
    question_kind,
    reliance_gap,
    report_scores,
    rouge_l,
    row_records,
)


def _f(*kinds: str) -> list[dict]:
    return [{"kind": k, "position": "left", "size": 0.05, "x": 0.3, "y": 0.5} for k in kinds]


def _row(question: str, answer: str, answer_type: str, question_type: str, findings=None, source="synthmed"):
    return {"id": question, "source": source, "question": question, "answer": answer,
            "answer_type": answer_type, "question_type": question_type, "findings": findings}  # fmt: skip


def test_mentioned_kinds_plurals_order_and_negation() -> None:
    assert mentioned_kinds("A nodule and two masses on the left.") == ["nodule", "mass"]
    assert mentioned_kinds("Nodules, nodule, NODULE") == ["nodule"]
    assert mentioned_kinds("no nodule, but a cyst") == ["cyst"]
    assert mentioned_kinds("zero cysts") == []  # "zero" -> "0" by the normaliser, a negator
    assert mentioned_kinds("without effusion") == []
    assert mentioned_kinds("ct of the chest with no abnormality.") == []
    assert mentioned_kinds("the nodule is not a mass") == ["nodule", "mass"]  # only "no"/"without"/"0" negate


def test_question_kind_and_count() -> None:
    assert question_kind("is there a mass?") == "mass"
    assert question_kind("how many cysts are there?") == "cyst"
    assert question_kind("describe the image.") is None
    assert question_kind("is the nodule next to the mass?") is None  # two kinds: ambiguous
    assert predicted_count("two nodules") == 2
    assert predicted_count("none") is None


# Hand-made SynthMed-like rows; the comment gives each row's claims (H = hallucinated).
ROWS = [
    _row("is there a mass?", "yes", "closed", "presence", _f("mass")),  # "yes" -> mass
    _row("is there a cyst?", "no", "closed", "presence", _f("mass")),  # "yes" -> cyst H
    _row("is there a nodule?", "no", "closed", "presence", []),  # "no" -> nothing
    _row("describe the image.", "ct of the chest showing a mass on the left.", "report", "report", _f("mass")),
    _row("what abnormality is seen?", "effusion", "open", "abnormality", _f("effusion")),  # effusion
    _row("how many cysts are there?", "0", "open", "count", []),  # "2" -> cyst H
    _row("how many masses are there?", "1", "open", "count", _f("mass")),  # "0" -> nothing
    _row("is this a ct scan?", "yes", "closed", "modality", _f("mass")),  # closed, not presence: no claims
    _row("what is seen?", "nodule", "open", "kg", None, source="vqa_rad"),  # no ground truth: out of scope
]
PREDICTIONS = [
    "yes",
    "Yes.",
    "no",
    "ct of the chest showing a mass on the left and a nodule on the right.",  # mass, nodule H
    "effusion",
    "2",
    "0",
    "yes, a cyst",
    "nodule",
]


def test_claims_per_row() -> None:
    claims = [finding_claims(r, p) for r, p in zip(ROWS, PREDICTIONS, strict=True)]
    assert claims == [["mass"], ["cyst"], [], ["mass", "nodule"], ["effusion"], ["cyst"], [], [], []]
    wrong = [hallucinated_claims(r, p) for r, p in zip(ROWS, PREDICTIONS, strict=True)]
    assert wrong == [[], ["cyst"], [], ["nodule"], [], ["cyst"], [], [], []]


def test_expected_claims_come_from_the_reference_answer_and_the_image() -> None:
    expected = [expected_claims(r) for r in ROWS]
    # presence "yes" -> mass; "no" answers and a count of 0 expect nothing; the report and the abnormality
    # answer name their finding; "1" mass expects mass; the closed modality row and the row without findings none
    assert expected == [["mass"], [], [], ["mass"], ["effusion"], [], ["mass"], [], []]
    wrong_truth = _row("is there a cyst?", "yes", "closed", "presence", _f("mass"))  # answer and image disagree
    assert expected_claims(wrong_truth) == []


def test_hallucination_rates_by_hand() -> None:
    out = hallucination(ROWS, PREDICTIONS)
    # claims: 1 + 1 + 0 + 2 + 1 + 1 + 0 = 6, hallucinated: cyst, nodule, cyst = 3 -> 3 / 6
    assert out["hallucination_rate"] == 0.5 and out["claim_precision"] == 0.5
    assert out["hallucination_claims"] == 6
    # expected 4 (mass, mass, effusion, mass); recalled: rows 0, 3, 4 (row 6 answered "0") -> 3 / 4
    assert out["expected_claims"] == 4 and out["finding_recall"] == 0.75
    assert out["hallucination_f1"] == 0.6  # 2 · 0.5 · 0.75 / 1.25
    # answers that could claim: rows 0-6 (not the modality row, not the row without findings): 7;
    # answers that claim: rows 0, 1, 3, 4, 5 -> 5 / 7; 3 of those 5 hallucinate -> 3 / 5
    assert out["hallucination_answers"] == 7 and out["claiming_answers"] == 5
    assert out["claiming_answer_rate"] == round(5 / 7, 4)
    assert out["hallucinated_answer_rate"] == 0.6
    by = out["hallucination_by_channel"]
    assert by["presence"] == {"claims": 2, "hallucinated": 1, "rate": 0.5, "expected": 1, "recalled": 1, "recall": 1.0}
    assert by["text"] == {"claims": 3, "hallucinated": 1, "rate": 0.3333, "expected": 2, "recalled": 2, "recall": 1.0}
    assert by["count"] == {"claims": 1, "hallucinated": 1, "rate": 1.0, "expected": 1, "recalled": 0, "recall": 0.0}


def test_saying_less_keeps_precision_but_loses_recall_and_f1() -> None:
    """A model that answers "no" to every presence question and names nothing never hallucinates, but it finds
    nothing: precision undefined (no claims), recall 0; answering only what it is sure of (row 0's "yes")
    gives precision 1, recall 1/4, F1 = 2 · 1 · 0.25 / 1.25 = 0.4."""
    silent = ["no", "no", "no", "ct of the chest.", "none", "0", "0", "yes", "nodule"]
    out = hallucination(ROWS, silent)
    assert out["hallucination_rate"] is None and out["finding_recall"] == 0.0 and out["hallucination_f1"] is None
    assert out["hallucinated_answer_rate"] is None and out["claiming_answer_rate"] == 0.0
    cautious = ["yes", *silent[1:]]
    out = hallucination(ROWS, cautious)
    assert (out["claim_precision"], out["finding_recall"], out["hallucination_f1"]) == (1.0, 0.25, 0.4)
    assert out["hallucinated_answer_rate"] == 0.0


def test_hallucination_without_claims_or_ground_truth() -> None:
    rows = [_row("is there a mass?", "no", "closed", "presence", [])]
    out = hallucination(rows, ["no"])
    assert out["hallucination_rate"] is None and out["hallucinated_answer_rate"] is None  # no answer claims
    assert out["finding_recall"] is None and out["claiming_answer_rate"] == 0.0  # nothing to find, nothing said
    assert hallucination([ROWS[-1]], ["nodule"]) == {}  # real data: nothing to check against


def test_bleu_and_rouge_l_by_hand() -> None:
    # all n-gram precisions are 1 (4 unigrams ... 1 four-gram); brevity penalty exp(1 - 6/4)
    assert bleu(["the cat sat on"], ["the cat sat on the mat"]) == round(math.exp(-0.5), 4)
    assert bleu(["The cat sat on the mat."], ["the cat sat on the mat."]) == 1.0  # lower-cased
    # LCS 4: P = 4/4, R = 4/6 -> F = 0.8; "mat the" vs "the mat": LCS 1, P = R = 1/2 -> F = 0.5
    assert rouge_l(["the cat sat on", "mat the"], ["the cat sat on the mat", "the mat"]) == 0.65
    assert bleu([], []) is None and rouge_l([], []) is None


def test_report_scores_only_reports() -> None:
    rows = [_row("describe.", "the cat sat on the mat", "report", "report"), _row("q", "yes", "closed", "x")]
    out = report_scores(rows, ["the cat sat on", "no"])
    assert out == {"report_n": 1, "report_bleu": 0.6065, "report_rouge_l": 0.8}
    assert report_scores(rows[1:], ["no"]) == {}


def test_group_scores_per_source_by_hand() -> None:
    rows = [
        _row("q1", "yes", "closed", "presence", source="a"),
        _row("q2", "no", "closed", "presence", source="a"),
        _row("q3", "left lung", "open", "location", source="a"),
        _row("q4", "ct", "open", "modality", source="b"),
        _row("q5", "ct of the chest", "report", "report", source="b"),
    ]
    preds = ["Yes", "yes", "the left side", "CT", "ct"]
    out = group_scores(rows, preds, lambda r: r["source"])
    assert out["a"] == {"n": 3, "closed_n": 2, "closed_accuracy": 0.5, "open_n": 1, "open_recall": 0.5,
                        "report_n": 0, "report_recall": None}  # fmt: skip
    # q5: "ct of chest" (article dropped) -> 1 of 3 words found
    assert out["b"] == {"n": 2, "closed_n": 0, "closed_accuracy": None, "open_n": 1, "open_recall": 1.0,
                        "report_n": 1, "report_recall": 0.3333}  # fmt: skip


def test_reliance_gap_by_hand() -> None:
    image = {"closed_accuracy": 0.8, "open_recall": 0.5, "presence_accuracy": 0.75}
    blank = {"closed_accuracy": 0.55, "open_recall": 0.1, "presence_accuracy": None, "presence_yes_rate": 1.0}
    assert reliance_gap(image, blank) == {
        "reliance_gap_closed_accuracy": 0.25, "reliance_gap_open_recall": 0.4,
        "reliance_gap_presence_accuracy": None, "blank_presence_yes_rate": 1.0,
    }  # fmt: skip


def test_model_metrics_has_every_section() -> None:
    out = model_metrics(ROWS, PREDICTIONS)
    assert out["n"] == 9
    # closed rows: 3 presence (hit: yes/yes, miss: no/"Yes.", hit: no/no) + modality (hit) -> 3 / 4
    assert out["closed_accuracy"] == 0.75
    assert out["presence_yes_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert set(out["per_source"]) == {"synthmed", "vqa_rad"}
    assert out["report_n"] == 1 and out["hallucination_rate"] == 0.5
    assert out["per_type"]["presence"] == {"n": 3, "score": pytest.approx(2 / 3, abs=1e-4)}


def test_strict_closed_match_rescores_closed_rows_only() -> None:
    rows = [
        _row("is there a mass?", "yes", "closed", "presence", _f("mass")),
        _row("is there a cyst?", "no", "closed", "presence", _f("mass")),
        _row("is this a ct scan?", "yes", "closed", "modality", _f("mass")),
        _row("what abnormality is seen?", "mass", "open", "abnormality", _f("mass")),
    ]
    preds = ["yes or no", "no", "yes", "a mass"]
    contains = model_metrics(rows, preds)
    # contains: the hedge hits -> 3 / 3; strict: it misses -> 2 / 3; presence type 2/2 -> 1/2
    assert contains["closed_accuracy"] == 1.0 and contains["closed_match"] == "contains"
    assert "closed_accuracy_contains" not in contains
    strict = model_metrics(rows, preds, closed_match="strict")
    assert strict["closed_accuracy"] == 0.6667 and strict["closed_accuracy_contains"] == 1.0
    assert strict["per_type"]["presence"] == {"n": 2, "score": 0.5}
    assert strict["per_type"]["abnormality"] == contains["per_type"]["abnormality"]  # open rows unchanged
    assert strict["per_source"]["synthmed"]["closed_accuracy"] == 0.6667
    assert strict["open_recall"] == contains["open_recall"] == 1.0


def test_row_records() -> None:
    records = row_records(ROWS[:2], PREDICTIONS[:2], model="base", view="image")
    assert records[1]["model"] == "base" and records[1]["view"] == "image"
    assert records[1]["score"] == 0.0 and records[1]["claims"] == ["cyst"] and records[1]["hallucinated"] == ["cyst"]
