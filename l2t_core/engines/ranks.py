"""The ranks of a multi-process (DeepSpeed, torchrun) launch: the process group, reductions and
gathers over it, and the agreement on failures that the trainer and ``l2t sft`` share.

Every helper is a no-op on one process and a collective where a process group exists (every rank
must call it, in the same order). :func:`on_rank_0` runs what rank 0 does alone (writing a file,
a callback) and :func:`on_every_rank` what every rank does for itself (uploading its shard); after
either, every rank knows in one collective whether any failed, and all of them raise, instead of
the others waiting in the next collective until the process group times out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def multi_rank_group():
    """``torch.distributed`` when this process is one of several ranks of a process group, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def collective_device(dist) -> torch.device:
    """Where the tensors of a collective must live: an NCCL process group (the GPU launch,
    ``DeepSpeedEngine``) reduces CUDA tensors only, on this rank's current device; gloo (the CPU
    launch) reduces CPU tensors."""
    backend = str(dist.get_backend())  # "nccl", "gloo", or per device: "cpu:gloo,cuda:nccl"
    if backend == "nccl" or ("cuda:" in backend and "cpu:" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialized_group():
    """``torch.distributed`` when this process has joined a process group (of any size), else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_list(values: list[float], dtype: torch.dtype, op: str = "sum") -> list:
    """Element-wise sum or max of ``values`` over the ranks, as ``dtype``; unchanged on one process.
    A collective where a process group exists: every rank calls it."""
    dist = initialized_group()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=collective_device(dist))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process. A collective."""
    dist = initialized_group()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_succeeded(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (``ok`` itself on one process). A collective that also
    synchronises the ranks: where one rank alone writes files, the others learn here whether it
    failed instead of waiting for it in a later collective until the process group times out."""
    return bool(all_reduce_list([0 if ok else 1], torch.long, "max")[0] == 0)


def on_rank_0(main: bool, write: Callable[[], T], what: str) -> T | None:
    """``write()`` on rank 0 (``main``) while the other ranks wait; its result there, None on the
    others. Every rank raises if it failed (rank 0 its own error, the others a RuntimeError naming
    ``what``), so none waits for rank 0 in a later collective until the process group times out."""
    error: BaseException | None = None
    result = None
    if main:
        try:
            result = write()
        except BaseException as exc:  # raised below, once the other ranks have heard of it
            error = exc
    if not all_succeeded(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed to {what} (its log says why); this rank stops too")
    return result


def on_every_rank(work: Callable[[], T], what: str) -> T:
    """``work()`` on every rank; its result. Every rank raises if it failed on any: a rank that
    failed its own error, the others a RuntimeError naming the ranks that failed, ``what`` and the
    first one's error, so none waits for a failed rank in a later collective until the process
    group times out (one ``all_gather_object``)."""
    error: BaseException | None = None
    result = None
    try:
        result = work()
    except BaseException as exc:  # raised below, once every rank has heard of it
        error = exc
    reports = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise RuntimeError(f"rank {ranks} failed to {what} ({failed[0][1]}); this rank stops too")
    return result  # type: ignore[return-value]
