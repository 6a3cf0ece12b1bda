"""Resources of the L2T code location: DuckDB, run storage, the model registry, the training data,
the evaluator and the job launcher.

Defaults (all overridable through the environment):

* ``L2T_DUCKDB_PATH``: the DuckDB file, default ``dagster_home/l2t.duckdb``;
* ``L2T_STORAGE_URL``: where training runs live, a local directory (default
  ``dagster_home/storage``) or any fsspec URL such as ``s3://bucket/l2t``; for S3, s3fs reads the
  credentials and ``AWS_ENDPOINT_URL`` from the environment; they are never logged or stored;
* ``L2T_MODELS_DIR``: local directory of base models, default ``dagster_home/models``;
* ``L2T_MODEL_REGISTRY``: the model registry YAML, default ``l2t_pipeline/model_registry.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
import pandas as pd
import yaml
from dagster_duckdb import DuckDBResource
from pydantic import Field

from l2t_core.checkpoint import RunStorage
from l2t_core.config import DataConfig, TrainConfig
from l2t_core.tasks import TASKS, get_task

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


# query parameters whose values are credentials: presigned S3 URLs (X-Amz-Credential, -Signature,
# -Security-Token), Azure SAS (sig), OAuth/API tokens and keys
_SECRET_PARAM = re.compile(r"secret|token|passw|pwd|signature|credential|^sig$|api[-_]?key|access[-_]?key|^key$|auth",
                           re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` safe to log or show: without its user/password part, and with the values of query
    parameters that carry credentials (``X-Amz-Signature``, ``token``, ``sig``, ...) replaced by
    ``REDACTED``; the rest is kept as written (host case, IPv6 brackets, escapes).

    ``user:password@`` is removed even when the password holds characters a URL should have
    escaped, as AWS secret keys do (``/``, ``+``; also ``?``, ``#``, ``@``): after a ``user:``
    prefix, everything up to the last ``@`` goes. A URL that is not ambiguous about it is shown
    whole; one that is (``https://host:9000/a@b``: a port, or a password that starts with digits
    and a ``/``?) is shown shortened (``https://b``) rather than risk showing a credential."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    first_at = rest.find("@")
    if first_at != -1:
        before = rest[:first_at]
        user, colon, _ = before.partition(":")
        authority = rest[: min([i for i in (rest.find(c) for c in "/?#") if i != -1], default=len(rest))]
        if colon and "/" not in user:
            rest = rest[rest.rindex("@") + 1:]  # user:password@ with any characters in the password
        elif "@" in authority:
            rest = rest[authority.rindex("@") + 1:]  # a standard userinfo (a token, user:password)
    head, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        params = []
        for param in query.split("&"):
            name, eq, _value = param.partition("=")
            params.append(f"{name}=REDACTED" if eq and _SECRET_PARAM.search(name) else param)
        rest = head + "?" + "&".join(params) + hash_ + fragment
    return f"{scheme}://{rest}"


class L2TStorage(dg.ConfigurableResource):
    """Where training runs (fsspec URL) and base models (local directory) are stored."""

    url: str = Field(default_factory=lambda: os.environ.get("L2T_STORAGE_URL", str(DAGSTER_HOME / "storage")),
                     description="Root of the run directories: a local path or an fsspec URL (s3://...).")
    models_dir: str = Field(default_factory=lambda: os.environ.get("L2T_MODELS_DIR", str(DAGSTER_HOME / "models")),
                            description="Local directory of base models.")

    def run_url(self, base_model: str, method: str, config_hash: str) -> str:
        """The run directory of one training configuration of a (base model, method) partition."""
        return "/".join([self.url.rstrip("/"), "runs", base_model, method, config_hash])

    def model_dir(self, name: str) -> Path:
        return Path(self.models_dir) / name

    def run_storage(self, url: str) -> RunStorage:
        """A RunStorage on ``url``; s3fs picks its credentials and endpoint from the environment."""
        return RunStorage(url)

    def display(self, url: str) -> str:
        return redact_url(url)


class ModelEntry(dg.Config):
    """A registry entry: ``warmstart`` (the embedded default, built by SFT) or ``pretrained``
    (a local HF directory or a hub id in ``path``)."""

    kind: Literal["warmstart", "pretrained"] = "pretrained"
    path: Optional[str] = None
    description: str = ""


class ModelRegistry(dg.ConfigurableResource):
    """The model registry: a YAML file ``{models: {name: {kind, path, description}}}``."""

    path: str = Field(default_factory=lambda: os.environ.get("L2T_MODEL_REGISTRY", str(DEFAULT_REGISTRY)))

    def entries(self) -> dict[str, ModelEntry]:
        """Every registered model; a malformed file fails naming the file and the entry."""
        p = Path(self.path)
        if not p.is_file():
            raise FileNotFoundError(f"model registry {p} not found; set L2T_MODEL_REGISTRY or create it")
        data = yaml.safe_load(p.read_text()) or {}
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise ValueError(f"model registry {p}: expected a mapping under 'models', got {type(models).__name__}")
        out = {}
        for name, entry in models.items():
            try:
                e = ModelEntry(**(entry or {}))
            except Exception as exc:  # noqa: BLE001 - name the entry
                raise ValueError(f"model registry {p}: entry {name!r} is invalid: {exc}") from exc
            if e.kind == "pretrained" and not e.path:
                raise ValueError(f"model registry {p}: entry {name!r} of kind 'pretrained' needs a 'path'")
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

    @property
    def synthetic(self) -> bool:
        """True for a procedural task of l2t_core.tasks (the embedded default can warm-start on it)."""
        return self.source in TASKS

    @property
    def dataset_name(self) -> str:
        return f"{self.source}_train" if self.synthetic else self.source.removesuffix(".jsonl")


class HeldOutEvaluator(dg.ConfigurableResource):
    """Greedy evaluation on a synthetic task's held-out split (``l2t_core.warmstart.evaluate``).

    The evaluation boundary of ``datasets``, ``base_model`` and ``benchmark_reports``: any
    resource with the same ``benchmark``, ``fingerprint()``, ``problem_rows()`` and
    ``evaluate(model_dir) -> DataFrame`` (rows per level plus ``'all'``, the columns of
    :class:`~l2t_pipeline.schemas.EvalResultsSchema` without the model columns) can replace it,
    e.g. one over the real benchmarks of ``l2t_core.eval``.
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

    def fingerprint(self) -> str:
        """Identifies the evaluation settings: results with equal fingerprints are comparable."""
        blob = json.dumps({"benchmark": self.benchmark, "levels": self.levels, "per_level": self.per_level,
                           "max_new_tokens": self.max_new_tokens}, sort_keys=True)
        return f"{self.benchmark}:{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    def evaluate(self, model_dir: str | Path) -> pd.DataFrame:
        """Overall (``level='all'``) and per-level results of the model in ``model_dir``."""
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


