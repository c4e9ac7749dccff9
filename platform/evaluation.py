"""Answering a test set with a model and scoring it with the LLaVA-Med protocol (hscr.metrics).

Closed (yes/no) questions score accuracy, open ones token recall (reports too, until BLEU/ROUGE are added).
On SynthMed presence questions, the bias figures: how often the model says "yes" against how often the truth is
"yes", and the false-"yes" rate (a "yes" when the finding is absent) — the language prior at work.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hscr.metrics import closed_hit, first_yes_no, normalize_answer, open_recall
from hscr_platform.io import iter_rows
from hscr_platform.models import ModelConfig, generate_answers, load_vlm, open_image


def answer_rows(
    model: Any, processor: Any, rows: Sequence[dict], *, batch_size: int, max_new_tokens: int
) -> list[str]:
    """The model's greedy answer to every row (image bytes + question), batched, with a progress bar."""
    answers: list[str] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="answering", unit="batch", leave=False):
        chunk = rows[start : start + batch_size]
        images = [open_image(r["image"]) for r in chunk]
        answers += generate_answers(
            model, processor, images, [r["question"] for r in chunk], max_new_tokens=max_new_tokens
        )
    return answers


def score_row(row: dict, prediction: str) -> float:
    """1/0 for a closed question (accuracy), token recall in [0, 1] for open and report answers."""
    if row["answer_type"] == "closed":
        return float(closed_hit(prediction, row["answer"]))
    return open_recall(prediction, row["answer"])


def summarize(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, Any]:
    """Overall and per-question-type scores, plus the yes-bias figures on closed yes/no questions."""
    by_type: dict[str, list[float]] = defaultdict(list)
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    for row, pred in zip(rows, predictions, strict=True):
        score = score_row(row, pred)
        by_type[row.get("question_type") or row["answer_type"]].append(score)
        by_answer_type[row["answer_type"]].append(score)
    metrics: dict[str, Any] = {
        "n": len(rows),
        "closed_accuracy": _mean(by_answer_type.get("closed", [])),
        "open_recall": _mean(by_answer_type.get("open", [])),
        "report_recall": _mean(by_answer_type.get("report", [])),
        "per_type": {t: {"n": len(v), "score": _mean(v)} for t, v in sorted(by_type.items())},
    }
    metrics.update(yes_bias(rows, predictions))
    return metrics


def yes_bias(rows: Sequence[dict], predictions: Sequence[str], *, types: Iterable[str] = ("presence",)) -> dict:
    """On yes/no questions of the given types: predicted vs true "yes" rates and the false-"yes" rate."""
    wanted = set(types)
    pairs = [
        (normalize_answer(r["answer"]), first_yes_no(p))
        for r, p in zip(rows, predictions, strict=True)
        if r.get("question_type") in wanted and normalize_answer(r["answer"]) in ("yes", "no")
    ]
    if not pairs:
        return {}
    negatives = [pred for truth, pred in pairs if truth == "no"]
    return {
        "presence_n": len(pairs),
        "presence_accuracy": _mean([float(truth == pred) for truth, pred in pairs]),
        "presence_yes_rate": _mean([float(pred == "yes") for _, pred in pairs]),
        "presence_truth_yes_rate": _mean([float(truth == "yes") for truth, _ in pairs]),
        "presence_false_yes_rate": _mean([float(pred == "yes") for pred in negatives]),
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate_folder(
    model_dir: str | Path, data_dir: str | Path, *, samples: int, batch_size: int, max_new_tokens: int
) -> dict[str, Any]:
    """Load a model folder, answer the first ``samples`` rows of a sample dataset, score them."""
    model, processor = load_vlm(ModelConfig(path=str(model_dir)))
    rows = list(itertools.islice(iter_rows(data_dir), samples))
    predictions = answer_rows(model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    examples = [
        {"question": r["question"], "answer": r["answer"], "prediction": p, "question_type": r["question_type"]}
        for r, p in zip(rows[:24], predictions, strict=False)
    ]
    return {"metrics": summarize(rows, predictions), "examples": examples}
