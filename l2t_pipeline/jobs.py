"""Asset jobs: the baseline of a base model, a training run with its evaluation, re-evaluation."""

from __future__ import annotations

import dagster as dg

from .assets import base_model, benchmark_reports, checkpoints, episode_rewards, segmented_rollouts

baseline_job = dg.define_asset_job(
    "baseline_job", selection=dg.AssetSelection.assets(base_model, segmented_rollouts, episode_rewards),
    description="Warm start or load a base model, evaluate it, sample and score its rollouts.",
)
training_job = dg.define_asset_job(
    "training_job", selection=dg.AssetSelection.assets(checkpoints, benchmark_reports),
    description="Train one base model × method and evaluate the checkpoint.",
)
evaluation_job = dg.define_asset_job(
    "evaluation_job", selection=dg.AssetSelection.assets(benchmark_reports),
    description="Re-evaluate checkpoints (the schedule's job).",
)
