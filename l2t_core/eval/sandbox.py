"""Run untrusted generated Python (HumanEval completions) in an isolated child process.

:func:`run_program` runs one program and returns an :class:`ExecResult`; :func:`check_humaneval`
builds the HumanEval program (prompt + completion + test + ``check(entry_point)``) and runs it;
:func:`run_many` runs many programs in parallel. :func:`network_isolation` and
:func:`isolation_report` say which defences are active on this machine.

How a program runs
------------------
Every program gets a fresh temporary directory (its cwd, ``HOME`` and ``TMPDIR``; deleted
afterwards) and a minimal environment (``LANG``/``LC_ALL``/``HOME``/``TMPDIR`` only: no ``PATH``,
no inherited variables such as ``AWS_*`` or ``HF_TOKEN``). The interpreter runs as
``python -I -S -B``: no site-packages, no user site, no ``PYTHON*`` variables, no bytecode
writes, so only the standard library is importable. The child's stdout/stderr go to files, so
output is bounded by the file-size limit, and the result keeps their last 8 KB.

Two isolation modes; :func:`network_isolation` names the active one (probed once per process):

``namespaces`` (Linux where unprivileged user namespaces work; the default when available)
    The program starts under ``unshare --user --map-root-user --net --pid --mount --mount-proc
    --ipc --uts --fork --kill-child``. Kernel-enforced:

    * network: a new network namespace with only a loopback that is down, so no packet leaves
      (``127.0.0.1`` included);
    * processes: a new PID namespace; everything in it is killed when the sandbox ends or is
      killed at the timeout, including children that called ``setsid``. Its ``pid_max`` is set to
      the kernel minimum (≈300 processes; per-namespace ``pid_max`` needs Linux ≥ 6.14) and
      ``RLIMIT_NPROC`` is set too. Caveat: the kernel does not apply ``RLIMIT_NPROC`` to uid 0, so
      when the caller is root only ``pid_max`` (and the audit hook) bound a fork bomb;
    * filesystem: every mount is made read-only and nosuid (``mount_setattr`` with
      ``AT_RECURSIVE``, Linux ≥ 5.12), then the work directory is bind-mounted writable, so
      writes outside it fail with ``EROFS``; ``/proc`` shows only the sandbox's processes;
    * hidden directories: the caller's home directory (``~/.aws``, ``~/.cache/huggingface``,
      ``~/.ssh``, ...) and the directory that holds this package (the repository: sources, run
      directories, any ``.env``) are covered by an empty read-only ``tmpfs``; only the interpreter
      and its standard library (and this file) are bound back where they lie inside one. The
      program stage runs the real interpreter binary, not a virtual environment's link to it.
      System directories, and a directory holding the work directory, are never hidden;
    * privileges: ``PR_SET_NO_NEW_PRIVS``; no capabilities outside the user namespace, and none
      inside it either: the program starts with empty capability bounding and ambient sets, so it
      cannot remount the filesystem read-write or unmount the hidden directories (with ctypes,
      when the audit hook is off); a nested user namespace gives it capabilities again, but over
      mounts the kernel has locked (read-only, and not removable to reveal what they cover).

``audit-hook`` (fallback: no ``unshare`` or namespaces refused)
    Only the in-process defences below plus the resource limits and a process-group kill.

In both modes, before the untrusted code runs:

* resource limits (``resource.setrlimit``, soft = hard, so they cannot be raised again):
  ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE`` = 0,
  ``RLIMIT_NOFILE`` and, in the namespaces mode, ``RLIMIT_NPROC``. They are set by the child
  interpreter itself, not in a ``preexec_fn``, because ``preexec_fn`` can deadlock when the caller
  has threads (:func:`run_many` uses threads);
* a ``sys.addaudithook`` hook (hooks cannot be removed) refuses: socket connect/bind/send and
  non-Unix sockets; opening files for writing and creating/removing/renaming/chmod-ing paths
  outside the work directory; process creation (fork, exec, spawn, subprocess, system) and
  signals to other processes; importing ``ctypes``/``_ctypes``/``_posixsubprocess``; and
  ``resource.setrlimit``. A refused operation raises ``PermissionError`` in the program;
* the wall-clock timeout kills the child's whole process group (and, in the namespaces mode, the
  PID namespace).

What is NOT guaranteed
----------------------
* Reading files outside the hidden directories is not restricted beyond normal permissions (in
  the namespaces mode the program runs as the caller's uid, without capabilities): credentials
  kept elsewhere (``/etc``, a data directory, a mounted secret) are readable. In the ``audit-hook``
  mode reading is not restricted at all, the home directory and the repository included.
  Environment variables of the parent are not passed, and other processes'
  ``/proc/<pid>/environ`` is not visible in the namespaces mode.
* The total memory of a sandbox is bounded only per process (``RLIMIT_AS`` × processes); no
  cgroup is created.
* In the ``audit-hook`` mode, the network, filesystem and process defences are in-process only:
  CPython audit hooks are a tripwire, not a security boundary, and code that corrupts interpreter
  memory can bypass them. Use the namespaces mode (or a container/VM) for hostile code.
* ``passed`` means the program reached its end: the runner writes a per-run secret only after the
  program returns, so ``sys.exit(0)``/``os._exit(0)`` before the tests count as ``failed``; a
  program that deliberately inspects the runner's frames could still forge it.

The module is also the child's entry point (``python sandbox.py setup|run CONFIG``), so its
top-level imports are limited to modules that give the program no new powers; parent-only
modules (subprocess, tempfile, threads) are imported inside the parent's functions.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["passed", "failed", "timeout", "error", "killed"]
Isolation = Literal["auto", "namespaces", "audit-hook"]

TAIL_BYTES = 8192
SETUP_FAILED_EXIT = 120
_SETUP_MARKER = "l2t-sandbox-setup-error:"
_PID_MAX_MIN = 301  # kernel minimum for pid_max (RESERVED_PIDS + 1)
# METHOD.md §7: each HumanEval program gets 1 s; it is enforced as CPU time (RLIMIT_CPU), and the
# wall-clock limit also covers the sandbox's start-up (two interpreter starts, namespace setup).
HUMANEVAL_CPU_S = 1
HUMANEVAL_TIMEOUT_S = 5.0

_UNSHARE_FLAGS = ("--user", "--map-root-user", "--net", "--pid", "--mount", "--mount-proc", "--ipc",
                  "--uts", "--fork", "--kill-child")


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed program.

    ``status``: ``passed`` (ran to its end, exit 0), ``failed`` (an exception, a non-zero exit, an
    early exit, or an operation refused by the sandbox), ``timeout`` (wall-clock limit; the
    process tree was killed), ``killed`` (ended by a signal, e.g. SIGXCPU at the CPU limit or
    SIGXFSZ at the file-size limit) or ``error`` (the sandbox itself could not run the program).
    ``stdout``/``stderr`` are the last :data:`TAIL_BYTES` bytes, decoded as UTF-8 with replacement.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    cpu_s: int
    file_size_mb: int
    max_processes: int
    max_open_files: int


# ----------------------------------------------------------------------------------------------
# Parent side


def run_program(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, cpu_s: int | None = None,
                file_size_mb: int = 16, max_processes: int = 32, max_open_files: int = 256,
                isolation: Isolation = "auto", audit_hook: bool = True) -> ExecResult:
    """Run ``code`` as ``__main__`` in a fresh sandbox (see the module docstring) and wait for it.

    ``timeout_s`` is wall-clock time including the sandbox start; ``cpu_s`` (default: ``timeout_s``
    rounded up, plus 1) is CPU time. ``isolation`` picks the mode (``auto``: namespaces when this
    machine allows them). ``audit_hook=False`` drops the in-process hook; it exists to test the
    kernel layers alone and must stay on for real use.
    """
    limits = _check_limits(timeout_s, memory_mb, cpu_s, file_size_mb, max_processes, max_open_files)
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    namespaces = _use_namespaces(isolation)
    return _run(code, limits, namespaces=namespaces, audit_hook=audit_hook)


def humaneval_program(item: Any, completion: str) -> str:
    """The program that checks one HumanEval completion: prompt + completion + test + check call.

    ``item`` is a HumanEval :class:`~l2t_core.eval.datasets.BenchmarkItem` (``problem`` = prompt,
    ``test``, ``entry_point``)."""
    if not getattr(item, "test", None) or not getattr(item, "entry_point", None):
        raise ValueError(f"item {getattr(item, 'id', item)!r} has no test/entry_point; pass a HumanEval "
                         "item from load_benchmark('humaneval')")
    return f"{item.problem}{completion}\n\n{item.test}\n\ncheck({item.entry_point})\n"


def check_humaneval(item: Any, completion: str, **limits: Any) -> ExecResult:
    """Run one HumanEval completion against its tests; ``passed`` means every assertion held.

    Defaults follow METHOD.md §7 (1 s of CPU per program, see :data:`HUMANEVAL_CPU_S`); any
    :func:`run_program` keyword overrides them."""
    limits = {"cpu_s": HUMANEVAL_CPU_S, "timeout_s": HUMANEVAL_TIMEOUT_S, **limits}
    return run_program(humaneval_program(item, completion), **limits)


def run_many(programs: list[str], *, workers: int | None = None, **limits: Any) -> list[ExecResult]:
    """Run ``programs`` in parallel sandboxes (a thread pool; each program is its own process).

    Results are in the order of ``programs``. ``workers`` defaults to the CPU count."""
    from concurrent.futures import ThreadPoolExecutor

    programs = list(programs)
    if not programs:
        return []
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _use_namespaces(limits.get("isolation", "auto"))  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda code: run_program(code, **limits), programs))


def network_isolation() -> str:
    """``namespaces`` when programs run in their own network namespace (no usable interface),
    else ``audit-hook`` (socket operations refused in-process)."""
    return "namespaces" if _probe()["namespaces"] else "audit-hook"


def isolation_report() -> dict[str, str]:
    """Which defence is active for each concern on this machine (probed once per process)."""
    probe = _probe()
    if not probe["namespaces"]:
        hook = "audit hook only (in-process)"
        return {"mode": "audit-hook", "network": hook, "filesystem": hook,
                "privileges": "the caller's (the audit hook refuses ctypes)", "processes":
                "audit hook + process-group kill", "reason": probe["reason"]}
    layers = probe["layers"]
    root = os.geteuid() == 0
    hidden = layers.get("hidden_paths")
    filesystem = ("read-only mounts, writable work dir" if layers.get("readonly_fs") == "ok"
                  else f"audit hook only for writes (read-only mounts failed: {layers.get('readonly_fs')})")
    filesystem += (", caller's home and repository hidden" if hidden == "ok"
                   else f", nothing hidden ({hidden})") + " + audit hook"
    return {
        "mode": "namespaces",
        "network": "network namespace (loopback down) + audit hook",
        "filesystem": filesystem,
        "privileges": ("no capabilities" if layers.get("capabilities") == "ok"
                       else f"capabilities of the user namespace ({layers.get('capabilities')})"),
        "processes": ("PID namespace" + (", pid_max" if layers.get("pid_max") == "ok" else "")
                      + ("" if root else ", RLIMIT_NPROC") + " + audit hook"),
        "reason": "",
    }


def _check_limits(timeout_s, memory_mb, cpu_s, file_size_mb, max_processes, max_open_files) -> _Limits:
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    for name, value, low in (("memory_mb", memory_mb, 64), ("file_size_mb", file_size_mb, 1),
                             ("max_processes", max_processes, 1), ("max_open_files", max_open_files, 16)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if cpu_s is None:
        cpu_s = int(-(-timeout_s // 1)) + 1
    if not isinstance(cpu_s, int) or cpu_s < 1:
        raise ValueError(f"cpu_s must be a whole number of seconds >= 1, got {cpu_s!r}")
    return _Limits(float(timeout_s), memory_mb, cpu_s, file_size_mb, max_processes, max_open_files)


def _use_namespaces(isolation: Isolation) -> bool:
    if isolation not in ("auto", "namespaces", "audit-hook"):
        raise ValueError(f"isolation must be 'auto', 'namespaces' or 'audit-hook', got {isolation!r}")
    if isolation == "audit-hook":
        return False
    probe = _probe()
    if isolation == "namespaces" and not probe["namespaces"]:
        raise RuntimeError(f"namespace isolation is not available here: {probe['reason']}; use "
                           "isolation='auto' or 'audit-hook'")
    return probe["namespaces"]


_PROBE: dict[str, Any] = {}


def _probe() -> dict[str, Any]:
    """Try the namespaces mode once with a trivial program; cache what worked."""
    if _PROBE:
        return _PROBE
    import shutil

    result: dict[str, Any] = {"namespaces": False, "layers": {}, "reason": ""}
    if not sys.platform.startswith("linux"):
        result["reason"] = f"namespaces need Linux (this is {sys.platform})"
    elif shutil.which("unshare") is None:
        result["reason"] = "the util-linux 'unshare' command is not installed"
    else:
        limits = _check_limits(30.0, 256, None, 1, 8, 64)
        res = _run("", limits, namespaces=True, audit_hook=True, probe=True)
        if res.status == "passed":
            result.update(namespaces=True, layers=json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            result["reason"] = f"unshare failed ({res.status}: {res.detail or res.stderr.strip()[-300:]})"
    _PROBE.update(result)
    return _PROBE


def _hidden_paths() -> dict[str, Any]:
    """What the namespaces mode hides from the program and what it must keep visible.

    Hidden: the caller's home directory (credentials: ``~/.aws``, ``~/.cache/huggingface/token``,
    ``~/.ssh``, ...) and the directory holding this package (the repository: its sources, run
    directories, any ``.env``). Kept: the interpreter (the program stage execs the real binary, not
    a virtual environment's link to it) with its standard library, and this file."""
    exe = os.path.realpath(sys.executable)
    keep = [exe, os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
            os.path.realpath(__file__)]
    if sys.prefix != sys.base_prefix:  # a venv interpreter copied (not linked) needs its pyvenv.cfg
        keep.append(os.path.join(os.path.realpath(sys.prefix), "pyvenv.cfg"))
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    hide = [os.path.realpath(os.path.expanduser("~")), package_root]
    return {"hide": hide, "keep": keep, "exe": exe}


def _child_env(workdir: str) -> dict[str, str]:
    return {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _run(code: str, limits: _Limits, *, namespaces: bool, audit_hook: bool, probe: bool = False) -> ExecResult:
    """Run one program; the work directory and output files are removed afterwards."""
    import secrets
    import shutil
    import subprocess
    import tempfile

    workdir = os.path.realpath(tempfile.mkdtemp(prefix="l2t-sandbox-"))
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as done, tempfile.TemporaryFile() as report:
            config = {"workdir": workdir, "program": "program.py", "limits": limits.__dict__,
                      "audit_hook": audit_hook, "namespaces": namespaces, "probe": probe,
                      "nonce_fd": nonce_r, "done_fd": done.fileno(), "report_fd": report.fileno(),
                      **(_hidden_paths() if namespaces else {})}
            python = [sys.executable, "-I", "-S", "-B", "-X", "utf8", os.path.abspath(__file__)]
            argv = ([shutil.which("unshare"), *_UNSHARE_FLAGS, *python, "setup", json.dumps(config)]
                    if namespaces else [*python, "run", json.dumps(config)])
            start = time.monotonic()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir,
                                        env=_child_env(workdir), start_new_session=True,
                                        pass_fds=(nonce_r, done.fileno(), report.fileno()))
            except OSError as exc:
                return ExecResult("error", None, "", "", 0.0, f"could not start the sandbox: {exc}")
            finally:
                os.close(nonce_r)
            timed_out = False
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            duration = time.monotonic() - start
            _kill_group(proc.pid)  # anything left in the group (audit-hook mode) goes too
            stdout, stderr = _tail(out), _tail(err)
            completed = _read_all(done) == nonce
            waited = _read_all(report).decode(errors="replace") if namespaces else ""
        return _classify(returncode, timed_out, completed, namespaces, waited, stdout, stderr, duration, limits)
    finally:
        shutil.rmtree(workdir, onerror=_make_removable)


def _kill_group(pgid: int) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(fh) -> str:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - TAIL_BYTES))
    return fh.read().decode("utf-8", errors="replace")


