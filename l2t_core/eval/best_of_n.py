"""Best-of-N re-ranking with the L2T score, against log-likelihood and majority vote (METHOD.md §7).

For the N sampled candidates of a problem, each with its own extracted answer a_i:

* ``l2t``: ``J(s_K) − J(x) − β Σ_k P̂_k``, the information the reasoning added about its own
  answer minus the compression penalty; J is computed with the candidate's own answer (§2, the
  packed one-pass estimator) and P̂_k normalised over the problem's candidates (§3);
* ``loglik``: the mean token log-probability of the candidate;
* ``majority``: the most frequent answer, mathematically equivalent answers voting together
  (:func:`~l2t_core.eval.runner.majority_classes`; ties to the first).

Candidates without an answer (none boxed, or cut at the token limit before ``</think>``) are never
chosen while another one has an answer. A problem counts as solved by a selector when its chosen
candidate is verified correct against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from ..config import RewardConfig
from ..rewards.l2t import Rollout, compute_rewards, response_logprobs
from ..rollout import Completion
from ..verify import answer_span, extract_boxed
from .datasets import BenchmarkItem
from .metrics import majority_answer
from .runner import cut_while_thinking, majority_classes, verify_completions

SELECTORS = ("l2t", "loglik", "majority")


class _OwnAnswer:
    """Verifier used only so compute_rewards can run: every candidate is 'correct' for its own answer."""

    def verify(self, response: str, reference: str):
        from ..verify import Verdict

        return Verdict(True, "correct", reference)


def l2t_scores(model, tokenizer, candidates: Sequence[Completion], answers: Sequence[str | None],
               cfg: RewardConfig | None = None) -> list[float]:
    """``J(s_K) − J(x) − β Σ_k P̂_k`` per candidate with its own answer; -inf without an answer."""
    cfg = cfg or RewardConfig()
    idx = [i for i, a in enumerate(answers) if a]
    out = [-math.inf] * len(candidates)
    if not idx:
        return out
    rollouts = [Rollout(candidates[i].prompt_ids, candidates[i].response_ids, candidates[i].text, answers[i], 0)
                for i in idx]
    batch = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=_OwnAnswer())
    for i, r in zip(idx, batch.responses):
        j = torch.exp(r.log_j.double())
        out[i] = float(j[-1] - j[0] - cfg.credit.beta * r.penalties_hat.double().sum())
    return out


def loglik_scores(model, tokenizer, candidates: Sequence[Completion], answers: Sequence[str | None],
                  max_tokens: int = 8192, share_prompts: bool = True) -> list[float]:
    """Mean token log-probability per candidate; -inf without an answer or without tokens. The
    candidates of a prompt run it once with ``share_prompts`` (:mod:`l2t_core.prefix_sharing`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rs = [Rollout(c.prompt_ids, c.response_ids, c.text, "", 0) for c in candidates]
    lps = response_logprobs(model, rs, pad, max_tokens, share_prompts=share_prompts)
    return [float(lp.mean()) if a and len(lp) else -math.inf for lp, a in zip(lps, answers)]


def best_of_n(model, tokenizer, items: Sequence[BenchmarkItem], groups: Sequence[Sequence[Completion]],
              cfg: RewardConfig | None = None) -> pd.DataFrame:
    """One row per (problem, selector): the chosen candidate and whether it is correct; plus the
    oracle (any candidate correct) as an upper bound."""
    if len(items) != len(groups):
        raise ValueError(f"best_of_n: {len(items)} items but {len(groups)} candidate groups")
    rows = []
    for item, group in zip(items, groups):
        if not group:
            raise ValueError(f"best_of_n: problem {item.id!r} has no candidates")
        # a candidate cut at the token limit while thinking has no answer, as in evaluate_math
        answers = [None if cut_while_thinking(c) else extract_boxed(answer_span(c.text)) for c in group]
        verdicts = verify_completions(group, [item.accepted_answers] * len(group))
        scores = {"l2t": l2t_scores(model, tokenizer, group, answers, cfg),
                  "loglik": loglik_scores(model, tokenizer, group, answers)}
        chosen = {k: max(range(len(group)), key=lambda i, s=s: (s[i], -i)) for k, s in scores.items()}
        maj = majority_answer(majority_classes(answers))
        chosen["majority"] = maj if maj is not None else 0
        for sel in SELECTORS:
            rows.append({"problem_id": item.id, "selector": sel, "chosen": chosen[sel],
                         "correct": bool(verdicts[chosen[sel]].correct), "n": len(group)})
        rows.append({"problem_id": item.id, "selector": "oracle", "chosen": -1,
                     "correct": any(v.correct for v in verdicts), "n": len(group)})
    return pd.DataFrame(rows)
