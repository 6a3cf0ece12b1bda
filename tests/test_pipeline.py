"""The Dagster code location without heavy compute: definitions, warehouse writes, schemas with
quarantine, the quality gate, Pipes reporting, the registry sensor and S3 storage."""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
import yaml
from dagster_duckdb import DuckDBResource

from conftest import moto_s3
from l2t_core.checkpoint import RunStorage
from l2t_core.metrics import MetricsWriter
from l2t_core.pipes import PipesReporter, launched_by_pipes, pipes_session, train_metadata
from l2t_core.trainer import RunResult
from l2t_pipeline import warehouse
from l2t_pipeline.checks import quality_gate
from l2t_pipeline.definitions import defs
from l2t_pipeline.partitions import DEFAULT_BASE_MODEL, run_key
from l2t_pipeline.resources import L2TStorage, ModelRegistry, redact_url
from l2t_pipeline.schemas import SCHEMAS, SchemaViolation, schema_columns
from l2t_pipeline.sensors import model_registry_sensor
from l2t_pipeline.tables import trainer_tables


def rollout_rows(n: int = 3, **over) -> pd.DataFrame:
    rows = [{
        "source": "base", "base_model": "m", "method": None, "run_id": "base", "step": 0, "rollout": i,
        "problem_id": f"p{i}", "level": 1, "group": i // 2, "response": "<think>x</think> \\boxed{1}",
        "reference": "1", "num_tokens": 10, "outcome": 1.0, "verdict": "ok", "segmentation": "tagged",
        "num_episodes": 1, "score": None, "advantage": None,
    } for i in range(n)]
    df = pd.DataFrame(rows)
    for k, v in over.items():
        df.loc[df.index[-1], k] = v
    return df


# ------------------------------------------------------------------------------ definitions


def test_definitions_load_with_lineage_and_partitions():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"datasets", "base_model", "segmented_rollouts", "episode_rewards", "checkpoints",
                    "benchmark_reports"}
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["segmented_rollouts"] == {"datasets", "base_model"}
    assert parents["episode_rewards"] == {"segmented_rollouts", "base_model"}
    assert parents["checkpoints"] == {"episode_rewards", "base_model"}
    assert parents["benchmark_reports"] == {"checkpoints"}
    pdef = graph.get(dg.AssetKey("checkpoints")).partitions_def
    assert isinstance(pdef, dg.MultiPartitionsDefinition)
    dims = {d.name: d.partitions_def for d in pdef.partitions_defs}
    assert isinstance(dims["base_model"], dg.DynamicPartitionsDefinition) and dims["base_model"].name == "base_models"
    assert "l2t" in dims["method"].get_partition_keys() and len(dims["method"].get_partition_keys()) == 6
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert ("benchmark_reports", "checkpoint_quality_gate") in checks
    assert {a for a, n in checks if n == "stored_rows_valid"} == keys - {"base_model"}
    assert run_key(DEFAULT_BASE_MODEL, "grpo") == "tiny-sft|grpo"
    with pytest.raises(ValueError, match="unknown method"):
        run_key("m", "ppo")


def test_warehouse_tables_follow_the_schemas():
    con = duckdb.connect()
    warehouse.ensure_schema(con)
    for table, model in SCHEMAS.items():
        cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        assert cols[:2] == ["asset_key", "partition_key"] and cols[-1] == "loaded_at"
        assert [c for c in cols[2:-1] if c != "extra"] == schema_columns(model)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert set(warehouse.VIEWS) <= views


# ------------------------------------------------------------------------------ idempotent writes


def test_replace_rows_never_duplicates_and_keeps_other_partitions():
    con = duckdb.connect()
    assert warehouse.replace_rows(con, "rollouts", rollout_rows(3), "segmented_rollouts", "a") == 3
    assert warehouse.replace_rows(con, "rollouts", rollout_rows(2), "segmented_rollouts", "b") == 2
    assert warehouse.replace_rows(con, "rollouts", rollout_rows(3), "segmented_rollouts", "a") == 3
    counts = dict(con.execute("SELECT partition_key, count(*) FROM rollouts GROUP BY 1").fetchall())
    assert counts == {"a": 3, "b": 2}
    assert warehouse.duplicate_keys(con, "rollouts") == 0
    # a failing write leaves the partition as it was (delete and insert are one transaction)
    with pytest.raises(ValueError, match="lack column"):
        warehouse.replace_rows(con, "rollouts", rollout_rows(1).drop(columns=["outcome"]), "segmented_rollouts", "a")
    assert con.execute("SELECT count(*) FROM rollouts WHERE partition_key = 'a'").fetchone()[0] == 3
    bad = rollout_rows(1)
    bad["outcome"] = "not-a-number"
    with pytest.raises(Exception):
        warehouse.replace_rows(con, "rollouts", bad, "segmented_rollouts", "a")
    assert con.execute("SELECT count(*) FROM rollouts WHERE partition_key = 'a'").fetchone()[0] == 3


def test_a_failed_insert_shows_its_own_error_and_changes_nothing():
    """An INSERT DuckDB refuses rolls the whole write back and surfaces DuckDB's own message (not a
    follow-up "transaction is aborted"); the connection stays usable."""
    con = duckdb.connect()
    row = {"dataset": "d", "split": "s", "problem_id": "p", "prompt": "q", "answer": "1"}
    assert warehouse.replace_rows(con, "problems", pd.DataFrame([{**row, "level": 1}]), "datasets", "__all__") == 1
    bad = pd.DataFrame([{**row, "problem_id": "p2", "level": "abc"}])
    with pytest.raises(duckdb.ConversionException, match="'abc'"):
        warehouse.replace_tables(con, {"problems": bad}, "datasets", "__all__")
    assert con.execute("SELECT problem_id FROM problems").fetchall() == [("p",)]
    assert warehouse.replace_rows(con, "problems", pd.DataFrame([{**row, "level": 2}]), "datasets", "__all__") == 1


def test_schema_violation_fails_shows_rows_and_quarantines():
    con = duckdb.connect()
    warehouse.write_validated(con, {"rollouts": rollout_rows(3)}, "segmented_rollouts", "m")
    bad = rollout_rows(4, outcome=1.7, segmentation="garbled")
    with pytest.raises(SchemaViolation) as err:
        warehouse.write_validated(con, {"rollouts": bad}, "segmented_rollouts", "m")
    text = str(err.value.description)
    assert "garbled" in text and "1.7" in text and "segmentation" in text and "outcome" in text
    assert err.value.metadata["quarantined_rows"].value == 1
    q = con.execute("SELECT table_name, row_index, row_json, reasons FROM quarantine").df()
    assert len(q) == 1 and q.loc[0, "table_name"] == "rollouts" and q.loc[0, "row_index"] == "3"
    assert '"garbled"' in q.loc[0, "row_json"] and "outcome" in q.loc[0, "reasons"]
    # the main table still holds the last valid write only
    assert con.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 3
    # the same failure again does not duplicate the quarantine
    with pytest.raises(SchemaViolation):
        warehouse.write_validated(con, {"rollouts": bad}, "segmented_rollouts", "m")
    assert con.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1
    dup = pd.concat([rollout_rows(2), rollout_rows(2)], ignore_index=True)
    with pytest.raises(SchemaViolation, match="rollouts"):
        warehouse.write_validated(con, {"rollouts": dup}, "segmented_rollouts", "dup")
    # a valid write of the partition clears its quarantine (the other partition's stays)
    warehouse.write_validated(con, {"rollouts": rollout_rows(2)}, "segmented_rollouts", "m")
    assert con.execute("SELECT partition_key FROM quarantine").df()["partition_key"].unique().tolist() == ["dup"]


def test_schemas_refuse_values_their_coercion_would_change():
    """pandera coerces before it checks: a fraction in an integer column would be stored truncated,
    a float id as '1.0', an infinite score as inf. Each is a violation naming the row instead; a
    whole number in a text column (a level 3) is still its text."""
    from l2t_pipeline.schemas import find_violations

    df = rollout_rows(5).astype({"step": object, "problem_id": object, "score": float})
    df.loc[0, "step"] = 1.7
    df.loc[1, "problem_id"] = 1.0
    df.loc[2, "score"] = float("inf")
    df.loc[3, "base_model"] = "   "
    df.loc[4, "problem_id"] = 7  # an integer id: the text '7'
    ok, cases, bad = find_violations(df, "rollouts")
    assert sorted(bad.index) == [0, 1, 2, 3]
    assert sorted(set(cases["column"])) == ["base_model", "problem_id", "score", "step"]
    assert "whole_number" in bad.loc[0, "reasons"] and "finite_number" in bad.loc[2, "reasons"]
    ok, cases, bad = find_violations(rollout_rows(2).assign(problem_id=[7, "p"]), "rollouts")
    assert cases.empty and ok["problem_id"].tolist() == ["7", "p"]
    df = rollout_rows(2).astype({"step": object})
    df.loc[0, "step"] = True  # a boolean is no step number
    _, cases, bad = find_violations(df, "rollouts")
    assert list(bad.index) == [0] and cases["failure_case"].tolist() == [True]
    from l2t_pipeline.schemas import lossy_values, TrainStepsSchema

    steps = pd.DataFrame({"grad_norm": [float("inf"), 1.0], "step_time_s": [1.0, float("inf")]})
    assert lossy_values(steps, TrainStepsSchema)["column"].tolist() == ["step_time_s"]  # an overflowing step's norm is inf
    evals = pd.DataFrame([{"model_kind": "checkpoint", "base_model": "m", "method": method, "model_path": "/m", "model_weights": None,
                           "benchmark": "b", "evaluator": "e", "level": "all", "n": 1, "accuracy": 0.5,
                           "mean_tokens": 3.0, "mean_episodes": 1.0, "tagged_share": 1.0, "finished_share": 1.0,
                           "redundant_share": 0.0} for method in (None, "", "grpo")])
    _, cases, bad = find_violations(evals, "eval_results")
    assert sorted(bad.index) == [0, 1]  # a checkpoint row names a real method


def test_warehouse_of_an_older_version_is_migrated_and_read_only_reads_it_as_it_is(tmp_path):
    """A warehouse made by an older version (a table without a column added since, an old view)
    gets the new column (NULL in its rows), the current views and the schema fingerprint on the
    next writable connection; a read-only connection reads an outdated one as it is."""
    path = str(tmp_path / "old.duckdb")
    con = duckdb.connect(path)
    warehouse.ensure_schema(con)
    con.execute("ALTER TABLE rollouts DROP COLUMN advantage")
    con.execute("CREATE OR REPLACE VIEW v_run_summary AS SELECT 1 AS stale")
    con.execute(f"DROP TABLE {warehouse.SCHEMA_TABLE}")
    con.execute("INSERT INTO rollouts BY NAME SELECT 'a' AS asset_key, 'p' AS partition_key, 7 AS step")
    con.close()
    ro = duckdb.connect(path, read_only=True)
    warehouse.ensure_schema(ro)  # cannot migrate: reads as it is
    assert ro.execute("SELECT * FROM v_run_summary").fetchall() == [(1,)]
    ro.close()
    con = duckdb.connect(path)
    warehouse.ensure_schema(con)
    assert con.execute("SELECT step, advantage FROM rollouts").fetchall() == [(7, None)]
    assert "stale" not in [d[0] for d in con.execute("SELECT * FROM v_run_summary").description]
    assert con.execute(f"SELECT fingerprint FROM {warehouse.SCHEMA_TABLE}").fetchall() == [(warehouse.schema_fingerprint(),)]
    # a column of another type is refused, and nothing of the migration is applied
    con.execute("ALTER TABLE rollouts ALTER COLUMN step TYPE VARCHAR")
    con.execute(f"DROP TABLE {warehouse.SCHEMA_TABLE}")
    con.execute("CREATE OR REPLACE VIEW v_run_summary AS SELECT 1 AS stale")
    with pytest.raises(RuntimeError, match=r"rollouts\.step is VARCHAR, this version stores BIGINT"):
        warehouse.ensure_schema(con)
    assert con.execute("SELECT * FROM v_run_summary").fetchall() == [(1,)]  # rolled back
    con.close()


