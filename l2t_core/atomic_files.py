"""Local files written whole or not at all.

Every report, config and data file the project writes on local disk goes through here: the
content is written to a uniquely named temporary file beside the destination (same directory, so
the rename cannot cross file systems), flushed to disk, and renamed over the destination. A
reader sees the old file or the new one, never a half-written one; a failure (a value that does
not serialise, a full disk, an interrupt) removes the temporary file and leaves the destination as
it was. Run directories on fsspec URLs have their own staging (:mod:`l2t_core.checkpoint`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

# the process's umask, read once: temporary files are created private (mkstemp), and get the mode an
# ordinary open() would have given the destination before they replace it
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """``text`` (UTF-8) at ``path``, whole or not at all; its directory is created. With
    ``overwrite=False`` an existing file is refused (:class:`FileExistsError`), never replaced."""
    return _write(Path(path), lambda fh: fh.write(text), overwrite)


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 1, overwrite: bool = True) -> Path:
    """``obj`` as JSON at ``path`` (:func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent), overwrite=overwrite)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict], *, overwrite: bool = True) -> Path:
    """``rows`` as JSON lines (non-ASCII kept as is) at ``path`` (:func:`write_text_atomic`);
    rows are serialised one at a time, so a row that does not serialise leaves nothing behind."""

    def write(fh) -> None:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    return _write(Path(path), write, overwrite)


def _write(path: Path, write, overwrite: bool) -> Path:
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; choose another path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if not overwrite and path.exists():  # appeared meanwhile: still never replaced
            raise FileExistsError(f"{path} already exists; choose another path or remove it")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
