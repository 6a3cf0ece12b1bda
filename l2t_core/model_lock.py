"""A model directory in use: shared by the jobs that read it, exclusive to the job that rebuilds it.

The pipeline rebuilds a base model in place (a warm start rewrites its weights, an SFT swaps a new
directory in) while training runs, rollouts and evaluations of that model may be reading it. A
training run could then load half-written weights, fingerprint the old weights and train on the
new ones, or, resumed, load a reference policy other than the one it started with.
:func:`using_model` takes an advisory lock (``flock``) on a file beside the directory (a
rebuild replaces the directory itself): any number of readers hold it shared, a rebuild holds
it exclusively, and neither waits: one that cannot have it raises :class:`ModelInUse`, naming the
holders, at once (a rebuild waiting behind a training run would wait for hours, unseen).

The lock is ``.locks/<name>.lock`` beside the model directories. Each holder also leaves a note
(``.locks/<name>.users/<host>-<pid>-<n>``: what it is) for that message, best effort (a note that
cannot be written is left out). The lock itself is the kernel's and ends with its process, so a
holder killed with ``kill -9`` blocks nobody; its note stays until an exclusive holder clears every
note (none can be live then) or a refused job on the same host finds its process gone. The lock
works between processes of one machine and, on a shared volume that supports ``flock`` (NFSv4:
Linux maps it to a byte-range lock), between machines. On such a volume the locks are the
process's, not the open file's: one process must not hold the same model twice (the pipeline's
steps hold each model once), since closing either would release both. (``filelock``, which the
warehouse uses, has exclusive locks only; its ``ReadWriteLock`` is an SQLite database, which
SQLite advises against on network filesystems.)
"""

from __future__ import annotations

import fcntl
import itertools
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_COUNTER = itertools.count()


class ModelInUse(RuntimeError):
    """The model directory is locked by another job in a way that excludes this one."""


LOCKS = ".locks"  # beside the model directories: a rebuild may replace a model's directory


def lock_path(model_dir: Path) -> Path:
    """The lock file of ``model_dir``: ``<parent>/.locks/<name>.lock``."""
    return model_dir.parent / LOCKS / f"{model_dir.name}.lock"


def _notes_dir(model_dir: Path) -> Path:
    return model_dir.parent / LOCKS / f"{model_dir.name}.users"


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holders(model_dir: Path) -> list[str]:
    """What the live holders of ``model_dir``'s lock said they are, sorted; notes of dead
    processes on this host are removed (those of other hosts are listed as they are)."""
    notes = _notes_dir(model_dir)
    host = socket.gethostname()
    out = []
    for note in sorted(notes.glob("*")) if notes.is_dir() else []:
        note_host, _, pid = note.name.rpartition("-")[0].rpartition("-")  # <host>-<pid>-<n>
        if note_host == host and pid.isdigit() and not pid_alive(int(pid)):
            note.unlink(missing_ok=True)
            continue
        try:
            out.append(note.read_text())
        except OSError:  # removed by its holder meanwhile
            continue
    return out


@contextmanager
def building_model(model_dir: str | Path, *, who: str) -> Iterator[None]:
    """Hold the right to build ``model_dir`` (exclusive, ``.locks/<name>.build.lock``): one build
    of a model at a time, whatever launched it (two would train into the same staging directory
    and remove each other's work), while readers go on; :class:`ModelInUse` at once where another
    build holds it."""
    model_dir = Path(model_dir)
    with _hold(model_dir.with_name(f"{model_dir.name}.build"), True, who, "building",
               lambda by: f"cannot build {model_dir}: another build of it is running ({by}); run this again once "
                          f"it is done"):
        yield


@contextmanager
def using_model(model_dir: str | Path, *, exclusive: bool, who: str) -> Iterator[None]:
    """Hold ``model_dir`` shared (to read it) or ``exclusive`` (to rebuild it) for the ``with``
    block; ``who`` says what holds it, for another job's error. Raises :class:`ModelInUse` at once
    where a holder excludes this one."""
    model_dir = Path(model_dir)

    def refused(by: str) -> str:
        if exclusive:
            return (f"cannot rebuild {model_dir}: it is in use by {by}. Rebuilding would change the weights under "
                    f"them; run this again once they are done, or cancel them")
        return f"cannot read {model_dir}: it is being rebuilt by {by}. Run this again once that is done"

    with _hold(model_dir, exclusive, who, "rebuilding" if exclusive else "reading", refused):
        yield


@contextmanager
def _hold(model_dir: Path, exclusive: bool, who: str, doing: str, refused: Callable[[str], str]) -> Iterator[None]:
    """The lock of ``model_dir`` (:func:`lock_path`) with this holder's note (``who``, ``doing``);
    where it is taken, :class:`ModelInUse` with ``refused(what holds it)``."""
    path = lock_path(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # opened for writing: NFS maps flock onto byte-range locks, and an exclusive one needs a file open for
    # writing; a reader may make do with read-only where another user made the file. Not inherited by
    # subprocesses.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except PermissionError:
        if exclusive:
            raise PermissionError(f"cannot open {path} for writing, which an exclusive lock needs (on NFS); "
                                  f"make it writable for this user") from None
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            others = holders(model_dir)
            by = "; ".join(others) if others else "a job that left no note (another host, or one just starting)"
            raise ModelInUse(refused(by)) from None
        notes = _notes_dir(model_dir)
        if exclusive:  # nobody else holds the lock: every note left is a dead holder's
            for stale in notes.glob("*") if notes.is_dir() else []:
                stale.unlink(missing_ok=True)
        note: Path | None = notes / f"{socket.gethostname()}-{os.getpid()}-{next(_COUNTER)}"
        try:
            notes.mkdir(exist_ok=True)
            note.write_text(f"{who} ({doing}, pid {os.getpid()})")
        except OSError:  # the note only names this holder in another job's error; the lock is what counts
            note = None
        try:
            yield
        finally:
            if note is not None:
                note.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock
