"""Row builders: l2t_core results turned into the pipeline's table rows.

Thin glue between l2t_core's objects (problems, completions, reward batches, the trainer's
parquet tables) and the pandera schemas; no model math lives here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from l2t_core.checkpoint import RunStorage
from l2t_core.config import DataConfig, RewardConfig
from l2t_core.episodes import segment
from l2t_core.metrics import read_table
from l2t_core.rewards.l2t import RewardBatch, Rollout, compute_rewards
from l2t_core.rollout import SamplingParams, make_rollout_engine
from l2t_core.training_data import load_training_problems, verifier_for

BASE_RUN_ID = "base"


def problem_rows(data: DataConfig, dataset_name: str, evaluation: pd.DataFrame,
                 benchmarks: Sequence[str] = (), max_rows: int | None = None) -> pd.DataFrame:
    """The ``problems`` table: the training prompts exactly as the trainer builds them
    (``load_training_problems``), the evaluator's problems, and benchmark JSONL files."""
    rows = [{"dataset": dataset_name, "split": "train", "problem_id": p.id, "prompt": p.prompt,
             "answer": p.answer, "level": p.level} for p in load_training_problems(data)]
    rows += evaluation.to_dict("records")
    if benchmarks:
        from l2t_core.data import read_math_jsonl
        from l2t_core.prompts import build_prompt

        for name in benchmarks:
            for r in read_math_jsonl(name)[:max_rows]:
                level = (r.get("meta") or {}).get("level") if isinstance(r.get("meta"), dict) else None
                rows.append({"dataset": name.removesuffix(".jsonl"), "split": "test", "problem_id": r["id"],
                             "prompt": build_prompt(r["problem"]), "answer": r["answer"],
                             "level": level if isinstance(level, int) else None})
    df = pd.DataFrame(rows)
    df["level"] = df["level"].astype("Int64")
    return df


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
    cols = ["source", "base_model", "method", "run_id", "step", "rollout", "episode", "num_tokens", "fitting_gain",
            "penalty", "penalty_hat", "process_reward", "outcome_reward", "episode_reward"]
    return pd.DataFrame(rows, columns=cols)


def trainer_tables(storage: RunStorage, base_model: str, method: str) -> dict[str, pd.DataFrame]:
    """The run's parquet tables (``l2t_core.metrics``) with the pipeline's keys: ``train_steps``,
    ``rollouts`` and ``episode_rewards`` (with ``outcome_reward`` = the response's r_out/K)."""
    steps = read_table(storage, "train_steps")
    rollouts = read_table(storage, "rollouts")
    episodes = read_table(storage, "episode_rewards")
    if steps.empty:
        raise ValueError(f"the run at {storage.url} logged no training steps; did the training process finish?")
    for df in (rollouts, episodes):
        df["source"] = "train"
        df["base_model"] = base_model
        df["method"] = method
    if not rollouts.empty:
        rollouts["level"] = rollouts["level"].astype("Int64")
    if not episodes.empty:
        k = rollouts.set_index(["run_id", "step", "rollout"])[["outcome", "num_episodes"]]
        joined = episodes.join(k, on=["run_id", "step", "rollout"], rsuffix="_response")
        episodes["outcome_reward"] = joined["outcome"] / joined["num_episodes"].clip(lower=1)
    return {"train_steps": steps, "rollouts": rollouts, "episode_rewards": episodes}
