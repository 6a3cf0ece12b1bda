"""Supervised warm start on (prompt, response) text pairs, and the ``l2t sft`` job
(:class:`SFTConfig`, :func:`run_sft`) that runs it on any policy and a JSONL file of traces.

Next-token cross-entropy on the response tokens only (the prompt is context), AdamW with linear
warm-up and cosine decay, gradient clipping, batches of similar lengths (less padding) and an
optional evaluation loss on held-out pairs.

An example may also be a longer tuple of text segments that alternate between context (not
trained) and target (trained): ``(prompt, response)`` or, e.g., ``(prompt, trace prefix,
force-answer suffix, answer)`` to train the prefix and the answer but never the suffix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, field_validator
from rich.progress import Progress

from .config import _Strict
from .atomic_files import write_json_atomic, write_text_atomic
from .engines.ranks import all_gather_objects, all_reduce_list
from .hub import check_revision_source
from .models import eval_mode

if TYPE_CHECKING:
    from .engines import TrainEngine

log = logging.getLogger("l2t.sft")

Encoded = tuple[list[int], list[bool]]  # (token ids, trained flag per token); ends with eos


@dataclass
class SFTResult:
    """Loss and gradient norm (before clipping) per training step, evaluation losses as (step,
    loss), and the wall time."""

    losses: list[float]
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    grad_norms: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 % of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


@dataclass
class SFTState:
    """Everything besides the weights and the training engine's own state (optimizer and schedule,
    :meth:`~l2t_core.engines.TrainEngine.save_state`) that :func:`sft_encoded` needs to go on after
    ``step`` steps exactly as if it had never stopped: the batch order still to come, the random
    states, the losses so far, and the number of ranks that trained (DeepSpeed's optimizer state is
    partitioned over them)."""

    step: int
    batch_rng: tuple
    queue: list[list[int]]
    torch_rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor]
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    seconds: float
    grad_norms: list[float] = field(default_factory=list)
    world: int = 1
    rank_rngs: Optional[list[tuple[torch.Tensor, Optional[torch.Tensor]]]] = None  # every rank's (torch, cuda)


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


def padding_token(tokenizer) -> int:
    """The token :func:`collate` pads with: the tokenizer's pad token, else its eos token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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


def autocast(model, precision: str = "fp32"):
    """The forward passes' precision: ``fp32`` as the weights are, or ``bf16`` mixed precision
    (``torch.autocast``: matrix products in bfloat16, the weights, their gradients and AdamW's
    moments stay fp32) on the device of ``model``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"sft: precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def _trained_in(example: Encoded) -> int:
    """The tokens of one example a causal LM's loss counts: its trained tokens after the first
    position (the first token is never predicted)."""
    return sum(example[1][1:])


def _accumulate_batch(model, batch: Sequence[Encoded], pad_id: int, micro_batch_size: int | None,
                      precision: str = "fp32", *, backward: Callable[[torch.Tensor, bool], None] | None = None,
                      rank: int = 0, world: int = 1) -> float:
    """Backward of one batch's mean-token loss, in passes of ``micro_batch_size`` examples; this
    rank's share of the batch's loss. Each pass's mean loss is weighted by its share of the whole
    batch's trained tokens (exactly 1 for a single pass on one process, which is then the plain
    ``loss.backward()``). The forward passes run in ``precision`` (:func:`autocast`), the backward
    outside it, as torch.autocast asks. ``backward(loss, last)`` takes each pass's loss (default
    ``loss.backward()``); ``last`` marks the batch's final pass (where DeepSpeed reduces).

    On ``world`` ranks (data parallel, DeepSpeed) rank ``r`` runs the examples ``batch[r::world]``
    and scales its losses by ``world``, since DeepSpeed averages the ranks' gradients: the average
    is the whole batch's gradient. Every rank runs the same number of passes (ZeRO-2's gradient
    hooks take part in collectives in every backward, ZeRO-3 gathers weights in every forward), a
    rank short of examples a zero loss from a real forward of two padding tokens, whose backward
    fires every gradient hook in the order a real one does (the trainer's
    :func:`~l2t_core.trainer.zero_loss` explains why)."""
    backward = backward or (lambda loss, last: loss.backward())
    device = next(model.parameters()).device
    total = sum(_trained_in(ex) for ex in batch)
    per_rank = -(-len(batch) // world)
    size = micro_batch_size or per_rank
    mine = list(batch[rank::world])
    passes = [(collate(mine[s:s + size], pad_id), sum(_trained_in(ex) for ex in mine[s:s + size]))
              for s in range(0, len(mine), size)]
    if world == 1:  # a pass with nothing trained (every target cut off) has no gradient to add
        passes = [(p, n) for p, n in passes if n > 0]
    count = len(passes) if world == 1 else -(-per_rank // size)
    loss_value = 0.0
    for i in range(count):
        last = i == count - 1
        if i < len(passes) and passes[i][1] > 0:
            (ids, att, labels), n = passes[i]
            share = n / max(1, total)
            with autocast(model, precision):
                loss = model(input_ids=ids.to(device), attention_mask=att.to(device), labels=labels.to(device)).loss
            backward(loss * (share * world), last)
            loss_value += loss.item() * share
        else:  # the other ranks still train: take part with a loss of exactly 0
            ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
            with autocast(model, precision):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            backward(logits.float().sum() * 0.0, last)
    return loss_value


@torch.no_grad()
def eval_loss(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 64, precision: str = "fp32") -> float:
    """Mean per-token response cross-entropy of ``model`` on ``encoded`` pairs (forward passes in
    ``precision``, the loss in fp32)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for s in range(0, len(encoded), batch_size):
            ids, att, labels = collate(encoded[s:s + batch_size], pad_id)
            device = next(model.parameters()).device
            with autocast(model, precision):
                logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
            logits = logits[:, :-1].float()
            tgt = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((tgt != -100).sum())
    return total / max(1, count)


