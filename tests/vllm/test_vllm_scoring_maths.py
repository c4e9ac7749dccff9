"""The vLLM scorer's maths on hand-made top-K log-probs (no engine): the log-prob shift, the plausible set from
the full view's top-K, the K-th dropped log-prob as the bound of the tokens vLLM did not return, and the counts
of what was only bounded. V = 6 tokens, K = 2, β = 1, α = 0.65 (plausible: p ≥ 0.65 · max p).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from hscr_platform.generation.scoring import ExcludedTokens, HscrConfig
from hscr_platform.generation.vllm_scoring import SparseView, VllmScoreStats, score_from_logprobs, sparse_view

L = math.log


def _view(*rows: dict[int, float]) -> SparseView:
    return SparseView([{t: L(p) for t, p in row.items()} for row in rows])


def test_shift_replacements_and_bounds_by_hand():
    response = [3, 4]
    # position 0: full top-2 {0: .5, 1: .3} + emitted 3; dropped top-2 {1: .6, 2: .2} + emitted 3
    # position 1: full top-2 {0: .4, 2: .35} + emitted 4; dropped top-2 {2: .5, 5: .3} + emitted 4
    full = _view({0: 0.5, 1: 0.3, 3: 0.05}, {0: 0.4, 2: 0.35, 4: 0.01})
    dropped = _view({1: 0.6, 2: 0.2, 3: 0.1}, {2: 0.5, 5: 0.3, 4: 0.04})
    cfg = replace(HscrConfig(), beta=1.0, alpha=0.65, shift="logprob")
    stats = VllmScoreStats()
    scored = score_from_logprobs(
        full, dropped, response, vocab=6, cfg=cfg, excluded=ExcludedTokens(frozenset(), frozenset()), top_k=2,
        stats=stats,
    )  # fmt: skip
    # Δ_t = log p[y] − log p'[y]: log(.05/.1) = −0.693, log(.01/.04) = −1.386 -> position 0 is the more coupled
    assert scored.shift == pytest.approx([L(0.5), L(0.25)], abs=1e-6)
    assert scored.coupled == [0, 1]
    # position 0: plausible = {0} (.3 < .65 · .5); its dropped log-prob is unknown -> bounded by the 2nd best, .2
    # position 1: plausible = {0, 2}; scores 2 log p − log p': token 0 2·log .4 − log .3 (bound) = −0.629,
    #   token 2 2·log .35 − log .5 = −1.406 (known) -> token 2, exact
    assert scored.replacements == {0: 0, 1: 2}
    assert scored.levels == [(0,), (0, 1)]
    assert scored.reward == pytest.approx([0.0, 0.0])  # the emitted tokens are implausible: P_diff = 0
    # only position 1's 2nd best full token (.35 ≥ .65 · .4) is plausible: its plausible set may go on past K
    assert (stats.positions, stats.truncated_plausible, stats.replacements, stats.bounded_replacements) == (2, 1, 2, 1)


def test_sparse_view_takes_the_response_rows_and_checks_their_count():
    class Lp:
        def __init__(self, value: float):
            self.logprob = value

    rows = [None, {5: Lp(-1.0)}, {1: Lp(-0.5), 2: Lp(-2.0)}]  # vLLM: None for the first prompt token
    assert sparse_view(rows, 2).rows == [{5: -1.0}, {1: -0.5, 2: -2.0}]
    with pytest.raises(ValueError, match="3-token response"):
        sparse_view(rows, 3)


def test_the_demo_base_model_keeps_a_head_size_vllm_cpu_runs():
    """vLLM-CPU's attention takes head sizes 32, 64, 80, ... only (``CPUAttentionBackend``): the demo's toy base
    model (jobs/configs/sft/demo.yaml) must keep one, or `decoder.engine=vllm` stops working on it."""
    from pathlib import Path

    from hscr_platform.core.config import load_config
    from hscr_platform.training.sft import SftJobConfig

    repo = Path(__file__).resolve().parents[2]
    toy = load_config(SftJobConfig, repo / "jobs/configs/sft/demo.yaml").init.toy
    assert toy.text_hidden // toy.text_heads in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def test_plausible_on_the_dropped_view_uses_returned_tokens_and_the_full_views_bound():
    # The data of test_shift_replacements_and_bounds_by_hand, plausibility on the dropped view, α = 0.5.
    # position 0: dropped {1: .6, 2: .2, 3: .1}: p ≥ .3 → {1} → token 1.
    # position 1: dropped {2: .5, 5: .3, 4: .04}: p ≥ .25 → {2, 5}. Token 5 has no full-view log-prob: it is
    #   scored with the full view's bound, the 2nd best .35: 2·log .35 − log .3 = −0.896, against token 2's
    #   2·log .35 − log .5 = −1.406 → token 2. (Scored as −inf, token 5 would win on an unknown.)
    # either: position 1 adds the full view's {0, 2} (token 0: 2·log .4 − log .3 = −0.629) → still token 2.
    # full (α = .5): position 0 {0, 1}: token 0 2·log .5 − log .2 (bound) = 0.223, token 1 2·log .3 − log .6
    #   = −1.897 → token 1; position 1 {0, 2} → token 2.
    response = [3, 4]
    full = _view({0: 0.5, 1: 0.3, 3: 0.05}, {0: 0.4, 2: 0.35, 4: 0.01})
    dropped = _view({1: 0.6, 2: 0.2, 3: 0.1}, {2: 0.5, 5: 0.3, 4: 0.04})
    excluded = ExcludedTokens(frozenset(), frozenset())
    for view, expected in (("dropped", {0: 1, 1: 2}), ("either", {0: 1, 1: 2}), ("full", {0: 1, 1: 2})):
        cfg = replace(HscrConfig(), beta=1.0, alpha=0.5, shift="logprob", plausible_view=view)
        scored = score_from_logprobs(full, dropped, response, vocab=6, cfg=cfg, excluded=excluded, top_k=2)
        assert scored.replacements == expected, view
