"""Run metrics as parquet part files that the pipeline loads into DuckDB.

Three tables, each a folder of parquet parts under ``<out>/metrics/<table>/``:

* ``train_steps``: one row per optimizer step (reward parts, accuracy, tokens, KL, each phase's time
  and peak memory, ...);
* ``rollouts``: one row per sampled response (text, outcome, score, advantage, episode count);
* ``episode_rewards``: one row per episode of every response (G_k, P_k, P̂_k, r_k^prg, R_k, and the
  copy share c_k where ``reward.copying.coef`` charges it, the oracle label ℓ_k where
  ``reward.oracle.coef`` does).

Rows are buffered and written as ``part-<first>-<last>.parquet`` for the steps since the previous
checkpoint, just before that checkpoint is published. A run resumed from checkpoint ``s`` first
drops any part that starts after ``s`` (written by the interrupted session for steps it is about
to recompute), so every step lands exactly once.
"""

from __future__ import annotations

import io
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import RunStorage

TABLES = ("train_steps", "rollouts", "episode_rewards")
_PART_RE = re.compile(r"^part-(\d+)-(\d+)\.parquet$")


class MetricsWriter:
    def __init__(self, storage: RunStorage):
        self.storage = storage
        self.buffers: dict[str, list[dict]] = {t: [] for t in TABLES}

    def add(self, table: str, rows: list[dict]) -> None:
        if table not in self.buffers:
            raise KeyError(f"unknown metrics table {table!r}; tables are {', '.join(TABLES)}")
        self.buffers[table].extend(rows)

    def flush(self, first_step: int, last_step: int) -> None:
        """Write the buffered rows of steps ``first_step..last_step`` as one part per table."""
        for table, rows in self.buffers.items():
            if not rows:
                continue
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), buf)
            self.storage.write_bytes(f"metrics/{table}/part-{first_step:06d}-{last_step:06d}.parquet", buf.getvalue())
            rows.clear()

    def drop_after(self, step: int) -> None:
        """Remove parts starting after ``step`` (left by an interrupted session) and empty buffers."""
        for table in TABLES:
            for name in self.storage.list(f"metrics/{table}"):
                m = _PART_RE.match(name)
                if m and int(m.group(1)) > step:
                    self.storage.remove(f"metrics/{table}/{name}")
            self.buffers[table].clear()


def read_table(storage: RunStorage, table: str) -> pd.DataFrame:
    """All parts of ``table`` in step order (an empty frame when there are none)."""
    names = [n for n in storage.list(f"metrics/{table}") if _PART_RE.match(n)]
    frames = [pd.read_parquet(io.BytesIO(storage.read_bytes(f"metrics/{table}/{n}"))) for n in names]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
