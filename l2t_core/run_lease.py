"""One trainer at a time in a run directory.

Two trainers in one run directory would prune each other's checkpoints, drop each other's metrics
on resume and interleave their steps. That happens when a job outlives the step that launched it
(a run worker killed outright, a pod that Kubernetes kept) and the step is launched again. The
launchers stop such orphans (:mod:`l2t_core.launcher_watch`, the pod's ownerReferences); the
lease is what holds when they could not. :class:`RunLease` takes it before the trainer writes
anything and keeps it until the trainer ends.

* **A local run directory**: an exclusive ``flock`` on ``<run>/.lease.lock``, the kernel's, so it
  ends with its process (``kill -9`` included) and a relaunch never waits for a dead holder. The
  holder also writes who it is into ``lease.json`` for the message another trainer gets. On a
  shared volume this excludes trainers on other machines only where the volume's locks are
  shared (NFSv4, or NFSv3 with its lock service; not an NFS mount with ``nolock``/``local_lock``
  or most FUSE mounts). A filesystem that refuses ``flock`` gets the object-store lease instead.
* **An object store** (``s3://``, ...: no locks): ``lease.json`` names its holder (a random token,
  host, pid) and a heartbeat counter that the holder's thread advances every ``ttl_s / 4``. A
  trainer that finds another's lease watches the counter: one that stands still for ``ttl_s``
  belongs to a dead trainer (a crashed pod) and is taken over; one that moves is alive, and after
  ``wait_s`` the trainer gives up. No clocks of two machines are compared, only the counter. A
  lease is written, then read back after a pause: of two trainers that wrote at once, the one
  that reads the other's token waits as above. This is best effort, not a mutex (fsspec has no
  conditional write): two writes slower than the pause can both read back their own, and a
  holder whose heartbeats fail for ``ttl_s`` is taken over. A holder that finds another's token
  at a heartbeat has lost the lease: :meth:`RunLease.check` stops it at its next step or
  checkpoint.

A trainer that cannot have the lease within ``wait_s`` raises :class:`RunInUse`, naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .checkpoint import RunStorage
from .urls import redact_url

log = logging.getLogger("l2t.run_lease")

LEASE_FILE = "lease.json"
LOCK_FILE = ".lease.lock"
TTL_S = 60.0  # object stores: a heartbeat counter standing still this long belongs to a dead trainer
SETTLE_S = 2.0  # object stores: between writing a lease and reading it back
POLL_S = 1.0  # local: between two tries of a held lock


class RunInUse(RuntimeError):
    """The run directory is being trained by another trainer (or this one lost it to another)."""


def describe(lease: dict | None) -> str:
    """The holder a lease names, in words."""
    if not lease:
        return "another trainer (it has not said which)"
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(lease.get("started", 0)))
    return f"pid {lease.get('pid')} on host {lease.get('host')!r} (since {started})"


class RunLease:
    """The lease of one run directory (see the module's docstring): :meth:`acquire` before writing
    into it, :meth:`check` before each write, :meth:`release` at the end."""

    def __init__(self, storage: RunStorage, ttl_s: float | None = None, wait_s: float | None = None,
                 settle_s: float | None = None):
        """``ttl_s`` (default :data:`TTL_S`), ``wait_s`` (default twice ``ttl_s``) and ``settle_s``
        (default :data:`SETTLE_S`) as the module's docstring says."""
        self.storage = storage
        self.ttl_s = TTL_S if ttl_s is None else ttl_s
        self.heartbeat_s = self.ttl_s / 4
        self.wait_s = 2 * self.ttl_s if wait_s is None else wait_s
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._mine: dict | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._mine is not None

    # ------------------------------------------------------------------ the note
    def _read(self) -> dict | None:
        try:
            data = json.loads(self.storage.read_bytes(LEASE_FILE))
        except (FileNotFoundError, ValueError):  # none, or torn or foreign (not JSON, not UTF-8): names nobody
            return None
        return data if isinstance(data, dict) and "token" in data else None

    def _write(self) -> None:
        self.storage.write_bytes(LEASE_FILE, json.dumps(self._mine).encode())

    def _in_use(self, held: dict | None, heartbeat: bool) -> RunInUse:
        return RunInUse(
            f"the run directory {redact_url(self.storage.url)} is being trained by {describe(held)}, and this trainer "
            f"waited {self.wait_s:g} s for it. Stop that trainer (or let it finish) and launch again"
            + (f"; a trainer that died frees it {self.ttl_s:g} s after its last heartbeat" if heartbeat else ""))

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> None:
        """Hold the run directory (see the module's docstring); :class:`RunInUse` when another
        trainer holds it for ``wait_s``."""
        if self.held:
            return
        self.lost = None
        try:
            locked = self.storage.is_local and self._lock_local()
            if not locked:
                self._lease_remote()
        except BaseException:
            self._unlock_local()
            self._mine = None
            raise
        self._stop.clear()
        if not locked:
            self._thread = threading.Thread(target=self._beat, name="l2t-run-lease", daemon=True)
            self._thread.start()

    def _note(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "beat": 0}

    def _lock_local(self) -> bool:
        """Hold the local run directory's lock; False where its filesystem has no ``flock`` (then
        the lease file and its heartbeat hold it, as on an object store)."""
        self.storage.fs.makedirs(self.storage.root, exist_ok=True)
        fd = os.open(Path(self.storage.root) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = fd
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as exc:  # ENOLCK (NFS without a lock service), EOPNOTSUPP (some FUSE mounts), ...
                log.warning("the filesystem of %s has no locks (%s): holding it with a lease file and a heartbeat "
                            "instead", redact_url(self.storage.url), exc)
                self._unlock_local()
                return False
            if time.monotonic() >= deadline:
                raise self._in_use(self._read(), heartbeat=False)
            if not said:
                log.warning("the run directory %s is held by %s; waiting up to %g s for it",
                            redact_url(self.storage.url), describe(self._read()), self.wait_s)
                said = True
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        self._mine = self._note()
        self._write()
        return True

    def _lease_remote(self) -> None:
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            held = self._read()
            if held is not None and held.get("token") != self.token:
                if not said:
                    log.warning("the run directory %s is held by %s; waiting up to %g s for it (or for its heartbeat "
                                "to stop for %g s)", redact_url(self.storage.url), describe(held), self.wait_s,
                                self.ttl_s)
                    said = True
                if not self._stands_still(held, deadline):
                    if time.monotonic() >= deadline:
                        raise self._in_use(held, heartbeat=True)
                    continue
                log.warning("taking over the run directory %s from %s: its heartbeat stopped %g s ago",
                            redact_url(self.storage.url), describe(held), self.ttl_s)
            self._mine = self._note()
            self._write()
            time.sleep(self.settle_s)
            now = self._read()
            if now is not None and now.get("token") == self.token:
                return
            self._mine = None  # another trainer wrote at the same time and won: wait for it as for any holder
            if time.monotonic() >= deadline:
                raise self._in_use(now, heartbeat=True)

    def _stands_still(self, held: dict, deadline: float) -> bool:
        """Watch ``held``'s heartbeat for ``ttl_s``, no later than ``deadline``: True when it
        stood still all that time (its trainer is dead) or the lease was removed meanwhile."""
        until = time.monotonic() + self.ttl_s
        whole = until <= deadline
        until = min(until, deadline)
        while time.monotonic() < until:
            time.sleep(min(self.heartbeat_s, max(0.0, until - time.monotonic())))
            now = self._read()
            if now is None:
                return True
            if now.get("token") != held.get("token") or now.get("beat") != held.get("beat"):
                return False
        return whole

    # ------------------------------------------------------------------ holding it
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                now = self._read()
                if now is None or now.get("token") != self.token:
                    self.lost = describe(now) if now else "nobody (the lease was removed)"
                    log.error("lost the run directory %s to %s", redact_url(self.storage.url), self.lost)
                    return
                self._mine["beat"] += 1
                self._write()
            except Exception as exc:  # noqa: BLE001 - a transient storage error: the next beat tries again
                log.warning("could not renew the lease of %s (%s: %s)", redact_url(self.storage.url),
                            type(exc).__name__, exc)

    def check(self) -> None:
        """Raise :class:`RunInUse` when this trainer lost the lease: it must not write again."""
        if self.lost is not None:
            raise RunInUse(f"this trainer lost the run directory {redact_url(self.storage.url)} to {self.lost} (its "
                           f"heartbeat stalled for over {self.ttl_s:g} s): it stops without writing again, and the "
                           "other trainer goes on with the run")

    # ------------------------------------------------------------------ letting it go
    def _unlock_local(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock ends with the descriptor
            self._fd = None

    def release(self) -> None:
        """Stop the heartbeat, remove the note if it is still this trainer's and let go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.heartbeat_s)  # a beat stuck in a storage call is left behind
            self._thread = None
        if self._mine is None:
            return
        try:
            now = self._read()
            if now is not None and now.get("token") == self.token:
                self.storage.remove(LEASE_FILE)
        except Exception as exc:  # noqa: BLE001 - a note left behind names a holder that is gone; harmless
            log.warning("could not remove the lease of %s (%s: %s)", redact_url(self.storage.url),
                        type(exc).__name__, exc)
        finally:
            self._unlock_local()
            self._mine = None
