"""The DuckDB warehouse: tables, documented views, idempotent writes and the quarantine.

Tables (every one keyed by the Dagster asset and partition that wrote the rows):

* ``problems``: normalized training prompts and evaluation problems (``datasets``);
* ``rollouts``: sampled responses, the base policy's (``segmented_rollouts``, ``source='base'``)
  and the trainer's of every step (``checkpoints``, ``source='train'``);
* ``episode_rewards``: per-episode G_k, P_k, P̂_k, r_k^prg, r_out/K and R_k, same two sources;
* ``train_steps``: one row per optimizer step (other trainer columns in ``extra`` as JSON);
* ``eval_results``: per model, benchmark and level (``'all'`` overall) accuracy and tokens, with
  the fingerprint of the model's weights (``model_weights``);
* ``checkpoints``: one row per training run (run URL, latest checkpoint, its config and the
  fingerprint of the base weights it trained from, ``base_weights``);
* ``quarantine``: rows that failed their schema, as JSON, with the reasons;
* ``run_history``: every training run of every ``checkpoints`` partition, kept when the partition
  trains another one (a new configuration, a rebuilt base): its config hash and JSON, run and
  checkpoint URLs, last step's accuracy and tokens, the Dagster run; a warehouse from before this
  table starts it with the runs ``checkpoints`` holds;
* ``evaluation_history``: every evaluation ``benchmark_reports`` made of a run (per config hash and
  evaluator fingerprint): the checkpoint's and its base's accuracy and tokens, the token reduction.

The other tables hold what each partition is now (its latest run); the history tables are
replaced only row by row (:data:`HISTORY_KEYS`: the same run, or the same run and evaluator).

Views:

* ``v_run_summary``: per base model and method, the last logged step's accuracy and tokens;
* ``v_checkpoint_vs_base``: each evaluated checkpoint next to its base model on the same
  benchmark (overall), with ``accuracy_delta`` and ``token_reduction`` (1 − tokens/base tokens);
* ``v_episode_reward_summary``: per source, base model and method, mean G_k, P̂_k, r_k^prg,
  R_k and the share of episodes with a positive gain;
* ``v_quarantine_counts``: quarantined rows per table, asset and partition;
* ``v_run_ledger``: every run of ``run_history`` with its evaluations (none yet: NULLs), for
  comparing the configurations a partition was trained with.

No credential is ever stored: every column that holds a location (:data:`URL_COLUMNS`: ``run_url``,
``checkpoint_url``, ``model_path``) is written through :func:`l2t_core.urls.redact_url`, every URL
inside the JSON columns (``config_json``, a quarantined ``row_json``) too. Run URLs never carry
credentials in the first place (l2t_core refuses them); this keeps a stray one out of the warehouse.

Writes are idempotent: :func:`replace_rows` deletes the rows of ``(asset_key, partition_key)``
and inserts the new ones in one transaction, so re-materializing a partition never duplicates.
The data columns come from the pandera schemas (:mod:`l2t_pipeline.schemas`).

Concurrent writers: DuckDB lets one process at a time open a database file for writing (another
gets ``IO Error: Could not set lock on file``). :func:`connect`, the one way the assets and checks
open the warehouse, therefore

1. takes an inter-process file lock, ``<database>.lock`` next to the database (``filelock``, which
   torch and huggingface_hub already require: an ``flock`` on POSIX), held until the connection is
   closed, so l2t writers (the steps of a multiprocess run, concurrent runs, ``dagster dev``)
   queue instead of colliding; the lock is re-entrant within a thread, and in-process
   connections share one DuckDB instance anyway;
2. opens the connection retrying DuckDB's lock error with exponential backoff and full jitter
   (50 ms doubling to at most 2 s), for holders that do not take the lock (a DuckDB shell, a
   notebook, a read-only reader);

both within one bounded wait, ``L2T_DUCKDB_LOCK_TIMEOUT`` seconds (default 120). When it runs
out, :class:`WarehouseBusy` names the database file, what holds it (DuckDB's message gives the
holder's PID) and how to proceed. Measured with ``python -m bench.faults``: 4 writer processes
replacing partitions of one file, no failed write, no row lost or duplicated.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import pandas as pd

from l2t_core.urls import redact_url, redact_urls_in

from .schemas import SCHEMAS, SchemaViolation, find_violations, schema_columns

KEY_COLUMNS = (("asset_key", "VARCHAR"), ("partition_key", "VARCHAR"))
_DUCK_TYPES = {"str": "VARCHAR", "int64": "BIGINT", "Int64": "BIGINT", "float64": "DOUBLE", "bool": "BOOLEAN"}
EXTRA_COLUMNS = {"train_steps": (("extra", "JSON"),)}
OTHER_TABLES = {
    "checkpoints": (("base_model", "VARCHAR"), ("method", "VARCHAR"), ("run_url", "VARCHAR"),
                    ("checkpoint_url", "VARCHAR"), ("final_step", "BIGINT"), ("config_hash", "VARCHAR"),
                    ("config_json", "JSON"), ("base_weights", "VARCHAR")),
    "quarantine": (("table_name", "VARCHAR"), ("row_index", "VARCHAR"), ("row_json", "JSON"),
                   ("reasons", "VARCHAR")),
    # every run and every evaluation of a run, kept when the partition gets another one
    "run_history": (("base_model", "VARCHAR"), ("method", "VARCHAR"), ("config_hash", "VARCHAR"),
                    ("run_url", "VARCHAR"), ("checkpoint_url", "VARCHAR"), ("final_step", "BIGINT"),
                    ("config_json", "JSON"), ("base_weights", "VARCHAR"), ("last_accuracy", "DOUBLE"),
                    ("last_mean_tokens", "DOUBLE"), ("dagster_run_id", "VARCHAR")),
    "evaluation_history": (("base_model", "VARCHAR"), ("method", "VARCHAR"), ("config_hash", "VARCHAR"),
                           ("checkpoint_url", "VARCHAR"), ("evaluator", "VARCHAR"), ("benchmark", "VARCHAR"),
                           ("accuracy", "DOUBLE"), ("base_accuracy", "DOUBLE"), ("accuracy_delta", "DOUBLE"),
                           ("mean_tokens", "DOUBLE"), ("base_mean_tokens", "DOUBLE"), ("token_reduction", "DOUBLE"),
                           ("dagster_run_id", "VARCHAR")),
}
TABLES = (*SCHEMAS, *OTHER_TABLES)
# tables whose rows a write of a partition replaces only where these columns match (the others:
# all of the partition's rows): the history tables keep the partition's earlier runs and evaluations
HISTORY_KEYS = {"run_history": ("config_hash",), "evaluation_history": ("config_hash", "evaluator")}
# columns that hold a location (a path or URL) and JSON columns that may hold one: written redacted
URL_COLUMNS = ("run_url", "checkpoint_url", "model_path")
JSON_URL_COLUMNS = ("config_json", "row_json")

VIEWS = {
    "v_run_summary": """
        SELECT base_model, method, run_id, step AS last_step, accuracy, mean_tokens, episodes_per_response, kl
        FROM train_steps
        QUALIFY row_number() OVER (PARTITION BY base_model, method ORDER BY step DESC) = 1""",
    "v_checkpoint_vs_base": """
        SELECT c.partition_key, c.base_model, c.method, c.benchmark, c.accuracy, b.accuracy AS base_accuracy,
               c.accuracy - b.accuracy AS accuracy_delta, c.mean_tokens, b.mean_tokens AS base_mean_tokens,
               CASE WHEN b.mean_tokens > 0 THEN 1 - c.mean_tokens / b.mean_tokens END AS token_reduction
        FROM eval_results c JOIN eval_results b
          ON b.asset_key = c.asset_key AND b.partition_key = c.partition_key AND b.benchmark = c.benchmark
         AND b.level = c.level AND b.model_kind = 'base'
        WHERE c.model_kind = 'checkpoint' AND c.level = 'all'""",
    "v_episode_reward_summary": """
        SELECT source, base_model, method, count(*) AS episodes, avg(fitting_gain) AS mean_fitting_gain,
               avg(penalty_hat) AS mean_penalty_hat, avg(process_reward) AS mean_process_reward,
               avg(episode_reward) AS mean_episode_reward, avg((fitting_gain > 0)::DOUBLE) AS positive_gain_share
        FROM episode_rewards GROUP BY ALL""",
    "v_quarantine_counts": """
        SELECT table_name, asset_key, partition_key, count(*) AS rows, max(loaded_at) AS last_quarantined
        FROM quarantine GROUP BY ALL""",
    "v_run_ledger": """
        SELECT r.base_model, r.method, r.config_hash, r.final_step, r.last_accuracy, r.last_mean_tokens,
               e.benchmark, e.accuracy, e.base_accuracy, e.accuracy_delta, e.mean_tokens, e.base_mean_tokens,
               e.token_reduction, e.evaluator, r.loaded_at AS trained_at, e.loaded_at AS evaluated_at,
               r.run_url, r.config_json
        FROM run_history r LEFT JOIN evaluation_history e
          ON e.partition_key = r.partition_key AND e.config_hash = r.config_hash""",
}


LOCK_TIMEOUT_ENV = "L2T_DUCKDB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 120.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.05, 2.0


class WarehouseBusy(TimeoutError):
    """The warehouse file stayed locked by another process for the whole allowed wait."""


def lock_timeout() -> float:
    """Seconds :func:`connect` waits for the warehouse (``L2T_DUCKDB_LOCK_TIMEOUT``, default 120)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds (e.g. 120)") from None
    if value < 0:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={raw!r} must be >= 0 seconds")
    return value