def _read_all(fh) -> bytes:
    fh.seek(0)
    return fh.read()


def _make_removable(func, path, _exc_info) -> None:
    """rmtree error handler: a program may have made its own files read-only; allow and retry."""
    import stat

    parent = os.path.dirname(path)
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU)
    func(path)


def _classify(returncode: int, timed_out: bool, completed: bool, namespaces: bool, waited: str, stdout: str,
              stderr: str, duration: float, limits: _Limits) -> ExecResult:
    """Turn exit information into an :class:`ExecResult` status with a one-line explanation."""
    import signal

    def result(status: Status, detail: str, code: int | None = returncode) -> ExecResult:
        return ExecResult(status, code, stdout, stderr, round(duration, 4), detail)

    if timed_out:
        return result("timeout", f"wall-clock limit of {limits.timeout_s:g} s reached; the process tree was killed")
    if returncode == SETUP_FAILED_EXIT and _SETUP_MARKER in stderr:
        return result("error", stderr.split(_SETUP_MARKER, 1)[1].strip().splitlines()[0])
    if namespaces:  # the PID-namespace init reports how the program ended
        if not waited:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
            return result("error", f"the sandbox ended before the program did: {last[:300]}")
        kind, _, value = waited.partition(" ")
        returncode = -int(value) if kind == "signal" else int(value)
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = {signal.SIGXCPU: f"CPU limit of {limits.cpu_s} s", signal.SIGXFSZ: f"file-size limit of "
               f"{limits.file_size_mb} MB", signal.SIGKILL: "killed (CPU hard limit or out of memory)"}
        return result("killed", f"{name}: {why.get(sig, 'ended by a signal')}", returncode)
    if returncode == 0 and completed:
        return result("passed", "", 0)
    if returncode == 0:
        return result("failed", "the program exited before its end (sys.exit/os._exit), so not every "
                      "statement ran", 0)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
    return result("failed", last[:300], returncode)