def test_the_history_tables_keep_every_run_of_a_partition(tmp_path):
    """checkpoints replaces a partition's rows with its latest run, and run_history keeps every run
    (one row per config hash: the same run written again replaces its own row); evaluation_history
    keeps one row per run and evaluator; v_run_ledger joins them. A warehouse from before the
    history starts run_history with the runs its checkpoints table holds."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))

    def run(h: str, acc: float) -> dict:
        row = pd.DataFrame([{"base_model": "b", "method": "l2t", "run_url": f"/runs/{h}", "checkpoint_url": f"/runs/{h}/c",
                             "final_step": 4, "config_hash": h, "config_json": "{}", "base_weights": "w"}])
        hist = row.assign(last_accuracy=acc, last_mean_tokens=10.0, dagster_run_id=f"r-{h}")
        return {"checkpoints": row, "run_history": hist}

    def evaluation(h: str, evaluator: str, acc: float) -> dict:
        return {"evaluation_history": pd.DataFrame([{
            "base_model": "b", "method": "l2t", "config_hash": h, "checkpoint_url": f"/runs/{h}/c", "evaluator": evaluator,
            "benchmark": "walk_heldout", "accuracy": acc, "base_accuracy": 0.5, "accuracy_delta": acc - 0.5,
            "mean_tokens": 8.0, "base_mean_tokens": 10.0, "token_reduction": 0.2, "dagster_run_id": "e"}])}

    pk = run_key("b", "l2t")
    for h, acc in (("h1", 0.6), ("h2", 0.7), ("h2", 0.75)):  # a first run, another config, the second again
        warehouse.replace_tables(con, run(h, acc), "checkpoints", pk)
    for h, ev, acc in (("h1", "e1", 0.6), ("h2", "e1", 0.7), ("h2", "e2", 0.8), ("h2", "e2", 0.85)):
        warehouse.replace_tables(con, evaluation(h, ev, acc), "benchmark_reports", pk)
    assert con.execute("SELECT config_hash FROM checkpoints").fetchall() == [("h2",)]
    assert con.execute("SELECT config_hash, last_accuracy FROM run_history ORDER BY 1").fetchall() == [
        ("h1", 0.6), ("h2", 0.75)]
    assert con.execute("SELECT config_hash, evaluator, accuracy FROM v_run_ledger ORDER BY 1, 2").fetchall() == [
        ("h1", "e1", 0.6), ("h2", "e1", 0.7), ("h2", "e2", 0.85)]
    # an older warehouse: no history tables yet, two partitions' runs in checkpoints
    warehouse.replace_tables(con, {"checkpoints": run("h3", 0.1)["checkpoints"].assign(method="grpo")}, "checkpoints",
                             run_key("b", "grpo"))
    con.execute("DROP VIEW v_run_ledger")
    con.execute("DROP TABLE run_history")
    warehouse.ensure_schema(con)
    assert con.execute("SELECT config_hash, method, last_accuracy FROM run_history ORDER BY 1").fetchall() == [
        ("h2", "l2t", None), ("h3", "grpo", None)]
    con.close()


# ------------------------------------------------------------------------------ quality gate


def evals(base_acc: float, ckpt_acc: float, base_tok: float = 100.0, ckpt_tok: float = 80.0) -> pd.DataFrame:
    return pd.DataFrame([
        {"model_kind": "base", "level": "all", "accuracy": base_acc, "mean_tokens": base_tok},
        {"model_kind": "checkpoint", "level": "all", "accuracy": ckpt_acc, "mean_tokens": ckpt_tok},
        {"model_kind": "base", "level": "1", "accuracy": 0.0, "mean_tokens": 1.0},
    ])


def test_quality_gate_passes_within_margin_and_fails_beyond():
    ok = quality_gate(evals(0.50, 0.46), max_accuracy_drop=0.05)
    assert ok.passed and ok.metadata["token_reduction"].value == pytest.approx(0.2)
    assert ok.metadata["accuracy_delta"].value == pytest.approx(-0.04)
    bad = quality_gate(evals(0.50, 0.40), max_accuracy_drop=0.05)
    assert not bad.passed and bad.severity == dg.AssetCheckSeverity.ERROR
    with pytest.raises(ValueError, match="checkpoint"):
        quality_gate(evals(0.5, 0.5).query("model_kind == 'base'"), 0.05)


# ------------------------------------------------------------------------------ pipes reporting


def test_pipes_reporting_is_a_no_op_standalone():
    assert not launched_by_pipes({}) and launched_by_pipes({"DAGSTER_PIPES_CONTEXT": "x"})
    with pipes_session({}) as rep:
        assert not rep.active
        rep.report_materialization({"a": 1})  # no Pipes connection: nothing to send, no error
        rep.log("standalone")
    steps = pd.DataFrame([{"run_id": "r", "step": 1, "accuracy": 0.25, "mean_tokens": 40.0, "kl": float("nan")},
                          {"run_id": "r", "step": 2, "accuracy": 0.5, "mean_tokens": 30.0, "kl": 0.01}])
    meta = train_metadata(RunResult("runs/x", 2, None, steps), latest_checkpoint="runs/x/checkpoints/step-000002")
    assert meta == {"run_url": "runs/x", "final_step": 2, "checkpoint": "runs/x/checkpoints/step-000002",
                    "logged_steps": 2, "run_id": "r", "last_accuracy": 0.5, "last_mean_tokens": 30.0,
                    "last_kl": 0.01}


def test_step_lines_skip_what_was_already_streamed():
    from l2t_core.pipes import step_line, step_lines

    steps = pd.DataFrame([{"step": 2, "accuracy": 0.5, "mean_tokens": 10.0, "kl": 0.001, "step_time_s": 1.5},
                          {"step": 1, "accuracy": 0.25, "mean_tokens": 12.0, "kl": 0.0, "step_time_s": 2.0}])
    result = RunResult("/r", 2, None, steps)
    assert step_line(steps.iloc[0]) == "step 2: accuracy 0.500, mean tokens 10.0, kl 0.0010, 1.5s"
    assert [line.split(":")[0] for line in step_lines(result)] == ["step 1", "step 2"]
    assert step_lines(result, skip=[2]) == [step_line(steps.iloc[1])]


def test_pipes_reporter_sends_clean_metadata():
    sent = {}

    class Recorder:  # records what PipesReporter hands to a dagster_pipes context
        def report_asset_materialization(self, metadata):
            sent.update(metadata)

    PipesReporter(Recorder()).report_materialization({"a": float("inf"), "b": None, "c": 2})
    assert sent == {"c": 2}


# ------------------------------------------------------------------------------ storage, registry, sensor


def test_storage_urls_and_redaction(tmp_path):
    s = L2TStorage(url=str(tmp_path / "runs"), models_dir=str(tmp_path / "models"))
    assert s.run_url("m", "l2t", "abc") == f"{tmp_path}/runs/runs/m/l2t/abc"
    assert redact_url("s3://key:secret@bucket/x") == "s3://bucket/x"
    assert "secret" not in s.display("https://u:secret@host:9000/b")


def write_registry(path, models: dict) -> ModelRegistry:
    path.write_text(yaml.safe_dump({"models": models}))
    return ModelRegistry(path=str(path))


def test_registry_validates_entries(tmp_path):
    reg = write_registry(tmp_path / "r.yaml", {"a": {"kind": "warmstart"}, "b": {"kind": "pretrained", "path": "x"}})
    assert set(reg.entries()) == {"a", "b"} and reg.get("b").path == "x"
    with pytest.raises(KeyError, match="registered: a, b"):
        reg.get("c")
    bad = write_registry(tmp_path / "bad.yaml", {"c": {"kind": "pretrained"}})
    with pytest.raises(ValueError, match="'c' of kind 'pretrained' needs a 'path'"):
        bad.entries()
    with pytest.raises(FileNotFoundError):
        ModelRegistry(path=str(tmp_path / "missing.yaml")).entries()
    (tmp_path / "broken.yaml").write_text("models:\n  a: {kind: warmstart\n")
    with pytest.raises(ValueError, match=r"(?s)model registry .*broken\.yaml is not valid YAML: .*line 2, column 6"):
        ModelRegistry(path=str(tmp_path / "broken.yaml")).entries()
    # a name is a partition key ('|' joins a run's dimensions) and a directory name ('..' is the parent)
    for name in ("a|b", "..", ".", "-x", "with space", "", 7):
        with pytest.raises(ValueError, match=r"the name .* cannot name a base model"):
            write_registry(tmp_path / "names.yaml", {name: {"kind": "warmstart"}}).entries()
    assert set(write_registry(tmp_path / "ok.yaml", {"Qwen2.5-1.5B_sft.v2": {"kind": "warmstart"}}).entries()) == {
        "Qwen2.5-1.5B_sft.v2"}


def test_the_shipped_registry_and_its_commented_sft_example_validate(tmp_path):
    from l2t_pipeline.resources import DEFAULT_REGISTRY

    text = Path(DEFAULT_REGISTRY).read_text()
    assert set(ModelRegistry(path=str(DEFAULT_REGISTRY)).entries()) == {"tiny-sft"}
    example = [line[4:] for line in text.splitlines() if line.startswith("  #   ") or line.startswith("  # q")]
    (tmp_path / "r.yaml").write_text("models:\n" + "\n".join("  " + line for line in example) + "\n")
    (entry,) = ModelRegistry(path=str(tmp_path / "r.yaml")).entries().values()
    cfg = entry.sft_config("/mnt/l2t/models/q")
    assert entry.kind == "sft" and (cfg.steps, cfg.micro_batch_size, cfg.gradient_checkpointing) == (228, 8, True)


def test_registry_validates_sft_entries(tmp_path):
    """An ``sft`` entry needs the model and the traces, and its settings are SFTConfig fields,
    checked when the registry is read."""
    ok = write_registry(tmp_path / "ok.yaml", {"s": {"kind": "sft", "path": "/m", "data": "t.jsonl",
                                                     "settings": ["steps=7", "lr=1e-4"]}})
    cfg = ok.get("s").sft_config(tmp_path / "models" / "s")
    assert (cfg.model, cfg.data, cfg.out, cfg.steps, cfg.lr) == ("/m", "t.jsonl", str(tmp_path / "models" / "s"), 7, 1e-4)
    for entry, message in [
        ({"kind": "sft", "data": "t.jsonl"}, "'s' of kind 'sft' needs a 'path'"),
        ({"kind": "sft", "path": "/m"}, "'s' of kind 'sft' needs 'data'"),
        ({"kind": "sft", "path": "/m", "data": "t", "settings": ["stepz=3"]}, r"(?s)entry 's': .*stepz\n  Extra inputs"),
        ({"kind": "sft", "path": "/m", "data": "t", "settings": ["steps=-1"]}, r"(?s)entry 's': .*steps\n  Input should be"),
        ({"kind": "sft", "path": "/m", "data": "t", "settings": ["out=/x"]}, r"settings \['out'\] are the entry's own"),
        ({"kind": "sft", "path": "/m", "data": "s3://k:secret@b/t.jsonl"}, r"entry 's', data"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_registry(tmp_path / "bad.yaml", {"s": entry}).entries()


def sft_entry_resources(tmp_path, tiny_dir, traces) -> dict:
    """Resources of a pipeline whose registry has one ``sft`` entry ``s`` (the tiny model, 2 SFT steps on
    ``traces``), models in tmp_path/models, a one-problem held-out evaluation."""
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher

    registry = write_registry(tmp_path / "registry.yaml", {"s": {
        "kind": "sft", "path": str(tiny_dir), "data": str(traces), "settings": ["steps=2", "batch_size=2", "device=cpu"]}})
    return {"duckdb": DuckDBResource(database=str(tmp_path / "l2t.duckdb")), "registry": registry,
            "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
            "training_data": TrainingData(train_size=4, max_steps=1),
            "evaluator": HeldOutEvaluator(levels=[1], per_level=1, max_new_tokens=8), "launcher": TrainingLauncher()}


@pytest.mark.slow
def test_base_model_of_an_sft_entry_trains_reuses_and_retrains_on_new_traces(tiny_dir, tmp_path):
    """base_model[s] of kind ``sft``: fine-tunes the registry model on its traces into the models
    directory and evaluates it; materialized again it reuses that SFT, also while a training run
    reads the model; after the traces change it trains the new model beside the old, and swaps it
    in only when nobody reads the old (l2t_core.model_lock): under a training run's hold the swap
    fails at once, naming that run, the old model stays, and the next materialization swaps the
    finished SFT in without training; no staging or old directory is left. checkpoints[s|grpo]
    fails at once while base_model[s] rewrites the model."""
    import json

    from l2t_core.model_lock import using_model
    from l2t_pipeline.assets import base_model, checkpoints
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.partitions import run_key

    traces = tmp_path / "traces.jsonl"

    def write_traces(n: int) -> None:
        traces.write_text("".join(json.dumps({"problem": f"Compute {i} + 1.", "answer": str(i + 1), "response":
                                              f"<think>\n<episode_1>{i} + 1 = {i + 1}.</episode_1>\n</think>\n\n"
                                              f"\\boxed{{{i + 1}}}"}) + "\n" for i in range(n)))

    write_traces(4)
    models = tmp_path / "models"
    resources = sft_entry_resources(tmp_path, tiny_dir, traces)

    def materialize(asset=base_model, key="s"):
        res = dg.materialize([*ASSETS, *all_checks], selection=[asset], partition_key=key, resources=resources,
                             instance=instance, raise_on_error=False)
        if not res.success:
            return str(res.get_step_failure_events()[0].event_specific_data.error)
        meta = res.asset_materializations_for_node("base_model")[0].metadata
        return {k: v.value for k, v in meta.items()}

    reading = using_model(models / "s", exclusive=False, who="checkpoints[s|grpo] of Dagster run r1")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", ["s"])
        first = materialize()
        assert first["kind"] == "sft" and first["reused"] is False and first["sft_examples"] == 4
        assert first["sft_answers_correct"] == "4 of 4" and first["path"] == str(models / "s")
        assert first["sft_loss_plot"] == str(models / "s" / "loss.png") and Path(first["sft_loss_plot"]).is_file()
        weights = (models / "s" / "model.safetensors").read_bytes()
        with reading:
            assert materialize()["reused"] is True
            write_traces(6)
            refused = materialize()
        assert "ModelInUse" in refused and "cannot rebuild" in refused and "checkpoints[s|grpo] of Dagster run r1" in refused
        assert f"The new SFT is complete in {models / '.s.new'}" in refused
        assert (models / "s" / "model.safetensors").read_bytes() == weights  # still the model being read
        waiting = (models / ".s.new" / "sft_report.json").read_text()
        third = materialize()
        assert third["reused"] is False and third["sft_examples"] == 6
        assert (models / "s" / "sft_report.json").read_text() == waiting  # swapped in, not trained again
        assert (models / "s" / "model.safetensors").read_bytes() != weights
        with using_model(models / "s", exclusive=True, who="base_model[s] of Dagster run r2"):
            refused = materialize(checkpoints, run_key("s", "grpo"))
        assert "cannot read" in refused and "being rebuilt by base_model[s] of Dagster run r2" in refused
    assert sorted(p.name for p in models.iterdir()) == [".locks", "s"]  # no staging or old directory left
    locks = models / ".locks"  # l2t_core.model_lock's, no holder left
    assert sorted(p.name for p in locks.iterdir()) == ["s.build.lock", "s.build.users", "s.lock", "s.users"]
    assert not any((locks / "s.users").iterdir()) and not any((locks / "s.build.users").iterdir())


def test_a_failed_sft_rebuild_keeps_the_model_it_would_replace(tmp_path, monkeypatch):
    import json

    import l2t_core.sft
    from l2t_core.sft import SFTConfig, file_sha256
    from l2t_pipeline.assets import build_or_reuse_sft

    out = tmp_path / "s"
    out.mkdir()
    (out / "sft_config.json").write_text(SFTConfig(model="/m", data="/t", out=str(out), steps=5).model_dump_json())
    (out / "sft_report.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    traces = tmp_path / "t.jsonl"
    traces.write_text("{}\n")

    def fails(cfg, **kw):
        Path(cfg.out).mkdir()  # as if killed after its rename: the next attempt must clear it
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(l2t_core.sft, "run_sft", fails)
    cfg = SFTConfig(model="/m", data=str(traces), out=str(out), steps=6)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="out of memory"):
            build_or_reuse_sft(out, cfg)
        assert (out / "model.safetensors").read_bytes() == b"old"
    # the same SFT placed on a GPU pod (device cuda, out beside) is reused, not trained again
    (out / "sft_config.json").write_text(cfg.model_copy(update={"device": "cuda", "out": "/x/.s.new"}).model_dump_json())
    (out / "sft_report.json").write_text(json.dumps({"data_sha256": file_sha256(traces)}))
    assert build_or_reuse_sft(out, cfg) == ({"data_sha256": file_sha256(traces)}, True)


def test_sft_rebuild_removes_an_unfinished_sft_of_another_config_and_completes_a_cut_swap(tmp_path):
    """The pipeline owns its SFT directories: an unfinished SFT made with older settings is removed
    (the CLI would refuse it) and the job runs; a swap stopped between its renames is completed
    and the finished model reused, not trained again."""
    import json

    from l2t_core.sft import SFTConfig, file_sha256, partial_dir
    from l2t_pipeline.assets import build_or_reuse_sft

    traces = tmp_path / "t.jsonl"
    traces.write_text("{}\n")
    out = tmp_path / "models" / "s"
    out.parent.mkdir()
    cfg = SFTConfig(model="/m", data=str(traces), out=str(out), steps=6)
    stale = partial_dir(out)
    stale.mkdir()
    (stale / "sft_config.json").write_text(cfg.model_copy(update={"micro_batch_size": 8}).model_dump_json())
    (stale / "data.json").write_text(json.dumps({"sha256": file_sha256(traces)}))
    ran, logged = [], []

    def run(c):
        ran.append(c)
        assert not stale.exists()
        Path(c.out).mkdir()
        (Path(c.out) / "sft_config.json").write_text(c.model_dump_json())
        (Path(c.out) / "sft_report.json").write_text(json.dumps({"data_sha256": file_sha256(traces)}))

    assert build_or_reuse_sft(out, cfg, run, logged.append)[1] is False
    assert ran == [cfg] and "made with other micro_batch_size" in logged[0]
    # stopped after `out -> .s.old`, before `.s.new -> out`: completed, then reused
    fresh = out.with_name(".s.new")
    out.rename(fresh)
    out.with_name(".s.old").mkdir()
    assert build_or_reuse_sft(out, cfg, run)[1] is True and len(ran) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["s"]
    # the worker died after the rebuild finished, before the swap: the finished SFT is swapped in,
    # not trained again; a reused SFT's leftover work directories go
    old_cfg = cfg.model_copy(update={"steps": 3})
    out.rename(fresh)
    run(old_cfg)
    partial_dir(out).mkdir()
    assert build_or_reuse_sft(out, cfg, run, logged.append) == ({"data_sha256": file_sha256(traces)}, False)
    assert len(ran) == 2 and "swapping in the finished SFT" in logged[-1]
    assert json.loads((out / "sft_config.json").read_text())["steps"] == 6
    assert sorted(p.name for p in out.parent.iterdir()) == ["s"]
    # a setting that does not change the weights does not retrain
    assert build_or_reuse_sft(out, cfg.model_copy(update={"checkpoint_every": 7}), run)[1] is True and len(ran) == 2


def test_a_warm_start_rebuild_cut_short_leaves_no_report_of_the_old_settings(tmp_path, monkeypatch):
    """A warm start is rebuilt in place, its report written last: the old report goes first, so a
    rebuild killed after writing new weights leaves no warm start to reuse (base_model_path refuses
    it, the next materialization rebuilds) instead of new weights under the old settings."""
    import json

    import l2t_core.warmstart as warmstart
    from l2t_pipeline.assets import build_or_reuse_warm_start

    out = tmp_path / "tiny-sft"
    out.mkdir()
    (out / "warmstart.json").write_text(json.dumps({"config": {"sft_steps": 1}}))

    def killed(o, cfg, show_progress=True):
        (Path(o) / "model.safetensors").write_bytes(b"the new settings' weights")
        raise RuntimeError("killed")

    monkeypatch.setattr(warmstart, "warm_start", killed)
    with pytest.raises(RuntimeError, match="killed"):
        build_or_reuse_warm_start(out, warmstart.WarmStartConfig())
    assert not (out / "warmstart.json").exists()


def test_a_warm_start_is_not_rewritten_under_a_reader_and_a_reused_one_needs_no_hold(tmp_path, monkeypatch):
    """The in-place warm start is rewritten only under base_model's exclusive hold: with a training
    run reading the model the rebuild fails at once, before the old report or any weight is
    touched; a warm start of the same settings is reused without a hold."""
    import json

    import l2t_core.warmstart as warmstart
    from l2t_core.model_lock import ModelInUse, using_model
    from l2t_pipeline.assets import build_or_reuse_warm_start

    out = tmp_path / "tiny-sft"
    out.mkdir()
    old_report = json.dumps({"config": {"sft_steps": 1}})
    (out / "warmstart.json").write_text(old_report)
    monkeypatch.setattr(warmstart, "warm_start", lambda *a, **k: pytest.fail("rewritten under a reader"))

    def rewrite():
        return using_model(out, exclusive=True, who="base_model[tiny-sft]")

    with using_model(out, exclusive=False, who="checkpoints[tiny-sft|l2t] of Dagster run r1"):
        with pytest.raises(ModelInUse, match=r"cannot rebuild .*in use by checkpoints\[tiny-sft\|l2t\] of Dagster run r1"):
            build_or_reuse_warm_start(out, warmstart.WarmStartConfig(), rewrite)
        assert (out / "warmstart.json").read_text() == old_report
        same = warmstart.WarmStartConfig()
        (out / "warmstart.json").write_text(json.dumps({"config": json.loads(same.model_dump_json())}))
        assert build_or_reuse_warm_start(out, same, rewrite)[1] is True  # reused under the reader's hold


def test_sft_rebuild_resumes_an_unfinished_deepspeed_sft_of_the_same_config(tmp_path):
    """An unfinished SFT of the same config on DeepSpeed (its config file's bytes recorded beside the
    traces') is left for the job to resume, not removed as if made with other settings."""
    import json

    from l2t_core.sft import SFTConfig, file_sha256, partial_dir
    from l2t_pipeline.assets import build_or_reuse_sft

    traces, ds = tmp_path / "t.jsonl", tmp_path / "zero2.json"
    traces.write_text("{}\n")
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    out = tmp_path / "models" / "s"
    out.parent.mkdir()
    cfg = SFTConfig(model="/m", data=str(traces), out=str(out), steps=6, engine="deepspeed", deepspeed_config=str(ds))
    work = partial_dir(out)
    work.mkdir()
    (work / "sft_config.json").write_text(cfg.model_dump_json())
    (work / "data.json").write_text(json.dumps({"sha256": file_sha256(traces), "deepspeed_sha256": file_sha256(ds)}))
    seen = []

    def run(c):
        seen.append(work.exists())
        Path(c.out).mkdir()
        (Path(c.out) / "sft_config.json").write_text(c.model_dump_json())
        (Path(c.out) / "sft_report.json").write_text(json.dumps({"data_sha256": file_sha256(traces)}))

    logged = []
    assert build_or_reuse_sft(out, cfg, run, logged.append)[1] is False
    assert seen == [True] and not logged  # the job found its work to resume


def test_local_launcher_places_runs_on_its_ranks_and_runs_train_where_a_gpu_is():
    """The local launcher runs a config as it is in one process, and on several processes with the
    DeepSpeed engine and the shipped ZeRO-2 config unless the run names DeepSpeed itself (the
    torchrun launch itself: test_deepspeed.py); a pipeline run trains on the GPU where there is one
    (device auto), or where its config says."""
    from l2t_core.config import DataConfig, TrainConfig
    from l2t_pipeline.config import TrainRunConfig
    from l2t_pipeline.resources import TrainingLauncher

    cfg = TrainRunConfig().to_core(policy="p", method="l2t", out="o", data=DataConfig())
    assert cfg.device == "auto"
    assert TrainRunConfig(device="cpu").to_core(policy="p", method="l2t", out="o", data=DataConfig()).device == "cpu"
    assert TrainingLauncher().placed_config(cfg) == cfg
    eight = TrainingLauncher(nproc_per_node=8)
    placed = eight.placed_config(cfg)
    assert placed.engine == "deepspeed" and Path(placed.deepspeed_config).is_file()
    eight.check_config(placed)
    own = TrainConfig.model_validate({**cfg.model_dump(), "engine": "deepspeed", "deepspeed_config": "mine.json"})
    assert eight.placed_config(own).deepspeed_config == "mine.json"


def test_registry_sensor_requests_a_baseline_until_one_is_materialized(tmp_path, monkeypatch):
    """Through Dagster's sensor evaluation on an instance: a new model gets its partition and a
    baseline run; a model whose baseline run failed is requested again (a new run key, after a
    wait) until
    MAX_BASELINE_ATTEMPTS runs failed; a partition added by hand gets its baseline; a model with a
    materialized base_model gets none."""
    from l2t_pipeline.assets import base_model
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher
    from l2t_pipeline.sensors import BASE_MODEL_TAG, BASELINE_REASON, MAX_BASELINE_ATTEMPTS, REASON_TAG, RUN_KEY_TAG
    reg_path = tmp_path / "registry.yaml"
    registry = write_registry(reg_path, {"tiny-sft": {"kind": "pretrained", "path": str(tmp_path / "missing")}})
    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "l2t.duckdb")), "registry": registry,
                 "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
                 "training_data": TrainingData(train_size=4, max_steps=1),
                 "evaluator": HeldOutEvaluator(levels=[1], per_level=1), "launcher": TrainingLauncher()}
    with dg.instance_for_test() as instance:
        def tick():
            with dg.build_sensor_context(instance=instance, resources={"registry": registry}) as ctx:
                result = model_registry_sensor(ctx)
            for req in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            return result

        def fail_baseline(request: dg.RunRequest):
            """Run the requested baseline as the daemon would (its tags): the model path is missing."""
            res = dg.materialize([*ASSETS, *all_checks], selection=[base_model], partition_key=request.partition_key,
                                 tags=dict(request.tags), resources=resources, instance=instance, raise_on_error=False)
            assert not res.success

        first = tick()
        assert [(r.partition_key, r.run_key) for r in first.run_requests] == [("tiny-sft", "baseline:tiny-sft")]
        assert first.run_requests[0].asset_selection == [dg.AssetKey("base_model")]
        assert first.run_requests[0].tags == {BASE_MODEL_TAG: "tiny-sft", REASON_TAG: BASELINE_REASON}
        assert instance.get_dynamic_partitions("base_models") == ["tiny-sft"]
        # not submitted (or submission failed): the same request again, which the run key deduplicates
        assert [r.run_key for r in tick().run_requests] == ["baseline:tiny-sft"]
        # created by the daemon but never submitted (it stopped in between): requested again under
        # its key, which makes the daemon launch that run; a starting or running one is waited for
        from dagster._core.test_utils import create_run_for_test

        tags = {**first.run_requests[0].tags, RUN_KEY_TAG: "baseline:tiny-sft"}
        created = create_run_for_test(instance, status=dg.DagsterRunStatus.NOT_STARTED, tags=tags)
        assert [r.run_key for r in tick().run_requests] == ["baseline:tiny-sft"]
        instance.delete_run(created.run_id)
        for status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED):
            waiting = create_run_for_test(instance, status=status, tags=tags)
            assert not tick().run_requests, status
            instance.delete_run(waiting.run_id)
        # one created under a key an earlier run has (a retry copies its parent's key): the daemon
        # would skip it, so the next attempt is requested instead
        import l2t_pipeline.sensors as sensors_module

        twins = [create_run_for_test(instance, status=status, tags=tags)
                 for status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.NOT_STARTED)]
        with monkeypatch.context() as no_wait:  # (the retry wait is tested below)
            no_wait.setattr(sensors_module, "RETRY_AFTER_S", (0.0, 0.0))
            assert [r.run_key for r in tick().run_requests] == ["baseline:tiny-sft:attempt-2"]
        for twin in twins:
            instance.delete_run(twin.run_id)
        fail_baseline(first.run_requests[0])
        waiting = tick()  # the next run waits RETRY_AFTER_S[0] after the failed one's end
        assert not waiting.run_requests and "a retry to wait for" in waiting.skip_reason.skip_message
        monkeypatch.setattr(sensors_module, "RETRY_AFTER_S", (0.0, 0.0))
        second = tick()
        assert [r.run_key for r in second.run_requests] == ["baseline:tiny-sft:attempt-2"]
        fail_baseline(second.run_requests[0])
        third = tick()
        assert [r.run_key for r in third.run_requests] == [f"baseline:tiny-sft:attempt-{MAX_BASELINE_ATTEMPTS}"]
        fail_baseline(third.run_requests[0])
        assert not tick().run_requests  # gave up after MAX_BASELINE_ATTEMPTS failed runs

        # a partition added by hand gets its baseline; a materialized base_model gets none
        write_registry(reg_path, {"tiny-sft": {"kind": "warmstart"}, "other": {"kind": "pretrained", "path": "/m"},
                                  "done": {"kind": "pretrained", "path": "/d"}})
        instance.add_dynamic_partitions("base_models", ["other", "done"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="base_model", partition="done"))
        fourth = tick()
        assert [(r.partition_key, r.run_key) for r in fourth.run_requests] == [("other", "baseline:other")]
        assert not fourth.dynamic_partitions_requests
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="base_model", partition="other"))
        write_registry(reg_path, {"other": {"kind": "pretrained", "path": "/m"}})
        last = tick()
        assert not last.run_requests and "needs a baseline run now" in last.skip_reason.skip_message


