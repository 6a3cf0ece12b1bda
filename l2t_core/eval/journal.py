"""Sampled completions kept as they are made, so that an evaluation cut short resumes where it
stopped (``l2t eval``).

:class:`SampleJournal` appends the completions of each engine call (one chunk of prompts, seeded
by where it starts: :func:`~l2t_core.eval.runner.sample_responses`) to a JSONL file, flushed and
synced, under a header that names what is sampled: a digest of the prompts and the sampling
settings. A rerun of the same evaluation reads the chunks already made and samples only the
others; since a chunk's seed depends on its start alone, the result is an uninterrupted run's. A
journal of other prompts or settings is started over; a line cut by a crash, and what follows it,
is dropped (those chunks are sampled again).

A journal has one writer: :func:`held` takes an advisory lock beside it for as long as it is
written, and a second process that would write it (a second ``l2t eval`` into the same ``--out``,
two pipeline steps evaluating the same weights) is refused at once (:class:`JournalInUse`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Sequence

from ..atomic_files import write_text_atomic
from ..rollout.base import Completion

log = logging.getLogger(__name__)


class JournalInUse(RuntimeError):
    """Another process holds the lock of the journal: it is writing those samples now."""


@contextmanager
def held(lock: str | os.PathLike, who: str) -> Iterator[None]:
    """Hold the lock file ``lock`` (``flock``, exclusive, never waiting) while the journals it
    guards are written; ``who`` (what this process is) is written into it for the message of a
    process it refuses. Raises :class:`JournalInUse`, naming the holder, where another process
    holds it. On release the file is removed while still held (a process that opened it
    meanwhile finds its lock on a removed file and takes the new one: checked by inode), and so
    are its directory and the directories this call made, where nothing else is in them. The lock
    is the kernel's: a holder killed with ``kill -9`` blocks nobody. On a filesystem without
    ``flock`` (NFS without a lock service, some FUSE mounts) the journals are written unlocked,
    with a warning. (On NFS Linux maps ``flock`` onto POSIX locks, which are the process's: one
    process must not hold the same lock twice.)"""
    lock = Path(lock)
    made = []  # the directories this call makes, deepest first: removed on release where left empty
    for d in (lock.parent, *lock.parent.parents):
        if d.exists():
            break
        made.append(d)
    fd: int | None = None
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
        except FileNotFoundError:  # the directory removed by a holder that found it empty: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with suppress(OSError):
                holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise JournalInUse(f"{lock} is held by {holder or 'another process'}") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ...: no locks on this filesystem
            log.warning("the filesystem of %s has no locks (%s): its journals are written without one; run one "
                        "writer into it at a time", lock.parent, exc)
            break
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # its holder removed it after this process opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{who} (pid {os.getpid()} on {socket.gethostname()})".encode())
        yield
    finally:
        with suppress(FileNotFoundError):
            lock.unlink()
        for d in dict.fromkeys([lock.parent, *made]):  # nor an empty directory (one holding journals stays)
            with suppress(OSError):
                d.rmdir()
        os.close(fd)  # releases the lock


def journal_lock(journal: str | os.PathLike) -> Path:
    """The lock file (:func:`held`) of the journal at ``journal``, beside it: ``<name>.lock``."""
    return Path(journal).with_suffix(".lock")


def journal_key(prompts: Sequence[Sequence[int]], sampling: dict) -> dict:
    """What a journal holds samples of: the prompts (a digest of their token ids, and how many)
    and the sampling settings (JSON-able values)."""
    digest = hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()
    return {"prompts": digest, "count": len(prompts), "sampling": sampling}


class SampleJournal:
    """The JSONL journal at ``path``: a header line (the :func:`journal_key`), then one line per
    chunk, ``{"start": s, "groups": [[[response_ids], text, finished], ...]}``."""

    def __init__(self, path: str | os.PathLike, context: dict | None = None):
        """``context``: what else the samples depend on (the model's weights, the device), part of the key."""
        self.path = Path(path)
        self.context = dict(context or {})
        self._key: dict | None = None

    def begin(self, key: dict, prompts: Sequence[Sequence[int]]) -> dict[int, list[list[Completion]]]:
        """Open the journal for samples of ``key`` (with the journal's ``context``); the chunks it
        already holds for that key (by start), rebuilt as completions of ``prompts``. Any other
        journal at the path is replaced."""
        key = json.loads(json.dumps({**key, "context": self.context}))  # as the header reads back (tuples: lists)
        self._key = key
        done: dict[int, list[list[Completion]]] = {}
        lines = self.path.read_text().split("\n") if self.path.is_file() else []
        header = _parse(lines[0]) if lines else None
        if header != {"key": key}:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"key": key}) + "\n")
            return done
        kept = [lines[0]]
        for line in lines[1:]:
            chunk = _parse(line)
            if chunk is None or not isinstance(chunk.get("start"), int) or not isinstance(chunk.get("groups"), list):
                break  # cut by a crash: it and what follows are sampled again
            start = chunk["start"]
            done[start] = [[Completion(prompt_ids=list(prompts[start + i]), response_ids=ids, text=text,
                                       finished=finished) for ids, text, finished in group]
                           for i, group in enumerate(chunk["groups"])]
            kept.append(line)
        if len(kept) < len(lines) - (lines[-1] == ""):  # drop the torn tail, so appends follow whole lines
            write_text_atomic(self.path, "\n".join(kept) + "\n")
        return done

    def record(self, start: int, groups: Sequence[Sequence[Completion]]) -> None:
        """Append the completions of the chunk that starts at prompt ``start`` (synced to disk)."""
        if self._key is None:
            raise RuntimeError("SampleJournal.record before begin")
        line = {"start": start, "groups": [[[c.response_ids, c.text, c.finished] for c in g] for g in groups]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Drop the journal (its samples are in the report now)."""
        self.path.unlink(missing_ok=True)


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
