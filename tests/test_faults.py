"""Faults: kill -9 of the trainer in each phase, killed checkpoint writes, a Dagster run failing
part-way and re-executed from failure, and concurrent DuckDB writer processes. The scenarios live in
``bench.faults`` (``python -m bench.faults`` runs them at larger N); here they run small."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import torch

from bench import faults
from l2t_core.checkpoint import LATEST, RunStorage

REPO = Path(__file__).resolve().parents[1]


def explain(res: dict) -> str:
    return json.dumps({k: v for k, v in res.items() if k != "records"}, indent=1, default=str)[:6000]


# ------------------------------------------------------------------------------ 1. kill -9 the trainer


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory):
    """3 SIGKILLs of ``python -m l2t_core.cli train`` (rollout, update, checkpoint write), each
    followed by the same command again, and the uninterrupted reference run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train_kills")
    t0 = time.perf_counter()
    res = faults.train_kills(root, kills=3, seed=0, phases=("rollout", "update", "checkpoint"))
    res["test_seconds"] = time.perf_counter() - t0
    return root, res


@pytest.mark.slow
def test_kill_minus_nine_in_each_phase_then_resume_equals_the_uninterrupted_run(killed_training):
    root, res = killed_training
    assert res["crashes"] == 0 and not res["problems"], explain(res)
    # every phase was really hit: the last line the killed process printed names the phase
    assert {"rollout", "update", "checkpoint"} <= set(res["landed"]), explain(res)
    assert res["kills"] >= 3 and all(r["exit"] == -9 for r in res["records"]), explain(res)
    ckpt = [r for r in res["records"] if r["phase"] == "checkpoint"]
    assert all(r["detail"] for r in ckpt), ckpt  # where inside the checkpoint write it died
    # each kill left a usable latest checkpoint, and the next session resumed from exactly it
    assert all(r["latest_usable"] and r["resume_ok"] for r in res["records"]), res["records"]
    assert res["resumed_ok"] == res["kills"]
    for rnd in res["rounds"]:
        cmp = rnd["compare"]
        assert cmp["equal"] and cmp["weights_equal"] and cmp["optimizer_equal"] and cmp["proxy_equal"], rnd
        assert all(t["equal"] and t["rows"] == t["reference_rows"] for t in cmp["tables"].values()), rnd
        assert rnd["leaked_tmp_dirs"] == 0 and rnd["stale_staging_after_finish"] == [], rnd
    assert res["rows_lost"] == 0 and res["duplicate_rows"] == 0
    assert res["test_seconds"] < 240, f"the kill test took {res['test_seconds']:.0f}s"


@pytest.mark.slow
def test_the_run_comparison_catches_lost_rows_and_changed_weights(killed_training, tmp_path):
    """The checker of the kill test is not blind: a lost metrics part, a duplicated one and one
    flipped weight byte are each reported."""
    root, res = killed_training
    ref, run = root / "reference", root / res["rounds"][0]["run"]
    assert faults.compare_runs(ref, run, res["steps"])["equal"]

    lost = tmp_path / "lost"
    shutil.copytree(run, lost)
    part = sorted((lost / "metrics" / "rollouts").glob("part-*.parquet"))[-1]
    part.unlink()
    cmp = faults.compare_runs(ref, lost, res["steps"])
    assert not cmp["equal"] and cmp["rows_lost"] > 0 and not cmp["tables"]["rollouts"]["equal"]

    dup = tmp_path / "dup"
    shutil.copytree(run, dup)
    first = sorted((dup / "metrics" / "train_steps").glob("part-*.parquet"))[0]
    shutil.copy(first, first.with_name("part-000001-000001.parquet"))
    cmp = faults.compare_runs(ref, dup, res["steps"])
    assert not cmp["equal"] and cmp["duplicate_rows"] > 0

    flipped = tmp_path / "flipped"
    shutil.copytree(run, flipped)
    w = flipped / "checkpoints" / f"step-{res['steps']:06d}" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01
    w.write_bytes(bytes(data))
    cmp = faults.compare_runs(ref, flipped, res["steps"])
    assert not cmp["equal"] and not cmp["weights_equal"] and cmp["optimizer_equal"]


