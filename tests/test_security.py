"""Security: what generated code can reach in the sandbox, where credentials may end up, how URLs
with credentials are shown, and where the Dagster webserver listens by default.

Complements tests/test_sandbox.py (timeouts, CPU/memory limits, fork bombs, writes outside the work
directory, network to a local listener, the parent's environment in os.environ and /proc) and
tests/test_webserver.py (a live webserver run, started with an explicit ``-h 127.0.0.1``).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import dagster as dg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import moto_s3
from l2t_core.eval.sandbox import isolation_report, network_isolation, run_program
from l2t_pipeline.resources import TrainingLauncher  # noqa: F401 - resolves the asset's annotation

ROOT = Path(__file__).resolve().parents[1]
HAVE_NAMESPACES = network_isolation() == "namespaces"
MODES = [pytest.param("namespaces", marks=pytest.mark.skipif(not HAVE_NAMESPACES, reason=isolation_report()["reason"])),
         "audit-hook"]
needs_namespaces = pytest.mark.skipif(not HAVE_NAMESPACES, reason="no namespace isolation on this machine")

# Distinctive fake credentials: any of these strings found in an artifact is a leak.
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIAL2TCANARY7Q3ZXYZ",
    "AWS_SECRET_ACCESS_KEY": "l2tCanary/Secret+Key5f3a9c1e7b2d4f6a8c0e",
    "AWS_SESSION_TOKEN": "l2t-canary-session-token-9d8c7b6a",
    "HF_TOKEN": "hf_l2tCanaryToken0123456789abcdef",
    "L2T_CUSTOM_SECRET": "l2t-canary-custom-4e5f",
}


def _leaks(text: str | bytes, where: str) -> list[str]:
    """The canary values (and their names, for the AWS secret) found in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [f"{name} in {where}" for name, value in CANARIES.items() if value in text]


# =============================================================================================
# The sandbox: environment, the parent's files, signals, processes that outlive it


@pytest.mark.parametrize("mode", MODES)
def test_the_program_sees_only_the_minimal_environment(monkeypatch, tmp_path, mode):
    """Not only secrets: nothing of the parent's environment reaches the program, and variables that
    would change how Python starts (PYTHONPATH with a sitecustomize, PYTHONHOME, PYTHONSTARTUP,
    PYTHONINSPECT) or what the dynamic loader does (LD_PRELOAD) have no effect."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("print('PARENT-SITECUSTOMIZE-RAN')\n")
    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "no-such-python-home"))
    monkeypatch.setenv("PYTHONSTARTUP", str(hook / "sitecustomize.py"))
    monkeypatch.setenv("PYTHONINSPECT", "1")
    monkeypatch.setenv("LD_PRELOAD", str(tmp_path / "no-such-lib.so"))
    code = ("import os, sys, json\n"
            "try:\n    import numpy\n    site = 'numpy importable'\nexcept ImportError:\n    site = 'stdlib only'\n"
            "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'path': sys.path, 'site': site}))\n")
    r = run_program(code, isolation=mode)
    assert r.status == "passed", (r.status, r.detail, r.stderr[-500:])
    assert not _leaks(r.stdout + r.stderr, "the program's output")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["env"]) == {"LANG", "LC_ALL", "HOME", "TMPDIR"}, f"unexpected variables: {sorted(out['env'])}"
    assert out["env"]["HOME"] == out["env"]["TMPDIR"] == out["cwd"] and "l2t-sandbox-" in out["cwd"]
    assert "PARENT-SITECUSTOMIZE-RAN" not in r.stdout and str(hook) not in out["path"]
    assert out["site"] == "stdlib only", "site-packages are importable in the sandbox"
    assert "ld.so" not in r.stderr and "LD_PRELOAD" not in r.stderr


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """A home directory with credential files, set as the caller's HOME (the real one is never read)."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_secret_access_key = {CANARIES['AWS_SECRET_ACCESS_KEY']}\n")
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(CANARIES["HF_TOKEN"])
    monkeypatch.setenv("HOME", str(home))
    return home


