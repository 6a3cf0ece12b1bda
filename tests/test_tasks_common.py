"""What both synthetic tasks (walk, arithmetic) do alike, tested once for each: determinism, bad
input, hard share, how reference traces guess, check and continue, trace probabilities, the
held-out split, segmentation and classification, forced answers. Each task's own checks (its
answers by an independent oracle, its episode texts, its specifics) are in test_walk.py and
test_task.py."""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import pytest

from l2t_core.episodes import segment
from l2t_core.prompts import FORCE_ANSWER_SUFFIX
from l2t_core.tasks import arithmetic, walk

NO_EXTRAS = dict(hard_check=0.0, easy_check=0.0, repeat=0.0, restate=0.0)


@dataclass(frozen=True)
class Case:
    """A task and the facts about it that its shared tests need."""

    task: ModuleType
    field: str  # the Problem field that holds its actions
    guess_of: Callable[[int], int] | None  # a hard step's fast guess from the digit it starts at (None: random)
    errors_cancel: bool  # whether two unchecked wrong guesses can still give the right answer

    def actions(self, p) -> tuple:
        return getattr(p, self.field)


CASES = [
    Case(walk, "moves", lambda x: walk.PERM[x], False),  # one hop forgotten; a 10-cycle never undoes it
    Case(arithmetic, "terms", None, True),  # a uniformly drawn wrong digit; two can cancel mod 10
]


@pytest.fixture(params=CASES, ids=lambda c: c.task.__name__.rsplit(".", 1)[-1])
def case(request) -> Case:
    return request.param


def test_dataset_is_deterministic_by_seed(case):
    dataset = case.task.dataset
    a, b, c = dataset(50, seed=3), dataset(50, seed=3), dataset(50, seed=4)
    assert a == b
    assert [p.problem for p in a] != [p.problem for p in c]


def test_bad_input_raises(case):
    t = case.task
    with pytest.raises(ValueError, match="steps"):
        t.make_problem(random.Random(0), 0)
    with pytest.raises(ValueError, match="hard_prob"):
        t.make_problem(random.Random(0), 2, hard_prob=1.5)
    with pytest.raises(ValueError, match="n must be"):
        t.dataset(-1)
    with pytest.raises(ValueError, match="min_steps"):
        t.dataset(5, 3, 2)
    with pytest.raises(ValueError, match="min_steps"):
        t.dataset(5, 0, 2)
    with pytest.raises(ValueError, match="split"):
        t.dataset(5, split="test")
    with pytest.raises(ValueError, match="per_level"):
        t.held_out_problems(per_level=0)
    with pytest.raises(ValueError):
        t.TraceStyle(guess_error=1.5)
    with pytest.raises(ValueError):
        t.build_task_prompt("  ")


def test_problems_expose_their_actions_and_steps(case):
    for p in case.task.dataset(50, 1, 6, seed=12):
        assert p.actions == case.actions(p) and p.num_hard == sum(a.hard for a in case.actions(p))
        steps = p.step_list()
        assert [s.action for s in steps] == list(case.actions(p)) and [s.hard for s in steps] == [a.hard for a in p.actions]
        assert [s.before for s in steps] == [p.start] + [s.after for s in steps[:-1]]


def test_hard_share_is_controllable(case):
    for hp in (0.2, 0.8):
        actions = [a for p in case.task.dataset(400, 3, 3, seed=2, hard_prob=hp) for a in case.actions(p)]
        assert abs(sum(a.hard for a in actions) / len(actions) - hp) < 0.06


