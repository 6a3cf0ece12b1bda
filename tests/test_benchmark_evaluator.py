"""The real-benchmark evaluator of the pipeline (``resources.BenchmarkEvaluator``): per-group rows
from ``l2t_core.eval`` on a few MATH500 problems with the tiny model, the schema, the ``'all'``
aggregate, the fingerprint, clear errors for bad settings, selection through ``L2T_EVALUATOR``,
and ``benchmark_reports`` materialized with it."""

from __future__ import annotations

import json
import re

import dagster as dg
import duckdb
import pandas as pd
import pytest
import yaml
from dagster_duckdb import DuckDBResource

from l2t_core.config import DataConfig
from l2t_core.eval.datasets import DatasetError
from l2t_core.eval.runner import GROUP_ROW_COLUMNS, episode_counts, group_rows
from l2t_core.models import build_tiny_qwen2, weights_fingerprint
from l2t_pipeline import warehouse
from l2t_pipeline.assets import base_model, benchmark_reports, with_model_columns
from l2t_pipeline.checks import all_checks
from l2t_pipeline.definitions import ASSETS, default_resources, defs, evaluator_resource
from l2t_pipeline.partitions import run_key
from l2t_pipeline.resources import (BenchmarkEvaluator, HeldOutEvaluator, L2TStorage, ModelRegistry, TrainingData,
                                    TrainingLauncher)
from l2t_pipeline.schemas import EvalResultsSchema, ProblemsSchema, find_violations, schema_columns
from l2t_pipeline.tables import problem_rows

LIMIT = 4
MODEL_COLUMNS = ("model_kind", "base_model", "method", "model_path", "model_weights")


def quick(**over) -> BenchmarkEvaluator:
    """The evaluator at test size: the first problems of MATH500, greedy, a few tokens each."""
    return BenchmarkEvaluator(**{"benchmarks": ["math500"], "limit": LIMIT, "max_new_tokens": 6, **over})


@pytest.fixture(scope="module")
def evaluated(tiny_dir) -> pd.DataFrame:
    return quick().evaluate(tiny_dir)


# ------------------------------------------------------------------------------ the rows


def test_rows_have_the_schema_columns_and_validate(evaluated, tiny_dir):
    expected = [c for c in schema_columns(EvalResultsSchema) if c not in MODEL_COLUMNS]
    assert sorted(evaluated.columns) == sorted(expected)
    assert evaluated["level"].iloc[0] == "all" and evaluated["level"].is_unique
    assert set(evaluated["level"]) - {"all"} <= {f"level {k}" for k in range(1, 6)}
    assert set(evaluated["benchmark"]) == {"math500"}
    assert set(evaluated["evaluator"]) == {quick().fingerprint()}
    rows = with_model_columns(evaluated, "base", "tiny", None, str(tiny_dir), weights_fingerprint(tiny_dir))
    _, cases, bad = find_violations(rows, "eval_results")
    assert cases.empty, bad
    EvalResultsSchema.validate(rows)


def test_the_all_row_aggregates_the_groups(evaluated):
    overall = evaluated[evaluated["level"] == "all"].iloc[0]
    groups = evaluated[evaluated["level"] != "all"]
    assert overall["n"] == LIMIT == groups["n"].sum()
    for col in ("accuracy", "mean_tokens", "finished_share", "tagged_share", "mean_episodes"):
        assert overall[col] == pytest.approx((groups[col] * groups["n"]).sum() / groups["n"].sum()), col
    assert 0 < overall["mean_tokens"] <= 6


def sample_table() -> pd.DataFrame:
    """Two benchmarks, 2 samples per problem, known correctness: math500 levels 1 (two problems)
    and 2 (one), aime24 without levels (one problem)."""
    tagged = "<think>\n<episode_1>a = 1</episode_1>\n<episode_2>A  =  1</episode_2>\n</think>\n\n\\boxed{1}"
    plain = "no tags, \\boxed{2}"
    spec = [("math500", "p1", "level 1", [True, True], [tagged, plain]),
            ("math500", "p2", "level 1", [False, True], [plain, plain]),
            ("math500", "p3", "level 2", [False, False], [tagged, tagged]),
            ("aime24", "q1", "all", [True, False], [plain, tagged])]
    return pd.DataFrame([{"benchmark": b, "problem_id": p, "sample": k, "group": g, "response_tokens": 10 * (k + 1),
                          "finished": k == 0, "correct": c[k], "status": "ok", "answer": "1", "response": t[k]}
                         for b, p, g, c, t in spec for k in range(2)])


