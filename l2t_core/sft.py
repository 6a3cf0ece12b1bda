"""Supervised warm start on (prompt, response) text pairs.

Next-token cross-entropy on the response tokens only (the prompt is context), AdamW with linear
warm-up and cosine decay, gradient clipping, batches of similar lengths (less padding) and an
optional evaluation loss on held-out pairs.

An example may also be a longer tuple of text segments that alternate between context (not
trained) and target (trained): ``(prompt, response)`` or, e.g., ``(prompt, trace prefix,
force-answer suffix, answer)`` to train the prefix and the answer but never the suffix.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from rich.progress import Progress

from .models import eval_mode

log = logging.getLogger("l2t.sft")

Encoded = tuple[list[int], list[bool]]  # (token ids, trained flag per token); ends with eos


@dataclass
class SFTResult:
    """Loss per training step, evaluation losses as (step, loss), and the wall time."""

    losses: list[float]
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 % of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def encode_pairs(tokenizer, pairs: Sequence[Sequence[str]]) -> list[Encoded]:
    """Tokenise each example's segments (context, target, context, target, ...); the last target
    gets the eos token appended, so the model is trained to stop."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("sft: the tokenizer has no eos token; the model could never learn to stop")
    out = []
    for i, segs in enumerate(pairs):
        if isinstance(segs, str) or len(segs) < 2 or len(segs) % 2:
            raise ValueError(f"sft: example {i} must be (context, target, ...) with an even number of segments")
        if not segs[0]:
            raise ValueError(f"sft: example {i} has an empty prompt")
        ids: list[int] = []
        trained: list[bool] = []
        for j, text in enumerate(segs):
            t = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += t
            trained += [j % 2 == 1] * len(t)
        out.append((ids + [eos], trained + [True]))
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 outside the targets."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    att = torch.zeros_like(ids)
    for i, (toks, trained) in enumerate(batch):
        t = torch.tensor(toks)
        ids[i, :len(toks)] = t
        labels[i, :len(toks)] = torch.where(torch.tensor(trained), t, -100)
        att[i, :len(toks)] = 1
    return ids, att, labels


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, pool: int = 32) -> list[list[int]]:
    """One epoch of batches: shuffle, sort within pools of ``pool`` batches by length, chunk, and
    shuffle the batches. Similar lengths in a batch waste less compute on padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * pool
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_factor(step: int, total: int, warmup_frac: float, min_frac: float) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to ``min_frac``."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def eval_loss(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 64) -> float:
    """Mean per-token response cross-entropy of ``model`` on ``encoded`` pairs."""
    total, count = 0.0, 0
    with eval_mode(model):
        for s in range(0, len(encoded), batch_size):
            ids, att, labels = collate(encoded[s:s + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            tgt = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((tgt != -100).sum())
    return total / max(1, count)


def sft(
    model,
    tokenizer,
    pairs: Sequence[Sequence[str]],
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup_frac: float = 0.05,
    min_lr_frac: float = 0.05,
    weight_decay: float = 0.0,
    eval_pairs: Sequence[Sequence[str]] = (),
    eval_every: int = 0,
    seed: int = 0,
    show_progress: bool = True,
) -> SFTResult:
    """Fine-tune ``model`` in place on ``pairs``; returns the losses and the wall time.

    ``eval_pairs`` are scored (mean token cross-entropy) every ``eval_every`` steps (0: only at
    the end) when given.
    """
    if not pairs:
        raise ValueError("sft: no training pairs")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"sft: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if lr <= 0:
        raise ValueError(f"sft: lr must be > 0, got {lr}")
    t0 = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = encode_pairs(tokenizer, pairs)
    enc_eval = encode_pairs(tokenizer, eval_pairs) if eval_pairs else []
    lengths = [len(ids) for ids, _ in enc]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup_frac, min_lr_frac))
    result = SFTResult(losses=[])
    model.train()
    queue: list[list[int]] = []
    with Progress(disable=not show_progress, transient=True) as bar:
        task = bar.add_task("SFT warm start", total=steps)
        for step in range(steps):
            if not queue:
                queue = length_grouped_batches(lengths, min(batch_size, len(enc)), rng)
            ids, att, labels = collate([enc[i] for i in queue.pop()], pad)
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            result.losses.append(loss.item())
            if enc_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                result.eval_losses.append((step + 1, eval_loss(model, enc_eval, pad)))
            bar.update(task, advance=1, description=f"SFT warm start (loss {result.losses[-1]:.3f})")
            if (step + 1) % max(1, steps // 10) == 0 and step + 1 < steps:  # a log line every 10 %
                spent = time.perf_counter() - t0
                log.info("SFT step %d/%d: loss %.3f, %.0f s spent, about %.0f s left", step + 1, steps,
                         sum(result.losses[-10:]) / len(result.losses[-10:]), spent,
                         spent / (step + 1) * (steps - step - 1))
    if enc_eval:
        result.eval_losses.append((steps, eval_loss(model, enc_eval, pad)))
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
