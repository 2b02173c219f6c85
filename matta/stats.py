"""Small-sample statistics for studies over a few seeds: mean, spread, paired t-intervals,
and intervals for a standard deviation (chi-square) and a ratio of two (F).

The Student t distribution is evaluated exactly for integer degrees of freedom with the
closed-form finite sums of its CDF (Abramowitz & Stegun 26.7.3-4); the chi-square CDF is the
regularized lower incomplete gamma function (its power series), the F CDF the regularized
incomplete beta function (its continued fraction, evaluated by Lentz's method). Quantiles are
found by bisection on the CDF, so no SciPy is needed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` (a positive int) degrees of freedom."""
    _check_df(df)
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


def _check_p(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")


def _check_df(df, name: str = "degrees of freedom") -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"{name} must be a positive int, got {df!r}")


def _quantile_on_positive_axis(cdf, p: float) -> float:
    """The x >= 0 with cdf(x) = p, for a CDF increasing on [0, inf), by bisection."""
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi) or hi - lo <= 1e-300:
            break
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (0 < p < 1)."""
    _check_p(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    return _quantile_on_positive_axis(lambda t: t_cdf(t, df), p)


def chi2_cdf(x: float, df: int) -> float:
    """P(X <= x) for a chi-square variable with `df` degrees of freedom: the regularized lower
    incomplete gamma P(df/2, x/2) by its power series e^-y y^a sum_n y^n / Gamma(a + n + 1)."""
    _check_df(df)
    if math.isnan(x):
        raise ValueError("x is NaN")
    if x <= 0:
        return 0.0
    if math.isinf(x):
        return 1.0
    a, y = df / 2.0, x / 2.0
    term = total = 1.0 / a
    n = 0
    while term > 1e-17 * total:
        n += 1
        term *= y / (a + n)
        total += term
        if n > 100_000:
            raise ValueError(f"chi2_cdf did not converge for x={x!r}, df={df}")
    return min(1.0, math.exp(a * math.log(y) - y - math.lgamma(a)) * total)


@functools.lru_cache(maxsize=256)  # intervals of many samples of one size share their quantiles
def chi2_quantile(p: float, df: int) -> float:
    """The p-quantile of the chi-square distribution with `df` degrees of freedom."""
    _check_p(p)
    return _quantile_on_positive_axis(lambda x: chi2_cdf(x, df), p)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2)),
    evaluated by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ValueError(f"the incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def beta_inc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"beta_inc needs a, b > 0 and 0 <= x <= 1, got a={a!r}, b={b!r}, x={x!r}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def f_cdf(x: float, d1: int, d2: int) -> float:
    """P(F <= x) for Snedecor's F with (d1, d2) degrees of freedom."""
    _check_df(d1, "d1")
    _check_df(d2, "d2")
    if math.isnan(x):
        raise ValueError("x is NaN")
    if x <= 0:
        return 0.0
    if math.isinf(x):
        return 1.0
    return beta_inc(d1 / 2.0, d2 / 2.0, d1 * x / (d1 * x + d2))


@functools.lru_cache(maxsize=256)
def f_quantile(p: float, d1: int, d2: int) -> float:
    """The p-quantile of Snedecor's F with (d1, d2) degrees of freedom."""
    _check_p(p)
    return _quantile_on_positive_axis(lambda x: f_cdf(x, d1, d2), p)


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
    _check_level(level)
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return Interval(mean, None, None, n, level)
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


@dataclass(frozen=True)
class Spread:
    """A sample standard deviation with its two-sided chi-square interval (None bounds: n < 2)."""

    std: float
    low: float | None
    high: float | None
    n: int
    level: float


def std_interval(values: Sequence[float], level: float = 0.95) -> Spread:
    """The sample standard deviation s of `values` and the interval for sigma from
    (n - 1) s^2 / sigma^2 ~ chi-square(n - 1) (exact for normal values)."""
    _check_level(level)
    _, std = mean_std(values)
    n = len(values)
    if n < 2:
        return Spread(std, None, None, n, level)
    df, tail = n - 1, (1.0 - level) / 2
    return Spread(std, std * math.sqrt(df / chi2_quantile(1.0 - tail, df)),
                  std * math.sqrt(df / chi2_quantile(tail, df)), n, level)


@dataclass(frozen=True)
class SpreadRatio:
    """s_a / s_b, the ratio of two samples' standard deviations, with its F-interval."""

    ratio: float
    low: float | None
    high: float | None
    n_a: int
    n_b: int
    level: float

    def below_one(self) -> bool:
        """The whole interval is below 1: a is less spread than b."""
        return self.high is not None and self.high < 1.0

    def above_one(self) -> bool:
        return self.low is not None and self.low > 1.0


def spread_ratio_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> SpreadRatio:
    """s_a / s_b and the interval for sigma_a / sigma_b from (s_a^2 / s_b^2) / (sigma_a^2 /
    sigma_b^2) ~ F(n_a - 1, n_b - 1): exact for independent normal samples, and conservative
    (too wide) for paired samples whose pairs are positively correlated. Bounds are None when
    a sample has fewer than two values or b has no spread."""
    _check_level(level)
    (_, s_a), (_, s_b) = mean_std(a), mean_std(b)
    n_a, n_b = len(a), len(b)
    if s_b == 0.0:
        return SpreadRatio(math.nan if s_a == 0.0 else math.inf, None, None, n_a, n_b, level)
    ratio = s_a / s_b
    if n_a < 2 or n_b < 2:
        return SpreadRatio(ratio, None, None, n_a, n_b, level)
    tail = (1.0 - level) / 2
    f_high, f_low = f_quantile(1.0 - tail, n_a - 1, n_b - 1), f_quantile(tail, n_a - 1, n_b - 1)
    return SpreadRatio(ratio, ratio / math.sqrt(f_high), ratio / math.sqrt(f_low), n_a, n_b, level)
