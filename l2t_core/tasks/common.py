"""The task-independent pieces of the synthetic tasks (:mod:`.walk`, :mod:`.arithmetic`).

Both tasks are chains: a start digit and a sequence of ACTIONS (the arithmetic task's terms
``+7*8``, the walk's moves ``>>``), each easy or hard, applied one after the other to a running
digit. An action is any object with ``hard`` (bool), ``text`` (str) and ``apply(x) -> int``. A
task supplies its actions, how a step and its check are written and its fast guess; this module
holds what does not depend on them: the problem and step records, the draw loop and the held-out
split, the prompt, the reference-trace loop and records, the forced-answer examples and the
episode classifier. The task modules re-export these, so ``task.split_of`` and the like work
for either task.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Sequence

from ..episodes import segment
from ..prompts import FORCE_ANSWER_SUFFIX, render_answer

HELDOUT_SHARE = 8  # one problem text in 8 belongs to the held-out split

Split = Literal["train", "heldout"]
EpisodeKind = Literal["restate", "step", "check", "repeat", "other"]


# --------------------------------------------------------------------------------------------
# Steps and problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One action applied to the running digit: ``before action = after`` (true values)."""

    action: Any  # the task's action: a Term or a Move
    before: int
    after: int

    @property
    def hard(self) -> bool:
        return self.action.hard


@dataclass(frozen=True)
class ChainProblem:
    """The fields and steps shared by the tasks' ``Problem``; a task's subclass adds the field
    holding its actions (``terms``, ``moves``), returns it from :attr:`actions` and writes its
    :attr:`expression`. ``steps`` is the number of actions, i.e. the difficulty level."""

    id: str
    problem: str  # the statement
    answer: str  # the exact final digit as text
    steps: int
    start: int

    @property
    def actions(self) -> tuple:
        raise NotImplementedError

    @property
    def level(self) -> int:
        return self.steps

    def step_list(self) -> tuple[Step, ...]:
        out, x = [], self.start
        for a in self.actions:
            out.append(Step(a, x, a.apply(x)))
            x = out[-1].after
        return tuple(out)

    @property
    def num_hard(self) -> int:
        return sum(a.hard for a in self.actions)


def split_of(problem_text: str) -> Split:
    """The split a problem text belongs to, from a stable hash: 'heldout' for 1 in HELDOUT_SHARE."""
    h = int.from_bytes(hashlib.blake2b(problem_text.encode(), digest_size=8).digest(), "big")
    return "heldout" if h % HELDOUT_SHARE == 0 else "train"


def draw_problems(rng: random.Random, n: int, min_steps: int, max_steps: int, split: Split, unique: bool,
                  make: Callable[[random.Random, int, int], Any], max_level: int | None = None) -> list:
    """``n`` problems drawn with ``make(rng, steps, index)`` (steps uniform in [min_steps, max_steps]),
    kept when the hash of their text puts them in ``split`` and, with ``unique``, when the text is
    new. Shared by the tasks' ``dataset``, whose arguments it checks (``max_level``: the largest
    level the task allows, None for no limit); fails clearly when the pool is too small."""
    if n < 0:
        raise ValueError(f"dataset: n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps or (max_level is not None and max_steps > max_level):
        bound = "" if max_level is None else f" <= {max_level}"
        raise ValueError(f"dataset: need 1 <= min_steps <= max_steps{bound}, got {min_steps}, {max_steps}")
    if split not in ("train", "heldout"):
        raise ValueError(f"dataset: split must be 'train' or 'heldout', got {split!r}")
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

    ``guess_error``: a hard step's direct result is the task's fast guess, a wrong digit.
    ``hard_check``: a check episode follows a hard step (useful: it repairs a wrong guess).
    ``easy_check``: a check episode follows an easy step (redundant).
    ``repeat``: a step is repeated verbatim after its episodes (redundant).
    ``restate``: the trace first restates the problem (redundant).
    ``concise``: the whole trace is drawn concise instead, with no redundant episode at all (no
    restatement, no check of an easy step, no repeat; hard steps checked with ``hard_check`` as
    usual). A base trained only on wordy traces has never seen the short contexts a shortening
    policy writes, and reads its next step worse in them (measured in ``docs/miniature/``); a share
    of concise traces shows it those contexts. Most traces stay wordy, but the greedy base comes out
    far less wordy than the share suggests (0.2 on the walk: 1.31x the necessary trace, not 2.26x).
    """

    guess_error: float = 0.5
    hard_check: float = 0.8
    easy_check: float = 0.6
    repeat: float = 0.1
    restate: float = 0.2
    concise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("guess_error", "hard_check", "easy_check", "repeat", "restate", "concise"):
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


def restatement_text(problem: ChainProblem) -> str:
    """The restatement episode of ``problem`` as reference traces write it: ``goal`` and the problem
    word for word (a generated restatement that differs from it has changed the problem)."""
    return f"goal {problem.expression}"


def build_chain_trace(problem: ChainProblem, rng: random.Random, style: TraceStyle, *,
                      step_text: Callable[[int, int, int], str], check_text: Callable[[int, int], str],
                      guess: Callable[[int, int, int], int]) -> Trace:
    """A reference trace of ``problem`` drawn with ``style``, shared by the tasks' ``build_trace``.

    The task writes step ``i`` from the running digit ``x``: ``step_text(i, x, result)`` is its
    direct episode (``result`` may be a wrong guess), ``check_text(i, x)`` its always-right
    check, and ``guess(i, x, true)`` the fast guess written, with probability
    ``style.guess_error``, for a hard step whose true result is ``true`` (it may draw from ``rng``).
    A trace optionally restates the problem (``goal ...``); then, for every step, its direct
    episode, optionally a check (later steps continue from its true value) and optionally a repeat
    (``again ...`` of the step with the value it ends on). With probability ``style.concise`` the
    trace is drawn with no redundant episode (the draw is made only when ``concise`` > 0, so the
    traces of a style without it are unchanged).
    """
    if style.concise > 0 and rng.random() < style.concise:
        style = replace(style, easy_check=0.0, repeat=0.0, restate=0.0)
    eps: list[TraceEpisode] = []
    if rng.random() < style.restate:
        eps.append(TraceEpisode("restate", restatement_text(problem), None, False, problem.start))
    x = problem.start
    for i, action in enumerate(problem.actions):
        true = action.apply(x)
        written = guess(i, x, true) if action.hard and rng.random() < style.guess_error else true
        eps.append(TraceEpisode("step", step_text(i, x, written), i, action.hard, written))
        value = written
        if rng.random() < (style.hard_check if action.hard else style.easy_check):
            eps.append(TraceEpisode("check", check_text(i, x), i, action.hard, true))
            value = true
        if rng.random() < style.repeat:
            eps.append(TraceEpisode("repeat", "again " + step_text(i, x, value), i, action.hard, value))
        x = value
    return Trace(tuple(eps), x)


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


def classify_with(texts: Sequence[str], step: re.Pattern[str],
                  read_step: Callable[[re.Match[str]], EpisodeInfo]) -> list[EpisodeInfo]:
    """Episode kinds in the reference traces' vocabulary, shared by the tasks: a text that the
    task's ``step`` pattern matches is a direct step, ``read_step(match)`` its info; a check or
    repeat describes the last step before it; ``goal ...`` is a restatement; anything else is
    ``other``."""
    out: list[EpisodeInfo] = []
    last = EpisodeInfo("other")
    for t in texts:
        t = t.strip()
        m = step.match(t)
        if m:
            last = read_step(m)
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
