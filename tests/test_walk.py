"""The digit-walk task: problems, reference traces, splits, forced answers, task selection."""

from __future__ import annotations

import random

import pytest

from l2t_core.config import DataConfig
from l2t_core.episodes import segment
from l2t_core.models import build_char_tokenizer
from l2t_core.prompts import FORCE_ANSWER_SUFFIX
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
    fast_guess,
    forced_answer_example,
    held_out_problems,
    make_problem,
    split_of,
    step_text,
)
from l2t_core.training_data import load_training_problems, verifier_for

NO_EXTRAS = dict(hard_check=0.0, easy_check=0.0, repeat=0.0, restate=0.0)


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


def test_dataset_is_deterministic_by_seed():
    a, b, c = dataset(50, seed=3), dataset(50, seed=3), dataset(50, seed=4)
    assert a == b
    assert [p.problem for p in a] != [p.problem for p in c]


def test_levels_and_answers_by_hand():
    probs = dataset(400, 1, 6, seed=1)
    assert {p.level for p in probs} == set(range(1, 7))
    for p in probs:
        assert p.level == p.steps == len(p.moves)
        assert p.problem == p.expression and p.problem.startswith(f"from {p.start}: ")
        vals = walk_by_hand(p)
        assert str(vals[-1]) == p.answer
        assert [s.after for s in p.step_list()] == vals[1:]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="steps"):
        make_problem(random.Random(0), 0)
    with pytest.raises(ValueError, match="steps"):
        make_problem(random.Random(0), MAX_STEPS + 1)
    with pytest.raises(ValueError, match="hard_prob"):
        make_problem(random.Random(0), 2, hard_prob=1.5)
    with pytest.raises(ValueError):
        dataset(5, 3, 2)
    with pytest.raises(ValueError):
        dataset(5, split="test")
    with pytest.raises(ValueError, match="ask for fewer"):
        dataset(30, 1, 1, split="heldout", unique=True)  # level 1 has only 20 problems
    with pytest.raises(ValueError, match="per_level"):
        held_out_problems(per_level=0)
    with pytest.raises(ValueError):
        TraceStyle(guess_error=1.5)
    with pytest.raises(ValueError, match="unknown move"):
        Move("->")
    with pytest.raises(ValueError, match="easy move"):
        fast_guess(3, Move(EASY))
    with pytest.raises(ValueError):
        build_task_prompt("  ")
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


def test_hard_share_is_controllable():
    for hp in (0.2, 0.8):
        moves = [m for p in dataset(400, 3, 3, seed=2, hard_prob=hp) for m in p.moves]
        assert abs(sum(m.hard for m in moves) / len(moves) - hp) < 0.06


def test_checks_repair_wrong_guesses_and_later_moves_continue_from_them():
    rng = random.Random(0)
    probs = dataset(300, 1, 6, seed=5)
    repaired = TraceStyle(guess_error=1.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=0.0)
    unchecked = TraceStyle(guess_error=1.0, **NO_EXTRAS)
    for p in probs:
        tr = build_trace(p, rng, repaired)
        assert str(tr.final) == p.answer
        # every hard move's direct result is the typical mistake, and a check with the true value follows it
        for e, nxt in zip(tr.episodes, tr.episodes[1:]):
            if e.kind == "step" and e.hard:
                before = p.step_list()[e.step].before
                assert e.value == PERM[before]
                assert nxt.kind == "check" and nxt.value == p.step_list()[e.step].after != e.value
        # each move starts from the value left by the episode before it
        for prev, e in zip(tr.episodes, tr.episodes[1:]):
            if e.kind == "step":
                assert int(e.text[0]) == prev.value
        bad = build_trace(p, rng, unchecked)
        assert (str(bad.final) == p.answer) == (p.num_hard == 0)  # an unchecked wrong guess stays wrong
        for e, move in zip(bad.episodes, p.moves):
            assert (e.value != move.apply(int(e.text[0]))) == move.hard


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