def test_group_rows_on_known_samples():
    repeat = "<think>\n<episode_1>a = 1</episode_1>\n<episode_2>A  =  1</episode_2>\n</think>"
    assert episode_counts(repeat) == (2, True, 1)
    table = sample_table()
    rows = group_rows(table).set_index("level")
    assert list(rows.columns) == list(GROUP_ROW_COLUMNS[1:])
    assert list(rows.index) == ["all", "aime24", "math500 level 1", "math500 level 2"]
    assert rows.loc["math500 level 1", "n"] == 2 and rows.loc["math500 level 1", "accuracy"] == pytest.approx(0.75)
    assert rows.loc["math500 level 2", "accuracy"] == 0.0 and rows.loc["aime24", "accuracy"] == 0.5
    groups = rows.drop(index="all")
    assert rows.loc["all", "n"] == groups["n"].sum() == 4
    assert rows.loc["all", "accuracy"] == pytest.approx((groups["accuracy"] * groups["n"]).sum() / 4)
    assert rows.loc["all", "accuracy"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.5) / 4)
    assert rows.loc["all", "mean_tokens"] == 15.0 and rows.loc["all", "finished_share"] == 0.5
    # 4 tagged responses of 2 episodes (the second repeats the first), 4 untagged of 1 episode
    assert rows.loc["all", "tagged_share"] == 0.5 and rows.loc["all", "mean_episodes"] == 1.5
    assert rows.loc["all", "redundant_share"] == pytest.approx(4 / 12)
    # one benchmark: its group keys as they are; one without levels has only the 'all' row
    one = group_rows(table[table["benchmark"] == "math500"])
    assert list(one["level"]) == ["all", "level 1", "level 2"]
    assert list(group_rows(table[table["benchmark"] == "aime24"])["level"]) == ["all"]
    with pytest.raises(ValueError, match="keep_text=True"):
        group_rows(table.assign(response=None))


def test_problem_rows_are_test_split_problems_and_not_stored_twice():
    ev = quick()
    rows = ev.problem_rows()
    assert len(rows) == LIMIT and set(rows["dataset"]) == {"math500"} and set(rows["split"]) == {"test"}
    ProblemsSchema.validate(rows)
    data = DataConfig(train_size=10, max_steps=2)
    # the same benchmark file listed for `datasets`: the evaluator's rows are kept once
    table = problem_rows(data, "walk_train", rows, ["math500.jsonl"], LIMIT + 2)
    test = table[table["split"] == "test"]
    assert len(test) == LIMIT + 2 and test["problem_id"].is_unique
    ProblemsSchema.validate(table)


# ------------------------------------------------------------------------------ settings


def test_fingerprint_changes_with_every_result_setting():
    ref = quick().fingerprint()
    assert ref == quick().fingerprint() and ref.startswith("math500:")
    changed = [quick(limit=LIMIT + 1), quick(benchmarks=["aime24"]), quick(benchmarks=["math500", "aime24"]),
               quick(max_new_tokens=7), quick(n=2), quick(temperature=0.6), quick(top_p=0.9), quick(seed=1),
               quick(prompts_per_call=2), quick(verify_timeout_s=2.0), quick(device="cuda")]
    prints = [e.fingerprint() for e in changed]
    assert ref not in prints and len(set(prints)) == len(prints)
    assert quick(verify_workers=2).fingerprint() == ref  # parallel verification changes no result
    assert quick().fingerprint(offline=True) == ref  # local data: the same, without the chance of a download
    assert quick(benchmarks=["math500", "aime24"]).benchmark == "math500+aime24"


