"""Tests that must have the machine to themselves, under pytest-xdist (``make test`` runs two workers).

A test marked ``exclusive`` holds a lock file exclusively for its setup, call and teardown; every
other test holds it shared, so an exclusive test runs while no other test does, and waits for the
one in progress on the other worker. A second file is a turnstile that a waiting exclusive test
holds, so a stream of shared holders on the other worker cannot starve it.

The controller makes the run's lock directory when it configures its first worker and hands it to
each worker in its ``workerinput`` (WORKERINPUT_KEY; never through the environment, so no
subprocess of a test inherits it), and removes it at the end. Outside xdist (``-n 0``, a plain
``pytest``) there is nothing to share the machine with and no lock is taken.

Kept free of heavy imports: tests/test_exclusive.py runs it in child processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile

WORKERINPUT_KEY = "l2t_lock_dir"


def make_lock_dir() -> str:
    """A fresh directory for one run's lock files."""
    return tempfile.mkdtemp(prefix="l2t-tests-")


def remove_lock_dir(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def turn(exclusive: bool, lock_dir: str | None):
    """Hold this test's turn in ``lock_dir``: the machine alone if ``exclusive``, else shared with
    other shared tests. Without a directory (not under xdist), no lock is taken."""
    if not lock_dir:
        yield
        return
    with open(os.path.join(lock_dir, "turnstile"), "a") as turnstile, \
            open(os.path.join(lock_dir, "lock"), "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
