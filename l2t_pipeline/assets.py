"""The L2T assets: base_model, datasets -> segmented_rollouts -> episode_rewards -> checkpoints ->
benchmark_reports. Each is thin: it calls l2t_core, validates the rows against their pandera
schema and replaces its partition's rows in DuckDB (see :mod:`l2t_pipeline.warehouse`).
"""


import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from l2t_core.atomic_files import write_json_atomic
from l2t_core.checkpoint import RunStorage
from l2t_core.config import TrainConfig
from l2t_core.eval.journal import JournalInUse, SampleJournal, held, journal_lock
from l2t_core.hub import hub_commit, hub_snapshot
from l2t_core.model_lock import ModelInUse, building_model, using_model
from l2t_core.models import load_policy, resolve_device, weight_files_sha256, weights_fingerprint
from l2t_core.trainer import MEMORY_COLUMNS, RESUME_FREE

from . import plots
from .config import BaseModelConfig, DatasetsConfig, RewardSettings, RolloutSamplingConfig, TrainRunConfig
from .partitions import BASE_DIMENSION, base_models_partitions, runs_partitions, split_run_key
from .resources import (Evaluator, L2TStorage, ModelEntry, ModelRegistry, TrainingData, TrainingLauncher,
                        evaluate_model)
from .schemas import EpisodeRewardsType, EvalResultsType, ProblemsType, RolloutsType, markdown_table
from .tables import problem_rows, sample_base_rollouts, score_base_rollouts, trainer_tables
from .warehouse import connect, read_rows, train_steps_frame, write_validated

UNPARTITIONED = "__all__"


def _key(context: dg.AssetExecutionContext) -> tuple[str, str]:
    """(asset key, partition key) under which the asset's rows are stored."""
    pk = context.partition_key if context.has_partition_key else UNPARTITIONED
    return context.asset_key.to_user_string(), str(pk)


# --------------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------------


def build_or_reuse_warm_start(out: Path, cfg, rewrite=contextlib.nullcontext) -> tuple[dict, bool]:
    """Warm-start into ``out`` unless it already holds a warm start of exactly ``cfg`` (SFT is
    deterministic for a config); returns (warmstart.json report, reused). ``rewrite()``: a context
    held while ``out`` is rewritten (base_model's exclusive hold on the model, which a warm start
    rewrites in place)."""
    from l2t_core.warmstart import warm_start

    report_path = out / "warmstart.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("config") == json.loads(cfg.model_dump_json()):
            return report, True
    # the weights are rewritten in place and the report last: without the old report first, a
    # rebuild cut short would leave new weights under the old settings' report, reused as those
    with rewrite():
        report_path.unlink(missing_ok=True)
        warm_start(out, cfg, show_progress=False)
    return json.loads(report_path.read_text()), False


def build_or_reuse_sft(out: Path, cfg, run=None, log=None, rewrite=contextlib.nullcontext) -> tuple[dict, bool]:
    """``l2t sft`` into ``out`` unless it already holds the SFT of ``cfg`` on the same traces
    (``sft_report.json``'s ``data_sha256``); returns (sft_report.json, reused). ``run(cfg)`` runs
    the SFT (the launcher's ``launch_sft``; default: ``l2t_core.sft.run_sft`` in this process).

    A changed SFT is trained beside ``out`` (``.<name>.new``) and swapped in only once complete: a
    failure keeps the old model, and the next materialization resumes the unfinished SFT from its
    last checkpoint. The pipeline owns these directories: an unfinished SFT of older settings or
    traces is removed rather than refused, a finished one left beside ``out`` by a worker that
    died before the swap is swapped in, and the work directories of a reused SFT are removed.
    ``rewrite()``: a context held while ``out`` is replaced (the swap; base_model's exclusive hold
    on the model): the SFT itself trains beside it while ``out`` is still read. A swap refused
    there leaves the finished SFT beside ``out``, and the next call swaps it in without training."""
    import shutil

    from l2t_core.config import config_differences
    from l2t_core.sft import (RESUME_IGNORES, deepspeed_config_sha256, file_sha256, partial_dir, run_sft,
                              sft_data_path, stale_partial)

    run = run or (lambda c: run_sft(c, show_progress=False))
    log = log or (lambda msg: None)
    out = Path(cfg.out)  # as the SFT writes it (the registry resolves it to an absolute path)
    fresh, old = out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")
    data_sha256 = file_sha256(sft_data_path(cfg.data))

    def finished(d: Path) -> dict | None:
        """The report of the SFT of ``cfg`` in ``d``, if ``d`` holds one; where and with how many
        threads or checks it ran does not change what it learned."""
        try:
            saved, report = (json.loads((d / name).read_text()) for name in ("sft_config.json", "sft_report.json"))
        except FileNotFoundError:
            return None
        same = not config_differences(saved, cfg, ignore=("out", *RESUME_IGNORES))
        return report if same and report.get("data_sha256") == data_sha256 else None

    def swap_in_fresh() -> None:
        try:
            with rewrite():
                if out.exists():
                    out.rename(old)
                fresh.rename(out)
        except ModelInUse as exc:
            raise ModelInUse(f"{exc}. The new SFT is complete in {fresh}: the next materialization swaps it in "
                             f"without training") from None
        shutil.rmtree(old, ignore_errors=True)

    if not out.exists() and (fresh / "sft_report.json").is_file():  # stopped between the swap's renames
        fresh.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    report, reused = finished(out), True
    if report is None and finished(fresh) is not None:  # trained, but the worker died before the swap
        log(f"swapping in the finished SFT left in {fresh}")
        swap_in_fresh()
        report, reused = finished(out), False
    if report is not None:
        for leftover in (fresh, partial_dir(out), partial_dir(fresh)):
            shutil.rmtree(leftover, ignore_errors=True)
        return report, reused
    target = cfg if not out.exists() else cfg.model_copy(update={"out": str(fresh)})
    shutil.rmtree(fresh, ignore_errors=True)  # an SFT's output is complete or absent; its work is in .partial
    differs = stale_partial(target, data_sha256, deepspeed_config_sha256(target))
    if differs:
        work = partial_dir(Path(target.out))  # a local directory: SFTConfig refuses URLs for out
        log(f"removing the unfinished SFT in {work} (made with other {differs})")
        shutil.rmtree(work)
    run(target)
    if target is not cfg:
        swap_in_fresh()
    return json.loads((out / "sft_report.json").read_text()), False


