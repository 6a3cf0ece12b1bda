"""Resources of the L2T code location: DuckDB, run storage, the model registry, the training data,
the evaluator and the job launcher.

Defaults (all overridable through the environment):

* ``L2T_DUCKDB_PATH``: the DuckDB file, default ``dagster_home/l2t.duckdb``;
* ``L2T_STORAGE_URL``: where training runs live, a local directory (default
  ``dagster_home/storage``) or any fsspec URL such as ``s3://bucket/l2t``; for S3, s3fs reads the
  credentials and ``AWS_ENDPOINT_URL`` from the environment; they are never logged or stored (a URL
  with credentials in it, ``ftp://user:password@host/...``, is refused: see :mod:`l2t_core.urls`);
* ``L2T_IO_URL``: where Dagster stores the assets' outputs (the DataFrames ``segmented_rollouts``
  loads from ``datasets`` and ``episode_rewards`` from ``segmented_rollouts``), default
  ``<L2T_STORAGE_URL>/assets``; a local path or an fsspec URL. Runs of one deployment must share
  it: on Kubernetes every run is a fresh pod, so it lies on the shared volume or object storage,
  never in a pod's ``$DAGSTER_HOME`` (:func:`make_io_manager`);
* ``L2T_MODELS_DIR``: local directory of base models, default ``dagster_home/models``;
* ``L2T_MODEL_REGISTRY``: the model registry YAML, default ``l2t_pipeline/model_registry.yaml``.

The evaluator is :class:`HeldOutEvaluator` (the synthetic task's held-out split) or
:class:`BenchmarkEvaluator` (real math benchmarks, ``L2T_EVALUATOR=benchmark`` with the
``L2T_EVAL_*`` settings of :meth:`BenchmarkEvaluator.from_env`); see ``definitions.evaluator_resource``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import dagster as dg
import pandas as pd
import yaml
from dagster_duckdb import DuckDBResource
from pydantic import Field

from l2t_core.checkpoint import RunStorage
from l2t_core.config import DataConfig, TrainConfig
from l2t_core.eval.runner import EvalSettings
from l2t_core.hub import COMMIT, could_be_hub_id
from l2t_core.launcher_watch import WATCH_ENV
from l2t_core.tasks import TASKS, get_task
# redact_url lives in l2t_core.urls; importable from here too (older imports, l2t_pipeline.k8s)
from l2t_core.urls import redact_url, refuse_credentials

LEVELS = (1, 2, 3, 4, 5, 6)  # the difficulty levels of the synthetic tasks

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER_HOME = REPO_ROOT / "dagster_home"
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "model_registry.yaml"


def default_duckdb_path() -> str:
    return os.environ.get("L2T_DUCKDB_PATH", str(DAGSTER_HOME / "l2t.duckdb"))


def make_duckdb() -> DuckDBResource:
    """The warehouse resource (``L2T_DUCKDB_PATH`` or ``dagster_home/l2t.duckdb``)."""
    path = default_duckdb_path()
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return DuckDBResource(database=path)


def default_storage_url() -> str:
    """``L2T_STORAGE_URL`` or ``dagster_home/storage``; a URL with credentials in it fails here, when
    the code location loads, before Dagster shows or records the resource's configuration."""
    url = os.environ.get("L2T_STORAGE_URL", str(DAGSTER_HOME / "storage"))
    return refuse_credentials(url, "L2T_STORAGE_URL")


def default_io_url() -> str:
    """``L2T_IO_URL`` or ``<L2T_STORAGE_URL>/assets`` (credentials in it refused, as for the storage)."""
    url = os.environ.get("L2T_IO_URL", "").strip() or default_storage_url().rstrip("/") + "/assets"
    return refuse_credentials(url, "L2T_IO_URL")


def make_io_manager() -> dg.FilesystemIOManager:
    """Dagster's ``FilesystemIOManager`` (a ``UPathIOManager``: a local path or any fsspec URL, s3fs
    reading its credentials from the environment) rooted at :func:`default_io_url`. Without it
    Dagster pickles outputs under the ``$DAGSTER_HOME/storage`` of the process that ran the step,
    which a later run in another pod (K8sRunLauncher) cannot read."""
    return dg.FilesystemIOManager(base_dir=default_io_url())


# a base model's name: a partition key of base_models and runs ('|' joins the runs' dimensions) and a
# directory name under the models directory ('.' and '..' would be the directory itself or its parent)
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

