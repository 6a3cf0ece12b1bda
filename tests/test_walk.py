"""The digit-walk task's own checks: the permutation, answers by hand, moves and episode texts,
wrong answers exactly after unchecked guesses, the held-out pool's caps, classification of odd
texts, the char tokenizer, task selection. What it shares with the arithmetic task is tested for
both in test_tasks_common.py."""

from __future__ import annotations

import random

import pytest

from l2t_core.config import DataConfig
from l2t_core.models import build_char_tokenizer
from l2t_core.tasks import get_task, task_of
from l2t_core.tasks.walk import (
    EASY,
    HARD,
    MAX_STEPS,
    PERM,
    Move,
    Problem,
    TraceStyle,
    build_task_prompt,
    build_trace,
    check_text,
    classify_episodes,
    dataset,
    first_fault,
    fast_guess,
    held_out_problems,
    make_problem,
    step_text,
)
from l2t_core.training_data import load_training_problems, verifier_for


def walk_by_hand(p: Problem) -> list[int]:
    """The digit after each move, by reading the problem text and hopping on PERM."""
    head, moves = p.problem.split(": ")
    x = int(head.removeprefix("from "))
    out = [x]
    for tok in moves.split(" "):
        for _ in range({">": 1, ">>": 2}[tok]):
            x = PERM[x]
        out.append(x)
    return out


def test_permutation_is_one_cycle_so_a_forgotten_hop_is_always_wrong():
    assert sorted(PERM) == list(range(10))
    x, seen = 0, []
    for _ in range(10):
        seen.append(x)
        x = PERM[x]
    assert x == 0 and sorted(seen) == list(range(10))
    for x in range(10):
        assert fast_guess(x, Move(HARD)) == PERM[x] != Move(HARD).apply(x)


def test_levels_and_answers_by_hand():
    probs = dataset(400, 1, 6, seed=1)
    assert {p.level for p in probs} == set(range(1, 7))
    for p in probs:
        assert p.level == p.steps == len(p.moves)
        assert p.problem == p.expression and p.problem.startswith(f"from {p.start}: ")
        vals = walk_by_hand(p)
        assert str(vals[-1]) == p.answer
        assert [s.after for s in p.step_list()] == vals[1:]


def test_bad_input_raises():  # (the input both tasks check: test_tasks_common.py)
    with pytest.raises(ValueError, match="steps"):
        make_problem(random.Random(0), MAX_STEPS + 1)
    with pytest.raises(ValueError, match=f"max_steps <= {MAX_STEPS}"):
        dataset(5, 1, MAX_STEPS + 1)
    with pytest.raises(ValueError, match="steps"):
        held_out_problems((MAX_STEPS + 1,))
    with pytest.raises(ValueError, match="ask for fewer"):
        dataset(30, 1, 1, split="heldout", unique=True)  # level 1 has only 20 problems
    with pytest.raises(ValueError, match="unknown move"):
        Move("->")
    with pytest.raises(ValueError, match="easy move"):
        fast_guess(3, Move(EASY))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
    with pytest.raises(ValueError, match="not a problem"):
        task_of("from 6: >")


def test_moves_and_episode_texts():
    easy, hard = Move(EASY), Move(HARD)
    assert hard.hard and not easy.hard and hard.hops == 2 and easy.hops == 1
    assert easy.apply(6) == PERM[6] == 4 and hard.apply(6) == PERM[4] == 1
    assert step_text(6, hard, 1, (easy, hard)) == "6>>1 then > >>" and step_text(6, easy, 4, ()) == "6>4 then end"
    assert check_text(6, hard) == "check 6>4>1"
    assert check_text(6, easy) == "check 6>4"


def test_reference_answer_is_right_exactly_without_an_unchecked_wrong_guess():
    rng = random.Random(4)
    style = TraceStyle(guess_error=0.6, hard_check=0.5, easy_check=0.5, repeat=0.3, restate=0.3)
    seen = set()
    for p in dataset(600, 1, 6, seed=11):
        tr = build_trace(p, rng, style)
        unchecked_wrong = False
        eps = tr.episodes
        for i, e in enumerate(eps):
            if e.kind == "step":
                wrong = e.value != p.moves[e.step].apply(int(e.text[0]))
                checked = i + 1 < len(eps) and eps[i + 1].kind == "check"
                unchecked_wrong |= wrong and not checked
        assert (str(tr.final) == p.answer) == (not unchecked_wrong)
        seen.add(unchecked_wrong)
    assert seen == {True, False}


