"""Checkpoints of a multi-rank (DeepSpeed) run: every rank writes its engine shard, rank 0 the rest.

A checkpoint holds what one process would write (the Hugging Face model, the config, the trainer
state; :mod:`l2t_core.checkpoint`) and, under DeepSpeed, every rank's optimizer (and, under ZeRO-3,
parameter) partition, written by that rank. How the shards reach the checkpoint depends on the
run directory:

* **a local or shared filesystem** (NFS, a ReadWriteMany volume): the ranks save into one staging
  directory, ``<out>/checkpoints/.staging-<step>``, and rank 0 moves (renames) its contents into
  the checkpoint it publishes atomically, so no shard is ever copied, whatever its size (the
  optimizer state of a 1.5B model is ~20 GB). A staging directory a crashed save left is removed
  first, never reused (it could hold shards of another world size or step);
* **an object store** (``s3://``, no rename and no shared directory): every rank saves into a
  local temporary directory and uploads its files straight into the checkpoint's URL; rank 0 then
  uploads its own files and writes ``COMPLETE`` last (:meth:`~l2t_core.checkpoint.RunStorage.
  complete_uploaded_checkpoint`), so the checkpoint is complete at once or not at all. Each rank
  needs local disk for its shard (``TMPDIR``); a save cut short leaves an incomplete ``step-*``
  directory, which the next checkpoint written removes.

Either way a rank that fails its part stops every rank with it (:func:`~l2t_core.engines.ranks.
on_rank_0`, :func:`~l2t_core.engines.ranks.on_every_rank`) rather than leaving them in a
collective until the process group times out. A rank that fails inside DeepSpeed's own save (which
holds barriers of its own) exits; the others then stop when their collective finds it gone, or when
the launcher (``torchrun``, ``deepspeed``) stops them.

Resuming from an object store, DeepSpeed's loader reads every rank's shard, so every host needs the
whole checkpoint: :func:`host_local_copy` downloads it once per host, not once per rank.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import COMPLETE, RunStorage
from .engines.gather import weights_to_save
from .engines.ranks import all_gather_objects, all_succeeded, initialized_group, on_every_rank, on_rank_0
from .urls import redact_url

STAGING_PREFIX = ".staging-"  # <out>/checkpoints/.staging-000010: the ranks' engine shards of step 10

WriteMain = Callable[[Path, "dict | None"], None]  # rank 0's files into a directory, given ZeRO-3's whole weights


def remove_staging_dirs(checkpoints: Path) -> list[str]:
    """Delete every multi-rank staging directory under ``checkpoints`` (left by a save that
    crashed); returns their names. Rank 0 calls it before the ranks write a new one."""
    removed = sorted(p.name for p in checkpoints.glob(f"{STAGING_PREFIX}*") if p.is_dir()) if checkpoints.is_dir() else []
    for name in removed:
        shutil.rmtree(checkpoints / name)
    return removed


def move_contents(src: Path, dest: Path) -> None:
    """Move every entry of ``src`` into ``dest`` by renaming it (both on one filesystem: the run's
    checkpoints directory), so a checkpoint's shards are never copied; an entry already in ``dest``
    is an error, not silently merged."""
    for child in sorted(src.iterdir()):
        target = dest / child.name
        if target.exists():
            raise FileExistsError(f"{target} exists; cannot move the staged {child.name} of {src} there")
        child.rename(target)


def save_sharded(storage: RunStorage, step: int, *, rank: int, engine, write_main: WriteMain,
                 keep: int | None = None) -> str | None:
    """Checkpoint ``step`` of a multi-rank run (every rank calls it): each rank's engine shard
    (``engine.save_state``), and rank 0's ``write_main(dir, whole_weights)`` files; ``keep``: the
    complete checkpoints to keep. Returns the checkpoint's URL on rank 0, None on the others."""
    if initialized_group() is None:
        raise RuntimeError("save_sharded: no torch.distributed process group; one process writes its "
                           "checkpoint with RunStorage.write_checkpoint")
    if storage.is_local:
        return _save_staged(storage, step, rank, engine, write_main, keep)
    return _save_uploaded(storage, step, rank, engine, write_main, keep)


