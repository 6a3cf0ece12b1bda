"""`make demo`: the whole L2T asset lineage materialized on the embedded default, on a CPU.

In one persistent Dagster instance (``$DAGSTER_HOME``, default ``dagster_home/``) and the DuckDB
warehouse of the default resources (``dagster_home/l2t.duckdb``), in lineage order:

1. ``datasets``: the synthetic task's training prompts and held-out problems;
2. ``base_model[tiny-sft]``: the SFT warm start of the tiny Qwen2 with its held-out evaluation,
   then ``segmented_rollouts`` and the pandera-validated ``episode_rewards`` of the base policy;
3. per method (default ``grpo`` and ``l2t``): ``checkpoints[tiny-sft|method]``, an RL run launched
   through Dagster Pipes (``python -m l2t_core.cli train``), and ``benchmark_reports`` comparing it
   with the base model; the asset checks run with each step.

It ends with the ``v_checkpoint_vs_base`` view. The runs are then in the Dagster UI
(``DAGSTER_HOME=$PWD/dagster_home .venv/bin/dagster dev``) and the tables in DuckDB. A re-run
reuses what is done: the warm start and finished training runs are not repeated.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("l2t.pipeline.demo")

# the embedded default at demo size: about 10 minutes on 2 CPU cores, most of it the warm start
DEMO_RUN_CONFIG: dict[str, Any] = {"ops": {
    "base_model": {"config": {"sft_steps": 600, "train_size": 20000, "eval_per_level": 5}},
    "segmented_rollouts": {"config": {"prompts": 8, "group_size": 4, "temperature": 0.7, "max_new_tokens": 240}},
    "episode_rewards": {"config": {"method": "l2t"}},
    "checkpoints": {"config": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "temperature": 0.7,
                               "max_new_tokens": 240}},
}}


def materialize_lineage(instance, resources: dict, run_config: dict, methods: Sequence[str] = ("grpo", "l2t"),
                        base: str | None = None) -> dict:
    """Materialize datasets, the base model's chain, then a training run and report per method.

    Returns the ``ExecuteInProcessResult`` of each step: ``datasets``, ``base`` and one per method.
    Raises on the first failing step (its partial outputs stay recorded in the instance).
    """
    import dagster as dg

    from .assets import base_model, benchmark_reports, checkpoints, datasets, episode_rewards, segmented_rollouts
    from .checks import all_checks
    from .definitions import ASSETS
    from .partitions import DEFAULT_BASE_MODEL, run_key

    base = base or DEFAULT_BASE_MODEL
    if not instance.has_dynamic_partition("base_models", base):
        instance.add_dynamic_partitions("base_models", [base])

    def run(selection, partition_key=None):
        names = {a.key.to_user_string() for a in selection}
        ops = {k: v for k, v in run_config.get("ops", {}).items() if k in names}
        log.info("materializing %s%s", ", ".join(sorted(names)), f" [{partition_key}]" if partition_key else "")
        extra = {k: v for k, v in run_config.items() if k != "ops"}  # e.g. loggers
        return dg.materialize([*ASSETS, *all_checks], selection=selection, partition_key=partition_key,
                              resources=resources, instance=instance, run_config={"ops": ops, **extra})

    results = {"datasets": run([datasets]), "base": run([base_model, segmented_rollouts, episode_rewards], base)}
    for m in methods:
        results[m] = run([checkpoints, benchmark_reports], run_key(base, m))
    return results


def report_paths(results: dict) -> dict[str, str]:
    """Where each method's benchmark report (HTML) was written, from the materialization metadata."""
    out = {}
    for name, res in results.items():
        for mat in res.asset_materializations_for_node("benchmark_reports"):
            out[name] = mat.metadata["report"].value
    return out


def summary(db: str) -> list[dict]:
    """The rows of ``v_checkpoint_vs_base``: each trained checkpoint next to its base model."""
    import duckdb

    with duckdb.connect(db, read_only=True) as con:
        cur = con.execute("SELECT * FROM v_checkpoint_vs_base ORDER BY base_model, method")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["grpo", "l2t"], help="training methods to run")
    ap.add_argument("--sft-steps", type=int, default=DEMO_RUN_CONFIG["ops"]["base_model"]["config"]["sft_steps"])
    ap.add_argument("--train-steps", type=int, default=DEMO_RUN_CONFIG["ops"]["checkpoints"]["config"]["steps"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from .resources import DAGSTER_HOME

    os.environ.setdefault("DAGSTER_HOME", str(DAGSTER_HOME))
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)

    import warnings

    import dagster as dg
    from rich.console import Console

    warnings.filterwarnings("ignore", category=dg.PreviewWarning)  # dagster-pipes internals, not ours
    from rich.table import Table

    from .definitions import default_resources
    from .resources import default_duckdb_path

    run_config = {"ops": {k: {"config": dict(v["config"])} for k, v in DEMO_RUN_CONFIG["ops"].items()},
                  "loggers": {"console": {"config": {"log_level": "INFO"}}}}  # Dagster's step events, no DEBUG
    run_config["ops"]["base_model"]["config"]["sft_steps"] = args.sft_steps
    run_config["ops"]["checkpoints"]["config"]["steps"] = args.train_steps
    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        results = materialize_lineage(instance, default_resources(), run_config, args.methods)
    rows = summary(default_duckdb_path())
    console = Console()
    table = Table(title="v_checkpoint_vs_base (held-out, greedy)")
    cols = {"base_model": "base", "method": "method", "accuracy": "acc", "base_accuracy": "base acc",
            "mean_tokens": "tokens", "base_mean_tokens": "base tokens", "token_reduction": "token reduction"}
    for header in cols.values():
        table.add_column(header)
    for r in rows:
        table.add_row(*[f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols])
    console.print(table)
    lines = [f"report {method}: {path}" for method, path in report_paths(results).items()]
    lines += [f"lineage materialized in {time.perf_counter() - t0:.0f} s; Dagster instance {home}; "
              f"DuckDB {default_duckdb_path()}",
              f"UI:  DAGSTER_HOME={home} .venv/bin/dagster dev   (then Assets, the L2T lineage)",
              f"SQL: .venv/bin/python -c \"import duckdb; print(duckdb.connect('{default_duckdb_path()}', "
              "read_only=True).sql('SELECT * FROM v_run_summary'))\""]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    return rows


if __name__ == "__main__":
    main()
