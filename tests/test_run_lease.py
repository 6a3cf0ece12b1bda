"""One trainer at a time in a run directory (l2t_core.run_lease)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from l2t_core import run_lease
from l2t_core.checkpoint import RunStorage
from l2t_core.run_lease import LEASE_FILE, RunInUse, RunLease

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from l2t_core.checkpoint import RunStorage
from l2t_core.run_lease import RunLease
RunLease(RunStorage(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_local_run_directory_is_held_by_one_trainer_and_freed_at_once_by_a_killed_one(tmp_path):
    run = str(tmp_path / "run")
    first = RunLease(RunStorage(run))
    first.acquire()
    note = json.loads((tmp_path / "run" / LEASE_FILE).read_text())
    assert (note["pid"], note["host"]) == (os.getpid(), socket.gethostname())
    second = RunLease(RunStorage(run), wait_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(RunInUse, match=rf"{re.escape(run)} is being trained by pid {os.getpid()} on host .* waited "
                                       r"0.3 s for it. Stop that trainer"):
        second.acquire()
    assert time.monotonic() - t0 >= 0.3 and not second.held
    first.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists()
    second.acquire()  # free again
    second.release()

    # a holder in another process, killed outright: the kernel drops its lock, no waiting
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"pid {holder.pid} on host"):
            RunLease(RunStorage(run), wait_s=0.2).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = RunLease(RunStorage(run), wait_s=0.0)
    after.acquire()
    assert json.loads((tmp_path / "run" / LEASE_FILE).read_text())["token"] == after.token
    after.release()


def memory_run() -> RunStorage:
    """A run directory on fsspec's in-memory filesystem: an object store as far as the lease knows."""
    storage = RunStorage(f"memory://leases/{uuid.uuid4().hex}")
    assert not storage.is_local
    return storage


def test_an_object_store_lease_waits_out_a_live_holder_and_takes_over_a_dead_one():
    storage = memory_run()
    first = RunLease(storage, ttl_s=0.4, settle_s=0.05)
    first.acquire()
    time.sleep(0.3)
    assert json.loads(storage.read_bytes(LEASE_FILE))["beat"] >= 1  # the heartbeat moves
    t0 = time.monotonic()
    with pytest.raises(RunInUse, match=r"waited 1 s for it.*frees it 0.4 s after its last heartbeat"):
        RunLease(storage, ttl_s=0.4, wait_s=1.0, settle_s=0.05).acquire()
    assert time.monotonic() - t0 >= 1.0

    # the holder dies without letting go (a crashed pod): its heartbeat stands still, and after
    # ttl_s another trainer takes the run over
    first._stop.set()
    first._thread.join()
    second = RunLease(storage, ttl_s=0.4, wait_s=5.0, settle_s=0.05)
    t0 = time.monotonic()
    second.acquire()
    assert 0.4 <= time.monotonic() - t0 < 3.0
    assert json.loads(storage.read_bytes(LEASE_FILE))["token"] == second.token

    # the first was only stalled: at its next heartbeat it finds it lost the run, and stops
    first._stop.clear()
    first._thread = threading.Thread(target=first._beat, daemon=True)
    first._thread.start()
    first._thread.join(timeout=5)
    with pytest.raises(RunInUse, match=r"this trainer lost the run directory memory://leases/.* to pid"):
        first.check()
    first.release()  # leaves the second's lease alone
    assert json.loads(storage.read_bytes(LEASE_FILE))["token"] == second.token
    second.check()
    second.release()
    assert not storage.exists(LEASE_FILE)


def test_two_trainers_starting_at_once_on_an_object_store_get_one_lease():
    storage = memory_run()
    leases = [RunLease(storage, ttl_s=0.4, wait_s=1.0, settle_s=0.2) for _ in range(2)]
    outcome: dict[int, str] = {}

    def take(i: int) -> None:
        try:
            leases[i].acquire()
            outcome[i] = "held"
        except RunInUse:
            outcome[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["held", "refused"]
    for lease in leases:
        lease.release()


def test_a_trainer_refuses_a_run_directory_another_trainer_holds(tmp_path, monkeypatch, tiny_dir):
    """Trainer.run takes the lease before it writes anything (its resume prunes and drops); in a
    directory that holds a run, before it loads the model; and lets it go when it ends, also when
    it fails."""
    from l2t_core.config import TrainConfig
    from l2t_core.trainer import Trainer

    run = tmp_path / "run"
    cfg = TrainConfig.model_validate(dict(policy=str(tiny_dir), out=str(run), method="grpo", steps=1,
                                          prompts_per_step=2, rollout={"group_size": 2, "max_new_tokens": 8}))
    other = RunLease(RunStorage(str(run)))
    other.acquire()
    monkeypatch.setattr(run_lease, "TTL_S", 0.2)  # the trainer waits twice that
    with pytest.raises(RunInUse, match="is being trained by pid"):
        Trainer(cfg, show_progress=False).run()
    assert sorted(p.name for p in run.iterdir()) == [".lease.lock", LEASE_FILE]  # nothing written
    other.release()
    result = Trainer(cfg, show_progress=False).run()
    assert result.final_step == 1 and not (run / LEASE_FILE).exists()
    # a run directory that holds a run is held before the model loads (a relaunch beside a live
    # trainer would load it onto the same GPU)
    import l2t_core.trainer as trainer_module

    other.acquire()
    loaded = []
    monkeypatch.setattr(trainer_module, "load_policy", lambda *a, **k: loaded.append(a) or 1 / 0)
    with pytest.raises(RunInUse, match="is being trained by pid"):
        Trainer(cfg, show_progress=False).run()
    assert loaded == []
    other.release()
    with pytest.raises(ZeroDivisionError):  # it loads once free, and lets go when loading fails
        Trainer(cfg, show_progress=False).run()
    assert loaded and not (run / LEASE_FILE).exists()
    probe = RunLease(RunStorage(str(run)), wait_s=0.0)
    probe.acquire()  # it let go
    probe.release()


def test_a_filesystem_without_locks_gets_the_heartbeat_lease_and_a_failed_acquire_holds_nothing(tmp_path,
                                                                                                 monkeypatch):
    import errno

    run = str(tmp_path / "run")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lease.fcntl, "flock", no_locks)
    lease = RunLease(RunStorage(run), ttl_s=0.4, settle_s=0.05)
    lease.acquire()
    time.sleep(0.3)
    assert lease.held and json.loads((tmp_path / "run" / LEASE_FILE).read_text())["beat"] >= 1
    with pytest.raises(RunInUse, match="frees it 0.4 s after its last heartbeat"):
        RunLease(RunStorage(run), ttl_s=0.4, wait_s=0.5, settle_s=0.05).acquire()
    lease.release()
    monkeypatch.undo()

    # the note cannot be written (a full disk): nothing is held, and the next try starts afresh
    storage = RunStorage(run)
    failing = RunLease(storage)
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda rel, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError, match="full"):
        failing.acquire()
    assert not failing.held and failing._fd is None
    probe = RunLease(RunStorage(run), wait_s=0.0)
    probe.acquire()  # nobody holds the lock
    probe.release()
    monkeypatch.setattr(storage, "write_bytes", real_write)
    failing.acquire()
    assert failing.held
    failing.release()
