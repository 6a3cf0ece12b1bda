"""The synthetic chain task: problems, reference traces, splits, forced answers, char tokenizer."""

from __future__ import annotations

import random

import pytest

from l2t_core.episodes import segment
from l2t_core.models import build_char_tokenizer, build_tiny_qwen2, load_policy, reasoning_tags
from l2t_core.prompts import FORCE_ANSWER_SUFFIX
from l2t_core.tasks.arithmetic import (
    Term,
    TraceStyle,
    build_task_prompt,
    build_trace,
    check_text,
    classify_episodes,
    dataset,
    forced_answer_example,
    held_out_problems,
    make_problem,
    split_of,
    step_text,
)

NO_EXTRAS = dict(hard_check=0.0, easy_check=0.0, repeat=0.0, restate=0.0)


def brute_force(expression: str) -> list[int]:
    """Values mod 10 of every prefix of terms, by Python's own evaluation of the expression."""
    cuts = [i for i, c in enumerate(expression) if c in "+-"] + [len(expression)]
    return [eval(expression[:c]) % 10 for c in cuts]  # noqa: S307 - our own generated expression


def test_dataset_is_deterministic_by_seed():
    a, b, c = dataset(50, seed=3), dataset(50, seed=3), dataset(50, seed=4)
    assert a == b
    assert [p.problem for p in a] != [p.problem for p in c]


def test_levels_and_answers_by_brute_force():
    probs = dataset(400, 1, 6, seed=1)
    assert {p.level for p in probs} == set(range(1, 7))
    for p in probs:
        assert p.level == p.steps == len(p.terms)
        assert p.problem == f"Compute ({p.expression}) mod 10."
        vals = brute_force(p.expression)
        assert str(vals[-1]) == p.answer
        assert [s.after for s in p.step_list()] == vals[1:]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="steps"):
        make_problem(random.Random(0), 0)
    with pytest.raises(ValueError):
        dataset(5, 3, 2)
    with pytest.raises(ValueError):
        dataset(5, split="test")
    with pytest.raises(ValueError):
        TraceStyle(guess_error=1.5)
    with pytest.raises(ValueError):
        Term("*", (2,))
    with pytest.raises(ValueError):
        build_task_prompt("  ")


def test_terms_and_episode_texts():
    hard, easy = Term("+", (7, 8)), Term("-", (2,))
    assert hard.hard and not easy.hard and hard.text == "+7*8" and hard.operand == 56
    assert hard.apply(3) == 9 and Term("-", (7, 8)).apply(3) == 7 and easy.apply(1) == 9
    assert step_text(3, hard, 9) == "3+7*8=9"
    assert check_text(3, hard) == "check 7*8=56, 3+6=9"
    assert check_text(3, Term("-", (7, 8))) == "check 7*8=56, 3-6=7"
    assert check_text(3, easy) == "check 3-2=1"


def test_hard_share_is_controllable():
    for hp in (0.2, 0.8):
        terms = [t for p in dataset(400, 3, 3, seed=2, hard_prob=hp) for t in p.terms]
        assert abs(sum(t.hard for t in terms) / len(terms) - hp) < 0.06