class L2TStorage(dg.ConfigurableResource):
    """Where training runs (fsspec URL) and base models (local directory) are stored."""

    url: str = Field(default_factory=default_storage_url,
                     description="Root of the run directories: a local path or an fsspec URL (s3://...), without "
                                 "credentials (those come from the environment).")
    models_dir: str = Field(default_factory=lambda: os.environ.get("L2T_MODELS_DIR", str(DAGSTER_HOME / "models")),
                            description="Local directory of base models.")

    def _root(self) -> str:
        """``url``, refused (:class:`~l2t_core.urls.CredentialsInURL`) when it has credentials in it."""
        return refuse_credentials(self.url, "L2TStorage.url (L2T_STORAGE_URL)")

    def run_url(self, base_model: str, method: str, config_hash: str) -> str:
        """The run directory of one training configuration of a (base model, method) partition."""
        return "/".join([self._root().rstrip("/"), "runs", base_model, method, config_hash])

    def model_dir(self, name: str) -> Path:
        return Path(self.models_dir) / name

    def evaluations_url(self, base_model: str) -> str:
        """Beside the run directories, where the evaluations of base model ``base_model`` are
        kept until they are stored (``<url>/base_models/<name>/evaluations``;
        ``l2t_pipeline.assets.kept_evaluation``)."""
        return "/".join([self._root().rstrip("/"), "base_models", base_model])

    def sample_journal(self, key: str) -> Path:
        """Where an evaluation kept under ``key`` (``l2t_pipeline.assets.kept_evaluation``) keeps
        its samples as it makes them, so that a step cut short resumes them
        (:mod:`l2t_core.eval.journal`): ``<models_dir>/.eval_samples/<key>.jsonl``, on the local
        disk (a shared volume under Kubernetes) whatever ``url`` is."""
        return Path(self.models_dir) / ".eval_samples" / f"{key}.jsonl"

    def run_storage(self, url: str) -> RunStorage:
        """A RunStorage on ``url``; s3fs picks its credentials and endpoint from the environment (a URL
        with credentials in it is refused, see :mod:`l2t_core.urls`)."""
        return RunStorage(url)

    def display(self, url: str) -> str:
        return redact_url(url)


class ModelEntry(dg.Config):
    """A registry entry: ``warmstart`` (the embedded default, built by SFT), ``pretrained`` (a
    local HF directory or a hub id in ``path``) or ``sft`` (the model in ``path`` fine-tuned by
    ``l2t sft`` on the traces in ``data``, with ``settings``)."""

    kind: Literal["warmstart", "pretrained", "sft"] = "pretrained"
    path: Optional[str] = None
    data: Optional[str] = Field(None, description="sft: the JSONL file of traces (a path, or a file name in "
                                                 "L2T_DATA_DIR).")
    settings: list[str] = Field(default_factory=list, description=(
        "sft: SFTConfig fields as key=value (e.g. 'steps=600', 'lr=1e-5', 'micro_batch_size=4')."))
    revision: Optional[str] = Field(None, min_length=1, description=(
        "pretrained or sft with a hub id in path: the branch, tag or commit (None: main). "
        "base_model pins it to the commit it is when materialized, and every later step uses that commit "
        "until base_model is materialized again."))
    follow: bool = Field(False, description=(
        "pretrained or sft with a hub id in path: the registry sensor requests base_model again when the "
        "revision (a branch or tag) has moved to another commit than the one pinned, so that a new upstream "
        "version gets its own baseline."))
    description: str = ""

    def hub_id(self) -> Optional[str]:
        """``path`` where it names a hub model (``org/name``, and no such local path), else None."""
        if self.kind == "warmstart" or not self.path or "://" in self.path or Path(self.path).expanduser().exists():
            return None
        return self.path if could_be_hub_id(self.path) else None

    def sft_config(self, out: str | Path, commit: Optional[str] = None):
        """The ``l2t_core.sft.SFTConfig`` of an ``sft`` entry, writing to ``out``, fine-tuning the
        hub model of ``path`` at ``commit`` (its revision pinned, :func:`l2t_core.hub.hub_commit`);
        a bad setting fails naming its field."""
        from l2t_core.config import apply_settings
        from l2t_core.sft import SFTConfig

        def local(value: Optional[str]) -> Optional[str]:  # an existing local path, made absolute: the
            p = Path(value).expanduser() if value else None  # launched process has another working directory
            return str(p.resolve()) if p is not None and p.exists() else value

        base = {"model": local(self.path), "model_revision": commit if self.hub_id() else None, "data": local(self.data),
                "out": str(Path(out).expanduser().resolve())}
        data = apply_settings(base, self.settings, "settings", example="steps=600")
        clash = sorted(set(base) & {item.split("=", 1)[0].strip() for item in self.settings})
        if clash:
            raise ValueError(f"settings {clash} are the entry's own fields: set 'path' (and 'revision') for the "
                             "model and 'data' for the traces; the output directory is the storage's models_dir/<name>")
        return SFTConfig.model_validate(data)