def _read_attempts(paths: list[str]) -> str:
    """A program that tries to read every path (and to list its directory) and prints what it got."""
    return ("import os\n"
            f"for p in {paths!r}:\n"
            "    for f in (lambda: open(os.path.expanduser(p)).read(), lambda: os.listdir(os.path.dirname(p))):\n"
            "        try:\n            print(p, repr(f()))\n"
            "        except OSError as e:\n            print(p, type(e).__name__)\n")


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-hook", "kernel-only"])
@needs_namespaces
def test_the_callers_home_and_the_repository_are_hidden(fake_home, audit_hook):
    """Absolute paths into the caller's home (~/.aws/credentials, the Hugging Face token) and into the
    repository (its sources, its run directories) read as missing; ``~`` is the sandbox's own
    directory. The interpreter keeps working although it lives under the repository's venv."""
    targets = [str(fake_home / ".aws" / "credentials"), str(fake_home / ".cache" / "huggingface" / "token"),
               "~/.aws/credentials", str(ROOT / "pyproject.toml"), str(ROOT / "l2t_core" / "config.py")]
    r = run_program(_read_attempts(targets), audit_hook=audit_hook)
    assert r.status == "passed", (r.status, r.detail, r.stderr[-800:])
    assert not _leaks(r.stdout, "the sandbox's output"), r.stdout
    assert "[build-system]" not in r.stdout and "class TrainConfig" not in r.stdout, r.stdout
    # files read as missing; a listing shows at most the empty skeleton that leads to the kept
    # interpreter (a virtual environment's pyvenv.cfg, pyenv's versions) and this package's sandbox.py
    skeleton = {".venv", ".pyenv", "l2t_core", "eval"}
    for line in r.stdout.splitlines():
        path, _, got = line.partition(" ")
        if got.startswith("["):
            assert set(ast.literal_eval(got)) <= skeleton, f"listing of {path}'s directory shows {got[:200]}"
        else:
            assert got in ("FileNotFoundError", "NotADirectoryError"), f"readable: {line[:200]}"
    assert isolation_report()["filesystem"].startswith("read-only mounts, writable work dir, caller's home")


UNDO_MOUNTS = r"""
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, rc):
    print(name, "ok" if rc == 0 else os.strerror(ctypes.get_errno()), flush=True)
def undo(home):
    clear_ro = ctypes.create_string_buffer(struct.pack("QQQQ", 0, 0x1, 0, 0))
    attempt("mount_setattr -ro /", libc.syscall(442, -100, b"/", 0x8000, clear_ro, 32))
    attempt("remount / rw", libc.mount(b"none", b"/", None, 0x20 | 0x1000, None))
    attempt("umount home", libc.umount2(home.encode(), 2))
    attempt("remount home rw", libc.mount(b"none", home.encode(), None, 0x20 | 0x1000, None))
    try:
        open(TARGET, "w").write("pwned")
        print("WROTE OUTSIDE")
    except OSError as e:
        print("write refused", e.errno)
    print("home holds", sorted(os.listdir(home)))
undo(HOME)
attempt("unshare user+mount", libc.unshare(0x10000000 | 0x00020000))  # a nested user namespace
undo(HOME)
"""


