"""Best-of-N selectors: the L2T score (with each candidate's own answer), log-likelihood and
majority vote choose among known candidates; the oracle bounds them."""

from __future__ import annotations

import math

import pytest

from l2t_core.eval.best_of_n import best_of_n, l2t_scores, loglik_scores
from l2t_core.eval.datasets import load_benchmark
from l2t_core.rollout import Completion


def _cand(tokenizer, answer: str, episodes: int = 2) -> Completion:
    body = "".join(f"<episode_{k}>Step {k}.</episode_{k}>\n" for k in range(1, episodes + 1))
    text = f"<think>\n{body}</think>\n\n\\boxed{{{answer}}}" if answer else f"<think>\n{body}</think>\n\nno idea"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Completion([5, 6, 7], ids, tokenizer.decode(ids, skip_special_tokens=True), True)


@pytest.mark.slow
def test_selectors_on_known_candidates(model, tokenizer):
    items = load_benchmark("math500", limit=3)
    wrong = "123456789"
    groups = [[_cand(tokenizer, wrong), _cand(tokenizer, it.answer), _cand(tokenizer, it.answer, 3),
               _cand(tokenizer, "")] for it in items]
    df = best_of_n(model, tokenizer, items, groups)
    assert len(df) == 3 * 4
    maj = df[df.selector == "majority"]
    assert maj["correct"].all()  # the gold answer appears twice, the wrong one once
    assert df[df.selector == "oracle"]["correct"].all()
    assert (df[df.selector.isin(["l2t", "loglik"])]["chosen"] != 3).all()  # never the answerless one
    cands = groups[0]
    answers = ["123456789", items[0].answer, items[0].answer, None]
    s = l2t_scores(model, tokenizer, cands, answers)
    ll = loglik_scores(model, tokenizer, cands, answers)
    assert all(math.isfinite(x) for x in s[:3] + ll[:3]) and s[3] == -math.inf and ll[3] == -math.inf
    with pytest.raises(ValueError, match="candidate groups"):
        best_of_n(model, tokenizer, items, groups[:1])


def test_a_candidate_cut_while_thinking_is_neither_chosen_nor_counted(model, tokenizer):
    """A candidate that ran into the token limit before </think> gave no answer: the box in its
    unfinished reasoning is neither a vote nor a pick, and the oracle does not count it (it was
    verified on that box, so every selector and the oracle scored the problem solved)."""
    item = load_benchmark("math500", limit=1)[0]
    text = f"<think>\n<episode_1>Maybe \\boxed{{{item.answer}}}? Let me check</episode_1>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = Completion([5, 6, 7], ids, tokenizer.decode(ids, skip_special_tokens=True), False)
    assert item.answer in cut.text
    group = [_cand(tokenizer, "123456789"), cut]
    df = best_of_n(model, tokenizer, [item], [group]).set_index("selector")
    assert not df["correct"].any()
    assert (df.loc[["l2t", "loglik", "majority"], "chosen"] == 0).all()
