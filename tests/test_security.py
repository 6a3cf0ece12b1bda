"""Security: what generated code can reach in the sandbox, where credentials may end up, how URLs
with credentials are shown and where they are refused (so they reach no train_config.json, warehouse
row, Dagster metadata, log line or error message), and where the Dagster webserver listens by default.

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
import pandas as pd
import pytest
from hypothesis import assume, given, settings
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


SECRET = "Zq9sEcReT-l2t-canary"  # in every credentialed URL below; found anywhere: a leak


@pytest.mark.parametrize(("url", "shown"), [
    # user info: user:password@, a token as the user name, percent-encoded parts, empty user
    (f"ftp://user:{SECRET}@host/path", "ftp://host/path"),
    (f"ftp://user:{SECRET}@host:2121/runs/x", "ftp://host:2121/runs/x"),
    (f"https://{SECRET}@host/run", "https://host/run"),
    (f"https://{SECRET}@host:8443/run?page=2", "https://host:8443/run?page=2"),
    (f"https://user%40corp.com:{SECRET}%2F%3F%23@host/x", "https://host/x"),
    (f"s3://AKIAL2T:{SECRET}/with+slash@bucket/runs/a", "s3://bucket/runs/a"),
    (f"webdav://user:{SECRET}@@host/x", "webdav://host/x"),
    # query and fragment secrets: values replaced, names (even percent-encoded) and other parameters kept
    (f"https://b.s3.amazonaws.com/k?X-Amz-Security-Token={SECRET}&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Security-Token=REDACTED&X-Amz-Expires=60"),
    (f"https://host/x?X%2DAmz%2DSignature={SECRET}&x-id=GetObject",
     "https://host/x?X%2DAmz%2DSignature=REDACTED&x-id=GetObject"),
    (f"https://host/x?password={SECRET}&user=me", "https://host/x?password=REDACTED&user=me"),
    (f"https://host/x?a=1;api_key={SECRET}", "https://host/x?a=1;api_key=REDACTED"),
    (f"https://host/x?token%3D{SECRET}", "https://host/x?token=REDACTED"),
    (f"abfs://c@acct.dfs.core.windows.net/x?sv=2024&sig={SECRET}",
     "abfs://c@acct.dfs.core.windows.net/x?sv=2024&sig=REDACTED"),
    (f"az://container:{SECRET}@acct.blob.core.windows.net/x", "az://acct.blob.core.windows.net/x"),
    (f"https://host/cb#access_token={SECRET}&state=1", "https://host/cb#access_token=REDACTED&state=1"),
    # a database string without "//": MotherDuck's token in the options
    (f"md:l2t?motherduck_token={SECRET}&saas_mode=true", "md:l2t?motherduck_token=REDACTED&saas_mode=true"),
    (f"md:?motherduck_token={SECRET}", "md:?motherduck_token=REDACTED"),
    # fsspec chains: every URL of the chain
    (f"simplecache::ftp://u:{SECRET}@host/x", "simplecache::ftp://host/x"),
    (f"zip://member.txt::https://host/a.zip?token={SECRET}", "zip://member.txt::https://host/a.zip?token=REDACTED"),
    (f"zip://member.txt::https://{SECRET}@host/a.zip", "zip://host/a.zip"),  # ambiguous: shortened, by design
    # nothing to hide: unchanged (plain paths and file:// even with '@' or '?token=' in them)
    ("/runs/user@host/x?token=abc", "/runs/user@host/x?token=abc"),
    ("runs/train", "runs/train"),
    ("file:///home/user@corp/runs?token=abc", "file:///home/user@corp/runs?token=abc"),
    ("s3://bucket/runs/m/l2t/abc", "s3://bucket/runs/m/l2t/abc"),
    ("abfs://container@acct.dfs.core.windows.net/runs", "abfs://container@acct.dfs.core.windows.net/runs"),
    ("https://host/x?token=&page=1", "https://host/x?token=&page=1"),  # no value, nothing to hide
    ("https://host/x?token=REDACTED", "https://host/x?token=REDACTED"),  # already redacted
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
])
def test_redact_url_cases(url, shown):
    from l2t_core.urls import redact_url, url_credentials

    assert redact_url(url) == shown
    assert SECRET not in shown
    assert redact_url(shown) == shown and url_credentials(shown) == []  # idempotent; a redacted URL is clean
    assert bool(url_credentials(url)) == (shown != url)


def test_one_redaction_function_everywhere():
    """The pipeline (resources, k8s) uses l2t_core's redact_url, not a copy of it."""
    from l2t_core import urls
    from l2t_pipeline import k8s, resources

    assert resources.redact_url is urls.redact_url and k8s.redact_url is urls.redact_url
    assert "def redact_url" not in (ROOT / "l2t_pipeline" / "resources.py").read_text()


