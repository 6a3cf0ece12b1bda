"""pass@k, maj@k and efficiency (METHOD.md §7) against brute-force references."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l2t_core.eval.metrics import answer_classes, efficiency, maj_at_k, majority_answer, mean_pass_at_k, pass_at_k


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of the n samples that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_subset_count(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_large_n():
    assert pass_at_k(20, 7, 1) == pytest.approx(7 / 20)
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 1, 64) == 1.0
    exact = 1 - math.comb(200 - 13, 50) / math.comb(200, 50)
    assert pass_at_k(200, 13, 50) == pytest.approx(exact, rel=1e-12)
    assert mean_pass_at_k([[True, False], [False, False], [True, True]], 1) == pytest.approx(0.5)


@pytest.mark.parametrize("args", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (-1, 0, 1), (3.0, 1, 1)])
def test_pass_at_k_rejects_bad_counts(args):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*args)


def test_majority_answer_ties_none_and_keys():
    assert majority_answer(["3", "4", "4", "3"]) == 0  # tie: the class seen first
    assert majority_answer([None, "4", "5", "5"]) == 2
    assert majority_answer([None, None]) is None
    assert majority_answer(["1/2", "0.5", "2"], key=lambda a: round(eval(a), 6)) == 0
    assert maj_at_k(["7", "8", "8", "7", "8"], [True, False, False, True, False], 4) is True
    assert maj_at_k(["7", "8", "8", "7", "8"], [True, False, False, True, False], 5) is False
    assert maj_at_k([None] * 4, [False] * 4, 4) is False
    with pytest.raises(ValueError, match="k must be"):
        maj_at_k(["1"], [True], 4)
    with pytest.raises(ValueError, match="verdicts"):
        maj_at_k(["1", "2"], [True], 1)


def test_efficiency():
    assert efficiency(1000, 500) == 2.0
    for bad in ((1000, 0), (float("nan"), 3), (-1, 3)):
        with pytest.raises(ValueError, match="efficiency"):
            efficiency(*bad)


def test_answer_classes_group_by_key_then_by_equivalence():
    """Same text (whitespace aside) is one class without asking ``same``; another text joins the
    first class whose representative ``same`` accepts; None stays None; classes are numbered in
    order of first appearance and ``same`` is asked at most once per new text and class."""
    calls = []

    def same(a, b):
        calls.append((a, b))
        return abs(eval(a) - eval(b)) < 1e-9

    assert answer_classes(["1/2", "3", None, "0.5", "1 / 2", "3.0", "4"], same) == [0, 1, None, 0, 0, 1, 2]
    assert calls == [("1/2", "3"), ("1/2", "0.5"), ("1/2", "3.0"), ("3", "3.0"), ("1/2", "4"), ("3", "4")]
    assert answer_classes([None, None], same) == [None, None]
    assert maj_at_k(answer_classes(["7", "0.5", "1/2", "2/4"], same), [False, True, True, True], 4) is True
