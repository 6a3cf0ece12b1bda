"""The lock that lets tests marked `exclusive` run alone under make test's two xdist workers
(tests/_exclusive.py), with holders in child processes as the workers are."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import time

import pytest

import _exclusive


def _hold(lock_dir: str, exclusive: bool, hold_s: float, log: str, name: str) -> None:
    with _exclusive.turn(exclusive, lock_dir):
        with open(log, "a") as f:
            f.write(f"{name} in\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"{name} out\n")


def _start(lock_dir, exclusive, hold_s, log, name):
    p = mp.get_context("fork").Process(target=_hold, args=(lock_dir, exclusive, hold_s, str(log), name))
    p.start()
    return p


def _wait_for(cond, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


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


def _join(*procs):
    for p in procs:
        p.join(30)
        assert p.exitcode == 0, p


def test_without_a_lock_directory_no_lock_is_taken(tmp_path, monkeypatch):
    monkeypatch.delenv(_exclusive.LOCK_DIR_ENV, raising=False)
    with _exclusive.turn(True):
        pass
    assert list(tmp_path.iterdir()) == []


def test_shared_holders_overlap_and_an_exclusive_one_waits_for_them_and_holds_them_off(tmp_path):
    lock_dir, log = str(tmp_path), tmp_path / "log"
    a, b = _start(lock_dir, False, 1.0, log, "a"), _start(lock_dir, False, 1.0, log, "b")
    _wait_for(lambda: {"a in", "b in"} <= set(_events(log)), "both shared holders")
    x = _start(lock_dir, True, 0.5, log, "x")
    _wait_for(lambda: _turnstile_held(lock_dir), "the exclusive holder to wait at the turnstile")
    c = _start(lock_dir, False, 0.1, log, "c")  # comes while x waits: must not overtake it
    _join(a, b, x, c)
    ev = _events(log)
    assert ev.index("a in") < ev.index("b out") and ev.index("b in") < ev.index("a out")  # shared: together
    assert ev.index("x in") > max(ev.index("a out"), ev.index("b out"))  # exclusive: after both left...
    assert ev.index("x out") == ev.index("x in") + 1  # ...with nobody else inside...
    assert ev.index("c in") > ev.index("x out")  # ...and before the shared holder that came after it


def test_make_test_hands_its_workers_one_lock_directory_and_removes_it(monkeypatch):
    monkeypatch.delenv(_exclusive.LOCK_DIR_ENV, raising=False)  # this worker's own is restored after
    d = _exclusive.make_lock_dir()
    try:
        assert os.environ[_exclusive.LOCK_DIR_ENV] == d and os.path.isdir(d)
        with _exclusive.turn(False):
            assert sorted(os.listdir(d)) == ["lock", "turnstile"]
    finally:
        _exclusive.remove_lock_dir(d)
    assert not os.path.exists(d) and _exclusive.LOCK_DIR_ENV not in os.environ


@pytest.mark.exclusive
def test_an_exclusive_test_runs_alone_under_xdist():
    """Under xdist this test holds the run's lock exclusively: no other test holds it shared."""
    d = os.environ.get(_exclusive.LOCK_DIR_ENV)
    if not d:
        pytest.skip("not under pytest-xdist (make test runs two workers)")
    with open(os.path.join(d, "lock"), "a") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