MODEL_REPORTS = {"warmstart": "warmstart.json", "sft": "sft_report.json"}


HUB_PIN = "hub_pin.json"


def is_hub_base(entry: ModelEntry) -> bool:
    """Whether ``entry`` is a ``pretrained`` hub model, which base_model pins to a commit."""
    return entry.kind == "pretrained" and entry.hub_id() is not None


def new_hub_pin(entry: ModelEntry) -> dict | None:
    """For a ``pretrained`` hub model: the commit its revision is now
    (:func:`~l2t_core.hub.hub_commit`), as a pin (``repo_id``, ``revision``, ``commit``); None for
    any other entry. base_model pins it (:func:`write_hub_pin`) once it has evaluated it."""
    if not is_hub_base(entry):
        return None
    hub = entry.hub_id()
    return {"repo_id": hub, "revision": entry.revision, "commit": hub_commit(hub, entry.revision)}


def write_hub_pin(name: str, storage: L2TStorage, pin: dict) -> None:
    """Pin base model ``name`` to ``pin`` (``models_dir/<name>/hub_pin.json``, written whole) for
    every later step of the base (:func:`hub_pin`)."""
    write_json_atomic(storage.model_dir(name) / HUB_PIN, pin)


def hub_pin(name: str, entry: ModelEntry, storage: L2TStorage) -> dict | None:
    """The pin :func:`write_hub_pin` wrote for base model ``name`` (``repo_id``, ``revision``,
    ``commit``), or None where the entry is no ``pretrained`` hub model. Fails, naming the fix,
    where base_model has not pinned one for the entry as the registry has it now. A step reads it
    once: a base_model that pins another commit meanwhile changes nothing the step has begun."""
    if not is_hub_base(entry):
        return None
    hub = entry.hub_id()
    f = storage.model_dir(name) / HUB_PIN
    pin = json.loads(f.read_text()) if f.is_file() else None
    if pin is None or (pin["repo_id"], pin["revision"]) != (hub, entry.revision):
        why = ("none is pinned" if pin is None else
               f"the pinned one is of {pin['repo_id']} at {pin['revision'] or 'main'}: the registry entry changed")
        raise FileNotFoundError(f"base model {name!r} is the hub model {hub} at {entry.revision or 'main'}, and {why}; "
                                f"materialize base_model[{name}] first: it pins the commit that every later step "
                                "of the base uses")
    return pin


def base_model_path(name: str, entry: ModelEntry, storage: L2TStorage, pin: dict | None = None) -> str:
    """Where the policy of base model ``name`` is: the registry path (for a hub model, the local
    copy of the commit of ``pin``, by default the one base_model pinned, :func:`hub_pin`;
    downloaded where it is not in the hub cache yet), or the directory the asset built (a warm
    start or an SFT)."""
    if entry.kind == "pretrained":
        pin = pin or hub_pin(name, entry, storage)
        return str(entry.path) if pin is None else str(hub_snapshot(pin["repo_id"], pin["commit"]))
    d = storage.model_dir(name)
    if not (d / MODEL_REPORTS[entry.kind]).is_file():
        raise FileNotFoundError(f"base model {name!r} has no {'warm start' if entry.kind == 'warmstart' else 'SFT'} "
                                f"in {d}; materialize base_model[{name}] first")
    return str(d)


def base_model_in_use(context, name: str, entry: ModelEntry, storage: L2TStorage, *, rebuild: bool = False):
    """Hold base model ``name``'s directory while this step reads it, or exclusively while
    base_model rebuilds it (``rebuild``); the step fails at once, naming the other steps, where
    they exclude it (:mod:`l2t_core.model_lock`). A ``pretrained`` entry is the registry's, never
    rebuilt here: nothing to hold (a hub model's pin may move, but a step reads it once, and the
    copy of a commit never changes)."""
    if entry.kind == "pretrained":
        return contextlib.nullcontext()
    return using_model(storage.model_dir(name), exclusive=rebuild, who=_holder(context))


def _holder(context) -> str:
    """This step, as a lock's note names it to another step that it refuses."""
    return f"{context.asset_key.to_user_string()}[{context.partition_key}] of Dagster run {context.run.run_id}"


