"""Peak memory of a phase of a training step, on the device that does the work.

The trainer records, per step and phase (rollout, reward, reference, update), the highest memory
the phase reached, so that ``micro_batch_tokens``, ``head_chunk_tokens`` and
``gradient_checkpointing`` can be tuned from the metrics tables (``train_steps``) rather than by
running out of memory:

* on CUDA, torch's peak allocation on the trainer's device (``torch.cuda.max_memory_allocated``,
  reset at the start of the phase); memory that vLLM allocates itself is not counted;
* on the CPU (Linux), the process's resident-set high-water mark (``VmHWM`` in
  ``/proc/self/status``), reset at the start of the phase by writing ``5`` to
  ``/proc/self/clear_refs``; it counts everything the process holds (the model included), not just
  the phase's tensors;
* where neither is available, None (the column is then empty).
"""

from __future__ import annotations

from pathlib import Path

import torch

GIB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """``reset()`` at the start of a phase, ``peak_gib()`` at its end."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cpu_ok = not self.cuda and _status_kib("VmHWM") is not None and self._clear()

    @staticmethod
    def _clear() -> bool:
        try:
            _CLEAR_REFS.write_text("5")  # resets the resident set's high-water mark to its current size
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_ok:
            self._clear()

    def resident_gib(self) -> float | None:
        """What is held now: torch's allocation on CUDA, the resident set on a Linux CPU (a peak
        above this is what a phase added; ``bench.train_memory`` reports that)."""
        return self._gib(torch.cuda.memory_allocated, "VmRSS")

    def peak_gib(self) -> float | None:
        return self._gib(torch.cuda.max_memory_allocated, "VmHWM")

    def _gib(self, cuda_stat, status_field: str) -> float | None:
        if self.cuda:
            return cuda_stat(self.device) / GIB
        kib = _status_kib(status_field) if self.cpu_ok else None
        return None if kib is None else kib * 1024 / GIB
