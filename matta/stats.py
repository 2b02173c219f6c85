"""Small-sample statistics for studies over a few seeds: mean, spread, paired t-intervals.

The Student t distribution is evaluated exactly for integer degrees of freedom with the
closed-form finite sums of its CDF (Abramowitz & Stegun 26.7.3-4), and its quantiles by
bisection on that CDF, so no SciPy is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` (a positive int) degrees of freedom."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive int, got {df!r}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    # A(|t|) = P(-|t| < T < |t|) as a finite series in cos^2(theta).
    if df % 2:  # odd: (2/pi) (theta + sin(theta) sum_k a_k cos^(2k+1)(theta)), a_k = a_(k-1) 2k/(2k+1)
        series, term = 0.0, math.cos(theta)
        for k in range((df - 1) // 2):
            if k:
                term *= 2 * k / (2 * k + 1) * c2
            series += term
        inside = 2.0 / math.pi * (theta + s * series)
    else:  # even: sin(theta) sum_k b_k cos^(2k)(theta), b_k = b_(k-1) (2k-1)/(2k)
        series, term = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            series += term
        inside = s * series
    upper = 0.5 * (1.0 - inside)
    return 1.0 - upper if t >= 0 else upper


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences with its two-sided t confidence interval (None bounds: n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def below_zero(self) -> bool:
        """The whole interval is negative (a lower loss, if the differences are losses)."""
        return self.high is not None and self.high < 0

    def above_zero(self) -> bool:
        return self.low is not None and self.low > 0


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The per-pair differences a_i - b_i: their mean and a t-interval at `level`."""
    if len(a) != len(b):
        raise ValueError(f"paired values must come in pairs, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], level)


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of `values` with a two-sided t-interval at `level` (none for one value)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return Interval(mean, None, None, n, level)
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)
