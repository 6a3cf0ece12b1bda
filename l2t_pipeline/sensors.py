"""Automation: the model-registry sensor and the weekly re-evaluation schedule.

* :data:`model_registry_sensor` reads the registry YAML (``ModelRegistry``); it adds a
  ``base_models`` partition for every model that is not one yet, and requests a baseline run
  (``base_model`` for that partition: warm start or load, then the baseline evaluation) for every
  registered model whose ``base_model`` partition has never been materialized: new models, models
  whose baseline run failed or was never submitted, partitions added by hand. A model with a
  baseline run queued or in progress waits (one created but never submitted is requested again
  under its run key, which makes the daemon launch it); a failed run is retried after
  :data:`RETRY_AFTER_S` (5, then 30 minutes, so that a passing fault can pass), and after
  :data:`MAX_BASELINE_ATTEMPTS` failed runs the sensor stops requesting it (materialize it by hand
  once fixed). Run keys
  (``baseline:<name>``, then ``baseline:<name>:attempt-<n>``) make a repeated tick idempotent.
  For a hub model the entry ``follow``s, it also requests ``base_model`` again when the entry's
  branch or tag has moved upstream to another commit than the one the latest baseline pinned
  (:func:`upstream_requests`, the hub asked at most every :data:`UPSTREAM_CHECK_S`; run key
  ``upstream:<name>:<commit>:after-<id>``, one run per new commit and baseline). A move found
  while that model's ``base_model`` runs is requested on the first tick after the run ends,
  unless that run pinned the new commit (the cursor keeps it meanwhile).
* :data:`reevaluation_schedule` re-runs ``benchmark_reports`` for every (base model, method)
  whose ``checkpoints`` partition has been materialized and still exists, of a base model still
  in the registry (a deleted partition or a model taken out of the registry is skipped), and
  whose report is out of date (:func:`stale_reports`): never made, made before the checkpoint's
  latest materialization, or with another evaluator. A registry it cannot read fails the tick.

Both read the instance through Dagster's public APIs (``get_status_by_partition``,
``fetch_materializations``, ``get_runs``).
"""


import json
import re
import time
from typing import Iterable, Mapping, Sequence

import dagster as dg

from l2t_core.eval.datasets import DatasetError
from l2t_core.hub import hub_commit
from l2t_core.models import ModelLoadError

from .assets import base_model, benchmark_reports, checkpoints
from .jobs import baseline_job, evaluation_job
from .partitions import base_models_partitions, runs_partitions
from .resources import Evaluator, ModelEntry, ModelRegistry, offline_fingerprint

MAX_BASELINE_ATTEMPTS = 3
# after the n-th failed baseline run, the next one waits RETRY_AFTER_S[n - 1] seconds from its end
RETRY_AFTER_S = (300.0, 1800.0)
BASE_MODEL_TAG = "l2t/base_model"
REASON_TAG = "l2t/reason"
RUN_KEY_TAG = "dagster/run_key"  # the tag Dagster gives a run created for a run request's run_key
BASELINE_REASON = "registry-baseline"
UPSTREAM_REASON = "hub-commit-moved"
# seconds between two looks at the hub for the commits of followed models (one request per model)
UPSTREAM_CHECK_S = 3600.0


def new_models(registered: list[str], known: list[str]) -> list[str]:
    """Registered model names that are not partitions yet, in registry order."""
    have = set(known)
    return [n for n in registered if n not in have]


def partition_statuses(instance: dg.DagsterInstance, asset_key: dg.AssetKey, keys: Sequence[str],
                       partitions_def: dg.PartitionsDefinition) -> dict[str, dg.AssetPartitionStatus | None]:
    """The status (materialized, failed, in progress or None) of each of ``keys`` of an asset."""
    return dict(instance.get_status_by_partition(asset_key, list(keys), partitions_def) or {})


def ever_materialized(instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                      statuses: dict[str, dg.AssetPartitionStatus | None]) -> list[str]:
    """The keys of ``statuses`` the asset has been materialized for at least once: the partitions
    whose status is materialized, and those whose latest run failed after an earlier materialization."""
    out = []
    for key, status in statuses.items():
        if status == dg.AssetPartitionStatus.MATERIALIZED:
            out.append(key)
        elif status == dg.AssetPartitionStatus.FAILED:
            earlier = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key,
                                                                            asset_partitions=[key]), limit=1)
            if earlier.records:
                out.append(key)
    return out