def test_phase_lines_are_parsed_from_the_trainer_log():
    line = "2026-11-23 15:15:35,441 INFO l2t.trainer: step 3/4: update"
    assert faults.parse_event(line) == ("update", 3)
    done = "2026-11-23 15:15:36,773 INFO l2t.trainer: step 1/4 l2t: acc 0.00 tok 24.0"
    assert faults.parse_event(done) == ("done", 1)
    assert faults.parse_event("x INFO l2t.checkpoint: checkpoint step-000004 written to /r") == ("written", 4)
    assert faults.parse_event("x INFO l2t.trainer: resumed run ab12 from /r/checkpoints/step-000002 (step 2)") == \
        ("resumed", 2)
    assert faults.parse_event("Writing model shards: 100%") is None


# ------------------------------------------------------------------------------ 2. interrupted checkpoint writes


def test_checkpoint_writer_killed_at_random_points_never_publishes_a_partial_checkpoint(tmp_path):
    # 0.1 s after each shard: the write takes ~0.4 s on any machine, so the kills (at seed 1's fixed
    # fractions of it, 5 of 8 under 0.85) land inside it even when starting the writer is slow
    res = faults.checkpoint_kills(tmp_path, cases=8, seed=1, shards=4, size=1 << 20, pace_s=0.1)
    assert res["crashes"] == 0 and not res["problems"], explain(res)
    assert res["write_s"] >= 0.4, explain(res)
    assert res["kills"] >= 4 and res["landed"].get("while filling/staging", 0) >= 1, explain(res)
    assert res["corrupt_latest"] == 0 and res["lost_checkpoint"] == 0 and res["torn_complete"] == 0
    # the killed writers' staging directories were removed by the next write; nothing leaked to TMPDIR
    assert res["stale_after_next_write"] == 0 and res["leaked_tmp_dirs"] == 0
    assert res["resumed_ok"] == res["cases"] == 8


def test_checkpoint_writer_killed_mid_fill_leaves_only_a_staging_directory(tmp_path):
    """Deterministic variant: SIGKILL once the writer has written part of its shards."""
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    store = RunStorage(str(run))
    store.write_checkpoint(1, faults.fill_shards(1, 2, 1024))
    code = ("import sys, time\n"
            "from l2t_core.checkpoint import RunStorage\n"
            "def fill(d):\n"
            "    (d / 'shard-0.bin').write_bytes(b'half')\n"
            "    print('half', flush=True)\n"
            "    time.sleep(60)\n"
            "RunStorage(sys.argv[1]).write_checkpoint(2, fill)\n")
    p = faults.Watched([sys.executable, "-c", code, str(run)], env={**os.environ, "TMPDIR": str(tmp)})
    assert p.wait_line(lambda line: line == "half", 60) is not None, p.tail()
    assert p.kill() == -9
    assert store.latest_checkpoint() == (1, str(run / "checkpoints" / "step-000001"))
    staging = [n.name for n in (run / "checkpoints").iterdir() if n.name.startswith(".tmp-")]
    assert len(staging) == 1 and staging[0].startswith(".tmp-step-000002-")
    assert list(tmp.iterdir()) == []  # nothing outside the run directory
    store.write_checkpoint(2, faults.fill_shards(2, 2, 1024), keep=1)
    assert store.latest_checkpoint()[0] == 2 and faults.checkpoint_intact(run, 2, 2, 1024)
    assert not [n for n in (run / "checkpoints").iterdir() if n.name.startswith(".tmp-")]
    assert store.complete_steps() == [2]


def test_failing_fill_cleans_up_and_keeps_the_previous_checkpoint(tmp_path):
    store = RunStorage(str(tmp_path / "run"))
    store.write_checkpoint(1, faults.fill_shards(1, 1, 64))

    def broken(d: Path) -> None:
        (d / "shard-0.bin").write_bytes(b"torn")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_checkpoint(2, broken)
    assert store.latest_checkpoint()[0] == 1 and faults.checkpoint_intact(tmp_path / "run", 1, 1, 64)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [LATEST, "step-000001"]


def test_prune_keeps_the_latest_checkpoint_and_drops_an_abandoned_sessions_one(tmp_path):
    """A session killed between renaming step-4 into place and replacing LATEST leaves a complete
    step-4 while LATEST still names step-2; the run resumes from 2 and writes 3 with keep=1.
    Pruning must keep step-3 (LATEST) and delete the stale step-4; it used to delete step-3, and
    latest_checkpoint() then fell back to the stale step-4, whose metrics the resume had dropped."""
    run = tmp_path / "run"
    store = RunStorage(str(run))
    for s in (2, 4):
        store.write_checkpoint(s, faults.fill_shards(s, 1, 64))
    (run / "checkpoints" / LATEST).write_text("step-000002\n")  # the state such a kill leaves
    assert store.latest_checkpoint()[0] == 2
    store.write_checkpoint(3, faults.fill_shards(3, 1, 64), keep=1)
    assert store.latest_checkpoint()[0] == 3 and faults.checkpoint_intact(run, 3, 1, 64)
    assert store.complete_steps() == [3]
    with pytest.raises(ValueError, match="keep >= 1"):
        store.prune(0)


