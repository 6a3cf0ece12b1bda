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

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from ..episodes import segment
from ..prompts import FORCE_ANSWER_SUFFIX, render_answer

MOD = 10
MAX_LEVEL = 6
LEVELS = tuple(range(1, MAX_LEVEL + 1))
HELDOUT_SHARE = 8  # one problem text in 8 belongs to the held-out split
HELDOUT_SEED = 1_000_003
OPS = "+-"

Split = Literal["train", "heldout"]
EpisodeKind = Literal["restate", "step", "check", "repeat", "other"]


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
class Step:
    """One term applied to the running digit: ``before term = after`` (true values)."""

    term: Term
    before: int
    after: int

    @property
    def hard(self) -> bool:
        return self.term.hard


@dataclass(frozen=True)
class Problem:
    """A chain problem. ``steps`` is the number of terms, i.e. the difficulty level."""

    id: str
    problem: str  # the statement, e.g. "Compute (3+7*8-2) mod 10."
    answer: str  # the exact final digit as text
    steps: int
    start: int
    terms: tuple[Term, ...]

    @property
    def level(self) -> int:
        return self.steps

    @property
    def expression(self) -> str:
        return str(self.start) + "".join(t.text for t in self.terms)

    def step_list(self) -> tuple[Step, ...]:
        out, x = [], self.start
        for t in self.terms:
            out.append(Step(t, x, t.apply(x)))
            x = out[-1].after
        return tuple(out)

    @property
    def num_hard(self) -> int:
        return sum(t.hard for t in self.terms)


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


def split_of(problem_text: str) -> Split:
    """The split a problem text belongs to, from a stable hash: 'heldout' for 1 in HELDOUT_SHARE."""
    h = int.from_bytes(hashlib.blake2b(problem_text.encode(), digest_size=8).digest(), "big")
    return "heldout" if h % HELDOUT_SHARE == 0 else "train"


