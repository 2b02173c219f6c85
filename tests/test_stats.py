"""Student t, chi-square and F quantiles against printed tables, scipy where installed, and a
float64 numerical integration of the densities; the intervals against known values and by
their coverage on simulated normal samples."""
import math
import random

import pytest

from matta.stats import (
    chi2_cdf,
    chi2_quantile,
    f_cdf,
    f_quantile,
    mean_interval,
    mean_std,
    paired_interval,
    spread_ratio_interval,
    std_interval,
    t_cdf,
    t_quantile,
)

# Two-sided 95% and 99% critical values of Student's t (standard printed tables).
TABLE_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 9: 2.2622,
             10: 2.2281, 15: 2.1314, 20: 2.0860, 30: 2.0423, 60: 2.0003, 120: 1.9799}
TABLE_995 = {1: 63.6567, 2: 9.9248, 3: 5.8409, 4: 4.6041, 9: 3.2498, 30: 2.7500}


# Upper-tail critical values of chi-square and F (standard printed tables).
CHI2_975 = {1: 5.0239, 2: 7.3778, 4: 11.1433, 9: 19.0228, 30: 46.9792}
CHI2_025 = {1: 0.000982, 2: 0.05064, 4: 0.4844, 9: 2.7004, 30: 16.7908}
F_975 = {(1, 1): 647.79, (2, 2): 39.000, (4, 4): 9.6045, (4, 8): 5.0526, (9, 9): 4.0260, (1, 10): 6.9367,
         (10, 1): 968.63}
F_95 = {(3, 5): 5.4095, (4, 4): 6.3882, (2, 20): 3.4928}


def simpson(f, a, b, n=4000):
    h = (b - a) / n
    return h / 3 * (f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n)))