def test_checks_repair_wrong_guesses_and_later_steps_continue_from_them(case):
    t = case.task
    rng = random.Random(0)
    probs = t.dataset(300, 1, 6, seed=5)
    repaired = t.TraceStyle(guess_error=1.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=0.0)
    unchecked = t.TraceStyle(guess_error=1.0, **NO_EXTRAS)
    for p in probs:
        tr = t.build_trace(p, rng, repaired)
        assert str(tr.final) == p.answer
        # every hard step's direct result is the wrong guess (the task's typical mistake where it has
        # one), and a check with the true value follows it
        for e, nxt in zip(tr.episodes, tr.episodes[1:]):
            if e.kind == "step" and e.hard:
                if case.guess_of is not None:
                    assert e.value == case.guess_of(p.step_list()[e.step].before)
                assert nxt.kind == "check" and nxt.value == p.step_list()[e.step].after != e.value
        # each step starts from the value left by the episode before it
        for prev, e in zip(tr.episodes, tr.episodes[1:]):
            if e.kind == "step":
                assert int(e.text[0]) == prev.value
        bad = t.build_trace(p, rng, unchecked)
        if p.num_hard <= 1 or not case.errors_cancel:  # otherwise the errors can cancel
            assert (str(bad.final) == p.answer) == (p.num_hard == 0)  # an unchecked wrong guess stays wrong
        for e, action in zip(bad.episodes, case.actions(p)):  # every hard step is a wrong guess from where it starts
            assert (e.value != action.apply(int(e.text[0]))) == action.hard


def test_trace_probabilities_are_respected(case):
    t = case.task
    rng = random.Random(1)
    style = t.TraceStyle(guess_error=0.3, hard_check=0.7, easy_check=0.4, repeat=0.2, restate=0.25)
    counts = dict(hard=0, easy=0, hard_checked=0, easy_checked=0, wrong=0, repeat=0, steps=0, restate=0)
    probs = t.dataset(1500, 1, 4, seed=6)
    for p in probs:
        eps = t.build_trace(p, rng, style).episodes
        counts["restate"] += eps[0].kind == "restate"
        for i, e in enumerate(eps):
            if e.kind == "step":
                counts["steps"] += 1
                key = "hard" if e.hard else "easy"
                counts[key] += 1
                counts[key + "_checked"] += i + 1 < len(eps) and eps[i + 1].kind == "check"
                counts["wrong"] += e.value != case.actions(p)[e.step].apply(int(e.text[0]))
            counts["repeat"] += e.kind == "repeat"
    assert abs(counts["hard_checked"] / counts["hard"] - 0.7) < 0.04
    assert abs(counts["easy_checked"] / counts["easy"] - 0.4) < 0.04
    assert abs(counts["wrong"] / counts["hard"] - 0.3) < 0.04
    assert abs(counts["repeat"] / counts["steps"] - 0.2) < 0.03
    assert abs(counts["restate"] / len(probs) - 0.25) < 0.04


def _redundant(eps) -> int:
    return sum(e.kind in ("restate", "repeat") or (e.kind == "check" and not e.hard) for e in eps)


def test_concise_traces_drop_every_redundant_episode_and_keep_hard_checks(case):
    t = case.task
    rng = random.Random(3)
    probs = t.dataset(1500, 1, 6, seed=8)
    wordy = dict(guess_error=0.6, hard_check=0.8, easy_check=0.75, repeat=0.75, restate=0.75)
    hard = hard_checked = 0
    for p in probs:  # all concise: no restatement, easy check or repeat; hard steps checked as usual
        eps = t.build_trace(p, rng, t.TraceStyle(**wordy, concise=1.0)).episodes
        assert _redundant(eps) == 0
        for e, nxt in zip(eps, list(eps[1:]) + [None]):
            if e.kind == "step" and e.hard:
                hard += 1
                hard_checked += nxt is not None and nxt.kind == "check"
    assert abs(hard_checked / hard - 0.8) < 0.03
    # a share of concise traces: the rest as wordy as before (trace-level mixture)
    none = sum(_redundant(t.build_trace(p, rng, t.TraceStyle(**wordy, concise=0.3)).episodes) == 0 for p in probs)
    natural = sum(_redundant(t.build_trace(p, rng, t.TraceStyle(**wordy)).episodes) == 0 for p in probs)
    assert abs(none / len(probs) - (0.3 + 0.7 * natural / len(probs))) < 0.04
    with pytest.raises(ValueError, match="concise"):
        t.TraceStyle(concise=1.5)