_LOCKS: dict[str, object] = {}
_LOCKS_GUARD = threading.Lock()


def _file_lock(database: str):
    """The process-wide ``FileLock`` of ``<database>.lock`` (None for in-memory databases). One
    object per file, so a thread that already holds it re-enters instead of waiting for itself."""
    if database in ("", ":memory:") or database.startswith((":memory:", "md:", "motherduck:")):
        return None
    from filelock import FileLock

    path = os.path.abspath(database) + ".lock"
    with _LOCKS_GUARD:
        if path not in _LOCKS:
            _LOCKS[path] = FileLock(path)
        return _LOCKS[path]


def is_lock_error(exc: BaseException) -> bool:
    """True for DuckDB's "another process holds this file" error."""
    import duckdb

    text = str(exc)
    return isinstance(exc, duckdb.IOException) and ("Could not set lock" in text or "Conflicting lock" in text)


def _open(resource, database: str, deadline: float, timeout: float):
    """``duckdb.connect`` as ``DuckDBResource.get_connection`` opens it, retrying the lock error
    with exponential backoff and full jitter until ``deadline``."""
    import duckdb

    config = {"custom_user_agent": "dagster", **(getattr(resource, "connection_config", None) or {})}
    attempt = 0
    while True:
        try:
            return duckdb.connect(database=database, read_only=False, config=config)
        except duckdb.IOException as exc:
            left = deadline - time.monotonic()
            if not is_lock_error(exc):
                raise
            if left <= 0:
                raise WarehouseBusy(
                    f"the DuckDB warehouse {redact_url(database)} stayed locked for {timeout:.0f}s "
                    f"({str(exc).replace(database, redact_url(database))}). DuckDB allows one "
                    f"writing process per file: close the process named above (a DuckDB shell, a notebook, "
                    f"another pipeline), or wait longer by raising {LOCK_TIMEOUT_ENV} (seconds)"
                ) from exc
            time.sleep(min(left, random.uniform(0.0, min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** attempt))))
            attempt += 1


