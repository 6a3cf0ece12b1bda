"""The lock that lets tests marked `exclusive` run alone under make test's two xdist workers
(tests/_exclusive.py), with holders in child processes as the workers are."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import time

import pytest

import _exclusive


def _hold(lock_dir: str, exclusive: bool, release: str | None, log: str, name: str) -> None:
    """Take a turn, log entering it, stay until ``release`` exists (None: leave at once), log leaving."""
    with _exclusive.turn(exclusive, lock_dir):
        with open(log, "a") as f:
            f.write(f"{name} in\n")
        while release is not None and not os.path.exists(release):
            time.sleep(0.01)
        with open(log, "a") as f:
            f.write(f"{name} out\n")


def _start(lock_dir, exclusive, release, log, name):
    p = mp.get_context("fork").Process(target=_hold, args=(lock_dir, exclusive, release, str(log), name))
    p.start()
    return p


def _wait_for(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _events(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _turnstile_held(lock_dir: str) -> bool:
    with open(os.path.join(lock_dir, "turnstile"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_without_a_lock_directory_no_lock_is_taken(monkeypatch):
    def no_flock(*a):
        raise AssertionError("a lock was taken outside xdist")

    monkeypatch.setattr(_exclusive.fcntl, "flock", no_flock)
    with _exclusive.turn(True, None):
        pass


def test_shared_holders_overlap_and_an_exclusive_one_waits_for_them_and_holds_them_off(tmp_path):
    lock_dir, log, release = str(tmp_path), tmp_path / "log", str(tmp_path / "release")
    procs = []
    try:
        procs += [_start(lock_dir, False, release, log, "a"), _start(lock_dir, False, release, log, "b")]
        _wait_for(lambda: {"a in", "b in"} <= set(_events(log)), "both shared holders")  # shared: together
        procs.append(_start(lock_dir, True, None, log, "x"))
        _wait_for(lambda: _turnstile_held(lock_dir), "the exclusive holder to wait at the turnstile")
        procs.append(_start(lock_dir, False, None, log, "c"))  # comes while x waits: must not overtake it
        time.sleep(0.3)  # time for c to overtake x if the turnstile did not stop it
        assert "c in" not in _events(log) and "x in" not in _events(log)
        open(release, "w").close()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0, p
    finally:
        for p in procs:
            p.kill()
    ev = _events(log)
    assert ev.index("x in") > max(ev.index("a out"), ev.index("b out"))  # exclusive: after both left...
    assert ev.index("x out") == ev.index("x in") + 1  # ...with nobody else inside...
    assert ev.index("c in") > ev.index("x out")  # ...and before the shared holder that came after it


def test_the_lock_directory_is_made_and_removed_whole():
    d = _exclusive.make_lock_dir()
    try:
        with _exclusive.turn(False, d):
            assert sorted(os.listdir(d)) == ["lock", "turnstile"]
    finally:
        _exclusive.remove_lock_dir(d)
    assert not os.path.exists(d)


@pytest.mark.exclusive
def test_an_exclusive_test_runs_alone_under_xdist(request):
    """Under xdist every worker has the run's lock directory, and this test holds its lock
    exclusively: no other test can hold it shared."""
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is None:
        pytest.skip("not under pytest-xdist (make test runs two workers)")
    d = workerinput.get(_exclusive.WORKERINPUT_KEY)
    assert d and os.path.isdir(d), "an xdist worker without the run's lock directory: exclusive tests are not alone"
    with open(os.path.join(d, "lock"), "a") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