def test_traces_without_concise_are_the_traces_drawn_before_it_existed():
    """concise = 0 draws nothing extra from the generator, so every warm start made before the
    option rebuilds to the same corpus (digest of 1,200 traces of both tasks, taken before)."""
    import hashlib

    h = hashlib.sha256()
    for task in (walk, arithmetic):
        rng = random.Random(7)
        for p in task.dataset(300, 1, 6, seed=3):
            for st in (task.TraceStyle(), task.TraceStyle(0.6, 0.8, 0.75, 0.75, 0.75)):
                h.update(task.build_trace(p, rng, st).text.encode())
    assert h.hexdigest()[:16] == "8e6f17639ac2c7f6"


def test_held_out_split_is_disjoint_unique_and_deterministic(case):
    t = case.task
    train = {p.problem for p in t.dataset(5000, 1, 6, seed=0)}
    held = t.held_out_problems(per_level=40)
    texts = [p.problem for p in held]
    assert len(set(texts)) == len(texts)
    assert not train & set(texts)
    assert all(t.split_of(x) == "heldout" for x in texts)
    assert all(t.split_of(x) == "train" for x in train)
    assert [p.level for p in held] == sorted(p.level for p in held)  # level by level
    assert held == t.held_out_problems(per_level=40)
    assert t.held_out_problems((6,), 40, seed=1) != t.held_out_problems((6,), 40, seed=2)
    easy_only = t.held_out_problems((4,), 5, hard_prob=0.0)
    assert easy_only and all(p.num_hard == 0 for p in easy_only)


def test_traces_segment_as_tagged_and_classify_back(case):
    t = case.task
    rng = random.Random(2)
    for p in t.dataset(200, 1, 6, seed=7):
        tr = t.build_trace(p, rng, t.TraceStyle(guess_error=0.5, hard_check=0.5, easy_check=0.5, repeat=0.3, restate=0.3))
        seg = segment(tr.text)
        assert seg.status == "tagged"
        assert [e.text for e in seg.episodes] == [e.text for e in tr.episodes]
        assert seg.answer_text.strip() == f"\\boxed{{{tr.final}}}"
        kinds = t.classify_episodes([e.text for e in seg.episodes])
        assert [k.kind for k in kinds] == [e.kind for e in tr.episodes]
        for k, e in zip(kinds, tr.episodes):
            if e.kind != "restate":
                assert k.hard == e.hard
            if e.kind == "step":
                assert k.wrong == (e.value != case.actions(p)[e.step].apply(int(e.text[0])))
            assert k.redundant == (e.kind in ("restate", "repeat") or (e.kind == "check" and not e.hard))


@pytest.mark.parametrize("checks", [0.0, 1.0], ids=["unchecked", "checked"])
def test_forced_answer_examples_cut_at_episode_boundaries(case, checks):
    t = case.task
    p = t.dataset(1, 3, 3, seed=8)[0]
    prompt = t.build_task_prompt(p)
    assert prompt == p.problem + "\n"
    tr = t.build_trace(p, random.Random(0), t.TraceStyle(guess_error=1.0, hard_check=checks, easy_check=checks,
                                                         repeat=0.0, restate=0.0))
    k_max = len(tr.episodes)
    assert t.forced_answer_example(prompt, tr.text, 0, p.answer) == (
        prompt, "", FORCE_ANSWER_SUFFIX, f"\\boxed{{{p.answer}}}")
    for k in range(1, k_max + 1):
        _, prefix, suffix, target = t.forced_answer_example(prompt, tr.text, k, p.answer)
        assert tr.text.startswith(prefix) and prefix.endswith(f"</episode_{k}>\n")
        assert segment(prefix).num_episodes == k and suffix == FORCE_ANSWER_SUFFIX
        assert target == f"\\boxed{{{p.answer}}}"
    with pytest.raises(ValueError):
        t.forced_answer_example(prompt, tr.text, k_max + 1, p.answer)
    with pytest.raises(ValueError, match="tagged"):
        t.forced_answer_example(prompt, "no tags here", 0, p.answer)