class ModelRegistry(dg.ConfigurableResource):
    """The model registry: a YAML file ``{models: {name: {kind, path, description}}}``."""

    path: str = Field(default_factory=lambda: os.environ.get("L2T_MODEL_REGISTRY", str(DEFAULT_REGISTRY)))

    def entries(self) -> dict[str, ModelEntry]:
        """Every registered model; a malformed file fails naming the file and the entry."""
        p = Path(self.path)
        if not p.is_file():
            raise FileNotFoundError(f"model registry {p} not found; set L2T_MODEL_REGISTRY or create it")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"model registry {p} is not valid YAML: {exc}") from None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise ValueError(f"model registry {p}: expected a mapping under 'models', got {type(models).__name__}")
        out = {}
        for name, entry in models.items():
            if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
                raise ValueError(f"model registry {p}: the name {name!r} cannot name a base model: it becomes a "
                                 "partition key (where '|' joins base model and method) and a directory under the "
                                 "models directory; use letters, digits, '.', '_' and '-', starting with a letter or "
                                 "digit")
            try:
                e = ModelEntry(**(entry or {}))
            except Exception as exc:  # noqa: BLE001 - name the entry
                raise ValueError(f"model registry {p}: entry {name!r} is invalid: {exc}") from exc
            if e.kind in ("pretrained", "sft") and not e.path:
                raise ValueError(f"model registry {p}: entry {name!r} of kind {e.kind!r} needs a 'path'")
            if e.follow and (e.hub_id() is None or COMMIT.fullmatch(e.revision or "")):
                raise ValueError(f"model registry {p}: entry {name!r} has 'follow: true', which watches a hub model's "
                                 "branch or tag for new commits, but "
                                 + (f"its path {e.path!r} is no hub id" if e.hub_id() is None else
                                    f"its revision {e.revision!r} is a commit, which never moves")
                                 + "; drop 'follow', or name a hub model and a branch or tag")
            if e.revision is not None and e.hub_id() is None:
                raise ValueError(f"model registry {p}: entry {name!r} has a 'revision' ({e.revision!r}), which names a "
                                 f"commit, branch or tag of a hub model, but its path {e.path!r} is no hub id "
                                 f"{'(it is a local path)' if e.path else '(a warm start has none)'}; drop the "
                                 "revision, or set path to the hub model ('org/name')")
            if e.kind == "sft":
                if not e.data:
                    raise ValueError(f"model registry {p}: entry {name!r} of kind 'sft' needs 'data' (a JSONL "
                                     "file of traces)")
                try:
                    e.sft_config(f"models/{name}")
                except ValueError as exc:  # pydantic's ValidationError is a ValueError
                    raise ValueError(f"model registry {p}: entry {name!r}: {exc}") from None
            # the path is logged, shown as metadata and stored with the evaluations: no credentials
            refuse_credentials(e.path, f"model registry {p}: entry {name!r}, path")
            refuse_credentials(e.data, f"model registry {p}: entry {name!r}, data")
            out[str(name)] = e
        return out

    def get(self, name: str) -> ModelEntry:
        entries = self.entries()
        if name not in entries:
            raise KeyError(f"base model {name!r} is not in the model registry {self.path}; "
                           f"registered: {', '.join(sorted(entries)) or '(none)'}")
        return entries[name]