def sft(model, tokenizer, pairs: Sequence[Sequence[str]], *, eval_pairs: Sequence[Sequence[str]] = (),
        **kwargs) -> SFTResult:
    """:func:`sft_encoded` on ``pairs`` (and ``eval_pairs``) tokenised by :func:`encode_pairs`,
    padded with the tokenizer's pad token (its eos token when it has none)."""
    if not pairs:
        raise ValueError("sft: no training pairs")
    return sft_encoded(model, encode_pairs(tokenizer, pairs), pad_id=padding_token(tokenizer),
                       eval_examples=encode_pairs(tokenizer, eval_pairs) if eval_pairs else (), **kwargs)


def sft_encoded(
    model,
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    eval_examples: Sequence[Encoded] = (),
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup_frac: float = 0.05,
    min_lr_frac: float = 0.05,
    weight_decay: float = 0.0,
    eval_every: int = 0,
    seed: int = 0,
    micro_batch_size: int | None = None,
    precision: str = "fp32",
    engine: str = "torch",
    deepspeed_config: str | dict | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[SFTState, TrainEngine], None] | None = None,
    resume: SFTState | None = None,
    resume_from: Path | None = None,
    show_progress: bool = True,
) -> SFTResult:
    """Fine-tune ``model`` in place on tokenised ``examples`` (:func:`encode_pairs`' output, right-
    padded with ``pad_id``); returns the losses and the wall time.

    ``eval_examples`` are scored (mean token cross-entropy) every ``eval_every`` steps (0: only at
    the end) when given. A batch runs in forward/backward passes of ``micro_batch_size`` examples
    (None: the whole batch in one), each pass's mean loss weighted by its share of the batch's
    trained tokens, so the gradient is the whole batch's mean-token loss gradient whatever the
    split. The forward passes run in ``precision`` (:func:`autocast`: ``fp32``, or ``bf16`` mixed
    precision).

    The training ``engine`` (:func:`~l2t_core.engines.make_train_engine`) owns AdamW (``lr``,
    ``weight_decay``), the warm-up + cosine schedule (:func:`lr_factor`) and the clipping of the
    gradient norm at 1: ``torch`` on the device of the model's parameters, or ``deepspeed``
    (``deepspeed_config``, ZeRO-2/3) on every rank of a ``deepspeed``/``torchrun`` launch, each
    rank running its share of every batch (:func:`_accumulate_batch`) with the same batch order;
    the evaluation loss is every rank's, over all ``eval_examples``.

    Every ``checkpoint_every`` steps (0: never; not after the last) ``on_checkpoint`` gets the
    :class:`SFTState` and the engine (whose :meth:`~l2t_core.engines.TrainEngine.save_state`
    writes the optimizer's), for the caller to save with the model's weights; under DeepSpeed
    every rank calls it. Given back as ``resume``, with ``model`` holding the weights saved with it,
    ``resume_from`` the directory the engine's state was saved into, and the same arguments
    otherwise, the run goes on from that step and ends exactly where an uninterrupted run would.
    """
    if not examples:
        raise ValueError("sft: no training examples")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"sft: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"sft: micro_batch_size must be >= 1 (or None), got {micro_batch_size}")
    if lr <= 0:
        raise ValueError(f"sft: lr must be > 0, got {lr}")
    if resume is not None and resume_from is None:
        raise ValueError("sft: resume needs resume_from, the directory the engine's state was saved into")
    autocast(model, precision)  # refuses an unknown precision before any compute
    from .config import OptimConfig
    from .engines import make_train_engine

    t0 = session_start = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad, enc, enc_eval = pad_id, list(examples), list(eval_examples)
    lengths = [len(ids) for ids, _ in enc]
    eval_batch = micro_batch_size or 64  # the evaluation's logits must fit where a training pass's do
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, warmup_frac=warmup_frac, min_lr_ratio=min_lr_frac,
                        grad_clip=1.0)
    kw = {"config_path": deepspeed_config} if engine == "deepspeed" else {}
    eng = make_train_engine(engine, model, optim, steps,
                            lr_schedule=partial(lr_factor, total=steps, warmup_frac=warmup_frac, min_frac=min_lr_frac),
                            **kw)
    model = eng.module
    main, world = eng.is_main, eng.world_size
    result = SFTResult(losses=[])
    model.train()
    queue: list[list[int]] = []
    start = 0
    if resume is not None:
        if not 0 < resume.step < steps:
            raise ValueError(f"sft: cannot resume after step {resume.step} of a {steps}-step run")
        eng.load_state(resume_from)
        rng.setstate(resume.batch_rng)
        queue = [list(b) for b in resume.queue]
        torch_rng, cuda_rng = resume.rank_rngs[eng.rank] if resume.rank_rngs else (resume.torch_rng, resume.cuda_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        result.losses, result.eval_losses = list(resume.losses), [tuple(e) for e in resume.eval_losses]
        result.grad_norms = list(resume.grad_norms)
        start, t0 = resume.step, t0 - resume.seconds  # result.seconds counts earlier sessions too
        if main:
            log.info("SFT resumed after step %d of %d", start, steps)

    def backward(loss: torch.Tensor, last: bool) -> None:
        eng.backward(loss, last=last)

    with Progress(disable=not (show_progress and main), transient=True) as bar:
        task = bar.add_task("SFT warm start", total=steps, completed=start)
        for step in range(start, steps):
            if not queue:
                queue = length_grouped_batches(lengths, min(batch_size, len(enc)), rng)
            loss = _accumulate_batch(model, [enc[i] for i in queue.pop()], pad, micro_batch_size, precision,
                                     backward=backward, rank=eng.rank, world=world)
            result.losses.append(all_reduce_list([loss], torch.float64)[0] if world > 1 else loss)
            result.grad_norms.append(eng.step()["grad_norm"])
            if enc_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                result.eval_losses.append((step + 1, eval_loss(model, enc_eval, pad, eval_batch, precision)))
            bar.update(task, advance=1, description=f"SFT warm start (loss {result.losses[-1]:.3f})")
            if main and (step + 1) % max(1, steps // 10) == 0 and step + 1 < steps:  # a log line every 10 %
                spent = time.perf_counter() - session_start
                log.info("SFT step %d/%d: loss %.3f, %.0f s spent, about %.0f s left", step + 1, steps,
                         sum(result.losses[-10:]) / len(result.losses[-10:]), spent,
                         spent / (step + 1 - start) * (steps - step - 1))
            if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps:
                cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
                # each rank's random states (dropout draws differ between the ranks' shares)
                rank_rngs = all_gather_objects((torch.get_rng_state(), cuda)) if world > 1 else None
                on_checkpoint(SFTState(step + 1, rng.getstate(), [list(b) for b in queue], torch.get_rng_state(),
                                       cuda, list(result.losses), list(result.eval_losses),
                                       time.perf_counter() - t0, list(result.grad_norms), world, rank_rngs), eng)
    if enc_eval:
        result.eval_losses.append((steps, eval_loss(model, enc_eval, pad, eval_batch, precision)))
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# `l2t sft`: the supervised warm start of any policy on reasoning traces in a JSONL file


class SFTConfig(_Strict):
    """One supervised fine-tuning job (``l2t sft``): a policy trained on reasoning traces before
    RL, e.g. to write the METHOD.md §8 episode format. Saved as ``sft_config.json`` next to the
    model it makes, whose directory is a ``policy`` for ``l2t train``."""

    model: str = Field(..., min_length=1, description="Initial model: a local HF directory or a hub id.")
    model_revision: Optional[str] = Field(None, min_length=1, description=(
        "For a hub id in model: the branch, tag or commit to fine-tune (None: main as it is at load time)."))
    data: str = Field(..., min_length=1, description=(
        "JSONL file of traces: a path, or a file name in the data directory (L2T_DATA_DIR). Each line is an "
        "object with 'response' (the text the model learns to write after the prompt) and either 'problem' "
        "(the prompt is built as in training: the problem and the §8 episode instruction) or 'prompt' (used "
        "as it is); optional 'id' (named in errors) and 'answer' (the response's final answer is checked "
        "against it and the count reported)."))
    out: str = Field(..., min_length=1, description="Directory for the model, tokenizer, sft_config.json and "
                                                   "sft_report.json; must not exist yet (a local path).")
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per optimizer step.")
    micro_batch_size: Optional[int] = Field(None, ge=1, description=(
        "Examples per forward/backward pass (gradient accumulation; None: the whole batch at once). The "
        "gradient is the batch's mean-token loss gradient whatever the split."))
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    warmup_frac: float = Field(0.1, ge=0, le=1, description="Linear warm-up share of the steps, then cosine decay.")
    min_lr_frac: float = Field(0.05, ge=0, le=1, description="Learning rate at the end of the decay, as a share "
                                                            "of lr.")
    weight_decay: float = Field(0.0, ge=0)
    eval_size: int = Field(0, ge=0, description="Rows held out (drawn with the seed) for the evaluation loss.")
    eval_every: int = Field(0, ge=0, description="Evaluation loss every N steps (0: only at the end).")
    max_tokens: Optional[int] = Field(None, ge=2, description=(
        "Longest example (prompt + response + eos) in tokens; a longer one is an error naming its line. "
        "None: the model's max_position_embeddings."))
    max_episodes: int = Field(30, ge=1, description="Segmentation of the responses for the format check "
                                                    "(METHOD.md §1).")
    check_answers: bool = Field(True, description="Verify each response's final answer against the row's "
                                                  "'answer' (math-verify, milliseconds a row) and report the count.")
    checkpoint_every: int = Field(200, ge=0, description=(
        "Steps between checkpoints of the work in progress (beside out, in .<name>.partial; 0: none); the "
        "same job run again after a failure resumes from the last one."))
    precision: Literal["fp32", "bf16"] = Field("fp32", description=(
        "Forward passes in fp32, or in bf16 mixed precision (torch.autocast; the weights, gradients and "
        "optimizer state stay in the weights' dtype, fp32 on the torch engine, the loss is taken in fp32): about "
        "half the activation memory, and faster on GPUs with bf16 tensor cores. Under DeepSpeed the weights' "
        "dtype is its config's (bf16 'auto': bf16 weights, fp32 master weights in the optimizer)."))
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass "
                                                            "(less memory, about one more forward).")
    engine: Literal["torch", "deepspeed"] = Field("torch", description=(
        "torch: one device. deepspeed: data parallel over the ranks of a deepspeed/torchrun launch with ZeRO-2/3 "
        "(deepspeed_config), each rank training its share of every batch; the gradient is the whole batch's, "
        "as on one device. The weights train in the DeepSpeed config's dtype (bf16 'auto': bf16 on GPUs that "
        "have it, fp32 master weights in the optimizer)."))
    deepspeed_config: Optional[str] = Field(None, description="DeepSpeed JSON for engine deepspeed (see "
                                                               "infra/deepspeed/).")
    dist_timeout_minutes: float = Field(60.0, gt=0, description=(
        "engine deepspeed: how long a rank waits in a collective for the others before the launch fails."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "engine torch: where to train (auto: CUDA when present). engine deepspeed trains on each rank's "
        "device (its LOCAL_RANK GPU under NCCL, the CPU under gloo); cuda is still refused where there is none."))
    threads: Optional[int] = Field(None, ge=1, description="torch threads (None: unchanged).")
    seed: int = 0

    def model_post_init(self, __context) -> None:
        check_revision_source(self.model, self.model_revision, "model")
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ValueError("engine='deepspeed' needs deepspeed_config (e.g. infra/deepspeed/zero2.json)")
        if self.engine != "deepspeed" and self.deepspeed_config:
            raise ValueError(f"deepspeed_config is set but engine is {self.engine!r}; set engine=deepspeed to "
                             "train with it, or unset deepspeed_config")

    @field_validator("out")
    @classmethod
    def _local_out(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"{v!r} is a URL; the SFT model is written to a local directory (the policy that "
                             "`l2t train` loads with from_pretrained), e.g. runs/sft")
        return v


class SFTError(ValueError):
    """An SFT job that cannot run as configured, found before any compute; the message says why."""


class SFTDataError(SFTError):
    """The traces of an SFT job cannot be used; the message names the file, line and field."""


class SFTResumeError(SFTError):
    """An unfinished SFT into the same output was made with another configuration or traces."""


# SFTConfig fields that do not change the trained weights: an unfinished SFT resumes across them
RESUME_IGNORES = ("threads", "device", "check_answers", "max_episodes", "checkpoint_every", "dist_timeout_minutes")


@dataclass(frozen=True)
class SFTRow:
    """One trace: the prompt text (before the chat template), the response, and where it came from."""

    id: str
    line: int
    prompt: str
    response: str
    answer: Optional[str] = None


def sft_data_path(data: str) -> Path:
    """``data`` as given when that file exists, else a file of that name in the data directory."""
    from .data import data_dir

    path = Path(data).expanduser()
    if path.is_file():
        return path
    if path.name == data and (data_dir() / data).is_file():
        return data_dir() / data
    raise SFTDataError(f"SFT data {data!r} is no file (nor a file in the data directory {data_dir()}, "
                       "L2T_DATA_DIR); give the path of a JSONL file of traces")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (what tells one version of a traces file from another)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sft_jsonl(path: Path) -> list[SFTRow]:
    """The traces in ``path``, validated: each line an object with a non-empty string ``response``
    and exactly one of ``problem`` / ``prompt``; ``id`` and ``answer`` optional strings (numbers are
    read as their text). Errors name the file, the line and the field."""
    from .eval.datasets import DatasetError, json_lines
    from .prompts import build_prompt

    rows: list[SFTRow] = []
    try:
        for line_no, row in json_lines(path):
            def text(field: str, required: bool) -> Optional[str]:
                v = row.get(field)
                if v is None and not required:
                    return None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and field in ("id", "answer"):
                    v = str(v)
                if not isinstance(v, str) or not v.strip():
                    shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
                    raise DatasetError(f"must be a non-empty string, got {shown}", path=path, line=line_no,
                                       field=field)
                return v

            has = [f for f in ("problem", "prompt") if row.get(f) is not None]
            if len(has) != 1:
                raise DatasetError("needs exactly one of 'problem' (the prompt is built with the §8 episode "
                                   "instruction, as in training) and 'prompt' (used as it is), got "
                                   f"{has or 'neither'}", path=path, line=line_no)
            prompt = build_prompt(text("problem", True)) if has[0] == "problem" else text("prompt", True)
            rows.append(SFTRow(id=text("id", False) or f"line {line_no}", line=line_no, prompt=prompt,
                               response=text("response", True), answer=text("answer", False)))
    except DatasetError as exc:
        raise SFTDataError(str(exc)) from None
    if not rows:
        raise SFTDataError(f"{path}: the file has no traces")
    first: dict[tuple[str, str], int] = {}
    for r in rows:  # a copy would weigh a trace twice, and could sit in the training and the held-out rows at once
        seen = first.setdefault((r.prompt, r.response), r.line)
        if seen != r.line:
            raise SFTDataError(f"{path}, line {r.line}: the same prompt and response as line {seen}; remove the copy")
    return rows


def check_traces(rows: Sequence[SFTRow], max_episodes: int = 30, check_answers: bool = True) -> dict:
    """What the traces teach, checked before any compute: how each response segments (METHOD.md
    §1; L2T reads its episodes from ``<episode_k>`` tags) and, for rows with an ``answer`` (unless
    ``check_answers`` is off), whether the response's final answer verifies against it (math-verify)."""
    from .episodes import segment
    from .verify import MathVerifier

    status = Counter(segment(r.response, max_episodes=max_episodes).status for r in rows)
    verifier = MathVerifier()
    checked = [r for r in rows if r.answer is not None and check_answers]
    wrong = [r.id for r in checked if not verifier.verify(r.response, r.answer).correct]
    return {"segmentation": dict(sorted(status.items())),
            "answers": {"checked": len(checked), "correct": len(checked) - len(wrong), "wrong_ids": wrong[:20]}}


def _pairs(tokenizer, rows: Sequence[SFTRow]) -> list[tuple[str, str]]:
    """(prompt through the tokenizer's chat template, response): the context the trainer samples
    the policy in (:func:`~l2t_core.prompts.encode_prompt`), and what it learns to write there."""
    from .prompts import render_prompt

    return [(render_prompt(tokenizer, r.prompt), r.response) for r in rows]


def _encode_rows(tokenizer, rows: Sequence[SFTRow], max_tokens: int, path: Path) -> list[Encoded]:
    """The rows' examples as :func:`sft` encodes them; refuses any longer than ``max_tokens``, and a
    tokenizer :func:`encode_pairs` refuses (one without an eos token), as an :class:`SFTError`."""
    try:
        enc = encode_pairs(tokenizer, _pairs(tokenizer, rows))
    except ValueError as exc:  # the rows are validated: only the tokenizer can be at fault here
        raise SFTError(str(exc)) from None
    long = [(r, len(ids)) for r, (ids, _) in zip(rows, enc) if len(ids) > max_tokens]
    if long:
        shown = ", ".join(f"line {r.line} ({n} tokens)" for r, n in long[:5])
        raise SFTDataError(f"{path}: {len(long)} of {len(rows)} traces are longer than max_tokens={max_tokens} "
                           f"(prompt + response + eos): {shown}{', ...' if len(long) > 5 else ''}; shorten or "
                           "drop them, or raise max_tokens (at most the model's context)")
    return enc


def _curve(values: Sequence[float], every: int = 10) -> list[Optional[float]]:
    """Means of ``every`` consecutive values (None where none is finite: gradient norms a checkpoint
    from before they were recorded lacks)."""
    out: list[Optional[float]] = []
    for i in range(0, len(values), every):
        finite = [v for v in values[i:i + every] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else None)
    return out


def partial_dir(out: Path) -> Path:
    """Where an unfinished SFT into ``out`` keeps its config and last checkpoint, beside ``out``."""
    return out.parent / f".{out.name}.partial"


def _save_checkpoint(partial: Path, model, tokenizer, state: SFTState, engine: "TrainEngine") -> None:
    """The weights, tokenizer, the engine's optimizer state and the :class:`SFTState` in
    ``partial/checkpoint``, replaced whole: the new one is written beside it and renamed in, the old
    one removed after. Every rank calls it: each writes its engine state (DeepSpeed: its shard of
    the optimizer) and, under ZeRO-3, takes part in gathering the weights; rank 0 writes the rest
    and publishes it, while the others wait."""
    import shutil

    from .engines.ranks import on_rank_0
    from .sharded_checkpoint import stage_engine_state

    tmp, ckpt, old = partial / "checkpoint.tmp", partial / "checkpoint", partial / "checkpoint.old"
    main = engine.is_main
    whole = stage_engine_state(tmp, engine, main)

    def publish() -> None:
        model.save_pretrained(tmp, state_dict=whole)
        tokenizer.save_pretrained(tmp)
        torch.save(state.__dict__, tmp / "state.pt")  # written last: a checkpoint without it is incomplete
        if ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            ckpt.rename(old)
        tmp.rename(ckpt)
        shutil.rmtree(old, ignore_errors=True)

    on_rank_0(main, publish, "write the SFT checkpoint")


def _last_checkpoint(partial: Path) -> Optional[Path]:
    """The newest complete checkpoint of an unfinished SFT (``checkpoint``, or ``checkpoint.old``
    when a job stopped between the two renames of :func:`_save_checkpoint`)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (partial / name / "state.pt").is_file():
            return partial / name
    return None


def _load_state(checkpoint: Path) -> SFTState:
    """The :class:`SFTState` of a checkpoint. One written before the training engines took the
    optimizer over holds its AdamW and schedule state itself: they are moved into the torch
    engine's state file there, from which :meth:`~l2t_core.engines.TrainEngine.load_state` reads."""
    from .engines.torch_engine import STATE_FILE

    raw = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    if "optimizer" in raw:
        optimizer, scheduler = raw.pop("optimizer"), raw.pop("scheduler")
        tmp = checkpoint / f"{STATE_FILE}.tmp"
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp)
        os.replace(tmp, checkpoint / STATE_FILE)  # whole or not at all: state.pt still holds them meanwhile
        raw.setdefault("grad_norms", [float("nan")] * len(raw["losses"]))  # not recorded then
    return SFTState(**raw)