# ----------------------------------------------------------------------------------------------
# Child side: ``setup`` runs as init of the new namespaces, ``run`` runs the program.


def _child_setup(config: dict) -> None:
    """PID-namespace init: lock down the namespaces, then fork and exec the ``run`` stage and
    report how it ended on ``report_fd`` (a PID-namespace init cannot be ended by most signals, so
    the program must not be init itself). Exiting kills everything left in the namespace."""
    try:
        layers = {"pid_max": _set_pid_max(config["limits"]["max_processes"]),
                  "readonly_fs": _readonly_filesystem(config["workdir"]),
                  "hidden_paths": _hide_paths(config.get("hide", []), config.get("keep", []), config["workdir"]),
                  "no_new_privs": _no_new_privs()}
        layers["capabilities"] = _drop_capabilities()  # last: the steps above need them
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported as a sandbox error
        print(f"{_SETUP_MARKER} {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED_EXIT)
    report_fd = config.pop("report_fd")
    config["layers"] = layers
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_fd)
            exe = config.get("exe", sys.executable)
            os.execv(exe, [exe, "-I", "-S", "-B", "-X", "utf8", os.path.abspath(__file__), "run", json.dumps(config)])
        except OSError as exc:
            print(f"{_SETUP_MARKER} cannot start the program stage: {exc}", file=sys.stderr, flush=True)
            os._exit(SETUP_FAILED_EXIT)
    while True:  # as init, reap every orphan so its PID is freed; stop when the program ends
        reaped, status = os.waitpid(-1, 0)
        if reaped == pid:
            break
    if os.WIFSIGNALED(status):
        report, code = f"signal {os.WTERMSIG(status)}", 128 + os.WTERMSIG(status)
    else:
        report, code = f"exit {os.WEXITSTATUS(status)}", os.WEXITSTATUS(status)
    os.write(report_fd, report.encode())
    os._exit(code)