def test_a_failed_small_write_leaves_no_temporary(tmp_path):
    store = RunStorage(str(tmp_path / "run"))
    (tmp_path / "run" / "blocked").mkdir(parents=True)
    (tmp_path / "run" / "blocked" / "x").write_text("a directory where a file should go")
    with pytest.raises(OSError):
        store.write_bytes("blocked", b"data")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["blocked"]


# ------------------------------------------------------------------------------ 3. Dagster run failure mid-asset


@pytest.mark.slow
def test_dagster_run_failing_mid_asset_then_reexecuted_from_failure_stores_every_row_once(tmp_path):
    torch.set_num_threads(1)
    res = faults.dagster_failure(tmp_path, seed=0)
    assert res["crashes"] == 0 and not res["problems"], explain(res)
    r1, r2, r3 = res["runs"]
    # run 1: the training subprocess was SIGKILLed around its checkpoint write. The kill follows the
    # metrics part by a random 0-50 ms, so it lands mid-write (no checkpoint yet) or, on a fast
    # machine, just after the checkpoint was published (seen in CI); either way the step failed and
    # the re-executions below must end with every row stored once.
    assert not r1["success"] and r1["failed_steps"] == ["checkpoints"] and r1["killed"]
    state = r1["run_dir_after_kill"]
    assert state["metrics_parts"] and (state["latest"] is None or state["latest"] == 2), state
    # run 2 (from failure): training completed, benchmark_reports failed after writing its rows
    assert not r2["success"] and r2["failed_steps"] == ["benchmark_reports"] and "Is a directory" in r2["error"]
    assert r2["rows_after_failure"]["eval_results"] > 0 and r2["rows_after_failure"]["train_steps"] > 0
    # run 3 (from failure of run 2): only the failed asset and its checks ran again, and succeeded
    assert r3["success"] and "checkpoints" not in r3["steps"] and "benchmark_reports" in r3["steps"]
    wh = res["warehouse"]
    assert wh["counts"] == res["expected_rows"]
    assert set(wh["duplicate_keys"].values()) == {0} and set(wh["duplicates_without_run_id"].values()) == {0}
    assert wh["run_ids"] == 1  # the killed session's flushed metrics were dropped, not loaded
    assert res["rows_lost"] == 0 and res["duplicate_rows"] == 0 and res["resumed_ok"] == 2
    assert res["stale_temporaries"] == []


# ------------------------------------------------------------------------------ 4. concurrent DuckDB writers


@pytest.mark.slow
def test_four_writer_processes_lose_no_rows_and_never_fail_on_the_lock(tmp_path):
    res = faults.concurrent_writers(tmp_path, writers=4, writes=6, rows=100, seed=0)
    assert res["errors"] == 0 and res["exit_codes"] == [0, 0, 0, 0], res
    assert res["writes"] == 24 and res["rows_found"] == res["rows_expected"]
    assert res["rows_lost"] == 0 and res["duplicate_rows"] == 0


def _holder(db: Path, seconds: float, through_warehouse: bool) -> faults.Watched:
    """A process holding ``db`` open for writing: through ``warehouse.connect`` (the file lock and
    DuckDB's lock) or with a bare ``duckdb.connect`` (DuckDB's lock only, like a DuckDB shell)."""
    if through_warehouse:
        code = ("import sys, time\nfrom dagster_duckdb import DuckDBResource\n"
                "from l2t_pipeline.warehouse import connect\n"
                "with connect(DuckDBResource(database=sys.argv[1])) as c:\n"
                "    c.execute('CREATE TABLE IF NOT EXISTS t (x INT)')\n"
                "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")
    else:
        code = ("import sys, time, duckdb\nc = duckdb.connect(sys.argv[1])\nprint('held', flush=True)\n"
                "time.sleep(float(sys.argv[2]))\nc.close()\n")
    p = faults.Watched([sys.executable, "-c", code, str(db), str(seconds)], env=dict(os.environ))
    assert p.wait_line(lambda line: line == "held", 120) is not None, p.tail()
    return p