# ------------------------------------------------------------------------------ S3 (moto server)


@pytest.fixture
def s3_endpoint(monkeypatch):
    with moto_s3(monkeypatch, "l2t", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}) as (_, url):
        yield url


def test_s3_storage_through_moto(s3_endpoint):
    storage = L2TStorage(url="s3://l2t/pipeline", models_dir="/unused")
    url = storage.run_url("m", "grpo", "abc")
    run = storage.run_storage(url)
    run.check_writable()
    writer = MetricsWriter(run)
    writer.add("train_steps", [{"run_id": "r", "step": 1, "accuracy": 0.5, "mean_tokens": 10.0}])
    writer.add("rollouts", [{"run_id": "r", "step": 1, "rollout": 0, "level": 1, "outcome": 1.0, "num_episodes": 2}])
    writer.add("episode_rewards", [{"run_id": "r", "step": 1, "rollout": 0, "episode": e} for e in (1, 2)])
    writer.flush(1, 1)
    run.write_checkpoint(1, lambda d: (d / "model.txt").write_text("w"))
    # with its protocol: a URL a person can use (it goes into the warehouse's checkpoint_url)
    assert RunStorage(url).latest_checkpoint() == (1, "s3://l2t/pipeline/runs/m/grpo/abc/checkpoints/step-000001")
    tables = trainer_tables(RunStorage(url), "m", "grpo")
    assert len(tables["train_steps"]) == 1 and tables["episode_rewards"]["outcome_reward"].tolist() == [0.5, 0.5]
    assert "testing" not in storage.display(url) and os.environ["AWS_ENDPOINT_URL"] == s3_endpoint


