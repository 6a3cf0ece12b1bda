"""Whole weights of a model outside DeepSpeed (what ZeRO-3 gathers is tested in test_deepspeed.py):
the helpers read a plain module's state dict as it is, tied weights and buffers included. And the
agreement on failures across ranks, and the per-host checkpoint download, on two gloo processes."""

from __future__ import annotations

from pathlib import Path

import torch

import pytest

from l2t_core.engines.gather import check_head_chunking, full_named_tensors, full_state_dict, gathered, is_partitioned


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as lm_head and embed_tokens often are
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("kept", torch.arange(3.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def test_full_state_dict_of_a_plain_module_is_its_state_dict():
    m = Tied()
    assert not is_partitioned(m.parameters())
    want = m.state_dict()
    got = dict(full_named_tensors(m))
    assert list(got) != [] and set(got) == set(want)  # both names of the tied weight, no scratch buffer
    for k, v in want.items():
        assert got[k] is not v and torch.equal(got[k], v)
        assert got[k].data_ptr() == v.data_ptr()  # not partitioned: the tensor itself, no copy
    cpu = full_state_dict(m)
    assert set(cpu) == set(want) and all(torch.equal(cpu[k], want[k]) for k in want)
    assert cpu["kept"].data_ptr() != m.kept.data_ptr()  # the saved copy is its own
    assert full_state_dict(m, keep=False) is None
    with gathered(m.parameters()):  # a no-op without ZeRO-3
        assert m.head.weight.shape == (5, 3)


def test_head_chunking_is_refused_where_zero3_partitions_the_head(model):
    check_head_chunking(model, 4096)  # a whole head: fine
    check_head_chunking(model, None)
    head = model.get_output_embeddings()
    head.weight.ds_id = 0  # how DeepSpeed marks a ZeRO-3 partitioned parameter
    try:
        check_head_chunking(model, None)  # not asked for: fine
        with pytest.raises(ValueError, match="head_chunk_tokens is not supported when DeepSpeed ZeRO-3"):
            check_head_chunking(model, 4096)
    finally:
        del head.weight.ds_id


def _two_ranks(rank: int, world: int, init: str, out: str, case: str) -> None:
    """One rank of a two-process gloo group: runs ``case`` and writes what it saw to out/rank<r>.json."""
    import json
    import os

    import torch.distributed as dist

    from l2t_core.checkpoint import RunStorage
    from l2t_core.engines.gather import on_every_rank, on_rank_0
    from l2t_core.sharded_checkpoint import host_local_copy

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
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
    else:  # host_local_copy: every process holds the same checkpoint in its own in-memory filesystem
        store = RunStorage(f"memory://l2t-gather-test-{os.getpid()}")
        store.write_checkpoint(3, lambda d: (d / "model.txt").write_text("weights of step 3"))
        downloads = []
        original = store.download
        store.download = lambda url, dest: (downloads.append(str(dest)), original(url, dest))[1]
        with host_local_copy(store, store.checkpoint_url(3)) as d:
            seen["read"] = (d / "model.txt").read_text()
            seen["dir"] = str(d)
        seen["downloads"] = len(downloads)
        dist.barrier()  # rank 0 has removed its copy
        seen["removed"] = not Path(seen["dir"]).exists()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["agreement", "host_copy"])
def test_two_ranks_agree_on_failures_and_share_one_download_per_host(tmp_path, case):
    """on_every_rank: a rank that fails raises its own error, the other a RuntimeError naming it,
    what failed and why (neither waits in a later collective); on_rank_0 likewise for rank 0's
    work; results come back where nothing fails. host_local_copy: one download for the host, by
    its lowest rank, read by both, removed once both are done."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(2, f"file://{tmp_path}/pg", str(tmp_path), case), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    if case == "agreement":
        assert r1["every_fails"] == {"error": "OSError: [Errno 28] No space left on device"}
        assert r0["every_fails"] == {"error": "RuntimeError: rank 1 failed to write its shard (OSError: [Errno 28] "
                                              "No space left on device); this rank stops too"}
        assert (r0["every_ok"], r1["every_ok"]) == ({"result": 1}, {"result": 2})
        assert r0["rank0_fails"] == {"error": "ZeroDivisionError: division by zero"}
        assert r1["rank0_fails"] == {"error": "RuntimeError: rank 0 failed to publish (its log says why); "
                                              "this rank stops too"}
        assert (r0["rank0_ok"], r1["rank0_ok"]) == ({"result": "published"}, {"result": None})
    else:
        assert r0["read"] == r1["read"] == "weights of step 3"
        assert r0["dir"] == r1["dir"]  # rank 1 read the copy rank 0 made
        assert (r0["downloads"], r1["downloads"]) == (1, 0)
        assert r0["removed"] and r1["removed"]
