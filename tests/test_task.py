"""The arithmetic task's own checks: answers by brute force, terms and episode texts, held-out
levels, the char tokenizer. What it shares with the walk task is tested for both in
test_tasks_common.py."""

from __future__ import annotations

import random

import pytest

from l2t_core.models import build_char_tokenizer, build_tiny_qwen2, load_policy, reasoning_tags
from l2t_core.prompts import FORCE_ANSWER_SUFFIX
from l2t_core.tasks.arithmetic import (
    Term,
    build_task_prompt,
    build_trace,
    check_text,
    dataset,
    held_out_problems,
    make_problem,
    step_text,
)


def brute_force(expression: str) -> list[int]:
    """Values mod 10 of every prefix of terms, by Python's own evaluation of the expression."""
    cuts = [i for i, c in enumerate(expression) if c in "+-"] + [len(expression)]
    return [eval(expression[:c]) % 10 for c in cuts]  # noqa: S307 - our own generated expression


def test_levels_and_answers_by_brute_force():
    probs = dataset(400, 1, 6, seed=1)
    assert {p.level for p in probs} == set(range(1, 7))
    for p in probs:
        assert p.level == p.steps == len(p.terms)
        assert p.problem == f"Compute ({p.expression}) mod 10."
        vals = brute_force(p.expression)
        assert str(vals[-1]) == p.answer
        assert [s.after for s in p.step_list()] == vals[1:]


def test_bad_input_raises():  # (the input both tasks check: test_tasks_common.py)
    with pytest.raises(ValueError):
        Term("*", (2,))
    with pytest.raises(ValueError, match="factors"):
        Term("+", (2, 3, 4))
    with pytest.raises(ValueError, match="ops"):
        make_problem(random.Random(0), 2, ops="*")


def test_terms_and_episode_texts():
    hard, easy = Term("+", (7, 8)), Term("-", (2,))
    assert hard.hard and not easy.hard and hard.text == "+7*8" and hard.operand == 56
    assert hard.apply(3) == 9 and Term("-", (7, 8)).apply(3) == 7 and easy.apply(1) == 9
    assert step_text(3, hard, 9) == "3+7*8=9"
    assert check_text(3, hard) == "check 7*8=56, 3+6=9"
    assert check_text(3, Term("-", (7, 8))) == "check 7*8=56, 3-6=7"
    assert check_text(3, easy) == "check 3-2=1"


def test_held_out_split_has_every_level_in_full():
    held = held_out_problems(per_level=40)
    assert len({p.problem for p in held}) == len(held) == 240
    assert [p.level for p in held] == [lv for lv in range(1, 7) for _ in range(40)]


def test_char_tokenizer_offsets_round_trip_and_single_tag_tokens(tmp_path):
    tok = build_char_tokenizer()
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for tag in reasoning_tags(30):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    rng = random.Random(3)
    texts = [build_task_prompt(p) + build_trace(p, rng).text for p in dataset(30, 1, 6, seed=9)]
    texts.append("<episode_12>x</episode_12> é ü\t<episode_1x> <think")
    texts.append(texts[0] + FORCE_ANSWER_SUFFIX + "\\boxed{7}")  # a forced-answer context, as J reads it
    # the force-answer instruction is ONE token (METHOD.md §2's suffix f stays short, as with a subword
    # tokenizer); without it every character of f is a token
    assert tok(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"] == [10, tok.convert_tokens_to_ids("</think>"),
                                                                               10, 10, len(tok) - 1]
    assert len(build_char_tokenizer(force_phrase=False)(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]) \
        == len(FORCE_ANSWER_SUFFIX) - len("</think>") + 1
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