def _set_pid_max(max_processes: int) -> str:
    """Cap the processes of this PID namespace (per-namespace pid_max, Linux >= 6.14)."""
    try:
        with open("/proc/sys/kernel/pid_max", "w") as fh:
            fh.write(str(max(_PID_MAX_MIN, max_processes + 2)))
        return "ok"
    except OSError as exc:
        return f"unavailable ({exc.strerror})"


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _readonly_filesystem(workdir: str) -> str:
    """Make every mount read-only and nosuid, then bind-mount ``workdir`` writable again."""
    import struct

    ctypes, libc = _libc()
    at_fdcwd, at_recursive, ms_bind = -100, 0x8000, 0x1000
    attr_rdonly, attr_nosuid, sys_mount_setattr = 0x1, 0x2, 442

    def mount_setattr(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", attr_set, attr_clr, 0, 0))
        if libc.syscall(sys_mount_setattr, at_fdcwd, path.encode(), flags, attr, 32) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount_setattr({path}): {os.strerror(err)}")

    try:
        mount_setattr("/", at_recursive, attr_rdonly | attr_nosuid, 0)
    except OSError as exc:
        return f"unavailable ({exc})"
    if libc.mount(workdir.encode(), workdir.encode(), None, ms_bind, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount of the work directory failed: {os.strerror(err)}")
    mount_setattr(workdir, 0, 0, attr_rdonly)
    return "ok"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# never hidden: the system (a home or checkout at one of these would hide the interpreter's libraries)
_SYSTEM_DIRS = ("/", "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/dev", "/sys", "/tmp",
                "/var", "/opt", "/run")


def _hide_paths(hide: list[str], keep: list[str], workdir: str) -> str:
    """Mount an empty read-only tmpfs over each directory of ``hide``, then bind the ``keep`` paths
    that lie inside one back (read-only, at the same place). All or nothing: on any failure what was
    mounted is detached and the layer reports itself unavailable."""
    import struct

    hide = [h for h in dict.fromkeys(hide) if os.path.isdir(h) and h not in _SYSTEM_DIRS
            and not any(_inside(sysdir, h) for sysdir in _SYSTEM_DIRS) and not _inside(workdir, h)]
    hide = [h for h in hide if not any(o != h and _inside(h, o) for o in hide)]  # the outermost only
    keep = [k for k in dict.fromkeys(keep) if os.path.exists(k)]
    hide = [h for h in hide if not any(_inside(h, k) for k in keep)]  # a kept path cannot be hidden
    keep = [k for k in keep if any(_inside(k, h) for h in hide)]
    keep = [k for k in keep if not any(o != k and _inside(k, o) for o in keep)]
    if not hide:
        return "nothing to hide"
    ctypes, libc = _libc()
    ms_nosuid, ms_nodev, ms_bind, ms_rec, mnt_detach = 0x2, 0x4, 0x1000, 0x4000, 0x2
    at_fdcwd, at_recursive, attr_rdonly, attr_nosuid, sys_mount_setattr = -100, 0x8000, 0x1, 0x2, 442

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    sources = {k: (os.open(k, os.O_PATH | os.O_CLOEXEC), os.path.isdir(k)) for k in keep}  # before hiding
    mounted: list[str] = []
    try:
        for h in hide:
            check(libc.mount(b"tmpfs", h.encode(), b"tmpfs", ms_nosuid | ms_nodev, b"mode=0755,size=64k"),
                  f"tmpfs over {h}")
            mounted.append(h)
        for k, (fd, is_dir) in sources.items():
            if is_dir:
                os.makedirs(k, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(k), exist_ok=True)
                open(k, "a").close()
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), k.encode(), None, ms_bind | ms_rec, None),
                  f"bind of {k}")
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", attr_rdonly | attr_nosuid, 0, 0, 0))
        for h in hide:
            check(libc.syscall(sys_mount_setattr, at_fdcwd, h.encode(), at_recursive, attr, 32),
                  f"read-only {h}")
    except OSError as exc:
        for m in reversed(mounted):
            libc.umount2(m.encode(), mnt_detach)
        return f"unavailable ({exc})"
    finally:
        for fd, _ in sources.values():
            os.close(fd)
    return "ok"


