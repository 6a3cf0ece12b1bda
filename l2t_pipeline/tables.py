"""Row builders: l2t_core results turned into the pipeline's table rows.

Thin glue between l2t_core's objects (problems, the trainer's parquet tables) and the pandera
schemas; no model math lives here. The rows that need a model, the base policy's rollouts and
their rewards, are built by :mod:`l2t_core.rollout.base_rollouts` (re-exported here).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from l2t_core.checkpoint import RunStorage
from l2t_core.config import DataConfig
from l2t_core.metrics import read_table
from l2t_core.rollout.base_rollouts import (  # noqa: F401 - the pipeline's row builders that run a model
    BASE_RUN_ID, episode_rows, sample_base_rollouts, score_base_rollouts)
from l2t_core.training_data import load_training_problems
from l2t_core.urls import redact_url

__all__ = ["BASE_RUN_ID", "episode_rows", "problem_rows", "sample_base_rollouts", "score_base_rollouts",
           "trainer_tables"]


def problem_rows(data: DataConfig, dataset_name: str, evaluation: pd.DataFrame,
                 benchmarks: Sequence[str] = (), max_rows: int | None = None) -> pd.DataFrame:
    """The ``problems`` table: the training prompts exactly as the trainer builds them
    (``load_training_problems``), the evaluator's problems, and benchmark JSONL files.

    A benchmark row the evaluator already supplies (same dataset, split and id, e.g. ``math500``
    rows of a :class:`~l2t_pipeline.resources.BenchmarkEvaluator` on math500) is kept once."""
    rows = [{"dataset": dataset_name, "split": "train", "problem_id": p.id, "prompt": p.prompt,
             "answer": p.answer, "level": p.level} for p in load_training_problems(data)]
    rows += evaluation.to_dict("records")
    if benchmarks:
        from l2t_core.data import read_math_jsonl
        from l2t_core.prompts import build_prompt

        supplied = {(r["dataset"], r["split"], r["problem_id"]) for r in evaluation.to_dict("records")}
        for name in benchmarks:
            for r in read_math_jsonl(name)[:max_rows]:
                if (name.removesuffix(".jsonl"), "test", r["id"]) in supplied:
                    continue
                level = (r.get("meta") or {}).get("level") if isinstance(r.get("meta"), dict) else None
                rows.append({"dataset": name.removesuffix(".jsonl"), "split": "test", "problem_id": r["id"],
                             "prompt": build_prompt(r["problem"]), "answer": r["answer"],
                             "level": level if isinstance(level, int) else None})
    df = pd.DataFrame(rows)
    df["level"] = df["level"].astype("Int64")
    return df


def trainer_tables(storage: RunStorage, base_model: str, method: str) -> dict[str, pd.DataFrame]:
    """The run's parquet tables (``l2t_core.metrics``) with the pipeline's keys: ``train_steps``,
    ``rollouts`` and ``episode_rewards`` (with ``outcome_reward`` = the response's r_out/K)."""
    steps = read_table(storage, "train_steps")
    rollouts = read_table(storage, "rollouts")
    episodes = read_table(storage, "episode_rewards")
    if steps.empty:
        raise ValueError(f"the run at {redact_url(storage.url)} logged no training steps; did the training process finish?")
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