def test_bad_settings_fail_with_the_setting_named(tmp_path, tiny_dir):
    cases = [
        (dict(benchmarks=["math5000"]), r"BenchmarkEvaluator\.benchmarks: unknown benchmark 'math5000'.*math500"),
        (dict(benchmarks=["humaneval"]), r"'humaneval' is a code benchmark.*l2t eval --benchmarks humaneval"),
        (dict(benchmarks=[]), r"BenchmarkEvaluator\.benchmarks is empty"),
        (dict(benchmarks=["math500", "math500"]), r"lists a benchmark twice"),
        (dict(limit=0), r"BenchmarkEvaluator\.limit must be a positive number.*L2T_EVAL_LIMIT"),
        (dict(limit=-3), r"BenchmarkEvaluator\.limit must be a positive number"),
        (dict(n=0), r"EvalSettings\.n must be >= 1"),
        (dict(max_new_tokens=0), r"EvalSettings\.max_new_tokens must be >= 1"),
        (dict(top_p=0.0), r"EvalSettings\.top_p must be in"),
        (dict(engine="tgi"), r"BenchmarkEvaluator\.engine 'tgi' is not a rollout engine"),
        (dict(vllm_gpu_memory_utilization=0.0), r"BenchmarkEvaluator\.vllm_gpu_memory_utilization must be"),
    ]
    for over, message in cases:
        ev = quick(**over)
        for call in (ev.check, ev.fingerprint, ev.problem_rows, lambda: ev.evaluate(tiny_dir)):
            with pytest.raises(ValueError, match=message):
                call()
    missing = quick(data_dir=str(tmp_path), allow_download=False)
    with pytest.raises(DatasetError, match=r"BenchmarkEvaluator cannot load benchmark 'math500'.*math500\.jsonl"
                                           r".*L2T_DATA_DIR.*data_dir"):
        missing.evaluate(tiny_dir)


def test_vllm_gets_the_gpu_and_the_transformers_copy_stays_on_the_cpu(tiny_dir, monkeypatch, evaluated):
    """engine='vllm': vLLM gets the evaluator's memory share, the transformers copy it syncs from
    is loaded on the CPU whatever ``device`` says. (vLLM cannot be installed here: the engine
    factory is recorded and an ``hf`` engine samples in its place; same rows as the hf run.)"""
    import l2t_core.models as models
    import l2t_core.rollout as rollout
    from l2t_core.rollout.hf import HFRolloutEngine

    seen, real_load = {}, models.load_policy
    monkeypatch.setattr(models, "load_policy", lambda path, device="cpu", **kw: (
        seen.setdefault("device", device), real_load(path, device=device, **kw))[1])
    monkeypatch.setattr(rollout, "make_rollout_engine", lambda engine, model, tok, **kw: (
        seen.update(engine=engine, kw=kw), HFRolloutEngine(model, tok))[1])
    rows = quick(engine="vllm", device="cuda", vllm_gpu_memory_utilization=0.7).evaluate(tiny_dir)
    assert seen == {"device": "cpu", "engine": "vllm",
                    "kw": {"model_path": str(tiny_dir), "gpu_memory_utilization": 0.7}}
    pd.testing.assert_frame_equal(rows.drop(columns="evaluator"), evaluated.drop(columns="evaluator"))
    env = BenchmarkEvaluator.from_env({"L2T_EVAL_ENGINE": "vllm", "L2T_EVAL_VLLM_GPU_MEMORY_UTILIZATION": "0.5"})
    assert env.vllm_gpu_memory_utilization == 0.5


