"""pandera schemas of the pipeline's tables, their Dagster types, and validation with quarantine.

Every table the pipeline writes to DuckDB has a :class:`pandera.pandas.DataFrameModel` here. The
models are used three ways:

* as Dagster types (``dagster_pandera.pandera_schema_to_dagster_type``) on asset outputs, so the
  UI shows the schema and a returned frame is type-checked;
* by :func:`find_violations` (through ``warehouse.write_validated``) before any write, together
  with a check that every text cell is valid Unicode (:func:`unencodable_text`) and that no value
  would be changed by the schemas' coercion instead of refused (:func:`lossy_values`: a fraction
  in an integer column, a number in a text column, an infinite float): a violation
  copies the failing rows into the ``quarantine`` table (with the reasons) and fails the step with
  those rows shown; nothing is silently dropped and nothing invalid reaches the main tables;
* by the asset checks (``l2t_pipeline.checks``), which re-validate what is stored.

Column names match the DuckDB DDL in :mod:`l2t_pipeline.warehouse` (a test keeps them in sync).
"""

from __future__ import annotations

import warnings
from typing import Optional

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
from dagster_pandera import pandera_schema_to_dagster_type
from pandera.typing import Series

from l2t_core.config import METHOD_NAMES

SEGMENTATION_STATUSES = ["tagged", "fallback", "malformed", "empty"]
SOURCES = ["base", "train"]


