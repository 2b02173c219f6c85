"""Student t quantiles and paired intervals against printed tables, scipy where installed,
and a float64 numerical integration of the t density."""
import math

import pytest

from matta.stats import mean_interval, mean_std, paired_interval, t_cdf, t_quantile

# Two-sided 95% and 99% critical values of Student's t (standard printed tables).
TABLE_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 9: 2.2622,
             10: 2.2281, 15: 2.1314, 20: 2.0860, 30: 2.0423, 60: 2.0003, 120: 1.9799}
TABLE_995 = {1: 63.6567, 2: 9.9248, 3: 5.8409, 4: 4.6041, 9: 3.2498, 30: 2.7500}


def integrated_cdf(t, df, n=4000):
    """P(T <= t) by Simpson's rule on the density from 0 to |t| (float64)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    a, h = abs(t), abs(t) / n
    area = f(0) + f(a) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


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


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 11, 40):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


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
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