@needs_namespaces
def test_the_program_cannot_undo_the_mounts(fake_home, tmp_path):
    """Kernel layers alone (no audit hook, so ctypes works): remounting / read-write, clearing its
    read-only attribute, unmounting or remounting the hidden home all fail, also from a nested user
    namespace (where the program regains capabilities, over mounts the kernel has locked)."""
    target = tmp_path / "escaped.txt"
    code = f"TARGET = {str(target)!r}\nHOME = {str(fake_home)!r}\n" + UNDO_MOUNTS
    r = run_program(code, audit_hook=False, timeout_s=10)
    assert r.status == "passed", (r.status, r.detail, r.stderr[-800:])
    assert "WROTE OUTSIDE" not in r.stdout and not target.exists(), r.stdout
    attempts = [ln for ln in r.stdout.splitlines() if ln.startswith(("mount_setattr", "remount", "umount"))]
    assert len(attempts) == 8 and not any(ln.endswith(" ok") for ln in attempts), r.stdout
    assert r.stdout.count("home holds []") == 2 and not _leaks(r.stdout, "the sandbox's output"), r.stdout
    assert "unshare user+mount ok" in r.stdout  # the nested namespace was really entered


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("audit_hook", [True, False], ids=["with-hook", "kernel-only"])
def test_signals_cannot_reach_processes_outside(mode, audit_hook):
    """kill/killpg aimed at a process of the caller (its PID and process group are known to the
    program) and at the caller itself leave both running."""
    if not audit_hook and mode != "namespaces":
        pytest.skip("without the hook only the PID namespace can stop the signal")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        code = ("import os, signal\n"
                f"for pid in ({victim.pid}, {os.getpid()}, os.getppid(), 1, -1):\n"
                "    for f in (os.kill, os.killpg):\n"
                "        try:\n            f(pid, signal.SIGKILL)\n            print('sent', f.__name__, pid)\n"
                "        except (OSError, PermissionError) as e:\n"
                "            print('refused', f.__name__, pid, type(e).__name__)\n")
        r = run_program(code, isolation=mode, audit_hook=audit_hook, timeout_s=10)
        time.sleep(0.3)
        assert victim.poll() is None, f"the caller's process was killed by the sandbox ({r.stdout})"
    finally:
        victim.kill()
        victim.wait()


