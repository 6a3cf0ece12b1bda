"""Supervised warm start on (prompt, response) text pairs: next-token cross-entropy on the
response tokens only, AdamW, batched with padding."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from rich.progress import Progress


def sft(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` in place; returns the loss per step."""
    if not pairs:
        raise ValueError("sft: no training pairs")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    enc = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        enc.append((p, r))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    with Progress(disable=not show_progress, transient=True) as bar:
        task = bar.add_task("SFT warm start", total=steps)
        for _ in range(steps):
            batch = rng.sample(enc, min(batch_size, len(enc)))
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            att = torch.zeros_like(ids)
            for i, (p, r) in enumerate(batch):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
                att[i, : len(p) + len(r)] = 1
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"SFT warm start (loss {losses[-1]:.3f})")
    model.eval()
    return losses