TOKENISH = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="),
                   min_size=4, max_size=30)


@settings(max_examples=200, deadline=None)
@given(secret=TOKENISH, form=st.sampled_from(["user:{s}@", "{s}@", "?token={s}", "?X-Amz-Signature={s}", "?sig={s}"]),
       scheme=st.sampled_from(["s3", "https", "ftp", "gs", "abfs"]), host=st.sampled_from(["bucket", "h.example:9000"]))
def test_any_credentialed_url_is_refused_without_showing_the_secret(secret, form, scheme, host):
    """Whatever the form (user:password@, a token as user name, a signed query), the URL is refused
    and neither the error nor the redacted URL holds the secret."""
    from l2t_core.urls import CredentialsInURL, redact_url, refuse_credentials

    assume(not (scheme == "abfs" and form == "{s}@"))  # abfs://container@account: a container, kept
    secret = "Zq9" + secret.replace("/", "").replace("?", "")  # distinctive; "/" ends a token user name
    url = (f"{scheme}://{form.format(s=secret)}{host}/runs/x" if "@" in form
           else f"{scheme}://{host}/runs/x{form.format(s=secret)}")
    with pytest.raises(CredentialsInURL) as err:
        refuse_credentials(url, "somewhere")
    assert secret not in str(err.value) and secret not in redact_url(url), (url, str(err.value))
    assert str(err.value).startswith("somewhere: the URL ")


# =============================================================================================
# URLs with credentials are refused where they enter, so they reach no file, row, metadata or log


CREDENTIALED_URLS = [f"ftp://user:{SECRET}@127.0.0.1:1/runs/x", f"https://{SECRET}@host.example/runs/x",
                     f"s3://AKIAL2T:{SECRET}@bucket/runs/x", f"s3://bucket/runs/x?X-Amz-Signature={SECRET}"]


def _no_secret(*texts) -> None:
    for t in texts:
        assert SECRET not in str(t), str(t)[:2000]


@pytest.mark.parametrize("field", ["out", "policy", "deepspeed_config"])
@pytest.mark.parametrize("url", CREDENTIALED_URLS)
def test_train_config_refuses_credentials_without_echoing_them(field, url):
    """TrainConfig (saved as train_config.json with every checkpoint, as config_json in the warehouse,
    written next to the run by the k8s launcher) refuses a location with credentials: the error names
    the field, shows the URL redacted and says where credentials go instead; pydantic's input echo
    (in the message and in errors()) is the redacted URL too."""
    from pydantic import ValidationError

    from l2t_core.config import TrainConfig
    from l2t_core.urls import redact_url

    data = {"policy": "p", "engine": "deepspeed", "deepspeed_config": "infra/deepspeed/zero2.json", field: url}
    with pytest.raises(ValidationError) as err:
        TrainConfig.model_validate(data)
    _no_secret(err.value, repr(err.value.errors()), json.dumps(err.value.errors(include_context=False), default=repr))
    [e] = err.value.errors()
    assert e["loc"] == (field,) and f"TrainConfig.{field}: the URL {redact_url(url)!r} has credentials" in e["msg"]
    for how in ("AWS_ACCESS_KEY_ID", "FSSPEC_FTP_PASSWORD", "storage_options"):
        assert how in e["msg"], e["msg"]
    with pytest.raises(ValidationError):  # the JSON path (a saved or launched config) too
        TrainConfig.model_validate_json(json.dumps(data))
    # the same config without the credentials is fine, and a redacted URL is a valid location
    assert getattr(TrainConfig.model_validate({**data, field: redact_url(url)}), field) == redact_url(url)


def test_resume_matches_a_config_saved_with_credentials(tmp_path):
    """Resume compares the saved train_config.json with today's config (config_differences): a run
    saved before credentials were refused, with them in its URLs, is the same run as today's config
    without them; a real difference is still found."""
    from l2t_core.config import TrainConfig, config_differences

    current = TrainConfig(policy="https://hub.example/org/model", out="ftp://127.0.0.1/runs/x")
    saved = json.loads(current.model_dump_json())
    saved.update(out=f"ftp://user:{SECRET}@127.0.0.1/runs/x", policy=f"https://{SECRET}@hub.example/org/model")
    assert config_differences(saved, current) == []
    assert config_differences(saved, current, ignore=("out",)) == []  # the trainer's call
    assert config_differences({**saved, "steps": 7}, current, ignore=("out",)) == ["steps"]
    assert config_differences({**saved, "policy": f"https://{SECRET}@other.example/m"}, current) == ["policy"]


