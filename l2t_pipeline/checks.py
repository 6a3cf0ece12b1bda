"""Asset checks: the stored rows of every asset re-validated against their pandera schema (with
no duplicated keys), and the checkpoint quality gate on ``benchmark_reports``.

The schema checks of ``segmented_rollouts``, ``episode_rewards`` and ``checkpoints`` are blocking:
when one fails, the assets downstream of the checked one are not materialized in the same run.
The quality gate is a report (non-blocking, nothing is downstream of ``benchmark_reports``)."""


import warnings
from typing import Sequence

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from .assets import UNPARTITIONED, benchmark_reports, checkpoints, comparison, datasets, episode_rewards, segmented_rollouts
from .config import QualityGateConfig
from .partitions import base_models_partitions, runs_partitions
from .schemas import failure_summary, find_violations, markdown_table
from .warehouse import SCHEMAS, connect, read_rows

_DROP = ["asset_key", "partition_key", "loaded_at"]


def asset_check(**kwargs):
    """``dg.asset_check(**kwargs)``; partitioned asset checks are a Dagster preview feature, which
    these checks use knowingly: its PreviewWarning is silenced here only, while the check is built."""
    def decorate(fn):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*",
                                    category=dg.PreviewWarning)
            return dg.asset_check(**kwargs)(fn)

    return decorate


def validate_stored(conn, table: str, asset_key: str, partition_key: str) -> dg.AssetCheckResult:
    """The check result of one table's stored rows for one asset partition: rows present, valid
    against the schema, no natural key repeated."""
    rows = read_rows(conn, table, asset_key, partition_key)
    data = rows.drop(columns=[c for c in _DROP if c in rows.columns])
    meta: dict = {"table": table, "rows": len(rows)}
    if rows.empty:
        return dg.AssetCheckResult(passed=False, metadata=meta, description=f"no rows of {table!r} for {partition_key}")
    _, cases, bad = find_violations(data, table)
    keys = SCHEMAS[table].Config.unique
    dup = int(data.duplicated(subset=keys).sum())
    meta["duplicate_keys"] = dup
    if not cases.empty:
        meta["failing_rows"] = dg.MetadataValue.md(markdown_table(bad.head(20)))
        meta["failures"] = dg.MetadataValue.md(failure_summary(cases))
    return dg.AssetCheckResult(passed=cases.empty and dup == 0, metadata=meta)


def schema_check(asset: dg.AssetsDefinition, tables: Sequence[str], partitions_def=None,
                 blocking: bool = False) -> dg.AssetChecksDefinition:
    """An asset check validating the rows ``asset`` stored in ``tables`` for the checked partition;
    ``blocking``: a failure stops the assets downstream of ``asset`` in the same run."""
    asset_key = asset.key

    @asset_check(asset=asset, name="stored_rows_valid", partitions_def=partitions_def, blocking=blocking,
                 description=f"Stored rows of {', '.join(tables)} match their pandera schemas, without "
                             "duplicated keys.")
    def _check(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
        pk = str(context.partition_key) if partitions_def is not None else UNPARTITIONED
        with connect(duckdb) as conn:
            results = {t: validate_stored(conn, t, asset_key.to_user_string(), pk) for t in tables}
        meta = {f"{t}.{k}": v for t, r in results.items() for k, v in r.metadata.items()}
        return dg.AssetCheckResult(passed=all(r.passed for r in results.values()), metadata=meta,
                                   description="; ".join(r.description for r in results.values() if r.description))

    return _check


def quality_gate(evals: pd.DataFrame, max_accuracy_drop: float) -> dg.AssetCheckResult:
    """Pass when the checkpoint's overall accuracy is at least its base's minus
    ``max_accuracy_drop``; accuracies, delta and token reduction as metadata."""
    cmp = comparison(evals)
    passed = cmp["accuracy"] >= cmp["base_accuracy"] - max_accuracy_drop - 1e-12
    desc = (f"accuracy {cmp['accuracy']:.3f} vs base {cmp['base_accuracy']:.3f} (allowed drop {max_accuracy_drop}); "
            f"token reduction {cmp['token_reduction']:+.1%}")
    return dg.AssetCheckResult(passed=bool(passed), severity=dg.AssetCheckSeverity.ERROR, description=desc,
                               metadata={**cmp, "max_accuracy_drop": max_accuracy_drop})


@asset_check(asset=benchmark_reports, partitions_def=runs_partitions, blocking=False,
             description="Quality gate, a report (non-blocking): the checkpoint's held-out accuracy may not "
                         "fall below its base model's by more than max_accuracy_drop; the token reduction is "
                         "reported.")
def checkpoint_quality_gate(context: dg.AssetCheckExecutionContext, config: QualityGateConfig,
                            duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """A report, not a gate that stops anything: non-blocking, and no asset is downstream of
    ``benchmark_reports``. A failed evaluation (severity ERROR) marks the checkpoint in the UI and
    the check history; promoting or discarding the checkpoint is a decision made on it."""
    with connect(duckdb) as conn:
        evals = read_rows(conn, "eval_results", "benchmark_reports", str(context.partition_key))
    if evals.empty:
        return dg.AssetCheckResult(passed=False, description=f"no eval_results for {context.partition_key}")
    return quality_gate(evals, config.max_accuracy_drop)


schema_checks = [
    schema_check(datasets, ["problems"]),
    # blocking: the rows downstream steps read must be valid before they run
    schema_check(segmented_rollouts, ["rollouts"], base_models_partitions, blocking=True),
    schema_check(episode_rewards, ["episode_rewards"], base_models_partitions, blocking=True),
    schema_check(checkpoints, ["train_steps", "rollouts", "episode_rewards"], runs_partitions, blocking=True),
    schema_check(benchmark_reports, ["eval_results"], runs_partitions),
]
all_checks = [*schema_checks, checkpoint_quality_gate]
