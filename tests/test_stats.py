"""The statistics behind the verdicts against hand computations (float64): the paired t-test's
p-value and interval, Holm's adjusted p-values, two one-sided tests (TOST), zero-width intervals
and the verdict rules. Expected values come from Student's t in closed form, written out here
(df = 1: the Cauchy distribution; df = 2: F(t) = 1/2 + t / (2√(2 + t²))), never from mbn.results."""
import math

import pytest

from mbn.results import holm, paired_difference, tost_p, verdict


def cdf_df1(t):
    return 0.5 + math.atan(t) / math.pi


def cdf_df2(t):
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def quantile_df2(q):
    return (2 * q - 1) / math.sqrt(2 * q * (1 - q))


def by_hand(ours, ref):
    """n, mean, sample sd and t statistic of the per-seed differences, with explicit sums."""
    diffs = [ours[s] - ref[s] for s in sorted(ours)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return n, mean, sd, mean / (sd / math.sqrt(n))


def test_paired_t_test_p_value_and_interval_against_closed_forms():
    ours, ref = {0: 10.4, 1: 10.8, 2: 10.7}, {0: 10.0, 1: 10.2, 2: 9.9}  # differences 0.4, 0.6, 0.8
    n, mean, sd, t = by_hand(ours, ref)
    d = paired_difference(ours, ref)
    assert d["p"] == pytest.approx(2 * (1 - cdf_df2(abs(t))), rel=1e-12, abs=0)
    assert d["p"] == pytest.approx(0.0351, abs=1e-4)  # 1 − 5.196/√29
    half = quantile_df2(0.975) * sd / math.sqrt(n)
    assert (d["lo"], d["hi"], d["half"]) == pytest.approx((mean - half, mean + half, half), rel=1e-12)
    ours, ref = {0: 9.0, 1: 8.5}, {0: 10.0, 1: 10.0}  # n = 2, df = 1: the Cauchy distribution
    n, mean, sd, t = by_hand(ours, ref)
    assert paired_difference(ours, ref)["p"] == pytest.approx(2 * (1 - cdf_df1(abs(t))), rel=1e-12)


def test_holm_adjusted_p_values_by_hand():
    # sorted: a 0.01, c 0.03, b 0.04, d 0.5 (m = 4) -> 4·0.01, 3·0.03, max(0.09, 2·0.04), max(0.09, 0.5)
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5}, rel=1e-12)
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}  # capped at 1, never decreasing
    assert holm({"only": 0.02}) == {"only": 0.02} and holm({}) == {}


def test_tost_by_hand_and_against_the_90_percent_interval():
    ours, ref = {0: 8.05, 1: 8.15, 2: 8.2}, {0: 8.0, 1: 8.2, 2: 8.1}  # differences 0.05, −0.05, 0.1
    n, mean, sd, _ = by_hand(ours, ref)
    se = sd / math.sqrt(n)
    d = paired_difference(ours, ref)
    for margin in (0.3, 0.2, 0.1):
        expected = max(1 - cdf_df2((mean + margin) / se), cdf_df2((mean - margin) / se))
        assert tost_p(d, margin) == pytest.approx(expected, rel=1e-12)
        # TOST at α = 0.05 shows equivalence exactly where the 90 % interval lies inside ±margin
        half90 = quantile_df2(0.95) * se
        assert (tost_p(d, margin) < 0.05) == (-margin < mean - half90 and mean + half90 < margin)
    assert tost_p(d, 0.3) < 0.05 < tost_p(d, 0.1)


def test_identical_differences_give_a_zero_width_interval_never_a_verdict():
    # 7.1 − 7.0, 7.6 − 7.5, 7.3 − 7.2 differ in the 16th digit only
    d = paired_difference({0: 7.1, 1: 7.6, 2: 7.3}, {0: 7.0, 1: 7.5, 2: 7.2})
    assert d["zero_width"] and d["lo"] == d["hi"] == d["mean"] and d["half"] == 0.0 and d["p"] is None
    assert d["mean"] == pytest.approx(0.1)
    assert verdict("<", d, None, -0.11) == verdict(">", d, None, 0.11) == "zero-width interval"
    exact = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert exact["zero_width"] and exact["lo"] == exact["hi"] == 1.0


def test_verdict_rules():
    def d(mean, half, n=3):
        return {"n": n, "mean": mean, "half": half, "lo": mean - half, "hi": mean + half, "zero_width": False}

    assert verdict("<", d(-1.0, 0.5), 0.01, -0.48) == "holds" and verdict(">", d(-1.0, 0.5), 0.01, 0.3) == "fails"
    assert verdict(">", d(1.0, 0.5), 0.049, 0.3) == "holds" and verdict("<", d(1.0, 0.5), 0.01, -0.3) == "fails"
    # not significant after correction: the paper's |Δ| against what this n and spread can detect
    assert verdict("<", d(-0.3, 0.5), 0.2, -0.48) == "underpowered"
    assert verdict("<", d(-0.3, 0.5), 0.2, -0.74) == "within noise"
    assert verdict("<", d(-1.0, 0.5), 0.05, -0.74) == "within noise"  # p = α is not below it
    assert verdict("=", d(0.0, 0.1), 0.01) == "equivalent" and verdict("=", d(0.0, 0.1), 0.3) == "not shown equivalent"
    assert verdict("<", d(-1.0, 0.1, n=2), 0.001, -0.48) == "n = 2 (< 3 pairs)"
    assert verdict("<", {"n": 1, "mean": -1.0, "half": None, "lo": None, "hi": None, "zero_width": False}) == \
        "n = 1 (< 3 pairs)"
    assert verdict(None, d(-1.0, 0.5), 0.01) == "no claim" and verdict("<", None) == "missing"


def test_differences_equal_up_to_float_noise_give_a_zero_width_interval():
    """5.1 − 5.0, 5.2 − 5.1 and 5.3 − 5.2 are 0.1 in decimal but not in binary: their sample sd is
    ~5e-16 pp, float noise, not a spread to build a t interval and a verdict on."""
    ours, ref = {0: 5.1, 1: 5.2, 2: 5.3}, {0: 5.0, 1: 5.1, 2: 5.2}
    diffs = [ours[s] - ref[s] for s in ours]
    assert len(set(diffs)) > 1 and 0 < by_hand(ours, ref)[2] < 1e-12  # the premise: not exactly identical
    d = paired_difference(ours, ref)
    assert d["zero_width"] and d["half"] == 0.0 and d["p"] is None and d["lo"] == d["hi"] == d["mean"]
    assert verdict("<", d, None, -0.11) == "zero-width interval"
