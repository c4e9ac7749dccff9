"""The evaluation report (platform/evaluation/report.py): markdown tables, MLflow metric names, files and plots."""

from __future__ import annotations

import json
import math

from hscr_platform.evaluation.report import (
    flat_metrics,
    fmt,
    main_table,
    markdown_report,
    source_table,
    type_table,
    write_report,
)

RESULTS = {
    "base": {
        "n": 10, "closed_accuracy": 0.6, "open_recall": 0.25, "presence_yes_rate": 0.8,
        "presence_truth_yes_rate": 0.5, "presence_false_yes_rate": 0.6, "hallucination_rate": None,
        "per_type": {"presence": {"n": 6, "score": 0.5}, "count": {"n": 4, "score": 0.25}},
        "per_source": {"synthmed": {"n": 10, "closed_accuracy": 0.6, "open_recall": 0.25}},
        "hallucination_by_channel": {"text": {"claims": 0, "hallucinated": 0, "rate": None}},
        "blank_presence_yes_rate": 1.0,
    },
    "aligned": {
        "n": 10, "closed_accuracy": 0.7, "open_recall": 0.5, "presence_yes_rate": 0.5,
        "presence_truth_yes_rate": 0.5, "presence_false_yes_rate": 0.2, "hallucination_rate": 0.125,
        "claim_precision": 0.875, "finding_recall": 0.7, "hallucination_f1": 0.7778,
        "per_type": {"presence": {"n": 6, "score": 0.8333}, "count": {"n": 4, "score": 0.5}},
        "per_source": {"synthmed": {"n": 10, "closed_accuracy": 0.7, "open_recall": 0.5}},
        "hallucination_by_channel": {"text": {"claims": 8, "hallucinated": 1, "rate": 0.125, "recall": 0.7}},
        "blank_presence_yes_rate": 0.0,
    },
}  # fmt: skip


def test_fmt() -> None:
    assert [fmt(None), fmt(math.nan), fmt(3), fmt(0.12345), fmt(1.0), fmt("x")] == [
        "-",
        "-",
        "3",
        "0.123",
        "1.000",
        "x",
    ]


def test_main_table_rows_models_and_missing_values() -> None:
    lines = main_table(RESULTS)
    assert lines[:2] == ["| metric | base | aligned |", "|---|---|---|"]
    assert "| rows | 10 | 10 |" in lines
    assert "| closed accuracy | 0.600 | 0.700 |" in lines
    assert "| hallucination rate (claims) | - | 0.125 |" in lines  # one model has it: the row stays
    assert "| blank image: says yes | 1.000 | 0.000 |" in lines
    assert "| claim precision (1 - hallucination rate) | - | 0.875 |" in lines
    assert "| finding recall | - | 0.700 |" in lines
    assert "| hallucination F1 (claim precision, finding recall) | - | 0.778 |" in lines
    assert not any(line.startswith("| report BLEU") for line in lines)  # no model has it: left out


def test_source_and_type_tables() -> None:
    assert source_table(RESULTS)[2:] == [
        "| synthmed | closed accuracy | 0.600 | 0.700 |",
        "| synthmed | open recall | 0.250 | 0.500 |",
    ]
    assert type_table(RESULTS)[2:] == ["| count | 4 | 0.250 | 0.500 |", "| presence | 6 | 0.500 | 0.833 |"]
    report = markdown_report(RESULTS)
    assert report.startswith("# Evaluation") and "## Per source" in report and "## Per question type" in report


def test_flat_metrics_names() -> None:
    flat = flat_metrics({**RESULTS, "x y+z": {"n": 1, "per_type": {"a/b?": {"n": 1, "score": 0.5}}}})
    assert flat["base.closed_accuracy"] == 0.6 and flat["aligned.n"] == 10.0
    assert flat["aligned.type.presence"] == 0.8333
    assert flat["base.source.synthmed.open_recall"] == 0.25
    assert flat["aligned.hallucination.text"] == 0.125 and flat["aligned.finding_recall.text"] == 0.7
    assert flat["aligned.hallucination_f1"] == 0.7778
    assert "base.hallucination_rate" not in flat and "base.hallucination.text" not in flat  # None: left out
    assert flat["x y_z.type.a/b_"] == 0.5  # characters MLflow refuses become "_"


def test_write_report_files(tmp_path) -> None:
    files = write_report(tmp_path / "out", RESULTS, {"results": RESULTS, "rows": 10})
    assert set(files) == {"table", "results", "per_type", "presence_yes"}
    assert json.loads(files["results"].read_text())["rows"] == 10
    assert "| closed accuracy | 0.600 | 0.700 |" in files["table"].read_text()
    for name in ("per_type", "presence_yes"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_presence_plot_without_presence_questions(tmp_path) -> None:
    results = {"m": {"n": 2, "closed_accuracy": 1.0, "per_type": {"modality": {"n": 2, "score": 1.0}}}}
    assert set(write_report(tmp_path, results, {})) == {"table", "results", "per_type"}