def base_weights(path: str | None, pin: dict | None) -> str:
    """The fingerprint of a base model's weights: ``hub:<id>@<commit>`` for a pinned hub model (a
    commit names its files: nothing is downloaded or read), else
    :func:`~l2t_core.models.weights_fingerprint` of ``path``."""
    return f"hub:{pin['repo_id']}@{pin['commit']}" if pin else weights_fingerprint(path)


def shown_weights(weights: str) -> str:
    """A weights fingerprint as a message shows it: a hub model's whole, a hash's first 12 digits."""
    return weights if weights.startswith("hub:") else weights[:12]


def with_model_columns(evals: pd.DataFrame, kind: str, base_model: str, method: str | None, path: str,
                       weights: str | None = None) -> pd.DataFrame:
    """An evaluation's rows with the model they are of: its kind, base, method, path and the
    fingerprint of its weights (:func:`~l2t_core.models.weights_fingerprint`)."""
    out = evals.copy()
    out["model_kind"] = kind
    out["base_model"] = base_model
    out["method"] = method
    out["model_path"] = path
    out["model_weights"] = weights
    return out


# the concurrency pool of the steps that train: one training process per slot (a GPU each), set with
# `dagster instance concurrency set l2t_training N`
TRAINING_POOL = "l2t_training"
# the pool of the steps that load a model in the run worker itself (the base model's warm start and
# evaluation, base rollouts, their rewards, reports): by default the training pool, so that on a
# machine with one GPU they take turns with training for it; L2T_MODEL_POOL names another pool, or
# none ("") where run workers have no GPU (Kubernetes: those steps run on the run worker's CPUs, and
# with the production instance's run granularity a baseline run would hold a GPU's slot for hours)
MODEL_POOL = os.environ.get("L2T_MODEL_POOL", TRAINING_POOL) or None


def _train_retry_policy() -> dg.RetryPolicy | None:
    """L2T_TRAIN_RETRIES: how often a failed ``checkpoints`` step is retried (default 0: no policy,
    so a failure reads as itself), 60 s and then 180 s later. Training resumes from the run's last
    checkpoint, so a retry after a lost node or an evicted pod costs the steps since it, not the
    run; a refusal no retry can change (a bad configuration, an unknown base model, a run that
    ended without a checkpoint) fails at once."""
    raw = os.environ.get("L2T_TRAIN_RETRIES", "0").strip() or "0"
    if not raw.isdigit():
        raise ValueError(f"L2T_TRAIN_RETRIES={raw!r} is not a whole number of retries (e.g. 2)")
    n = int(raw)
    return dg.RetryPolicy(max_retries=n, delay=60, backoff=dg.Backoff.EXPONENTIAL) if n else None


KEPT_EVALUATIONS = "evaluations"


def evaluation_key(evaluator_fingerprint: str, weights: str) -> str:
    """The name under which an evaluation of the weights ``weights`` by the evaluator of
    ``evaluator_fingerprint`` (:meth:`Evaluator.fingerprint`) is kept."""
    return hashlib.sha1(f"{evaluator_fingerprint}|{weights}".encode()).hexdigest()[:16]


def kept_evaluation(context, store: RunStorage, key: str, evaluate, journal: Path) -> pd.DataFrame:
    """``evaluate(sample_journal)``'s rows, kept in ``store`` (``evaluations/<key>.json``) as soon
    as they are made, until :func:`drop_kept_evaluation` once they are stored: a step that fails
    after an evaluation of hours (the warehouse busy, the report unwritable) and is run again
    reuses it instead of evaluating again. Meanwhile its samples are kept in the journal
    ``journal`` (:class:`~l2t_core.eval.journal.SampleJournal`): a step cut short (a lost node, a
    crash) resumes them. Where another step is evaluating the same weights with the same evaluator
    now, this one evaluates without a journal."""
    rel = f"{KEPT_EVALUATIONS}/{key}.json"
    try:
        kept = json.loads(store.read_bytes(rel))
    except FileNotFoundError:  # none, or another step stored and removed it meanwhile
        kept = None
    if kept is not None:
        context.log.info("reusing the evaluation an earlier attempt of this step made and could not store: %s",
                         store.url_of(store.path(rel)))
        with contextlib.suppress(JournalInUse):  # its samples, where that attempt stopped before removing them
            with held(journal_lock(journal), _holder(context)):
                journal.unlink(missing_ok=True)
        return pd.DataFrame(kept)
    with contextlib.ExitStack() as stack:
        samples: SampleJournal | None = SampleJournal(journal, context={"evaluation": key})
        try:
            stack.enter_context(held(journal_lock(journal), _holder(context)))
        except JournalInUse as exc:
            context.log.warning("evaluating without keeping the samples: another step evaluates the same weights "
                                "with the same evaluator now (%s)", exc)
            samples = None
        evals = evaluate(samples)
        # JSON records keep each value as it is (a level is 'all' or a number) and floats exactly
        store.write_bytes(rel, json.dumps(evals.to_dict(orient="records")).encode())
        if samples is not None:
            samples.remove()  # kept as rows now
    drop_stale_journals(journal.parent, context)
    return evals


# a sample journal untouched this long belongs to an evaluation whose step was not run again (other
# evaluator settings since, a run given up): removed by the next evaluation that completes
STALE_JOURNAL_S = 7 * 24 * 3600.0