class TrainingLauncher(dg.ConfigurableResource):
    """Launches ``python -m l2t_core.cli train --config FILE`` through Dagster Pipes
    (``PipesSubprocessClient``); the entrypoint reports back through ``l2t_core.pipes``.
    A Kubernetes variant (PipesK8sClient) would implement the same ``launch``."""

    python: str = Field(default_factory=lambda: sys.executable, description="Interpreter with l2t_core installed.")
    torch_threads: int = Field(1, ge=1, description="OMP/torch threads of the training process.")
    cwd: Optional[str] = None

    def placed_config(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` as this launcher runs it: a local process runs it unchanged."""
        return cfg

    def command(self, config_path: str | Path) -> list[str]:
        return [self.python, "-m", "l2t_core.cli", "train", "--config", str(config_path)]

    def launch(self, context: dg.AssetExecutionContext, cfg: TrainConfig) -> dg.PipesClientCompletedInvocation:
        """Write ``cfg`` to a temporary YAML file and run the training entrypoint on it."""
        env = {"OMP_NUM_THREADS": str(self.torch_threads), "MKL_NUM_THREADS": str(self.torch_threads),
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        client = dg.PipesSubprocessClient(env=env, cwd=self.cwd or str(REPO_ROOT))
        with tempfile.TemporaryDirectory(prefix="l2t-train-") as tmp:
            path = Path(tmp) / "train.yaml"
            path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
            return client.run(command=self.command(path), context=context)