def test_trainer_and_run_storage_refuse_credentials_before_opening_anything(monkeypatch, caplog, tmp_path):
    """A config built around validation (model_construct) still cannot train into a credentialed URL:
    RunStorage refuses it before fsspec sees it, so nothing is opened, logged or written."""
    import fsspec

    from l2t_core.checkpoint import RunStorage
    from l2t_core.config import TrainConfig
    from l2t_core.trainer import Trainer
    from l2t_core.urls import CredentialsInURL

    def must_not_open(*a, **k):
        raise AssertionError("fsspec was asked to open a credentialed URL")

    monkeypatch.setattr(fsspec.core, "url_to_fs", must_not_open)
    caplog.set_level("DEBUG")
    for url in CREDENTIALED_URLS:
        with pytest.raises(CredentialsInURL) as err:
            RunStorage(url)
        _no_secret(err.value)
        assert str(err.value).startswith("RunStorage: the URL ")
        cfg = TrainConfig.model_construct(**{**dict(TrainConfig(policy="p", out=str(tmp_path / "r"))), "out": url})
        with pytest.raises(CredentialsInURL) as err:
            Trainer(cfg)
        _no_secret(err.value)
    _no_secret(caplog.text)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_open_with_credentials_from_the_environment_shows_none(monkeypatch, caplog):
    """The supported way (fsspec configuration from the environment, FSSPEC_FTP_PASSWORD): a storage
    that cannot be opened (nothing listens on the port) fails naming the URL and what to check,
    and neither the error, its cause nor the log holds the password."""
    import fsspec.config

    from l2t_core.checkpoint import RunStorage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    monkeypatch.setitem(fsspec.config.conf, "ftp", {"username": "l2t", "password": SECRET, "timeout": 5})
    caplog.set_level("DEBUG")
    with pytest.raises(OSError) as err:
        RunStorage(f"ftp://127.0.0.1:{port}/runs/x")
    assert f"cannot open run storage 'ftp://127.0.0.1:{port}/runs/x'" in str(err.value)
    assert "FSSPEC_<PROTOCOL>_<OPTION>" in str(err.value)
    _no_secret(err.value, err.value.__cause__, repr(err.value.__cause__), caplog.text)


def test_the_command_line_refuses_credentials_without_echoing_them(tmp_path, capsys, caplog):
    """``l2t train`` with a credentialed --out, --policy, --config URL, --set override or config file
    entry stops before any work with a message that shows only the redacted URL."""
    from l2t_core.cli import main

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(f"policy: p\nout: ftp://user:{SECRET}@127.0.0.1:1/runs/x\n")
    cases = {
        "--out": ["train", "--policy", "p", "--out", f"ftp://user:{SECRET}@127.0.0.1:1/runs/x"],
        "--policy": ["train", "--policy", f"https://{SECRET}@hub.example/m", "--out", str(tmp_path / "r")],
        "--config": ["train", "--config", f"https://user:{SECRET}@127.0.0.1:1/train.yaml"],
        "--set": ["train", "--policy", "p", "--set", f"out=s3://bucket/x?X-Amz-Signature={SECRET}"],
        "TrainConfig.out": ["train", "--config", str(cfg_file)],
        "--model": ["eval", "--model", f"https://{SECRET}@hub.example/m", "--out", str(tmp_path / "e")],
    }
    caplog.set_level("DEBUG")
    for named, argv in cases.items():
        with pytest.raises(SystemExit) as err:
            main(argv)
        message = str(err.value.code)
        assert named in message and "has credentials in it" in message, message
        _no_secret(message)
    out = capsys.readouterr()
    _no_secret(out.out, out.err, caplog.text)
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_pipeline_resources_refuse_credentials(monkeypatch, tmp_path):
    """L2T_STORAGE_URL with credentials fails when the code location loads (before Dagster shows
    the resource's configuration); an explicit L2TStorage url, and a model registry entry's path
    (logged and stored with the evaluations), are refused where they are used."""
    import yaml

    from l2t_core.urls import CredentialsInURL
    from l2t_pipeline.resources import L2TStorage, ModelRegistry, default_storage_url

    monkeypatch.setenv("L2T_STORAGE_URL", f"s3://AKIAL2T:{SECRET}@bucket/l2t")
    for build in (default_storage_url, L2TStorage):
        with pytest.raises(CredentialsInURL) as err:
            build()
        _no_secret(err.value)
        assert "L2T_STORAGE_URL: the URL 's3://bucket/l2t'" in str(err.value)
    storage = L2TStorage(url=f"ftp://user:{SECRET}@127.0.0.1/l2t", models_dir=str(tmp_path))
    for use in (lambda: storage.run_url("m", "l2t", "abc"), lambda: storage.run_storage(f"{storage.url}/runs/x")):
        with pytest.raises(CredentialsInURL) as err:
            use()
        _no_secret(err.value)
    assert SECRET not in storage.display(storage.url)
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"models": {"m": {"kind": "pretrained", "path": f"https://{SECRET}@hub.example/m"}}}))
    with pytest.raises(CredentialsInURL, match=r"entry 'm', path: the URL 'https://hub.example/m'") as err:
        ModelRegistry(path=str(reg)).get("m")
    _no_secret(err.value)


