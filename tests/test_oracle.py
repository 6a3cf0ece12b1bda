"""The oracle redundancy label (reward.oracle, a diagnostic control): labels from the task's own
classifier, charged in the process reward, refused where no task gives labels."""

from __future__ import annotations

import random

import pytest
import torch

from l2t_core.config import RewardConfig, TrainConfig
from l2t_core.rewards.l2t import Rollout, compute_rewards
from l2t_core.rewards.oracle import redundancy_labels
from l2t_core.tasks import arithmetic, walk
from l2t_core.verify import NumericVerifier

WORDY = walk.TraceStyle(guess_error=0.5, hard_check=0.7, easy_check=0.7, repeat=0.4, restate=0.5)


def _redundant(e) -> float:  # the reference trace's own record of what it wrote
    return 1.0 if e.kind in ("restate", "repeat") or (e.kind == "check" and not e.hard) else 0.0


@pytest.mark.parametrize("task", [walk, arithmetic])
def test_labels_are_the_traces_own_kinds(task):
    rng = random.Random(0)
    seen = set()
    for i in range(60):
        p = task.make_problem(rng, rng.randint(1, 5), i)
        style = task.TraceStyle(guess_error=0.5, hard_check=0.7, easy_check=0.7, repeat=0.4, restate=0.5)
        tr = task.build_trace(p, rng, style)
        got = redundancy_labels([e.text for e in tr.episodes], task.__name__.rsplit(".", 1)[-1])
        assert got.tolist() == [_redundant(e) for e in tr.episodes]
        seen.update((e.kind, e.hard) for e in tr.episodes)
    assert {("restate", False), ("repeat", True), ("check", True), ("check", False), ("step", True)} <= seen
    tr = walk.build_trace(walk.make_problem(rng, 5, 0), rng, walk.TraceStyle(guess_error=0.5, hard_check=1.0))
    texts = [e.text for e in tr.episodes]
    bonus = redundancy_labels(texts, "walk", hard_check_bonus=0.5).tolist()
    assert bonus == [-0.5 if e.kind == "check" and e.hard else _redundant(e) for e in tr.episodes]
    assert -0.5 in bonus
    assert redundancy_labels([], "walk").numel() == 0
    assert redundancy_labels(["no such episode"], "walk").tolist() == [0.0]  # unreadable text: not labelled


def test_oracle_label_through_the_reward_path(model, tokenizer):
    """r_k = plain r_k − λ·ℓ_k with ℓ_k the trace's own redundancy, gains and penalties untouched;
    the outcome-only methods ignore it and a TrainConfig refuses it off the labelled task."""
    rng = random.Random(3)
    rollouts, want, paid = [], [], []
    for g in range(2):
        for i in range(3):
            p = walk.make_problem(rng, 4, i)
            tr = walk.build_trace(p, rng, WORDY)
            text = tr.text
            rollouts.append(Rollout(tokenizer(walk.build_task_prompt(p))["input_ids"],
                                    tokenizer(text, add_special_tokens=False)["input_ids"], text, str(p.answer), g))
            want.append([_redundant(e) for e in tr.episodes])
            paid.append([-0.5 if e.kind == "check" and e.hard else _redundant(e) for e in tr.episodes])
    assert any(1.0 in w for w in want) and any(0.0 in w for w in want)
    plain = compute_rewards(model, tokenizer, rollouts, "l2t", verifier=NumericVerifier())
    cfg = RewardConfig(oracle={"coef": 0.8})
    charged = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    for a, b, w in zip(plain.responses, charged.responses, want):
        assert a.labels is None
        assert b.labels.tolist() == w
        torch.testing.assert_close(b.gains, a.gains)
        torch.testing.assert_close(b.penalties_hat, a.penalties_hat)
        torch.testing.assert_close(b.process, a.process - 0.8 * b.labels)
    bonus = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(oracle={"coef": 0.8, "hard_check_bonus": 0.5}),
                            verifier=NumericVerifier())
    assert [b.labels.tolist() for b in bonus.responses] == paid and paid != want
    grpo = compute_rewards(model, tokenizer, rollouts, "grpo", cfg, verifier=NumericVerifier())
    assert all(x.labels is None for x in grpo.responses)
    with pytest.raises(ValueError, match="reward.oracle.coef .* method 'grpo'"):
        TrainConfig(method="grpo", policy="p", reward=cfg)
    with pytest.raises(ValueError, match="the 'walk' task's classifier.*data.source 'math500.jsonl'"):
        TrainConfig(method="l2t", policy="p", reward=cfg, data={"source": "math500.jsonl"})
    with pytest.raises(ValueError, match="the 'arithmetic' task's classifier.*data.source 'walk'"):
        TrainConfig(method="l2t", policy="p", reward={"oracle": {"coef": 1.0, "task": "arithmetic"}})
    TrainConfig(method="l2t_no_penalty", policy="p", reward=cfg)
    with pytest.raises(ValueError, match="task"):
        RewardConfig(oracle={"task": "gsm8k"})