def stage_engine_state(staging: Path, engine, main: bool, clear: Callable[[], None] | None = None) -> "dict | None":
    """Every rank's part of a checkpoint written into a directory on a shared filesystem, which
    rank 0 (``main``) then publishes: rank 0 runs ``clear()`` (what else to remove first) and makes
    ``staging`` afresh, every rank saves its engine state into it (DeepSpeed: its shard of the
    optimizer), and under ZeRO-3 the ranks gather the whole weights (rank 0 keeps them; the
    ``save_pretrained`` state dict, :func:`~l2t_core.engines.gather.weights_to_save`). Returns once
    every rank's state is in place; a rank that failed to save stops every rank. Also on one process."""
    def fresh() -> None:
        if clear is not None:
            clear()
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    on_rank_0(main, fresh, f"create {staging}")
    on_every_rank(lambda: engine.save_state(staging), f"save its engine state into {staging}")
    return weights_to_save(engine.unwrapped(), keep=main)


def _save_staged(storage: RunStorage, step: int, rank: int, engine, write_main: WriteMain,
                 keep: int | None) -> str | None:
    staging = Path(storage.root) / "checkpoints" / f"{STAGING_PREFIX}{step:06d}"
    whole = stage_engine_state(staging, engine, rank == 0, clear=lambda: remove_staging_dirs(staging.parent))

    def publish() -> str:
        def fill(d: Path) -> None:
            move_contents(staging, d)
            write_main(d, whole)

        url = storage.write_checkpoint(step, fill, keep=keep)
        shutil.rmtree(staging, ignore_errors=True)
        return url

    return on_rank_0(rank == 0, publish, f"publish the checkpoint of step {step}")


def _save_uploaded(storage: RunStorage, step: int, rank: int, engine, write_main: WriteMain,
                   keep: int | None) -> str | None:
    # an upload cut short, or a stale checkpoint of this step, must not mix with this one's shards
    on_rank_0(rank == 0, lambda: storage.clear_checkpoint(step), f"remove an earlier, incomplete checkpoint of step {step}")
    with tempfile.TemporaryDirectory(prefix=f"l2t-shard-{step:06d}-rank{rank}-") as tmp:
        on_every_rank(lambda: engine.save_state(Path(tmp)), f"save its engine state into {tmp}")
        whole = weights_to_save(engine.unwrapped(), keep=rank == 0)
        on_every_rank(lambda: storage.upload_into_checkpoint(step, Path(tmp)),
                      f"upload its engine shard of step {step} to {redact_url(storage.checkpoint_url(step))}")
    return on_rank_0(rank == 0, lambda: storage.complete_uploaded_checkpoint(step, lambda d: write_main(d, whole), keep),
                     f"publish the checkpoint of step {step}")


@contextmanager
def host_local_copy(storage: RunStorage, url: str) -> Iterator[Path]:
    """The checkpoint at ``url`` as a local directory, on every rank (a collective where a process
    group exists: every rank enters it). On a local or shared filesystem, the directory itself; on
    an object store with several ranks, one download per host, made by the host's lowest rank
    into its temporary directory and read by the host's other ranks, then removed once all of them
    are done. A rank that cannot see that directory (a container of its own on the host)
    downloads its own copy. A failed download, or a failure of the caller's work on any rank,
    stops every rank; the copy is removed only once every rank is through with it."""
    dist = initialized_group()
    if storage.is_local or dist is None or dist.get_world_size() == 1:
        with storage.local_copy(url) as d:
            yield d
        return
    rank = dist.get_rank()
    hosts = all_gather_objects(socket.gethostname())
    leader = hosts.index(hosts[rank])
    what = f"download the checkpoint {redact_url(url)}"
    made: list[str] = []  # this rank's temporary directories

    def download() -> str:
        made.append(tempfile.mkdtemp(prefix="l2t-ckpt-"))
        storage.download(url, Path(made[-1]))
        return made[-1]

    try:
        where = Path(all_gather_objects(on_every_rank(lambda: download() if rank == leader else None, what))[leader])
        # a rank that does not see the leader's temporary directory fetches its own copy
        own = on_every_rank(lambda: download() if rank != leader and not (where / COMPLETE).is_file() else None, what)
        where = Path(own) if own else where
        done = False
        try:
            yield where
            done = True
        finally:
            if not all_succeeded(done) and done:  # this rank is through, another rank failed with the copy
                raise RuntimeError(f"another rank failed while reading the checkpoint {redact_url(url)}; "
                                   "this rank stops too")
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
