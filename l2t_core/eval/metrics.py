"""Evaluation metrics of METHOD.md §7: pass@k, maj@k, token budgets and efficiency.

Small pure functions over verified samples; the evaluation runner calls them per problem and
aggregates per benchmark and per difficulty tier.

* :func:`pass_at_k`: the unbiased estimator of Chen et al. (2021) for one problem with ``n``
  samples of which ``c`` are correct, ``1 - C(n-c, k) / C(n, k)``; pass@1 is then ``c / n``
  (§7: "the mean verified correctness over n samples").
* :func:`majority_answer` / :func:`maj_at_k`: the most frequent answer among the first ``k``
  samples (equivalence classes by a caller-given key, e.g. the normalised boxed answer, or the
  classes of :func:`answer_classes`), ties broken by first occurrence; maj@k is whether that
  answer is correct.
* :func:`answer_classes`: answers grouped by a caller-given equivalence (the evaluation runner's
  is math-verify's, so ``0.5`` and ``\\frac{1}{2}`` vote together).
* :func:`efficiency`: ``tokens_base / tokens_method`` (§7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n-c, k) / C(n, k)`` (§7; Chen et al. 2021, eq. 1).

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms the huge binomials.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"pass_at_k: {name} must be a non-negative integer, got {v!r}")
    if c > n:
        raise ValueError(f"pass_at_k: c ({c} correct) cannot exceed n ({n} samples)")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got {k}; draw at least k samples per problem")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct[p]`` holds the verdicts of problem p's samples."""
    if not correct:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(len(c), int(sum(bool(x) for x in c)), k) for c in correct) / len(correct)


def majority_answer(answers: Sequence[T | None], key: Callable[[T], Hashable] = lambda a: a) -> int | None:
    """Index of the representative of the most frequent answer class, or None when every answer
    is None (no answer extracted). Ties go to the class seen first; the representative is the
    class's first member."""
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        kk = key(a)
        counts[kk] = counts.get(kk, 0) + 1
        first.setdefault(kk, i)
    if not counts:
        return None
    best = max(counts, key=lambda kk: (counts[kk], -first[kk]))
    return first[best]


def answer_key(answer) -> str:
    """The class of an extracted answer for majority voting: its text without whitespace."""
    return "".join(str(answer).split())


def answer_classes(answers: Sequence[T | None], same: Callable[[T, T], bool],
                   key: Callable[[T], Hashable] = answer_key) -> list[int | None]:
    """The class of each answer for majority voting, numbered in order of first appearance (None
    stays None): answers with the same ``key`` share a class, and any other answer joins the
    first class whose representative (first member) ``same(representative, answer)`` accepts,
    else opens a new one. ``same`` is only called between answers of different keys, at most
    once per answer and class."""
    reps: list[T] = []
    by_key: dict[Hashable, int] = {}
    out: list[int | None] = []
    for a in answers:
        if a is None:
            out.append(None)
            continue
        kk = key(a)
        if kk not in by_key:
            by_key[kk] = next((c for c, rep in enumerate(reps) if same(rep, a)), len(reps))
            if by_key[kk] == len(reps):
                reps.append(a)
        out.append(by_key[kk])
    return out


def maj_at_k(answers: Sequence[T | None], correct: Sequence[bool], k: int,
             key: Callable[[T], Hashable] = lambda a: a) -> bool:
    """maj@k of one problem: is the majority answer of the first ``k`` samples correct?"""
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} verdicts")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: k must be in [1, {len(answers)}] (samples drawn), got {k}")
    i = majority_answer(answers[:k], key)
    return bool(correct[i]) if i is not None else False


def efficiency(tokens_base: float, tokens_method: float) -> float:
    """``tokens_base / tokens_method`` (§7): 2.0 means the method uses half the base's tokens."""
    if not (math.isfinite(tokens_base) and math.isfinite(tokens_method)) or tokens_base < 0 or tokens_method <= 0:
        raise ValueError(f"efficiency: token counts must be finite, base >= 0 and method > 0; got "
                         f"{tokens_base} and {tokens_method}")
    return tokens_base / tokens_method