def test_trace_probabilities_are_respected():
    rng = random.Random(1)
    style = TraceStyle(guess_error=0.3, hard_check=0.7, easy_check=0.4, repeat=0.2, restate=0.25)
    counts = dict(hard=0, easy=0, hard_checked=0, easy_checked=0, wrong=0, repeat=0, steps=0, restate=0)
    probs = dataset(1500, 1, 4, seed=6)
    for p in probs:
        eps = build_trace(p, rng, style).episodes
        counts["restate"] += eps[0].kind == "restate"
        for i, e in enumerate(eps):
            if e.kind == "step":
                counts["steps"] += 1
                key = "hard" if e.hard else "easy"
                counts[key] += 1
                counts[key + "_checked"] += i + 1 < len(eps) and eps[i + 1].kind == "check"
                counts["wrong"] += e.value != p.moves[e.step].apply(int(e.text[0]))
            counts["repeat"] += e.kind == "repeat"
    assert abs(counts["hard_checked"] / counts["hard"] - 0.7) < 0.04
    assert abs(counts["easy_checked"] / counts["easy"] - 0.4) < 0.04
    assert abs(counts["wrong"] / counts["hard"] - 0.3) < 0.04
    assert abs(counts["repeat"] / counts["steps"] - 0.2) < 0.03
    assert abs(counts["restate"] / len(probs) - 0.25) < 0.04


def test_held_out_split_is_disjoint_unique_and_capped_by_the_pool():
    train = {p.problem for p in dataset(5000, 1, 6, seed=0)}
    held = held_out_problems(per_level=40)
    texts = [p.problem for p in held]
    assert len(set(texts)) == len(texts)
    assert not train & set(texts)
    assert all(split_of(t) == "heldout" for t in texts)
    assert all(split_of(t) == "train" for t in train)
    per = {lv: sum(p.level == lv for p in held) for lv in range(1, 7)}
    assert [p.level for p in held] == sorted(p.level for p in held)
    # levels with fewer than 40 held-out problems give all of them; level 6 has 640 problems
    for lv in range(1, 7):
        pool = {p.problem for p in held_out_problems((lv,), per_level=10_000)}
        assert per[lv] == min(40, len(pool)) >= 1
        assert len(pool) < 10 * 2 ** lv
    assert per[6] == 40
    assert held == held_out_problems(per_level=40)
    assert held_out_problems((6,), 40, seed=1) != held_out_problems((6,), 40, seed=2)
    easy_only = held_out_problems((4,), 5, hard_prob=0.0)
    assert easy_only and all(p.num_hard == 0 for p in easy_only)


def test_traces_segment_as_tagged_and_classify_back():
    rng = random.Random(2)
    for p in dataset(200, 1, 6, seed=7):
        tr = build_trace(p, rng, TraceStyle(guess_error=0.5, hard_check=0.5, easy_check=0.5, repeat=0.3, restate=0.3))
        seg = segment(tr.text)
        assert seg.status == "tagged"
        assert [e.text for e in seg.episodes] == [e.text for e in tr.episodes]
        assert seg.answer_text.strip() == f"\\boxed{{{tr.final}}}"
        kinds = classify_episodes([e.text for e in seg.episodes])
        assert [k.kind for k in kinds] == [e.kind for e in tr.episodes]
        for k, e in zip(kinds, tr.episodes):
            if e.kind != "restate":
                assert k.hard == e.hard
            if e.kind == "step":
                assert k.wrong == (e.value != p.moves[e.step].apply(int(e.text[0])))
            assert k.redundant == (e.kind in ("restate", "repeat") or (e.kind == "check" and not e.hard))
    assert [k.kind for k in classify_episodes(["so the answer", "6>>1", "6>>1 then >>>", "check 6>4>1"])] == [
        "other", "other", "other", "check"]
    wrong, right = classify_episodes(["6>>4 then end", "6>>1 then > >>"])
    assert wrong.wrong and wrong.hard and not right.wrong


def test_forced_answer_examples_cut_at_episode_boundaries():
    p = dataset(1, 3, 3, seed=8)[0]
    prompt = build_task_prompt(p)
    assert prompt == p.problem + "\n"
    tr = build_trace(p, random.Random(0), TraceStyle(guess_error=1.0, hard_check=1.0, easy_check=1.0,
                                                     repeat=0.0, restate=0.0))
    k_max = len(tr.episodes)
    assert forced_answer_example(prompt, tr.text, 0, p.answer) == (
        prompt, "", FORCE_ANSWER_SUFFIX, f"\\boxed{{{p.answer}}}")
    for k in range(1, k_max + 1):
        _, prefix, suffix, target = forced_answer_example(prompt, tr.text, k, p.answer)
        assert tr.text.startswith(prefix) and prefix.endswith(f"</episode_{k}>\n")
        assert segment(prefix).num_episodes == k and suffix == FORCE_ANSWER_SUFFIX
        assert target == f"\\boxed{{{p.answer}}}"
    with pytest.raises(ValueError):
        forced_answer_example(prompt, tr.text, k_max + 1, p.answer)
    with pytest.raises(ValueError, match="tagged"):
        forced_answer_example(prompt, "no tags here", 0, p.answer)


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