def test_run_directory_follows_the_base_weights_and_the_data_file(tiny_dir, tmp_path, monkeypatch):
    """A run's directory (its config hash) names the base model and the data file by content: a base
    rebuilt in place or an edited data file gives a new run, so checkpoints never returns the old
    base's run as the new one's; identical inputs give the same run (reused)."""
    import json
    import shutil

    from l2t_core.config import TrainConfig
    from l2t_pipeline.assets import config_hash, inputs_fingerprint

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n")
    monkeypatch.setenv("L2T_DATA_DIR", str(data))
    cfg = TrainConfig(policy=str(base), out="unset", data={"source": "train.jsonl"})

    def run_hash():
        return config_hash(cfg, inputs_fingerprint(cfg))

    first = run_hash()
    assert run_hash() == first
    # how often it checkpoints (and what a resume may change) does not name the run
    resumable = cfg.model_copy(update={"checkpoint_every": 7, "keep_checkpoints": 5, "verify_workers": 0})
    assert config_hash(resumable, inputs_fingerprint(resumable)) == first
    weights = base / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # the base rebuilt in place: other weights under the same path
    weights.write_bytes(bytes(raw))
    rebuilt = run_hash()
    assert rebuilt != first
    (data / "train.jsonl").write_text(json.dumps({"id": "a", "problem": "1+2?", "answer": "3"}) + "\n")
    assert run_hash() not in (first, rebuilt)
    hub = TrainConfig(policy="Qwen/Qwen2.5-Math-1.5B", out="unset")  # a hub id and a synthetic task
    assert inputs_fingerprint(hub) == {}
    # a DeepSpeed config counts by its bytes, not by where this checkout keeps it
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    here, there = (hub.model_copy(update={"engine": "deepspeed", "deepspeed_config": str(tmp_path / n / "zero2.json")})
                   for n in ("a", "b"))
    assert config_hash(here, inputs_fingerprint(here)) == config_hash(there, inputs_fingerprint(there))
    (tmp_path / "b" / "zero2.json").write_text('{"zero_optimization": {"stage": 3}}')
    assert config_hash(here, inputs_fingerprint(here)) != config_hash(there, inputs_fingerprint(there))


