"""Small-sample statistics for comparing methods over seeds: means with Student-t confidence intervals.

With n seeds, values x_1..x_n:

    mean  = Σ x_i / n
    std   = sqrt(Σ (x_i − mean)² / (n − 1))                 (sample standard deviation)
    CI    = mean ± t_{0.975, n−1} · std / sqrt(n)            (95%, two-sided)

A paired difference (method A − method B trained on the same seeds) uses d_i = a_i − b_i in the same formulas,
which removes the between-seed variance the two share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# t_{0.975, df}, df = 1..30 (two-sided 95%); beyond 30 the normal 1.96 is within 2%.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_critical(df: int) -> float:
    """Student's t quantile 0.975 with ``df`` degrees of freedom (the 95% two-sided factor)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its sample std and the half-width of its 95% CI (None when n < 2)."""

    mean: float
    std: float | None
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, digits: int = 3) -> str:
        """ "0.672 ± 0.012 [0.641, 0.703]" (mean ± std [95% CI]); just the mean for a single value."""
        if self.std is None or self.low is None or self.high is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def estimate(values: Sequence[float]) -> Estimate:
    """Mean, sample std and 95% t-interval of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("estimate of no values")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean=mean, std=None, half_width=None, n=1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean=mean, std=std, half_width=t_critical(n - 1) * std / math.sqrt(n), n=n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """The estimate of mean(a − b) over paired values (same seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return estimate([x - y for x, y in zip(a, b, strict=True)])
