"""Per-question-type counts of a generation run: rows, preference rows, yield and levels (summary.json)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def by_question_type(states: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per input question type: rows, preference rows, and the histogram of their number of levels (1 + k)."""
    out: dict[str, dict[str, Any]] = {}
    for state in states:
        entry = out.setdefault(str(state.get("question_type") or "unknown"), {"rows": 0, "preferences": 0,
                                                                             "num_levels": {}})  # fmt: skip
        entry["rows"] += 1
        if "preference" in state:
            entry["preferences"] += 1
            levels = str(state["preference"]["num_levels"])
            entry["num_levels"][levels] = entry["num_levels"].get(levels, 0) + 1
    return out


def merge_by_question_type(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The chunks' per-type counts added up, with each type's preference yield (preferences / rows)."""
    rows: Counter[str] = Counter()
    prefs: Counter[str] = Counter()
    levels: dict[str, Counter[str]] = {}
    for entry in entries:
        for qtype, counts in entry.get("by_question_type", {}).items():
            rows[qtype] += counts["rows"]
            prefs[qtype] += counts["preferences"]
            levels.setdefault(qtype, Counter()).update(counts["num_levels"])
    return {qtype: {"rows": rows[qtype], "preferences": prefs[qtype],
                    "yield": round(prefs[qtype] / rows[qtype], 4) if rows[qtype] else 0.0,
                    "num_levels": dict(sorted(levels[qtype].items()))} for qtype in sorted(rows)}  # fmt: skip