def test_held_out_split_is_capped_by_the_pool():
    held = held_out_problems(per_level=40)
    per = {lv: sum(p.level == lv for p in held) for lv in range(1, 7)}
    # levels with fewer than 40 held-out problems give all of them; level 6 has 640 problems
    for lv in range(1, 7):
        pool = {p.problem for p in held_out_problems((lv,), per_level=10_000)}
        assert per[lv] == min(40, len(pool)) >= 1
        assert len(pool) < 10 * 2 ** lv
    assert per[6] == 40


def test_classify_episodes_reads_moves_and_nothing_else():
    assert [k.kind for k in classify_episodes(["so the answer", "6>>1", "6>>1 then >>>", "check 6>4>1"])] == [
        "other", "other", "other", "check"]
    wrong, right = classify_episodes(["6>>4 then end", "6>>1 then > >>"])
    assert wrong.wrong and wrong.hard and not right.wrong


def test_char_tokenizer_covers_every_character_of_the_task():
    tok = build_char_tokenizer()
    rng = random.Random(3)
    style = TraceStyle(guess_error=0.5, hard_check=1.0, easy_check=1.0, repeat=1.0, restate=1.0)
    for p in dataset(50, 1, 6, seed=9):
        text = build_task_prompt(p) + build_trace(p, rng, style).text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_task_selection_in_training_data():
    for source in ("walk", "arithmetic"):
        cfg = DataConfig(source=source, train_size=30, min_steps=2, max_steps=3)
        probs = load_training_problems(cfg)
        task = get_task(source)
        assert [p.prompt for p in probs] == [task.build_task_prompt(q) for q in task.dataset(30, 2, 3, seed=0)]
        assert {p.level for p in probs} <= {2, 3}
        assert type(verifier_for(cfg)).__name__ == "NumericVerifier"
    assert DataConfig().source == "walk"
    assert task_of(dataset(1)[0]) is get_task("walk")


def _replay(p: Problem, episodes: list[str], answer: str | None):
    f = first_fault(p, episodes, answer)
    return None if f is None else (f.kind, f.move, f.misled, f.after)


def test_first_fault_is_none_exactly_for_the_reference_traces_with_the_right_answer():
    rng = random.Random(5)
    from l2t_core.episodes import segment
    from l2t_core.verify import NumericVerifier

    verifier, seen = NumericVerifier(), {True: 0, False: 0}
    for p in dataset(400, 1, 6, seed=2):
        for style in (TraceStyle(), TraceStyle(hard_check=0.3, easy_check=0.5)):
            text = build_trace(p, rng, style).text
            verdict = verifier.verify(text, p.answer)
            f = first_fault(p, [e.text for e in segment(text).episodes], verdict.extracted)
            seen[verdict.correct] += 1
            # a reference trace is wrong only through a hard move's guess that no check repaired
            assert (f is None) == verdict.correct
            assert f is None or (f.kind, f.misled) == ("unchecked_guess", False)
    assert min(seen.values()) > 50  # both outcomes were exercised


