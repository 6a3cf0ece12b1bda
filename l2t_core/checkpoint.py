"""Atomic checkpoints on any fsspec URL (a local path by default; ``s3://`` through s3fs).

Layout of a run directory ``<out>``::

    <out>/checkpoints/step-000010/      model (save_pretrained), tokenizer, train_config.json,
                                        trainer_state.pt, engine state, COMPLETE
    <out>/checkpoints/LATEST            the name of the newest complete checkpoint

Writing is two-phase, so an interrupted write never becomes "latest":

1. on local disks everything is written into ``<out>/checkpoints/.tmp-step-000010-<uuid>`` (with
   ``COMPLETE`` last) and that directory is renamed to ``step-000010`` (atomic); on object stores
   it is written to a local temporary directory and uploaded, ``COMPLETE`` last (the upload is not
   atomic, the marker makes it so);
2. only then is the ``LATEST`` pointer replaced (through a temporary file and a rename on local
   disks; a single object PUT, which is atomic, on object stores).

A multi-rank run (DeepSpeed) on an object store uploads every rank's engine shard straight into
the checkpoint's URL (:meth:`RunStorage.upload_into_checkpoint`); rank 0 then adds its files with
:meth:`RunStorage.complete_uploaded_checkpoint`, ``COMPLETE`` last, so the marker again makes the
whole directory appear at once.

:func:`latest_checkpoint` trusts ``LATEST`` only when the directory it names has ``COMPLETE``; it
otherwise falls back to the newest complete ``step-*`` directory, so a crash at any point leaves
the previous checkpoint usable. A process killed mid-write (``kill -9``, preemption) leaves only a
``.tmp-*`` directory in the run directory on local disks, and on object stores a ``step-*``
directory without ``COMPLETE``; the next checkpoint written removes either. Deleting a checkpoint
(pruning, or replacing a directory of the same step) removes its ``COMPLETE`` first, so a deletion
cut short never leaves a half-deleted directory that looks complete.

A run URL never carries credentials (:mod:`l2t_core.urls`): the run's URLs end up in its
``train_config.json``, the warehouse, metadata and logs, so :class:`RunStorage` refuses one that
has them; the backend gets them from the environment or ``storage_options``.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .urls import redact_url, refuse_credentials

log = logging.getLogger("l2t.checkpoint")

COMPLETE = "COMPLETE"
LATEST = "LATEST"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


class RunStorage:
    """A run directory on any fsspec filesystem; knows how to write and find checkpoints."""

    def __init__(self, url: str, storage_options: dict | None = None):
        """``url``: the run directory, a local path or an fsspec URL without credentials in it (one
        with ``user:password@``, a token or a signature is refused before anything is opened:
        :class:`~l2t_core.urls.CredentialsInURL`); ``storage_options``: the filesystem's keyword
        arguments (credentials among them), passed to fsspec and never shown."""
        if not url or not str(url).strip():
            raise ValueError("RunStorage: the run URL is empty; give a local path or an fsspec URL like s3://bucket/run")
        refuse_credentials(str(url), "RunStorage")
        self.url = str(url).rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise ValueError(
                f"cannot open run storage {self.url!r}: {exc}. For s3:// install the 'pipeline' extra (s3fs)."
            ) from exc
        except OSError as exc:  # a filesystem that connects when created (ftp, sftp): host down or refusing
            raise OSError(
                f"cannot open run storage {self.url!r} ({type(exc).__name__}: {exc}); check the host and port, "
                "and the credentials in the environment (AWS_ACCESS_KEY_ID, FSSPEC_<PROTOCOL>_<OPTION>, ...) or "
                "storage_options"
            ) from exc
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        """A path inside the run directory as the filesystem names it (no ``s3://``)."""
        return "/".join([self.root, *parts])

    def url_of(self, path: str) -> str:
        """The URL of a path of :meth:`path` that a person or another tool can use: the local path
        itself; elsewhere the run's own URL (its protocol, host and options as given, e.g.
        ``s3://bucket/run``) followed by the path inside the run directory. Values to return and
        log; :meth:`fs_path` turns one back into the filesystem's form."""
        if self.is_local:
            return path
        if path == self.root or path.startswith(self.root + "/"):
            return self.url + path[len(self.root):]
        return self.fs.unstrip_protocol(path)

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    def check_writable(self) -> None:
        """Fail before any compute when the run URL cannot be written (bad bucket, no permission).
        A local run directory the probe had to create is removed again: a launch refused by a later
        check (bad data, a prompt over the limit) leaves nothing behind."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            created = self.is_local and not self.fs.exists(self.root)
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
            if created:
                self.fs.rmdir(self.root)
        except Exception as exc:  # noqa: BLE001 - any backend error means "unusable"
            raise OSError(
                f"the run directory {self.url!r} is not writable ({type(exc).__name__}: {exc}); "
                "check the path or bucket, and credentials in the environment (AWS_ACCESS_KEY_ID, ...)"
            ) from exc

    # ------------------------------------------------------------------ small files
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``<root>/<rel>`` atomically (temporary file + rename on local disks)."""
        dest = self.path(rel)
        parent = dest.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            try:
                self.fs.pipe_file(tmp, data)
                Path(tmp).replace(dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)  # a failed write leaves nothing behind
                raise
        else:
            self.fs.pipe_file(dest, data)  # one PUT: atomic on object stores

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list(self, rel: str) -> list[str]:
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in self.fs.ls(p, detail=False))

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    # ------------------------------------------------------------------ checkpoints
    def _step_dirs(self) -> list[tuple[str, int, bool]]:
        """(name, step, whether it has ``COMPLETE``) of every ``step-*`` directory under ``checkpoints``."""
        found = []
        for name in self.list("checkpoints"):
            m = _STEP_RE.match(name)
            if m:
                found.append((name, int(m.group(1)), self.fs.exists(self.path("checkpoints", name, COMPLETE))))
        return found

    def complete_steps(self) -> list[int]:
        return sorted(step for _, step, complete in self._step_dirs() if complete)

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """(step, URL) of the newest complete checkpoint, or None when the run has none."""
        if self.exists(f"checkpoints/{LATEST}"):
            name = self.read_bytes(f"checkpoints/{LATEST}").decode().strip()
            m = _STEP_RE.match(name)
            if m and self.fs.exists(self.path("checkpoints", name, COMPLETE)):
                return int(m.group(1)), self.url_of(self.path("checkpoints", name))
            log.warning("LATEST names %r, which is not a complete checkpoint; scanning for one", name)
        steps = self.complete_steps()
        if not steps:
            return None
        return steps[-1], self.checkpoint_url(steps[-1])

    def checkpoint_url(self, step: int) -> str:
        return self.url_of(self.path("checkpoints", checkpoint_name(step)))

    def clear_checkpoint(self, step: int) -> None:
        """Remove whatever stands under checkpoint ``step``'s name (a stale complete one, or the
        files of an upload cut short), ``COMPLETE`` first."""
        self._remove_checkpoint(self.path("checkpoints", checkpoint_name(step)))

    def upload_into_checkpoint(self, step: int, local: Path) -> None:
        """Object stores: upload the files under the local directory ``local`` into checkpoint
        ``step``'s URL, keeping their relative paths. The checkpoint stays incomplete (no
        ``COMPLETE``) until :meth:`complete_uploaded_checkpoint` adds the rest: a multi-rank save,
        where every rank uploads its own engine shard. Local run directories take the shards by
        rename instead (the trainer's staging directory), so they refuse this."""
        if self.is_local:
            raise ValueError(f"upload_into_checkpoint is for object stores; {self.url!r} is a local directory")
        if any(p.is_file() for p in Path(local).rglob("*")):
            self.fs.put(str(local).rstrip("/") + "/", self.path("checkpoints", checkpoint_name(step)) + "/",
                        recursive=True)

    def write_checkpoint(self, step: int, fill: Callable[[Path], None], keep: int | None = None) -> str:
        """Write checkpoint ``step``: ``fill(local_dir)`` puts every file into a temporary local
        directory (a ``.tmp-*`` one inside the run directory on local disks, one under ``TMPDIR``
        for object stores); it is then published atomically (see the module docstring), replacing
        whatever stood under its name. Returns its URL; ``keep``: :meth:`prune` to that many."""
        return self._write_checkpoint(step, fill, keep, uploaded=False)

    def complete_uploaded_checkpoint(self, step: int, fill: Callable[[Path], None], keep: int | None = None) -> str:
        """Object stores: add ``fill``'s files to checkpoint ``step``, whose other files (every
        rank's engine shard) :meth:`upload_into_checkpoint` put there, and publish it, ``COMPLETE``
        last, as :meth:`write_checkpoint` does."""
        if self.is_local:
            raise ValueError(f"complete_uploaded_checkpoint is for object stores; {self.url!r} is a local directory")
        return self._write_checkpoint(step, fill, keep, uploaded=True)

    def _write_checkpoint(self, step: int, fill: Callable[[Path], None], keep: int | None, uploaded: bool) -> str:
        name = checkpoint_name(step)
        self._remove_stale_temporaries()
        final = self.path("checkpoints", name)
        self.fs.makedirs(self.checkpoints, exist_ok=True)
        if self.is_local:
            # filled in place under a temporary name on the run's own filesystem (no second copy,
            # and a killed write leaves nothing outside the run directory); COMPLETE is inside the
            # directory, which appears under its final name in one rename
            staging = Path(self.path("checkpoints", f".tmp-{name}-{uuid.uuid4().hex[:8]}"))
            staging.mkdir()
            try:
                fill(staging)
                (staging / COMPLETE).write_text(f"{step}\n")
                if self.fs.exists(final):
                    self._remove_checkpoint(final)
                staging.rename(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        else:
            with tempfile.TemporaryDirectory(prefix=f"l2t-{name}-") as tmp:
                local = Path(tmp) / name
                local.mkdir()
                fill(local)
                if not uploaded:
                    self.clear_checkpoint(step)
                self.fs.put(str(local) + "/", final + "/", recursive=True)
                self.fs.pipe_file(f"{final}/{COMPLETE}", f"{step}\n".encode())  # written last
        self.write_bytes(f"checkpoints/{LATEST}", f"{name}\n".encode())
        log.info("checkpoint %s written to %s", name, redact_url(self.url_of(final)))
        self._remove_incomplete(but=step)
        if keep:
            self.prune(keep)
        return self.url_of(final)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints up to the one ``latest_checkpoint``
        names (never that one). Complete checkpoints newer than it are deleted too: a session killed
        between renaming its directory into place and replacing ``LATEST`` leaves one, the run then
        resumed from an older checkpoint (and dropped that session's metrics), so it is stale."""
        if keep < 1:
            raise ValueError(f"prune(keep={keep}): keep at least the latest checkpoint (keep >= 1)")
        latest = self.latest_checkpoint()
        if latest is None:
            return
        steps = self.complete_steps()
        newer = [s for s in steps if s > latest[0]]
        older = [s for s in steps if s <= latest[0]]
        for s in newer + older[:-keep]:
            self._remove_checkpoint(self.path("checkpoints", checkpoint_name(s)))

    def _remove_checkpoint(self, url: str) -> None:
        """Delete a checkpoint directory, its ``COMPLETE`` marker first."""
        marker = f"{url}/{COMPLETE}"
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(url):
            self.fs.rm(url, recursive=True)

    def _remove_incomplete(self, but: int) -> None:
        """Delete every ``step-*`` directory other than ``but``'s that has no ``COMPLETE``: the
        files of a save cut short on an object store (some ranks' engine shards; there is no
        rename there), or a deletion cut short after its marker went. With one writer per run and
        checkpoint ``but`` just published, none of them is still being written."""
        for name, step, complete in self._step_dirs():
            if step != but and not complete:
                log.info("removing %s: an incomplete checkpoint (a save or deletion cut short)", name)
                self._remove_checkpoint(self.path("checkpoints", name))

    def _remove_stale_temporaries(self) -> None:
        for name in self.list("checkpoints"):
            if name.startswith(".tmp-"):
                self.remove(f"checkpoints/{name}")

    @contextmanager
    def local_copy(self, url: str) -> Iterator[Path]:
        """A local directory holding the checkpoint at ``url`` (the directory itself when local)."""
        if self.is_local:
            yield Path(url)
            return
        with tempfile.TemporaryDirectory(prefix="l2t-ckpt-") as tmp:
            self.download(url, Path(tmp))
            yield Path(tmp)

    def download(self, url: str, dest: Path) -> None:
        """Copy the directory at ``url`` (on this storage's filesystem: a URL :meth:`url_of` gave,
        or a path of :meth:`path`) into the local ``dest``."""
        self.fs.get(self.fs_path(url).rstrip("/") + "/", str(dest).rstrip("/") + "/", recursive=True)

    def fs_path(self, url: str) -> str:
        """The filesystem's own form of a URL inside the run directory (the inverse of
        :meth:`url_of`; a chained ``simplecache::s3://`` URL included); anything else unchanged."""
        if not self.is_local and (url == self.url or url.startswith(self.url + "/")):
            return self.root + url[len(self.url):]
        return url