def baseline_runs(instance: dg.DagsterInstance, name: str) -> Sequence[dg.RunRecord]:
    """The records of the baseline runs this sensor requested for base model ``name`` (tagged
    ``l2t/base_model``, as every version of the sensor tagged them; newest first)."""
    return instance.get_run_records(filters=dg.RunsFilter(tags={BASE_MODEL_TAG: name}))


def baseline_run_key(name: str, attempt: int) -> str:
    return f"baseline:{name}" if attempt == 1 else f"baseline:{name}:attempt-{attempt}"


def baseline_attempt(name: str, run_key: str | None) -> int:
    """The attempt number :func:`baseline_run_key` put into ``run_key`` (0: not a baseline key of ``name``)."""
    if run_key == f"baseline:{name}":
        return 1
    match = re.fullmatch(rf"baseline:{re.escape(name)}:attempt-(\d+)", run_key or "")
    return int(match.group(1)) if match else 0


def baseline_request(name: str, attempt: int) -> dg.RunRequest:
    return dg.RunRequest(run_key=baseline_run_key(name, attempt), partition_key=name, asset_selection=[base_model.key],
                         tags={BASE_MODEL_TAG: name, REASON_TAG: BASELINE_REASON})


def baseline_requests(instance: dg.DagsterInstance, registered: Iterable[str],
                      log=None) -> list[dg.RunRequest]:
    """A baseline run request for every registered model whose ``base_model`` partition has never
    been materialized and has no run queued or in progress, up to :data:`MAX_BASELINE_ATTEMPTS`
    runs. A run this sensor requested that was created but never submitted (``NOT_STARTED``: the
    daemon stopped in between) is requested again under its run key, which makes the daemon
    launch that run (not a new one); waiting for it would wait forever."""
    names = list(registered)
    statuses = partition_statuses(instance, base_model.key, names, base_models_partitions)
    done = set(ever_materialized(instance, base_model.key, statuses))
    requests = []
    for name in names:
        if name in done or statuses.get(name) == dg.AssetPartitionStatus.IN_PROGRESS:
            continue
        records = baseline_runs(instance, name)
        runs = [r.dagster_run for r in records]
        if any(not r.is_finished and r.status != dg.DagsterRunStatus.NOT_STARTED for r in runs):
            continue  # queued or running
        keys = [r.tags.get(RUN_KEY_TAG) for r in runs]
        # a created run the daemon can launch: its key is this sensor's and no other run has it (the
        # daemon takes a key's oldest run, and skips a request whose run went past NOT_STARTED)
        created = [baseline_attempt(name, k) for r, k in zip(runs, keys)
                   if r.status == dg.DagsterRunStatus.NOT_STARTED and keys.count(k) == 1]
        if any(created):
            requests.append(baseline_request(name, max(created)))
            continue
        tried = sum(r.is_finished for r in runs)
        if tried >= MAX_BASELINE_ATTEMPTS:
            if log is not None:
                log.warning("base model %s: %d baseline runs failed; not requesting another (materialize "
                            "base_model[%s] by hand once fixed)", name, tried, name)
            continue
        # when the last attempt ended (its last update where the run storage has no end time)
        ended = max((r.end_time or r.update_timestamp.timestamp() for r in records if r.dagster_run.is_finished),
                    default=0.0)
        wait = RETRY_AFTER_S[min(tried, len(RETRY_AFTER_S)) - 1] if tried else 0.0
        if time.time() < ended + wait:
            if log is not None:
                log.info("base model %s: baseline run %d failed; the next one in %.0f s (a passing fault, such as "
                         "the hub or a busy warehouse, may be gone by then)", name, tried, ended + wait - time.time())
            continue
        # past every key used (a run re-executed by hand carries the tag but no key of its own)
        requests.append(baseline_request(name, max([tried, *(baseline_attempt(name, k) for k in keys)]) + 1))
    return requests


def pinned_commit(instance: dg.DagsterInstance, name: str) -> tuple[int | None, str | None]:
    """(the storage id of ``base_model[name]``'s latest materialization, None where it has none;
    the hub commit it pinned: ``hub_commit``, or ``finetuned_from_commit`` of an SFT, None before
    base_model recorded one)."""
    record = latest_materialization(instance, base_model.key, name)
    if record is None:
        return None, None
    meta = record.asset_materialization.metadata
    value = meta.get("hub_commit") or meta.get("finetuned_from_commit")
    return record.storage_id, getattr(value, "value", None)


