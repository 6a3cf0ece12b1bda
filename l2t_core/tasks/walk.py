"""Digit walk: a walk on a fixed digit permutation, with useful and redundant re-check episodes.

The embedded synthetic task of the CPU default. METHOD.md §10 asks for a task whose extra
episodes have a problem-dependent value, and §10's prototype shows what such a task has to
fit: SFT of a 0.8M-parameter model in a couple of minutes on two cores. The chained mod-10
arithmetic task (:mod:`l2t_core.tasks.arithmetic`) has such episodes but is not learnable in that
budget: every step is a two-operand lookup (``a+b mod 10``, ``d*e``), and the tiny model answers
one digit to everything after 600 SFT steps. Here every lookup has ONE operand.

A fixed global permutation ``PERM`` (``F``) of the digits 0-9, a single 10-cycle, is the map. A
problem is ``from 6: >> > >>``: a start digit and a list of moves, each ``>`` (EASY: one hop,
x -> F[x]) or ``>>`` (HARD: two hops, x -> F[F[x]]). Its difficulty level is the number of moves
(1..6 in :data:`LEVELS`).

Reference traces (METHOD.md §8 format, one ``<episode_k>`` per move) hold:

* a *direct* episode per move, ``6>>1 then > >>``: the move, its result, and the moves still to
  do (``then end`` after the last one). Carrying the remaining moves is what keeps longer chains
  on track for the tiny model: the next move is always the first one after the latest ``then``,
  instead of a position to find again in the prompt (the measured alternatives are in
  ``WarmStartConfig``'s docstring). An easy move is one lookup and is always right. A hard move's
  written result is, with probability ``TraceStyle.guess_error``, the fast and typical mistake
  F[x]: one hop forgotten. With ``guess_error`` > 0.5 the greedy model copies the mistake, so its
  direct answer to a hard move is unreliable;
* a *check* episode after a move that redoes it one hop at a time and is always right:
  ``check 6>4>1`` after a hard move, ``check 6>4`` after an easy one. Later moves continue from its
  value, so a check after a hard move repairs a likely wrong guess (USEFUL, probability
  ``hard_check``) and a check after an easy move restates what was already right (REDUNDANT,
  probability ``easy_check``);
* further redundant episodes: ``again 6>4 then >>`` repeats the current move (``repeat``) and
  ``goal from 6: >> > >>`` restates the problem first (``restate``).

F is a permutation, so an unchecked wrong guess stays wrong: the walk is one hop short on the
cycle from then on and the boxed answer is wrong (exactly when there is an unchecked wrong guess,
for fewer than ten of them), like a fast thinker who skipped the check.
:func:`forced_answer_example` builds the forced-answer examples (a trace cut at an episode
boundary, the force-answer suffix, and the TRUE answer) that make J(s_k) of METHOD.md §2
meaningful after SFT.

The held-out split is defined by a hash of the problem text (:func:`split_of`), so it is disjoint
from every training set, whatever its seed or size. There are only 10·2^n problems of level n (20
of level 1, 640 of level 6), so the held-out split of a low level is small (3 problems of level 1,
about 6 of level 2); :func:`held_out_problems` returns all of a level's held-out problems when it
has fewer than asked.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

from .common import (  # the task-independent pieces, shared with the arithmetic task and re-exported here
    HELDOUT_SHARE,
    ChainProblem,
    EpisodeInfo,
    Split,
    Step,
    Trace,
    TraceEpisode,
    build_chain_trace,
    classify_with,
    draw_problems,
    forced_answer_example,
    render_trace,
    restatement_text,
    split_of,
    task_prompt,
)
from .common import TraceStyle as _BaseStyle

PERM: tuple[int, ...] = (3, 7, 0, 9, 1, 6, 4, 2, 5, 8)  # F: one 10-cycle 0>3>9>8>5>6>4>1>7>2>0
MAX_LEVEL = 6
LEVELS = tuple(range(1, MAX_LEVEL + 1))
HELDOUT_SEED = 1_000_003
MAX_STEPS = 64  # the most moves a problem may have
EASY, HARD = ">", ">>"
MoveSymbol = Literal[">", ">>"]
_ENUMERATE_UP_TO = 50_000  # held_out_problems enumerates a level's problems up to this many

__all__ = [
    "PERM", "MAX_LEVEL", "LEVELS", "HELDOUT_SEED", "HELDOUT_SHARE", "MAX_STEPS", "EASY", "HARD",
    "Move", "Step", "Problem", "make_problem", "split_of", "dataset", "held_out_problems", "build_task_prompt",
    "TraceStyle", "TraceEpisode", "Trace", "render_trace", "step_text", "check_text", "fast_guess",
    "build_trace", "trace", "forced_answer_example", "EpisodeInfo", "classify_episodes", "moves_text",
    "FaultKind", "FAULT_KINDS", "Fault", "first_fault", "replay", "READ_FAULTS", "StepRead", "step_reads",
]


def hop(x: int, n: int = 1) -> int:
    """F applied ``n`` times to the digit ``x``."""
    if not isinstance(x, int) or not 0 <= x <= 9:
        raise ValueError(f"hop: x must be a digit 0..9, got {x!r}")
    for _ in range(n):
        x = PERM[x]
    return x


# --------------------------------------------------------------------------------------------
# Moves and problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """``>`` (one hop, easy) or ``>>`` (two hops, hard)."""

    symbol: str

    def __post_init__(self) -> None:
        if self.symbol not in (EASY, HARD):
            raise ValueError(f"Move: unknown move {self.symbol!r}; use {EASY!r} (one hop) or {HARD!r} (two hops)")

    @property
    def hard(self) -> bool:
        return self.symbol == HARD

    @property
    def hops(self) -> int:
        return 2 if self.hard else 1

    @property
    def text(self) -> str:
        return self.symbol

    def apply(self, x: int) -> int:
        """The digit after this move: F[x] or F[F[x]]."""
        return hop(x, self.hops)


@dataclass(frozen=True)
class Problem(ChainProblem):
    """A walk problem, e.g. ``from 6: >> > >>`` (fields ``id``, ``problem``, ``answer``, ``steps`` =
    the level, ``start`` from :class:`~.common.ChainProblem`); its actions are ``moves``."""

    moves: tuple[Move, ...]

    @property
    def actions(self) -> tuple[Move, ...]:
        return self.moves

    @property
    def expression(self) -> str:
        """The statement: ``from 6: >> > >>``."""
        return statement(self.start, self.moves)


def moves_text(moves: Sequence[Move]) -> str:
    """``>> > >>``: moves separated by spaces."""
    return " ".join(m.text for m in moves)


def statement(start: int, moves: Sequence[Move]) -> str:
    """``from 6: >> > >>``: the start digit and the moves."""
    return f"from {start}: {moves_text(moves)}"


def _problem(start: int, moves: tuple[Move, ...], idx: int) -> Problem:
    x = start
    for m in moves:
        x = m.apply(x)
    text = statement(start, moves)
    return Problem(f"walk-{len(moves)}-{idx}", text, str(x), len(moves), start, moves)


def _check_steps(steps, where: str) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{where}: steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")


def make_problem(rng: random.Random, steps: int, idx: int = 0, hard_prob: float = 0.5) -> Problem:
    """A random walk of ``steps`` moves from a uniform start; each is hard with probability ``hard_prob``."""
    _check_steps(steps, "make_problem")
    if not 0.0 <= hard_prob <= 1.0:
        raise ValueError(f"make_problem: hard_prob must be in [0, 1], got {hard_prob}")
    start = rng.randrange(10)
    moves = tuple(Move(HARD if rng.random() < hard_prob else EASY) for _ in range(steps))
    return _problem(start, moves, idx)


def dataset(n: int, min_steps: int = 1, max_steps: int = 4, seed: int = 0, *, split: Split = "train",
            hard_prob: float = 0.5, unique: bool = False) -> list[Problem]:
    """``n`` problems of the ``split``, levels uniform in [min_steps, max_steps] (at most
    ``MAX_STEPS``), deterministic by ``seed``. ``unique`` drops repeated problem texts (it fails
    when the pool is too small: a level n has only 10·2^n problems, one in HELDOUT_SHARE of them
    held out)."""
    rng = random.Random(f"walk:{split}:{seed}")
    return draw_problems(rng, n, min_steps, max_steps, split, unique,
                         lambda r, steps, i: make_problem(r, steps, i, hard_prob), max_level=MAX_STEPS)


def held_out_problems(levels: Sequence[int] = LEVELS, per_level: int = 50, seed: int = HELDOUT_SEED,
                      hard_prob: float = 0.5) -> list[Problem]:
    """Up to ``per_level`` unique held-out problems for every level in ``levels``, level by level.

    A level with at most 50,000 problems is enumerated: its held-out problems are drawn without
    replacement, each with its probability under ``hard_prob`` as weight, and ALL of them are
    returned when there are fewer than ``per_level`` (3 of level 1, about 6 of level 2 for the
    default hash). Larger levels are sampled like :func:`dataset`.
    """
    if per_level < 1:
        raise ValueError(f"held_out_problems: per_level must be >= 1, got {per_level}")
    if not 0.0 <= hard_prob <= 1.0:
        raise ValueError(f"held_out_problems: hard_prob must be in [0, 1], got {hard_prob}")
    out: list[Problem] = []
    for lv in levels:
        _check_steps(lv, "held_out_problems")
        if 10 * 2 ** lv > _ENUMERATE_UP_TO:
            out += dataset(per_level, lv, lv, seed=seed + lv, split="heldout", hard_prob=hard_prob, unique=True)
            continue
        rng = random.Random(f"walk:heldout-levels:{seed + lv}")
        keyed = []
        for start in range(10):
            for hard in itertools.product((False, True), repeat=lv):
                nh = sum(hard)
                w = hard_prob ** nh * (1 - hard_prob) ** (lv - nh)
                moves = tuple(Move(HARD if h else EASY) for h in hard)
                u = rng.random()  # drawn for every problem, so the order does not depend on the split
                if w > 0 and split_of(statement(start, moves)) == "heldout":
                    keyed.append((u ** (1.0 / w), start, moves))  # weighted sampling without replacement
        keyed.sort(key=lambda t: -t[0])
        out += [_problem(start, moves, i) for i, (_, start, moves) in enumerate(keyed[:per_level])]
    return out


def build_task_prompt(problem: Problem | str) -> str:
    """The prompt of the task: just the statement and a newline (see the arithmetic task's
    :func:`~l2t_core.tasks.arithmetic.build_task_prompt` for why the §8 instruction is left out)."""
    return task_prompt(problem.problem if isinstance(problem, Problem) else problem)


# --------------------------------------------------------------------------------------------
# Reference traces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceStyle(_BaseStyle):
    """How a reference trace thinks (fields as in :class:`~.common.TraceStyle`, moves for steps):
    ``guess_error`` is the chance that a hard move's direct result is F[x], one hop forgotten."""

    guess_error: float = 0.6