def test_first_fault_names_each_way_a_walk_goes_wrong():
    # from 6: >> > (F: 6>4>1, then 1>7): the answer is 7
    p = Problem("w", "from 6: >> >", "7", 2, 6, (Move(HARD), Move(EASY)))
    assert p.answer == "7" and fast_guess(6, Move(HARD)) == 4
    ok = ["goal from 6: >> >", "6>>4 then >", "check 6>4>1", "again 6>>1 then >", "1>7 then end"]
    assert _replay(p, ok, "7") is None
    assert _replay(p, ["6>>1 then >", "1>7 then end"], "7") is None  # no check needed when right
    # a fast guess the walk moves on from, or ends with, unrepaired
    assert _replay(p, ["6>>4 then >", "4>1 then end"], "1") == ("unchecked_guess", 0, False, None)
    assert _replay(p, ["6>>1 then >", "check 6>4>1", "1>2 then end"], "2") == ("easy_wrong", 1, False, "check")
    assert _replay(p, ["6>>4 then >", "check 6>4", "4>1 then end"], "1") == ("check_wrong", 0, False, "step")
    assert _replay(p, ["6>>1 then >", "5>3 then end"], "3") == ("lost_value", 1, False, "step")
    assert _replay(p, ["6>>4 then >", "check 6>4>1", "1>>7 then end"], "7") == ("wrong_move", 1, False, "check")
    assert _replay(p, ["6>>1 then >", "again 6>>1 then >", "1>7 then end", "7>2 then end"], "2") == \
        ("extra_move", 2, False, "step")
    assert _replay(p, ["6>>1 then >", "again 6>>4 then >"], "7") == ("repeat_wrong", 0, False, "step")
    assert _replay(p, ["goal from 6: >> >", "6>>1 then >"], "1") == ("missing_moves", 1, False, "step")
    assert _replay(p, ok, None) == ("no_answer", None, False, "step")
    assert _replay(p, ok, "3") == ("answer_mismatch", None, False, "step")
    assert _replay(p, ["6>>1 then >", "hmm", "1>7 then end"], "7") == ("malformed", 1, False, "step")
    assert _replay(p, ["check 6>4>1"], "1") == ("malformed", 0, False, None)  # a check of no step
    # the walk's own record of the moves left: a wrong then-list or restatement before the fault
    assert _replay(p, ["6>>1 then end"], "1") == ("missing_moves", 1, True, "step")  # its then-list said 'end'
    assert _replay(p, ["goal from 6: >>", "6>>1 then end"], "1") == ("missing_moves", 1, True, "step")
    assert _replay(p, ["goal from 6: >>", "6>>4 then end"], "4") == ("unchecked_guess", 0, True, "restate")
    assert _replay(p, ["6>>1 then >>", "again 6>>1 then >>", "1>>9 then end"], "9") == \
        ("wrong_move", 1, True, "repeat")


def test_step_reads_lists_each_step_up_to_the_decisive_fault_with_its_context():
    from l2t_core.tasks.walk import StepRead, step_reads

    def reads(p, eps, answer):
        return [(r.after, r.right) for r in step_reads(p, eps, answer)]

    p = Problem("w", "from 6: >> > >", "2", 3, 6, (Move(HARD), Move(EASY), Move(EASY)))  # 6>>1>7>2
    ok = ["goal from 6: >> > >", "6>>4 then > >", "check 6>4>1", "1>7 then >", "again 1>7 then >", "7>2 then end"]
    assert reads(p, ok, "2") == [("restate", True), ("check", True), ("repeat", True)]
    # each read names its episode, the digit the walk was at and the move it should read
    assert step_reads(p, ok, "2") == [StepRead("restate", True, 1, 6, Move(HARD)), StepRead("check", True, 3, 1, Move(EASY)),
                                      StepRead("repeat", True, 5, 7, Move(EASY))]
    assert step_reads(p, ["6>>1 then > >", "1>7 then >", "7>2 then end", "2>0 then end"], "0")[-1] == \
        StepRead("step", False, 3, 2, None)  # past the last move: no move to read
    # a misread step ends the list, marked False with its context
    assert reads(p, ["6>>1 then > >", "check 6>4>1", "1>>9 then >"], "9") == [(None, True), ("check", False)]
    assert reads(p, ["6>>1 then > >", "1>7 then >", "3>9 then end"], "9") == \
        [(None, True), ("step", True), ("step", False)]  # lost value
    # an unchecked guess: the guessing step read its move right; the walk is wrong after it
    assert reads(p, ["6>>4 then > >", "4>1 then >", "1>7 then end"], "7") == [(None, True)]
    assert reads(p, ["6>>4 then > >", "check 6>4", "4>1 then >"], "1") == [(None, True)]  # wrong check
    assert reads(p, ["6>>1 then > >", "hmm", "1>7 then >"], "7") == [(None, True)]  # malformed
    assert reads(p, ["6>>1 then > >", "1>7 then end"], "7") == [(None, True), ("step", True)]  # stops early
