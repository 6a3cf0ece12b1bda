"""The ``hf`` rollout engine: transformers ``generate`` with a KV cache, batched, left-padded.

It samples from the trainer's own module, so :meth:`HFRolloutEngine.sync_weights` has nothing to
copy. Under DeepSpeed ZeRO-3 with several ranks every forward of that module gathers its weights (a
collective), so generation runs in lockstep (:meth:`HFRolloutEngine.lockstep`): ``synced_gpus``
keeps a rank whose sequences have all ended forwarding until every rank's have, and every rank
makes as many ``generate`` calls as the busiest one. (transformers turns ``synced_gpus`` on by
itself only under an ``HfDeepSpeedConfig``, which this project does not create.) Sampling is
seeded per call (``SamplingParams.seed``) inside a forked RNG, so a resumed run draws exactly the
completions an uninterrupted one would, and the caller's RNG is untouched.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig

from ..engines.gather import in_lockstep, lockstep_count
from ..models import eval_mode
from .base import Completion, RolloutEngine, SamplingParams, check_prompts, token_limits


def batch_chunks(order: Sequence[int], lengths: Sequence[int], limits: Sequence[int], reps: int, per_chunk: int,
                 max_tokens: int | None = None) -> list[list[int]]:
    """``order`` (prompt indices, shortest first) cut into the batches of one ``generate`` call each:
    at most ``per_chunk`` prompts (of ``reps`` sequences each), and with ``max_tokens`` at most that
    many KV-cache positions, sequences × (longest prompt + largest new-token limit) of the batch; a
    prompt that alone passes the budget is a batch of its own."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    width = new = 0
    for i in order:
        w, n = max(width, lengths[i]), max(new, limits[i])
        if cur and (len(cur) == per_chunk or (max_tokens is not None and (len(cur) + 1) * reps * (w + n) > max_tokens)):
            chunks.append(cur)
            cur, w, n = [], lengths[i], limits[i]
        cur.append(i)
        width, new = w, n
    if cur:
        chunks.append(cur)
    return chunks


class HFRolloutEngine(RolloutEngine):
    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch_sequences: int = 256, max_prompt_tokens: int | None = None,
                 max_batch_tokens: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("HFRolloutEngine: the tokenizer has no eos token; generation could never stop")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_sequences = max(1, int(max_batch_sequences))
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"HFRolloutEngine: max_batch_tokens must be >= 1 (or None), got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.eos = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same process, same module: nothing to copy

    def lockstep(self) -> bool:
        return in_lockstep(self.model.parameters())

    def _left_pad(self, prompts: Sequence[Sequence[int]], device):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            att[i, width - len(p):] = 1
        return ids.to(device), att.to(device), width

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 limit_prompts: bool = True, max_batch_sequences: int | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        """Batches of at most ``max_batch_sequences`` sequences (the engine's setting when None),
        the prompts taken shortest first and the completions returned in the order given. A batch
        then holds prompts of about one length: its rows pad little and, when the prompts are
        response prefixes (:meth:`continue_from`), tend to end together, where a batch runs until
        its longest row ends. Sampling the continuation J of 64 responses of the concise warm start
        (773 prefixes, 2 samples each, 2 CPU threads) took 55-65 s shortest first in batches of 64
        sequences against 302 s in the order given at 512 a batch (``bench/continuation_j.py``
        times the whole reward this way). With ``max_new_tokens`` per prompt a batch runs to the
        largest limit among its rows and each row is cut at its own. With the engine's
        ``max_batch_tokens`` a batch also ends before its sequences × (its longest prompt + its
        largest limit), the positions its KV cache holds, would pass that budget (a prompt over it
        runs alone): one long context no longer pads a batch of short ones to its length."""
        lockstep = self.lockstep()
        check_prompts(prompts, self.max_prompt_tokens if limit_prompts else None, allow_empty=lockstep)
        limits = token_limits(max_new_tokens, prompts, params)
        device = next(self.model.parameters()).device
        sample = not params.greedy
        # Greedy decoding gives one completion per prompt; it is repeated n times below.
        reps = params.n if sample else 1
        per_chunk = max(1, (max_batch_sequences or self.max_batch_sequences) // reps)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        chunks = batch_chunks(order, [len(p) for p in prompts], limits, reps, per_chunk, self.max_batch_tokens)
        kw = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) if sample else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        # in lockstep: as many calls as the busiest rank, the extra ones a one-token dummy; synced_gpus
        # keeps each call forwarding until every rank's sequences have ended
        dummies = lockstep_count(len(chunks), self.model.parameters()) - len(chunks) if lockstep else 0
        saved_config = getattr(self.model, "generation_config", None)
        # Only the sampling parameters asked for apply: a checkpoint's generation_config.json
        # (repetition_penalty, top_k, ...) would silently change the policy's distribution.
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=self.eos)
        out: list[list[Completion] | None] = [None] * len(prompts)
        try:
            with eval_mode(self.model), torch.random.fork_rng(devices=self._cuda_devices()):
                torch.manual_seed(params.seed)  # seeds the CPU and every CUDA generator
                for chunk in chunks:
                    ids, att, width = self._left_pad([prompts[i] for i in chunk], device)
                    gen = self.model.generate(
                        input_ids=ids, attention_mask=att, max_new_tokens=max(limits[i] for i in chunk),
                        num_return_sequences=reps, pad_token_id=self.pad_id, eos_token_id=self.eos,
                        synced_gpus=lockstep, **kw,
                    )
                    rows = gen[:, width:].tolist()
                    for row, i in enumerate(chunk):
                        p = prompts[i]
                        group = [self._completion(p, r[: limits[i]]) for r in rows[row * reps:(row + 1) * reps]]
                        if not sample:
                            c = group[0]
                            group = [Completion(list(p), list(c.response_ids), c.text, c.finished)
                                     for _ in range(params.n)]
                        out[i] = group
                for _ in range(dummies):  # after the real calls: their samples do not depend on it
                    ids, att, _ = self._left_pad([[self.eos]], device)
                    self.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=1, synced_gpus=True,
                                        pad_token_id=self.pad_id, eos_token_id=self.eos, **kw)
        finally:
            self.model.generation_config = saved_config
        return out  # type: ignore[return-value]

    def _completion(self, prompt: Sequence[int], row: list[int]) -> Completion:
        """One generated row (already cut at its limit): cut at the first eos (after it comes only
        padding). A row without eos ran to its limit and has no padding, since padding follows a
        finished row."""
        finished = self.eos in row
        if finished:
            row = row[: row.index(self.eos)]
        return Completion(list(prompt), row, self.tokenizer.decode(row, skip_special_tokens=True), finished)

    @staticmethod
    def _cuda_devices() -> list[int]:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
