"""The training-engine interface the trainer drives, one optimizer step per RL step.

The trainer computes the loss of each micro-batch already scaled to its share of the whole batch
(so the gradient equals that of one big batch: gradient accumulation), calls :meth:`backward` for
each, then :meth:`step` once. Engines own the optimizer, the learning-rate schedule, gradient
clipping, and their own state on disk.
"""

from __future__ import annotations

import abc
import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch


def lr_lambda(step: int, total_steps: int, warmup_frac: float, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up
    over ``warmup_frac`` of the steps, then cosine decay to ``min_lr_ratio`` (METHOD.md §9) or constant."""
    warm = int(round(warmup_frac * total_steps))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose 'cosine' or 'constant'")
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_of(optim_cfg, total_steps: int) -> Callable[[int], float]:
    """``optim_cfg``'s learning-rate multiplier per step (:func:`lr_lambda`), as a ``LambdaLR`` takes it."""
    return partial(lr_lambda, total_steps=total_steps, warmup_frac=optim_cfg.warmup_frac,
                   schedule=optim_cfg.schedule, min_lr_ratio=optim_cfg.min_lr_ratio)


class TrainEngine(abc.ABC):
    """One policy, its optimizer and schedule, on one or many devices."""

    #: the module to run forward passes with (DeepSpeed: the engine-wrapped module)
    module: torch.nn.Module
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """Accumulate the gradient of one micro-batch's (already scaled) loss; ``last`` marks the
        final micro-batch before :meth:`step` (DeepSpeed reduces across ranks there)."""

    @abc.abstractmethod
    def step(self) -> dict[str, float]:
        """Clip, apply the accumulated gradient, advance the schedule, zero the gradients.
        Returns at least ``grad_norm`` (before clipping) and ``lr`` (the rate just used)."""

    @abc.abstractmethod
    def save_state(self, directory: Path) -> None:
        """Write optimizer/scheduler state into a local ``directory`` (every rank calls this)."""

    @abc.abstractmethod
    def load_state(self, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote."""

    def unwrapped(self) -> torch.nn.Module:
        """The plain ``transformers`` model (for ``save_pretrained`` and the reward pass)."""
        return self.module

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference policy, placed as this engine holds the policy (a copy made before
        the engine took the policy over); run forward passes on what this returns."""
        return reference
