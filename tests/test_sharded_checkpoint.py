"""Rank agreement and multi-rank checkpoint I/O on two gloo processes (no DeepSpeed): on_every_rank
and on_rank_0 raise on every rank when one fails; host_local_copy downloads a checkpoint once per
host, falls back to a rank's own copy, and stops every rank on a failed download or a failed read.
(The whole multi-rank save and resume under DeepSpeed, on local disk and S3: test_deepspeed.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


CASES = ["agreement", "shared", "own_copy", "download_fails", "read_fails", "save_fails_local", "save_fails_uploaded"]


def _two_ranks(rank: int, world: int, init: str, out: str, cases: list[str]) -> None:
    """One rank of a two-process gloo group: runs each of ``cases`` in turn (one spawn: each costs
    seconds of imports) and writes what it saw to out/<case>-rank<r>.json."""
    from datetime import timedelta

    import torch.distributed as dist

    # a rank left waiting in a collective fails the test in two minutes rather than hanging it
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    for case in cases:
        seen = _run_case(rank, case, out)
        Path(out, f"{case}-rank{rank}.json").write_text(json.dumps(seen))
        dist.barrier()
    dist.destroy_process_group()


def _run_case(rank: int, case: str, out: str) -> dict:
    import torch.distributed as dist

    from l2t_core import sharded_checkpoint
    from l2t_core.checkpoint import RunStorage
    from l2t_core.engines.ranks import on_every_rank, on_rank_0
    from l2t_core.sharded_checkpoint import host_local_copy

    seen: dict = {"rank": rank}

    def outcome(fn):
        try:
            return {"result": fn()}
        except BaseException as exc:  # noqa: BLE001 - what each rank raised is the point
            return {"error": f"{type(exc).__name__}: {exc}"}

    if case == "agreement":
        def shard():
            if rank == 1:
                raise OSError(28, "No space left on device")
            return rank * 10

        seen["every_fails"] = outcome(lambda: on_every_rank(shard, "write its shard"))
        seen["every_ok"] = outcome(lambda: on_every_rank(lambda: rank + 1, "count"))
        seen["rank0_fails"] = outcome(lambda: on_rank_0(rank == 0, lambda: 1 / 0, "publish"))
        seen["rank0_ok"] = outcome(lambda: on_rank_0(rank == 0, lambda: "published", "publish"))
    elif case.startswith("save_fails"):
        import torch

        class Engine:  # a DeepSpeed engine's checkpoint surface; rank 1's disk is full on the first save
            fail = True

            def save_state(self, d: Path) -> None:
                if rank == 1 and self.fail:
                    raise OSError(28, "No space left on device")
                (d / f"shard-rank{rank}.pt").write_text("optimizer shard")

            def unwrapped(self) -> torch.nn.Module:
                return torch.nn.Linear(2, 2)

        engine = Engine()
        root = Path(out, "save_root") if case.endswith("local") else None
        store = RunStorage(str(root) if root else f"memory://l2t-save-{os.getpid()}")

        def write_main(d: Path, whole) -> None:
            (d / "config.json").write_text("{}")

        save = lambda: sharded_checkpoint.save_sharded(store, 1, rank=rank, engine=engine, write_main=write_main)  # noqa: E731
        seen["first"] = outcome(save)
        engine.fail = False
        seen["again"] = outcome(save)  # the ranks are still in step: the next save completes
    else:  # host_local_copy: every process holds the same checkpoint in its own in-memory filesystem
        store = RunStorage(f"memory://l2t-host-copy-{os.getpid()}-{case}")
        store.write_checkpoint(3, lambda d: (d / "model.txt").write_text("weights of step 3"))
        downloads, dirs = [], []
        original = store.download

        def counted(url, dest):
            downloads.append(str(dest))
            if case == "download_fails" and rank == 0:
                raise OSError(5, "Input/output error")
            return original(url, dest)

        store.download = counted
        complete = sharded_checkpoint.COMPLETE
        if case == "own_copy" and rank == 1:  # as if rank 1 ran in a container that does not see rank 0's /tmp
            sharded_checkpoint.COMPLETE = "not-visible-here"

        def read():
            with host_local_copy(store, store.checkpoint_url(3)) as d:
                dirs.append(str(d))
                if case == "read_fails" and rank == 1:
                    raise ValueError("unreadable config")
                return (d / "model.txt").read_text()

        seen["read"] = outcome(read)
        sharded_checkpoint.COMPLETE = complete
        seen["downloads"] = len(downloads)
        seen["dirs"] = dirs
        dist.barrier()  # both ranks are out: every copy is removed
        seen["removed"] = not any(Path(d).exists() for d in dirs) and not any(Path(d).exists() for d in downloads)
    return seen


@pytest.fixture(scope="module")
def two_rank_cases(tmp_path_factory) -> Path:
    """Every case of :func:`_run_case` on one spawned pair of gloo ranks; the directory of their reports."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_two_ranks, args=(2, f"file://{out}/pg", str(out), CASES), nprocs=2, join=True)
    return out


def _reports(out: Path, case: str) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"{case}-rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]


