"""Local files written whole or not at all.

Every report, config and data file the project writes on local disk goes through here: the
content is written to a uniquely named temporary file beside the destination (same directory, so
the rename cannot cross file systems), flushed to disk, and renamed over the destination (the
directory synced after it). With ``overwrite=False`` it is hard-linked in instead, which fails if
the name exists, so an existing file is never replaced even by a writer racing this one. A
reader sees the old file or the new one, never a half-written one; a failure (a value that does
not serialise, a full disk, an interrupt) removes the temporary file and leaves the destination as
it was. Run directories on fsspec URLs have their own staging (:mod:`l2t_core.checkpoint`).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Iterable

def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """``text`` (UTF-8) at ``path``, whole or not at all; its directory is created. With
    ``overwrite=False`` an existing file is refused (:class:`FileExistsError`), never replaced."""
    return _write(Path(path), lambda fh: fh.write(text), overwrite)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """``data`` at ``path``, whole or not at all (:func:`write_text_atomic`)."""
    return _write(Path(path), lambda fh: fh.write(data), overwrite, binary=True)


def save_figure_atomic(fig, path: str | os.PathLike, **savefig) -> Path:
    """A matplotlib figure as an image at ``path`` (its format from the suffix), whole or not at all."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    return write_bytes_atomic(path, buf.getvalue())


def write_parquet_atomic(frame, path: str | os.PathLike, **to_parquet) -> Path:
    """A pandas DataFrame as a parquet file at ``path``, whole or not at all."""
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, **to_parquet)
    return write_bytes_atomic(path, buf.getvalue())


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


def cannot_create(path: str | os.PathLike) -> str | None:
    """Why nothing could be created at ``path``, checked without creating anything: its nearest
    existing ancestor (``path`` itself where it exists; a dangling link counts as existing) is a
    file, or a directory this user cannot write. None where it can be created."""
    existing = Path(path)
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable for this user"
    return None


def _write(path: Path, write, overwrite: bool, binary: bool = False) -> Path:
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; choose another path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # created new (O_EXCL) with mode 0o666 under the process's umask, as open() would create the file
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a crash
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there (a hard link fails on an existing name:
    no window between the check and the rename), then drop ``tmp``; on a file system without hard
    links, check and rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; choose another path or remove it") from None
    except OSError:
        if path.exists():
            raise FileExistsError(f"{path} already exists; choose another path or remove it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