def drop_stale_journals(directory: Path, context=None, now: float | None = None) -> list[Path]:
    """Remove the sample journals in ``directory`` untouched for :data:`STALE_JOURNAL_S` that no
    step holds now (:func:`~l2t_core.eval.journal.held`); the ones removed. A step cut short keeps
    its journal for a week to resume from."""
    now = time.time() if now is None else now
    dropped = []
    try:
        paths = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    except OSError:  # housekeeping: never the failure of the evaluation that completed
        paths = []
    for path in paths:
        try:
            if now - path.stat().st_mtime < STALE_JOURNAL_S:
                continue
            with held(journal_lock(path), "removing a stale sample journal"):
                if now - path.stat().st_mtime < STALE_JOURNAL_S:  # written since the first look
                    continue
                path.unlink()
        except (JournalInUse, OSError):  # in use, or gone meanwhile
            continue
        dropped.append(path)
    if dropped and context is not None:
        context.log.info("removed %d sample journal(s) untouched for %d days: %s", len(dropped),
                         STALE_JOURNAL_S // 86400, ", ".join(p.name for p in dropped))
    return dropped


def drop_kept_evaluation(store: RunStorage, key: str) -> None:
    """Remove what :func:`kept_evaluation` kept, once its rows are stored (another step of the
    same base model may have removed it already)."""
    with contextlib.suppress(FileNotFoundError):
        store.remove(f"{KEPT_EVALUATIONS}/{key}.json")


def _build_base_model(context: dg.AssetExecutionContext, name: str, entry: ModelEntry, storage: L2TStorage,
                      config: BaseModelConfig, training_data: TrainingData, evaluator: Evaluator,
                      launcher: TrainingLauncher) -> dict:
    """Build (or reuse) the warm start or the SFT of base model ``name`` (nothing for a
    ``pretrained`` entry), holding the model exclusively only while it is rewritten; the
    metadata that says how."""
    meta: dict = {}

    def rewrite():
        return base_model_in_use(context, name, entry, storage, rebuild=True)

    if entry.kind == "warmstart":
        if not training_data.synthetic:
            raise ValueError(f"base model {name!r} is a warm start, which needs a synthetic task as training data; "
                             f"training_data.source is {training_data.source!r}")
        data = training_data.to_core()
        out = storage.model_dir(name)
        report, reused = build_or_reuse_warm_start(out, config.to_core(data.source, data.min_steps, data.max_steps),
                                                   rewrite)
        meta.update(reused=reused, parameters=report["parameters"], sft_final_loss=report["final_loss"],
                    sft_seconds=report["sft_seconds"])
    elif entry.kind == "sft":
        # a hub model fine-tuned at the commit its revision is now: a branch that moved makes another SFT
        hub = entry.hub_id()
        commit = hub_commit(hub, entry.revision) if hub else None
        sft_cfg = entry.sft_config(storage.model_dir(name), commit)
        report, reused = build_or_reuse_sft(Path(sft_cfg.out), sft_cfg, lambda c: launcher.launch_sft(context, c),
                                            context.log.info, rewrite)
        plot = Path(sft_cfg.out) / "loss.png"  # absent from SFTs made before the plot was
        if commit:
            meta["finetuned_from_commit"] = commit
        meta.update(reused=reused, finetuned_from=storage.display(str(entry.path)), parameters=report["parameters"],
                    sft_examples=report["examples"], sft_final_loss=report["final_loss"],
                    sft_seconds=report["sft_seconds"], sft_segmentation=report["segmentation"],
                    sft_answers_correct=f"{report['answers']['correct']} of {report['answers']['checked']}")
        if plot.is_file():
            meta["sft_loss_plot"] = dg.MetadataValue.path(str(plot))
    return meta


@dg.asset(partitions_def=base_models_partitions, group_name="models", kinds={"pytorch", "duckdb"},
          pool=MODEL_POOL,  # a warm start and the evaluation run here (an SFT in the launcher's process or pod)
          description="The base policy of a partition: the embedded default warm-started by SFT on the "
                      "synthetic task, a registry model, or a registry model fine-tuned by `l2t sft` on traces; "
                      "its baseline evaluation goes to eval_results.")
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, storage: L2TStorage,
               registry: ModelRegistry, training_data: TrainingData, evaluator: Evaluator,
               duckdb: DuckDBResource, launcher: TrainingLauncher) -> dg.MaterializeResult:
    name = context.partition_key
    entry = registry.get(name)
    evaluator.check_base_model(name, training_data.source)  # before anything is built
    meta: dict = {"kind": entry.kind}
    pin = new_hub_pin(entry)  # a hub model: the commit it is now, pinned for every later step once evaluated
    if pin is not None:
        meta.update(hub_model=pin["repo_id"], hub_revision=pin["revision"] or "main", hub_commit=pin["commit"])
    if entry.kind != "pretrained":
        with building_model(storage.model_dir(name), who=_holder(context)):  # one build of it at a time
            meta.update(_build_base_model(context, name, entry, storage, config, training_data, evaluator, launcher))
    fingerprint = evaluator.fingerprint()
    evals, key = evaluate_base(context, evaluator, fingerprint, name, entry, storage, pin=pin)
    asset_key, pk = _key(context)
    with connect(duckdb) as conn:
        n = write_validated(conn, {"eval_results": evals}, asset_key, pk)["eval_results"]
    if pin is not None:  # the later steps use the commit evaluated, once its evaluation is stored
        write_hub_pin(name, storage, pin)
    drop_kept_evaluation(kept_base_evaluations(storage, name), key)
    overall = evals[evals["level"] == "all"].iloc[0]
    meta.update(path=storage.display(overall["model_path"]), benchmark=evaluator.benchmark, evaluator=fingerprint,
                accuracy=float(overall["accuracy"]), mean_tokens=float(overall["mean_tokens"]), eval_rows=n,
                evaluation=dg.MetadataValue.md(markdown_table(evals[["level", "n", "accuracy", "mean_tokens",
                                                                 "tagged_share", "finished_share"]])))
    return dg.MaterializeResult(metadata=meta)