@contextmanager
def connect(resource, timeout: float | None = None) -> Iterator:
    """A read-write connection to the warehouse of ``resource`` (a ``DuckDBResource``: its
    ``database`` and ``connection_config``), safe with concurrent writer processes (see the module
    docstring), closed even when the block raises (an open connection locks the file).

    ``timeout``: the most seconds to wait for other processes (default ``L2T_DUCKDB_LOCK_TIMEOUT``
    or 120); then :class:`WarehouseBusy`.
    """
    database = str(resource.database)
    timeout = lock_timeout() if timeout is None else float(timeout)
    deadline = time.monotonic() + timeout
    lock = _file_lock(database)
    if lock is not None:
        from filelock import Timeout

        try:
            lock.acquire(timeout=max(timeout, 0.0), poll_interval=0.01)
        except Timeout:
            raise WarehouseBusy(
                f"another l2t process held the lock {lock.lock_file} of the DuckDB warehouse {redact_url(database)} for "
                f"{timeout:.0f}s; a long write is still running (see the Dagster runs in progress), or raise "
                f"{LOCK_TIMEOUT_ENV} (seconds) to wait longer"
            ) from None
    try:
        conn = _open(resource, database, deadline, timeout)
        try:
            yield conn
        finally:
            conn.close()
    finally:
        if lock is not None:
            lock.release()


