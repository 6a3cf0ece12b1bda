"""The L2T code location: ``defs`` for ``dagster dev`` (``workspace.yaml``) and the tests.

Asset graph (partitions in brackets)::

    base_model[base]  ───────────────┐
    datasets ─> segmented_rollouts[base] ─> episode_rewards[base] ─> checkpoints[base×method]
                                                                       ─> benchmark_reports[base×method]

Resources: ``duckdb`` (the warehouse), ``storage`` (runs on an fsspec URL, models on local
disk), ``registry`` (model registry YAML), ``training_data``, ``evaluator`` (held-out
evaluation, or real benchmarks with ``L2T_EVALUATOR=benchmark``) and ``launcher`` (the Pipes
training launcher, ``L2T_LAUNCHER``) and ``io_manager`` (the assets' outputs under ``L2T_IO_URL``,
shared by every run). See ``l2t_pipeline/README.md``.
"""

from __future__ import annotations

import os
from typing import Mapping

import dagster as dg

from l2t_core.tasks import TASKS

from .assets import base_model, benchmark_reports, checkpoints, datasets, episode_rewards, segmented_rollouts
from .checks import all_checks
from .jobs import baseline_job, evaluation_job, training_job
from .resources import (BENCHMARK_EVAL_ENV, BenchmarkEvaluator, Evaluator, HeldOutEvaluator, L2TStorage, ModelRegistry,
                        TrainingData, TrainingLauncher, make_duckdb, make_io_manager)
from .sensors import model_registry_sensor, reevaluation_schedule

ASSETS = [datasets, base_model, segmented_rollouts, episode_rewards, checkpoints, benchmark_reports]


def training_launcher(environ: Mapping[str, str] | None = None) -> dg.ConfigurableResource:
    """The launcher ``L2T_LAUNCHER`` selects: ``local`` (the default; a subprocess through Dagster Pipes) or
    ``k8s`` (``PipesK8sClient``, the ``k8s`` extra; settings from ``L2T_K8S_*``, see l2t_pipeline.k8s)."""
    env = os.environ if environ is None else environ
    kind = env.get("L2T_LAUNCHER", "local").strip().lower() or "local"
    if kind == "local":
        ignored = sorted(var for var in env if var.startswith("L2T_K8S_") and env[var].strip())
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set, but L2T_LAUNCHER is 'local', which trains in a subprocess "
                             "of the run worker and ignores them; set L2T_LAUNCHER=k8s to train in Kubernetes pods, "
                             "or unset them")
        return TrainingLauncher()
    if kind == "k8s":
        from .k8s import K8sTrainingLauncher

        return K8sTrainingLauncher.from_env(env)
    raise ValueError(f"L2T_LAUNCHER={kind!r} is not a training launcher; use 'local' (a subprocess, the default) "
                     "or 'k8s' (a Kubernetes pod; install the 'k8s' extra)")


def evaluator_resource(environ: Mapping[str, str] | None = None) -> Evaluator:
    """The evaluator ``L2T_EVALUATOR`` selects: ``heldout`` (the default; the synthetic task's
    held-out split, ``HeldOutEvaluator``) or ``benchmark`` (real math benchmarks,
    ``BenchmarkEvaluator``; settings from ``L2T_EVAL_BENCHMARKS``, ``L2T_EVAL_LIMIT``, ... see
    ``BenchmarkEvaluator.from_env``)."""
    env = os.environ if environ is None else environ
    kind = env.get("L2T_EVALUATOR", "heldout").strip().lower() or "heldout"
    if kind == "heldout":
        ignored = [var for var in BENCHMARK_EVAL_ENV if env.get(var, "").strip()]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set, but L2T_EVALUATOR is 'heldout', which ignores them; set "
                             "L2T_EVALUATOR=benchmark to evaluate on real benchmarks, or unset them")
        # the held-out split of the task the models train on (L2T_TRAINING_DATA)
        source = TrainingData.from_env(env).source
        if source not in TASKS:
            raise ValueError(f"L2T_TRAINING_DATA={source!r} trains on a data file, and L2T_EVALUATOR 'heldout' (the "
                             "default) tests a synthetic task's held-out split, which says nothing of such a model; "
                             "set L2T_EVALUATOR=benchmark to evaluate on real benchmarks")
        return HeldOutEvaluator(task=source)
    if kind == "benchmark":
        return BenchmarkEvaluator.from_env(env)
    raise ValueError(f"L2T_EVALUATOR={kind!r} is not an evaluator; use 'heldout' (the synthetic task's held-out "
                     "split, the default) or 'benchmark' (real math benchmarks: L2T_EVAL_BENCHMARKS, L2T_EVAL_LIMIT, "
                     "...; see l2t_pipeline/README.md)")


def default_resources() -> dict:
    """The resources with their defaults (environment overrides in l2t_pipeline.resources;
    ``L2T_LAUNCHER`` picks the training launcher, ``L2T_EVALUATOR`` the evaluator)."""
    return {
        "duckdb": make_duckdb(),
        "storage": L2TStorage(),
        "registry": ModelRegistry(),
        "training_data": TrainingData.from_env(),
        "evaluator": evaluator_resource(),
        "launcher": training_launcher(),
        "io_manager": make_io_manager(),
    }


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=all_checks,
    jobs=[baseline_job, training_job, evaluation_job],
    sensors=[model_registry_sensor],
    schedules=[reevaluation_schedule],
    resources=default_resources(),
)