# --------------------------------------------------------------------------------------------
# Data, base rollouts and their rewards
# --------------------------------------------------------------------------------------------


@dg.asset(group_name="data", kinds={"pandas", "duckdb"}, dagster_type=ProblemsType,
          description="Normalized, validated problems: the training prompts, the evaluator's problems (the "
                      "held-out split or benchmark test rows) and any configured benchmark files (table `problems`).")
def datasets(context: dg.AssetExecutionContext, config: DatasetsConfig, training_data: TrainingData,
             evaluator: Evaluator, duckdb: DuckDBResource) -> pd.DataFrame:
    df = problem_rows(training_data.to_core(), training_data.dataset_name, evaluator.problem_rows(),
                      config.benchmarks, config.max_rows_per_benchmark)
    asset_key, pk = _key(context)
    with connect(duckdb) as conn:
        n = write_validated(conn, {"problems": df}, asset_key, pk)["problems"]
    counts = df.groupby(["dataset", "split"]).size().rename("rows").reset_index()
    context.add_output_metadata({"rows": n, "datasets": dg.MetadataValue.md(counts.to_markdown(index=False))})
    return df


@dg.asset(partitions_def=base_models_partitions, group_name="rewards", kinds={"pytorch", "duckdb"},
          dagster_type=RolloutsType, pool=MODEL_POOL, deps=["base_model"],
          description="The base policy's sampled responses on the training prompts, segmented into episodes and "
                      "verified (table `rollouts`, source 'base').")
def segmented_rollouts(context: dg.AssetExecutionContext, config: RolloutSamplingConfig, datasets: pd.DataFrame,
                       storage: L2TStorage, registry: ModelRegistry, training_data: TrainingData,
                       duckdb: DuckDBResource) -> pd.DataFrame:
    name = context.partition_key
    entry = registry.get(name)
    with base_model_in_use(context, name, entry, storage):  # until its weights are loaded
        model, tok = load_policy(base_model_path(name, entry, storage), device=str(resolve_device(config.device)))
    prompts = datasets[(datasets["dataset"] == training_data.dataset_name) & (datasets["split"] == "train")]
    model.eval()
    df = sample_base_rollouts(model, tok, prompts.head(config.prompts), training_data.to_core(), name,
                              n=config.group_size, temperature=config.temperature,
                              max_new_tokens=config.max_new_tokens, seed=config.seed)
    asset_key, pk = _key(context)
    with connect(duckdb) as conn:
        n = write_validated(conn, {"rollouts": df}, asset_key, pk)["rollouts"]
    status = df["segmentation"].value_counts().to_dict()
    context.add_output_metadata({
        "rows": n, "accuracy": float(df["outcome"].mean()), "mean_tokens": float(df["num_tokens"].mean()),
        "mean_episodes": float(df["num_episodes"].mean()), "segmentation": dg.MetadataValue.json(status),
    })
    return df


@dg.asset(partitions_def=base_models_partitions, group_name="rewards", kinds={"pytorch", "duckdb"},
          dagster_type=EpisodeRewardsType, pool=MODEL_POOL, deps=["base_model"],
          description="Per-episode fitting gain G_k, penalty P_k and P̂_k, process reward, outcome share and "
                      "episode reward R_k of the base rollouts (table `episode_rewards`, source 'base').")
def episode_rewards(context: dg.AssetExecutionContext, config: RewardSettings, segmented_rollouts: pd.DataFrame,
                    storage: L2TStorage, registry: ModelRegistry, training_data: TrainingData,
                    duckdb: DuckDBResource) -> pd.DataFrame:
    name = context.partition_key
    entry = registry.get(name)
    with base_model_in_use(context, name, entry, storage):  # until its weights are loaded
        model, tok = load_policy(base_model_path(name, entry, storage), device=str(resolve_device(config.device)))
    model.eval()
    episodes, scored = score_base_rollouts(model, tok, segmented_rollouts, config.method, config.to_core(),
                                           training_data.to_core())
    asset_key, pk = _key(context)
    with connect(duckdb) as conn:
        n = write_validated(conn, {"episode_rewards": episodes}, asset_key, pk)["episode_rewards"]
    meta = {"rows": n, "method": config.method, "responses": len(scored),
            "score_mean": float(scored["score"].mean())}
    for col in ("fitting_gain", "penalty_hat", "process_reward", "episode_reward"):
        meta[f"{col}_mean"] = float(episodes[col].mean()) if n else 0.0
    context.add_output_metadata(meta)
    return episodes


# --------------------------------------------------------------------------------------------
# Training runs and their evaluation
# --------------------------------------------------------------------------------------------


