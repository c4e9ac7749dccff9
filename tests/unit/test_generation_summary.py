"""summary.json's per-question-type yield and levels (platform/generation/graph.py)."""

from __future__ import annotations

from hscr_platform.generation.summary import by_question_type, merge_by_question_type


def _pref(levels: int) -> dict:
    return {"preference": {"num_levels": levels}}


def test_levels_and_yield_per_question_type():
    chunk_a = [{"question_type": "instruct_describe", **_pref(4)}, {"question_type": "instruct_describe", **_pref(2)},
               {"question_type": "presence", "reject": {"reason": "no_preference"}}]  # fmt: skip
    chunk_b = [{"question_type": "instruct_describe", **_pref(4)}, {"question_type": None, "reject": {}},
               {"question_type": "presence", **_pref(2)}]  # fmt: skip
    merged = merge_by_question_type([{"by_question_type": by_question_type(c)} for c in (chunk_a, chunk_b)])
    assert merged == {
        "instruct_describe": {"rows": 3, "preferences": 3, "yield": 1.0, "num_levels": {"2": 1, "4": 2}},
        "presence": {"rows": 2, "preferences": 1, "yield": 0.5, "num_levels": {"2": 1}},
        "unknown": {"rows": 1, "preferences": 0, "yield": 0.0, "num_levels": {}},
    }
    assert merge_by_question_type([{"chunk": 0}]) == {}  # a manifest written before the field existed