def upstream_requests(instance: dg.DagsterInstance, entries: Mapping[str, ModelEntry], log=None,
                      waiting: Mapping[str, str] | None = None,
                      ask_hub: bool = True) -> tuple[list[dg.RunRequest], dict[str, str]]:
    """A ``base_model`` run for every hub model that its registry entry ``follow``s whose branch or
    tag is now another commit (:func:`~l2t_core.hub.hub_commit`) than the one its latest
    ``base_model`` materialization pinned; and the models whose ``base_model`` was in progress
    then, with the commit found (not requested now: that run may pin it). ``waiting``: such models
    of an earlier tick with the commit found then; without ``ask_hub`` only they are checked, with
    that commit, and with it a model whose hub cannot be reached keeps it. Run key
    ``upstream:<name>:<commit>:after-<that materialization's storage id>``: one run per new commit
    and baseline, also when it fails (materialize it by hand once fixed). A model whose hub cannot
    be reached is otherwise skipped with a warning."""
    waiting = dict(waiting or {})
    requests, in_progress = [], {}
    for name, entry in entries.items():
        hub = entry.hub_id()
        if not entry.follow or hub is None or (not ask_hub and name not in waiting):
            continue
        baseline, pinned = pinned_commit(instance, name)
        if baseline is None:
            continue  # no baseline yet: baseline_requests asks for one
        if not ask_hub:
            now = waiting[name]
        else:
            try:
                now = hub_commit(hub, entry.revision)
            except ModelLoadError as exc:
                if log is not None:
                    log.warning("base model %s: cannot look up the commit of %s at %s now: %s", name, hub,
                                entry.revision or "main", exc)
                if name not in waiting:
                    continue
                now = waiting[name]  # the move found before still waits for its run
        if now == pinned:
            continue
        statuses = partition_statuses(instance, base_model.key, [name], base_models_partitions)
        if statuses.get(name) == dg.AssetPartitionStatus.IN_PROGRESS:
            in_progress[name] = now  # checked again every tick until that run ends
            continue
        if log is not None:
            log.info("base model %s: %s at %s is now commit %s (pinned: %s); requesting base_model[%s]", name, hub,
                     entry.revision or "main", now, pinned or "none", name)
        # one run per new commit after each baseline (a branch moved back to a commit seen before is asked again)
        requests.append(dg.RunRequest(run_key=f"upstream:{name}:{now}:after-{baseline}", partition_key=name,
                                      asset_selection=[base_model.key],
                                      tags={BASE_MODEL_TAG: name, REASON_TAG: UPSTREAM_REASON}))
    return requests, in_progress


def upstream_state(cursor: str | None) -> tuple[float, dict[str, str]]:
    """The sensor's cursor: when the hub was last asked, and the followed models whose new commit
    waits for their ``base_model`` run in progress (:func:`upstream_requests`)."""
    try:
        state = json.loads(cursor or "{}")
        last = float(state.get("upstream_checked", 0.0))
        waiting = {str(k): str(v) for k, v in dict(state.get("waiting", {})).items()}
    except (ValueError, AttributeError, TypeError):  # a cursor of another version: ask now
        return 0.0, {}
    return last, waiting


@dg.sensor(job=baseline_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Adds a base_models partition for each new registry model and requests a baseline run "
                       "for every registered model without a materialized base_model (retrying failed runs), "
                       "and again for a followed hub model whose branch moved to a new commit.")