def _q(name: str) -> str:
    """A quoted SQL identifier (``group`` is a keyword)."""
    return '"' + name.replace('"', '""') + '"'


def table_columns(table: str) -> list[tuple[str, str]]:
    """(name, DuckDB type) of every column of ``table``, keys first, ``loaded_at`` last."""
    if table in SCHEMAS:
        cols = [(n, _DUCK_TYPES[str(c.dtype)]) for n, c in SCHEMAS[table].to_schema().columns.items()]
        cols += list(EXTRA_COLUMNS.get(table, ()))
    elif table in OTHER_TABLES:
        cols = list(OTHER_TABLES[table])
    else:
        raise KeyError(f"unknown warehouse table {table!r}; tables are {', '.join(TABLES)}")
    return [*KEY_COLUMNS, *cols, ("loaded_at", "TIMESTAMP")]


SCHEMA_TABLE = "l2t_schema"  # one row: the fingerprint of the tables' columns and the views this warehouse has


def schema_fingerprint() -> str:
    """A hash of every table's columns and every view's SQL, as this version of the code defines them."""
    import hashlib

    spec = {"tables": {t: table_columns(t) for t in TABLES}, "views": VIEWS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_schema(conn) -> None:
    """Bring the warehouse to this code's schema: create missing tables, add the columns a newer
    version of a table has (existing rows get NULL), (re)create the views, and record the schema's
    fingerprint. A warehouse already at this fingerprint is left alone, so read-only connections
    can read; one that is not, opened read-only, is read as it is (a writable connection, e.g. any
    materialization, migrates it)."""
    fingerprint = schema_fingerprint()
    have = {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables() UNION ALL "
                                       "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    if SCHEMA_TABLE in have and have >= set(TABLES) | set(VIEWS):
        row = conn.execute(f"SELECT fingerprint FROM {_q(SCHEMA_TABLE)}").fetchone()
        if row is not None and row[0] == fingerprint:
            return
    try:
        conn.execute("BEGIN TRANSACTION")
    except Exception as exc:  # noqa: BLE001 - a read-only connection reads the warehouse as it is
        if "read-only" in str(exc).lower():
            return
        raise
    try:
        for t in TABLES:
            cols = ", ".join(f"{_q(n)} {typ}" for n, typ in table_columns(t))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {_q(t)} ({cols})")
            present = dict(conn.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? "
                "AND schema_name = current_schema()", [t]).fetchall())
            for n, typ in table_columns(t):
                if n not in present:
                    conn.execute(f"ALTER TABLE {_q(t)} ADD COLUMN IF NOT EXISTS {_q(n)} {typ}")
                elif present[n].upper() != typ.upper():
                    raise RuntimeError(
                        f"the warehouse's {t}.{n} is {present[n]}, this version stores {typ}: it was made by "
                        "another version of l2t; move the DuckDB file aside (its rows stay readable there) and "
                        "materialize again, or convert the column yourself")
        if "run_history" not in have and "checkpoints" in have:  # a warehouse from before the history: its runs
            conn.execute("INSERT INTO run_history BY NAME SELECT asset_key, partition_key, base_model, method, "
                         "config_hash, run_url, checkpoint_url, final_step, config_json, base_weights, loaded_at "
                         "FROM checkpoints")
        for name, sql in VIEWS.items():
            conn.execute(f"CREATE OR REPLACE VIEW {_q(name)} AS {sql}")
        conn.execute(f"CREATE OR REPLACE TABLE {_q(SCHEMA_TABLE)} (fingerprint VARCHAR)")
        conn.execute(f"INSERT INTO {_q(SCHEMA_TABLE)} VALUES (?)", [fingerprint])
        conn.execute("COMMIT")
    except Exception as exc:
        conn.execute("ROLLBACK")
        if "read-only" in str(exc).lower():  # noqa: BLE001 - as above
            return
        raise


def _frame_for(table: str, df: pd.DataFrame, asset_key: str, partition_key: str) -> pd.DataFrame:
    """``df`` reduced to the table's columns, with keys and ``loaded_at`` filled in; columns a
    schema has but ``df`` lacks fail here (validation reports them first)."""
    names = [n for n, _ in table_columns(table)]
    data_cols = [n for n in names if n not in ("asset_key", "partition_key", "loaded_at")]
    missing = [c for c in data_cols if c not in df.columns]
    if missing:
        raise ValueError(f"rows for {table!r} lack column(s) {', '.join(missing)}")
    out = redact_locations(df[data_cols].copy())
    out.insert(0, "partition_key", partition_key)
    out.insert(0, "asset_key", asset_key)
    out["loaded_at"] = datetime.now(timezone.utc).replace(tzinfo=None)
    return out


def _redact_json(text):
    """A JSON document with every URL in it redacted, unchanged (as written) when none has
    credentials; text that is not JSON is redacted as a URL."""
    if not isinstance(text, str):
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return redact_url(text)
    redacted = redact_urls_in(data)
    return text if redacted == data else json.dumps(redacted)


def redact_locations(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with :data:`URL_COLUMNS` redacted and every URL in :data:`JSON_URL_COLUMNS`
    redacted (a new frame; ``frame`` itself when it has none of those columns); values without
    credentials come back unchanged."""
    changes = {col: frame[col].map(lambda v: redact_url(v) if isinstance(v, str) else v)
               for col in URL_COLUMNS if col in frame.columns}
    changes.update({col: frame[col].map(_redact_json) for col in JSON_URL_COLUMNS if col in frame.columns})
    return frame.assign(**changes) if changes else frame


def _replace(conn, table: str, frame: pd.DataFrame, asset_key: str, partition_key: str) -> None:
    keys = HISTORY_KEYS.get(table, ())
    if keys:  # a history table: only the rows of these runs (evaluations) are replaced
        for values in frame[list(keys)].drop_duplicates().itertuples(index=False):
            match = " AND ".join(f"{_q(k)} IS NOT DISTINCT FROM ?" for k in keys)
            conn.execute(f"DELETE FROM {_q(table)} WHERE asset_key = ? AND partition_key = ? AND {match}",
                         [asset_key, partition_key, *(None if pd.isna(v) else v for v in values)])
    else:
        conn.execute(f"DELETE FROM {_q(table)} WHERE asset_key = ? AND partition_key = ?", [asset_key, partition_key])
    if len(frame):
        conn.register("_incoming", frame)
        # no try/finally: a failed INSERT aborts the transaction, and unregistering then would raise
        # "transaction is aborted" and hide the real error; the caller's ROLLBACK drops the view
        conn.execute(f"INSERT INTO {_q(table)} BY NAME SELECT * FROM _incoming")
        conn.unregister("_incoming")


def replace_tables(conn, frames: dict[str, pd.DataFrame], asset_key: str, partition_key: str) -> dict[str, int]:
    """Replace the rows ``(asset_key, partition_key)`` of every table in ``frames`` in ONE
    transaction (all tables change or none), and clear the quarantine of those tables' rows of that
    asset and partition: the rows stored now replace the ones it held back. Returns the rows
    inserted per table."""
    ensure_schema(conn)
    prepared = {t: _frame_for(t, df, asset_key, partition_key) for t, df in frames.items()}
    conn.execute("BEGIN TRANSACTION")
    try:
        for t, frame in prepared.items():
            _replace(conn, t, frame, asset_key, partition_key)
            conn.execute("DELETE FROM quarantine WHERE table_name = ? AND asset_key = ? AND partition_key = ?",
                         [t, asset_key, partition_key])
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return {t: len(f) for t, f in prepared.items()}


def replace_rows(conn, table: str, df: pd.DataFrame, asset_key: str, partition_key: str) -> int:
    """Replace the rows ``(asset_key, partition_key)`` of ``table`` by ``df`` (delete, then insert,
    in one transaction). Returns the number of rows inserted."""
    return replace_tables(conn, {table: df}, asset_key, partition_key)[table]


def write_validated(conn, frames: dict[str, pd.DataFrame], asset_key: str, partition_key: str,
                    unvalidated: dict[str, pd.DataFrame] | None = None) -> dict[str, int]:
    """Validate every frame against its table's schema, then replace the partition's rows (with
    ``unvalidated`` frames of tables that have no schema, e.g. ``checkpoints``) in one transaction.
    URLs in the rows are redacted (:func:`redact_locations`) before anything is validated or stored.

    On any violation nothing is written to the main tables: the failing rows of every failing
    table go to ``quarantine`` and :class:`~l2t_pipeline.schemas.SchemaViolation` is raised for
    the first one (its message and metadata show the failing rows and checks).
    """
    validated, failures = {}, []
    for table, df in frames.items():
        # URLs redacted first: the failing rows also go to the quarantine, the error and its metadata
        ok, cases, bad = find_violations(redact_locations(df), table)
        if cases.empty:
            validated[table] = ok
        else:
            quarantine(conn, table, bad, asset_key, partition_key)
            failures.append(SchemaViolation(table, cases, bad))
    if failures:
        raise failures[0]
    return replace_tables(conn, {**validated, **(unvalidated or {})}, asset_key, partition_key)


def quarantine(conn, table: str, bad_rows: pd.DataFrame, asset_key: str, partition_key: str) -> int:
    """Store ``bad_rows`` (with their ``reasons`` column) in the quarantine table, replacing an
    earlier quarantine of the same table, asset and partition (URLs in the rows redacted, like
    everywhere in the warehouse). Returns the rows stored."""
    rows = pd.DataFrame({
        "table_name": table,
        "row_index": [str(i) for i in bad_rows.index],
        "row_json": [json.dumps({k: v for k, v in r.items() if k != "reasons"}, default=str)
                     for r in bad_rows.to_dict("records")],
        "reasons": bad_rows["reasons"].astype(str).tolist() if "reasons" in bad_rows else "",
    })
    ensure_schema(conn)
    frame = _frame_for("quarantine", rows, asset_key, partition_key)
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("DELETE FROM quarantine WHERE table_name = ? AND asset_key = ? AND partition_key = ?",
                     [table, asset_key, partition_key])
        conn.register("_bad", frame)
        conn.execute("INSERT INTO quarantine BY NAME SELECT * FROM _bad")
        conn.unregister("_bad")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return len(frame)


def read_rows(conn, table: str, asset_key: str | None = None, partition_key: str | None = None) -> pd.DataFrame:
    """Rows of ``table``, optionally those one asset (and partition) wrote."""
    ensure_schema(conn)
    where, args = [], []
    if asset_key is not None:
        where.append("asset_key = ?")
        args.append(asset_key)
    if partition_key is not None:
        where.append("partition_key = ?")
        args.append(partition_key)
    sql = f"SELECT * FROM {_q(table)}" + (" WHERE " + " AND ".join(where) if where else "")
    return conn.execute(sql, args).df()


def duplicate_keys(conn, table: str) -> int:
    """How many rows of ``table`` repeat the natural key of its schema (0 in a healthy warehouse)."""
    ensure_schema(conn)
    keys = SCHEMAS[table].Config.unique
    cols = ", ".join(_q(c) for c in ("asset_key", "partition_key", *keys))
    sql = f"SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) AS c FROM {_q(table)} GROUP BY {cols})"
    return int(conn.execute(sql).fetchone()[0])


def train_steps_frame(steps: pd.DataFrame, base_model: str, method: str) -> pd.DataFrame:
    """The trainer's train_steps rows with the run's keys; columns outside the schema go to
    ``extra`` (JSON) so nothing the trainer logs is lost."""
    known = set(schema_columns(SCHEMAS["train_steps"]))
    out = steps.copy()
    out["base_model"] = base_model
    out["method"] = method
    for col in known - set(out.columns):
        out[col] = None
    extra_cols = [c for c in steps.columns if c not in known]
    out["extra"] = [json.dumps({c: r[c] for c in extra_cols}, default=float) for _, r in steps.iterrows()]
    return out
