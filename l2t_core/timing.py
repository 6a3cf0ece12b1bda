"""Wall-clock timing that is honest on a GPU.

CUDA runs kernels asynchronously: a host clock read right after a launch returns before the work is
done, and the time lands on whatever next waits for the device (a ``.cpu()``, a ``.tolist()``).
:func:`device_clock` waits for the device's queued work first, so a phase timed between two calls
holds that phase's kernels. On the CPU it is ``time.perf_counter()``.
"""

from __future__ import annotations

import time

import torch


def device_clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after ``device``'s queued CUDA work has finished (no wait on a CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
