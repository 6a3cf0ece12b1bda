"""Peak memory per phase (l2t_core.memory) and the device of the trainer's collectives."""

from __future__ import annotations

import types

import pytest
import torch

from l2t_core.memory import PeakMemory


def test_cpu_peak_follows_the_phase_and_resets():
    mem = PeakMemory("cpu")
    if not mem.cpu_ok:
        pytest.skip("this kernel does not let a process reset its resident-set high-water mark")
    mem.reset()
    before = mem.peak_gib()
    assert 0 < mem.resident_gib() <= before  # right after a reset the peak is what is resident
    x = torch.ones(64 * 2**20)  # 256 MiB, touched
    del x
    during = mem.peak_gib()
    assert during - before > 0.2  # the phase's allocation is in its peak, though it is freed
    mem.reset()  # the next phase starts from what is resident now, not from the last phase's peak
    assert mem.peak_gib() < during - 0.2


def test_collectives_use_the_process_groups_device(monkeypatch):
    """NCCL (GPU launches) reduces CUDA tensors only: the trainer's sums and maxima go to the rank's
    current CUDA device there, and stay on the CPU with gloo."""
    from l2t_core.engines.ranks import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device(types.SimpleNamespace(get_backend=lambda: "gloo")) == torch.device("cpu")
    assert collective_device(types.SimpleNamespace(get_backend=lambda: "nccl")) == torch.device("cuda", 3)
    assert collective_device(types.SimpleNamespace(get_backend=lambda: "cuda:nccl")) == torch.device("cuda", 3)
    assert collective_device(types.SimpleNamespace(get_backend=lambda: "cpu:gloo,cuda:nccl")) == torch.device("cpu")


def test_a_process_group_without_a_cpu_backend_refuses_cpu_tensors(monkeypatch):
    """Why the device matters, shown on the CPU: a group whose only backend serves CUDA tensors
    (as NCCL's does) refuses a CPU tensor; ``collective_device`` names CUDA for such a group."""
    import torch.distributed as dist

    from l2t_core.engines.ranks import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # this CPU build has no CUDA to ask
    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(1))
        assert collective_device(dist).type == "cuda"
    finally:
        dist.destroy_process_group()