def test_a_foreign_holder_fails_the_writer_clearly_after_the_bounded_wait(tmp_path):
    from dagster_duckdb import DuckDBResource

    from l2t_pipeline.warehouse import WarehouseBusy, connect

    db = tmp_path / "w.duckdb"
    p = _holder(db, 30, through_warehouse=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(WarehouseBusy) as err:
            with connect(DuckDBResource(database=str(db)), timeout=1.5):
                pass
        waited = time.monotonic() - t0
    finally:
        p.kill()
    msg = str(err.value)
    assert str(db) in msg and f"PID {p.proc.pid}" in msg and "L2T_DUCKDB_LOCK_TIMEOUT" in msg, msg
    assert 1.4 <= waited < 10, waited


def test_a_writer_waits_for_a_holder_that_lets_go(tmp_path):
    """Retry with backoff (a bare DuckDB holder) and the file lock (an l2t holder): the writer gets
    the database once it is free, within the wait, and its rows land."""
    from dagster_duckdb import DuckDBResource

    from l2t_pipeline import warehouse

    db = tmp_path / "w.duckdb"
    for through in (False, True):
        p = _holder(db, 3.0, through_warehouse=through)  # held 3 s: waited > 0.5 s even if this process is slow to go on
        t0 = time.monotonic()
        with warehouse.connect(DuckDBResource(database=str(db)), timeout=60) as conn:
            waited = time.monotonic() - t0
            warehouse.replace_rows(conn, "rollouts", faults.writer_rows(f"p{through}", 5), "a", f"p{through}")
        assert p.finish(30) == 0, p.tail()
        assert 0.5 < waited < 30, (through, waited)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 10
    con.close()


def test_an_l2t_holder_of_the_file_lock_names_the_lock_when_the_wait_runs_out(tmp_path):
    from dagster_duckdb import DuckDBResource

    from l2t_pipeline.warehouse import WarehouseBusy, connect

    db = tmp_path / "w.duckdb"
    p = _holder(db, 30, through_warehouse=True)
    try:
        with pytest.raises(WarehouseBusy, match=r"w\.duckdb\.lock.*L2T_DUCKDB_LOCK_TIMEOUT"):
            with connect(DuckDBResource(database=str(db)), timeout=0.5):
                pass
    finally:
        p.kill()


def test_connect_is_reentrant_in_a_thread_and_validates_the_timeout(tmp_path, monkeypatch):
    from dagster_duckdb import DuckDBResource

    from l2t_pipeline import warehouse

    res = DuckDBResource(database=str(tmp_path / "w.duckdb"))
    with warehouse.connect(res, timeout=2) as outer:
        with warehouse.connect(res, timeout=2) as inner:  # same thread: no waiting for itself
            inner.execute("CREATE TABLE t AS SELECT 1 AS x")
        assert outer.execute("SELECT x FROM t").fetchone() == (1,)
    monkeypatch.setenv("L2T_DUCKDB_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="L2T_DUCKDB_LOCK_TIMEOUT='soon' is not a number"):
        warehouse.lock_timeout()
    monkeypatch.setenv("L2T_DUCKDB_LOCK_TIMEOUT", "7")
    assert warehouse.lock_timeout() == 7.0
    with warehouse.connect(DuckDBResource(database=":memory:")) as mem:  # no lock file for memory
        assert mem.execute("SELECT 42").fetchone() == (42,)


# ------------------------------------------------------------------------------ the bench's JSON


def test_bench_prints_one_json_object_with_the_totals(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.faults", "--scenarios", "checkpoint", "--checkpoint-kills",
                           "3", "--keep", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in ("kills", "resumed_ok", "rows_lost", "duplicate_rows", "fuzz_cases", "crashes"):
        assert isinstance(out[key], int), key
    assert out["fuzz_cases"] == 3 and out["crashes"] == 0 and out["resumed_ok"] == 3 and "checkpoint" in out
    with pytest.raises(SystemExit):
        faults.main(["--scenarios", "nope"])


def test_what_child_processes_print_during_the_bench_goes_to_stderr():
    """The Dagster scenario's Pipes training process prints its result line to stdout; the bench
    sends file descriptor 1 to stderr while the scenarios run, so its JSON stays alone."""
    code = ("import subprocess, sys\nfrom bench.faults import _stdout_to_stderr\n"
            "with _stdout_to_stderr():\n"
            "    subprocess.run([sys.executable, '-c', 'print(\"child\")'])\n"
            "    print('inner')\n"
            "print('outer')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "outer\n" and "child" in proc.stderr and "inner" in proc.stderr
