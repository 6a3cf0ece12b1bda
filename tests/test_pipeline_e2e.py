"""Every L2T asset materialized in process on a tiny embedded default, in a temporary Dagster
instance with a temporary DuckDB file: asset checks, stored rows, Pipes metadata, plots,
idempotent re-materialization and a schema violation that fails and quarantines."""

from __future__ import annotations

import duckdb
import pytest
import torch

import dagster as dg
from dagster_duckdb import DuckDBResource
from l2t_pipeline import demo, warehouse
from l2t_pipeline.assets import datasets
from l2t_pipeline.checks import all_checks
from l2t_pipeline.definitions import ASSETS
from l2t_pipeline.partitions import DEFAULT_BASE_MODEL, run_key
from l2t_pipeline.resources import HeldOutEvaluator, L2TStorage, ModelRegistry, TrainingData, TrainingLauncher

pytestmark = pytest.mark.slow

LEVELS, PER_LEVEL = [1, 2], 2
PROMPTS, GROUP = 2, 2
STEPS, PROMPTS_PER_STEP, TRAIN_GROUP = 1, 2, 2
WARM = dict(train_size=200, sft_steps=20, batch_size=8, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
            intermediate_size=48, eval_per_level=2, eval_max_new_tokens=24, eval_loss_size=8)
RUN_CONFIG = {"ops": {
    "base_model": {"config": WARM},
    "segmented_rollouts": {"config": {"prompts": PROMPTS, "group_size": GROUP, "max_new_tokens": 40}},
    "episode_rewards": {"config": {"method": "l2t"}},
    "checkpoints": {"config": {"steps": STEPS, "prompts_per_step": PROMPTS_PER_STEP, "group_size": TRAIN_GROUP,
                               "max_new_tokens": 40}},
}, "loggers": {"console": {"config": {"log_level": "INFO"}}}}
EVERYTHING = [*ASSETS, *all_checks]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pipeline")
    db = str(tmp / "l2t.duckdb")
    resources = {
        "duckdb": DuckDBResource(database=db),
        "storage": L2TStorage(url=str(tmp / "storage"), models_dir=str(tmp / "models")),
        "registry": ModelRegistry(),
        "training_data": TrainingData(train_size=50, max_steps=2),
        "evaluator": HeldOutEvaluator(levels=LEVELS, per_level=PER_LEVEL, max_new_tokens=40),
        "launcher": TrainingLauncher(torch_threads=1),
    }
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp / "dagster_home"))
    instance.add_dynamic_partitions("base_models", [DEFAULT_BASE_MODEL])
    return {"resources": resources, "instance": instance, "db": db}


def run(env, selection, partition_key=None, run_config=None, raise_on_error=True):
    ops = {k: v for k, v in RUN_CONFIG["ops"].items() if k in {a.key.to_user_string() for a in selection}}
    return dg.materialize(EVERYTHING, selection=selection, partition_key=partition_key, resources=env["resources"],
                          instance=env["instance"], run_config=run_config or {"ops": ops},
                          raise_on_error=raise_on_error)


def materialize_lineage(env, methods=("l2t", "grpo")) -> dict:
    """The demo's lineage (``make demo``) at test size: datasets, the base chain, a run per method."""
    return demo.materialize_lineage(env["instance"], env["resources"], RUN_CONFIG, methods)


def table_counts(db: str) -> dict:
    with duckdb.connect(db) as con:
        return {t: dict(con.execute(f"SELECT asset_key || '/' || partition_key, count(*) FROM {t} GROUP BY 1")
                        .fetchall()) for t in warehouse.TABLES}


def materialization(result, asset: str):
    mats = [m for m in result.asset_materializations_for_node(asset)]
    assert len(mats) == 1
    return mats[0].metadata


