"""Dagster code location for the L2T pipeline (thin: assets call l2t_core).

Its assets (datasets -> segmented_rollouts -> episode_rewards -> checkpoints -> benchmark_reports),
resources and automation arrive with issue 5; until then `make demo` runs the core demo.
"""