def dataset(
    n: int,
    min_steps: int = 1,
    max_steps: int = 4,
    seed: int = 0,
    *,
    split: Split = "train",
    hard_prob: float = 0.5,
    ops: str = OPS,
    unique: bool = False,
) -> list[Problem]:
    """``n`` problems of the ``split``, levels uniform in [min_steps, max_steps], deterministic
    by ``seed``. ``unique`` drops repeated problem texts (it fails when the pool is too small)."""
    if n < 0:
        raise ValueError(f"dataset: n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"dataset: need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if split not in ("train", "heldout"):
        raise ValueError(f"dataset: split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    return draw_problems(rng, n, min_steps, max_steps, split, unique,
                         lambda r, steps, i: make_problem(r, steps, i, hard_prob, ops))


def draw_problems(rng: random.Random, n: int, min_steps: int, max_steps: int, split: Split, unique: bool,
                  make: Callable[[random.Random, int, int], Any]) -> list:
    """``n`` problems drawn with ``make(rng, steps, index)`` (steps uniform in [min_steps, max_steps]),
    kept when the hash of their text puts them in ``split`` and, with ``unique``, when the text is
    new. Shared by the tasks' ``dataset``; fails clearly when the pool is too small."""
    out: list = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * (n + 10):
            raise ValueError(
                f"dataset: could only draw {len(out)} of {n} {'unique ' if unique else ''}{split} problems "
                f"with levels {min_steps}..{max_steps}; ask for fewer"
            )
        p = make(rng, rng.randint(min_steps, max_steps), len(out))
        if split_of(p.problem) != split or (unique and p.problem in seen):
            continue
        seen.add(p.problem)
        out.append(p)
    return out


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


def task_prompt(text: str) -> str:
    """A synthetic task's prompt from its statement (shared by the tasks' ``build_task_prompt``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("build_task_prompt: the problem text is empty")
    return f"{text.strip()}\n"


# --------------------------------------------------------------------------------------------
# Reference traces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceStyle:
    """How a reference trace thinks; every field is a probability in [0, 1].

    ``guess_error``: a hard step's direct result forgets the carry/borrow (a fast guess).
    ``hard_check``: a check episode follows a hard step (useful: it repairs a wrong guess).
    ``easy_check``: a check episode follows an easy step (redundant).
    ``repeat``: a step is repeated verbatim after its episodes (redundant).
    ``restate``: the trace first restates the problem (redundant).
    """

    guess_error: float = 0.5
    hard_check: float = 0.8
    easy_check: float = 0.6
    repeat: float = 0.1
    restate: float = 0.2

    def __post_init__(self) -> None:
        for name in ("guess_error", "hard_check", "easy_check", "repeat", "restate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"TraceStyle.{name} must be a probability in [0, 1], got {v}")


@dataclass(frozen=True)
class TraceEpisode:
    """One episode of a reference trace. ``step`` is the 0-based step it belongs to (None for a
    restatement); ``hard`` is that step's hardness; ``value`` the running value after it."""

    kind: EpisodeKind
    text: str
    step: int | None
    hard: bool
    value: int


@dataclass(frozen=True)
class Trace:
    """A reference response: its episodes and the value it boxes (wrong after an unchecked
    wrong guess)."""

    episodes: tuple[TraceEpisode, ...]
    final: int

    @property
    def text(self) -> str:
        return render_trace([e.text for e in self.episodes], str(self.final))


def render_trace(episode_texts: Sequence[str], answer: str) -> str:
    """The METHOD.md §8 response: ``<think>`` + tagged episodes + ``</think>`` + boxed answer."""
    body = "".join(f"<episode_{k}>{t}</episode_{k}>\n" for k, t in enumerate(episode_texts, 1))
    return f"<think>\n{body}</think>\n\n{render_answer(answer)}"


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
    """A reference trace of ``problem`` drawn with ``style`` (see the module docstring)."""
    eps: list[TraceEpisode] = []
    if rng.random() < style.restate:
        eps.append(TraceEpisode("restate", f"goal {problem.expression}", None, False, problem.start))
    x = problem.start
    for i, term in enumerate(problem.terms):
        true = term.apply(x)
        written = fast_guess(rng, true) if term.hard and rng.random() < style.guess_error else true
        eps.append(TraceEpisode("step", step_text(x, term, written), i, term.hard, written))
        value = written
        if rng.random() < (style.hard_check if term.hard else style.easy_check):
            eps.append(TraceEpisode("check", check_text(x, term), i, term.hard, true))
            value = true
        if rng.random() < style.repeat:
            eps.append(TraceEpisode("repeat", "again " + step_text(x, term, value), i, term.hard, value))
        x = value
    return Trace(tuple(eps), x)


def trace(p: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """The reference response text of ``p`` (what follows the prompt)."""
    return build_trace(p, rng, style).text


def forced_answer_example(prompt: str, response: str, k: int, answer: str) -> tuple[str, str, str, str]:
    """A forced-answer example as SFT segments ``(prompt, prefix, suffix, target)``: the response
    cut after its k-th episode (k = 0: none of it, s_1 = x), the force-answer suffix f, and the
    TRUE answer rendered as ``\\boxed{answer}``.

    The cut is the boundary the J estimator uses (METHOD.md §2), so training the target trains
    exactly J(s_k) = π(answer | s_k ⊕ f). The prefix is an ordinary trace prefix (trainable);
    the suffix is context only, so the model never learns to emit it on its own.
    """
    seg = segment(response)
    if seg.status != "tagged":
        raise ValueError(f"forced_answer_example: the response does not segment as tagged ({seg.status})")
    if not 0 <= k <= seg.num_episodes:
        raise ValueError(f"forced_answer_example: k must be in [0, {seg.num_episodes}], got {k}")
    cut = 0 if k == 0 else seg.boundaries[k - 1]
    return prompt, response[:cut], FORCE_ANSWER_SUFFIX, render_answer(answer)


# --------------------------------------------------------------------------------------------
# Reading generated responses
# --------------------------------------------------------------------------------------------

_STEP = re.compile(r"^(\d)([+-])(\d)(?:\*(\d))?=(\d+)$")


@dataclass(frozen=True)
class EpisodeInfo:
    """What one generated episode does.

    For a step, ``hard`` is its hardness and ``wrong`` whether its written result is wrong. For a
    check or repeat they describe the last step before it (False when there was none), so a check
    with ``wrong`` set is one that can repair an error.
    """

    kind: EpisodeKind
    hard: bool = False
    wrong: bool = False

    @property
    def key(self) -> str:
        """The kind, split by the hardness of the step for steps and checks: ``step_hard``,
        ``check_easy``, ``repeat``, ``restate``, ``other`` (the keys of per-kind reports)."""
        return self.kind if self.kind in ("restate", "repeat", "other") else f"{self.kind}_{'hard' if self.hard else 'easy'}"

    @property
    def detail_key(self) -> str:
        """:attr:`key`, with checks of hard steps split by whether the checked step was wrong
        (``check_hard_repair``, a useful check) or right (``check_hard_confirm``)."""
        if self.kind == "check" and self.hard:
            return "check_hard_repair" if self.wrong else "check_hard_confirm"
        return self.key

    @property
    def redundant(self) -> bool:
        """Restatements, repeats and checks of easy steps add nothing to a trace."""
        return self.kind in ("restate", "repeat") or (self.kind == "check" and not self.hard)


def classify_episodes(texts: Sequence[str]) -> list[EpisodeInfo]:
    """Kinds of the episode texts of one response, in the vocabulary of the reference traces."""
    def step(t: str) -> EpisodeInfo | None:
        m = _STEP.match(t)
        if not m:
            return None
        factors = tuple(int(f) for f in (m.group(3), m.group(4)) if f is not None)
        term = Term(m.group(2), factors)
        return EpisodeInfo("step", term.hard, int(m.group(5)) != term.apply(int(m.group(1))))

    return classify_with(texts, step)


def classify_with(texts: Sequence[str], step: Callable[[str], "EpisodeInfo | None"]) -> list[EpisodeInfo]:
    """Episode kinds in the reference traces' vocabulary, shared by the tasks: ``step(text)`` reads a
    task's direct step (None if the text is not one); a check or repeat describes the last step
    before it; ``goal ...`` is a restatement; anything else is ``other``."""
    out: list[EpisodeInfo] = []
    last = EpisodeInfo("other")
    for t in texts:
        t = t.strip()
        info = step(t)
        if info is not None:
            last = info
            out.append(last)
        elif t.startswith("check "):
            out.append(EpisodeInfo("check", last.hard, last.wrong))
        elif t.startswith("again "):
            out.append(EpisodeInfo("repeat", last.hard, last.wrong))
        elif t.startswith("goal "):
            out.append(EpisodeInfo("restate"))
        else:
            out.append(EpisodeInfo("other"))
    return out