def _sandbox_processes(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd:
            found.append(pid)
    return found


@needs_namespaces
def test_a_daemonized_child_does_not_outlive_the_sandbox():
    """Kernel layers alone (no audit hook): a child that double-forks and calls setsid, then
    outlives its parent, is gone when run_program returns."""
    code = ("import os, time\n"
            "print(os.getcwd(), flush=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n    os._exit(0)\n"
            "time.sleep(0.3)\n")
    r = run_program(code, audit_hook=False, timeout_s=10)
    assert r.status == "passed", (r.status, r.detail, r.stderr[-500:])
    workdir = r.stdout.split()[0]
    time.sleep(0.2)
    assert _sandbox_processes(workdir) == [], "a process of the sandbox is still running"


@pytest.mark.parametrize("mode", MODES)
def test_subprocess_and_multiprocessing_are_refused(mode):
    """subprocess and multiprocessing (the usual ways to start workers) are refused by the hook."""
    code = ("import sys\n"
            "sleeper = [sys.executable, '-c', 'import time; time.sleep(30)']\n"
            "for start in (lambda: __import__('subprocess').Popen(sleeper),\n"
            "              lambda: __import__('multiprocessing').Process(target=print).start()):\n"
            "    try:\n        start()\n        print('started')\n"
            "    except Exception as e:\n        print('refused', type(e).__name__)\n")
    r = run_program(code, isolation=mode, timeout_s=10)
    assert r.status == "passed", (r.status, r.detail, r.stderr[-500:])
    assert "started" not in r.stdout and r.stdout.count("refused") == 2, r.stdout


@needs_namespaces
def test_forking_is_bounded_by_the_kernel_alone():
    """Without the hook, a program that forks sleeping children until it cannot gets at most
    max(max_processes, pid_max of the namespace) of them (root is not bound by RLIMIT_NPROC, so
    the namespace's pid_max is the bound there); none survives the sandbox."""
    from l2t_core.eval.sandbox import _PID_MAX_MIN, _probe

    layers = _probe()["layers"]
    if os.geteuid() == 0 and layers.get("pid_max") != "ok":
        pytest.skip(f"root without a per-namespace pid_max (Linux < 6.14): {layers.get('pid_max')}")
    code = ("import os, time\nn = 0\nprint(os.getcwd(), flush=True)\n"
            "for _ in range(2000):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(20)\n        os._exit(0)\n    n += 1\n"
            "print('forked', n, flush=True)\n")
    r = run_program(code, audit_hook=False, max_processes=16, timeout_s=20, cpu_s=10)
    assert r.status == "passed", (r.status, r.detail, r.stderr[-500:])
    n = int(r.stdout.split("forked")[1])
    bound = 16 if os.geteuid() != 0 else _PID_MAX_MIN
    assert 0 < n <= bound, f"{n} processes forked; the bound is {bound}"
    time.sleep(0.2)
    assert _sandbox_processes(r.stdout.split()[0]) == []


# =============================================================================================
# No credential lands in artifacts: a real training run on S3 (moto server), launched by the
# pipeline's TrainingLauncher through Dagster Pipes


@pytest.fixture
def s3_with_canaries(monkeypatch):
    with moto_s3(monkeypatch, "l2t-leak", CANARIES) as (client, _):
        yield client


def _object_texts(key: str, data: bytes) -> list[str]:
    """Every readable form of an object: its bytes, parquet cells and metadata, zip members."""
    texts = [data.decode("utf-8", "replace")]
    if key.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        texts.append(json.dumps(table.to_pylist(), default=str))
        texts.append(str(table.schema.metadata))
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            texts.extend(z.read(n).decode("utf-8", "replace") for n in z.namelist())
    return texts


@pytest.mark.slow
def test_no_credential_lands_in_any_artifact_of_a_training_run(tiny_dir, tmp_path, s3_with_canaries, capfd,
                                                               monkeypatch):
    """A real l2t training (tiny model, 2 steps, a checkpoint per step) on s3:// with distinctive fake
    credentials in the environment; then every object in the bucket, the process output, the Dagster
    event log (Pipes logs and materialization metadata) and the warehouse rows built from the run
    are searched for them."""
    import duckdb
    from dagster._serdes import serialize_value

    from l2t_core.checkpoint import RunStorage
    from l2t_core.config import TrainConfig
    from l2t_pipeline import warehouse
    from l2t_pipeline.tables import trainer_tables

    data = tmp_path / "data"
    data.mkdir()
    (data / "toy.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "problem": f"Compute {i} + 1.",
                                                        "answer": str(i + 1)}) + "\n" for i in range(6)))
    monkeypatch.setenv("L2T_DATA_DIR", str(data))
    url = "s3://l2t-leak/runs/tiny/l2t/abc"
    cfg = TrainConfig.model_validate(dict(
        policy=str(tiny_dir), out=url, steps=2, prompts_per_step=2, checkpoint_every=1, keep_checkpoints=2,
        method="l2t", device="cpu", data={"source": "toy.jsonl"}, optim={"lr": 1e-3},
        rollout={"group_size": 2, "max_new_tokens": 8, "max_prompt_tokens": 512}, micro_batch_tokens=700))

    @dg.asset
    def training_run(context, launcher: TrainingLauncher):
        return launcher.launch(context, cfg).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    res = dg.materialize([training_run], resources={"launcher": TrainingLauncher(torch_threads=1, cwd=str(tmp_path))},
                         instance=instance, raise_on_error=False)
    captured = capfd.readouterr()
    assert res.success, captured.err[-3000:]

    found: list[str] = []
    # 1. everything the run wrote to the bucket
    client = s3_with_canaries
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="l2t-leak")["Contents"]]
    assert any(k.endswith("train_config.json") for k in keys) and any(k.endswith(".parquet") for k in keys), keys
    found += _leaks("\n".join(keys), "the object keys")
    for key in keys:
        body = client.get_object(Bucket="l2t-leak", Key=key)["Body"].read()
        for text in _object_texts(key, body):
            found += _leaks(text, f"s3://l2t-leak/{key}")
    # 2. the training process's stdout/stderr (its logs) and the Dagster event log: Pipes messages,
    #    the materialization metadata, the step logs
    found += _leaks(captured.out + captured.err, "the captured process output")
    events = instance.all_logs(res.run_id)
    assert any(e.dagster_event and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION" for e in events)
    for e in events:
        found += _leaks(serialize_value(e), f"event {e.dagster_event.event_type_value if e.dagster_event else 'log'}")
    # 3. the warehouse rows the checkpoints asset builds from the run
    con = duckdb.connect(str(tmp_path / "l2t.duckdb"))
    tables = trainer_tables(RunStorage(url), "tiny", "l2t")
    tables["train_steps"] = warehouse.train_steps_frame(tables["train_steps"], "tiny", "l2t")
    warehouse.write_validated(con, tables, "checkpoints", "tiny|l2t")
    for t in tables:
        found += _leaks(con.execute(f"SELECT * FROM {t}").df().to_json(), f"DuckDB table {t}")
    con.close()
    # 4. anything left in the launcher's working directory
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".yaml", ".log", ".txt", ".jsonl"):
            found += _leaks(p.read_bytes(), str(p))
    assert not found, f"credentials leaked: {found}"
    # the check itself can see a leak: the environment the run had does hold the canaries
    assert _leaks(json.dumps(dict(os.environ)), "the test's environment")


