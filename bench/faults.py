"""Fault injection: kill -9 the trainer, interrupt checkpoint writes, fail Dagster runs part-way and
race DuckDB writers. Prints ONE JSON object. Everything runs for real (processes, files, DuckDB);
nothing under test is mocked, and every kill is a ``SIGKILL`` at a seeded random moment.

Scenarios:

1. ``train``: ``python -m l2t_core.cli train`` (tiny Qwen2, CPU, one thread) is killed during a
   chosen phase of a chosen step (rollout, reward, update or the checkpoint write). The harness
   reads the trainer's own log: each phase starts with an INFO line ``step S/N: <phase>``, so it
   waits for the target line, sleeps a random fraction of that phase's duration (measured on the
   uninterrupted reference run) and kills; where the process really was is the last phase line it
   printed. After each kill the same command runs again (it resumes from the latest complete
   checkpoint); the finished run's metrics tables and final weights and optimizer state must equal
   the uninterrupted reference run's, byte for byte.
2. ``checkpoint``: a process inside ``RunStorage.write_checkpoint`` (writing shards of known
   content) is killed at a random delay over the whole write. ``latest_checkpoint()`` must then
   name a complete checkpoint with intact content (the previous one or, if the kill came after
   the publish, the new one); the next write removes the stale temporaries.
3. ``dagster``: the training job (``checkpoints`` + ``benchmark_reports`` of one partition) runs as
   a reconstructable job in a persistent Dagster instance. Run 1: the Pipes training subprocess is
   killed during its checkpoint write, the ``checkpoints`` step fails. Run 2 (re-executed from
   failure): training completes and its rows land in DuckDB, then ``benchmark_reports`` fails
   after writing its rows because a directory occupies the path of its HTML report. Run 3
   (re-executed from failure of run 2, with the directory removed) completes. Every table must then
   hold exactly the expected rows once (``warehouse.duplicate_keys`` and the natural keys without
   the run id).
4. ``writers``: 4 processes write rows through the warehouse's write path
   (``warehouse.connect`` + ``write_validated``) into one DuckDB file at once, partly into the same
   partition; no write may fail and every row must be there exactly once.

Keys: ``kills`` (SIGKILLs sent, scenarios 1-3), ``resumed_ok`` (killed or failed work that then
completed with exactly the expected result), ``rows_lost`` and ``duplicate_rows`` (summed over the
scenarios), ``fuzz_cases`` (randomized cases: the kill points plus the concurrent writes),
``crashes`` (anything unexpected: a process dying without our kill, a failing resume, an exception,
a lock error), then one section per scenario with its timings and details.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("train", "checkpoint", "dagster", "writers")
PHASES = ("rollout", "reward", "reference", "update", "checkpoint")
KILL_PHASES = ("rollout", "update", "checkpoint", "reward")

_MARK_RE = re.compile(r"l2t\.trainer: step (\d+)/\d+: (rollout|reward|reference|update|checkpoint)\s*$")
_DONE_RE = re.compile(r"l2t\.trainer: step (\d+)/\d+ \S+: acc ")
_WRITTEN_RE = re.compile(r"l2t\.checkpoint: checkpoint step-(\d+) written")
_RESUMED_RE = re.compile(r"l2t\.trainer: resumed run \S+ from \S+ \(step (\d+)\)")


def log(msg: str) -> None:
    print(f"[faults] {msg}", file=sys.stderr, flush=True)


# ============================================================================ watched processes


def parse_event(line: str) -> tuple[str, int] | None:
    """(kind, step) of a trainer log line: a phase start, ``done`` (the step's summary line),
    ``written`` (a checkpoint published) or ``resumed``; None for any other line."""
    for rx, kind in ((_MARK_RE, None), (_DONE_RE, "done"), (_WRITTEN_RE, "written"), (_RESUMED_RE, "resumed")):
        m = rx.search(line)
        if m:
            return (m.group(2) if kind is None else kind), int(m.group(1))
    return None


class Watched:
    """A subprocess whose merged stdout/stderr is read line by line in a thread, each line
    timestamped on arrival; ``wait_event`` blocks until a given (kind, step) line appears."""

    def __init__(self, cmd: list[str], env: dict, cwd: str | os.PathLike = REPO_ROOT):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace")
        self.lines: list[str] = []
        self.events: list[tuple[float, str, int]] = []
        self.killed_at: float | None = None
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            now = time.monotonic()
            ev = parse_event(line)
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                if ev:
                    self.events.append((now, *ev))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> float | None:
        """Arrival time of the first line satisfying ``predicate``; None if the process ended or
        ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return time.monotonic()
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def wait_event(self, kind: str, step: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, k, s in self.events:
                    if k == kind and s == step:
                        return t
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def kill(self) -> int:
        """SIGKILL (if still running); returns the exit code once every line it wrote is read."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed_at = time.monotonic()
        return self.finish(60)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self._reader.join(30)
        return rc

    def resumed_from(self) -> int | None:
        steps = [s for _, k, s in self.events if k == "resumed"]
        return steps[0] if steps else None

    def last_event(self) -> tuple[str, int] | None:
        evs = [(k, s) for _, k, s in self.events if k != "resumed"]
        return evs[-1] if evs else None

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.lines[-n:])


# ============================================================================ 1. kill -9 the trainer


def build_train_workspace(root: Path) -> dict:
    """A tiny model + tokenizer and a data file under ``root`` (see bench._common)."""
    import torch

    from bench._common import DATA_FILE, build_workspace

    torch.set_num_threads(1)
    ws = build_workspace(root, n_problems=16, hidden=64, layers=4, vocab=320, seed=0)
    return {"model": str(ws.model_dir), "data_dir": str(ws.data_dir), "data_file": DATA_FILE,
            "parameters": ws.parameters}


def train_config(ws: dict, steps: int, checkpoint_every: int, seed: int = 0) -> dict:
    """A TrainConfig (as a dict) that exercises what a resume must restore: L2T rewards (the SVD
    proxy's bases), 2 mini-batches (AdamW moments), a cosine schedule, a KL reference, and
    keep_checkpoints=1 (pruning)."""
    return dict(
        policy=ws["model"], out="unset", method="l2t", steps=steps, prompts_per_step=2,
        checkpoint_every=checkpoint_every, keep_checkpoints=1, seed=seed, device="cpu",
        data={"source": ws["data_file"]}, optim={"lr": 1e-3},
        rollout={"group_size": 4, "max_new_tokens": 24, "max_prompt_tokens": 512},
        micro_batch_tokens=300, mini_batches=2, reward={"loss": {"kl_coef": 0.01}},
    )


def train_env(data_dir: str, tmpdir: Path) -> dict:
    """One CPU thread, offline, the data dir, and a private TMPDIR (to count leaked temporaries)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", L2T_DATA_DIR=data_dir, TMPDIR=str(tmpdir))
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    return env


def train_command(config_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "l2t_core.cli", "train", "--config", str(config_path),
            "--set", f"out={json.dumps(str(out))}"]


def phase_durations(events: list[tuple[float, str, int]]) -> dict[str, list[float]]:
    """Seconds from each phase line to the next event line (for ``checkpoint``: to ``written``)."""
    out: dict[str, list[float]] = {}
    for (t, kind, _), (t_next, _, _) in zip(events, events[1:]):
        if kind in PHASES:
            out.setdefault(kind, []).append(t_next - t)
    return out


_COMPARE_KEYS = {"train_steps": ["step"], "rollouts": ["step", "rollout"],
                 "episode_rewards": ["step", "rollout", "episode"]}


def _comparable_columns(df) -> list[str]:
    from l2t_core.trainer import run_dependent

    return [c for c in df.columns if not run_dependent(c)]


def _same_state(a, b) -> bool:
    """Exact equality of nested state (tensors, arrays, dicts, sequences, dataclasses)."""
    import dataclasses

    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype \
            and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same_state(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return bool(a == b)


def compare_runs(reference: Path, run: Path, steps: int) -> dict:
    """Metrics tables (every row once, same values but the run id and timings) and the final
    checkpoint (model bytes, optimizer/scheduler state, proxy bases) of ``run`` vs ``reference``."""
    import pandas as pd
    import torch

    from l2t_core.checkpoint import RunStorage, checkpoint_name
    from l2t_core.metrics import read_table

    out: dict = {"tables": {}, "rows_lost": 0, "duplicate_rows": 0, "extra_rows": 0}
    equal = True
    for table, keys in _COMPARE_KEYS.items():
        a = read_table(RunStorage(str(reference)), table)
        b = read_table(RunStorage(str(run)), table)
        ka = set(map(tuple, a[keys].to_numpy().tolist())) if len(a) else set()
        kb = set(map(tuple, b[keys].to_numpy().tolist())) if len(b) else set()
        dup = int(b.duplicated(keys).sum()) if len(b) else 0
        lost, extra = len(ka - kb), len(kb - ka)
        cols = _comparable_columns(a)
        same = not lost and not extra and not dup and len(a) > 0
        if same:
            sa = a.sort_values(keys).reset_index(drop=True)[cols]
            sb = b.sort_values(keys).reset_index(drop=True)[cols]
            try:
                pd.testing.assert_frame_equal(sa, sb, check_exact=True)
            except AssertionError as exc:
                same = False
                out.setdefault("differences", {})[table] = str(exc)[:400]
        out["tables"][table] = {"rows": len(b), "reference_rows": len(a), "lost": lost, "extra": extra,
                                "duplicates": dup, "equal": same}
        out["rows_lost"] += lost
        out["duplicate_rows"] += dup
        out["extra_rows"] += extra
        equal &= same
    final = checkpoint_name(steps)
    ca, cb = reference / "checkpoints" / final, run / "checkpoints" / final
    if not (cb / "COMPLETE").exists():
        out.update(weights_equal=False, optimizer_equal=False, proxy_equal=False, equal=False,
                   error=f"{cb} is not a complete checkpoint")
        return out
    out["weights_equal"] = (ca / "model.safetensors").read_bytes() == (cb / "model.safetensors").read_bytes()
    ea = torch.load(ca / "engine_state.pt", map_location="cpu", weights_only=False)
    eb = torch.load(cb / "engine_state.pt", map_location="cpu", weights_only=False)
    out["optimizer_equal"] = _same_state(ea, eb)
    sa = torch.load(ca / "trainer_state.pt", map_location="cpu", weights_only=False)
    sb = torch.load(cb / "trainer_state.pt", map_location="cpu", weights_only=False)
    # not the global RNG states it also saves: the trainer never seeds them (sampling and the SVD
    # seed their own generators), so they differ between any two processes and change nothing
    out["proxy_equal"] = sa["step"] == sb["step"] and _same_state(sa["proxy"], sb["proxy"])
    out["equal"] = bool(equal and out["weights_equal"] and out["optimizer_equal"] and out["proxy_equal"])
    return out


def _checkpoint_state(run: Path) -> dict:
    """What a run directory holds right after a kill: LATEST, complete checkpoints, staging
    directories, metrics parts."""
    from l2t_core.checkpoint import RunStorage

    ck = run / "checkpoints"
    names = sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []
    st = RunStorage(str(run))
    latest = st.latest_checkpoint()
    parts = sorted(p.name for p in (run / "metrics" / "train_steps").glob("part-*.parquet"))
    return {"latest": latest[0] if latest else None,
            "LATEST": (ck / "LATEST").read_text().strip() if (ck / "LATEST").exists() else None,
            "complete": st.complete_steps(), "staging": [n for n in names if n.startswith(".tmp-")],
            "metrics_parts": parts}


def _checkpoint_usable(run: Path, step: int) -> bool:
    d = run / "checkpoints" / f"step-{step:06d}"
    return all((d / f).is_file() for f in ("COMPLETE", "model.safetensors", "engine_state.pt", "trainer_state.pt",
                                             "train_config.json"))


def train_kills(root: Path, kills: int = 3, seed: int = 0, phases: tuple[str, ...] = KILL_PHASES[:3],
                steps: int = 4, checkpoint_every: int = 2, kills_per_round: int | None = None,
                session_timeout: float = 420.0) -> dict:
    """Scenario 1 (see the module docstring). Kills are planned one per phase in turn (shuffled
    per cycle), ``kills_per_round`` per run directory (default: one per phase), each run then
    finished and compared with the reference. A kill that lands in another phase than planned
    (the process outran the delay) still counts, and its phase is planned again, up to
    ``2 * kills`` kills in all."""
    t_start = time.perf_counter()
    root = Path(root)
    rng = random.Random(seed)
    ws = build_train_workspace(root / "workspace")
    cfg_path = root / "train.json"
    cfg_path.write_text(json.dumps(train_config(ws, steps, checkpoint_every, seed)))
    ckpt_steps = [s for s in range(1, steps + 1) if s % checkpoint_every == 0 or s == steps]
    res: dict = {"kills": 0, "resumed_ok": 0, "rows_lost": 0, "duplicate_rows": 0, "crashes": 0, "rounds": [],
                 "landed": {}, "records": [], "steps": steps, "checkpoint_every": checkpoint_every,
                 "model_parameters": ws["parameters"], "leaked_tmp_dirs": 0, "problems": []}

    # the uninterrupted reference run, which also times each phase
    ref = root / "reference"
    t0 = time.perf_counter()
    p = Watched(train_command(cfg_path, ref), train_env(ws["data_dir"], root / "tmp-reference"))
    rc = p.finish(session_timeout)
    res["reference_s"] = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise RuntimeError(f"the reference training run failed (exit {rc}):\n{p.tail()}")
    durations = phase_durations(p.events)
    missing = [ph for ph in phases if not durations.get(ph)]
    if missing:
        raise RuntimeError(f"the reference run logged no phase line for {missing}; the trainer's INFO lines "
                           f"'step S/N: <phase>' are what this harness waits for. Last output:\n{p.tail()}")
    window = {ph: 0.9 * min(durations[ph]) for ph in phases}
    res["phase_s"] = {ph: round(sum(v) / len(v), 3) for ph, v in durations.items()}
    log(f"reference run {res['reference_s']}s; mean phase seconds {res['phase_s']}")

    plan: list[str] = []
    while len(plan) < kills:
        cycle = list(phases)
        rng.shuffle(cycle)
        plan += cycle
    plan = plan[:kills]
    per_round = kills_per_round or len(phases)
    max_kills = 2 * kills
    round_no = 0
    while plan and res["kills"] < max_kills:
        out = root / f"run{round_no}"
        tmpdir = root / f"tmp-run{round_no}"
        rnd = {"run": out.name, "kills": 0, "records": []}
        pending: list[dict] = []  # kill records waiting for their resume to be checked
        while plan and rnd["kills"] < per_round and res["kills"] < max_kills:
            before = _checkpoint_state(out) if out.exists() else {"latest": None}
            start = before["latest"] or 0
            if start >= steps:
                break  # a kill landed after the final checkpoint: the run is finished
            phase = plan[0]
            cands = [s for s in (ckpt_steps if phase == "checkpoint" else range(1, steps + 1)) if s > start]
            target = rng.choice(cands)
            delay = rng.uniform(0.0, window[phase])
            p = Watched(train_command(cfg_path, out), train_env(ws["data_dir"], tmpdir))
            t_mark = p.wait_event(phase, target, session_timeout)
            if t_mark is None:
                rc = p.finish(session_timeout)
                res["crashes"] += 1
                res["problems"].append(f"{out.name}: the session ended (exit {rc}) before reaching step {target} "
                                       f"{phase}:\n{p.tail()}")
                break
            time.sleep(max(0.0, t_mark + delay - time.monotonic()))
            rc = p.kill()
            for rec in pending:
                rec["resumed_from"] = p.resumed_from()
            pending = []
            after = _checkpoint_state(out)
            landed = p.last_event()
            where = landed[0] if landed else "setup"
            if where == "written":
                where = "checkpoint"  # killed after the publish, while pruning / returning
            if where == phase:
                plan.pop(0)
            detail = None
            if landed and landed[0] == "checkpoint":
                s = landed[1]
                if after["latest"] == s:
                    detail = "after LATEST was replaced"
                elif s in after["complete"]:
                    detail = "after the rename, before LATEST was replaced"
                elif after["staging"]:
                    detail = "while writing the staging directory"
                elif any(n.endswith(f"{s:06d}.parquet") for n in after["metrics_parts"]):
                    detail = "metrics flushed, staging directory not yet created"
                else:
                    detail = "while flushing metrics"
            elif landed and landed[0] == "written":
                detail = "after the publish (pruning)"
            ok_state = after["latest"] is None or (_checkpoint_usable(out, after["latest"])
                                                   and after["latest"] >= start)
            rec = {"run": out.name, "target": f"step {target} {phase}", "delay_s": round(delay, 4),
                   "landed": f"step {landed[1]} {where}" if landed else "setup", "phase": where, "detail": detail,
                   "exit": rc, "started_from": start, "latest_after": after["latest"],
                   "staging_after": len(after["staging"]), "latest_usable": ok_state}
            if rc != -signal.SIGKILL:
                res["crashes"] += 1
                res["problems"].append(f"{out.name}: expected exit -9 after SIGKILL, got {rc}:\n{p.tail()}")
            if not ok_state:
                res["problems"].append(f"{out.name}: after the kill, latest checkpoint {after['latest']} is unusable "
                                       f"or older than the resume point {start}: {after}")
            rec["expected_resume"] = after["latest"]
            pending.append(rec)
            rnd["records"].append(rec)
            rnd["kills"] += 1
            res["kills"] += 1
            res["landed"][where] = res["landed"].get(where, 0) + 1
            log(f"{out.name}: kill {res['kills']}: target step {target} {phase} +{delay:.3f}s, landed "
                f"{rec['landed']}{' (' + detail + ')' if detail else ''}; latest checkpoint {after['latest']}")
        if rnd["kills"] == 0 and not out.exists():
            break
        # finish the run: the same command again, to completion
        t0 = time.perf_counter()
        p = Watched(train_command(cfg_path, out), train_env(ws["data_dir"], tmpdir))
        rc = p.finish(session_timeout)
        for rec in pending:
            rec["resumed_from"] = p.resumed_from()
        rnd["final_session_s"] = round(time.perf_counter() - t0, 2)
        if rc != 0:
            res["crashes"] += 1
            res["problems"].append(f"{out.name}: the resumed run failed (exit {rc}):\n{p.tail()}")
            rnd["compare"] = {"equal": False}
        else:
            rnd["compare"] = compare_runs(ref, out, steps)
        leaked = [n for n in os.listdir(tmpdir) if n.startswith("l2t-")] if tmpdir.is_dir() else []
        rnd["leaked_tmp_dirs"] = len(leaked)
        res["leaked_tmp_dirs"] += len(leaked)
        rnd["stale_staging_after_finish"] = _checkpoint_state(out)["staging"]
        cmp = rnd["compare"]
        res["rows_lost"] += cmp.get("rows_lost", 0)
        res["duplicate_rows"] += cmp.get("duplicate_rows", 0)
        for rec in rnd["records"]:
            rec["resume_ok"] = rec.get("resumed_from") == rec["expected_resume"]
            if rec["resume_ok"] and cmp.get("equal") and rec["latest_usable"]:
                res["resumed_ok"] += 1
            elif not rec["resume_ok"]:
                res["problems"].append(f"{out.name}: after the kill at {rec['landed']} the next session resumed "
                                       f"from {rec.get('resumed_from')}, the latest complete checkpoint was "
                                       f"{rec['expected_resume']}")
        if not cmp.get("equal"):
            res["problems"].append(f"{out.name}: the finished run differs from the uninterrupted one: "
                                   f"{json.dumps(cmp, default=str)[:1500]}")
        log(f"{out.name}: finished in {rnd['final_session_s']}s; equal to the reference: {cmp.get('equal')}")
        res["rounds"].append({k: v for k, v in rnd.items() if k != "records"})
        res["records"] += rnd["records"]
        round_no += 1
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


# ============================================================================ 2. interrupted checkpoint writes


def shard_bytes(step: int, shard: int, size: int) -> bytes:
    """Deterministic content of shard ``shard`` of checkpoint ``step`` (so a torn file is detectable)."""
    block = hashlib.sha256(f"step {step} shard {shard}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def fill_shards(step: int, shards: int, size: int, pace_s: float = 0.0) -> Callable[[Path], None]:
    """A fill that writes ``shards`` files of known content; ``pace_s`` seconds of pause after each
    (a slow disk's stand-in: it widens the write window so that kills timed as fractions of it land
    inside the write on any machine, not only where the write is slower than process start-up)."""
    def fill(d: Path) -> None:
        for i in range(shards):
            with open(d / f"shard-{i}.bin", "wb") as f:
                f.write(shard_bytes(step, i, size))
                f.flush()
            if pace_s:
                time.sleep(pace_s)
    return fill


def checkpoint_intact(run: Path, step: int, shards: int, size: int) -> bool:
    d = run / "checkpoints" / f"step-{step:06d}"
    if not (d / "COMPLETE").is_file():
        return False
    return all((d / f"shard-{i}.bin").is_file() and (d / f"shard-{i}.bin").read_bytes() == shard_bytes(step, i, size)
               for i in range(shards))


def checkpoint_writer_main(argv: list[str]) -> None:
    """Entry of the writer subprocess: ``RUN STEP SHARDS SIZE KEEP [PACE_S]``; prints ``start <t>`` right
    before ``write_checkpoint`` and ``done <t>`` after it (``t``: ``time.monotonic()``, the same
    clock in every process on Linux, so the parent times its kill from the writer's own start)."""
    run, step, shards, size, keep = argv[0], *map(int, argv[1:5])
    pace_s = float(argv[5]) if len(argv) > 5 else 0.0
    from l2t_core.checkpoint import RunStorage

    store = RunStorage(run)
    print(f"start {time.monotonic()!r}", flush=True)
    store.write_checkpoint(step, fill_shards(step, shards, size, pace_s), keep=keep)
    print(f"done {time.monotonic()!r}", flush=True)


def _writer_cmd(run: Path, step: int, shards: int, size: int, keep: int, pace_s: float = 0.0) -> list[str]:
    code = "import sys; from bench.faults import checkpoint_writer_main; checkpoint_writer_main(sys.argv[1:])"
    return [sys.executable, "-c", code, str(run), str(step), str(shards), str(size), str(keep), repr(pace_s)]


def checkpoint_kills(root: Path, cases: int = 10, seed: int = 0, shards: int = 6, size: int = 4 << 20,
                     keep: int = 2, pace_s: float = 0.0) -> dict:
    """Scenario 2 (see the module docstring). ``pace_s``: pause after each shard (see ``fill_shards``);
    0 writes at the disk's own speed."""
    from l2t_core.checkpoint import RunStorage

    t_start = time.perf_counter()
    rng = random.Random(seed)
    root = Path(root)
    run = root / "run"
    tmpdir = root / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1")
    store = RunStorage(str(run))
    store.write_checkpoint(1, fill_shards(1, shards, size), keep=keep)
    # how long an uninterrupted write takes, in the writer process (from its "start" line to "done")
    times = []
    for step in (2, 3, 4):
        p = Watched(_writer_cmd(run, step, shards, size, keep, pace_s), env)
        rc = p.finish(120)
        stamps = dict(line.split() for line in p.lines if line.startswith(("start ", "done ")))
        if rc != 0 or set(stamps) != {"start", "done"}:
            raise RuntimeError(f"the checkpoint writer failed (exit {rc}):\n{p.tail()}")
        times.append(float(stamps["done"]) - float(stamps["start"]))
    write_s = sorted(times)[1]
    res: dict = {"cases": 0, "kills": 0, "resumed_ok": 0, "crashes": 0, "landed": {}, "corrupt_latest": 0,
                 "torn_complete": 0, "lost_checkpoint": 0, "stale_after_next_write": 0, "leaked_tmp_dirs": 0,
                 "problems": [], "write_s": round(write_s, 4), "shards": shards, "shard_bytes": size,
                 "pace_s": pace_s}
    for _ in range(cases):
        prev = store.latest_checkpoint()[0]
        new = prev + 1
        delay = rng.uniform(0.0, 1.3 * write_s)
        p = Watched(_writer_cmd(run, new, shards, size, keep, pace_s), env)
        t0 = None
        if p.wait_line(lambda line: line.startswith("start "), 120) is not None:
            t0 = float(next(line for line in p.lines if line.startswith("start ")).split()[1])
        if t0 is None:
            res["crashes"] += 1
            res["problems"].append(f"writer of step {new} ended before writing:\n{p.tail()}")
            p.finish(60)
            continue
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        rc = p.kill()
        res["cases"] += 1
        if p.killed_at is None:
            landed = "finished before the kill"
        else:
            res["kills"] += 1
            names = os.listdir(run / "checkpoints")
            latest_name = (run / "checkpoints" / "LATEST").read_text().strip()
            if latest_name == f"step-{new:06d}":
                landed = "after LATEST was replaced"
            elif (run / "checkpoints" / f"step-{new:06d}" / "COMPLETE").exists():
                landed = "after the rename, before LATEST"
            elif any(n.startswith(f".tmp-step-{new:06d}") for n in names):
                landed = "while filling/staging"
            else:
                landed = "before staging"
        res["landed"][landed] = res["landed"].get(landed, 0) + 1
        latest = store.latest_checkpoint()
        if latest is None or latest[0] < prev:
            res["lost_checkpoint"] += 1
            res["problems"].append(f"kill {landed!r} at +{delay:.4f}s: latest_checkpoint() is {latest}, "
                                   f"the previous complete one was {prev}")
        elif latest[0] not in (prev, new) or not checkpoint_intact(run, latest[0], shards, size):
            res["corrupt_latest"] += 1
            res["problems"].append(f"kill {landed!r} at +{delay:.4f}s: latest_checkpoint() names step {latest[0]}, "
                                   "which is not an intact checkpoint")
        # every directory that looks complete is intact (a prune cut short removed COMPLETE first)
        torn = [s for s in store.complete_steps() if not checkpoint_intact(run, s, shards, size)]
        if torn:
            res["torn_complete"] += len(torn)
            res["problems"].append(f"kill {landed!r} at +{delay:.4f}s: checkpoints {torn} have COMPLETE but "
                                   "not their content")
        leaked = [n for n in os.listdir(tmpdir) if n.startswith("l2t-")]
        res["leaked_tmp_dirs"] += len(leaked)
        for n in leaked:  # counted; removed so that the next case counts its own
            shutil.rmtree(tmpdir / n, ignore_errors=True)
        # the next write (what a resumed trainer does: the same step again) cleans up and publishes
        try:
            store.write_checkpoint(new, fill_shards(new, shards, size), keep=keep)
        except Exception as exc:  # noqa: BLE001 - reported as a crash with the reason
            res["crashes"] += 1
            res["problems"].append(f"the write after a kill {landed!r} failed: {type(exc).__name__}: {exc}")
            continue
        stale = [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp-")]
        ok = store.latest_checkpoint()[0] == new and checkpoint_intact(run, new, shards, size) and not stale
        res["stale_after_next_write"] += len(stale)
        if ok and latest is not None and latest[0] in (prev, new):
            res["resumed_ok"] += 1
        elif not ok:
            res["problems"].append(f"after the kill {landed!r} the next write of step {new} left {stale} or "
                                   "an unreadable latest checkpoint")
        if rc not in (0, -signal.SIGKILL):
            res["crashes"] += 1
            res["problems"].append(f"writer exited {rc}:\n{p.tail()}")
    res["complete_after"] = store.complete_steps()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


# ============================================================================ 3. Dagster run failure mid-asset

FAULTS_JOB = "faults_training_job"
DAGSTER_LEVELS, DAGSTER_PER_LEVEL = [1, 2], 2
DAGSTER_STEPS, DAGSTER_PROMPTS, DAGSTER_GROUP = 2, 2, 2
DAGSTER_WARM = dict(train_size=200, sft_steps=20, batch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, intermediate_size=48, eval_per_level=2, eval_max_new_tokens=24, eval_loss_size=8)
DAGSTER_RUN_CONFIG = {"ops": {"checkpoints": {"config": {
    "steps": DAGSTER_STEPS, "prompts_per_step": DAGSTER_PROMPTS, "group_size": DAGSTER_GROUP, "max_new_tokens": 40}}}}


def faults_resources() -> dict:
    """The pipeline's resources at test size; DuckDB file and storage from ``L2T_DUCKDB_PATH``,
    ``L2T_STORAGE_URL`` and ``L2T_MODELS_DIR`` (read when the job is reconstructed)."""
    from l2t_pipeline.resources import (HeldOutEvaluator, L2TStorage, ModelRegistry, TrainingData, TrainingLauncher,
                                        make_duckdb)

    return {"duckdb": make_duckdb(), "storage": L2TStorage(), "registry": ModelRegistry(),
            "training_data": TrainingData(train_size=50, max_steps=2),
            "evaluator": HeldOutEvaluator(levels=DAGSTER_LEVELS, per_level=DAGSTER_PER_LEVEL, max_new_tokens=40),
            "launcher": TrainingLauncher(torch_threads=1)}


def faults_training_job():
    """``checkpoints`` + ``benchmark_reports`` (and their checks) with the in-process executor:
    the target of ``dg.reconstructable`` for ``execute_job`` and its re-executions."""
    import dagster as dg

    from l2t_pipeline.assets import benchmark_reports, checkpoints
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS

    job = dg.define_asset_job(FAULTS_JOB, selection=dg.AssetSelection.assets(checkpoints, benchmark_reports),
                              executor_def=dg.in_process_executor)
    defs = dg.Definitions(assets=ASSETS, asset_checks=all_checks, jobs=[job], resources=faults_resources())
    return defs.resolve_job_def(FAULTS_JOB)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _children_running(pattern: str) -> list[int]:
    """PIDs of this process's children whose command line contains ``pattern`` (Linux /proc)."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == me and pattern in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _kill_training_on(storage: Path, glob: str, delay: float, timeout: float, report: dict) -> None:
    """Watcher thread: when a file matching ``glob`` appears under ``storage``, wait ``delay``
    seconds, then SIGKILL this process's ``l2t_core.cli train`` children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = list(storage.glob(glob))
        if hits:
            time.sleep(delay)
            pids = _children_running("l2t_core.cli train")
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            report.update(killed=pids, trigger=str(hits[0].relative_to(storage)), run_dir=str(hits[0].parents[2]))
            return
        time.sleep(0.01)
    report["timeout"] = True


def _failures(result) -> list[tuple[str, str]]:
    out = []
    for e in result.all_events:
        if e.event_type_value == "STEP_FAILURE":
            err = e.step_failure_data.error
            msg = err.message if err else ""
            while err is not None and err.cause is not None:
                err = err.cause
                msg += " | caused by: " + err.message
            out.append((e.step_key, msg.strip()))
    return out


def _warehouse_counts(db: str, pk: str) -> dict:
    import duckdb

    from l2t_pipeline import warehouse

    con = duckdb.connect(db, read_only=True)
    try:
        counts = {t: con.execute(f"SELECT count(*) FROM {t} WHERE partition_key = ?", [pk]).fetchone()[0]
                  for t in ("train_steps", "rollouts", "episode_rewards", "eval_results", "checkpoints")}
        dups = {t: warehouse.duplicate_keys(con, t)
                for t in ("train_steps", "rollouts", "episode_rewards", "eval_results")}
        # also without the run id: a retrained run gets a new one, so old rows would not collide on it
        natural = {
            "train_steps": "step", "rollouts": "step, rollout", "episode_rewards": "step, rollout, episode"}
        dups_no_run_id = {t: con.execute(
            f"SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) c FROM {t} WHERE partition_key = ? "
            f"AND asset_key = 'checkpoints' GROUP BY {cols})", [pk]).fetchone()[0] for t, cols in natural.items()}
        episodes = con.execute("SELECT coalesce(sum(num_episodes), 0) FROM rollouts WHERE partition_key = ? "
                               "AND asset_key = 'checkpoints'", [pk]).fetchone()[0]
        run_ids = con.execute("SELECT count(DISTINCT run_id) FROM rollouts WHERE partition_key = ? "
                              "AND asset_key = 'checkpoints'", [pk]).fetchone()[0]
    finally:
        con.close()
    return {"counts": counts, "duplicate_keys": dups, "duplicates_without_run_id": dups_no_run_id,
            "episodes_in_rollouts": int(episodes), "run_ids": int(run_ids)}


def dagster_failure(root: Path, seed: int = 0) -> dict:
    """Scenario 3 (see the module docstring)."""
    import dagster as dg

    from l2t_pipeline.assets import REPORT_FILE, base_model
    from l2t_pipeline.checks import all_checks
    from l2t_pipeline.definitions import ASSETS
    from l2t_pipeline.partitions import DEFAULT_BASE_MODEL, run_key

    t_start = time.perf_counter()
    rng = random.Random(seed)
    root = Path(root)
    db, storage = root / "l2t.duckdb", root / "storage"
    pk = run_key(DEFAULT_BASE_MODEL, "l2t")
    res: dict = {"kills": 0, "resumed_ok": 0, "rows_lost": 0, "duplicate_rows": 0, "crashes": 0, "problems": [],
                 "runs": [], "reexecution": "ReexecutionOptions.from_failure (reconstructable job, execute_job)"}
    env = dict(L2T_DUCKDB_PATH=str(db), L2T_STORAGE_URL=str(storage), L2T_MODELS_DIR=str(root / "models"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    (root / "dagster_home").mkdir(parents=True, exist_ok=True)
    with _environ(**env), dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        instance.add_dynamic_partitions("base_models", [DEFAULT_BASE_MODEL])
        t0 = time.perf_counter()
        base = dg.materialize([*ASSETS, *all_checks], selection=[base_model], partition_key=DEFAULT_BASE_MODEL,
                              resources=faults_resources(), instance=instance,
                              run_config={"ops": {"base_model": {"config": DAGSTER_WARM}}})
        res["base_model_s"] = round(time.perf_counter() - t0, 1)
        if not base.success:
            raise RuntimeError("base_model failed to materialize")
        job = dg.reconstructable(faults_training_job)
        tags = {"dagster/partition": pk, "dagster/partition/base_model": DEFAULT_BASE_MODEL,
                "dagster/partition/method": "l2t"}

        # run 1: the Pipes training subprocess is killed while it writes its checkpoint (its
        # metrics part, flushed just before the checkpoint, is the trigger)
        kill: dict = {}
        delay = rng.uniform(0.0, 0.05)
        watcher = threading.Thread(target=_kill_training_on, daemon=True,
                                   args=(storage, "runs/*/*/*/metrics/train_steps/part-*.parquet", delay, 600, kill))
        watcher.start()
        t0 = time.perf_counter()
        r1 = dg.execute_job(job, instance, run_config=DAGSTER_RUN_CONFIG, tags=tags)
        watcher.join(5)
        run_dir = Path(kill["run_dir"]) if "run_dir" in kill else None
        state = _checkpoint_state(run_dir) if run_dir else {}
        f1 = _failures(r1)
        res["runs"].append({"run": 1, "success": r1.success, "seconds": round(time.perf_counter() - t0, 1),
                            "failed_steps": [s for s, _ in f1], "killed": kill.get("killed"),
                            "delay_s": round(delay, 4), "run_dir_after_kill": state})
        if kill.get("killed"):
            res["kills"] += len(kill["killed"])
        if r1.success or not kill.get("killed") or [s for s, _ in f1] != ["checkpoints"]:
            res["crashes"] += 1
            res["problems"].append(f"run 1: expected the checkpoints step to fail from the kill; success={r1.success} "
                                   f"killed={kill} failures={f1}")
            return res

        # run 2 from failure: training resumes and completes, benchmark_reports writes its rows and
        # then fails: a directory occupies the path of its HTML report
        blocker = run_dir / REPORT_FILE
        blocker.mkdir()
        (blocker / "not-a-report").write_text("a directory where the report file should go\n")
        t0 = time.perf_counter()
        r2 = dg.execute_job(job, instance, run_config=DAGSTER_RUN_CONFIG, tags=tags,
                            reexecution_options=dg.ReexecutionOptions.from_failure(r1.run_id, instance))
        f2 = _failures(r2)
        mid = _warehouse_counts(str(db), pk)
        res["runs"].append({"run": 2, "success": r2.success, "seconds": round(time.perf_counter() - t0, 1),
                            "failed_steps": [s for s, _ in f2], "error": f2[0][1][:300] if f2 else None,
                            "rows_after_failure": mid["counts"]})
        if r2.success or [s for s, _ in f2] != ["benchmark_reports"] or mid["counts"]["eval_results"] == 0:
            res["crashes"] += 1
            res["problems"].append(f"run 2: expected benchmark_reports to fail after writing eval_results; "
                                   f"success={r2.success} failures={f2} rows={mid}")
            return res

        # run 3 from failure of run 2, the path made writable again
        shutil.rmtree(blocker)
        t0 = time.perf_counter()
        r3 = dg.execute_job(job, instance, run_config=DAGSTER_RUN_CONFIG, tags=tags,
                            reexecution_options=dg.ReexecutionOptions.from_failure(r2.run_id, instance))
        steps3 = sorted({e.step_key for e in r3.all_events if e.step_key})
        res["runs"].append({"run": 3, "success": r3.success, "seconds": round(time.perf_counter() - t0, 1),
                            "steps": steps3, "failed_steps": [s for s, _ in _failures(r3)]})
        if not r3.success:
            res["crashes"] += 1
            res["problems"].append(f"run 3 failed: {_failures(r3)}")
            return res
    final = _warehouse_counts(str(db), pk)
    expected = {"train_steps": DAGSTER_STEPS, "rollouts": DAGSTER_STEPS * DAGSTER_PROMPTS * DAGSTER_GROUP,
                "episode_rewards": final["episodes_in_rollouts"], "eval_results": 2 * (len(DAGSTER_LEVELS) + 1),
                "checkpoints": 1}
    res["warehouse"] = final
    res["expected_rows"] = expected
    res["rows_lost"] = sum(max(0, n - final["counts"][t]) for t, n in expected.items())
    res["duplicate_rows"] = sum(final["duplicate_keys"].values()) + sum(final["duplicates_without_run_id"].values()) \
        + sum(max(0, final["counts"][t] - n) for t, n in expected.items())
    report_ok = (run_dir / REPORT_FILE).is_file()
    res["run_dir_after"] = after = _checkpoint_state(run_dir)
    res["stale_temporaries"] = after["staging"] + sorted(p.name for p in run_dir.glob(".tmp-*"))
    if res["rows_lost"] or res["duplicate_rows"] or final["run_ids"] != 1 or not report_ok \
            or res["stale_temporaries"] or after["latest"] != DAGSTER_STEPS:
        res["problems"].append(f"after the re-executions the warehouse holds {final}, expected {expected}; "
                               f"report written: {report_ok}; run directory: {after}, stale temporaries "
                               f"{res['stale_temporaries']}")
    else:
        res["resumed_ok"] = 2  # both failed runs were completed by their re-execution
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


# ============================================================================ 4. concurrent DuckDB writers


def writer_rows(pk: str, n: int):
    import pandas as pd

    return pd.DataFrame([{
        "source": "base", "base_model": "m", "method": None, "run_id": pk, "step": 0, "rollout": i,
        "problem_id": f"p{i}", "level": 1, "group": i // 4, "response": "<think>x</think> \\boxed{1}",
        "reference": "1", "num_tokens": 10, "outcome": 1.0, "verdict": "ok", "segmentation": "tagged",
        "num_episodes": 1, "score": None, "advantage": None} for i in range(n)])


def writer_partitions(writer: int, writes: int) -> list[str]:
    """The partitions writer ``writer`` replaces, in order: its own, every third write the one
    before again (a re-materialization), every fourth the ``shared`` partition all writers replace."""
    out = []
    for k in range(writes):
        if k % 4 == 3:
            out.append("shared")
        elif k % 3 == 2 and k > 0:
            out.append(out[-1] if out[-1] != "shared" else f"w{writer}-{k}")
        else:
            out.append(f"w{writer}-{k}")
    return out


def _writer_process(db: str, writer: int, writes: int, rows: int, seed: int, go, queue) -> None:
    """One writer: ``writes`` replacements through ``warehouse.connect`` + ``write_validated``."""
    from dagster_duckdb import DuckDBResource

    from l2t_pipeline.warehouse import connect, write_validated

    resource = DuckDBResource(database=db)
    rng = random.Random(seed * 1000 + writer)
    frames = [(pk, writer_rows(pk, rows)) for pk in writer_partitions(writer, writes)]
    go.wait()
    stats = []
    for pk, df in frames:
        time.sleep(rng.uniform(0.0, 0.02))  # random interleavings
        t0 = time.monotonic()
        entry = {"partition": pk}
        try:
            with connect(resource) as conn:
                t1 = time.monotonic()
                write_validated(conn, {"rollouts": df}, "faults_writers", pk)
            entry.update(wait_s=t1 - t0, hold_s=time.monotonic() - t1)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            entry.update(error=f"{type(exc).__name__}: {exc}", wait_s=time.monotonic() - t0)
        stats.append(entry)
    queue.put((writer, stats, time.monotonic()))


def concurrent_writers(root: Path, writers: int = 4, writes: int = 8, rows: int = 200, seed: int = 0) -> dict:
    """Scenario 4 (see the module docstring)."""
    import multiprocessing as mp

    import duckdb

    from l2t_pipeline import warehouse

    t_start = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    db = str(root / "writers.duckdb")
    ctx = mp.get_context("spawn")
    go, queue = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer_process, args=(db, w, writes, rows, seed, go, queue)) for w in range(writers)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    go.set()
    results = {}
    for _ in procs:
        w, stats, t_end = queue.get(timeout=900)
        results[w] = (stats, t_end - t0)
    for p in procs:
        p.join(60)
    wall = time.monotonic() - t0
    stats = [s for w in sorted(results) for s in results[w][0]]
    errors = [s["error"] for s in stats if "error" in s]
    expected = {pk for w in range(writers) for pk in writer_partitions(w, writes)}
    con = duckdb.connect(db, read_only=True)
    try:
        found = dict(con.execute("SELECT partition_key, count(*) FROM rollouts WHERE asset_key = 'faults_writers' "
                                 "GROUP BY 1").fetchall())
        dups = warehouse.duplicate_keys(con, "rollouts")
    finally:
        con.close()
    lost = sum(max(0, rows - found.get(pk, 0)) for pk in expected)
    extra = sum(max(0, n - rows) for pk, n in found.items() if pk in expected) + \
        sum(n for pk, n in found.items() if pk not in expected)
    waits = sorted(s["wait_s"] for s in stats)
    finish = [round(results[w][1], 2) for w in sorted(results)]
    return {"writers": writers, "writes_each": writes, "rows_per_write": rows, "writes": len(stats),
            "errors": len(errors), "lock_errors": sum("lock" in e.lower() for e in errors), "error_samples": errors[:3],
            "rows_expected": rows * len(expected), "rows_found": int(sum(found.values())), "rows_lost": lost,
            "duplicate_rows": int(dups) + extra, "wall_s": round(wall, 2),
            "wait_s": {"median": round(waits[len(waits) // 2], 3), "max": round(waits[-1], 3)},
            "writer_finish_s": finish, "exit_codes": [p.exitcode for p in procs],
            "seconds": round(time.perf_counter() - t_start, 1)}


# ============================================================================ all of it


def run(root: Path, *, train_n: int = 12, ckpt_n: int = 30, writes: int = 12, writers: int = 4, seed: int = 0,
        pace_s: float = 0.0, scenarios: tuple[str, ...] = SCENARIOS,
        train_phases: tuple[str, ...] = KILL_PHASES) -> dict:
    root = Path(root)
    sections: dict = {}
    crashes_outside = []
    for name in scenarios:
        log(f"scenario {name}")
        try:
            if name == "train":
                sections[name] = train_kills(root / "train", kills=train_n, seed=seed, phases=train_phases)
            elif name == "checkpoint":
                sections[name] = checkpoint_kills(root / "checkpoint", cases=ckpt_n, seed=seed, pace_s=pace_s)
            elif name == "dagster":
                sections[name] = dagster_failure(root / "dagster", seed=seed)
            elif name == "writers":
                sections[name] = concurrent_writers(root / "writers", writers=writers, writes=writes, seed=seed)
            else:
                raise ValueError(f"unknown scenario {name!r}; choose from train, checkpoint, dagster, writers")
        except Exception as exc:  # noqa: BLE001 - an unexpected crash of a scenario is a result, reported
            crashes_outside.append(f"{name}: {type(exc).__name__}: {exc}")
            sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
    s = sections
    get = lambda sec, key: s.get(sec, {}).get(key, 0) or 0  # noqa: E731
    out = {
        "kills": get("train", "kills") + get("checkpoint", "kills") + get("dagster", "kills"),
        "resumed_ok": get("train", "resumed_ok") + get("checkpoint", "resumed_ok") + get("dagster", "resumed_ok"),
        "rows_lost": get("train", "rows_lost") + get("dagster", "rows_lost") + get("writers", "rows_lost"),
        "duplicate_rows": get("train", "duplicate_rows") + get("dagster", "duplicate_rows")
        + get("writers", "duplicate_rows"),
        "fuzz_cases": get("train", "kills") + get("checkpoint", "cases") + get("dagster", "kills")
        + get("writers", "writes"),
        "crashes": len(crashes_outside) + get("train", "crashes") + get("checkpoint", "crashes")
        + get("dagster", "crashes") + get("writers", "errors"),
        "crash_reasons": crashes_outside,
        "seed": seed,
        **sections,
    }
    return out


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr for the block (child processes inherit it), then back."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> dict:
    from bench._common import emit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-kills", type=int, default=12, help="SIGKILLs of the trainer (scenario 1)")
    ap.add_argument("--checkpoint-kills", type=int, default=30, help="killed checkpoint writes (scenario 2)")
    ap.add_argument("--pace", type=float, default=0.0, metavar="S",
                    help="pause S seconds after each checkpoint shard (scenario 2; a slow disk's stand-in)")
    ap.add_argument("--writers", type=int, default=4, help="concurrent DuckDB writer processes (scenario 4)")
    ap.add_argument("--writes", type=int, default=12, help="writes per writer (scenario 4)")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="3 trainer kills, 8 checkpoint kills, 4 writes per writer")
    a = ap.parse_args(argv)
    if a.quick:
        a.train_kills, a.checkpoint_kills, a.writes = 3, 8, 4
    phases = KILL_PHASES if a.train_kills > 3 else KILL_PHASES[:3]
    kw = dict(train_n=a.train_kills, ckpt_n=a.checkpoint_kills, writes=a.writes, writers=a.writers, seed=a.seed,
              pace_s=a.pace, scenarios=tuple(a.scenarios), train_phases=phases)
    t0 = time.perf_counter()
    with _stdout_to_stderr():  # what the scenarios' processes print goes to stderr, the JSON alone to stdout
        if a.keep:
            Path(a.keep).mkdir(parents=True, exist_ok=True)
            res = run(Path(a.keep), **kw)
        else:
            with tempfile.TemporaryDirectory(prefix="l2t-faults-") as tmp:
                res = run(Path(tmp), **kw)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return emit(res)


if __name__ == "__main__":
    main()