class TrainingData(dg.ConfigurableResource):
    """The training prompts shared by ``datasets``, the base rollouts, the warm start and every
    training run (``l2t_core.config.DataConfig``; its defaults, so the synthetic task follows
    l2t_core's default)."""

    source: str = Field(default_factory=lambda: DataConfig().source,
                        description="A synthetic task (walk, arithmetic) or a math JSONL file in $L2T_DATA_DIR.")
    train_size: int = 2000
    min_steps: int = 1
    max_steps: int = 4
    seed: int = 0

    def to_core(self) -> DataConfig:
        return DataConfig(source=self.source, train_size=self.train_size, min_steps=self.min_steps,
                          max_steps=self.max_steps, seed=self.seed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TrainingData":
        """The training data of ``L2T_TRAINING_DATA`` (a synthetic task, or a math JSONL file: a
        name in ``$L2T_DATA_DIR`` or a path) and ``L2T_TRAINING_SIZE`` (prompts), else the
        defaults; a file that is not there fails when the code location loads, naming the variable
        (runs the sensor and schedule start take no launchpad config, so this is how they get it)."""
        from l2t_core.training_data import source_path

        env = os.environ if environ is None else environ
        kwargs: dict = {}
        source = env.get("L2T_TRAINING_DATA", "").strip()
        if source:
            if source not in TASKS:
                try:
                    source_path(source)
                except (OSError, ValueError) as exc:  # TrainingDataError is a ValueError
                    raise ValueError(f"L2T_TRAINING_DATA={source!r}: {exc}") from None
            kwargs["source"] = source
        size = env.get("L2T_TRAINING_SIZE", "").strip()
        if size:
            if not size.isdigit() or int(size) < 1:
                raise ValueError(f"L2T_TRAINING_SIZE={size!r} is not a number of training prompts (a whole number >= 1)")
            kwargs["train_size"] = int(size)
        return cls(**kwargs)

    @property
    def synthetic(self) -> bool:
        """True for a procedural task of l2t_core.tasks (the embedded default can warm-start on it)."""
        return self.source in TASKS

    @property
    def dataset_name(self) -> str:
        return f"{self.source}_train" if self.synthetic else self.source.removesuffix(".jsonl")


def settings_fingerprint(benchmark: str, settings: dict) -> str:
    """``<benchmark>:<10 hex digits>``, a hash of the evaluation settings (JSON, sorted keys)."""
    blob = json.dumps(settings, sort_keys=True)
    return f"{benchmark}:{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


class Evaluator(dg.ConfigurableResource):
    """The evaluation boundary of ``datasets``, ``base_model`` and ``benchmark_reports``.

    An evaluator names its ``benchmark``, lists its problems (:meth:`problem_rows`, ``problems``
    rows) and evaluates a saved model (:meth:`evaluate`: rows per level or group plus
    ``level='all'``, the columns of :class:`~l2t_pipeline.schemas.EvalResultsSchema` without the
    model columns). :meth:`fingerprint` identifies every setting that changes the results, so
    stored results with an equal fingerprint can be reused and compared. Two implementations:
    :class:`HeldOutEvaluator` and :class:`BenchmarkEvaluator`.
    """

    @property
    def benchmark(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must define the benchmark property")

    def settings(self) -> dict:
        """Every setting that changes the results (the input of :meth:`fingerprint`)."""
        raise NotImplementedError(f"{type(self).__name__} must define settings()")

    def fingerprint(self, offline: bool = False) -> str:
        """Identifies the evaluation settings: results with equal fingerprints are comparable.
        ``offline``: from local data only, downloading nothing (a schedule's tick); an evaluator
        whose data is not local yet raises there."""
        return settings_fingerprint(self.benchmark, self.settings())

    def problem_rows(self) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} must define problem_rows()")

    def evaluate(self, model_dir: str | Path, journal=None) -> pd.DataFrame:
        """The rows of the model in ``model_dir``. ``journal``: a
        :class:`~l2t_core.eval.journal.SampleJournal` that keeps the samples as they are made, for
        an evaluator that samples (one cut short then resumes them), or None."""
        raise NotImplementedError(f"{type(self).__name__} must define evaluate(model_dir, journal=None)")

    def check_base_model(self, base_model: str, task: str) -> None:
        """Raise when ``base_model``, trained on ``task`` (the training data's source: a synthetic
        task or a data file), cannot be evaluated here; any model can be evaluated on real
        benchmarks."""


def _takes(method, keyword: str) -> bool:
    """Whether ``method`` accepts the keyword argument ``keyword``."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def evaluate_model(evaluator: Evaluator, model_dir: str | Path, journal=None) -> pd.DataFrame:
    """``evaluator.evaluate(model_dir, journal=journal)``; without the journal for an evaluator
    written against the earlier ``evaluate(model_dir)`` (it then keeps no samples)."""
    if _takes(evaluator.evaluate, "journal"):
        return evaluator.evaluate(model_dir, journal=journal)
    return evaluator.evaluate(model_dir)


def offline_fingerprint(evaluator: Evaluator) -> str:
    """``evaluator.fingerprint(offline=True)``; plain ``fingerprint()`` for an evaluator that
    overrides it without ``offline`` (its own, which the caller cannot keep from downloading)."""
    if _takes(evaluator.fingerprint, "offline"):
        return evaluator.fingerprint(offline=True)
    return evaluator.fingerprint()


class HeldOutEvaluator(Evaluator):
    """Greedy evaluation on a synthetic task's held-out split (``l2t_core.warmstart.evaluate``).

    The default evaluator; :class:`BenchmarkEvaluator` replaces it for the real benchmarks of
    ``l2t_core.eval`` (``L2T_EVALUATOR=benchmark``).
    """

    task: str = Field(default_factory=lambda: DataConfig().source,
                      description="The synthetic task (walk, arithmetic); must be the base models' task.")
    levels: list[int] = Field(default_factory=lambda: list(LEVELS))
    per_level: int = 10
    max_new_tokens: int = 200
    batch_size: int = 64

    @property
    def benchmark(self) -> str:
        return f"{self.task}_heldout"

    def problems(self) -> list:
        """The held-out problems (never in any training set of the task)."""
        from l2t_core.warmstart import held_out

        if self.task not in TASKS:
            raise ValueError(f"HeldOutEvaluator: {self.task!r} is not a synthetic task ({', '.join(TASKS)})")
        return held_out(tuple(self.levels), self.per_level, task=self.task)

    def problem_rows(self) -> pd.DataFrame:
        """The evaluation problems as ``problems`` rows (split ``heldout``)."""
        task = get_task(self.task)
        return pd.DataFrame([{"dataset": self.benchmark, "split": "heldout", "problem_id": p.id,
                              "prompt": task.build_task_prompt(p), "answer": p.answer, "level": p.level}
                             for p in self.problems()])

    def settings(self) -> dict:
        return {"benchmark": self.benchmark, "levels": self.levels, "per_level": self.per_level,
                "max_new_tokens": self.max_new_tokens}

    def check_base_model(self, base_model: str, task: str) -> None:
        """The models must learn the task whose held-out split is evaluated."""
        if self.task == task:
            return
        if task not in TASKS:
            raise ValueError(f"base model {base_model!r} trains on {task!r} (training_data.source), but the evaluator "
                             f"tests the synthetic task {self.task!r} on its held-out split, which says nothing of "
                             "that model; set L2T_EVALUATOR=benchmark to evaluate on real benchmarks")
        raise ValueError(f"base model {base_model!r} learns the task {task!r} but the evaluator "
                         f"tests {self.task!r}; set both resources to the same task")

    def evaluate(self, model_dir: str | Path, journal=None) -> pd.DataFrame:
        """Overall (``level='all'``) and per-level results of the model in ``model_dir``; greedy
        and short, so nothing is journaled (``journal`` is not used)."""
        from l2t_core.models import load_policy
        from l2t_core.warmstart import evaluate

        model, tok = load_policy(model_dir)
        model.eval()
        summary = evaluate(model, tok, self.problems(), self.max_new_tokens, self.batch_size)
        return summary_rows(summary, self.benchmark, self.fingerprint())


def summary_rows(summary: dict, benchmark: str, evaluator: str) -> pd.DataFrame:
    """Rows of an ``l2t_core.warmstart.evaluate`` summary: ``level='all'`` then one per level."""
    cols = ("n", "accuracy", "mean_tokens", "mean_episodes", "tagged_share", "finished_share", "redundant_share")
    rows = [{"level": "all", **{c: summary[c] for c in cols}}]
    rows += [{"level": lv, **{c: s[c] for c in cols}} for lv, s in summary["per_level"].items()]
    df = pd.DataFrame(rows)
    df["benchmark"] = benchmark
    df["evaluator"] = evaluator
    return df


# environment variable -> BenchmarkEvaluator field (BenchmarkEvaluator.from_env)
BENCHMARK_EVAL_ENV = {
    "L2T_EVAL_BENCHMARKS": "benchmarks", "L2T_EVAL_LIMIT": "limit", "L2T_EVAL_MAX_NEW_TOKENS": "max_new_tokens",
    "L2T_EVAL_N": "n", "L2T_EVAL_TEMPERATURE": "temperature", "L2T_EVAL_TOP_P": "top_p", "L2T_EVAL_SEED": "seed",
    "L2T_EVAL_ENGINE": "engine", "L2T_EVAL_DEVICE": "device",
    "L2T_EVAL_VLLM_GPU_MEMORY_UTILIZATION": "vllm_gpu_memory_utilization",
}
ROLLOUT_ENGINES = ("hf", "vllm")


class BenchmarkEvaluator(Evaluator):
    """Evaluation on real math benchmarks (``l2t_core.eval``): the problems of ``benchmarks``
    (``load_benchmark``: the curated file in ``$L2T_DATA_DIR``, else a hub copy cached there, else
    a download from the Hugging Face hub), ``n`` samples per problem through a rollout engine,
    verified against every accepted answer (``evaluate_math``), and one row per level / tier
    plus ``'all'`` (``l2t_core.eval.runner.group_rows``).

    The default is greedy (``n=1``, ``temperature=0``); METHOD.md §7's protocol is ``n=20``,
    ``temperature=0.6``, ``top_p=0.95``. ``limit`` evaluates the first problems of each benchmark
    (quick runs, tests). Every setting that changes the results, and the problems themselves,
    enter :meth:`fingerprint`.
    """

    benchmarks: list[str] = Field(default_factory=lambda: ["math500"],
                                  description="Math benchmarks of l2t_core.eval.datasets (math500, aime24, ...).")
    limit: Optional[int] = Field(None, description="First N problems of each benchmark (None: all of them).")
    n: int = Field(1, description="Samples per problem (accuracy is pass@1, their mean correctness).")
    temperature: float = Field(0.0, description="Sampling temperature; 0 is greedy decoding.")
    top_p: float = Field(EvalSettings.top_p, description="Nucleus sampling threshold, in (0, 1].")
    max_new_tokens: int = Field(EvalSettings.max_new_tokens, description="Token budget of each response.")
    seed: int = 0
    prompts_per_call: int = Field(EvalSettings.prompts_per_call,
                                  description="Problems per engine call (call s is seeded seed + s).")
    verify_workers: int = Field(1, description="Processes verifying answers (1: in process).")
    verify_timeout_s: float = Field(EvalSettings.verify_timeout_s, description="Time limit of one verification.")
    engine: str = Field("hf", description="Rollout engine: hf (transformers, any device) or vllm (GPU).")
    device: str = Field("cpu", description="Device of the loaded model (cpu, cuda) for the hf engine; with vllm "
                                           "the transformers copy stays on the CPU and vLLM has the GPU.")
    vllm_gpu_memory_utilization: float = Field(0.9, description="vllm engine: share of the GPU's memory it takes "
                                                                 "(evaluation has the GPU to itself), in (0, 1].")
    data_dir: Optional[str] = Field(None, description="Benchmark directory (None: $L2T_DATA_DIR).")
    allow_download: bool = Field(True, description="Download a benchmark missing from the data directory "
                                                   "from the Hugging Face hub (cached there).")

    @property
    def benchmark(self) -> str:
        return "+".join(self.benchmarks)

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Fail before any compute on a bad setting, naming the field and how to fix it."""
        from l2t_core.eval.datasets import BENCHMARKS

        math = [name for name, spec in BENCHMARKS.items() if spec.kind == "math"]
        if not self.benchmarks:
            raise ValueError(f"BenchmarkEvaluator.benchmarks is empty; name at least one of {', '.join(math)}")
        for name in self.benchmarks:
            if name not in BENCHMARKS:
                raise ValueError(f"BenchmarkEvaluator.benchmarks: unknown benchmark {name!r}; choose from the math "
                                 f"benchmarks of l2t_core.eval.datasets: {', '.join(math)}")
            if BENCHMARKS[name].kind != "math":
                raise ValueError(f"BenchmarkEvaluator.benchmarks: {name!r} is a {BENCHMARKS[name].kind} benchmark; "
                                 f"this evaluator scores math benchmarks ({', '.join(math)}); evaluate "
                                 f"{name} with `l2t eval --benchmarks {name}`")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"BenchmarkEvaluator.benchmarks lists a benchmark twice: {self.benchmarks}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"BenchmarkEvaluator.limit must be a positive number of problems per benchmark, got "
                             f"{self.limit}; use None (unset L2T_EVAL_LIMIT) to evaluate every problem")
        if self.engine not in ROLLOUT_ENGINES:
            raise ValueError(f"BenchmarkEvaluator.engine {self.engine!r} is not a rollout engine; use 'hf' "
                             "(transformers, any device) or 'vllm' (a GPU and the gpu extra)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"BenchmarkEvaluator.device {self.device!r} (L2T_EVAL_DEVICE) is not a device; use 'cpu', "
                             "'cuda' or 'cuda:N'")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"BenchmarkEvaluator.vllm_gpu_memory_utilization must be a share of the GPU's memory "
                             f"in (0, 1], got {self.vllm_gpu_memory_utilization}")
        self.eval_settings()

    def eval_settings(self) -> EvalSettings:
        """The sampling settings of ``evaluate_math`` (texts kept: episodes are counted on them)."""
        try:
            return EvalSettings(n=self.n, temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, seed=self.seed,
                                prompts_per_call=self.prompts_per_call, verify_workers=self.verify_workers,
                                verify_timeout_s=self.verify_timeout_s, keep_text=True)
        except ValueError as exc:
            raise ValueError(f"BenchmarkEvaluator: {exc} (the field of the same name)") from exc

    def setup_for_execution(self, context) -> None:
        """Dagster calls this before a run uses the resource: bad settings fail the run at once."""
        self.check()

    # ------------------------------------------------------------------ data
    def items(self, offline: bool = False) -> list:
        """The validated problems of every benchmark, in order (the first ``limit`` of each);
        ``offline``: never downloaded, whatever ``allow_download`` says."""
        from l2t_core.eval.datasets import DatasetError, load_benchmark

        self.check()
        items = []
        for name in self.benchmarks:
            try:
                items += load_benchmark(name, self.data_dir, allow_download=self.allow_download and not offline,
                                        limit=self.limit)
            except DatasetError as exc:
                how = ("read from local data only here, downloading nothing whatever allow_download says: the "
                       "steps that evaluate download a missing set" if offline and self.allow_download else
                       "allow_download fetches a missing set from the hub")
                raise DatasetError(f"BenchmarkEvaluator cannot load benchmark {name!r}: {exc} (the evaluator's "
                                   f"data_dir field overrides L2T_DATA_DIR; {how})") from exc
        return items

    def problem_rows(self) -> pd.DataFrame:
        """The evaluated problems as ``problems`` rows (split ``test``, dataset = the benchmark),
        with the prompt the model sees (``l2t_core.eval.runner.prompt_text``, as evaluate_math)."""
        from l2t_core.eval.runner import prompt_text

        df = pd.DataFrame([{"dataset": i.benchmark, "split": "test", "problem_id": i.id,
                            "prompt": prompt_text(i), "answer": i.answer, "level": i.level}
                           for i in self.items()])
        df["level"] = df["level"].astype("Int64")
        return df

    def settings(self, items: Optional[list] = None) -> dict:
        """Every setting that changes the results, and a digest of the problems (so a changed
        data file or hub copy changes the fingerprint); ``items`` saves reloading them."""
        items = self.items() if items is None else items
        problems = json.dumps([[i.benchmark, i.id, i.problem, list(i.accepted_answers)] for i in items])
        keys = ("benchmarks", "limit", "n", "temperature", "top_p", "max_new_tokens", "seed", "prompts_per_call",
                "verify_timeout_s", "engine", "device")
        return {**{k: getattr(self, k) for k in keys}, "problems": hashlib.sha1(problems.encode()).hexdigest()}

    def fingerprint(self, offline: bool = False) -> str:
        return settings_fingerprint(self.benchmark, self.settings(self.items(offline=offline)))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model_dir: str | Path, journal=None) -> pd.DataFrame:
        """Overall (``level='all'``) and per-group results of the model in ``model_dir``, loaded
        through ``l2t_core.rollout.load_engine``; each engine call's samples kept in ``journal``
        (a :class:`~l2t_core.eval.journal.SampleJournal`) as made, where one is given."""
        from l2t_core.eval.runner import evaluate_math, group_rows
        from l2t_core.rollout import load_engine

        items = self.items()
        engine, tok = load_engine(self.engine, model_dir, self.device,
                                  gpu_memory_utilization=self.vllm_gpu_memory_utilization)
        result = evaluate_math(engine, tok, items, self.eval_settings(), journal=journal)
        rows = group_rows(result.rows)
        rows["benchmark"] = self.benchmark
        rows["evaluator"] = settings_fingerprint(self.benchmark, self.settings(items))
        return rows

    # ------------------------------------------------------------------ from the environment
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "BenchmarkEvaluator":
        """The evaluator of ``L2T_EVALUATOR=benchmark``: ``L2T_EVAL_BENCHMARKS`` (comma-separated,
        default math500), ``L2T_EVAL_LIMIT``, ``L2T_EVAL_MAX_NEW_TOKENS``, ``L2T_EVAL_N``,
        ``L2T_EVAL_TEMPERATURE``, ``L2T_EVAL_TOP_P``, ``L2T_EVAL_SEED``, ``L2T_EVAL_ENGINE``,
        ``L2T_EVAL_DEVICE``, ``L2T_EVAL_VLLM_GPU_MEMORY_UTILIZATION``; unset ones keep the field's default. Checked here, so a bad value
        fails when the code location loads, naming the variable."""
        env = os.environ if environ is None else environ
        kwargs: dict = {}
        for var, field in BENCHMARK_EVAL_ENV.items():
            raw = env.get(var, "").strip()
            if raw:
                kwargs[field] = _parse_env_value(var, field, raw)
        evaluator = cls(**kwargs)
        try:
            evaluator.check()
        except ValueError as exc:
            given = ", ".join(f"{v}={env[v]!r}" for v, f in BENCHMARK_EVAL_ENV.items() if f in kwargs)
            raise ValueError(f"{exc} [from the environment: {given or 'no L2T_EVAL_* variable set'}]") from exc
        return evaluator