# =============================================================================================
# URLs with credentials are shown redacted


SECRETISH = st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=6, max_size=30)


@settings(max_examples=300, deadline=None)
@given(user=st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), min_size=4, max_size=20),
       secret=SECRETISH.filter(str.strip),
       scheme=st.sampled_from(["s3", "gs", "https", "ftp", "sftp", "webdav", "abfs"]),
       host=st.sampled_from(["bucket", "My-Bucket", "host.example.com:9000", "[::1]:9000", "10.0.0.1"]),
       path=st.sampled_from(["", "/", "/runs/m/l2t/abc", "/runs/a b/x.parquet", "/dir/with:colon"]),
       query=st.sampled_from(["", "?region=us-east-1", "#frag"]))
def test_redact_url_removes_any_userinfo(user, secret, scheme, host, path, query):
    from l2t_pipeline.resources import redact_url

    url = f"{scheme}://{user}:{secret}@{host}{path}{query}"
    shown = redact_url(url)
    assert secret not in shown and f"{user}:" not in shown, (url, shown)
    assert shown == f"{scheme}://{host}{path}{query}", (url, shown)


@pytest.mark.parametrize(("url", "shown"), [
    ("s3://bucket/runs/x", "s3://bucket/runs/x"),
    ("/local/runs/x", "/local/runs/x"),
    ("s3://bucket/mail/user@example.com/f", "s3://bucket/mail/user@example.com/f"),  # an @ in a key is kept
    ("https://host/b?X-Amz-Credential=AKIAX%2F2024&X-Amz-Signature=abc123&x-id=GetObject",
     "https://host/b?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&x-id=GetObject"),
    ("https://host/b?token=t0k3n&access_key=k&sig=s&page=2",
     "https://host/b?token=REDACTED&access_key=REDACTED&sig=REDACTED&page=2"),
    ("s3://AKIA:only/slashes+plus@bucket/k", "s3://bucket/k"),
    ("s3://:secret@bucket/k", "s3://bucket/k"),
    ("s3://tokenonly@bucket/k", "s3://bucket/k"),
    ("https://u:p@[::1]:9000/b", "https://[::1]:9000/b"),  # the host as written
    ("https://host:9000/a@b", "https://b"),  # ambiguous with user:password@: shortened, by design
])
def test_redact_url_examples(url, shown):
    from l2t_pipeline.resources import redact_url

    assert redact_url(url) == shown


# Raw URLs the code location shows today, each with why it is there; the test fails when the list
# is out of date in either direction (a new unredacted URL, or one fixed and still listed).
KNOWN_UNREDACTED = {
    # the branch runs only for a local path (no scheme, so no user:password@ to hide)
    "k8s.py": "the run directory {cfg.out!r} is a local path",
    # FINDING (l2t_pipeline/tables.py, trainer_tables): the run URL as given, credentials included if
    # the URL has any; fix: f"the run at {redact_url(storage.url)} ..."
    "tables.py": "the run at {storage.url} logged no training steps",
}