def inputs_fingerprint(cfg: TrainConfig) -> dict:
    """What a run's configuration names only by location, by content: the SHA-256 of the base
    model's weight files (a local directory; a hub id stands for itself, and ``policy_revision``,
    a commit where the pipeline sets it, for its files), of the training data
    file (a synthetic task is its settings) and of the DeepSpeed config file. A base model rebuilt
    in place (other warm-start or SFT settings, new traces) or an edited data file then makes a new
    run, never the old one's checkpoint reused. Hashing reads the weights (seconds for a 1.5B
    model)."""
    from l2t_core.training_data import source_path
    from l2t_core.sft import file_sha256
    from l2t_core.tasks import TASKS

    out: dict = {}
    if Path(cfg.policy).is_dir():
        out["policy_weights"] = weight_files_sha256(cfg.policy)
    if cfg.data.source not in TASKS:
        out["data_sha256"] = file_sha256(source_path(cfg.data.source))
    if cfg.deepspeed_config and Path(cfg.deepspeed_config).is_file():
        out["deepspeed_config_sha256"] = file_sha256(Path(cfg.deepspeed_config))
    return out


def config_hash(cfg: TrainConfig, inputs: dict | None = None) -> str:
    """A short hash of a run's configuration without the settings a run may change when it resumes
    (its output URL, how often it checkpoints: ``l2t_core.trainer.RESUME_FREE``), and of ``inputs`` (its
    :func:`inputs_fingerprint`): the run directory's name. A DeepSpeed config fingerprinted by its
    bytes is left out by its path (an absolute path of one checkout or image)."""
    # what does not change what trains (where to, how often to checkpoint, ...) does not name the run
    settings = {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in RESUME_FREE}
    if settings.get("policy_revision") is None:  # as runs were named before the field was
        settings.pop("policy_revision", None)
    if inputs and "deepspeed_config_sha256" in inputs:
        settings.pop("deepspeed_config", None)
    blob = json.dumps({**settings, **({"inputs": inputs} if inputs else {})}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dg.asset(partitions_def=runs_partitions, group_name="training", kinds={"pytorch", "duckdb"},
          deps=[dg.AssetDep("base_model", partition_mapping=BASE_DIMENSION),
                dg.AssetDep("episode_rewards", partition_mapping=BASE_DIMENSION)],
          pool=TRAINING_POOL,
          retry_policy=_train_retry_policy(),
          description="An RL fine-tuning run of a base model with a method, launched through Dagster Pipes; its "
                      "per-step metrics, rollouts and episode rewards land in train_steps, rollouts and "
                      "episode_rewards (source 'train'), the run in `checkpoints`.")
def checkpoints(context: dg.AssetExecutionContext, config: TrainRunConfig, storage: L2TStorage,
                registry: ModelRegistry, training_data: TrainingData, launcher: TrainingLauncher,
                duckdb: DuckDBResource) -> dg.MaterializeResult:
    base, method = split_run_key(context)
    try:
        entry = registry.get(base)
    except KeyError as exc:  # not registered (any more): no retry registers it
        raise dg.Failure(str(exc.args[0]) if exc.args else str(exc), allow_retries=False) from exc
    # held for the whole run: it fingerprints the base weights here, loads them, and loads them again
    # as its reference policy whenever it resumes
    with base_model_in_use(context, base, entry, storage):
        pin = hub_pin(base, entry, storage)  # a hub model: trained from its pinned commit, never downloaded here
        return _train(context, config, storage, training_data, launcher, duckdb, base, method,
                      None if pin else base_model_path(base, entry, storage), pin)


def _train(context: dg.AssetExecutionContext, config: TrainRunConfig, storage: L2TStorage, training_data: TrainingData,
           launcher: TrainingLauncher, duckdb: DuckDBResource, base: str, method: str, policy: str | None,
           pin: dict | None = None) -> dg.MaterializeResult:
    """checkpoints' run of ``method`` on the base policy at ``policy``, or for a hub model on the
    commit ``pin`` names (the training process loads it by its hub id, wherever it runs), launched
    and recorded."""
    # the config as the launcher runs it (e.g. device and engine on a GPU pod), so that the hash, the
    # run directory and the recorded config_json describe what really trains
    source = {"policy": pin["repo_id"], "policy_revision": pin["commit"]} if pin else {"policy": policy}
    try:  # a configuration the launcher refuses, or data that is not there: no retry changes it
        draft = launcher.placed_config(config.to_core(**source, method=method, out="unset",
                                                      data=training_data.to_core()))
        inputs = inputs_fingerprint(draft)
        h = config_hash(draft, inputs)
        cfg = TrainConfig.model_validate({**json.loads(draft.model_dump_json()), "out": storage.run_url(base, method, h)})
    except (ValueError, FileNotFoundError) as exc:  # pydantic's ValidationError is a ValueError
        raise dg.Failure(f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
    context.log.info("training %s with %s into %s (config %s)", base, method, storage.display(cfg.out), h)
    invocation = launcher.launch(context, cfg)
    reported = invocation.get_materialize_result()
    run = storage.run_storage(cfg.out)
    latest = run.latest_checkpoint()
    if latest is None:
        raise dg.Failure(f"the training process of {context.partition_key} exited without a complete checkpoint in "
                         f"{storage.display(cfg.out)}", allow_retries=False)
    tables = trainer_tables(run, base, method)
    tables["train_steps"] = train_steps_frame(tables["train_steps"], base, method)
    registry_row = pd.DataFrame([{"base_model": base, "method": method, "run_url": cfg.out,
                                  "checkpoint_url": latest[1], "final_step": latest[0], "config_hash": h,
                                  "config_json": cfg.model_dump_json(),
                                  "base_weights": base_weights(policy, pin) if pin else
                                  weights_fingerprint(policy, inputs.get("policy_weights"))}])
    last = tables["train_steps"].sort_values("step").iloc[-1]
    history_row = registry_row.assign(last_accuracy=float(last["accuracy"]),
                                      last_mean_tokens=float(last["mean_tokens"]), dagster_run_id=context.run.run_id)
    asset_key, pk = _key(context)
    with connect(duckdb) as conn:
        counts = write_validated(conn, tables, asset_key, pk,
                                 unvalidated={"checkpoints": registry_row, "run_history": history_row})
    meta = dict(reported.metadata or {})
    meta.update({f"{t}_rows": n for t, n in counts.items()})
    meta.update(run_url=storage.display(cfg.out), checkpoint=storage.display(latest[1]), final_step=latest[0],
                config_hash=h, last_accuracy=float(last["accuracy"]), last_mean_tokens=float(last["mean_tokens"]))
    peaks = tables["train_steps"].reindex(columns=list(MEMORY_COLUMNS)).astype(float)
    if peaks.notna().any().any():  # the run's highest phase peak, to size the next one's micro-batches
        meta["peak_memory_gib"] = float(peaks.max().max())
    return dg.MaterializeResult(metadata=meta)


REPORT_FILE = "benchmark_report.html"


def stored_base_evaluation(conn, base: str, fingerprint: str, weights: str | None) -> pd.DataFrame | None:
    """The evaluation rows ``base_model`` stored for ``base`` with the evaluator fingerprint
    ``fingerprint`` (:meth:`Evaluator.fingerprint`), of the weights ``weights``
    (:func:`~l2t_core.models.weights_fingerprint`; None: of any), or None when there are none."""
    stored = read_rows(conn, "eval_results", "base_model", base)
    stored = stored[stored["evaluator"] == fingerprint]
    if weights is not None:
        stored = stored[stored["model_weights"] == weights]
    return stored.drop(columns=["asset_key", "partition_key", "loaded_at"]) if len(stored) else None


def kept_base_evaluations(storage: L2TStorage, base: str) -> RunStorage:
    """Where the evaluations of base model ``base`` are kept until stored (:func:`kept_evaluation`)."""
    return storage.run_storage(storage.evaluations_url(base))


def evaluate_base(context, evaluator: Evaluator, fingerprint: str, base: str, entry: ModelEntry,
                  storage: L2TStorage, trained_from: str | None = None,
                  pin: dict | None = None) -> tuple[pd.DataFrame, str]:
    """Evaluate base model ``base`` as it is now (a hub model: at the commit of ``pin``, by default
    the one pinned), holding it meanwhile: for ``base_model``, or for the run of the partition
    being materialized, which trained from the weights ``trained_from`` (None: any, e.g. a run
    recorded before runs recorded them); the rows, kept until stored under the key returned
    (:func:`kept_evaluation`). Fails, evaluating nothing, where the base was rebuilt (or pinned to
    another commit) since that run: its checkpoint would be compared with another model than the
    one it left."""
    with base_model_in_use(context, base, entry, storage):
        pin = pin or hub_pin(base, entry, storage)
        if pin and trained_from and trained_from.startswith(f"hub:{pin['repo_id']}@"):
            # a run of a commit pinned before: that commit's files never change, so evaluate them
            pin = {**pin, "commit": trained_from.rpartition("@")[2]}
        local = None if pin else base_model_path(base, entry, storage)
        weights = base_weights(local, pin)
        if trained_from is not None and weights != trained_from:
            now = storage.display(local) if local else f"{pin['repo_id']}@{pin['commit']}"
            raise dg.Failure(
                f"the run of {context.partition_key} trained from other weights of base model {base!r} than "
                f"{now} is now (fingerprint {shown_weights(trained_from)}, now "
                f"{shown_weights(weights)}: the base was rebuilt or pinned to another commit since), and no "
                f"evaluation of those weights is stored. Materialize checkpoints[{context.partition_key}] to train "
                "from the base as it is now, then this report")
        # what the rows name: the local path, or the hub model at its commit (not one machine's cache)
        named = local or f"{pin['repo_id']}@{pin['commit']}"
        context.log.info("base model %s: %s; evaluating on %s", base, storage.display(named), evaluator.benchmark)

        def evaluate(journal) -> pd.DataFrame:  # a hub model's copy downloaded only when evaluated
            return with_model_columns(evaluate_model(evaluator, local or base_model_path(base, entry, storage, pin),
                                                     journal), "base", base, None, named, weights)

        key = evaluation_key(fingerprint, weights)
        return kept_evaluation(context, kept_base_evaluations(storage, base), key, evaluate,
                               storage.sample_journal(key)), key


def comparison(evals: pd.DataFrame) -> dict:
    """Overall accuracy and tokens of the checkpoint and its base: deltas and token reduction."""
    overall = evals[evals["level"] == "all"].set_index("model_kind")
    for kind in ("base", "checkpoint"):
        if kind not in overall.index:
            raise ValueError(f"no overall ('all') {kind} evaluation to compare")
    b, c = overall.loc["base"], overall.loc["checkpoint"]
    reduction = 1.0 - c["mean_tokens"] / b["mean_tokens"] if b["mean_tokens"] > 0 else 0.0
    return {"accuracy": float(c["accuracy"]), "base_accuracy": float(b["accuracy"]),
            "accuracy_delta": float(c["accuracy"] - b["accuracy"]), "mean_tokens": float(c["mean_tokens"]),
            "base_mean_tokens": float(b["mean_tokens"]), "token_reduction": float(reduction)}


@dg.asset(partitions_def=runs_partitions, group_name="evaluation", kinds={"pytorch", "duckdb"},
          dagster_type=EvalResultsType, pool=MODEL_POOL, deps=["checkpoints"],
          description="Evaluation of a run's latest checkpoint and its base model on the same benchmark "
                      "(table `eval_results`), with plots and the token reduction as metadata.")
def benchmark_reports(context: dg.AssetExecutionContext, storage: L2TStorage, registry: ModelRegistry,
                      evaluator: Evaluator, duckdb: DuckDBResource) -> pd.DataFrame:
    base, method = split_run_key(context)
    asset_key, pk = _key(context)
    entry = registry.get(base)
    # the warehouse is locked only to read and to write: evaluating takes minutes to hours (and the
    # fingerprint reads the benchmark, maybe from the hub), and holding the lock meanwhile would
    # fail every other writer (WarehouseBusy)
    fingerprint = evaluator.fingerprint()
    with connect(duckdb) as conn:
        runs = read_rows(conn, "checkpoints", "checkpoints", pk)
        steps = read_rows(conn, "train_steps", "checkpoints", pk)
        if runs.empty:
            raise dg.Failure(f"no training run recorded for {pk}; materialize checkpoints[{pk}] first")
        run = runs.iloc[0]
        # the base weights the run trained from: its base evaluation must be of those
        trained_from = None if pd.isna(run["base_weights"]) else str(run["base_weights"])
        base_evals = stored_base_evaluation(conn, base, fingerprint, trained_from)
    if trained_from is None:
        context.log.warning("the run of %s was recorded by an earlier version, which did not record its base's "
                            "weights: its base evaluation is the one stored for %s, or of the base as it is now, "
                            "whichever weights those are. A new materialization of checkpoints[%s] records them",
                            pk, base, pk)
    base_key = None
    if base_evals is None:
        base_evals, base_key = evaluate_base(context, evaluator, fingerprint, base, entry, storage, trained_from)
    run_store = storage.run_storage(run["run_url"])

    def evaluate_checkpoint(journal) -> pd.DataFrame:
        with run_store.local_copy(run["checkpoint_url"]) as local:
            return with_model_columns(evaluate_model(evaluator, local, journal), "checkpoint", base, method,
                                      run["checkpoint_url"], weights_fingerprint(local))

    # a checkpoint is never rewritten: its URL names its weights
    ckpt_key = evaluation_key(fingerprint, run["checkpoint_url"])
    ckpt = kept_evaluation(context, run_store, ckpt_key, evaluate_checkpoint, storage.sample_journal(ckpt_key))
    evals = pd.concat([base_evals, ckpt], ignore_index=True)
    cmp = comparison(evals)
    history = pd.DataFrame([{"base_model": base, "method": method, "config_hash": run["config_hash"],
                             "checkpoint_url": run["checkpoint_url"], "evaluator": fingerprint,
                             "benchmark": evaluator.benchmark, "dagster_run_id": context.run.run_id,
                             **{k: cmp[k] for k in ("accuracy", "base_accuracy", "accuracy_delta", "mean_tokens",
                                                    "base_mean_tokens", "token_reduction")}}])
    with connect(duckdb) as conn:
        n = write_validated(conn, {"eval_results": evals}, asset_key, pk,
                            unvalidated={"evaluation_history": history})["eval_results"]
    images = [("accuracy and tokens per level",
               plots.png_data_uri(plots.eval_comparison(evals, f"{base} / {method} on {evaluator.benchmark}")))]
    if len(steps):
        images.append(("training curve", plots.png_data_uri(plots.training_curve(steps, f"training {base} / {method}"))))
    figs = "\n\n".join(f"![{alt}]({uri})" for alt, uri in images)
    table = evals[["model_kind", "level", "n", "accuracy", "mean_tokens", "tagged_share"]]
    # the same report as a self-contained HTML file next to the run (local disk or S3)
    page = plots.html_report(f"{base} / {method} on {evaluator.benchmark}",
                             {**cmp, "checkpoint": storage.display(run["checkpoint_url"])}, table, images)
    # after the rows: a report that cannot be written fails the step with the rows stored, and the
    # re-execution replaces them (idempotent; bench.faults' Dagster scenario)
    run_store.write_bytes(REPORT_FILE, page.encode())
    drop_kept_evaluation(run_store, ckpt_key)
    if base_key is not None:
        drop_kept_evaluation(kept_base_evaluations(storage, base), base_key)
    context.add_output_metadata({
        **cmp, "rows": n, "benchmark": evaluator.benchmark, "evaluator": fingerprint,
        "checkpoint": storage.display(run["checkpoint_url"]),
        "report": storage.display(run_store.url_of(run_store.path(REPORT_FILE))),
        "plots": dg.MetadataValue.md(figs), "evaluation": dg.MetadataValue.md(markdown_table(table)),
    })
    return evals
