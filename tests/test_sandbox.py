"""Sandboxed execution of generated code (l2t_core.eval.sandbox): HumanEval and hostile programs.

Hostile programs run in both isolation modes where this machine has namespaces; the
``kernel only`` tests switch the audit hook off to check that the namespaces alone contain them.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from l2t_core.data import data_dir
from l2t_core.eval.datasets import load_benchmark
from l2t_core.eval.sandbox import (
    ExecResult,
    check_humaneval,
    humaneval_program,
    isolation_report,
    network_isolation,
    run_many,
    run_program,
)

HAVE_NAMESPACES = network_isolation() == "namespaces"
MODES = [pytest.param("namespaces", marks=pytest.mark.skipif(not HAVE_NAMESPACES, reason=isolation_report()["reason"])),
         "audit-hook"]
needs_namespaces = pytest.mark.skipif(not HAVE_NAMESPACES, reason="no namespace isolation on this machine")


def _processes() -> int:
    """Every process of the machine: the tests that count them are marked `exclusive`, so that no
    other test starts or ends processes meanwhile under make test's two workers."""
    return sum(name.isdigit() for name in os.listdir("/proc"))


@pytest.fixture(scope="module")
def humaneval():
    if not (data_dir() / "humaneval.jsonl").is_file():
        pytest.skip(f"humaneval.jsonl is not in the data dir {data_dir()} (set L2T_DATA_DIR)")
    return load_benchmark("humaneval", allow_download=False)[:10]


@pytest.mark.exclusive  # timed
def test_canonical_solutions_pass_in_parallel(humaneval):
    start = time.monotonic()
    results = run_many([humaneval_program(it, it.answer) for it in humaneval], workers=4, cpu_s=1, timeout_s=10)
    assert [r.status for r in results] == ["passed"] * len(humaneval), [(r.status, r.detail) for r in results]
    assert time.monotonic() - start < 20


def test_wrong_solution_fails(humaneval):
    item = humaneval[0]  # has_close_elements
    r = check_humaneval(item, "    return False\n")
    assert r.status == "failed" and "AssertionError" in r.stderr and not r.passed
    assert check_humaneval(item, item.answer).passed


def test_early_exit_is_not_a_pass(humaneval):
    r = check_humaneval(humaneval[0], "    return False\nimport sys\nsys.exit(0)\n")
    assert (r.status, r.returncode) == ("failed", 0) and "before its end" in r.detail


def test_output_is_kept_and_bounded():
    r = run_program("print('hello')\nimport sys\nprint('x' * 100000, file=sys.stderr)\nraise ValueError('boom')")
    assert r.status == "failed" and r.stdout == "hello\n" and r.detail == "ValueError: boom"
    assert len(r.stderr) <= 8192 and r.stderr.rstrip().endswith("ValueError: boom")


def test_the_work_directory_is_writable_and_removed():
    r = run_program("import os\nopen('f.txt', 'w').write('ok')\nos.mkdir('d')\nprint(os.getcwd())\n"
                    "print(open(os.path.join(os.getcwd(), 'f.txt')).read())")
    assert r.status == "passed", r.stderr
    workdir, content = r.stdout.split()
    assert content == "ok" and os.path.basename(workdir).startswith("l2t-sandbox-")
    assert not os.path.exists(workdir)


@pytest.mark.exclusive  # timed
@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    start = time.monotonic()
    r = run_program("while True:\n    pass", timeout_s=1.5, isolation=mode)
    assert r.status == "timeout" and time.monotonic() - start < 4
    assert run_program("print(2 + 2)", isolation=mode).stdout == "4\n"


@pytest.mark.exclusive  # timed
def test_cpu_limit_kills():
    r = run_program("while True:\n    pass", timeout_s=10, cpu_s=1)
    assert r.status == "killed" and "SIGXCPU" in r.detail and r.duration_s < 8


@pytest.mark.exclusive  # counts the machine's processes
@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_contained(mode):
    before = _processes()
    r = run_program("import os\nwhile True:\n    os.fork()", timeout_s=3, isolation=mode)
    assert r.status in ("failed", "timeout") and not r.passed
    time.sleep(0.2)
    assert _processes() <= before + 3
    assert run_program("print('after')", isolation=mode).stdout == "after\n"


@pytest.mark.exclusive  # counts the machine's processes
@needs_namespaces
def test_fork_bomb_is_contained_by_the_kernel_alone():
    before = _processes()
    start = time.monotonic()
    r = run_program("import os\nwhile True:\n    os.fork()", timeout_s=3, cpu_s=3, audit_hook=False)
    assert r.status in ("failed", "timeout") and time.monotonic() - start < 6
    time.sleep(0.2)
    assert _processes() <= before + 3  # the PID namespace took every forked process with it
    assert run_program("print('after')").stdout == "after\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["open", "os.open", "rename-in"])
def test_writes_outside_the_work_directory_are_refused(tmp_path, mode, how):
    target = tmp_path / "escaped.txt"
    code = {
        "open": f"open({str(target)!r}, 'w').write('pwned')",
        "os.open": f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'pwned')",
        "rename-in": f"import os\nopen('x', 'w').write('pwned')\nos.replace('x', {str(target)!r})",
    }[how]
    r = run_program(code, isolation=mode)
    assert r.status == "failed" and not target.exists(), (r.status, r.stderr)


def test_existing_files_outside_cannot_be_removed(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        assert run_program(code).status == "failed"
    assert victim.read_text() == "precious"


@needs_namespaces
def test_the_filesystem_is_read_only_for_the_kernel_too(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('pwned')", audit_hook=False)
    assert r.status == "failed" and "Read-only file system" in r.stderr and not target.exists()


@pytest.mark.parametrize("mode", MODES)
def test_huge_allocation_hits_the_memory_limit(mode):
    r = run_program("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", memory_mb=256, isolation=mode)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_parent_secrets_are_not_visible(monkeypatch, mode):
    secret = "l2t-test-secret-8d1f0c"
    monkeypatch.setenv("L2T_SANDBOX_TEST_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit():\n"
        "        try:\n            print(open(f'/proc/{p}/environ', 'rb').read())\n"
        "        except OSError:\n            pass\n"
    )
    r = run_program(code, isolation=mode)
    assert r.status == "passed", r.stderr
    assert "HOME" in r.stdout and secret not in r.stdout and "AWS_SECRET_ACCESS_KEY" not in r.stdout
    if mode == "namespaces":  # /proc shows only the sandbox's own processes
        assert r.stdout.count("LANG=C.UTF-8") == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("audit_hook", [True, False])
def test_no_connection_reaches_a_local_listener(mode, audit_hook):
    if not audit_hook and mode != "namespaces":
        pytest.skip("without the hook only the network namespace can stop the connection")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')"
        r = run_program(code, isolation=mode, audit_hook=audit_hook)
        assert r.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()


def test_results_are_plain_data():
    r = run_program("print('x')")
    assert isinstance(r, ExecResult) and r.passed and r.returncode == 0 and r.duration_s > 0


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb must be an integer >= 64"):
        run_program("pass", memory_mb=8)
    with pytest.raises(ValueError, match="isolation must be"):
        run_program("pass", isolation="docker")