def test_checks_repair_wrong_guesses_and_later_steps_continue_from_them():
    rng = random.Random(0)
    probs = dataset(300, 1, 6, seed=5)
    repaired = TraceStyle(guess_error=1.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=0.0)
    unchecked = TraceStyle(guess_error=1.0, **NO_EXTRAS)
    for p in probs:
        tr = build_trace(p, rng, repaired)
        assert str(tr.final) == p.answer
        # every hard step's direct result is the wrong guess, and a check with the true value follows it
        for e, nxt in zip(tr.episodes, tr.episodes[1:]):
            if e.kind == "step" and e.hard:
                assert nxt.kind == "check" and nxt.value == p.step_list()[e.step].after != e.value
        # each step starts from the value left by the episode before it
        for prev, e in zip(tr.episodes, tr.episodes[1:]):
            if e.kind == "step":
                assert int(e.text[0]) == prev.value
        bad = build_trace(p, rng, unchecked)
        if p.num_hard <= 1:  # (with two wrong digits the errors can cancel mod 10)
            assert (str(bad.final) == p.answer) == (p.num_hard == 0)
        for e, term in zip(bad.episodes, p.terms):  # every hard step is a wrong guess from where it starts
            assert (e.value != term.apply(int(e.text[0]))) == term.hard


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
                checked = i + 1 < len(eps) and eps[i + 1].kind == "check"
                counts[key + "_checked"] += checked
                counts["wrong"] += e.value != p.terms[e.step].apply(int(e.text[0]))
            counts["repeat"] += e.kind == "repeat"
    assert abs(counts["hard_checked"] / counts["hard"] - 0.7) < 0.04
    assert abs(counts["easy_checked"] / counts["easy"] - 0.4) < 0.04
    assert abs(counts["wrong"] / counts["hard"] - 0.3) < 0.04
    assert abs(counts["repeat"] / counts["steps"] - 0.2) < 0.03
    assert abs(counts["restate"] / len(probs) - 0.25) < 0.04


def test_held_out_split_is_disjoint_and_unique():
    train = {p.problem for p in dataset(5000, 1, 6, seed=0)}
    held = held_out_problems(per_level=40)
    texts = [p.problem for p in held]
    assert len(set(texts)) == len(texts) == 240
    assert not train & set(texts)
    assert all(split_of(t) == "heldout" for t in texts)
    assert all(split_of(t) == "train" for t in train)
    assert [p.level for p in held] == [lv for lv in range(1, 7) for _ in range(40)]
    assert held == held_out_problems(per_level=40)


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
            assert k.redundant == (e.kind in ("restate", "repeat") or (e.kind == "check" and not e.hard))


def test_forced_answer_examples_cut_at_episode_boundaries():
    p = dataset(1, 3, 3, seed=8)[0]
    prompt = build_task_prompt(p)
    assert prompt == p.problem + "\n"
    tr = build_trace(p, random.Random(0), TraceStyle(guess_error=1.0, **NO_EXTRAS))
    k_max = len(tr.episodes)
    assert forced_answer_example(prompt, tr.text, 0, p.answer) == (
        prompt, "", FORCE_ANSWER_SUFFIX, f"\\boxed{{{p.answer}}}")
    for k in range(1, k_max + 1):
        _, prefix, suffix, target = forced_answer_example(prompt, tr.text, k, p.answer)
        assert tr.text.startswith(prefix) and prefix.endswith(f"</episode_{k}>\n")
        assert segment(prefix).num_episodes == k and suffix == FORCE_ANSWER_SUFFIX
    with pytest.raises(ValueError):
        forced_answer_example(prompt, tr.text, k_max + 1, p.answer)


def test_char_tokenizer_offsets_round_trip_and_single_tag_tokens(tmp_path):
    tok = build_char_tokenizer()
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for tag in reasoning_tags(30):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    rng = random.Random(3)
    texts = [build_task_prompt(p) + build_trace(p, rng).text for p in dataset(30, 1, 6, seed=9)]
    texts.append("<episode_12>x</episode_12> é ü\t<episode_1x> <think")
    for text in texts:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        assert offs[0][0] == 0 and offs[-1][1] == len(text)
        assert all(a < b for a, b in offs)
        assert all(prev[1] <= cur[0] for prev, cur in zip(offs, offs[1:]) if prev != cur)
        ascii_pieces = [(i, text[a:b]) for i, (a, b) in enumerate(offs) if text[a:b].isascii()]
        for i, piece in ascii_pieces:
            assert tok.decode([ids[i]]) == piece
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded == text
        assert tok(decoded, add_special_tokens=False)["input_ids"] == ids
    # save_pretrained / load_policy round trip
    model = build_tiny_qwen2(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, tok2 = load_policy(tmp_path)
    assert len(tok2) == len(tok) and tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id
    for text in texts:
        a = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        b = tok2(text, return_offsets_mapping=True, add_special_tokens=False)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"]
    with pytest.raises(ValueError):
        build_char_tokenizer(max_episodes=0)