def step_text(x: int, move: Move, result: int, rest: Sequence[Move]) -> str:
    """The direct episode ``6>>1 then > >>``: the move from ``x``, its ``result`` (may be a wrong
    guess) and the moves still to do, ``rest`` (``then end`` when none)."""
    return f"{x}{move.text}{result} then {moves_text(rest) if rest else 'end'}"


def check_text(x: int, move: Move) -> str:
    """The move redone one hop at a time, ``check 6>4>1``; always right."""
    return "check " + ">".join(str(hop(x, k)) for k in range(move.hops + 1))


def fast_guess(x: int, move: Move) -> int:
    """The typical mistake on a move: one hop forgotten, F applied once too few times."""
    if not move.hard:
        raise ValueError("fast_guess: an easy move is a single lookup and has no fast guess")
    return hop(x, move.hops - 1)


def build_trace(problem: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> Trace:
    """A reference trace of ``problem`` drawn with ``style`` (see the module docstring); a hard
    move's guess is :func:`fast_guess`, one hop forgotten."""
    moves = problem.moves
    return build_chain_trace(problem, rng, style,
                             step_text=lambda i, x, result: step_text(x, moves[i], result, moves[i + 1:]),
                             check_text=lambda i, x: check_text(x, moves[i]),
                             guess=lambda i, x, true: fast_guess(x, moves[i]))


def trace(p: Problem, rng: random.Random, style: TraceStyle = TraceStyle()) -> str:
    """The reference response text of ``p`` (what follows the prompt)."""
    return build_trace(p, rng, style).text


# --------------------------------------------------------------------------------------------
# Reading generated responses
# --------------------------------------------------------------------------------------------

_STEP = re.compile(r"^(\d)(>>?)(\d) then (?:end|>>?(?: >>?)*)$")


def _read_step(m: re.Match[str]) -> EpisodeInfo:
    """A direct move ``6>>1 then > >>``: hard for ``>>``, wrong when 1 is not F[F[6]]."""
    move = Move(m.group(2))
    return EpisodeInfo("step", move.hard, int(m.group(3)) != move.apply(int(m.group(1))))


def classify_episodes(texts: Sequence[str]) -> list[EpisodeInfo]:
    """Kinds of the episode texts of one response, in the vocabulary of the reference traces.

    A direct move ``6>>1 then > >>`` is a step (``hard`` for ``>>``, ``wrong`` when 1 is not F[F[6]]);
    a check or repeat describes the last step before it (so a check of a wrong step is one that
    can repair an error); ``goal ...`` is a restatement; anything else is ``other``.
    """
    return classify_with(texts, _STEP, _read_step)


FaultKind = Literal["unchecked_guess", "easy_wrong", "check_wrong", "lost_value", "wrong_move", "extra_move",
                    "repeat_wrong", "missing_moves", "answer_mismatch", "no_answer", "malformed"]
FAULT_KINDS: tuple[FaultKind, ...] = FaultKind.__args__  # type: ignore[attr-defined]
READ_FAULTS: tuple[FaultKind, ...] = ("wrong_move", "lost_value", "extra_move")  # a step that misreads the walk


@dataclass(frozen=True)
class Fault:
    """Where a response's walk first leaves the true walk for good (:func:`first_fault`).

    ``kind`` is one of :data:`FAULT_KINDS`; ``move`` the 0-based index of the problem's move it
    happened at (the number of moves done when the walk ends early; None for the answer);
    ``misled`` whether a ``then`` list or a restatement before it already disagreed with the
    problem's moves (the walk's own record of what is left to do, which a wrong move may follow);
    ``after`` the kind of the episode just before the faulty one (``step``, ``check``, ``repeat``,
    ``restate``; None for the first episode), or of the last episode for a fault at the end. A step
    right after a check reads its move from the ``then`` list two episodes back; right after a
    repeat (``again 6>4 then >>``), from the episode just before it.
    """

    kind: FaultKind
    move: int | None
    misled: bool = False
    after: str | None = None


class StepRead(NamedTuple):
    """One step of a replayed response (:func:`replay`): ``after`` the kind of the episode before it
    (``step``, ``check``, ``repeat``, ``restate``; None for the first episode), ``right`` whether it
    took the problem's next move from the digit the walk was at, ``episode`` its index among the
    response's episodes, ``digit`` the digit the walk was at (what the step should start from) and
    ``move`` the problem's next move (None for a step past the last move)."""

    after: str | None
    right: bool
    episode: int
    digit: int
    move: Move | None


_REST = re.compile(r" then (end|>>?(?: >>?)*)$")


def first_fault(problem: Problem, texts: Sequence[str], answer: str | None) -> Fault | None:
    """The decisive fault of one response to ``problem`` (:func:`replay`'s first half)."""
    return replay(problem, texts, answer)[0]


def replay(problem: Problem, texts: Sequence[str], answer: str | None) -> tuple[Fault | None, list[StepRead]]:
    """One response to ``problem`` (its episode ``texts`` in order and its extracted final
    ``answer``, None when it gave none) replayed against the true walk: ``(fault, reads)``.

    ``fault`` is its decisive fault, None when the walk is right throughout. ``reads`` lists every
    step up to the fault as a :class:`StepRead`: the kind of the episode just before the step
    (``step``, ``check``, ``repeat``, ``restate``, None for the first episode), whether the step
    took the problem's next move from the digit the walk was at (False only for the step whose
    fault is one of :data:`READ_FAULTS`), and where and what it should have read; steps after the
    fault are left out, since from there on the walk is already wrong.

    The response is replayed against the true walk. A step's written result may be wrong as long
    as a check repairs it before the next step (the reference traces' fast guess): a wrong result
    is a fault (``unchecked_guess`` for a hard move, ``easy_wrong`` for an easy one) only when the
    walk moves on, or ends, without a check to the true value. Otherwise, in order of the episodes:
    a check that ends on another digit (``check_wrong``); a step from a digit other than the one
    the walk is at (``lost_value``); a move other than the problem's next one (``wrong_move``) or
    after its last (``extra_move``); a repeat (``again``) that writes another value than the one
    the walk is at (``repeat_wrong``); an episode of none of the traces' kinds (``malformed``).
    Then at the end: fewer moves than the problem has (``missing_moves``), no answer
    (``no_answer``), an answer other than the value the walk ended on (``answer_mismatch``).
    Restatements change no value; a wrong one shows as the ``misled`` flag of the fault it leads to.
    """
    moves = problem.moves
    value = problem.start  # the digit the walk goes on from; the true one while nothing is pending
    done = 0  # moves done
    last: tuple[int, Move] | None = None  # the start digit and move of the latest step
    pending: Fault | None = None  # a wrong result no check has repaired yet
    misled = False
    prev: str | None = None  # the kind of the episode before the current one
    goal = restatement_text(problem)
    reads: list[StepRead] = []

    def fault(kind: FaultKind, move: int | None) -> Fault:
        return Fault(kind, move, misled, prev)

    def end(f: Fault | None, episode: int = -1) -> tuple[Fault | None, list[StepRead]]:
        if f is not None and f.kind in READ_FAULTS:  # the step that misread the walk
            reads.append(StepRead(f.after, False, episode, value, moves[done] if done < len(moves) else None))
        return f, reads

    for i, raw in enumerate(texts):
        t = raw.strip()
        m = _STEP.match(t)
        if m:
            if pending is not None:
                return end(pending)
            a, move, b = int(m.group(1)), Move(m.group(2)), int(m.group(3))
            if done >= len(moves):
                return end(fault("extra_move", done), i)
            if move != moves[done]:
                return end(fault("wrong_move", done), i)
            if a != value:
                return end(fault("lost_value", done), i)
            rest = _REST.search(t)
            if b != move.apply(a):
                pending = fault("unchecked_guess" if move.hard else "easy_wrong", done)
            if rest is None or rest.group(1) != (moves_text(moves[done + 1:]) or "end"):
                misled = True
            reads.append(StepRead(prev, True, i, value, moves[done]))
            last, value, done, prev = (a, move), b, done + 1, "step"
        elif t.startswith("check "):
            digits = re.findall(r"\d", t)
            if last is None or not digits:
                return end(fault("malformed", done))
            true = last[1].apply(last[0])
            if int(digits[-1]) != true:
                return end(fault("check_wrong", done - 1))
            value, pending, prev = true, None, "check"
        elif t.startswith("again "):
            m = _STEP.match(t[len("again "):].strip())
            if m is None or last is None:
                return end(fault("malformed", done))
            if int(m.group(3)) != value:
                return end(fault("repeat_wrong", done - 1))
            prev = "repeat"
        elif t.startswith("goal "):
            misled = misled or t != goal
            prev = "restate"
        else:
            return end(fault("malformed", done))
    if pending is not None:
        return end(pending)
    if done < len(moves):
        return end(fault("missing_moves", done))
    if answer is None or not answer.strip():
        return end(fault("no_answer", None))
    if answer.strip() != str(value):
        return end(fault("answer_mismatch", None))
    return end(None)


def step_reads(problem: Problem, texts: Sequence[str], answer: str | None) -> list[StepRead]:
    """Every step of a response up to its decisive fault, as :class:`StepRead` (:func:`replay`'s
    second half). The per-context share of misread steps is how reliably a policy carries the walk
    on after a check, a repeat, ..."""
    return replay(problem, texts, answer)[1]
