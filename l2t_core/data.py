"""Where benchmark data lives, and reading its JSONL files with validation.

The data directory is configurable: ``L2T_DATA_DIR`` (CI and ``make`` point it at
``../shared/data``), else ``./data``. The files are never part of this repository. Real users
without a local copy fetch each set from its public hub id (the full loaders, including the hub
fallback, live in the evaluation package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "L2T_DATA_DIR"


def data_dir() -> Path:
    """The configured data directory (it may not exist; :func:`data_file` says so clearly)."""
    return Path(os.environ.get(ENV_VAR, "data")).expanduser().resolve()


def data_file(name: str) -> Path:
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {name!r} not found in the data directory {data_dir()}; set {ENV_VAR} to the "
            "folder that holds the benchmark JSONL files (e.g. ../shared/data)"
        )
    return path


REQUIRED_MATH_FIELDS = ("id", "problem", "answer")


def read_math_jsonl(name: str) -> list[dict]:
    """Rows of a math JSONL file ``{id, problem, answer, solution, meta}``, validated: every line is
    a JSON object with non-empty ``id``/``problem``/``answer`` strings and ids are unique. Errors name
    the file, the line and the field."""
    path = data_file(name)
    rows, seen = [], {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            for f in REQUIRED_MATH_FIELDS:
                v = row.get(f)
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(f"{path}:{line_no}: field {f!r} must be a non-empty string, got {v!r}")
            if row["id"] in seen:
                raise ValueError(f"{path}:{line_no}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
            seen[row["id"]] = line_no
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    return rows
