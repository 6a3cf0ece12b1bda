"""The base policy's rollouts and their rewards as table rows (the pipeline's ``rollouts`` and
``episode_rewards`` tables, source ``'base'``).

Before any RL training, the pipeline samples the base policy on the training prompts and scores
those responses under a method, to show what the reward looks like on the starting model:

* :func:`sample_base_rollouts`: ``n`` responses per prompt through the ``hf`` rollout engine,
  segmented into episodes (:func:`l2t_core.episodes.segment`) and verified with the training
  data's verifier; one row per response, token ids kept for the reward step;
* :func:`score_base_rollouts`: the whole reward path of a method
  (:func:`l2t_core.rewards.l2t.compute_rewards`) on those rows: one row per episode
  (:func:`episode_rows`) and the responses with their score and group advantage.

The row columns are those of ``l2t_pipeline.schemas`` (``RolloutsSchema``,
``EpisodeRewardsSchema``); this module needs no Dagster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import DataConfig, RewardConfig
from ..episodes import segment
from ..rewards.l2t import RewardBatch, Rollout, compute_rewards
from ..training_data import verifier_for
from . import SamplingParams, make_rollout_engine

BASE_RUN_ID = "base"  # the run_id of the base policy's rows (training runs have their own ids)

EPISODE_COLUMNS = ["source", "base_model", "method", "run_id", "step", "rollout", "episode", "num_tokens",
                   "fitting_gain", "penalty", "penalty_hat", "process_reward", "outcome_reward", "episode_reward"]


def sample_base_rollouts(model, tokenizer, prompts: pd.DataFrame, data: DataConfig, base_model: str, *,
                         n: int, temperature: float, max_new_tokens: int, seed: int) -> pd.DataFrame:
    """``n`` responses of the base policy per prompt row (``problem_id, prompt, answer, level``),
    segmented into episodes and verified; one row per response (``source='base'``, step 0),
    with the token ids kept in ``prompt_ids`` / ``response_ids`` for the reward step."""
    if prompts.empty:
        raise ValueError("sample_base_rollouts: no training prompts; materialize `datasets` with a training split")
    engine = make_rollout_engine("hf", model, tokenizer)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts["prompt"]]
    groups = engine.generate(ids, SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                                 seed=seed))
    verifier = verifier_for(data)
    rows = []
    for g, ((_, prob), comps) in enumerate(zip(prompts.iterrows(), groups)):
        for c in comps:
            seg = segment(c.text)
            verdict = verifier.verify(c.text, prob["answer"])
            rows.append({
                "source": "base", "base_model": base_model, "method": None, "run_id": BASE_RUN_ID, "step": 0,
                "rollout": len(rows), "problem_id": prob["problem_id"], "level": prob["level"], "group": g,
                "response": c.text, "reference": prob["answer"], "num_tokens": len(c.response_ids),
                "outcome": float(verdict.reward), "verdict": verdict.status, "segmentation": seg.status,
                "num_episodes": seg.num_episodes, "score": None, "advantage": None, "finished": c.finished,
                "prompt_ids": list(c.prompt_ids), "response_ids": list(c.response_ids),
            })
    df = pd.DataFrame(rows)
    df["level"] = df["level"].astype("Int64")
    df["score"] = df["score"].astype(float)
    df["advantage"] = df["advantage"].astype(float)
    return df


def score_base_rollouts(model, tokenizer, rollouts: pd.DataFrame, method: str, cfg: RewardConfig,
                        data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rewards of the base rollouts under ``method`` (``compute_rewards``): the episode rows and
    the rollouts with their response ``score`` and group ``advantage`` filled in."""
    batch = [Rollout(list(r.prompt_ids), list(r.response_ids), r.response, r.reference, int(r.group))
             for r in rollouts.itertuples()]
    rewards = compute_rewards(model, tokenizer, batch, method, cfg, verifier=verifier_for(data))
    episodes = episode_rows(rewards, rollouts, method)
    scored = rollouts.copy()
    scored["score"] = [x.score for x in rewards.responses]
    scored["advantage"] = [x.advantage for x in rewards.responses]
    return episodes, scored


def episode_rows(rewards: RewardBatch, rollouts: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per episode of every response, with the outcome's share r_out/K."""
    rows = []
    for (_, ro), x in zip(rollouts.iterrows(), rewards.responses):
        k = x.segmentation.num_episodes
        lens = np.diff(np.asarray(x.tokens.boundaries)) if k else []
        for e in range(k):
            rows.append({
                "source": ro["source"], "base_model": ro["base_model"], "method": method, "run_id": ro["run_id"],
                "step": int(ro["step"]), "rollout": int(ro["rollout"]), "episode": e + 1, "num_tokens": int(lens[e]),
                "fitting_gain": float(x.gains[e]), "penalty": float(x.penalties[e]),
                "penalty_hat": float(x.penalties_hat[e]), "process_reward": float(x.process[e]),
                "outcome_reward": float(x.outcome) / k, "episode_reward": float(x.episode_reward[e]),
            })
    return pd.DataFrame(rows, columns=EPISODE_COLUMNS)
