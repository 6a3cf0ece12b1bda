"""Chained mod-10 arithmetic with useful and redundant re-check episodes.

The embedded synthetic task of the CPU default (METHOD.md §10 asks for one whose extra episodes
have a problem-dependent value). A problem is ``Compute (3+7*8-2) mod 10.``: a start digit and a
chain of terms, evaluated left to right on a running digit (mod 10). Its difficulty level is the
number of terms (1..6).

A term is EASY when it adds or subtracts one digit (``-2``) and HARD when it adds or subtracts a
product of two digits (``+7*8``), a two-digit number the step has to form first. Reference traces
(METHOD.md §8 format, one ``<episode_k>`` per move) hold:

* a *direct* episode per step, ``3+7*8=9``. On a hard step the written result is a fast guess,
  a uniformly drawn wrong digit with probability ``TraceStyle.guess_error``; easy steps are right;
* a *check* episode after a step that recomputes it in small reliable pieces and is always right:
  ``check 7*8=56, 3+6=9`` after a hard step, ``check 3-2=1`` after an easy one. Later steps
  continue from its value, so a check after a hard step repairs a wrong guess (USEFUL,
  probability ``hard_check``) and a check after an easy step restates what was already right
  (REDUNDANT, probability ``easy_check``);
* further redundant episodes: ``again 3-2=1`` repeats the current step (``repeat``) and
  ``goal 3+7*8-2`` restates the problem first (``restate``).

An unchecked wrong guess propagates: later steps start from it and the boxed answer is wrong,
like a fast thinker who skipped the check. :func:`forced_answer_example` builds the forced-answer
examples (a trace cut at an episode boundary, the force-answer suffix, and the TRUE answer) that
make J(s_k) of METHOD.md §2 meaningful after SFT.

The held-out split is defined by a hash of the problem text (:func:`split_of`), so it is disjoint
from every training set, whatever its seed or size.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from .common import (  # the task-independent pieces, shared with the walk task and re-exported here
    HELDOUT_SHARE,
    ChainProblem,
    EpisodeInfo,
    EpisodeKind,
    Split,
    Step,
    Trace,
    TraceEpisode,
    TraceStyle,
    build_chain_trace,
    classify_with,
    draw_problems,
    forced_answer_example,
    render_trace,
    split_of,
    task_prompt,
)

MOD = 10
MAX_LEVEL = 6
LEVELS = tuple(range(1, MAX_LEVEL + 1))
HELDOUT_SEED = 1_000_003
OPS = "+-"

__all__ = [
    "MOD", "MAX_LEVEL", "LEVELS", "HELDOUT_SEED", "HELDOUT_SHARE", "OPS", "Split", "EpisodeKind",
    "Term", "Step", "Problem", "random_term", "make_problem", "split_of", "dataset", "draw_problems",
    "held_out_problems", "build_task_prompt", "task_prompt", "TraceStyle", "TraceEpisode", "Trace",
    "render_trace", "step_text", "check_text", "fast_guess", "build_trace", "trace",
    "forced_answer_example", "EpisodeInfo", "classify_episodes", "classify_with",
]


# --------------------------------------------------------------------------------------------
# Steps and problems
# --------------------------------------------------------------------------------------------


def _check_op(op: str) -> None:
    if op not in ("+", "-"):
        raise ValueError(f"unknown operation {op!r}; use '+' or '-'")


@dataclass(frozen=True)
class Term:
    """``op`` followed by one digit (easy) or a product of two digits (hard), e.g. ``+7*8``."""

    op: str
    factors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_op(self.op)
        if len(self.factors) not in (1, 2) or not all(0 <= f <= 9 for f in self.factors):
            raise ValueError(f"Term: factors must be one or two digits, got {self.factors}")

    @property
    def hard(self) -> bool:
        return len(self.factors) == 2

    @property
    def operand(self) -> int:
        """The number added or subtracted (the product for a hard term)."""
        return self.factors[0] * self.factors[1] if self.hard else self.factors[0]

    @property
    def text(self) -> str:
        return self.op + "*".join(map(str, self.factors))

    def apply(self, x: int) -> int:
        """The running digit after this term: ``(x op operand) mod 10``."""
        return (x + self.operand) % MOD if self.op == "+" else (x - self.operand) % MOD


@dataclass(frozen=True)
class Problem(ChainProblem):
    """A chain problem, e.g. ``Compute (3+7*8-2) mod 10.`` (fields ``id``, ``problem``, ``answer``,
    ``steps`` = the level, ``start`` from :class:`~.common.ChainProblem`); its actions are ``terms``."""

    terms: tuple[Term, ...]

    @property
    def actions(self) -> tuple[Term, ...]:
        return self.terms

    @property
    def expression(self) -> str:
        return str(self.start) + "".join(t.text for t in self.terms)


def random_term(rng: random.Random, hard: bool, ops: str = OPS) -> Term:
    """A uniformly drawn term: op d with d in 1..9, or op d*e with d, e in 2..9; op from ``ops``."""
    op = rng.choice(ops)
    if hard:
        return Term(op, (rng.randint(2, 9), rng.randint(2, 9)))
    return Term(op, (rng.randint(1, 9),))


def make_problem(rng: random.Random, steps: int, idx: int = 0, hard_prob: float = 0.5, ops: str = OPS) -> Problem:
    """A random chain of ``steps`` terms; each is hard with probability ``hard_prob``."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"make_problem: steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= hard_prob <= 1.0:
        raise ValueError(f"make_problem: hard_prob must be in [0, 1], got {hard_prob}")
    if not ops or set(ops) - {"+", "-"}:
        raise ValueError(f"make_problem: ops must be made of '+' and '-', got {ops!r}")
    start = rng.randrange(MOD)
    terms = tuple(random_term(rng, rng.random() < hard_prob, ops) for _ in range(steps))
    x = start
    for t in terms:
        x = t.apply(x)
    expr = str(start) + "".join(t.text for t in terms)
    return Problem(f"chain-{steps}-{idx}", f"Compute ({expr}) mod {MOD}.", str(x), steps, start, terms)


