"""Similarity-aware re-ranking (hscr/rerank.py), worked by hand.

Greedy rule: sort descending (ties keep candidate order), keep the first, then keep a candidate iff
``last_kept − s ≥ min_gap``, stop after k.
"""

from __future__ import annotations

import math

import pytest
import torch

from hscr.rerank import cosine_similarity, coupled_recall, lexical_similarity, select_levels


def test_select_levels_worked_example() -> None:
    # Sorted: 0.95 (0) keep; 0.9 (1): 0.95 − 0.9 = 0.05 < 0.1 skip; 0.7 (2): 0.95 − 0.7 = 0.25 keep;
    # 0.65 (3): 0.7 − 0.65 = 0.05 skip; 0.3 (4): 0.7 − 0.3 = 0.4 keep → [0, 2, 4].
    assert select_levels([0.95, 0.9, 0.7, 0.65, 0.3], k=3, min_gap=0.1) == [0, 2, 4]


def test_select_levels_unsorted_input_returns_rank_order() -> None:
    # Sorted: 0.95 (1) keep; 0.9 (3): gap 0.05 skip; 0.7 (2): gap 0.25 keep; 0.3 (0): gap 0.4 keep.
    assert select_levels(torch.tensor([0.3, 0.95, 0.7, 0.9]), k=3, min_gap=0.1) == [1, 2, 0]


def test_select_levels_stops_at_k_and_keeps_fewer_when_gaps_fail() -> None:
    assert select_levels([0.9, 0.7, 0.5, 0.3], k=2, min_gap=0.1) == [0, 1]
    # 0.9 keep; 0.85 gap 0.05 skip; 0.82 gap 0.08 skip → only one level.
    assert select_levels([0.9, 0.85, 0.82], k=3, min_gap=0.1) == [0]
    assert select_levels([], k=3, min_gap=0.1) == []
    assert select_levels([0.9, 0.5], k=0, min_gap=0.1) == []


def test_select_levels_gap_is_measured_from_last_kept_not_last_seen() -> None:
    # 0.9 keep; 0.85 skip (0.05); 0.78: 0.9 − 0.78 = 0.12 keep (from 0.85 it would be only 0.07);
    # 0.75: 0.78 − 0.75 = 0.03 skip.
    assert select_levels([0.9, 0.85, 0.78, 0.75], k=3, min_gap=0.1) == [0, 2]


def test_select_levels_ties_and_decimal_exact_gap() -> None:
    # Tie at 0.8: candidate 0 first; candidate 1 gap 0 skip; 0.5 gap 0.3 keep.
    assert select_levels([0.8, 0.8, 0.5], k=3, min_gap=0.1) == [0, 2]
    # With min_gap 0 a tie qualifies: lower index first.
    assert select_levels([0.5, 0.8, 0.8], k=3, min_gap=0.0) == [1, 2, 0]
    # 0.95 − 0.85 is 0.09999999999999998 in floats; a decimal gap of exactly 0.1 counts.
    assert select_levels([0.95, 0.85], k=3, min_gap=0.1) == [0, 1]


def test_select_levels_drops_near_copies_and_nans() -> None:
    assert select_levels([1.0, 0.9, math.nan, 0.7], k=3, min_gap=0.1, max_similarity=0.99) == [1, 3]


def test_default_ceiling_drops_copies_and_keeps_a_one_word_finding_change() -> None:
    # HscrConfig.max_similarity = 0.999: "a cyst in the lower part" vs "... upper part" scores 0.99 with MiniLM
    # and stays; a candidate the embedding cannot tell from y_w (1.0) goes.
    assert select_levels([1.0, 0.99, 0.8], k=3, min_gap=0.1, max_similarity=0.999) == [1, 2]


def test_lexical_similarity_token_f1() -> None:
    a = ["there", "is", "a", "nodule", "on", "the", "left"]
    b = ["there", "is", "a", "mass", "on", "the", "left"]
    # overlap 6 of 7 on each side: P = R = 6/7 → F1 = 6/7 = 0.857143
    assert lexical_similarity(a, b) == pytest.approx(0.857143, abs=1e-6)
    # Multiset: a = [yes, yes], b = [yes]: overlap 1, P = 1/2, R = 1 → F1 = 2·(1/2)/(3/2) = 2/3
    assert lexical_similarity(["yes", "yes"], ["yes"]) == pytest.approx(0.666667, abs=1e-6)
    # Order is ignored; ids work as well as strings.
    assert lexical_similarity([1, 2, 3], [3, 2, 1]) == 1.0
    assert lexical_similarity([], []) == 1.0
    assert lexical_similarity(["a"], []) == 0.0
    assert lexical_similarity(["a"], ["b"]) == 0.0


def test_cosine_similarity() -> None:
    # [1, 0]·[1, 1] / (1 · √2) = 0.707107; [0, 2] vs [1, 1] same; [1, 0] vs [−1, 0] = −1.
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(cosine_similarity(a, b), torch.tensor([0.707107, 0.707107, -1.0]))
    # One reference against many candidates (broadcast), and a zero vector gives 0.
    torch.testing.assert_close(cosine_similarity(torch.tensor([1.0, 0.0]), a[:2]), torch.tensor([1.0, 0.0]))
    assert float(cosine_similarity(torch.zeros(2), torch.tensor([1.0, 0.0]))) == 0.0


def test_coupled_recall_hand_computed() -> None:
    # y_w = "a b c d e" (positions 0..4), coupled positions [3, 1, 4] (n = 3).
    ref = list("abcde")
    # Level 1 replaces position 3 (d -> x): the prefix is "a b c x"; the continuation says "e" → lost {3}: 1 − 1/3.
    assert coupled_recall(ref, [3, 1, 4], [3], list("abcxe")) == pytest.approx(2 / 3)
    # The continuation drops "e" (says "f"): lost {3, 4} → 1/3.
    assert coupled_recall(ref, [3, 1, 4], [3], list("abcxf")) == pytest.approx(1 / 3)
    # Position 1 (b) sits inside the prefix and was not replaced: kept by construction even if "b" is said no more.
    assert coupled_recall(ref, [3, 1, 4], [1, 3], list("ayczf")) == pytest.approx(0.0)  # lost 1, 3 and 4
    # A coupled token after the prefix is matched once per occurrence: y_w = "a b b", coupled [1, 2], level
    # replaces 1 → prefix "a x"; the continuation "b" keeps position 2's "b": lost {1} → 1/2.
    assert coupled_recall(list("abb"), [1, 2], [1], list("axb")) == pytest.approx(0.5)
    # Level m loses at least its m replacements: at most 1 − m/n, so levels stay 1/n apart.
    assert coupled_recall(ref, [3, 1, 4], [1, 3, 4], list("aycze")) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one coupled"):
        coupled_recall(ref, [], [1], ref)
    with pytest.raises(ValueError, match="non-empty subset"):
        coupled_recall(ref, [3, 1], [2], ref)
    with pytest.raises(ValueError, match="shorter than its edited prefix"):
        coupled_recall(ref, [3, 1], [3], list("ab"))