def test_every_rank_raises_when_one_fails(two_rank_cases):
    """on_every_rank: a rank that fails raises its own error, the other a RuntimeError naming it,
    what failed and why (neither waits in a later collective); on_rank_0 likewise for rank 0's
    work; results come back where nothing fails."""
    r0, r1 = _reports(two_rank_cases, "agreement")
    assert r1["every_fails"] == {"error": "OSError: [Errno 28] No space left on device"}
    assert r0["every_fails"] == {"error": "RuntimeError: rank 1 failed to write its shard (OSError: [Errno 28] "
                                          "No space left on device); this rank stops too"}
    assert (r0["every_ok"], r1["every_ok"]) == ({"result": 1}, {"result": 2})
    assert r0["rank0_fails"] == {"error": "ZeroDivisionError: division by zero"}
    assert r1["rank0_fails"] == {"error": "RuntimeError: rank 0 failed to publish (its log says why); "
                                          "this rank stops too"}
    assert (r0["rank0_ok"], r1["rank0_ok"]) == ({"result": "published"}, {"result": None})


@pytest.mark.parametrize("case", ["shared", "own_copy", "download_fails", "read_fails"])
def test_host_local_copy_downloads_once_per_host(two_rank_cases, case):
    """One download for the host, by its lowest rank, read by both and removed once both are done;
    a rank that cannot see that copy downloads its own; a failed download stops both ranks, and so
    does a rank failing while it reads (the other learns of it on the way out, and the copy is
    removed on both)."""
    r0, r1 = _reports(two_rank_cases, case)
    assert r0["removed"] and r1["removed"]
    if case == "shared":
        assert r0["read"] == r1["read"] == {"result": "weights of step 3"}
        assert r0["dirs"] == r1["dirs"]  # rank 1 read the copy rank 0 made
        assert (r0["downloads"], r1["downloads"]) == (1, 0)
    elif case == "own_copy":
        assert r0["read"] == r1["read"] == {"result": "weights of step 3"}
        assert r0["dirs"] != r1["dirs"] and (r0["downloads"], r1["downloads"]) == (1, 1)
    elif case == "download_fails":
        assert r0["read"] == {"error": "OSError: [Errno 5] Input/output error"}
        assert r1["read"]["error"].startswith("RuntimeError: rank 0 failed to download the checkpoint memory://")
        assert r1["downloads"] == 0
    else:
        assert r1["read"] == {"error": "ValueError: unreadable config"}
        assert r0["read"]["error"].startswith("RuntimeError: another rank failed while reading the checkpoint")


@pytest.mark.parametrize("where", ["local", "uploaded"])
def test_a_rank_that_fails_to_save_its_engine_state_stops_both(two_rank_cases, where):
    """save_sharded, on a shared filesystem (staged) and on an object store (uploaded): a rank whose
    engine state cannot be saved raises its error, the other a RuntimeError naming it, at once
    (neither waits for the other in a later collective); the next save completes on both."""
    r0, r1 = _reports(two_rank_cases, f"save_fails_{where}")
    assert r1["first"] == {"error": "OSError: [Errno 28] No space left on device"}
    assert r0["first"]["error"].startswith("RuntimeError: rank 1 failed to save its engine state into ")
    assert r0["again"]["result"].rstrip("/").endswith("checkpoints/step-000001") and r1["again"] == {"result": None}


def test_object_store_checkpoints_from_uploaded_shards(tmp_path):
    """RunStorage on an object store (fsspec's in-memory filesystem): shards uploaded into a step,
    completed by rank 0's files, COMPLETE last; a save cut short (shards without COMPLETE) is never
    taken for a checkpoint and goes with the next one written; URLs carry the run URL's protocol;
    local run directories refuse the upload path (their shards are renamed into place)."""
    import uuid

    from l2t_core.checkpoint import COMPLETE, RunStorage

    url = f"memory://l2t-uploads-{uuid.uuid4().hex[:8]}/run"
    store = RunStorage(url)
    shard = tmp_path / "shard"
    (shard / "engine").mkdir(parents=True)
    (shard / "engine" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"rank 1's partition")
    store.upload_into_checkpoint(1, shard)
    assert store.latest_checkpoint() is None  # no COMPLETE yet
    got = store.complete_uploaded_checkpoint(1, lambda d: (d / "model.safetensors").write_bytes(b"w1"), keep=None)
    assert got == store.checkpoint_url(1) == f"{url}/checkpoints/step-000001"
    assert store.latest_checkpoint() == (1, got)
    with store.local_copy(got) as d:
        assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == [
            COMPLETE, "engine/zero_pp_rank_1_optim_states.pt", "model.safetensors"]

    store.upload_into_checkpoint(2, shard)  # a save cut short: rank 0 never completed step 2
    assert store.latest_checkpoint() == (1, got) and store.complete_steps() == [1]
    store.write_checkpoint(3, lambda d: (d / "model.safetensors").write_bytes(b"w3"))
    assert store.list("checkpoints") == ["LATEST", "step-000001", "step-000003"]  # step 2's shards are gone
    assert store.latest_checkpoint() == (3, f"{url}/checkpoints/step-000003")

    # a chained URL: reported as given, read back through its filesystem form
    chained = RunStorage(f"simplecache::memory://l2t-chain-{uuid.uuid4().hex[:8]}/run")
    chained.write_checkpoint(1, lambda d: (d / "model.safetensors").write_bytes(b"c1"))
    step, got = chained.latest_checkpoint()
    assert got == f"{chained.url}/checkpoints/step-000001" and got.startswith("simplecache::memory://")
    with chained.local_copy(got) as d:
        assert (d / "model.safetensors").read_bytes() == b"c1"

    local = RunStorage(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="for object stores"):
        local.upload_into_checkpoint(1, shard)
    with pytest.raises(ValueError, match="for object stores"):
        local.complete_uploaded_checkpoint(1, lambda d: None)
    assert local.write_checkpoint(1, lambda d: None) == str(tmp_path / "run" / "checkpoints" / "step-000001")