def integrated_cdf(t, df, n=4000):
    """P(T <= t) by Simpson's rule on the density from 0 to |t| (float64)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    half = simpson(lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2), 0.0, abs(t), n)
    return 0.5 + half if t >= 0 else 0.5 - half


def chi2_density(x, k):
    return x ** (k / 2 - 1) * math.exp(-x / 2) / (2 ** (k / 2) * math.gamma(k / 2))


def f_density(x, d1, d2):
    log_b = math.lgamma(d1 / 2) + math.lgamma(d2 / 2) - math.lgamma((d1 + d2) / 2)
    return math.exp(0.5 * (d1 * math.log(d1 * x) + d2 * math.log(d2) - (d1 + d2) * math.log(d1 * x + d2))
                    - math.log(x) - log_b) if x > 0 else (1.0 if d1 == 2 else 0.0)


@pytest.mark.parametrize("df", sorted(TABLE_975))
def test_quantiles_match_printed_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(TABLE_975[df], abs=6e-5)
    if df in TABLE_995:
        assert t_quantile(0.995, df) == pytest.approx(TABLE_995[df], abs=6e-5)
    assert t_quantile(0.025, df) == -t_quantile(0.975, df)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 8, 25])
@pytest.mark.parametrize("t", [-3.7, -0.4, 0.0, 0.9, 2.5])
def test_cdf_matches_integrated_density(df, t):
    assert t_cdf(t, df) == pytest.approx(integrated_cdf(t, df), abs=1e-9)


@pytest.mark.parametrize("df", sorted(CHI2_975))
def test_chi2_quantiles_match_printed_tables(df):
    assert chi2_quantile(0.975, df) == pytest.approx(CHI2_975[df], abs=6e-5)
    assert chi2_quantile(0.025, df) == pytest.approx(CHI2_025[df], rel=5e-4)


@pytest.mark.parametrize("d1, d2", sorted(set(F_975) | set(F_95)))
def test_f_quantiles_match_printed_tables(d1, d2):
    if (d1, d2) in F_975:
        assert f_quantile(0.975, d1, d2) == pytest.approx(F_975[(d1, d2)], rel=1e-4)
        assert f_quantile(0.025, d2, d1) == pytest.approx(1 / F_975[(d1, d2)], rel=1e-4)  # F(d2, d1) = 1 / F(d1, d2)
    if (d1, d2) in F_95:
        assert f_quantile(0.95, d1, d2) == pytest.approx(F_95[(d1, d2)], rel=1e-4)


@pytest.mark.parametrize("k", [2, 3, 4, 9, 17])
@pytest.mark.parametrize("x", [0.3, 1.7, 6.0, 25.0])
def test_chi2_cdf_matches_integrated_density(k, x):
    # In v = sqrt(u) the integrand has no kink at 0 for odd k.
    assert chi2_cdf(x, k) == pytest.approx(simpson(lambda v: 2 * v * chi2_density(v * v, k), 0.0, math.sqrt(x)),
                                           abs=1e-9)


@pytest.mark.parametrize("d1, d2", [(2, 3), (4, 4), (7, 2), (4, 9)])
@pytest.mark.parametrize("x", [0.2, 1.0, 3.5, 12.0])
def test_f_cdf_matches_integrated_density(d1, d2, x):
    assert f_cdf(x, d1, d2) == pytest.approx(simpson(lambda u: f_density(u, d1, d2), 0.0, x), abs=1e-8)


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 11, 40):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
    for df in (1, 2, 3, 4, 7, 30, 90):
        for p in (0.001, 0.025, 0.5, 0.975, 0.999):
            assert chi2_quantile(p, df) == pytest.approx(stats.chi2.ppf(p, df), rel=1e-8)
    for d1, d2 in ((1, 1), (1, 7), (4, 4), (6, 2), (20, 30)):
        for p in (0.025, 0.3, 0.975):
            assert f_quantile(p, d1, d2) == pytest.approx(stats.f.ppf(p, d1, d2), rel=1e-8)


def test_spread_intervals_on_known_numbers():
    values = [4.6, 5.1, 4.62, 4.61, 5.0]
    spread = std_interval(values)
    s = mean_std(values)[1]
    assert spread.std == pytest.approx(s)
    assert (spread.low, spread.high) == pytest.approx((s * math.sqrt(4 / 11.143287), s * math.sqrt(4 / 0.484419)))
    steady = [4.65, 4.66, 4.64, 4.66, 4.65]
    # s_a / s_b = 0.0329, and F(4, 4) at 0.975 is 9.6045: the interval lies wholly below 1.
    ratio = spread_ratio_interval(steady, values)
    r = mean_std(steady)[1] / s
    assert ratio.ratio == pytest.approx(r)
    assert (ratio.low, ratio.high) == pytest.approx((r / math.sqrt(9.604530), r * math.sqrt(9.604530)))
    assert ratio.below_one() and not ratio.above_one()
    assert spread_ratio_interval(values, steady).above_one()
    # Half the spread on five seeds is not enough: the interval must include 1.
    half = spread_ratio_interval([0.0, 0.5, 1.0, 1.5, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert half.ratio == pytest.approx(0.5) and half.low < 1 < half.high
    # No interval from one value or from a baseline without spread.
    assert spread_ratio_interval([1.0], [1.0, 2.0]).low is None and std_interval([3.0]).high is None
    flat = spread_ratio_interval([1.0, 2.0], [5.0, 5.0])
    assert flat.ratio == math.inf and flat.low is None and not flat.below_one()


def test_spread_intervals_cover_at_their_level():
    rng = random.Random(0)
    trials, n_a, n_b = 4000, 5, 6
    covered_std = covered_ratio = 0
    for _ in range(trials):
        a = [rng.gauss(0.0, 2.0) for _ in range(n_a)]
        b = [rng.gauss(1.0, 1.0) for _ in range(n_b)]
        spread = std_interval(a)
        covered_std += spread.low <= 2.0 <= spread.high
        ratio = spread_ratio_interval(a, b)
        covered_ratio += ratio.low <= 2.0 <= ratio.high
    # Binomial standard error at 95% over 4000 trials: 0.0034; allow four of them.
    assert abs(covered_std / trials - 0.95) < 0.014
    assert abs(covered_ratio / trials - 0.95) < 0.014


def test_intervals():
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(math.sqrt(((1 - m) ** 2 + (2 - m) ** 2 + (4 - m) ** 2) / 2))
    iv = paired_interval([5.0, 6.0, 7.5], [4.0, 4.9, 6.3])  # differences 1.0, 1.1, 1.2
    d_mean, d_std = mean_std([1.0, 1.1, 1.2])
    half = 4.302652729749752 * d_std / math.sqrt(3)
    assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((d_mean, d_mean - half, d_mean + half, 3))
    assert iv.above_zero() and iv.excludes_zero() and not iv.below_zero()
    single = mean_interval([0.3])
    assert single.low is None and not single.excludes_zero() and not single.below_zero()
    straddles = mean_interval([-1.0, 1.2, 0.1])
    assert not straddles.excludes_zero()


@pytest.mark.parametrize("call, message", [
    (lambda: t_quantile(1.0, 3), "p must be in"),
    (lambda: t_cdf(1.0, 0), "positive int"),
    (lambda: t_cdf(float("nan"), 3), "NaN"),
    (lambda: mean_std([]), "at least one"),
    (lambda: paired_interval([1.0], [1.0, 2.0]), "pairs"),
    (lambda: mean_interval([1.0, 2.0], level=1.5), "level"),
    (lambda: chi2_quantile(0.0, 3), "p must be in"),
    (lambda: chi2_cdf(1.0, 2.5), "positive int"),
    (lambda: f_cdf(1.0, 3, 0), "d2 must be a positive int"),
    (lambda: f_cdf(float("nan"), 3, 3), "NaN"),
    (lambda: std_interval([1.0, 2.0], level=0.0), "level"),
    (lambda: spread_ratio_interval([], [1.0, 2.0]), "at least one"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