def _encodable(value) -> bool:
    """False for a string that UTF-8 cannot encode (a lone surrogate, e.g. from a JSON ``\\ud800``
    escape or bytes decoded with ``surrogateescape``); DuckDB refuses such text mid-insert."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


UNENCODABLE_CHECK = "valid_unicode (UTF-8 encodable text: no lone surrogates)"


def unencodable_text(df: pd.DataFrame) -> pd.DataFrame:
    """Failure cases (pandera's columns) for every text cell that UTF-8 cannot encode: DuckDB
    refuses such a cell in the middle of an insert, so it must be quarantined before the write."""
    cases = []
    for col in df.columns:
        if df[col].dtype != object and not isinstance(df[col].dtype, pd.StringDtype):
            continue
        for idx, value in df[col].items():
            if not _encodable(value):
                cases.append({"schema_context": "Column", "column": col, "check": UNENCODABLE_CHECK,
                              "check_number": None, "failure_case": value, "index": idx})
    return pd.DataFrame(cases)


INFINITE_ALLOWED = frozenset({"grad_norm"})  # torch's clip_grad_norm_ returns inf for an overflowing step


def lossy_values(df: pd.DataFrame, model: type[pa.DataFrameModel]) -> pd.DataFrame:
    """Failure cases (pandera's columns) for the values the schemas' coercion would change rather
    than refuse: a fraction in an integer column (1.7 stored as 1), a float or a list in a text
    column (1.0 stored as '1.0'; a whole number is its text), text of white space alone where text
    is required, and an infinite number in a float column (null stays allowed where the column is
    nullable)."""
    cases = []
    for name, column in model.to_schema().columns.items():
        if name not in df.columns:
            continue  # pandera reports a missing column itself
        values = df[name]
        present = values.notna()
        dtype = str(column.dtype)
        if dtype in ("int64", "Int64", "float64"):
            numeric = values
            if values.dtype == object:  # booleans and text among numbers: neither is a number here
                numeric = values.where(~values.map(lambda v: isinstance(v, (bool, np.bool_))), "not a number")
            numbers = pd.to_numeric(numeric, errors="coerce")
            if dtype == "float64":
                finite = np.isfinite(numbers.astype(float).fillna(np.inf))
                if name in INFINITE_ALLOWED:  # inf is a value there (an overflowing step's gradient norm)
                    finite |= np.isinf(numbers.astype(float).fillna(0.0))
                bad = present & ~finite
                check = "finite_number (no inf, no text)"
            else:
                bad = present & (numbers.isna() | (numbers % 1 != 0))
                check = "whole_number (a fraction is not truncated)"
        elif dtype == "str":  # text, or a whole number (a level 3 is the text '3'); never 1.0 or a list
            is_text = values.map(lambda v: isinstance(v, (str, int, np.integer)) and not isinstance(v, (bool, np.bool_)))
            required = any("str_length" in str(c) for c in column.checks)
            blank = values.map(lambda v: isinstance(v, str) and not v.strip()) if required else False
            bad = present & (~is_text | blank)
            check = "text (not a float, list or other value written as text" + (", not blank)" if required else ")")
        else:
            continue
        for idx, value in values[bad].items():
            cases.append({"schema_context": "Column", "column": name, "check": check, "check_number": None,
                          "failure_case": value, "index": idx})
    return pd.DataFrame(cases)


class _Base(pa.DataFrameModel):
    class Config:
        strict = False  # assets may carry extra columns (token ids) that DuckDB does not store
        coerce = True


class ProblemsSchema(_Base):
    """Normalized problems: training prompts and evaluation sets (``datasets`` asset)."""

    dataset: Series[str] = pa.Field(str_length={"min_value": 1})
    split: Series[str] = pa.Field(isin=["train", "heldout", "test"])
    problem_id: Series[str] = pa.Field(str_length={"min_value": 1})
    prompt: Series[str] = pa.Field(str_length={"min_value": 1})
    answer: Series[str] = pa.Field(str_length={"min_value": 1})
    level: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0)

    class Config:
        unique = ["dataset", "split", "problem_id"]


class RolloutsSchema(_Base):
    """One sampled response: the base policy's (``source='base'``) or the trainer's (``'train'``)."""

    source: Series[str] = pa.Field(isin=SOURCES)
    base_model: Series[str] = pa.Field(str_length={"min_value": 1})
    method: Optional[Series[str]] = pa.Field(nullable=True, isin=list(METHOD_NAMES))
    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    step: Series[int] = pa.Field(ge=0)
    rollout: Series[int] = pa.Field(ge=0)
    problem_id: Series[str] = pa.Field(str_length={"min_value": 1})
    level: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0)
    group: Series[int] = pa.Field(ge=0)
    response: Series[str] = pa.Field(nullable=True)
    reference: Series[str] = pa.Field(str_length={"min_value": 1})
    num_tokens: Series[int] = pa.Field(ge=0)
    outcome: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    verdict: Series[str]
    segmentation: Series[str] = pa.Field(isin=SEGMENTATION_STATUSES)
    num_episodes: Series[int] = pa.Field(ge=0)
    score: Series[float] = pa.Field(nullable=True)
    advantage: Series[float] = pa.Field(nullable=True)

    class Config:
        unique = ["source", "base_model", "method", "run_id", "step", "rollout"]


class EpisodeRewardsSchema(_Base):
    """One episode of one response: G_k, P_k, P̂_k, r_k^prg, the outcome share r_out/K and R_k."""

    source: Series[str] = pa.Field(isin=SOURCES)
    base_model: Series[str] = pa.Field(str_length={"min_value": 1})
    method: Series[str] = pa.Field(isin=list(METHOD_NAMES))
    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    step: Series[int] = pa.Field(ge=0)
    rollout: Series[int] = pa.Field(ge=0)
    episode: Series[int] = pa.Field(ge=1)
    num_tokens: Series[int] = pa.Field(ge=0)
    fitting_gain: Series[float] = pa.Field()
    penalty: Series[float] = pa.Field(ge=0.0)
    penalty_hat: Series[float] = pa.Field(ge=0.0)
    process_reward: Series[float] = pa.Field()
    outcome_reward: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    episode_reward: Series[float] = pa.Field()

    @pa.dataframe_check(error="reward values must be finite")
    def finite_rewards(cls, df: pd.DataFrame) -> pd.Series:
        cols = ["fitting_gain", "penalty", "penalty_hat", "process_reward", "episode_reward"]
        return pd.Series(np.isfinite(df[cols].astype(float)).all(axis=1), index=df.index)

    class Config:
        unique = ["source", "base_model", "method", "run_id", "step", "rollout", "episode"]


class TrainStepsSchema(_Base):
    """One optimizer step of a training run (the trainer's train_steps table plus its keys)."""

    base_model: Series[str] = pa.Field(str_length={"min_value": 1})
    method: Series[str] = pa.Field(isin=list(METHOD_NAMES))
    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    step: Series[int] = pa.Field(ge=1)
    accuracy: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    mean_tokens: Series[float] = pa.Field(ge=0.0)
    episodes_per_response: Series[float] = pa.Field(ge=0.0)
    tagged_share: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    score_mean: Series[float] = pa.Field(nullable=True)
    loss: Series[float] = pa.Field(nullable=True)
    kl: Series[float] = pa.Field(nullable=True)
    grad_norm: Series[float] = pa.Field(nullable=True, ge=0.0)
    lr: Series[float] = pa.Field(nullable=True, ge=0.0)
    step_time_s: Series[float] = pa.Field(ge=0.0)

    @pa.dataframe_check(error="loss and kl must be finite")
    def finite_loss(cls, df: pd.DataFrame) -> pd.Series:
        vals = df[["loss", "kl"]].astype(float)
        return pd.Series((np.isfinite(vals) | vals.isna()).all(axis=1), index=df.index)

    class Config:
        unique = ["base_model", "method", "run_id", "step"]


class EvalResultsSchema(_Base):
    """Greedy evaluation of one model on one benchmark, overall (``level='all'``) and per level."""

    model_kind: Series[str] = pa.Field(isin=["base", "checkpoint"])
    base_model: Series[str] = pa.Field(str_length={"min_value": 1})
    method: Series[str] = pa.Field(nullable=True, isin=list(METHOD_NAMES))
    model_path: Series[str] = pa.Field(str_length={"min_value": 1})
    # SHA-256 of the weight files (l2t_core.models.weights_fingerprint); null in rows stored before it was
    model_weights: Series[str] = pa.Field(nullable=True)
    benchmark: Series[str] = pa.Field(str_length={"min_value": 1})
    evaluator: Series[str] = pa.Field(str_length={"min_value": 1})
    level: Series[str] = pa.Field(str_length={"min_value": 1})
    n: Series[int] = pa.Field(ge=1)
    accuracy: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    mean_tokens: Series[float] = pa.Field(ge=0.0)
    mean_episodes: Series[float] = pa.Field(ge=0.0)
    tagged_share: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    finished_share: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})
    redundant_share: Series[float] = pa.Field(in_range={"min_value": 0.0, "max_value": 1.0})

    @pa.dataframe_check(error="a checkpoint's row names the method that trained it")
    def checkpoint_has_method(cls, df: pd.DataFrame) -> pd.Series:
        return ~((df["model_kind"] == "checkpoint") & df["method"].isna())

    class Config:
        unique = ["model_kind", "base_model", "method", "benchmark", "level"]


SCHEMAS: dict[str, type[pa.DataFrameModel]] = {
    "problems": ProblemsSchema,
    "rollouts": RolloutsSchema,
    "episode_rewards": EpisodeRewardsSchema,
    "train_steps": TrainStepsSchema,
    "eval_results": EvalResultsSchema,
}

with warnings.catch_warnings():  # dagster-pandera marks the conversion as beta
    warnings.simplefilter("ignore", dg.BetaWarning)
    ProblemsType = pandera_schema_to_dagster_type(ProblemsSchema)
    RolloutsType = pandera_schema_to_dagster_type(RolloutsSchema)
    EpisodeRewardsType = pandera_schema_to_dagster_type(EpisodeRewardsSchema)
    TrainStepsType = pandera_schema_to_dagster_type(TrainStepsSchema)
    EvalResultsType = pandera_schema_to_dagster_type(EvalResultsSchema)


def schema_columns(model: type[pa.DataFrameModel]) -> list[str]:
    """The column names a schema declares, in order."""
    return list(model.to_schema().columns)


class SchemaViolation(dg.Failure):
    """A table failed its pandera schema; ``bad_rows`` went to the quarantine table."""

    def __init__(self, table: str, failure_cases: pd.DataFrame, bad_rows: pd.DataFrame):
        self.table = table
        self.failure_cases = failure_cases
        self.bad_rows = bad_rows
        shown = bad_rows.head(20)
        super().__init__(
            allow_retries=False,  # the same rows would fail again
            description=(
                f"{len(bad_rows)} row(s) of {table!r} violate {SCHEMAS[table].__name__} and were moved to the "
                f"quarantine table; nothing was written to {table!r}. Failing checks:\n"
                + failure_summary(failure_cases)
                + "\nFailing rows:\n" + markdown_table(shown)
            ),
            metadata={
                "table": table,
                "quarantined_rows": len(bad_rows),
                "failure_cases": dg.MetadataValue.md(markdown_table(failure_cases.head(50))),
                "failing_rows": dg.MetadataValue.md(markdown_table(shown)),
            },
        )


def markdown_table(df: pd.DataFrame) -> str:
    """A markdown table of ``df`` (long strings cut), for metadata and error messages."""
    if df.empty:
        return "(no rows)"
    show = df.copy()
    for c in show.columns:
        if show[c].dtype == object:
            show[c] = show[c].map(_display_text)
    return show.to_markdown(index=True)


def _display_text(v):
    """A cell for display: long strings cut to 60 characters, unencodable characters escaped (the
    text goes into Dagster's event log, which must be able to store it)."""
    if not isinstance(v, str):
        return v
    v = v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v[:60] + "…" if len(v) > 60 else v


def failure_summary(failure_cases: pd.DataFrame) -> str:
    """One line per (column, check) with how many values failed and an example."""
    lines = []
    for (col, chk), grp in failure_cases.groupby(["column", "check"], dropna=False):
        example = _display_text(repr(grp["failure_case"].iloc[0]))  # repr of a huge value is cut too
        lines.append(f"- column {col}: check {chk} failed {len(grp)} time(s), e.g. {example}")
    return "\n".join(lines)


def find_violations(df: pd.DataFrame, table: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Validate ``df`` against the table's schema (all errors, not the first).

    Returns ``(validated, failure_cases, bad_rows)``: the coerced frame when valid (and empty
    failure cases and bad rows), otherwise the input, pandera's failure cases and the failing
    rows with a ``reasons`` column (text that UTF-8 cannot encode shown with ``\\uXXXX`` escapes). A
    table-wide failure (a missing column) marks every row.
    """
    model = SCHEMAS[table]
    text_cases = pd.concat([unencodable_text(df), lossy_values(df, model)], ignore_index=True)
    try:
        validated = model.validate(df, lazy=True)
        fc = pd.DataFrame()
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases.copy()
    if len(text_cases):
        fc = pd.concat([fc, text_cases], ignore_index=True) if len(fc) else text_cases
    if fc.empty:
        return validated, fc, df.iloc[0:0]
    rows_of = fc["index"].dropna()
    idx = sorted({i for i in rows_of.tolist() if i in df.index})
    wide = fc["index"].isna().any()
    bad = df if wide or not idx else df.loc[idx]
    reasons = {}
    for _, case in fc.iterrows():
        keys = bad.index if pd.isna(case["index"]) else [case["index"]]
        for k in keys:
            reasons.setdefault(k, []).append(f"{case['column']}: {case['check']}")
    bad = bad.copy()
    for col in bad.columns:  # the quarantine stores the rows as JSON: text must be encodable
        if bad[col].dtype == object:
            bad[col] = bad[col].map(lambda v: v if _encodable(v) else v.encode("utf-8", "backslashreplace").decode())
    bad["reasons"] = [sorted(set(reasons.get(i, ["table-wide check"]))) for i in bad.index]
    bad["reasons"] = bad["reasons"].map("; ".join)
    return df, fc, bad
