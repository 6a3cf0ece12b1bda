"""A launched job ends with the process that launched it.

The pipeline's local launcher (``l2t_pipeline.resources.ProcessGroupPipesClient``) starts
``l2t train`` / ``l2t sft`` in a session of its own, so that a cancelled Dagster run can end the
job's whole process group (torchrun and its ranks). That also means a step process killed outright
(``kill -9``, the out-of-memory killer) takes nothing with it: the job would train on, unwatched,
and a relaunch of the step would train into the same run directory beside it.

So the launcher names itself in :data:`WATCH_ENV` and the job watches it
(:func:`watch_launcher`): when the launcher is gone, the job stops as after Ctrl-C (SIGINT to
itself; a checkpoint being written is left as it was, since checkpoints are written atomically)
and, if it has not ended ``grace_s`` later (a rank blocked in a collective), exits. Every rank of a
torchrun launch watches the same launcher. The watch uses a pidfd (Linux 5.3+), which cannot be
fooled by a reused process id, else polls.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from typing import Mapping

from .model_lock import pid_alive

log = logging.getLogger("l2t.launcher_watch")

WATCH_ENV = "L2T_STOP_WITH_PID"
POLL_S = 2.0


def launcher_pid(environ: Mapping[str, str] | None = None) -> int | None:
    """The process id in :data:`WATCH_ENV` (None when unset): the launcher to watch."""
    raw = (os.environ if environ is None else environ).get(WATCH_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) <= 1:
        raise ValueError(f"{WATCH_ENV}={raw!r} is not the process id of a launcher (a whole number above 1); "
                         "it is set by the pipeline's launcher: unset it to run the job on its own")
    return int(raw)


def _wait_for_exit(pid: int, fd: int | None) -> None:
    """Return once process ``pid`` has ended (its pidfd ``fd`` is readable then)."""
    if fd is not None:
        select.select([fd], [], [])
        return
    while pid_alive(pid):
        time.sleep(POLL_S)


def _stop(pid: int, grace_s: float) -> None:
    log.warning("the launcher of this job (pid %d) is gone (killed?): stopping this job as after Ctrl-C", pid)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(grace_s)
    log.error("this job did not stop within %g s of its launcher's end: exiting", grace_s)
    os._exit(1)


def watch_launcher(environ: Mapping[str, str] | None = None, grace_s: float = 60.0) -> threading.Thread | None:
    """When :data:`WATCH_ENV` names a launcher, watch it from a daemon thread and stop this
    process once it is gone (SIGINT, then exit after ``grace_s``); a launcher gone already stops
    it now (SystemExit). SIGINT, if this process inherited it ignored, raises KeyboardInterrupt
    again. Returns the thread, or None when there is nothing to watch."""
    pid = launcher_pid(environ)
    if pid is None:
        return None
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        # inherited from a launcher that ignores Ctrl-C (exec keeps an ignored signal ignored): the
        # launcher's SIGINT and this watch's mean "stop" for a launched job
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        raise SystemExit(f"the launcher of this job (pid {pid}, {WATCH_ENV}) is gone already: not starting") from None
    except (AttributeError, OSError):  # no pidfd here (an older kernel, not Linux): poll
        fd = None
        if not pid_alive(pid):
            raise SystemExit(f"the launcher of this job (pid {pid}, {WATCH_ENV}) is gone already: not starting")

    def watch() -> None:
        _wait_for_exit(pid, fd)
        _stop(pid, grace_s)

    thread = threading.Thread(target=watch, name="l2t-launcher-watch", daemon=True)
    thread.start()
    return thread
