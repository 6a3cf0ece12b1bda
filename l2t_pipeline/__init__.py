"""Dagster code location for the L2T pipeline (thin: assets call l2t_core).

``l2t_pipeline.definitions.defs`` holds the assets (base_model, datasets -> segmented_rollouts ->
episode_rewards -> checkpoints -> benchmark_reports), their pandera-backed checks, the resources
(DuckDB warehouse, fsspec run storage, model registry, evaluator, Pipes training launcher), the
jobs, the model-registry sensor and the re-evaluation schedule. See ``l2t_pipeline/README.md``.
"""
