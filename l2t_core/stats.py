"""Summary statistics over seeds, for the reports that compare methods.

A miniature run gives one number per method and seed; with three to seven seeds the question
"is method A better than method B on the hardest level" needs an interval, not two means.
``welch_difference`` gives the difference of means with Welch's t interval and p-value (unequal
variances, the textbook choice for two small samples; ``scipy.stats.ttest_ind``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence


def mean_std(xs: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n − 1; 0 for one value) over seeds."""
    if not xs:
        raise ValueError("mean_std: no values (a method with no finished seed?)")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd}


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """mean(a) − mean(b) with Welch's two-sided t interval at ``confidence`` and its p-value.

    Returns ``{"delta", "low", "high", "p", "n_a", "n_b"}``. ``low``, ``high`` and ``p`` are None
    when the test is undefined: fewer than two values on a side, or no spread on either side
    (every seed scored the same), where a t interval would claim certainty it does not have.
    """
    if not a or not b:
        raise ValueError(f"welch_difference: empty sample (sizes {len(a)} and {len(b)})")
    if not 0 < confidence < 1:
        raise ValueError(f"welch_difference: confidence must lie in (0, 1), got {confidence}")
    delta = sum(a) / len(a) - sum(b) / len(b)
    out = {"delta": delta, "low": None, "high": None, "p": None, "n_a": len(a), "n_b": len(b)}
    if len(a) < 2 or len(b) < 2 or (mean_std(a)["std"] == 0 and mean_std(b)["std"] == 0):
        return out
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # one constant side is fine for Welch; scipy warns of "precision loss"
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ttest_ind(list(a), list(b), equal_var=False)
    ci = res.confidence_interval(confidence_level=confidence)
    out.update(low=float(ci.low), high=float(ci.high), p=float(res.pvalue))
    return out
