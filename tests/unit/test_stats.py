"""Means over seeds with Student-t intervals (hscr/stats.py), against hand-computed numbers."""

from __future__ import annotations

import pytest

from hscr.stats import estimate, paired_difference, t_critical


def test_t_critical_values():
    assert t_critical(1) == 12.706 and t_critical(2) == 4.303 and t_critical(30) == 2.042
    assert t_critical(200) == 1.96
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical(0)


def test_estimate_of_three_seeds():
    # mean 0.7; std sqrt((0.01 + 0 + 0.01) / 2) = 0.1; half-width 4.303 * 0.1 / sqrt(3) = 0.248434
    est = estimate([0.6, 0.7, 0.8])
    assert est.mean == pytest.approx(0.7) and est.std == pytest.approx(0.1)
    assert est.half_width == pytest.approx(0.248434, abs=1e-6)
    assert (est.low, est.high) == (pytest.approx(0.451566, abs=1e-6), pytest.approx(0.948434, abs=1e-6))
    assert est.text() == "0.700 ± 0.100 [0.452, 0.948]"


def test_single_value_has_no_interval():
    est = estimate([0.5])
    assert (est.std, est.half_width, est.low) == (None, None, None) and est.text() == "0.500"
    with pytest.raises(ValueError):
        estimate([])


def test_paired_difference_removes_the_shared_seed_variance():
    # d = (0.02, 0.02, -0.01): mean 0.01, std sqrt((1e-4 + 1e-4 + 4e-4) / 2) = 0.017321, half 4.303 * 0.01
    diff = paired_difference([0.70, 0.72, 0.69], [0.68, 0.70, 0.70])
    assert diff.mean == pytest.approx(0.01) and diff.std == pytest.approx(0.0173205, abs=1e-6)
    assert diff.half_width == pytest.approx(0.04303, abs=1e-6)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])