def test_reevaluation_schedule_requests_each_trained_checkpoint_with_an_out_of_date_report(tmp_path):
    """Every checkpoints partition materialized at least once (also when a later run failed) and
    still existing, of a base model still registered; a deleted base model's partitions, a model
    taken out of the registry and never-trained ones are left out. Of those, only the ones whose
    report is missing, older than the checkpoint or made with another evaluator; an unreadable
    registry fails the tick."""
    from l2t_pipeline.assets import checkpoints
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher
    from l2t_pipeline.sensors import REASON_TAG, reevaluation_schedule
    tick = datetime(2026, 11, 22, 3, 0, tzinfo=timezone.utc)
    registered = write_registry(tmp_path / "registered.yaml", {"tiny-sft": {"kind": "warmstart"},
                                                               "gone": {"kind": "warmstart"}})
    with dg.instance_for_test() as instance:
        # the contexts are entered and left: they set (and must reset) Dagster's current-instance state
        evaluator = HeldOutEvaluator(levels=[1], per_level=2)
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                       resources={"registry": registered, "evaluator": evaluator}) as ctx:
            assert isinstance(reevaluation_schedule(ctx), dg.SkipReason)
        instance.add_dynamic_partitions("base_models", ["tiny-sft", "gone", "retired"])
        for pk in ("tiny-sft|l2t", "tiny-sft|grpo", "gone|l2t", "retired|l2t"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="checkpoints", partition=pk))
        # training runs that fail (the base model is not in the registry): after a materialization
        # (tiny-sft|grpo) and without one (tiny-sft|mrt)
        resources = {"duckdb": DuckDBResource(database=str(tmp_path / "l2t.duckdb")),
                     "registry": write_registry(tmp_path / "r.yaml", {"x": {"kind": "pretrained", "path": "/x"}}),
                     "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
                     "training_data": TrainingData(), "evaluator": HeldOutEvaluator(), "launcher": TrainingLauncher()}
        for pk in ("tiny-sft|grpo", "tiny-sft|mrt"):
            assert not dg.materialize([*ASSETS, *all_checks], selection=[checkpoints], partition_key=pk,
                                      resources=resources, instance=instance, raise_on_error=False).success
        status = instance.get_status_by_partition(checkpoints.key, ["tiny-sft|grpo"], checkpoints.partitions_def)
        assert status == {"tiny-sft|grpo": dg.AssetPartitionStatus.FAILED}
        instance.delete_dynamic_partition("base_models", "gone")

        def requested(registry=registered, evaluator=evaluator):
            with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                           resources={"registry": registry, "evaluator": evaluator}) as ctx:
                reqs = reevaluation_schedule(ctx)
            return reqs if isinstance(reqs, dg.SkipReason) else sorted((r.partition_key, r.run_key, r.tags[REASON_TAG])
                                                                      for r in reqs)

        assert requested() == [("tiny-sft|grpo", "reeval:20261122:tiny-sft|grpo", "never evaluated"),
                               ("tiny-sft|l2t", "reeval:20261122:tiny-sft|l2t", "never evaluated")]  # not "retired"

        def report(pk, used):
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key="benchmark_reports", partition=pk, metadata={"evaluator": used} if used else None))

        # reports made since the checkpoint with this evaluator are up to date; one made with another
        # evaluator, or before reports recorded theirs, is not; nor one older than the checkpoint
        report("tiny-sft|l2t", evaluator.fingerprint())
        report("tiny-sft|grpo", None)
        assert requested() == [("tiny-sft|grpo", "reeval:20261122:tiny-sft|grpo", "evaluated with another evaluator")]
        report("tiny-sft|grpo", evaluator.fingerprint())
        skipped = requested()
        assert isinstance(skipped, dg.SkipReason) and "every one of the 2 trained checkpoints" in skipped.skip_message
        assert requested(evaluator=HeldOutEvaluator(levels=[1, 2], per_level=3)) == [
            (pk, f"reeval:20261122:{pk}", "evaluated with another evaluator") for pk in ("tiny-sft|grpo", "tiny-sft|l2t")]
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="checkpoints", partition="tiny-sft|l2t"))
        assert requested() == [("tiny-sft|l2t", "reeval:20261122:tiny-sft|l2t", "trained since its last evaluation")]
        # a registry that cannot be read fails the tick, naming it
        with pytest.raises(Exception, match=r"cannot read the model registry .*gone\.yaml"):
            requested(registry=ModelRegistry(path=str(tmp_path / "gone.yaml")))
        # a tick downloads no benchmark: one not in the data directory yet fails it, saying what to do
        from l2t_core.eval import datasets
        from l2t_pipeline.resources import BenchmarkEvaluator

        def no_download(*args):
            raise AssertionError("a schedule tick downloaded a benchmark")

        (tmp_path / "empty_data").mkdir()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(datasets, "download_from_hub", no_download)
            with pytest.raises(Exception, match=r"local data only .*math500.*materialize `datasets` once"):
                requested(evaluator=BenchmarkEvaluator(benchmarks=["math500"], data_dir=str(tmp_path / "empty_data")))


def test_local_launcher_runs_torchrun_for_several_processes_and_refuses_a_single_process_engine(tmp_path):
    from l2t_core.config import TrainConfig
    from l2t_pipeline.resources import TrainingLauncher

    one = TrainingLauncher(python="/py")
    assert one.command("c.yaml") == ["/py", "-m", "l2t_core.cli", "train", "--config", "c.yaml"]
    two = TrainingLauncher(python="/py", nproc_per_node=2, master_port=29600)
    assert two.command("c.yaml") == ["/py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                                     "127.0.0.1", "--master_port", "29600", "-m", "l2t_core.cli", "train",
                                     "--config", "c.yaml"]
    assert two.command("c.yaml", log_dir="/t/logs")[:10] == [
        "/py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", "29600", "--log-dir"]
    assert two.command("c.yaml", log_dir="/t/logs")[10:12] == ["/t/logs", "-m"]
    assert one.command("c.yaml", log_dir="/t/logs") == one.command("c.yaml")  # one process: no torchrun
    # no port given: torchrun finds a free one (runs side by side on one machine do not collide)
    assert TrainingLauncher(python="/py", nproc_per_node=2).command("c.yaml") == [
        "/py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "l2t_core.cli", "train",
        "--config", "c.yaml"]
    assert two.sft_command("s.yaml") == ["/py", "-m", "l2t_core.cli", "sft", "--config", "s.yaml", "-q"]  # never torchrun
    cfg = TrainConfig(policy=str(tmp_path), out=str(tmp_path / "run"), method="grpo")
    two.check_config(cfg.model_copy(update={"engine": "deepspeed"}))
    with pytest.raises(ValueError, match=r"nproc_per_node=2 .* needs engine 'deepspeed' \(the run's engine is 'torch'\)"):
        two.check_config(cfg)
    one.check_config(cfg)


def test_only_rank_0_of_a_launch_talks_to_dagster_pipes():
    from l2t_core.pipes import launch_rank, pipes_session

    env = {"DAGSTER_PIPES_CONTEXT": "x", "DAGSTER_PIPES_MESSAGES": "y", "RANK": "1"}
    with pipes_session(env) as reporter:  # rank 1: standalone, never opens the (here bogus) Pipes channel
        assert not reporter.active
    assert launch_rank({}) == 0 and launch_rank({"RANK": "3"}) == 3
    with pytest.raises(ValueError, match="RANK='a' is not a whole number"):
        launch_rank({"RANK": "a"})


# ------------------------------------------------------------------------------ I/O manager (runs in separate pods)