def dataset(n: int, min_steps: int = 1, max_steps: int = 4, seed: int = 0, *, split: Split = "train",
            hard_prob: float = 0.5, ops: str = OPS, unique: bool = False) -> list[Problem]:
    """``n`` problems of the ``split``, levels uniform in [min_steps, max_steps], deterministic
    by ``seed``. ``unique`` drops repeated problem texts (it fails when the pool is too small)."""
    rng = random.Random(f"{split}:{seed}")
    return draw_problems(rng, n, min_steps, max_steps, split, unique,
                         lambda r, steps, i: make_problem(r, steps, i, hard_prob, ops))


def held_out_problems(levels: Sequence[int] = LEVELS, per_level: int = 50, seed: int = HELDOUT_SEED,
                      hard_prob: float = 0.5, ops: str = OPS) -> list[Problem]:
    """``per_level`` unique held-out problems for every level in ``levels``, level by level."""
    if per_level < 1:
        raise ValueError(f"held_out_problems: per_level must be >= 1, got {per_level}")
    out: list[Problem] = []
    for lv in levels:
        out += dataset(per_level, lv, lv, seed=seed + lv, split="heldout", hard_prob=hard_prob, ops=ops,
                       unique=True)
    return out


def build_task_prompt(problem: Problem | str) -> str:
    """The prompt of the synthetic task: just the statement and a newline.

    The response format is METHOD.md §8's, learnt in SFT; the §8 instruction itself is left out,
    since it carries no information about the problem and every prompt character is a token for
    the character-level tokenizer.
    """
    return task_prompt(problem.problem if isinstance(problem, Problem) else problem)


# --------------------------------------------------------------------------------------------
# Reference traces
# --------------------------------------------------------------------------------------------


def step_text(x: int, term: Term, result: int) -> str:
    """The direct episode ``3+7*8=9`` (``result`` may be a wrong guess)."""
    return f"{x}{term.text}={result}"


def check_text(x: int, term: Term) -> str:
    """The recomputation of ``x term`` in single-lookup pieces; always right."""
    if term.hard:
        d, e = term.factors
        return f"check {d}*{e}={d * e}, {x}{term.op}{d * e % MOD}={term.apply(x)}"
    return f"check {x}{term.text}={term.apply(x)}"


def fast_guess(rng: random.Random, true: int) -> int:
    """A wrong digit, uniformly drawn."""
    return rng.choice([v for v in range(MOD) if v != true])


def build_trace(problem: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> Trace:
    """A reference trace of ``problem`` drawn with ``style`` (see the module docstring); a hard
    step's guess is a uniformly drawn wrong digit."""
    terms = problem.terms
    return build_chain_trace(problem, rng, style,
                             step_text=lambda i, x, result: step_text(x, terms[i], result),
                             check_text=lambda i, x: check_text(x, terms[i]),
                             guess=lambda i, x, true: fast_guess(rng, true))


def trace(p: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """The reference response text of ``p`` (what follows the prompt)."""
    return build_trace(p, rng, style).text


# --------------------------------------------------------------------------------------------
# Reading generated responses
# --------------------------------------------------------------------------------------------

_STEP = re.compile(r"^(\d)([+-])(\d)(?:\*(\d))?=(\d+)$")


def _read_step(m: re.Match[str]) -> EpisodeInfo:
    """A direct step ``3+7*8=9``: hard for a product, wrong when 9 is not (3+7*8) mod 10."""
    factors = tuple(int(f) for f in (m.group(3), m.group(4)) if f is not None)
    term = Term(m.group(2), factors)
    return EpisodeInfo("step", term.hard, int(m.group(5)) != term.apply(int(m.group(1))))


def classify_episodes(texts: Sequence[str]) -> list[EpisodeInfo]:
    """Kinds of the episode texts of one response, in the vocabulary of the reference traces."""
    return classify_with(texts, _STEP, _read_step)
