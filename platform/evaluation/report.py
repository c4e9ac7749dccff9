"""The evaluation job's report: a markdown comparison table, results JSON and PNG plots, models side by side.

Functions of the metrics dicts that ``hscr_platform.evaluation.metrics.model_metrics`` returns, keyed by model name.

    table.md          main metrics (rows) x models (columns), then per source and per question type
    results.json      everything: per model, with the image and with the image blanked
    per_type.png      grouped bars: one group per question type, one bar per model
    presence_yes.png  per model: how often it says "yes" to presence questions vs how often that is true
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Results = Mapping[str, Mapping[str, Any]]  # model name -> its metrics

# (label, key) of the main table, in order; a row whose key no model has is left out.
MAIN_ROWS: tuple[tuple[str, str], ...] = (
    ("rows", "n"),
    ("closed-question match", "closed_match"),
    ("closed accuracy", "closed_accuracy"),
    ("closed accuracy, contains rule", "closed_accuracy_contains"),  # shown when closed_match is strict
    ("open recall", "open_recall"),
    ("report recall", "report_recall"),
    ("report BLEU", "report_bleu"),
    ("report ROUGE-L", "report_rouge_l"),
    ("presence accuracy", "presence_accuracy"),
    ("presence: says yes", "presence_yes_rate"),
    ("presence: truth is yes", "presence_truth_yes_rate"),
    ("presence: false yes", "presence_false_yes_rate"),
    ("hallucination rate (claims)", "hallucination_rate"),
    ("claim precision (1 - hallucination rate)", "claim_precision"),
    ("finding recall", "finding_recall"),
    ("hallucination F1 (claim precision, finding recall)", "hallucination_f1"),
    ("answers that make a claim", "claiming_answer_rate"),
    ("answers with a hallucination (of those that claim)", "hallucinated_answer_rate"),
    ("image-reliance gap, closed acc. (secondary)", "reliance_gap_closed_accuracy"),
    ("image-reliance gap, open recall (secondary)", "reliance_gap_open_recall"),
    ("blank image: says yes", "blank_presence_yes_rate"),
    ("answers / s (its Ray Data pass)", "answers_per_s"),
)


def fmt(value: Any) -> str:
    """A table cell: "-" for missing, integers as they are, other numbers with 3 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main_table(results: Results) -> list[str]:
    """Metrics as rows, models as columns."""
    models = list(results)
    rows = [
        [label, *(fmt(results[m].get(key)) for m in models)]
        for label, key in MAIN_ROWS
        if any(results[m].get(key) is not None for m in models)
    ]
    return _table(["metric", *models], rows)


def _union(results: Results, section: str) -> list[str]:
    return sorted({name for m in results.values() for name in m.get(section, {})})


SOURCE_ROWS = (
    ("closed accuracy", "closed_accuracy"),
    ("open recall", "open_recall"),
    ("report recall", "report_recall"),
)


def source_table(results: Results) -> list[str]:
    """Per dataset (``source``): closed accuracy and open recall of each model (the LLaVA-Med pair), and the
    report recall where there are reports; a metric no model has for a source is left out."""
    models, rows = list(results), []
    for source in _union(results, "per_source"):
        for label, key in SOURCE_ROWS:
            cells = [results[m].get("per_source", {}).get(source, {}).get(key) for m in models]
            if any(c is not None for c in cells):
                rows.append([source, label, *map(fmt, cells)])
    return _table(["source", "metric", *models], rows)


def type_table(results: Results) -> list[str]:
    """Per question type: rows and each model's score (accuracy for closed types, recall for open ones)."""
    models, rows = list(results), []
    for qtype in _union(results, "per_type"):
        entries = [results[m].get("per_type", {}).get(qtype, {}) for m in models]
        n = next((e["n"] for e in entries if e), None)
        rows.append([qtype, fmt(n), *(fmt(e.get("score")) for e in entries)])
    return _table(["question type", "n", *models], rows)


def markdown_report(results: Results, *, title: str = "Evaluation") -> str:
    """The whole comparison as markdown: main table, per source, per question type."""
    parts = [f"# {title}", "", *main_table(results), "", "## Per source", "", *source_table(results)]
    parts += ["", "## Per question type", "", *type_table(results), ""]
    return "\n".join(parts)


def write_json(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    return path


# --- plots ---------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> None:
    """Bars of each series side by side within each group (missing values drawn as 0 height)."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in values], width=width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the plot, not on bars


def plot_per_type(results: Results, out_png: str | Path) -> Path:
    """One group per question type, one bar per model: the type's score (accuracy or recall)."""
    plt = _pyplot()
    types = _union(results, "per_type")
    series = {m: [r.get("per_type", {}).get(t, {}).get("score") for t in types] for m, r in results.items()}
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(types) * max(1, len(series))), 3.5))
    _grouped_bars(ax, types, series)
    ax.set_title("score per question type")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_presence_yes(results: Results, out_png: str | Path) -> Path:
    """Per model: "says yes" and "false yes" on presence questions (and with a blank image, when measured);
    the dashed line is how often "yes" is the truth (a model without bias says yes that often)."""
    plt = _pyplot()
    models = list(results)
    keys = {"says yes": "presence_yes_rate", "false yes": "presence_false_yes_rate"}
    if any(r.get("blank_presence_yes_rate") is not None for r in results.values()):
        keys["says yes, blank image"] = "blank_presence_yes_rate"
    series = {label: [results[m].get(key) for m in models] for label, key in keys.items()}
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(models) + 2), 3.5))
    _grouped_bars(ax, models, series)
    truths = [r.get("presence_truth_yes_rate") for r in results.values()]
    truth = next((t for t in truths if t is not None), None)
    if truth is not None:
        ax.axhline(truth, color="black", linestyle="--", linewidth=1, label="truth is yes")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("presence questions: yes-rate vs truth")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def write_report(out_dir: str | Path, results: Results, payload: Mapping[str, Any]) -> dict[str, Path]:
    """table.md, results.json (``payload``) and the PNGs into ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "table.md"
    table.write_text(markdown_report(results))
    files = {"table": table, "results": write_json(out / "results.json", payload)}
    files["per_type"] = plot_per_type(results, out / "per_type.png")
    if any(r.get("presence_yes_rate") is not None for r in results.values()):
        files["presence_yes"] = plot_presence_yes(results, out / "presence_yes.png")
    return files


# --- MLflow metric names ------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_./ -]")  # MLflow metric names allow these characters only


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def flat_metrics(results: Results) -> dict[str, float]:
    """Every number as ``<model>.<metric>``, per-type scores as ``<model>.type.<type>``, per-source pairs as
    ``<model>.source.<source>.<closed_accuracy|open_recall|report_recall>``, hallucination channels as
    ``<model>.hallucination.<channel>`` (claim rate) and ``<model>.finding_recall.<channel>``; missing values
    (``None``) are left out."""
    out: dict[str, float] = {}
    for model, m in results.items():
        out.update({f"{model}.{k}": v for k, v in m.items() if _number(v)})
        out.update({f"{model}.type.{t}": e.get("score") for t, e in m.get("per_type", {}).items()})
        for source, e in m.get("per_source", {}).items():
            out.update({f"{model}.source.{source}.{k}": e.get(k) for _, k in SOURCE_ROWS})
        for channel, e in m.get("hallucination_by_channel", {}).items():
            out[f"{model}.hallucination.{channel}"] = e.get("rate")
            out[f"{model}.finding_recall.{channel}"] = e.get("recall")
    return {_UNSAFE.sub("_", k): float(v) for k, v in out.items() if _number(v)}