def _parse_env_value(var: str, field: str, raw: str):
    """The value of ``BenchmarkEvaluator.<field>`` written as ``raw`` in the variable ``var``."""
    if field == "benchmarks":
        return [b.strip() for b in raw.split(",") if b.strip()]
    if field in ("limit", "max_new_tokens", "n", "seed"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a whole number "
                             f"(BenchmarkEvaluator.{field}, e.g. {var}=4)") from None
    if field in ("temperature", "top_p", "vllm_gpu_memory_utilization"):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a number (BenchmarkEvaluator.{field}, e.g. {var}=0.6)") from None
    return raw


# the shipped ZeRO-2 config, beside the package in a checkout or an editable install
LOCAL_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "deepspeed" / "zero2.json"


def stop_process_group(process: subprocess.Popen, grace_s: float, log=None) -> None:
    """End ``process`` (started in a session of its own) and every process of its group: SIGINT
    first (the trainer stops as after Ctrl-C; torchrun passes it to its ranks), then, whatever is
    left after ``grace_s``, SIGKILL. A checkpoint is written atomically, so a kill mid-write leaves
    the previous one."""
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        if log is not None:
            log.warning(f"[pipes] the subprocess did not stop within {grace_s:g} s of SIGINT; killing its process group")
    with contextlib.suppress(ProcessLookupError):  # ranks or workers it left behind, or itself
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class StderrTail:
    """Passes a child process's stderr (a pipe) through to this process's stderr as it comes, so it
    lands in the step's compute logs as before, and keeps its last ``keep`` bytes: what a failed
    step's message quotes (the exception, torchrun's summary of the failed rank)."""

    def __init__(self, pipe, keep: int = 16384):
        import codecs
        import threading

        self._pipe, self._keep, self._tail = pipe, keep, b""
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._thread = threading.Thread(target=self._pump, name="l2t-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            fd = self._pipe.fileno()
            while chunk := os.read(fd, 65536):
                self._tail = (self._tail + chunk)[-self._keep:]
                with contextlib.suppress(Exception):  # a closed or odd sys.stderr must not stop the draining
                    sys.stderr.write(self._decode.decode(chunk))
                    sys.stderr.flush()
        finally:
            self._pipe.close()

    def drain(self, wait_s: float = 5.0) -> None:
        """Wait until the pipe is drained and passed on (at most ``wait_s``: a process the child
        left behind may hold it open), so the job's last words reach the compute logs before the
        step ends."""
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            with contextlib.suppress(Exception):
                sys.stderr.write(self._decode.decode(b"", final=True))
                sys.stderr.flush()

    def last_lines(self, n: int = 15) -> str:
        """The last ``n`` non-empty lines written (call :meth:`drain` first)."""
        lines = [ln.rstrip() for ln in self._tail.decode("utf-8", "replace").splitlines() if ln.strip()]
        return "\n".join(lines[-n:])


def exit_summary(code: int) -> str:
    """How a process ended, in words: its exit code, or the signal that ended it."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (SIGKILL: maybe the out-of-memory killer; see the kernel log)" if -code == signal.SIGKILL else ""
    return f"was ended by {name}{hint}"


class ProcessGroupPipesClient(dg.PipesClient):
    """Runs a command through Dagster Pipes, as ``dg.PipesSubprocessClient`` does, in a process
    group of its own, so that an interrupted Dagster run (cancelled in the UI, a step stopped) ends
    the whole job: SIGINT, then SIGKILL for what is left after ``termination_timeout_seconds``
    (:func:`stop_process_group`). ``PipesSubprocessClient`` sends SIGINT to its child alone and
    stops waiting after its timeout, so a trainer that ignores it, or the ranks of a torchrun,
    would run on beside a relaunch into the same run directory. A step process killed outright
    (``kill -9``) cannot stop anything: the job watches it and stops itself
    (:mod:`l2t_core.launcher_watch`, :data:`~l2t_core.launcher_watch.WATCH_ENV`)."""

    def __init__(self, env: Mapping[str, str] | None = None, cwd: str | None = None,
                 termination_timeout_seconds: float = 30.0):
        self.env, self.cwd = dict(env or {}), cwd
        self.termination_timeout_seconds = termination_timeout_seconds

    def run(self, *, context, command: Sequence[str], extras=None) -> dg.PipesClientCompletedInvocation:  # type: ignore[override]
        with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                                   message_reader=dg.PipesTempFileMessageReader(), extras=extras) as session:
            env = {**os.environ, **self.env, **session.get_bootstrap_env_vars()}
            if os.getpid() != 1:  # the job stops itself if this process is killed outright (l2t_core.launcher_watch);
                env[WATCH_ENV] = str(os.getpid())  # a container's pid 1 takes every process with it
            process = subprocess.Popen(list(command), cwd=self.cwd, start_new_session=True, stderr=subprocess.PIPE,
                                       env=env)
            stderr = StderrTail(process.stderr)
            try:
                code = process.wait()
            except BaseException:  # the run was interrupted (DagsterExecutionInterruptedError), or this process is ending
                context.log.info("[pipes] execution interrupted: stopping the subprocess and its process group")
                stop_process_group(process, self.termination_timeout_seconds, context.log)
                raise
            finally:
                stderr.drain()
            if code != 0:
                tail = stderr.last_lines()
                said = f"; the end of its stderr (all of it is in this step's compute logs):\n{tail}" if tail else \
                    "; it wrote nothing to stderr"
                raise dg.Failure(f"the subprocess ({' '.join(command[:6])} ...) {exit_summary(code)}{said}")
        return dg.PipesClientCompletedInvocation(session)


class TrainingLauncher(dg.ConfigurableResource):
    """Launches ``python -m l2t_core.cli train --config FILE`` through Dagster Pipes
    (:class:`ProcessGroupPipesClient`: a cancelled run ends the whole job); the entrypoint reports back through ``l2t_core.pipes``. With
    ``nproc_per_node`` > 1 the same entrypoint runs under ``torchrun`` (``torch.distributed.run``),
    one process per GPU, for a DeepSpeed run (``engine: deepspeed``); rank 0 reports to Dagster.
    The Kubernetes variant (``l2t_pipeline.k8s``, PipesK8sClient) implements the same ``launch``."""

    python: str = Field(default_factory=lambda: sys.executable, description="Interpreter with l2t_core installed.")
    torch_threads: int = Field(1, ge=1, description="OMP/torch threads of the training process.")
    nproc_per_node: int = Field(1, ge=1, description="Training processes (GPUs) on this machine; > 1 launches "
                                                     "torchrun and needs engine 'deepspeed'.")
    master_port: Optional[int] = Field(None, ge=1, le=65535, description=(
        "torchrun's rendezvous port (nproc_per_node > 1); None: torchrun --standalone takes a free one, so runs "
        "launched side by side on one machine do not collide."))
    deepspeed_config: str = Field(str(LOCAL_DEEPSPEED_CONFIG), description=(
        "The DeepSpeed config of a run on nproc_per_node > 1 processes whose config names none (the torch "
        "engine trains in one process)."))
    cwd: Optional[str] = None

    def placed_config(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` as this launcher runs it: unchanged in one process; on several, with the DeepSpeed
        engine and ``deepspeed_config`` unless the config already names DeepSpeed."""
        if self.nproc_per_node == 1 or cfg.engine != "torch":
            return cfg
        data = json.loads(cfg.model_dump_json())
        data.update(engine="deepspeed", deepspeed_config=self.deepspeed_config)
        return TrainConfig.model_validate(data)

    def command(self, config_path: str | Path, log_dir: str | Path | None = None) -> list[str]:
        """The training command; under torchrun, ``log_dir`` is torchrun's ``--log-dir``: its per-rank
        error files, which it also prints when a rank fails (without one torchrun makes a
        ``torchelastic_*`` directory in the system temp dir and leaves it there)."""
        entry = ["-m", "l2t_core.cli", "train", "--config", str(config_path)]
        if self.nproc_per_node == 1:
            return [self.python, *entry]
        logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
        rendezvous = (["--standalone"] if self.master_port is None else
                      ["--master_addr", "127.0.0.1", "--master_port", str(self.master_port)])
        return [self.python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc_per_node),
                *rendezvous, *logs, *entry]

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse, before launching, a configuration this launcher cannot run."""
        if self.nproc_per_node > 1 and cfg.engine != "deepspeed":
            raise ValueError(f"TrainingLauncher.nproc_per_node={self.nproc_per_node} runs one training process per "
                             f"GPU, which needs engine 'deepspeed' (the run's engine is {cfg.engine!r}); set "
                             "engine: deepspeed with a deepspeed_config, or nproc_per_node: 1")

    def _client(self) -> "ProcessGroupPipesClient":
        env = {"OMP_NUM_THREADS": str(self.torch_threads), "MKL_NUM_THREADS": str(self.torch_threads),
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        return ProcessGroupPipesClient(env=env, cwd=self.cwd or str(REPO_ROOT))

    def launch(self, context: dg.AssetExecutionContext, cfg: TrainConfig) -> dg.PipesClientCompletedInvocation:
        """Write ``cfg`` to a temporary YAML file and run the training entrypoint on it."""
        self.check_config(cfg)
        with tempfile.TemporaryDirectory(prefix="l2t-train-") as tmp:
            path = Path(tmp) / "train.yaml"
            path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
            return self._client().run(command=self.command(path, log_dir=Path(tmp) / "torchrun"), context=context)

    def sft_command(self, config_path: str | Path) -> list[str]:
        """``l2t sft`` on ``config_path``: one process whatever ``nproc_per_node`` (SFT is not distributed)."""
        return [self.python, "-m", "l2t_core.cli", "sft", "--config", str(config_path), "-q"]

    def launch_sft(self, context: dg.AssetExecutionContext, cfg) -> dg.PipesClientCompletedInvocation:
        """Run ``l2t sft`` on an ``l2t_core.sft.SFTConfig`` in a subprocess through Dagster Pipes
        (its log lines stream to the run's compute logs)."""
        with tempfile.TemporaryDirectory(prefix="l2t-sft-") as tmp:
            path = Path(tmp) / "sft.yaml"
            path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
            return self._client().run(command=self.sft_command(path), context=context)
