"""Stage 2 replacement plan and forced-token schedule (hscr/replace.py)."""

from __future__ import annotations

import pytest

from hscr.replace import edited_prefix, forced_token, replacement_plan

# y_w = [10, 11, ..., 17]; coupled positions in descending coupling: 5, 2, 7; replacements 5→95, 2→92, 7→97.
Y_W = [10, 11, 12, 13, 14, 15, 16, 17]
COUPLED = [5, 2, 7]
REPLACEMENTS = {5: 95, 2: 92, 7: 97}


def test_replacement_plan_levels_are_most_coupled_prefixes_sorted_by_position() -> None:
    assert replacement_plan(COUPLED, levels=3) == [(5,), (2, 5), (2, 5, 7)]
    assert replacement_plan(COUPLED, levels=2) == [(5,), (2, 5)]


def test_replacement_plan_with_fewer_coupled_positions_than_levels() -> None:
    assert replacement_plan(COUPLED, levels=10) == [(5,), (2, 5), (2, 5, 7)]
    assert replacement_plan([], levels=3) == []
    with pytest.raises(ValueError, match="levels"):
        replacement_plan(COUPLED, levels=0)


def test_edited_prefix_keeps_reference_between_replacements_and_stops_at_last() -> None:
    plan = replacement_plan(COUPLED, levels=3)
    level = [{p: REPLACEMENTS[p] for p in positions} for positions in plan]
    assert edited_prefix(Y_W, replacements=level[0]) == [10, 11, 12, 13, 14, 95]
    assert edited_prefix(Y_W, replacements=level[1]) == [10, 11, 92, 13, 14, 95]
    assert edited_prefix(Y_W, replacements=level[2]) == [10, 11, 92, 13, 14, 95, 16, 97]


def test_edited_prefix_rejects_bad_replacements() -> None:
    with pytest.raises(ValueError, match="at least one"):
        edited_prefix(Y_W, replacements={})
    with pytest.raises(ValueError, match="outside"):
        edited_prefix(Y_W, replacements={8: 99})
    with pytest.raises(ValueError, match="equals the original"):
        edited_prefix(Y_W, replacements={3: 13})


def test_forced_token_schedule_then_free_decoding() -> None:
    forced = dict(enumerate([10, 11, 92, 13, 14, 95]))
    # Prompt of 100 tokens: sequence index 102 is response position 2.
    assert forced_token(102, prefix_len=100, forced=forced) == 92
    assert forced_token(105, prefix_len=100, forced=forced) == 95
    assert forced_token(106, prefix_len=100, forced=forced) is None
    # Forcing only the replacements leaves the positions between them free.
    sparse = {2: 92, 5: 95}
    assert forced_token(103, prefix_len=100, forced=sparse) is None
    assert forced_token(105, prefix_len=100, forced=sparse) == 95
    with pytest.raises(ValueError, match="inside the prompt"):
        forced_token(99, prefix_len=100, forced=forced)