def _drop_capabilities() -> str:
    """Drop every capability of this process (the PID-namespace init, once the namespaces are set
    up) and empty its bounding and ambient sets, so the program it starts (uid 0 of the user
    namespace, which would regain all capabilities at exec) has none: it cannot undo the mounts
    (remount read-write, unmount the hidden directories) or change the namespace's limits. With
    equal (empty) capabilities the program may read its init's ``/proc`` entries, as before."""
    import struct

    ctypes, libc = _libc()
    pr_capbset_drop, pr_cap_ambient, pr_cap_ambient_clear_all, einval = 24, 47, 4, 22
    for cap in range(64):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == einval:  # past the kernel's last capability
                break
            return f"unavailable (PR_CAPBSET_DROP {cap}: {os.strerror(ctypes.get_errno())})"
    libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0)
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3
    data = ctypes.create_string_buffer(bytes(24))  # effective, permitted, inheritable: all empty (2 x 3 u32)
    if libc.capset(header, data) != 0:
        return f"unavailable (capset: {os.strerror(ctypes.get_errno())})"
    return "ok"


def _no_new_privs() -> str:
    ctypes, libc = _libc()
    pr_set_no_new_privs = 38
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    return "ok"


def _child_run(config: dict) -> None:
    """Apply the limits and the audit hook, then execute the program as ``__main__``."""
    import builtins

    try:
        with os.fdopen(config["nonce_fd"], "rb") as fh:
            nonce = fh.read()
        with open(os.path.join(config["workdir"], config["program"]), encoding="utf-8") as fh:
            source = fh.read()
        os.chdir(config["workdir"])
        _set_limits(config["limits"], nproc=config["namespaces"])
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported as a sandbox error
        print(f"{_SETUP_MARKER} {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED_EXIT)
    done_fd = config["done_fd"]
    if config["audit_hook"]:
        sys.addaudithook(_make_audit_hook(config["workdir"]))
    if config["probe"]:
        print(json.dumps(config.get("layers", {})), flush=True)
    code = compile(source, os.path.join(config["workdir"], config["program"]), "exec")
    del source, config
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(done_fd, nonce)
    os._exit(0)


def _set_limits(limits: dict, *, nproc: bool) -> None:
    """Lower soft and hard limits together so the program cannot raise them again."""
    import resource

    mb = 1024 * 1024
    wanted = [(resource.RLIMIT_AS, limits["memory_mb"] * mb), (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, limits["max_open_files"])]
    if nproc:  # counted per user namespace here; in the audit-hook mode it would count all the user's processes
        wanted.append((resource.RLIMIT_NPROC, limits["max_processes"]))
    for res, value in wanted:
        _, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = limits["cpu_s"] if hard == resource.RLIM_INFINITY else min(limits["cpu_s"], hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1 if hard == resource.RLIM_INFINITY else hard))


