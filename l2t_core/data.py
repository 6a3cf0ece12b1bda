"""Where benchmark data lives, and reading its JSONL files with validation.

The data directory is configurable: ``L2T_DATA_DIR`` (CI and ``make`` point it at
``../shared/data``), else ``./data``. The files are never part of this repository. Real users
without a local copy fetch each set from its public hub id (the full loaders, including the hub
fallback, live in the evaluation package).
"""

from __future__ import annotations

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
    """Rows of the math JSONL file ``name`` in the data directory, validated (:func:`read_math_file`),
    unpaired surrogate escapes let through: the pipeline's schema check quarantines those rows, all
    of them listed (its ``datasets`` asset reads benchmark files with this)."""
    return read_math_file(data_file(name), check_text=False)


def read_math_file(path: Path, *, check_text: bool = True) -> list[dict]:
    """Rows of a math JSONL file ``{id, problem, answer, solution, meta}``, validated: every line is
    a JSON object with non-empty ``id``/``problem``/``answer`` strings and ids are unique. Errors name
    the file, the line and the field, an unpaired surrogate escape (text no tokenizer or file can
    take) included unless ``check_text`` is off."""
    # bytes per line, as the benchmark loaders read: bad UTF-8, deep nesting and huge numbers fail
    # with the file, the line and the field (DatasetError is a ValueError)
    from .eval.datasets import DatasetError, json_lines

    rows, seen = [], {}
    for line_no, row in json_lines(path, check_text=check_text):
        for f in REQUIRED_MATH_FIELDS:
            v = row.get(f)
            if not isinstance(v, str) or not v.strip():
                shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
                raise DatasetError(f"must be a non-empty string, got {shown}", path=path, line=line_no, field=f)
        if row["id"] in seen:
            raise DatasetError(f"duplicate id {row['id'][:80]!r} (first on line {seen[row['id']]})", path=path,
                               line=line_no, field="id")
        seen[row["id"]] = line_no
        rows.append(row)
    if not rows:
        raise DatasetError("the file has no rows", path=path)
    return rows
