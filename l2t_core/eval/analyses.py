"""The paper's analyses of reasoning length (METHOD.md §7): budget curves and depth curves.

Both force an answer from a prefix of a response: the prefix, the force-answer suffix f
("</think> ... Please output the final answer directly based on the above steps: ") and a short
generation, scored by the verifier.

* :func:`budget_curve` (Fig. 3): every sampled response truncated at each token budget b
  (responses shorter than b are kept whole and scored as they are); pass@1 against b.
* :func:`depth_curve` (Fig. 1, §3.2): greedy responses to the §8 prompt that asks for at most
  ``max_depth`` segments (:func:`depth_prompt`) force-stopped at the end of each episode
  k = 1..K; Acc(k) (greedy forced answer), maj@m(k) (m sampled forced answers) and T̄(k) (the
  response tokens up to the end of episode k), per difficulty group. A response with fewer than
  k episodes contributes its full answer at depth k, as if it had stopped by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ..episodes import segment, token_episode_ids
from ..prompts import FORCE_ANSWER_SUFFIX, build_prompt, encode_prompt
from ..rewards.l2t import response_offsets
from ..rollout import Completion, RolloutEngine, SamplingParams
from .datasets import BenchmarkItem
from .metrics import maj_at_k
from .runner import group_of, majority_classes, verify_all


def forced_answers(engine: RolloutEngine, tokenizer, contexts: Sequence[Sequence[int]], *, n: int = 1,
                   temperature: float = 0.0, max_new_tokens: int = 32, seed: int = 0) -> list[list[str]]:
    """For each context (prompt + response prefix ids), ``n`` answers forced with the suffix f;
    each returned text starts with f, so the verifier reads the answer after ``</think>``."""
    suffix = tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    groups = engine.generate([list(c) + suffix for c in contexts],
                             SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
    return [[FORCE_ANSWER_SUFFIX + c.text for c in g] for g in groups]


def budget_curve(engine: RolloutEngine, tokenizer, items: Sequence[BenchmarkItem],
                 completions: Sequence[Sequence[Completion]], budgets: Sequence[int], *,
                 answer_tokens: int = 32, verify_workers: int = 1) -> pd.DataFrame:
    """pass@1 per budget over the sampled ``completions`` of ``items`` (one group per item)."""
    if len(items) != len(completions):
        raise ValueError(f"budget_curve: {len(items)} items but {len(completions)} completion groups")
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"budget_curve: budgets must be positive token counts, got {list(budgets)}")
    rows = []
    for b in sorted(set(budgets)):
        texts, accepted, owners, cut_ids = [], [], [], []
        for item, group in zip(items, completions):
            for c in group:
                if len(c.response_ids) <= b and c.finished:
                    texts.append(c.text)
                    accepted.append(item.accepted_answers)
                    owners.append((item, len(c.response_ids)))
                else:
                    cut_ids.append((item, list(c.prompt_ids) + list(c.response_ids[:b]), min(b, len(c.response_ids))))
        if cut_ids:
            forced = forced_answers(engine, tokenizer, [c for _, c, _ in cut_ids], max_new_tokens=answer_tokens)
            for (item, _, used), f in zip(cut_ids, forced):
                texts.append(f[0])
                accepted.append(item.accepted_answers)
                owners.append((item, used))
        verdicts = verify_all(texts, accepted, workers=verify_workers)
        for (item, used), v in zip(owners, verdicts):
            rows.append({"budget": b, "problem_id": item.id, "group": group_of(item), "tokens_used": used,
                         "correct": bool(v.correct)})
    df = pd.DataFrame(rows)
    return (df.groupby(["budget"], as_index=False)
            .agg(pass_at_1=("correct", "mean"), mean_tokens_used=("tokens_used", "mean"), samples=("correct", "size")))


def episode_token_ends(tokenizer, completion: Completion) -> list[int]:
    """Response-token counts at the end of each episode of a completion (empty if untagged)."""
    seg = segment(completion.text)
    if seg.num_episodes == 0:
        return []
    te = token_episode_ids(seg, response_offsets(tokenizer, completion.text, completion.response_ids))
    return [int(x) for x in te.boundaries[1:]]


def depth_curve(engine: RolloutEngine, tokenizer, items: Sequence[BenchmarkItem], *, max_new_tokens: int,
                max_depth: int = 30, maj_samples: int = 4, maj_temperature: float = 0.6,
                answer_tokens: int = 32, seed: int = 0, verify_workers: int = 1) -> pd.DataFrame:
    """Acc(k), maj@m(k) and T̄(k) per group and depth k = 1..max_depth (greedy responses)."""
    greedy = engine.generate([encode_prompt(tokenizer, depth_prompt(i, max_depth)) for i in items],
                             SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    records = []  # (item, depth, context ids, tokens used) or (item, depth, full text, tokens)
    for item, (c,) in zip(items, greedy):
        ends = episode_token_ends(tokenizer, c)
        depth_max = min(max_depth, max(len(ends), 1))
        for k in range(1, depth_max + 1):
            if k <= len(ends) and ends[k - 1] < len(c.response_ids):
                records.append((item, k, list(c.prompt_ids) + list(c.response_ids[:ends[k - 1]]), ends[k - 1]))
            else:  # the response ended within or before episode k: its own answer counts
                records.append((item, k, None, len(c.response_ids), c.text))
    ctx = [r[2] for r in records if r[2] is not None]
    g_ans = iter(forced_answers(engine, tokenizer, ctx, max_new_tokens=answer_tokens)) if ctx else iter(())
    m_ans = iter(forced_answers(engine, tokenizer, ctx, n=maj_samples, temperature=maj_temperature,
                                max_new_tokens=answer_tokens, seed=seed)) if ctx else iter(())
    texts, majs, owners = [], [], []
    for r in records:
        if r[2] is not None:
            texts.append(next(g_ans)[0])
            majs.append(next(m_ans))
        else:
            texts.append(r[4])
            majs.append([r[4]] * maj_samples)
        owners.append(r)
    flat_maj = [t for group in majs for t in group]
    acc = [r.correct for r in verify_all(texts, [o[0].accepted_answers for o in owners], workers=verify_workers)]
    mv = verify_all(flat_maj, [o[0].accepted_answers for o in owners for _ in range(maj_samples)],
                    workers=verify_workers)
    rows = []
    for j, o in enumerate(owners):
        vs = mv[j * maj_samples:(j + 1) * maj_samples]
        maj = maj_at_k(majority_classes([v.extracted for v in vs]), [v.correct for v in vs], maj_samples)
        rows.append({"problem_id": o[0].id, "group": group_of(o[0]), "depth": o[1], "tokens": o[3],
                     "correct": bool(acc[j]), "maj": bool(maj)})
    df = pd.DataFrame(rows)
    return (df.groupby(["group", "depth"], as_index=False)
            .agg(accuracy=("correct", "mean"), maj=("maj", "mean"), mean_tokens=("tokens", "mean"),
                 problems=("problem_id", "nunique")))


def depth_prompt(item: BenchmarkItem, max_depth: int = 30) -> str:
    """The prompt of the depth analysis: METHOD.md §8's template with its §3.2 clause, "Use at
    most ``max_depth`` segments." (30 in the paper). An item with a prompt of its own (a synthetic
    task's held-out problem, :mod:`l2t_core.eval.synthetic`) keeps it, as in every evaluation: its
    model was trained on that prompt, not on the math template."""
    return item.prompt if item.prompt is not None else build_prompt(item.problem, max_episodes=max_depth)