# Audit events refused outright.
_BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "resource.setrlimit", "resource.prlimit",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
})
_BLOCKED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_multiprocessing"})
# Events that change the filesystem: (positions of path arguments that must stay in the work
# directory, positions of the matching ``dir_fd`` arguments, None when the call has none).
_PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int | None, ...]]] = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), (None,)), "os.chflags": ((0,), (None,)), "os.lchflags": ((0,), (None,)),
    "os.setxattr": ((0,), (None,)), "os.removexattr": ((0,), (None,)), "shutil.rmtree": ((0,), (1,)),
    "shutil.copyfile": ((1,), (None,)), "shutil.copymode": ((1,), (None,)), "shutil.copystat": ((1,), (None,)),
    "shutil.copytree": ((1,), (None,)), "shutil.chown": ((0,), (None,)), "shutil.move": ((0, 1), (None, None)),
    "shutil.unpack_archive": ((1,), (None,)), "shutil.make_archive": ((0,), (None,)),
}
_AF_UNIX = 1  # the same value on Linux and macOS; the socket module is not imported in the child


def _make_audit_hook(workdir: str):
    """An audit hook that refuses network, process creation and writes outside ``workdir``.

    Relative paths are resolved against their ``dir_fd`` (via ``/proc/self/fd``) or the current
    directory. ``os.open`` does not report its ``dir_fd``, so a relative ``os.open``
    for writing is refused: use an absolute path inside the work directory."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    root = workdir.rstrip(os.sep) + os.sep
    path_mod, fsdecode = os.path, os.fsdecode

    def inside(path: Any, dir_fd: Any = None) -> bool:
        if isinstance(path, int):  # an already open descriptor, checked when it was opened
            return True
        p = fsdecode(path)
        if not path_mod.isabs(p):  # relative to dir_fd when given (AT_FDCWD < 0 means the cwd)
            at_dir = isinstance(dir_fd, int) and dir_fd >= 0
            p = path_mod.join(path_mod.realpath(f"/proc/self/fd/{dir_fd}"), p) if at_dir else path_mod.abspath(p)
        entry = path_mod.join(path_mod.realpath(path_mod.dirname(p)), path_mod.basename(p))
        return (entry + os.sep).startswith(root) and (path_mod.realpath(p) + os.sep).startswith(root)

    def refuse(event: str, what: str):
        raise PermissionError(f"sandbox: {event} refused ({what})")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(flags, int) and flags & write_flags) or \
                      (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if not writing or path is None or isinstance(path, int):
                return
            if mode is None and not path_mod.isabs(fsdecode(path)):
                refuse(event, f"os.open of the relative path {path!r} for writing; use an absolute path "
                              "inside the work directory")
            if not inside(path):
                refuse(event, f"writing {path!r} outside the work directory")
        elif event in _BLOCKED_EVENTS:
            refuse(event, "network, process creation and resource changes are not allowed")
        elif event == "socket.__new__" and len(args) > 1 and args[1] != _AF_UNIX:
            refuse(event, "only Unix sockets may be created")
        elif event.startswith("ctypes."):
            refuse(event, "ctypes is not allowed")
        elif event == "import" and args and args[0] in _BLOCKED_IMPORTS:
            refuse(event, f"module {args[0]!r} is not allowed")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            for i, j in zip(paths, dir_fds):
                dir_fd = args[j] if j is not None and j < len(args) else None
                if i < len(args) and args[i] is not None and not inside(args[i], dir_fd):
                    refuse(event, f"{args[i]!r} is outside the work directory")

    return hook


def _child_main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("setup", "run"):
        raise SystemExit("usage: sandbox.py setup|run CONFIG_JSON (internal entry point of run_program)")
    config = json.loads(argv[1])
    (_child_setup if argv[0] == "setup" else _child_run)(config)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