def test_lineage_materializes_checks_pass_and_rematerializing_adds_no_rows(env):
    first = materialize_lineage(env)
    for res in first.values():
        assert res.success
        evaluations = res.get_asset_check_evaluations()
        assert evaluations and all(e.passed for e in evaluations), [(e.asset_key, e.check_name, e.metadata)
                                                                     for e in evaluations if not e.passed]
    gate = [e for e in first["l2t"].get_asset_check_evaluations() if e.check_name == "checkpoint_quality_gate"]
    assert len(gate) == 1 and "token_reduction" in gate[0].metadata

    counts = table_counts(env["db"])
    base, l2t = DEFAULT_BASE_MODEL, run_key(DEFAULT_BASE_MODEL, "l2t")
    assert counts["rollouts"][f"segmented_rollouts/{base}"] == PROMPTS * GROUP
    assert counts["rollouts"][f"checkpoints/{l2t}"] == STEPS * PROMPTS_PER_STEP * TRAIN_GROUP
    assert counts["train_steps"] == {f"checkpoints/{l2t}": STEPS, f"checkpoints/{base}|grpo": STEPS}
    assert counts["eval_results"][f"base_model/{base}"] == len(LEVELS) + 1
    assert counts["eval_results"][f"benchmark_reports/{l2t}"] == 2 * (len(LEVELS) + 1)
    assert counts["problems"]["datasets/__all__"] == 50 + len(LEVELS) * PER_LEVEL
    assert counts["checkpoints"] == {f"checkpoints/{l2t}": 1, f"checkpoints/{base}|grpo": 1}
    assert counts["run_history"] == counts["checkpoints"]  # every run, one per config
    assert counts["evaluation_history"] == {f"benchmark_reports/{l2t}": 1, f"benchmark_reports/{base}|grpo": 1}
    assert counts["quarantine"] == {}
    with duckdb.connect(env["db"]) as con:
        n_eps = con.execute("SELECT sum(num_episodes) FROM rollouts WHERE asset_key = 'segmented_rollouts'").fetchone()[0]
        assert counts["episode_rewards"][f"episode_rewards/{base}"] == n_eps
        vs = con.execute("SELECT method, accuracy, base_accuracy, token_reduction FROM v_checkpoint_vs_base "
                         "ORDER BY method").fetchall()
        assert [v[0] for v in vs] == ["grpo", "l2t"]
        assert con.execute("SELECT count(*) FROM v_run_summary").fetchone()[0] == 2
        ledger = con.execute("SELECT method, accuracy, last_accuracy FROM v_run_ledger ORDER BY method").fetchall()
        assert [(m, a) for m, a, _ in ledger] == [(v[0], v[1]) for v in vs] and all(x is not None for *_, x in ledger)
    assert [(r["method"], r["accuracy"]) for r in demo.summary(env["db"])] == [(v[0], v[1]) for v in vs]

    # the training entrypoint reported through Dagster Pipes; the report has its plots
    ck = materialization(first["l2t"], "checkpoints")
    assert ck["logged_steps"].value == STEPS and ck["final_step"].value == STEPS and "last_accuracy" in ck
    from l2t_core.memory import PeakMemory

    if PeakMemory("cpu").cpu_ok:  # the run's highest phase peak (the trainer process's resident set)
        assert ck["peak_memory_gib"].value > 0.05
    assert ck["train_steps_rows"].value == STEPS
    rep = materialization(first["l2t"], "benchmark_reports")
    assert rep["plots"].value.count("data:image/png;base64,") == 2
    assert 0.0 <= rep["accuracy"].value <= 1.0
    page = open(rep["report"].value).read()  # the same report as an HTML file next to the run
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 2
    assert demo.report_paths(first) == {m: materialization(first[m], "benchmark_reports")["report"].value
                                        for m in ("l2t", "grpo")}

    # everything again: same rows, no duplicates; the finished run is resumed, not retrained
    second = materialize_lineage(env)
    assert all(r.success for r in second.values())
    assert table_counts(env["db"]) == counts
    with duckdb.connect(env["db"]) as con:
        for t in ("rollouts", "episode_rewards", "train_steps", "eval_results", "problems"):
            assert warehouse.duplicate_keys(con, t) == 0, t
    assert materialization(second["l2t"], "checkpoints")["config_hash"] == ck["config_hash"]
    assert materialization(second["base"], "base_model")["reused"].value is True


def test_schema_violation_fails_the_asset_and_quarantines(env):
    """The same benchmark listed twice repeats every problem id: the datasets asset fails with the
    failing rows shown, the rows go to quarantine and the problems table keeps its last good rows."""
    before = table_counts(env["db"])["problems"].get("datasets/__all__")
    bad = {"ops": {"datasets": {"config": {"benchmarks": ["amc23.jsonl", "amc23.jsonl"],
                                           "max_rows_per_benchmark": 3}}}}
    res = run(env, [datasets], run_config=bad, raise_on_error=False)
    assert not res.success
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    err = failure.step_failure_data.user_failure_data
    assert "violate ProblemsSchema" in err.description and "amc23" in err.description
    assert err.metadata["quarantined_rows"].value == 6
    counts = table_counts(env["db"])
    assert counts["quarantine"] == {"datasets/__all__": 6}
    assert counts["problems"].get("datasets/__all__") == before