def test_a_run_in_another_instance_loads_the_outputs_of_an_earlier_run(tiny_dir, tmp_path, monkeypatch):
    """Two Dagster instances (two DAGSTER_HOME folders) stand in for two run pods of
    K8sRunLauncher: ``datasets`` is materialized in one, ``segmented_rollouts`` in the other loads
    it through the I/O manager on the shared storage; Dagster's default (the instance's own
    storage folder) cannot."""
    from l2t_pipeline.assets import datasets, segmented_rollouts
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS, default_resources
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher, make_io_manager

    monkeypatch.setenv("L2T_STORAGE_URL", str(tmp_path / "shared" / "storage"))
    monkeypatch.delenv("L2T_IO_URL", raising=False)
    assert make_io_manager().base_dir == f"{tmp_path}/shared/storage/assets"
    monkeypatch.setenv("L2T_IO_URL", str(tmp_path / "shared" / "assets"))
    assert default_resources()["io_manager"].base_dir == str(tmp_path / "shared" / "assets")
    monkeypatch.setenv("L2T_IO_URL", "s3://key:secret@bucket/assets")
    with pytest.raises(ValueError, match="L2T_IO_URL"):
        make_io_manager()
    monkeypatch.setenv("L2T_IO_URL", str(tmp_path / "shared" / "assets"))

    registry = write_registry(tmp_path / "registry.yaml", {"tiny": {"kind": "pretrained", "path": str(tiny_dir)}})
    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "shared" / "l2t.duckdb")), "registry": registry,
                 "storage": L2TStorage(url=str(tmp_path / "shared" / "storage"), models_dir=str(tmp_path / "models")),
                 "training_data": TrainingData(train_size=4, max_steps=1),
                 "evaluator": HeldOutEvaluator(levels=[1], per_level=1), "launcher": TrainingLauncher()}
    sampling = {"ops": {"segmented_rollouts": {"config": {"prompts": 1, "group_size": 2, "max_new_tokens": 4}}}}

    def materialize(instance, asset, io_manager, **kw):
        extra = {"io_manager": io_manager} if io_manager is not None else {}
        return dg.materialize([*ASSETS, *all_checks], selection=[asset], resources={**resources, **extra},
                              instance=instance, raise_on_error=False, **kw)

    for pod in ("pod1", "pod2"):
        (tmp_path / pod).mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "pod1")) as pod1:
        assert materialize(pod1, datasets, make_io_manager()).success
    with dg.instance_for_test(temp_dir=str(tmp_path / "pod2")) as pod2:
        pod2.add_dynamic_partitions("base_models", ["tiny"])
        # Dagster's default I/O manager: the output stayed in pod 1's DAGSTER_HOME
        lost = materialize(pod2, segmented_rollouts, None, partition_key="tiny", run_config=sampling)
        assert not lost.success
        failure = [e for e in lost.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert "datasets" in str(failure.step_failure_data.error)
        result = materialize(pod2, segmented_rollouts, make_io_manager(), partition_key="tiny", run_config=sampling)
        assert result.success
        rollouts = result.output_for_node("segmented_rollouts")
        assert len(rollouts) == 2 and set(rollouts["base_model"]) == {"tiny"}
    assert (tmp_path / "shared" / "assets" / "datasets").is_file()
    assert (tmp_path / "shared" / "assets" / "segmented_rollouts" / "tiny").is_file()


# ------------------------------------------------------------------------------ the warehouse lock while evaluating

LOCK_PROBE = ("import sys, duckdb; from filelock import FileLock; "
              "lock = FileLock(sys.argv[1] + '.lock'); lock.acquire(timeout=1); duckdb.connect(sys.argv[1]).close(); "
              "lock.release()")
PROBES: list[int] = []


def probe_warehouse(db: str) -> int:
    """Exit status of another process taking the warehouse's lock (1 s at most) and opening it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", LOCK_PROBE, db], capture_output=True, timeout=120).returncode


def test_benchmark_reports_evaluates_without_holding_the_warehouse(tmp_path):
    """While the evaluator runs (minutes to hours in production) another process can take the
    warehouse's lock and open it: benchmark_reports reads, evaluates with no connection open, then
    writes. The probe does fail while a connection is open. Evaluations that could not be stored
    are kept and reused by the next attempt."""
    import json

    from l2t_pipeline.assets import benchmark_reports
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.resources import Evaluator, TrainingData, TrainingLauncher, summary_rows

    db = str(tmp_path / "l2t.duckdb")

    class ProbingEvaluator(Evaluator):
        database: str

        @property
        def benchmark(self) -> str:
            return "probe"

        def settings(self) -> dict:
            return {}

        def evaluate(self, model_dir):  # as evaluators were written before the journal: still called
            PROBES.append(probe_warehouse(self.database))
            level = {"n": 2, "accuracy": 0.5, "mean_tokens": 10.0, "mean_episodes": 1.0, "tagged_share": 1.0,
                     "finished_share": 1.0, "redundant_share": 0.0}
            return summary_rows({**level, "per_level": {1: level}}, self.benchmark, self.fingerprint())

    duck = DuckDBResource(database=db)
    pk = run_key("tiny", "grpo")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    with warehouse.connect(duck) as con:
        warehouse.replace_rows(con, "checkpoints", pd.DataFrame([{
            "base_model": "tiny", "method": "grpo", "run_url": str(tmp_path / "run"), "checkpoint_url": str(ckpt),
            "final_step": 1, "config_hash": "test", "config_json": json.dumps({}),
            "base_weights": None}]), "checkpoints", pk)  # a run recorded before runs recorded them
        assert probe_warehouse(db) != 0  # the probe sees a held lock
    resources = {"duckdb": duck, "evaluator": ProbingEvaluator(database=db),
                 "registry": write_registry(tmp_path / "r.yaml", {"tiny": {"kind": "pretrained", "path": "/m"}}),
                 "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
                 "training_data": TrainingData(train_size=4, max_steps=1), "launcher": TrainingLauncher()}
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "home"))
    instance.add_dynamic_partitions("base_models", ["tiny"])
    PROBES.clear()
    result = dg.materialize([*ASSETS, *all_checks], selection=[benchmark_reports], partition_key=pk,
                            resources=resources, instance=instance)
    assert result.success
    assert PROBES == [0, 0]  # base and checkpoint evaluated, each time the warehouse was free
    with warehouse.connect(duck) as con:
        assert len(warehouse.read_rows(con, "eval_results", "benchmark_reports", pk)) == 4
    kept = [tmp_path / "run" / "evaluations", tmp_path / "storage" / "base_models" / "tiny" / "evaluations"]
    assert not any(k.exists() and any(k.iterdir()) for k in kept), [list(k.rglob("*")) for k in kept if k.exists()]

    # the warehouse cannot be written (busy): the evaluations are kept, and the step run again
    # stores them without evaluating again
    import l2t_pipeline.assets as assets_module

    def busy(*a, **k):
        raise warehouse.WarehouseBusy("held by a notebook")

    real = assets_module.write_validated
    assets_module.write_validated = busy
    try:
        failed = dg.materialize([*ASSETS, *all_checks], selection=[benchmark_reports], partition_key=pk,
                                resources=resources, instance=instance, raise_on_error=False)
    finally:
        assets_module.write_validated = real
    assert not failed.success and len(PROBES) == 4
    assert all(len(list(k.glob("*.json"))) == 1 for k in kept)
    again = dg.materialize([*ASSETS, *all_checks], selection=[benchmark_reports], partition_key=pk,
                           resources=resources, instance=instance)
    assert again.success and len(PROBES) == 4  # nothing evaluated again
    assert not any(any(k.iterdir()) for k in kept)
    with warehouse.connect(duck) as con:
        assert len(warehouse.read_rows(con, "eval_results", "benchmark_reports", pk)) == 4


# ------------------------------------------------------------------------------ blocking schema checks


def test_a_failing_blocking_schema_check_stops_the_downstream_asset(tmp_path):
    """The schema checks guarding downstream steps are blocking; one that fails (duplicated keys
    written past the validation) stops the asset downstream of the checked one in the same run."""
    from l2t_pipeline.checks import all_checks, checkpoint_quality_gate, schema_check

    blocking = {spec.asset_key.to_user_string(): spec.blocking for c in all_checks for spec in c.check_specs
                if spec.name == "stored_rows_valid"}
    assert blocking == {"datasets": False, "segmented_rollouts": True, "episode_rewards": True,
                        "checkpoints": True, "benchmark_reports": False}
    (gate,) = checkpoint_quality_gate.check_specs
    assert not gate.blocking and "a report" in gate.description

    downstream_ran = []

    @dg.asset(name="upstream_rows")
    def upstream(duckdb: DuckDBResource) -> None:
        with warehouse.connect(duckdb) as con:  # a repeated natural key, stored without validation
            warehouse.replace_rows(con, "rollouts", pd.concat([rollout_rows(2), rollout_rows(2)]),
                                   "upstream_rows", "__all__")

    @dg.asset(deps=[upstream])
    def downstream() -> None:
        downstream_ran.append(True)

    for block, ran in ((True, []), (False, [True])):
        downstream_ran.clear()
        check = schema_check(upstream, ["rollouts"], blocking=block)
        result = dg.materialize([upstream, downstream, check], raise_on_error=False,
                                resources={"duckdb": DuckDBResource(database=str(tmp_path / f"{block}.duckdb"))})
        (evaluation,) = result.get_asset_check_evaluations()
        assert not evaluation.passed and evaluation.metadata["rollouts.duplicate_keys"].value == 2
        assert downstream_ran == ran
        assert result.success is not block


def test_the_installed_dagster_is_within_the_pinned_release_line():
    """The pipeline and k8s extras pin Dagster's release line (preview APIs in use); the installed
    Dagster packages satisfy the pins, and each pin has an upper bound."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    from packaging.requirements import Requirement

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    pins = [Requirement(r) for extra in ("pipeline", "k8s") for r in extras[extra] if r.startswith("dagster")]
    assert {p.name for p in pins} >= {"dagster", "dagster-webserver", "dagster-duckdb", "dagster-pandera",
                                      "dagster-pipes", "dagster-k8s"}
    for pin in pins:
        assert any(s.operator == "<" for s in pin.specifier), f"{pin} has no upper bound"
        try:
            installed = version(pin.name)
        except PackageNotFoundError:
            continue  # an extra not installed here (dagster-k8s without the k8s extra)
        assert pin.specifier.contains(installed), f"{pin.name} {installed} does not satisfy {pin}"


def test_instances_run_one_run_per_partition_key_at_a_time(tmp_path, monkeypatch):
    """The local and the production instance (and the Helm values rendering it) limit runs to one
    per value of dagster/partition, the tag Dagster puts on every partitioned run."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    per_partition = {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(root / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as local:
        limits = local.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert per_partition in limits
    prod = yaml.safe_load((root / "infra" / "dagster" / "dagster.yaml").read_text())
    assert per_partition in prod["concurrency"]["runs"]["tag_concurrency_limits"]
    values = yaml.safe_load((root / "infra" / "k8s" / "values.yaml").read_text())
    assert per_partition in values["concurrency"]["runs"]["tagConcurrencyLimits"]
    # Dagster tags a partitioned run with its key
    result = dg.materialize([dg.asset(name="keyed", partitions_def=dg.StaticPartitionsDefinition(["a"]))(
        lambda: None)], partition_key="a")
    assert result.dagster_run.tags["dagster/partition"] == "a"


def test_the_io_manager_stores_outputs_on_s3(monkeypatch):
    """With run storage on S3 the assets' outputs go next to it (``<L2T_STORAGE_URL>/assets``) and a
    run in another instance loads them from there."""
    from l2t_pipeline.resources import make_io_manager

    with moto_s3(monkeypatch, "l2t", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}) as (s3, _):
        monkeypatch.setenv("L2T_STORAGE_URL", "s3://l2t/pipeline")
        monkeypatch.delenv("L2T_IO_URL", raising=False)
        assert make_io_manager().base_dir == "s3://l2t/pipeline/assets"

        @dg.asset(name="frame")
        def frame() -> pd.DataFrame:
            return pd.DataFrame({"a": [1, 2]})

        @dg.asset(name="total")
        def total(frame: pd.DataFrame) -> int:
            return int(frame["a"].sum())

        with dg.instance_for_test() as first:
            assert dg.materialize([frame], resources={"io_manager": make_io_manager()}, instance=first).success
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="l2t", Prefix="pipeline/assets/")["Contents"]]
        assert keys == ["pipeline/assets/frame"]
        with dg.instance_for_test() as second:
            result = dg.materialize([frame, total], selection=[total], resources={"io_manager": make_io_manager()},
                                    instance=second)
        assert result.output_for_node("total") == 3


def test_reward_settings_reach_every_reward_option_and_bad_ones_fail_by_name():
    """The launchpad's `settings` / `reward_settings` take any RewardConfig option as `l2t train --set`
    does (here the copy share and the additive credit), over the explicit fields; a misspelt key, a bad
    value or a malformed entry fails naming it, before any compute."""
    from pydantic import ValidationError

    from l2t_core.config import DataConfig
    from l2t_pipeline.config import RewardSettings, TrainRunConfig

    r = RewardSettings(beta=0.3, settings=["copying.coef=2", "credit.credit=additive"]).to_core()
    assert (r.copying.coef, r.credit.credit, r.credit.beta) == (2.0, "additive", 0.3)
    assert RewardSettings().to_core() == RewardSettings(settings=[]).to_core()
    t = TrainRunConfig(kl_coef=0.01, reward_settings=["copying.coef=1.5", "credit.alpha=0.4"]).to_core(
        policy="p", method="l2t", out="o", data=DataConfig())
    assert (t.reward.copying.coef, t.reward.credit.alpha, t.reward.loss.kl_coef) == (1.5, 0.4, 0.01)
    with pytest.raises(ValidationError, match="copying.coeff"):
        RewardSettings(settings=["copying.coeff=2"]).to_core()
    with pytest.raises(Exception, match="method"):  # a misspelt method fails with the run config, not in the step
        RewardSettings(method="l2tt")
    with pytest.raises(Exception, match="device"):
        RewardSettings(device="gpu")
    with pytest.raises(ValidationError, match="copying.coef"):
        RewardSettings(settings=["copying.coef=-1"]).to_core()
    with pytest.raises(ValueError, match="RewardSettings.settings expects key=value"):
        RewardSettings(settings=["copying.coef"]).to_core()
    with pytest.raises(ValueError, match="TrainRunConfig.reward_settings credit.beta.x: 'beta' is not a section"):
        TrainRunConfig(reward_settings=["credit.beta.x=1"]).to_core(policy="p", method="l2t", out="o",
                                                                     data=DataConfig())

    # any other TrainConfig setting, applied last; what the partition and resources say cannot be set
    def core(**kw):
        return TrainRunConfig(**kw).to_core(policy="p", method="l2t", out="o", data=DataConfig())

    t = core(lr=1e-4, settings=["gradient_checkpointing=true", "optim.weight_decay=0.01", "mini_batches=2",
                                "rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.5"])
    assert (t.gradient_checkpointing, t.optim.weight_decay, t.optim.lr, t.mini_batches) == (True, 0.01, 1e-4, 2)
    assert (t.rollout.engine, t.rollout.vllm_gpu_memory_utilization, t.rollout.group_size) == ("vllm", 0.5, 4)
    assert core(settings=[]) == core()
    for key in ("policy", "out", "method", "data.source"):
        with pytest.raises(ValueError, match=f"TrainRunConfig.settings '{key}=x': '{key}' comes from the partition"):
            core(settings=[f"{key}=x"])
    with pytest.raises(ValidationError, match="optim.weight_decy"):
        core(settings=["optim.weight_decy=0.1"])
    # a setting TrainRunConfig has a field for, or a reward option, goes there (one value per setting)
    for item, field in (("steps=1000", "steps"), ("optim.lr=0.1", "lr"), ("rollout.group_size=8", "group_size")):
        with pytest.raises(ValueError, match=f"'{item.split('=')[0]}' is TrainRunConfig.{field}; set that field"):
            core(settings=[item])
    with pytest.raises(ValueError, match=r"reward options go in reward_settings, without 'reward.' \(credit.alpha=...\)"):
        core(settings=["reward.credit.alpha=0.5"])
    # checkpoints every 50 steps (the last one at least), two kept: a relaunched run resumes
    assert (core().checkpoint_every, core().keep_checkpoints, core(steps=500).checkpoint_every) == (4, 2, 50)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (gone or a zombie) within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


# a job that ignores SIGINT and leaves a child of its own (as torchrun's ranks are): it writes both pids
STUBBORN_JOB = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def test_an_interrupted_launch_ends_the_whole_job_and_a_failed_one_names_its_exit_code(tmp_path, monkeypatch):
    """The local launcher's Pipes client: a Dagster run interrupted while the job runs (cancelled
    in the UI) ends the job and every process of its group, SIGINT first and SIGKILL after the
    grace period, even a job that ignores SIGINT and its own children (torchrun's ranks);
    PipesSubprocessClient would leave them running. A job that fails fails the step with its code
    or signal and the end of its stderr (the exception)."""
    import subprocess
    import sys
    import time

    from l2t_pipeline.resources import ProcessGroupPipesClient

    pids = tmp_path / "pids"
    real_wait = subprocess.Popen.wait

    def interrupted(self, timeout=None):
        if timeout is None and not getattr(self, "_l2t_interrupted", False):
            self._l2t_interrupted = True
            deadline = time.monotonic() + 60
            while not pids.exists() and time.monotonic() < deadline:  # the job is up, its child started
                time.sleep(0.05)
            raise dg.DagsterExecutionInterruptedError()
        return real_wait(self, timeout=timeout)

    @dg.asset
    def job(context) -> None:
        ProcessGroupPipesClient(termination_timeout_seconds=1.0).run(
            context=context, command=[sys.executable, "-c", STUBBORN_JOB, str(pids)])

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted)
    dg.materialize([job], raise_on_error=False)
    parent, child = map(int, pids.read_text().split())
    assert _gone(parent) and _gone(child)
    monkeypatch.undo()

    def failure(script: str) -> str:
        @dg.asset
        def failing(context) -> None:
            ProcessGroupPipesClient().run(context=context, command=[sys.executable, "-c", script])

        res = dg.materialize([failing], raise_on_error=False)
        return res.get_step_failure_events()[0].event_specific_data.error.message

    assert failure("raise SystemExit(3)").endswith("exited with code 3; it wrote nothing to stderr\n")
    said = failure("import sys; print('loading', file=sys.stderr); raise ValueError('no benchmark \u00e9 here')")
    assert re.search(r"exited with code 1; the end of its stderr .*:\nloading\nTraceback .*\n"
                     r"ValueError: no benchmark \u00e9 here\n$", said, re.S), said
    assert "was ended by SIGKILL (SIGKILL: maybe the out-of-memory killer" in failure(
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    # the job is told which process to stop with (l2t_core.launcher_watch): the step's
    assert failure("import os; raise SystemExit('watching ' + os.environ['L2T_STOP_WITH_PID'])").endswith(
        f"watching {os.getpid()}\n")


def test_training_data_from_the_environment_and_a_heldout_evaluation_of_a_math_model_refused(tmp_path):
    """L2T_TRAINING_DATA / L2T_TRAINING_SIZE give runs the sensor and schedule start their data (a
    bad one fails when the code location loads, naming the variable); the held-out evaluator of
    the synthetic task refuses a base model that trains on a math file."""
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData

    assert TrainingData.from_env({}) == TrainingData()
    data = TrainingData.from_env({"L2T_TRAINING_DATA": "math500.jsonl", "L2T_TRAINING_SIZE": "64"})
    assert (data.source, data.train_size, data.synthetic) == ("math500.jsonl", 64, False)
    assert TrainingData.from_env({"L2T_TRAINING_DATA": "arithmetic"}).source == "arithmetic"
    with pytest.raises(ValueError, match=r"L2T_TRAINING_DATA='nope.jsonl': .*L2T_DATA_DIR"):
        TrainingData.from_env({"L2T_TRAINING_DATA": "nope.jsonl"})
    with pytest.raises(ValueError, match="L2T_TRAINING_SIZE='many' is not a number of training prompts"):
        TrainingData.from_env({"L2T_TRAINING_SIZE": "many"})
    # the default evaluator tests the held-out split of the task trained on; a data file needs the benchmarks
    from l2t_pipeline.definitions import evaluator_resource

    assert evaluator_resource({"L2T_TRAINING_DATA": "arithmetic"}).task == "arithmetic"
    assert evaluator_resource({}).task == TrainingData().source
    with pytest.raises(ValueError, match=r"L2T_TRAINING_DATA='math500.jsonl' trains on a data file.*L2T_EVALUATOR=bench"):
        evaluator_resource({"L2T_TRAINING_DATA": "math500.jsonl"})
    assert evaluator_resource({"L2T_TRAINING_DATA": "math500.jsonl", "L2T_EVALUATOR": "benchmark"}).benchmarks
    heldout = HeldOutEvaluator(task="walk")
    heldout.check_base_model("qwen", "walk")
    with pytest.raises(ValueError, match=r"base model 'qwen' trains on 'math500.jsonl' .* set L2T_EVALUATOR=benchmark"):
        heldout.check_base_model("qwen", "math500.jsonl")
    with pytest.raises(ValueError, match="learns the task 'arithmetic' but the evaluator tests 'walk'"):
        heldout.check_base_model("tiny", "arithmetic")


def test_a_hub_base_model_is_pinned_to_the_commit_base_model_found(tiny_dir, tmp_path, hub_cache):
    """A registry model on the hub (kind pretrained, revision main): base_model pins the commit
    main is (metadata, hub_pin.json) and evaluates it. When main moves upstream, the later steps
    keep that commit: checkpoints' run loads the hub id at the pinned commit (TrainConfig
    policy_revision, in a training process of its own reading the offline cache) and records its
    weights; base_model materialized again pins the new commit, and the report of the run of the
    old commit evaluates that commit. Before any pin, a later step fails naming base_model; a
    revision of a local path or of a warm start is refused by the registry."""
    import json

    from test_hub import A, B, REPO, other_weights

    from l2t_core.hub import hub_snapshot
    from l2t_pipeline.assets import HUB_PIN, base_model, base_model_path, benchmark_reports, checkpoints
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.partitions import run_key
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher

    for bad in ({"kind": "pretrained", "path": str(tiny_dir), "revision": "main"},
                {"kind": "warmstart", "revision": "main"}):
        with pytest.raises(ValueError, match="has a 'revision' \\('main'\\), which names a commit"):
            write_registry(tmp_path / "bad.yaml", {"m": bad}).entries()

    hub_cache(REPO, tiny_dir, A)
    storage = L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models"))
    registry = write_registry(tmp_path / "r.yaml", {"hub": {"kind": "pretrained", "path": REPO, "revision": "main"}})
    duck = DuckDBResource(database=str(tmp_path / "l2t.duckdb"))
    resources = {"duckdb": duck, "registry": registry, "storage": storage,
                 "training_data": TrainingData(train_size=4, max_steps=1),
                 "evaluator": HeldOutEvaluator(levels=[1], per_level=1, max_new_tokens=8), "launcher": TrainingLauncher()}
    train = {"ops": {"checkpoints": {"config": {"steps": 1, "prompts_per_step": 1, "group_size": 2,
                                                "max_new_tokens": 8, "device": "cpu"}}}}
    pk = run_key("hub", "grpo")

    def materialize(asset, key, **kw):
        res = dg.materialize([*ASSETS, *all_checks], selection=[asset], partition_key=key, resources=resources,
                             instance=instance, raise_on_error=False, **kw)
        if not res.success:
            return str(res.get_step_failure_events()[0].event_specific_data.error)
        return {k: v.value for k, v in res.asset_materializations_for_node(asset.key.path[-1])[0].metadata.items()}

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", ["hub"])
        unpinned = materialize(checkpoints, pk, run_config=train)
        assert "none is pinned; materialize base_model[hub] first" in unpinned
        first = materialize(base_model, "hub")
        assert (first["hub_model"], first["hub_revision"], first["hub_commit"]) == (REPO, "main", A)
        assert json.loads((tmp_path / "models" / "hub" / HUB_PIN).read_text())["commit"] == A
        assert first["path"] == f"{REPO}@{A}"  # the warehouse's model_path names the hub model, not a cache

        hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)  # main moves upstream
        entry = registry.get("hub")
        assert base_model_path("hub", entry, storage) == str(hub_snapshot(REPO, A))
        trained = materialize(checkpoints, pk, run_config=train)
        assert isinstance(trained, dict), trained
        with warehouse.connect(duck) as con:
            run = warehouse.read_rows(con, "checkpoints", "checkpoints", pk).iloc[0]
        cfg = json.loads(run["config_json"])
        assert (cfg["policy"], cfg["policy_revision"]) == (REPO, A)
        assert run["base_weights"] == f"hub:{REPO}@{A}"  # the commit names the files: nothing hashed
        report = materialize(benchmark_reports, pk)  # against the evaluation of the commit it trained from
        assert isinstance(report, dict) and report["base_accuracy"] is not None, report

        second = materialize(base_model, "hub")
        assert second["hub_commit"] == B and base_model_path("hub", entry, storage) == str(hub_snapshot(REPO, B))
        # its base's stored evaluation is now of commit B; the run's commit A is evaluated again (its files never change)
        again = materialize(benchmark_reports, pk)
        assert isinstance(again, dict), again
        with warehouse.connect(duck) as con:
            rows = warehouse.read_rows(con, "eval_results", "benchmark_reports", pk)
        assert set(rows[rows["model_kind"] == "base"]["model_weights"]) == {f"hub:{REPO}@{A}"}
        assert set(rows[rows["model_kind"] == "base"]["model_path"]) == {f"{REPO}@{A}"}


def test_the_registry_sensor_requests_a_new_baseline_when_a_followed_hub_branch_moves(tiny_dir, tmp_path,
                                                                                     hub_cache, monkeypatch):
    """A hub model the registry ``follow``s: while its branch is the commit base_model pinned the
    sensor requests nothing; once the branch moves it requests base_model once for the new commit
    (run key upstream:<name>:<commit>, reason tagged), and nothing after that run pinned it. The hub
    is asked at most every UPSTREAM_CHECK_S (the sensor's cursor). A move found while base_model
    runs is requested on the first tick after that run, unless it pinned the new commit. ``follow``
    of a local path or of a commit is refused."""
    import json

    import l2t_pipeline.sensors as sensors_module
    from l2t_core.models import ModelLoadError
    from test_hub import A, B, REPO, other_weights

    from l2t_pipeline.assets import base_model
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher
    from l2t_pipeline.sensors import REASON_TAG, UPSTREAM_REASON

    for bad, why in (({"kind": "pretrained", "path": str(tiny_dir), "follow": True}, "is no hub id"),
                     ({"kind": "pretrained", "path": REPO, "revision": A, "follow": True}, "is a commit, which never")):
        with pytest.raises(ValueError, match=why):
            write_registry(tmp_path / "bad.yaml", {"m": bad}).entries()

    hub_cache(REPO, tiny_dir, A)
    registry = write_registry(tmp_path / "r.yaml", {"hub": {"kind": "pretrained", "path": REPO, "follow": True}})
    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "l2t.duckdb")), "registry": registry,
                 "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
                 "training_data": TrainingData(train_size=4, max_steps=1),
                 "evaluator": HeldOutEvaluator(levels=[1], per_level=1, max_new_tokens=8), "launcher": TrainingLauncher()}
    cursor = [None]
    with dg.instance_for_test() as instance:
        def tick():
            with dg.build_sensor_context(instance=instance, resources={"registry": registry},
                                         cursor=cursor[0]) as ctx:
                result = model_registry_sensor(ctx)
            cursor[0] = result.cursor
            for req in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            return result.run_requests or []

        def run(request: dg.RunRequest):
            res = dg.materialize([*ASSETS, *all_checks], selection=[base_model], partition_key=request.partition_key,
                                 tags=dict(request.tags), resources=resources, instance=instance)
            return res.asset_materializations_for_node("base_model")[0].metadata["hub_commit"].value

        [baseline] = tick()
        assert baseline.run_key == "baseline:hub" and run(baseline) == A
        monkeypatch.setattr(sensors_module, "UPSTREAM_CHECK_S", 0.0)
        assert tick() == []  # main is still the pinned commit
        hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)  # main moves upstream
        monkeypatch.setattr(sensors_module, "UPSTREAM_CHECK_S", 3600.0)
        assert tick() == []  # asked within the hour: not asked again yet
        monkeypatch.setattr(sensors_module, "UPSTREAM_CHECK_S", 0.0)
        [moved] = tick()
        assert moved.run_key.startswith(f"upstream:hub:{B}:after-") and moved.tags[REASON_TAG] == UPSTREAM_REASON
        assert moved.asset_selection == [base_model.key] and run(moved) == B
        assert tick() == []
        hub_cache(REPO, tiny_dir, A)  # main moves back: asked for again (after this baseline: another run key)
        [back] = tick()
        assert back.run_key.startswith(f"upstream:hub:{A}:after-") and back.run_key != moved.run_key

        # a move found while base_model runs: requested on the first tick after that run ended, the hub
        # not asked again (hourly), unless that run pinned the new commit
        assert run(back) == A
        hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)
        real_statuses, real_hub_commit = sensors_module.partition_statuses, sensors_module.hub_commit
        monkeypatch.setattr(sensors_module, "partition_statuses",
                            lambda *a: {"hub": dg.AssetPartitionStatus.IN_PROGRESS})
        assert tick() == []
        monkeypatch.setattr(sensors_module, "partition_statuses", real_statuses)
        monkeypatch.setattr(sensors_module, "UPSTREAM_CHECK_S", 3600.0)

        def no_hub(*args):
            raise AssertionError("the hub was asked within the hour")

        monkeypatch.setattr(sensors_module, "hub_commit", no_hub)
        [after] = tick()  # that run ended (it pinned A): B requested now
        assert after.run_key.startswith(f"upstream:hub:{B}:after-") and run(after) == B
        assert tick() == []  # nothing waits any more
        monkeypatch.setattr(sensors_module, "partition_statuses",
                            lambda *a: {"hub": dg.AssetPartitionStatus.IN_PROGRESS})
        monkeypatch.setattr(sensors_module, "UPSTREAM_CHECK_S", 0.0)
        monkeypatch.setattr(sensors_module, "hub_commit", real_hub_commit)
        hub_cache(REPO, tiny_dir, A)  # main moves back while base_model runs
        assert tick() == []

        def unreachable(*args):
            raise ModelLoadError("the hub cannot be reached")

        monkeypatch.setattr(sensors_module, "hub_commit", unreachable)
        assert tick() == [] and json.loads(cursor[0])["waiting"] == {"hub": A}  # kept through a check without the hub
        monkeypatch.setattr(sensors_module, "partition_statuses", real_statuses)
        monkeypatch.setattr(sensors_module, "UPSTREAM_CHECK_S", 3600.0)
        monkeypatch.setattr(sensors_module, "hub_commit", no_hub)
        assert json.loads(cursor[0])["waiting"] == {"hub": A}
        assert run(dg.RunRequest(partition_key="hub")) == A  # what the run in progress pinned once it ended
        assert tick() == [] and json.loads(cursor[0])["waiting"] == {}


def test_the_steps_that_load_a_model_take_turns_with_training_unless_a_pool_is_named():
    """checkpoints runs in the training pool; the steps that load a model in the run worker share
    it by default, another pool or none where L2T_MODEL_POOL says so (the Kubernetes values: no
    pool, their run workers have no GPU)."""
    import json
    import subprocess
    import sys


    def pools(pool: str | None) -> dict:
        code = ("import json; from l2t_pipeline import assets as a; print(json.dumps({n: getattr(a, n).op.pool for n "
                "in ('base_model', 'segmented_rollouts', 'episode_rewards', 'checkpoints', 'benchmark_reports')}))")
        env = {k: v for k, v in os.environ.items() if k != "L2T_MODEL_POOL"}
        out = subprocess.run([sys.executable, "-c", code], env=env if pool is None else {**env, "L2T_MODEL_POOL": pool},
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    model_steps = ("base_model", "segmented_rollouts", "episode_rewards", "benchmark_reports")
    assert pools(None) == {"checkpoints": "l2t_training", **dict.fromkeys(model_steps, "l2t_training")}
    assert pools("") == {"checkpoints": "l2t_training", **dict.fromkeys(model_steps, None)}
    assert pools("gpu_boxes") == {"checkpoints": "l2t_training", **dict.fromkeys(model_steps, "gpu_boxes")}
    values = yaml.safe_load((Path(__file__).parents[1] / "infra" / "k8s" / "values.yaml").read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["env"]["L2T_MODEL_POOL"] == ""
    assert deployment["env"]["L2T_TRAIN_RETRIES"] == "2"


def test_training_retries_come_from_the_environment():
    """L2T_TRAIN_RETRIES: a failed checkpoints step is retried that often (a lost pod resumes from
    its last checkpoint); no policy by default (a failure reads as itself); a value that is not a
    count fails the code location."""
    import subprocess
    import sys

    code = ("from l2t_pipeline.assets import checkpoints as c; p = c.op.retry_policy; "
            "print(p.max_retries, p.delay, p.backoff.value) if p else print('no policy')")

    def load(value: str | None):
        env = {k: v for k, v in os.environ.items() if k != "L2T_TRAIN_RETRIES"}
        if value is not None:
            env["L2T_TRAIN_RETRIES"] = value
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    assert load(None).stdout.split()[-2:] == ["no", "policy"] and load("0").stdout.split()[-2:] == ["no", "policy"]
    assert load("2").stdout.split()[-3:] == ["2", "60", "EXPONENTIAL"]
    bad = load("two")
    assert bad.returncode != 0 and "L2T_TRAIN_RETRIES='two' is not a whole number of retries" in bad.stderr


def test_a_training_refusal_no_retry_can_change_is_not_retried(tmp_path):
    """With retries on, a checkpoints step refused for good (its base model not in the registry,
    a configuration the launcher refuses) fails at once, not after the retries' waits."""
    from l2t_pipeline.assets import checkpoints
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.partitions import runs_partitions
    from l2t_pipeline.resources import HeldOutEvaluator, TrainingData, TrainingLauncher

    job = dg.define_asset_job("retrying_training", selection=[checkpoints], partitions_def=runs_partitions,
                              op_retry_policy=dg.RetryPolicy(max_retries=2, delay=60))
    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "l2t.duckdb")),
                 "registry": write_registry(tmp_path / "r.yaml", {"other": {"kind": "warmstart"}}),
                 "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
                 "training_data": TrainingData(), "evaluator": HeldOutEvaluator(), "launcher": TrainingLauncher()}
    defs = dg.Definitions(assets=ASSETS, jobs=[job], resources=resources)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", ["gone"])
        result = defs.resolve_job_def("retrying_training").execute_in_process(
            partition_key=run_key("gone", "grpo"), instance=instance, raise_on_error=False)
    assert not result.success
    kinds = [e.event_type_value for e in result.all_events]
    assert "STEP_FAILURE" in kinds and "STEP_UP_FOR_RETRY" not in kinds
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.event_specific_data.error.message.startswith("dagster._core.definitions.events.Failure: base "
                                                                "model 'gone' is not in the model registry")
