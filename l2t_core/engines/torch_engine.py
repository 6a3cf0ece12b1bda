"""The plain-torch training engine: one device, AdamW, warm-up + cosine schedule, grad clipping."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .base import TrainEngine, schedule_of

STATE_FILE = "engine_state.pt"


class TorchEngine(TrainEngine):
    def __init__(self, model: torch.nn.Module, optim_cfg, total_steps: int, *,
                 lr_schedule: Callable[[int], float] | None = None):
        self.module = model
        self.cfg = optim_cfg
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("TorchEngine: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule or schedule_of(optim_cfg, total_steps))
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": float(lr)}

    def save_state(self, directory: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   Path(directory) / STATE_FILE)

    def load_state(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"TorchEngine: no optimizer state at {path}; the checkpoint is incomplete")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
