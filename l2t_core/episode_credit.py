"""How each method's reward credits each kind of episode, on responses sampled from a model.

The synthetic tasks know what every generated episode does (:meth:`classify_episodes`: a hard or
easy step, a check that repairs a wrong step or confirms a right one, a repeat, a restatement).
That makes the mechanism of a reward visible before any training: a reward that teaches a model
to drop redundant episodes and keep useful ones must give a correct response *without* a
redundant episode a higher group advantage than a correct response *with* one, and must not do
the same to useful checks. :func:`credit_by_kind` samples ``group_size`` responses per problem,
scores the same responses under every method (one :func:`~l2t_core.rewards.l2t.compute_rewards`
call each) and reports, per method:

* ``per_kind``: per episode kind (:attr:`EpisodeInfo.detail_key`), the number of episodes and the
  mean fitting gain G_k, normalised penalty P̂_k, episode reward R_k (METHOD.md §2–§4; zero for
  the outcome-only methods, which have no episode rewards) and mean per-token advantage A_{i,t}
  over the episode's tokens;
* ``with_minus_without``: per kind (:attr:`EpisodeInfo.key`), the mean over cells (the responses
  of one group with one outcome, correct or wrong) of mean A_i(responses containing the kind) −
  mean A_i(responses without it): negative means the method's advantage prefers leaving that kind
  out, the outcome being equal. A reward that keeps useful work has it negative for the redundant
  kinds and not for ``check_hard``;
* ``advantage_length_corr``: the mean within-cell Pearson correlation between A_i and the
  response length (−1: a pure length ranking).

Only responses that segment as tagged (METHOD.md §1) have episode kinds; the share is reported.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Mapping, Sequence

import numpy as np

from .config import RewardConfig
from .rewards.l2t import METHODS, Rollout, compute_rewards
from .verify import NumericVerifier
from .warmstart import _task_of_all, generate

REPORTED_KINDS = ("check_easy", "check_hard", "repeat", "restate")


def method_configs(methods: Sequence[str] | Mapping[str, tuple[str, RewardConfig]]) -> dict[str, tuple[str, RewardConfig]]:
    """``{name: (method, RewardConfig)}`` from method names (paper defaults) or such a mapping."""
    if isinstance(methods, Mapping):
        out = dict(methods)
    else:
        out = {m: (m, RewardConfig()) for m in methods}
    if not out:
        raise ValueError("credit_by_kind: no methods to compare")
    for name, (method, cfg) in out.items():
        if method not in METHODS:
            raise ValueError(f"credit_by_kind: {name!r} uses unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(cfg, RewardConfig):
            raise TypeError(f"credit_by_kind: {name!r} needs a RewardConfig, got {type(cfg).__name__}")
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def kind_effects(cells: Mapping[object, Sequence[tuple[float, Counter, int]]]) -> dict:
    """``with_minus_without`` and ``advantage_length_corr`` from the tagged responses of each cell
    (a group and an outcome): ``(advantage, Counter of EpisodeInfo.key, response tokens)`` each."""
    effects = {}
    for kind in REPORTED_KINDS:
        diffs = []
        for rows in cells.values():
            with_k = [a for a, kinds, _ in rows if kinds[kind] > 0]
            without = [a for a, kinds, _ in rows if kinds[kind] == 0]
            if with_k and without:
                diffs.append(np.mean(with_k) - np.mean(without))
        effects[kind] = {"delta": _mean(diffs), "cells": len(diffs)}
    corrs = []
    for rows in cells.values():
        adv = np.array([a for a, _, _ in rows], dtype=float)
        length = np.array([n for _, _, n in rows], dtype=float)
        if len(rows) >= 2 and adv.std() > 0 and length.std() > 0:
            corrs.append(float(np.corrcoef(adv, length)[0, 1]))
    return {"with_minus_without": effects, "advantage_length_corr": {"mean": _mean(corrs), "cells": len(corrs)}}


def credit_by_kind(model, tokenizer, problems: Sequence, methods: Sequence[str] | Mapping[str, tuple[str, RewardConfig]]
                   = ("grpo", "length_penalty", "l2t"), *, group_size: int = 8, temperature: float = 0.7,
                   max_new_tokens: int = 320, seed: int = 0) -> dict:
    """Per-kind credit of every method on the same ``group_size`` sampled responses per problem
    (see the module docstring for the fields)."""
    if group_size < 2:
        raise ValueError(f"credit_by_kind: group_size must be >= 2 (advantages are relative to the group), got {group_size}")
    if not problems:
        raise ValueError("credit_by_kind: no problems")
    configs = method_configs(methods)
    task = _task_of_all(problems, "credit_by_kind")
    comps = generate(model, tokenizer, problems, max_new_tokens=max_new_tokens, n=group_size,
                     temperature=temperature, seed=seed)
    rollouts = []
    for gid, (p, group) in enumerate(zip(problems, comps)):
        prompt = tokenizer(task.build_task_prompt(p), add_special_tokens=False)["input_ids"]
        rollouts += [Rollout(prompt, list(c.response_ids), c.text, p.answer, gid) for c in group]
    verifier = NumericVerifier()
    report: dict = {"problems": len(problems), "responses": len(rollouts), "group_size": group_size,
                    "temperature": temperature, "methods": {}}
    for name, (method, cfg) in configs.items():
        batch = compute_rewards(model, tokenizer, rollouts, method, cfg, verifier=verifier)
        fields: dict = defaultdict(lambda: defaultdict(list))
        cells: dict = defaultdict(list)
        for r, x in zip(rollouts, batch.responses):
            if x.segmentation.status != "tagged":
                continue
            kinds = task.classify_episodes([e.text for e in x.segmentation.episodes])
            token_adv = x.token_advantage.detach().cpu().numpy()
            for k, info in enumerate(kinds):
                on_k = x.tokens.episode_ids == k
                if not on_k.any():
                    continue
                f = fields[info.detail_key]
                f["token_advantage"].append(float(token_adv[on_k].mean()))
                for key, values in (("gain", x.gains), ("penalty_hat", x.penalties_hat), ("episode_reward", x.episode_reward)):
                    f[key].append(float(values[k]) if k < len(values) else 0.0)
            cells[(r.group_id, x.outcome)].append((x.advantage, Counter(i.key for i in kinds), len(r.response_ids)))
        report["methods"][name] = {
            "method": method,
            "per_kind": {kind: {"n": len(f["token_advantage"]), **{key: _mean(v) for key, v in f.items()}}
                         for kind, f in sorted(fields.items())},
            **kind_effects(cells),
        }
    # of the last method's batch, as scored (the outcome does not depend on the method)
    report["tagged_share"] = float(np.mean([x.segmentation.status == "tagged" for x in batch.responses]))
    report["accuracy"] = float(np.mean([x.outcome for x in batch.responses]))
    return report


def credit_table(report: dict) -> str:
    """Markdown: per method, ``with_minus_without`` per kind and the advantage/length correlation."""
    head = "| method | " + " | ".join(f"{k} (cells)" for k in REPORTED_KINDS) + " | corr(A, length) |"
    lines = [head, "|---" * (len(REPORTED_KINDS) + 2) + "|"]
    for name, m in report["methods"].items():
        cells = []
        for k in REPORTED_KINDS:
            e = m["with_minus_without"][k]
            cells.append("n/a" if e["delta"] is None else f"{e['delta']:+.3f} ({e['cells']})")
        c = m["advantage_length_corr"]["mean"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'n/a' if c is None else f'{c:+.2f}'} |")
    return "\n".join(lines)