def _eval_rows(model_path: str, accuracy: float = 0.5) -> pd.DataFrame:
    """eval_results rows as base_model/benchmark_reports build them (summary_rows + with_model_columns)."""
    from l2t_pipeline.assets import with_model_columns
    from l2t_pipeline.resources import summary_rows

    stats = {"n": 10, "accuracy": accuracy, "mean_tokens": 12.0, "mean_episodes": 2.0, "tagged_share": 1.0,
             "finished_share": 1.0, "redundant_share": 0.0}
    summary = {**stats, "per_level": {1: dict(stats), 2: dict(stats)}}
    return with_model_columns(summary_rows(summary, "walk_heldout", "walk_heldout:abc"), "checkpoint", "tiny", "l2t",
                              model_path)


def test_warehouse_rows_and_quarantine_never_hold_credentials():
    """The warehouse writers redact every location: eval_results.model_path, the checkpoints row's
    run_url, checkpoint_url and the URLs inside config_json, and rows that fail their schema (in the
    quarantine table, the SchemaViolation message and its Dagster metadata)."""
    import duckdb
    from dagster._serdes import serialize_value

    from l2t_pipeline import warehouse
    from l2t_pipeline.schemas import SchemaViolation

    run = f"s3://AKIAL2T:{SECRET}@bucket/runs/tiny/l2t/abc"
    ckpt = f"https://bucket.example/runs/tiny/l2t/abc/checkpoints/step-000002?X-Amz-Signature={SECRET}"
    config = {"policy": f"https://{SECRET}@hub.example/m", "out": run, "steps": 2, "data": {"source": "walk"}}
    registry_row = pd.DataFrame([{"base_model": "tiny", "method": "l2t", "run_url": run, "checkpoint_url": ckpt,
                                  "final_step": 2, "config_hash": "abc", "config_json": json.dumps(config),
                                  "base_weights": None}])
    con = duckdb.connect(":memory:")
    counts = warehouse.write_validated(con, {"eval_results": _eval_rows(ckpt)}, "checkpoints", "tiny|l2t",
                                       unvalidated={"checkpoints": registry_row})
    assert counts == {"eval_results": 3, "checkpoints": 1}
    stored = con.execute("SELECT * FROM checkpoints").df()
    assert stored.loc[0, "run_url"] == "s3://bucket/runs/tiny/l2t/abc"
    assert stored.loc[0, "checkpoint_url"].endswith("step-000002?X-Amz-Signature=REDACTED")
    assert json.loads(stored.loc[0, "config_json"]) == {**config, "policy": "https://hub.example/m",
                                                        "out": "s3://bucket/runs/tiny/l2t/abc"}
    # a clean config_json is stored exactly as written
    clean = registry_row.assign(run_url="s3://bucket/r", checkpoint_url="s3://bucket/r/c", config_json='{"a":1}')
    warehouse.replace_rows(con, "checkpoints", clean, "checkpoints", "other")
    assert con.execute("SELECT config_json FROM checkpoints WHERE partition_key = 'other'").fetchone()[0] == '{"a":1}'
    # rows that fail their schema: quarantined, reported, and still without the secret
    with pytest.raises(SchemaViolation) as err:
        warehouse.write_validated(con, {"eval_results": _eval_rows(run, accuracy=2.0)}, "benchmark_reports", "tiny|l2t")
    quarantined = con.execute("SELECT * FROM quarantine").df()
    assert len(quarantined) == 3 and "s3://bucket/runs/tiny/l2t/abc" in quarantined.loc[0, "row_json"]
    _no_secret(err.value, serialize_value(err.value.metadata))
    for table in warehouse.TABLES:
        _no_secret(con.execute(f"SELECT * FROM {table}").df().to_json())
    con.close()


# Raw URLs the code location shows today, each with why it is there; the test fails when the list
# is out of date in either direction (a new unredacted URL, or one fixed and still listed).
KNOWN_UNREDACTED = {
    # the branch runs only for a local path (no scheme, so no user:password@ to hide)
    "k8s.py": "the run directory {cfg.out!r} is a local path",
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