def test_every_url_the_pipeline_shows_goes_through_redaction():
    """Where the code location logs, raises or reports a storage URL, it goes through
    storage.display/redact_url (a static check of l2t_pipeline/*.py: log calls, exceptions, Dagster
    metadata and results); raw URLs are stored only where a run must be reopened."""
    offenders = {}
    for py in sorted((ROOT / "l2t_pipeline").glob("*.py")):
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            shown = name in ("info", "warning", "error", "debug", "exception", "add_output_metadata",
                             "MaterializeResult", "Output", "AssetMaterialization", "log") \
                or name.endswith(("Error", "Failure", "Exception", "Busy"))
            if not shown:
                continue
            for arg in [*node.args, *[k.value for k in node.keywords]]:
                for sub in ast.walk(arg):
                    text = ast.unparse(sub) if isinstance(sub, (ast.Attribute, ast.Subscript, ast.Name)) else ""
                    if re.search(r"(\.out|\burl\b|run_url|checkpoint_url)$", text) and not _inside_display(arg, sub):
                        offenders.setdefault(py.name, []).append(f"line {node.lineno}: {ast.unparse(node)[:160]}")
    unexpected = {f: calls for f, calls in offenders.items()
                  if f not in KNOWN_UNREDACTED or not all(KNOWN_UNREDACTED[f] in c for c in calls)}
    assert not unexpected, f"URLs shown without redaction: {unexpected}"
    assert set(offenders) == set(KNOWN_UNREDACTED), (
        f"fixed: {sorted(set(KNOWN_UNREDACTED) - set(offenders))}; remove them from KNOWN_UNREDACTED")


def _inside_display(root, target) -> bool:
    """True when ``target`` sits inside a display()/redact_url() call within ``root``."""
    for node in ast.walk(root):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("display", "redact_url") and any(target is n for n in ast.walk(node)):
                return True
    return False


# =============================================================================================
# The Dagster webserver listens on 127.0.0.1 unless told otherwise


DOCS = ["README.md", "l2t_pipeline/README.md", "infra/README.md", "Makefile"]


def test_documented_launch_commands_do_not_bind_all_interfaces():
    """Every documented ``dagster dev``/``dagster-webserver`` command either names no host (the
    default is 127.0.0.1, see the next test) or a loopback one."""
    commands = []
    for doc in DOCS:
        for line in (ROOT / doc).read_text().splitlines():
            if re.search(r"dagster(-webserver| dev\b)|dagster_webserver", line):
                commands.append((doc, line.strip()))
    assert any("dagster dev" in c for _, c in commands), "no documented way to start the UI was found"
    for doc, cmd in commands:
        host = re.search(r"(?:-h|--host|--dagit-host)[ =](\S+)", cmd)
        assert host is None or host.group(1) in ("127.0.0.1", "localhost", "::1"), f"{doc}: {cmd}"
        assert "0.0.0.0" not in cmd, f"{doc}: {cmd}"
    for cfg in ("workspace.yaml", "dagster_home/dagster.yaml"):
        assert "0.0.0.0" not in (ROOT / cfg).read_text(), cfg


def test_the_only_all_interfaces_bind_is_the_containers_code_server():
    """0.0.0.0 appears in no tracked file but the GPU image's command, where the code server must be
    reachable from other pods (the webserver is the Helm chart's, behind its Service)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        p = ROOT / name
        if not p.is_file() or p.parts[len(ROOT.parts)] == "tests":
            continue
        try:
            text = p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{name}: {ln.strip()}" for ln in text.splitlines() if "0.0.0.0" in ln]
    assert hits == ['infra/docker/Dockerfile.gpu: CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", '
                    '"-m", "l2t_pipeline.definitions"]'], hits


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":  # LISTEN
                out.append(addr)
    return out


@pytest.mark.slow
def test_webserver_default_bind_is_loopback(tmp_path):
    """``dagster dev`` starts dagster-webserver without a host unless one is given; started the same
    way (no -h), the webserver listens on 127.0.0.1 only."""
    from dagster._cli import dev as dev_cli

    host_opt = [p for p in dev_cli.dev_command.params if p.name == "host"][0]
    assert host_opt.default in (None, "") or "Sentinel" in repr(host_opt.default), host_opt.default
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-p", str(port), "--empty-workspace"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            if proc.poll() is not None:
                raise AssertionError(f"dagster-webserver exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("dagster-webserver did not listen within 90 s")
            time.sleep(0.5)
        addrs = _listening(port)
        assert addrs == ["0100007F"], f"listening on {addrs} (0100007F is 127.0.0.1; 00000000 is 0.0.0.0)"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
