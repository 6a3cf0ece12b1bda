"""The per-episode reward view: every episode is shown with its numbers, colours follow r_k's
sign, and model text is escaped."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from l2t_core.eval.episode_view import render_episode_rewards, reward_colour
from l2t_core.rewards.l2t import Rollout, compute_rewards
from l2t_core.verify import NumericVerifier


def test_view_of_real_rewards_is_valid_escaped_html(model, tokenizer):
    text = ("<think>\n<episode_1>We add 3 and 4 <b>to</b> get 7.</episode_1>\n<episode_2>Then 7 * 2 = 14."
            "</episode_2>\n</think>\n\nThe answer is \\boxed{14}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Compute (3 + 4) * 2.", add_special_tokens=False)["input_ids"]
    rollouts = [Rollout(prompt, ids, text, "14", 0), Rollout(prompt, ids, text, "15", 0)]
    batch = compute_rewards(model, tokenizer, rollouts, "l2t", verifier=NumericVerifier())
    page = render_episode_rewards([("right", batch.responses[0]), ("wrong", batch.responses[1])])
    assert "<b>to</b>" not in page and "&lt;b&gt;to&lt;/b&gt;" in page
    assert page.count("class='ep'") == 4 and "G_k" in page
    for k, r in enumerate(batch.responses[0].process):
        assert f"r_k {float(r):+.4f}" in page

    class Check(HTMLParser):
        pass

    Check().feed(page)  # parses without error
    with pytest.raises(ValueError, match="no responses"):
        render_episode_rewards([])


def test_colours():
    assert reward_colour(0.0, 1.0) == "rgb(255,255,255)"
    assert reward_colour(1.0, 1.0) == "rgb(102,255,102)" and reward_colour(-2.0, 1.0) == "rgb(255,102,102)"
    assert reward_colour(float("nan"), 1.0) == "rgb(255,255,255)"
