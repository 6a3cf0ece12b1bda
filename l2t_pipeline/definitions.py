"""The L2T code location: ``defs`` for ``dagster dev`` (``workspace.yaml``) and the tests.

Asset graph (partitions in brackets)::

    base_model[base]  ───────────────┐
    datasets ─> segmented_rollouts[base] ─> episode_rewards[base] ─> checkpoints[base×method]
                                                                       ─> benchmark_reports[base×method]

Resources: ``duckdb`` (the warehouse), ``storage`` (runs on an fsspec URL, models on local
disk), ``registry`` (model registry YAML), ``training_data``, ``evaluator`` (held-out
evaluation) and ``launcher`` (the Pipes training launcher). See ``l2t_pipeline/README.md``.
"""

from __future__ import annotations

import dagster as dg

from .assets import base_model, benchmark_reports, checkpoints, datasets, episode_rewards, segmented_rollouts
from .checks import all_checks
from .jobs import baseline_job, evaluation_job, training_job
from .resources import HeldOutEvaluator, L2TStorage, ModelRegistry, TrainingData, TrainingLauncher, make_duckdb
from .sensors import model_registry_sensor, reevaluation_schedule

ASSETS = [datasets, base_model, segmented_rollouts, episode_rewards, checkpoints, benchmark_reports]

def default_resources() -> dict:
    """The resources with their defaults (environment overrides in l2t_pipeline.resources)."""
    return {
        "duckdb": make_duckdb(),
        "storage": L2TStorage(),
        "registry": ModelRegistry(),
        "training_data": TrainingData(),
        "evaluator": HeldOutEvaluator(),
        "launcher": TrainingLauncher(),
    }


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=all_checks,
    jobs=[baseline_job, training_job, evaluation_job],
    sensors=[model_registry_sensor],
    schedules=[reevaluation_schedule],
    resources=default_resources(),
)
