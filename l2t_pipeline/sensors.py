"""Automation: the model-registry sensor and the weekly re-evaluation schedule.

* :data:`model_registry_sensor` reads the registry YAML (``ModelRegistry``); for every model not
  yet a ``base_models`` partition it adds the partition and requests exactly one baseline run
  (``base_model`` for that partition: warm start or load, then the baseline evaluation). The run
  key ``baseline:<name>`` makes a repeated tick idempotent.
* :data:`reevaluation_schedule` re-runs ``benchmark_reports`` for every (base model, method)
  whose ``checkpoints`` partition has been materialized.
"""


import dagster as dg

from .assets import base_model
from .jobs import baseline_job, evaluation_job
from .partitions import base_models_partitions
from .resources import ModelRegistry


def new_models(registered: list[str], known: list[str]) -> list[str]:
    """Registered model names that are not partitions yet, in registry order."""
    have = set(known)
    return [n for n in registered if n not in have]


@dg.sensor(job=baseline_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Adds a base_models partition and requests its baseline for each new registry model.")
def model_registry_sensor(context: dg.SensorEvaluationContext, registry: ModelRegistry) -> dg.SensorResult:
    entries = registry.entries()
    new = new_models(list(entries), list(context.instance.get_dynamic_partitions(base_models_partitions.name)))
    if not new:
        return dg.SensorResult(skip_reason=f"no new models in {registry.path}")
    context.log.info("new base models in the registry: %s", ", ".join(new))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"baseline:{n}", partition_key=n, asset_selection=[base_model.key],
                                    tags={"l2t/base_model": n, "l2t/reason": "new-registry-model"})
                      for n in new],
        dynamic_partitions_requests=[base_models_partitions.build_add_request(new)],
    )


@dg.schedule(job=evaluation_job, cron_schedule="0 3 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Weekly re-evaluation of every trained checkpoint.")
def reevaluation_schedule(context: dg.ScheduleEvaluationContext):
    trained = sorted(context.instance.get_materialized_partitions(dg.AssetKey("checkpoints")))
    if not trained:
        return dg.SkipReason("no checkpoints materialized yet")
    stamp = context.scheduled_execution_time.strftime("%Y%m%d")  # a tick's date: one re-evaluation per tick
    return [dg.RunRequest(run_key=f"reeval:{stamp}:{pk}", partition_key=pk) for pk in trained]
