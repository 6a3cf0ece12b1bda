"""Per-token log-probabilities of response tokens under a causal LM, batched with right padding.

Used by the trainer for log π_θ (with grad) and log π_ref (without); the reward pass gets
log π_old from its own forward (:mod:`~l2t_core.rewards.l2t`)."""

from __future__ import annotations

from typing import Sequence

import torch

from .models import decoder_and_head
from .rollout.base import GREEDY_BELOW


def check_temperature(temperature: float) -> float:
    """``temperature`` if it is a finite number > 0 (log-probs of a distribution at that temperature)."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"log-prob temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def logprob_temperature(mode: str, rollout_temperature: float) -> float:
    """The temperature of the log-probs in the loss (``LossConfig.logprob_temperature``): the
    rollout temperature for ``sampling`` (1 for greedy rollouts, a temperature below
    :data:`~l2t_core.rollout.base.GREEDY_BELOW`), else 1."""
    if mode not in ("sampling", "one"):
        raise ValueError(f"logprob_temperature must be 'sampling' or 'one', got {mode!r}")
    return float(rollout_temperature) if mode == "sampling" and rollout_temperature >= GREEDY_BELOW else 1.0


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device)


def response_mask(prompt_lens: Sequence[int], response_lens: Sequence[int], width: int, device=None) -> torch.Tensor:
    """[B, width] bool: True on the response tokens of each right-padded prompt ⊕ response row."""
    pos = torch.arange(width)[None, :]
    p = torch.as_tensor(list(prompt_lens))[:, None]
    r = torch.as_tensor(list(response_lens))[:, None]
    return ((pos >= p) & (pos < p + r)).to(device)


def scored_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """[N] log softmax(head(h_n) / τ)[target_n] for N rows of hidden states and their next tokens.

    With ``chunk_tokens`` c, the head sees at most c rows at a time, and where autograd records,
    each chunk is checkpointed (non-reentrant): its [c, vocab] logits are freed after the forward
    and recomputed in the backward, so neither pass ever holds the [N, vocab] logits (16,384
    response tokens × a 151,936-token vocabulary are 10 GB in fp32, twice over with the
    log-softmax). The values are the same rows' as without; the head runs twice under autograd."""
    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)

    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"scored_logprobs: chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    if not chunk_tokens or hidden.shape[0] <= chunk_tokens:
        return piece(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled()
    return torch.cat([checkpoint(piece, h, t, use_reentrant=False) if grad else piece(h, t)
                      for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))])


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                   temperature: float = 1.0, chunk_tokens: int | None = None) -> torch.Tensor:
    """[B, W] log π(z_p | z_<p) at positions where ``score_mask`` is True, 0 elsewhere; with
    ``temperature`` τ, of the sampling distribution softmax(logits / τ).

    Only the hidden states of scored positions go through the output head, so the [B, W, vocab]
    logits tensor is never built; with ``chunk_tokens``, not even the scored positions' at once
    (:func:`scored_logprobs`)."""
    check_temperature(temperature)
    if score_mask[:, 0].any():
        raise ValueError("token_logprobs: position 0 cannot be scored (it has no context)")
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    pred = score_mask[:, 1:]
    lp = scored_logprobs(head, hidden[:, :-1][pred], input_ids[:, 1:][pred], temperature, chunk_tokens)
    out = torch.zeros(input_ids.shape, dtype=lp.dtype, device=lp.device)
    out[:, 1:][pred] = lp  # functional on autograd: index_put on a fresh tensor
    return out
