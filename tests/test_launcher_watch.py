"""A launched job stops when its launcher is killed outright (l2t_core.launcher_watch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2t_core.launcher_watch import WATCH_ENV, launcher_pid

ROOT = Path(__file__).resolve().parents[1]

# the job: watches its launcher; says how it ended in <out>.end
JOB = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
if sys.argv[2] == "poll":
    del os.pidfd_open  # a platform without pidfds
from l2t_core.launcher_watch import watch_launcher
watch_launcher(grace_s=1.0)
if sys.argv[3] == "deaf":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a rank blocked where Ctrl-C does not reach
out.with_suffix(".pid").write_text(str(os.getpid()))
try:
    time.sleep(120)
    out.with_suffix(".end").write_text("slept")
except KeyboardInterrupt:
    out.with_suffix(".end").write_text("interrupted")
"""

# the launcher: starts the job in a session of its own (as the pipeline's does), waits until it
# watches, then is killed outright
LAUNCHER = """
import os, signal, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[1])
env = {**os.environ, "%s": str(os.getpid())}
subprocess.Popen([sys.executable, "-c", sys.argv[2], *sys.argv[1:2], *sys.argv[3:]], env=env, start_new_session=True)
while not out.with_suffix(".pid").exists():
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)
""" % WATCH_ENV


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie of a reparented job counts as gone (init reaps it)
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("watch,ears", [("pidfd", "hears"), ("poll", "hears"), ("pidfd", "deaf")])
def test_a_job_stops_when_its_launcher_is_killed(tmp_path, watch, ears):
    """The launcher killed with SIGKILL: the job is interrupted as by Ctrl-C (pidfd or polling),
    also where it inherited SIGINT ignored, and a job deaf to SIGINT exits after the grace period."""
    out = tmp_path / "job"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the launcher ignores Ctrl-C, as a pytest-xdist worker does: the job inherits SIGINT ignored
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER, str(out), JOB, watch, ears], env=env, timeout=120,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert launcher.returncode == -9
    job = int(out.with_suffix(".pid").read_text())
    assert _gone(job, within_s=30), "the job outlived its launcher"
    if ears == "hears":
        assert out.with_suffix(".end").read_text() == "interrupted"
    else:
        assert not out.with_suffix(".end").exists()  # it never heard SIGINT: it was ended after the grace


def test_a_bad_or_gone_launcher_is_refused_before_any_work(tmp_path):
    assert launcher_pid({}) is None and launcher_pid({WATCH_ENV: " 4242 "}) == 4242
    for raw in ("abc", "1", "-5"):
        with pytest.raises(ValueError, match=f"{WATCH_ENV}='{raw}' is not the process id of a launcher"):
            launcher_pid({WATCH_ENV: raw})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # `l2t train` and `l2t sft` start watching before they load anything
    env = {**os.environ, "PYTHONPATH": str(ROOT), WATCH_ENV: str(gone.pid)}
    for cmd in (["train", "--policy", str(tmp_path / "none"), "--out", str(tmp_path / "run")],
                ["sft", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "s")]):
        done = subprocess.run([sys.executable, "-m", "l2t_core.cli", *cmd], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and f"the launcher of this job (pid {gone.pid}" in done.stderr, done.stderr
