"""Summary statistics over seeds (l2t_core.stats) against the textbook formulas."""

import math

import pytest
from scipy.stats import t as student_t

from l2t_core.stats import mean_std, welch_difference


def test_mean_std_sample_std_and_single_value():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "std": pytest.approx(math.sqrt(5 / 3))}
    assert mean_std([0.7]) == {"mean": 0.7, "std": 0.0}
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def _welch_by_hand(a, b, confidence):
    """Welch (1947): t = Δ / sqrt(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite degrees of freedom."""
    va, vb = mean_std(a)["std"] ** 2 / len(a), mean_std(b)["std"] ** 2 / len(b)
    delta = sum(a) / len(a) - sum(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    q = student_t.ppf(0.5 + confidence / 2, df)
    p = 2 * student_t.sf(abs(delta) / se, df)
    return delta, delta - q * se, delta + q * se, p


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_welch_difference_matches_the_formula(confidence):
    a = [0.62, 0.77, 0.65, 0.57, 0.70]          # unequal sizes and spreads
    b = [0.42, 0.60, 0.72, 0.55]
    d = welch_difference(a, b, confidence)
    delta, low, high, p = _welch_by_hand(a, b, confidence)
    assert d["delta"] == pytest.approx(delta) and d["low"] == pytest.approx(low) and d["high"] == pytest.approx(high)
    assert d["p"] == pytest.approx(p) and (d["n_a"], d["n_b"]) == (5, 4)
    # the sign follows a − b, and the interval is symmetric about it
    e = welch_difference(b, a, confidence)
    assert e["delta"] == pytest.approx(-delta) and e["low"] == pytest.approx(-high) and e["p"] == pytest.approx(p)


def test_welch_difference_far_apart_and_overlapping():
    assert welch_difference([0.9, 0.91, 0.92], [0.1, 0.11, 0.12])["p"] < 1e-4
    d = welch_difference([0.5, 0.7, 0.6], [0.6, 0.5, 0.7])
    assert d["delta"] == pytest.approx(0.0) and d["p"] == pytest.approx(1.0) and d["low"] < 0 < d["high"]


def test_welch_difference_undefined_cases_give_no_interval():
    # one seed on a side; no spread on either side
    for a, b, delta in (([0.5], [0.4, 0.6], 0.0), ([0.5, 0.5], [0.4, 0.4], 0.1)):
        d = welch_difference(a, b)
        assert d["delta"] == pytest.approx(delta) and d["low"] is None and d["high"] is None and d["p"] is None
    with pytest.raises(ValueError, match="empty sample"):
        welch_difference([], [0.5])
    with pytest.raises(ValueError, match="confidence"):
        welch_difference([0.1, 0.2], [0.3, 0.4], confidence=95)
