"""The pipeline report's preference-data table: levels per question type, by hand."""

from __future__ import annotations


def test_levels_table_counts_rows_per_number_of_levels():
    from hscr_platform.pipeline import levels_table

    generation = {"by_question_type": {
        "instruct_compare": {"rows": 478, "preferences": 214, "yield": 0.4477, "num_levels": {"1": 191, "2": 22,
                                                                                             "3": 1}},
        "instruct_describe": {"rows": 506, "preferences": 197, "yield": 0.3893, "num_levels": {"1": 197}},
    }}  # fmt: skip
    lines = levels_table(generation)
    assert lines[2] == "| question type | rows | preferences | yield | 1 level | 2 levels | 3 levels |"
    assert lines[3] == "|---|---|---|---|---|---|---|"
    assert lines[4] == "| instruct_compare | 478 | 214 | 0.448 | 191 | 22 | 1 |"
    assert lines[5] == "| instruct_describe | 506 | 197 | 0.389 | 197 | 0 | 0 |"  # a missing level count is 0
    assert levels_table({}) == [] and levels_table({"by_question_type": {}}) == []