def plot_losses(losses: Sequence[float], eval_losses: Sequence[tuple[int, float]], path: Path) -> Path:
    """``loss.png``: the training loss per step (faint) and its 10-step mean, and the held-out
    evaluation losses as points, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
    mean = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
    ax.plot(steps, mean, color="tab:blue", lw=1.6, label="training loss (10-step mean)")
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", color="tab:orange",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per response token")
    ax.set_yscale("log")
    ax.legend(frameon=False)
    ax.set_title("l2t sft")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def deepspeed_config_sha256(cfg: SFTConfig) -> Optional[str]:
    """The SHA-256 of the job's DeepSpeed config file (what a resume must find unchanged), None
    without one; a path that is no file is refused."""
    if not cfg.deepspeed_config:
        return None
    if not Path(cfg.deepspeed_config).is_file():
        raise SFTError(f"deepspeed_config {cfg.deepspeed_config!r} is no file; give the path of a DeepSpeed JSON "
                       "(see infra/deepspeed/)")
    return file_sha256(Path(cfg.deepspeed_config))


def stale_partial(cfg: SFTConfig, data_sha256: str, deepspeed_sha256: Optional[str] = None) -> Optional[str]:
    """Why the unfinished SFT beside ``cfg.out`` cannot be resumed by ``cfg`` (the config fields,
    the traces' bytes or the DeepSpeed config's bytes that differ; :data:`RESUME_IGNORES` do not
    count), or None when there is none or it can."""
    from .config import config_differences

    partial = partial_dir(Path(cfg.out).expanduser())
    try:
        saved = json.loads((partial / "sft_config.json").read_text())
        inputs = json.loads((partial / "data.json").read_text())
    except FileNotFoundError:
        return None
    differs = config_differences(saved, cfg, ignore=RESUME_IGNORES)
    if inputs.get("sha256") != data_sha256:
        differs.append("the traces' bytes")
    if inputs.get("deepspeed_sha256") != deepspeed_sha256:
        differs.append("the DeepSpeed config's bytes")
    return ", ".join(differs) or None


def run_sft(cfg: SFTConfig, *, show_progress: bool = True) -> Path:
    """Run the SFT job of ``cfg``: validate everything before any compute (the output directory,
    the traces, the device, the model, the lengths), train, and write the model, tokenizer,
    ``sft_config.json`` and ``sft_report.json`` into ``cfg.out`` only when all of it is written.

    The work in progress lives beside ``cfg.out`` in ``.<name>.partial``: its config, the traces'
    SHA-256 and, every ``checkpoint_every`` steps, a checkpoint. A job that fails or is killed
    keeps it, and the same job run again resumes from the last checkpoint and ends exactly where
    an uninterrupted one would; run with another config (other than :data:`RESUME_IGNORES`) or
    other traces, it is refused, naming what differs, until that directory is removed. The
    finished model is staged in it and renamed to ``cfg.out``; then it is removed.

    With ``engine: deepspeed`` every rank of the launch runs this (``deepspeed --module l2t_core.cli
    sft ...``): each validates the same inputs, trains its share of every batch, and takes part in
    the checkpoints; rank 0 writes the files, so ``out`` must be on a filesystem every rank sees (a
    shared one across nodes). A job resumes only on the number of ranks it was saved with."""
    import shutil

    from .engines.gather import weights_to_save
    from .engines.ranks import on_rank_0
    from .models import (activation_checkpointing, check_activation_checkpointing, load_policy, ranks_model_source,
                         resolve_device)

    out = Path(cfg.out).expanduser()
    partial = partial_dir(out)
    if out.exists():
        if (out / "sft_report.json").is_file() and partial.exists():  # finished, stopped before cleaning up
            shutil.rmtree(partial, ignore_errors=True)
        raise FileExistsError(f"SFT output {out} already exists; choose another out or remove it (a finished "
                              "SFT model is never overwritten)")
    path = sft_data_path(cfg.data)
    data_sha256 = file_sha256(path)  # of the bytes read next
    rows = read_sft_jsonl(path)
    if cfg.eval_size >= len(rows):
        raise SFTDataError(f"eval_size={cfg.eval_size} holds out every one of the {len(rows)} traces in {path}; "
                           "keep some for training")
    ds_sha256 = deepspeed_config_sha256(cfg)
    differs = stale_partial(cfg, data_sha256, ds_sha256)
    if differs:
        raise SFTResumeError(f"{partial} holds an unfinished SFT into {out} with another configuration or traces "
                             f"(differs in: {differs}); rerun it with the same configuration and traces to resume "
                             "it, or remove that directory to start over")
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as exc:
        raise SFTError(f"device: {exc}") from None
    rank, world = 0, 1
    if cfg.engine == "deepspeed":  # join the launch's process group before reading the rank
        from .engines.deepspeed_engine import init_distributed

        rank, world = init_distributed(cfg.dist_timeout_minutes)
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    checkpoint = _last_checkpoint(partial)
    resume = _load_state(checkpoint) if checkpoint is not None else None
    if resume is not None and resume.world != world:
        raise SFTResumeError(f"{partial} holds an unfinished SFT saved by {resume.world} rank(s) and this launch has "
                             f"{world}: DeepSpeed saved its optimizer state in {resume.world} partitions; launch it on "
                             f"{resume.world} rank(s) again, or remove that directory to start over")
    # the DeepSpeed engine moves the policy to this rank's device in its training dtype (ZeRO-3: partitions it)
    # a hub revision: the one commit rank 0 finds it to be, on every rank
    source = checkpoint or ranks_model_source(cfg.model, cfg.model_revision, main)
    model, tok = load_policy(source, device="cpu" if cfg.engine == "deepspeed" else str(device))
    if cfg.gradient_checkpointing:
        try:
            check_activation_checkpointing(model)
        except ValueError as exc:
            raise SFTError(str(exc)) from None
    max_tokens = cfg.max_tokens or getattr(model.config, "max_position_embeddings", None) or 2 ** 31
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    held = sorted(order[:cfg.eval_size])
    train_rows = [rows[i] for i in sorted(order[cfg.eval_size:])]
    eval_rows = [rows[i] for i in held]
    trained_prompts = {r.prompt for r in train_rows}
    shared = sum(r.prompt in trained_prompts for r in eval_rows)
    if shared and main:
        log.warning("%d of the %d held-out traces share their prompt with a training trace (other responses to the "
                    "same problem): the evaluation loss measures those prompts as seen in training", shared,
                    len(eval_rows))
    enc = _encode_rows(tok, train_rows, max_tokens, path)
    enc_eval = _encode_rows(tok, eval_rows, max_tokens, path)
    checks = check_traces(rows, cfg.max_episodes, cfg.check_answers)
    untagged = len(rows) - checks["segmentation"].get("tagged", 0)
    if untagged and main:
        log.warning("%d of %d traces do not segment as <episode_k> blocks (%s): a policy trained on them does "
                    "not write the episodes L2T credits (METHOD.md §1, §8)", untagged, len(rows),
                    checks["segmentation"])
    if checks["answers"]["checked"] > checks["answers"]["correct"] and main:
        log.warning("%d of %d traces with an answer end in another answer (first: %s): the model learns them too",
                    checks["answers"]["checked"] - checks["answers"]["correct"], checks["answers"]["checked"],
                    ", ".join(checks["answers"]["wrong_ids"][:5]))
    def record_job() -> None:
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomic(partial / "sft_config.json", cfg.model_dump_json(indent=1))
        write_json_atomic(partial / "data.json", {"path": str(path), "sha256": data_sha256,
                                                  "deepspeed_sha256": ds_sha256}, indent=None)

    on_rank_0(main, record_job, f"write the job's config into {partial}")
    n_params = sum(p.numel() for p in model.parameters())
    resumed_after = resume.step if resume else None
    where = f"{world} DeepSpeed rank(s)" if cfg.engine == "deepspeed" else str(device)
    if main:
        log.info("SFT of %s (%.1fM parameters, %s): %d traces (%d held out), %d steps of %d%s", cfg.model,
                 n_params / 1e6, where, len(train_rows), len(eval_rows), cfg.steps, cfg.batch_size,
                 f", resuming after step {resumed_after} from {checkpoint}" if resume else "")
    saved_step = [resumed_after]

    def save(state: SFTState, engine: "TrainEngine") -> None:
        _save_checkpoint(partial, model, tok, state, engine)
        saved_step[0] = state.step

    try:
        with activation_checkpointing(model, cfg.gradient_checkpointing):
            res = sft_encoded(model, enc, pad_id=padding_token(tok), eval_examples=enc_eval, steps=cfg.steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, warmup_frac=cfg.warmup_frac,
                              min_lr_frac=cfg.min_lr_frac, weight_decay=cfg.weight_decay, eval_every=cfg.eval_every,
                              seed=cfg.seed, micro_batch_size=cfg.micro_batch_size, precision=cfg.precision,
                              engine=cfg.engine, deepspeed_config=cfg.deepspeed_config,
                              checkpoint_every=cfg.checkpoint_every, on_checkpoint=save, resume=resume,
                              resume_from=checkpoint, show_progress=show_progress)
    except BaseException:
        log.error("SFT stopped; %s is kept: run the same job again to resume %s", partial,
                  f"after step {saved_step[0]}" if saved_step[0] else "(no checkpoint yet: from the start)")
        raise
    del resume
    whole = weights_to_save(model, keep=main)  # ZeRO-3: every rank

    def publish() -> None:
        staging = partial / "final"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, state_dict=whole)
        tok.save_pretrained(staging)
        report = {
            "config": json.loads(cfg.model_dump_json()),
            "data": str(path),
            "data_sha256": data_sha256,
            "parameters": n_params,
            "examples": len(train_rows),
            "eval_examples": len(eval_rows),
            "trained_tokens": sum(sum(t) for _, t in enc),
            "max_example_tokens": max(len(ids) for ids, _ in enc),
            **checks,
            "final_loss": res.final_loss,
            "loss_curve": [sum(res.losses[i:i + 10]) / len(res.losses[i:i + 10]) for i in range(0, len(res.losses), 10)],
            "grad_norm_curve": _curve(res.grad_norms),  # before clipping
            "eval_losses": res.eval_losses,
            "resumed_after_step": resumed_after,
            "sft_seconds": res.seconds,  # the training loop's time, earlier sessions of a resumed job included
            "device": str(device) if cfg.engine == "torch" else str(next(model.parameters()).device),
            "engine": cfg.engine,
            "world": world,
            "wall_seconds": time.perf_counter() - t0,  # this session's, loading and checks included
        }
        (staging / "sft_config.json").write_text(cfg.model_dump_json(indent=1))
        (staging / "sft_report.json").write_text(json.dumps(report, indent=1))
        plot_losses(res.losses, res.eval_losses, staging / "loss.png")
        staging.rename(out)
        shutil.rmtree(partial, ignore_errors=True)  # the model is in place: what is left is only work in progress
        log.info("SFT done in %.0f s: loss %.3f%s; model in %s", report["wall_seconds"], res.final_loss,
                 f", evaluation loss {res.eval_losses[-1][1]:.3f}" if res.eval_losses else "", out)

    try:
        on_rank_0(main, publish, "write the finished model")  # the other ranks return once it is in place
    except BaseException:
        log.error("SFT trained but its model was not written; %s is kept: run the same job again to resume %s",
                  partial, f"after step {saved_step[0]}" if saved_step[0] else "(no checkpoint: from the start)")
        raise
    return out
