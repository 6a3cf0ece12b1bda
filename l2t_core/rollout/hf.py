"""The ``hf`` rollout engine: transformers ``generate`` with a KV cache, batched, left-padded.

It samples from the trainer's own module, so :meth:`HFRolloutEngine.sync_weights` has nothing to
copy. Sampling is seeded per call (``SamplingParams.seed``) inside a forked RNG, so a resumed run
draws exactly the completions an uninterrupted one would, and the caller's RNG is untouched.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import Completion, RolloutEngine, SamplingParams, check_prompts


class HFRolloutEngine(RolloutEngine):
    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch_sequences: int = 256, max_prompt_tokens: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("HFRolloutEngine: the tokenizer has no eos token; generation could never stop")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_sequences = max(1, int(max_batch_sequences))
        self.max_prompt_tokens = max_prompt_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same process, same module: nothing to copy

    def _left_pad(self, prompts: Sequence[Sequence[int]], device):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            att[i, width - len(p):] = 1
        return ids.to(device), att.to(device), width

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompts, self.max_prompt_tokens)
        device = next(self.model.parameters()).device
        eos = self.tokenizer.eos_token_id
        per_chunk = max(1, self.max_batch_sequences // params.n)
        sample = params.temperature > 0
        kw = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) if sample else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        out: list[list[Completion]] = []
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(params.seed)
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start: start + per_chunk]
                ids, att, width = self._left_pad(chunk, device)
                gen = self.model.generate(
                    input_ids=ids, attention_mask=att, max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n, pad_token_id=self.pad_id, eos_token_id=eos, **kw,
                )
                rows = gen[:, width:].tolist()
                for i, p in enumerate(chunk):
                    group = []
                    for row in rows[i * params.n:(i + 1) * params.n]:
                        finished = eos in row
                        if finished:
                            row = row[: row.index(eos)]
                        else:  # ran to max_new_tokens; drop right padding if any
                            while row and row[-1] == self.pad_id and self.pad_id != eos:
                                row.pop()
                        text = self.tokenizer.decode(row, skip_special_tokens=True)
                        group.append(Completion(list(p), row, text, finished))
                    out.append(group)
        if was_training:
            self.model.train()
        return out
