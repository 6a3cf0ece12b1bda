"""Budget and depth curves (METHOD.md §7) with the tiny model: truncation, forced answers and
their scoring on responses whose correctness is known."""

from __future__ import annotations

import pytest

from l2t_core.eval.analyses import budget_curve, depth_curve, episode_token_ends, forced_answers
from l2t_core.eval.datasets import load_benchmark
from l2t_core.prompts import FORCE_ANSWER_SUFFIX
from l2t_core.rollout import Completion
from l2t_core.rollout.hf import HFRolloutEngine


def _gold_completion(tokenizer, item, prompt_ids):
    text = (f"<think>\n<episode_1>We compute.</episode_1>\n<episode_2>So it is done.</episode_2>\n</think>\n\n"
            f"\\boxed{{{item.answer}}}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Completion(prompt_ids, ids, tokenizer.decode(ids, skip_special_tokens=True), True)


def test_episode_ends_and_forced_answers(model, tokenizer):
    items = load_benchmark("math500", limit=3)
    c = _gold_completion(tokenizer, items[0], [5, 6])
    ends = episode_token_ends(tokenizer, c)
    assert len(ends) == 2 and 0 < ends[0] < ends[1] <= len(c.response_ids)
    assert tokenizer.decode(c.response_ids[:ends[0]]).rstrip().endswith("</episode_1>")
    out = forced_answers(HFRolloutEngine(model, tokenizer), tokenizer, [[5, 6, 7], [8]], n=2, max_new_tokens=3)
    assert [len(g) for g in out] == [2, 2] and all(t.startswith(FORCE_ANSWER_SUFFIX) for g in out for t in g)


@pytest.mark.slow
def test_budget_curve_keeps_short_finished_answers_and_forces_long_ones(model, tokenizer):
    items = load_benchmark("math500", limit=6)
    groups = [[_gold_completion(tokenizer, it, [5, 6])] * 2 for it in items]
    longest = max(len(c.response_ids) for g in groups for c in g)
    df = budget_curve(HFRolloutEngine(model, tokenizer), tokenizer, items, groups, [2, longest], answer_tokens=4)
    full = df[df["budget"] == longest].iloc[0]
    assert full["pass_at_1"] == 1.0 and full["samples"] == 12  # every gold response fits and is correct
    cut = df[df["budget"] == 2].iloc[0]
    assert cut["mean_tokens_used"] == 2 and cut["pass_at_1"] < 1.0  # the tiny model cannot answer from 2 tokens
    with pytest.raises(ValueError, match="budgets"):
        budget_curve(HFRolloutEngine(model, tokenizer), tokenizer, items, groups, [0])


@pytest.mark.slow
def test_depth_curve_rows(model, tokenizer):
    items = load_benchmark("math500", limit=4)
    df = depth_curve(HFRolloutEngine(model, tokenizer), tokenizer, items, max_new_tokens=8, maj_samples=2,
                     answer_tokens=3)
    assert set(df.columns) >= {"group", "depth", "accuracy", "maj", "mean_tokens", "problems"}
    assert df["problems"].sum() >= len(items) and (df["depth"] >= 1).all()
    assert df["accuracy"].between(0, 1).all() and df["maj"].between(0, 1).all()


def test_depth_curve_prompts_ask_for_at_most_max_depth_segments(model, tokenizer):
    """METHOD.md §8: the §3.2 depth analysis uses the template with "at most 30" segments."""
    from l2t_core.eval.analyses import depth_prompt
    from l2t_core.prompts import build_prompt, encode_prompt

    items = load_benchmark("math500", limit=2)
    assert "Use at most 30 segments." in depth_prompt(items[0])
    assert depth_prompt(items[0], 12) == build_prompt(items[0].problem, max_episodes=12)
    from l2t_core.eval.synthetic import HeldOutOptions, load_heldout

    walk = load_heldout("walk_heldout", HeldOutOptions(levels=[2], per_level=1))[0]
    assert walk.prompt and depth_prompt(walk) == walk.prompt  # a synthetic task's own prompt
    engine = HFRolloutEngine(model, tokenizer)
    seen = []
    generate = engine.generate

    def recording(prompts, params):  # the real engine generates; the greedy call's prompts are kept
        seen.append([list(p) for p in prompts])
        return generate(prompts, params)

    engine.generate = recording
    depth_curve(engine, tokenizer, items, max_new_tokens=4, max_depth=30, maj_samples=1, answer_tokens=2)
    assert seen[0] == [encode_prompt(tokenizer, build_prompt(i.problem, max_episodes=30)) for i in items]