def model_registry_sensor(context: dg.SensorEvaluationContext, registry: ModelRegistry) -> dg.SensorResult:
    entries = registry.entries()
    registered = list(entries)
    new = new_models(registered, list(context.instance.get_dynamic_partitions(base_models_partitions.name)))
    requests = baseline_requests(context.instance, registered, context.log)
    cursor = context.cursor
    now = time.time()
    checked, waiting = upstream_state(cursor)
    # the hub asked hourly; a new commit found while its base_model ran is checked every tick until that run ends
    due = any(e.follow for e in entries.values()) and now - checked >= UPSTREAM_CHECK_S
    if due or waiting:
        found, waiting = upstream_requests(context.instance, entries, context.log, waiting=waiting, ask_hub=due)
        requests += found
        cursor = json.dumps({"upstream_checked": now if due else checked, "waiting": waiting})
    if not new and not requests:
        return dg.SensorResult(skip_reason=f"no model in {registry.path} needs a baseline run now: each has a "
                                           "baseline, one in progress, a retry to wait for, or none left, and no "
                                           "followed hub model has moved (the tick's log says which)", cursor=cursor)
    if new:
        context.log.info("new base models in the registry: %s", ", ".join(new))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[base_models_partitions.build_add_request(new)] if new else [],
        cursor=cursor,
    )


def latest_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str):
    """The newest materialization record of one partition of an asset, or None."""
    found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]),
                                            limit=1)
    return found.records[0] if found.records else None


def stale_reports(instance: dg.DagsterInstance, keys: Iterable[str], evaluator: str) -> dict[str, str]:
    """Of the ``checkpoints`` partitions ``keys``, those whose ``benchmark_reports`` is out of date,
    with why: never materialized, materialized before the run's latest ``checkpoints``
    materialization (trained again, or a new run after a base rebuild), or with another evaluator
    than the fingerprint ``evaluator`` (another benchmark, limit or sampling; a report from before
    reports recorded it counts as another)."""
    out = {}
    for pk in keys:
        report = latest_materialization(instance, benchmark_reports.key, pk)
        if report is None:
            out[pk] = "never evaluated"
            continue
        used = report.asset_materialization.metadata.get("evaluator")
        trained = latest_materialization(instance, checkpoints.key, pk)
        if getattr(used, "value", None) != evaluator:
            out[pk] = "evaluated with another evaluator"
        elif trained is not None and trained.timestamp > report.timestamp:
            out[pk] = "trained since its last evaluation"
    return out


@dg.schedule(job=evaluation_job, cron_schedule="0 3 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Weekly re-evaluation of every trained checkpoint whose report is out of date: never "
                         "made, older than the checkpoint, or made with another evaluator.")
def reevaluation_schedule(context: dg.ScheduleEvaluationContext, registry: ModelRegistry, evaluator: Evaluator):
    # only partitions that still exist (a run request for a deleted base model would fail the tick)
    # and whose base model is still registered (its run would fail on registry.get, every week)
    try:
        registered = set(registry.entries())
    except Exception as exc:  # a failed tick, shown (and alerted on) as one: nothing is re-evaluated until fixed
        raise RuntimeError(f"the re-evaluation schedule cannot read the model registry {registry.path} "
                           f"({type(exc).__name__}: {exc}); fix the registry file (or ModelRegistry.path): no "
                           "checkpoint is re-evaluated until then") from exc
    keys = [str(k) for k in runs_partitions.get_partition_keys(dynamic_partitions_store=context.instance)
            if k.keys_by_dimension["base_model"] in registered]
    statuses = partition_statuses(context.instance, checkpoints.key, keys, runs_partitions)
    trained = sorted(ever_materialized(context.instance, checkpoints.key, statuses))
    if not trained:
        return dg.SkipReason("no checkpoint of a registered base model materialized yet")
    try:  # from the local data: a tick downloads nothing (a benchmark not yet local fails the tick, saying why)
        fingerprint = offline_fingerprint(evaluator)
    except DatasetError as exc:
        raise RuntimeError(f"the re-evaluation schedule reads the evaluator's benchmarks from local data only and "
                           f"{exc}; materialize `datasets` once (it downloads them), or place the files in the data "
                           "directory: no checkpoint is re-evaluated until then") from exc
    stale = stale_reports(context.instance, trained, fingerprint)
    if not stale:
        return dg.SkipReason(f"every one of the {len(trained)} trained checkpoints has a report made since it was "
                             f"trained, with this evaluator ({evaluator.benchmark}, {fingerprint[:12]})")
    for pk, why in stale.items():
        context.log.info("re-evaluating %s: %s", pk, why)
    stamp = context.scheduled_execution_time.strftime("%Y%m%d")  # a tick's date: one re-evaluation per tick
    return [dg.RunRequest(run_key=f"reeval:{stamp}:{pk}", partition_key=pk, tags={REASON_TAG: why})
            for pk, why in stale.items()]