def test_definitions_select_the_evaluator_from_the_environment(monkeypatch):
    assert isinstance(defs.resources["evaluator"], HeldOutEvaluator)  # the default
    assert isinstance(evaluator_resource({}), HeldOutEvaluator)
    assert isinstance(evaluator_resource({"L2T_EVALUATOR": "heldout"}), HeldOutEvaluator)
    ev = evaluator_resource({"L2T_EVALUATOR": "Benchmark", "L2T_EVAL_BENCHMARKS": "math500, aime24",
                             "L2T_EVAL_LIMIT": "3", "L2T_EVAL_MAX_NEW_TOKENS": "64", "L2T_EVAL_N": "4",
                             "L2T_EVAL_TEMPERATURE": "0.6", "L2T_EVAL_TOP_P": "0.95"})
    assert isinstance(ev, BenchmarkEvaluator)
    assert (ev.benchmarks, ev.limit, ev.max_new_tokens, ev.n, ev.temperature) == (["math500", "aime24"], 3, 64, 4, 0.6)
    assert evaluator_resource({"L2T_EVALUATOR": "benchmark"}).benchmarks == ["math500"]
    for env, message in (
        ({"L2T_EVALUATOR": "mmlu"}, r"L2T_EVALUATOR='mmlu' is not an evaluator; use 'heldout'.*'benchmark'"),
        ({"L2T_EVAL_LIMIT": "3"}, r"L2T_EVAL_LIMIT set, but L2T_EVALUATOR is 'heldout'"),
        ({"L2T_EVALUATOR": "benchmark", "L2T_EVAL_LIMIT": "a few"}, r"L2T_EVAL_LIMIT='a few' is not a whole number"),
        ({"L2T_EVALUATOR": "benchmark", "L2T_EVAL_LIMIT": "0"}, r"limit must be a positive.*L2T_EVAL_LIMIT='0'"),
        ({"L2T_EVALUATOR": "benchmark", "L2T_EVAL_BENCHMARKS": "gsm8k"},
         r"unknown benchmark 'gsm8k'.*gsm8k_test.*L2T_EVAL_BENCHMARKS='gsm8k'"),
        ({"L2T_EVALUATOR": "benchmark", "L2T_EVAL_TEMPERATURE": "warm"},
         r"L2T_EVAL_TEMPERATURE='warm' is not a number"),
        ({"L2T_EVALUATOR": "benchmark", "L2T_EVAL_DEVICE": "gpu"},
         r"BenchmarkEvaluator.device 'gpu' \(L2T_EVAL_DEVICE\) is not a device"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluator_resource(env)
    monkeypatch.setenv("L2T_EVALUATOR", "benchmark")
    monkeypatch.setenv("L2T_EVAL_LIMIT", "2")
    monkeypatch.setenv("L2T_DUCKDB_PATH", ":memory:")
    resources = default_resources()
    assert isinstance(resources["evaluator"], BenchmarkEvaluator) and resources["evaluator"].limit == 2


# ------------------------------------------------------------------------------ in Dagster


def test_benchmark_reports_materializes_with_the_benchmark_evaluator(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """A registry model and a recorded checkpoint (another tiny model with the same tokenizer):
    base_model stores the base rows, benchmark_reports reuses them (same fingerprint), evaluates
    the checkpoint, writes eval_results, its plot and the HTML report; the checks run. A run that
    trained from other base weights than those stored and present is refused."""
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    build_tiny_qwen2(len(tokenizer), hidden_size=64, num_layers=8, intermediate_size=160, seed=1).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"tiny": {"kind": "pretrained", "path": str(tiny_dir)}}}))
    db = str(tmp_path / "l2t.duckdb")
    evaluator = quick(limit=3)
    resources = {"duckdb": DuckDBResource(database=db), "registry": ModelRegistry(path=str(registry)),
                 "storage": L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models")),
                 "training_data": TrainingData(train_size=10, max_steps=2), "evaluator": evaluator,
                 "launcher": TrainingLauncher()}  # required by the code location, never called here
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster_home"))
    instance.add_dynamic_partitions("base_models", ["tiny"])
    pk = run_key("tiny", "grpo")

    def record_run(base_weights):
        with duckdb.connect(db) as con:
            warehouse.replace_rows(con, "checkpoints", pd.DataFrame([{
                "base_model": "tiny", "method": "grpo", "run_url": str(tmp_path / "run"), "checkpoint_url": str(ckpt),
                "final_step": 1, "config_hash": "test", "config_json": json.dumps({}),
                "base_weights": base_weights}]), "checkpoints", pk)

    record_run(weights_fingerprint(tiny_dir))

    def run(asset, partition_key):
        return dg.materialize([*ASSETS, *all_checks], selection=[asset], partition_key=partition_key,
                              resources=resources, instance=instance)

    assert run(base_model, "tiny").success
    result = run(benchmark_reports, pk)
    assert result.success
    with duckdb.connect(db) as con:
        stored = warehouse.read_rows(con, "eval_results", "benchmark_reports", pk)
        base_rows = warehouse.read_rows(con, "eval_results", "base_model", "tiny")
        vs = con.execute("SELECT benchmark, accuracy, base_accuracy FROM v_checkpoint_vs_base").fetchall()
    groups = len(base_rows)
    assert groups >= 2 and len(stored) == 2 * groups
    assert set(stored["evaluator"]) == {evaluator.fingerprint()} and set(stored["benchmark"]) == {"math500"}
    cols = ["level", "n", "accuracy", "mean_tokens"]
    reused = stored[stored["model_kind"] == "base"][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(reused, base_rows[cols].reset_index(drop=True))
    assert [v[0] for v in vs] == ["math500"]
    meta = result.asset_materializations_for_node("benchmark_reports")[0].metadata
    assert meta["benchmark"].value == "math500" and meta["plots"].value.count("data:image/png;base64,") == 1
    page = (tmp_path / "run" / "benchmark_report.html").read_text()
    assert page.startswith("<!doctype html>") and "math500" in page
    checks = {e.check_name for e in result.get_asset_check_evaluations()}
    assert checks == {"stored_rows_valid", "checkpoint_quality_gate"}
    assert all(e.passed for e in result.get_asset_check_evaluations() if e.check_name == "stored_rows_valid")
    assert set(stored["model_weights"]) == {weights_fingerprint(tiny_dir), weights_fingerprint(ckpt)}

    # a run that trained from other weights of the base (it was rebuilt since): no stored evaluation
    # of those, and the base is not they; the report refuses, evaluating nothing, and keeps its rows
    record_run("0" * 64)
    evaluated = []
    original = type(evaluator).evaluate
    monkeypatch.setattr(type(evaluator), "evaluate", lambda self, d, j=None: evaluated.append(d) or original(self, d, j))
    failed = dg.materialize([*ASSETS, *all_checks], selection=[benchmark_reports], partition_key=pk,
                            resources=resources, instance=instance, raise_on_error=False)
    assert not failed.success and evaluated == []
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert re.search(r"trained from other weights of base model 'tiny' .*fingerprint 000000000000, now "
                     r"[0-9a-f]{12}: the base was rebuilt or pinned to another commit since\).*"
                     r"Materialize checkpoints\[tiny\|grpo\]",
                     failure.event_specific_data.error.message)
    with duckdb.connect(db) as con:
        assert len(warehouse.read_rows(con, "eval_results", "benchmark_reports", pk)) == len(stored)


def test_an_evaluation_cut_short_resumes_its_samples_when_the_step_runs_again(tiny_dir, tmp_path, monkeypatch):
    """base_model's evaluation crashes in its second engine call: its first call's samples are in
    the journal (models_dir/.eval_samples), and the step run again samples only the second; the
    rows equal an uninterrupted evaluation's and the journal is gone once they are kept. Where
    another step holds the journal (evaluating the same weights now), the step evaluates without
    one; a journal left beside rows kept is removed when they are reused."""
    from l2t_core.eval.journal import held
    from l2t_core.rollout.hf import HFRolloutEngine
    from l2t_pipeline.assets import evaluation_key

    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": {"tiny": {"kind": "pretrained", "path": str(tiny_dir)}}}))
    storage = L2TStorage(url=str(tmp_path / "storage"), models_dir=str(tmp_path / "models"))
    evaluator = quick(prompts_per_call=2)  # 4 problems: two engine calls
    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "l2t.duckdb")),
                 "registry": ModelRegistry(path=str(registry)), "storage": storage,
                 "training_data": TrainingData(train_size=10, max_steps=2), "evaluator": evaluator,
                 "launcher": TrainingLauncher()}
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster_home"))
    instance.add_dynamic_partitions("base_models", ["tiny"])
    real, calls, fail_at = HFRolloutEngine.generate, [], [2]

    def generate(self, prompts, params, **kw):
        calls.append(len(prompts))
        if len(calls) in fail_at:
            raise RuntimeError("the node was preempted")
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)

    def materialize():
        return dg.materialize([*ASSETS, *all_checks], selection=[base_model], partition_key="tiny",
                              resources=resources, instance=instance, raise_on_error=False)

    journal = storage.sample_journal(evaluation_key(evaluator.fingerprint(), weights_fingerprint(tiny_dir)))
    assert not materialize().success and calls == [2, 2]
    assert journal.is_file() and len(journal.read_text().splitlines()) == 2  # its header and the first call
    calls.clear()
    fail_at.clear()
    assert materialize().success and calls == [2]  # the first call's samples resumed
    assert not journal.exists() and not journal.with_suffix(".lock").exists()
    with duckdb.connect(str(tmp_path / "l2t.duckdb")) as con:
        stored = warehouse.read_rows(con, "eval_results", "base_model", "tiny")
    whole = quick(prompts_per_call=2).evaluate(tiny_dir)
    cols = ["level", "n", "accuracy", "mean_tokens", "mean_episodes"]
    pd.testing.assert_frame_equal(stored[cols].reset_index(drop=True), whole[cols].reset_index(drop=True))

    # another step evaluating the same weights holds the journal: this one evaluates without it
    calls.clear()
    with duckdb.connect(str(tmp_path / "l2t.duckdb")) as con:
        con.execute("DELETE FROM eval_results")  # nothing stored to reuse
    with held(journal.with_suffix(".lock"), "benchmark_reports[tiny|grpo] of Dagster run x"):
        result = materialize()
        assert result.success and calls == [2, 2] and not journal.exists()
    warned = [e.message for e in instance.all_logs(result.run_id) if "without keeping the samples" in e.message]
    assert warned and "benchmark_reports[tiny|grpo] of Dagster run x" in warned[0]

    # an attempt that kept its rows but stopped before removing its journal: the next one reuses the
    # rows, samples nothing, and removes the journal
    from l2t_core.eval.journal import SampleJournal

    calls.clear()
    with duckdb.connect(str(tmp_path / "l2t.duckdb")) as con:
        con.execute("DELETE FROM eval_results")

    def lost(self):
        raise OSError("the node was lost")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SampleJournal, "remove", lost)
        assert not materialize().success and journal.is_file() and calls == [2, 2]
    assert materialize().success and calls == [2, 2] and not journal.exists()

    # an evaluation that completes removes the journals of others untouched for a week
    import os
    import time

    stale = journal.with_name("0123456789abcdef.jsonl")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"key": {}}\n')
    os.utime(stale, (time.time() - 8 * 86400,) * 2)
    calls.clear()
    with duckdb.connect(str(tmp_path / "l2t.duckdb")) as con:
        con.execute("DELETE FROM eval_results")
    assert materialize().success and calls == [2, 2] and not stale.exists()


def test_sample_journals_untouched_for_a_week_are_removed_unless_held(tmp_path):
    """The journal of an evaluation whose step never ran again stays a week (to resume from), then
    the next evaluation that completes removes it; one a step holds now, or a fresh one, stays."""
    import os
    import time

    from l2t_core.eval.journal import held
    from l2t_pipeline.assets import STALE_JOURNAL_S, drop_stale_journals

    d = tmp_path / ".eval_samples"
    d.mkdir()
    now = time.time()
    for name, age in (("old", STALE_JOURNAL_S + 60), ("held", STALE_JOURNAL_S + 60), ("fresh", 3600)):
        (d / f"{name}.jsonl").write_text('{"key": {}}\n')
        os.utime(d / f"{name}.jsonl", (now - age, now - age))
    with held(d / "held.lock", "benchmark_reports[x] of Dagster run y"):
        assert drop_stale_journals(d, now=now) == [d / "old.jsonl"]
    assert sorted(p.name for p in d.glob("*.jsonl")) == ["fresh.jsonl", "held.jsonl"]
    assert drop_stale_journals(tmp_path / "none", now=now) == []
