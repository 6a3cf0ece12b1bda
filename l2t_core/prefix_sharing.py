"""Prompt sharing: the rows of a micro-batch that share a prompt run it through the decoder once.

A GRPO step samples G responses per prompt, so every pass over the batch (the reward's policy pass,
the reference log-probs) would run each prompt G times. Here the distinct prompts of a micro-batch
(all but their last token: the *prefixes*) go through the decoder once, with a KV cache; the cache
is expanded to the micro-batch's rows, and each row's own tokens (its prompt's last token onward:
the response, and the J suffixes of the packed layout of :mod:`~l2t_core.rewards.fitting`) attend
to it through a 4-D mask that applies the row's visibility rule unchanged. The last prompt token
stays with the row, so the row's first response token is predicted from a position the row holds.

The hidden states at a row's tokens equal those of the unshared forward up to float rounding
(tested against it); the saving is the prompt's share of the tokens times (G − 1) / G, less
whatever the micro-batching splits a group over. ``share=False`` gives the unshared layout itself
(every row from position 0, the mask of :func:`~l2t_core.rewards.fitting.packed_attention_mask`),
used where a backward must reach the prompt's positions (a penalty target that attention follows)
and where every rank must make the same forwards (ZeRO-3 in lockstep: a rank's prefix forward
would be a collective the others do not make).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from .engines.gather import in_lockstep
from .logprobs import check_temperature, pad_right, response_mask, scored_logprobs, token_logprobs
from .models import decoder_and_head, is_checkpointing
from .rewards.fitting import _Packed, plain_pack


@dataclass
class RowLayout:
    """A micro-batch laid out for :func:`decoder_hidden`.

    Column j of row r is position ``start[r] + j`` of the row's pack. With a shared prefix, key
    column c < P of the 4-D mask is slot c of the row's prefix in the cache, and key column P + j
    is the row's column j."""

    input_ids: torch.Tensor  # [B, Lq]
    position_ids: torch.Tensor  # [B, Lq]
    attention_mask: torch.Tensor  # [B, 1, Lq, P + Lq], additive
    start: torch.Tensor  # [B] the pack position of each row's column 0 (0 without sharing)
    prefix_ids: torch.Tensor | None = None  # [U, P] the distinct prefixes, right-padded
    prefix_mask: torch.Tensor | None = None  # [U, P] their padding mask
    prefix_of_row: torch.Tensor | None = None  # [B] which prefix each row continues

    @property
    def shared(self) -> bool:
        return self.prefix_ids is not None

    def to(self, device) -> "RowLayout":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return RowLayout(*(move(getattr(self, f)) for f in
                           ("input_ids", "position_ids", "attention_mask", "start", "prefix_ids", "prefix_mask",
                            "prefix_of_row")))


def shares_any(prefixes: Sequence[Sequence[int]]) -> bool:
    """Whether two rows have the same non-empty prefix (else sharing would only add a forward)."""
    seen: set[tuple[int, ...]] = set()
    for p in prefixes:
        key = tuple(p)
        if key and key in seen:
            return True
        seen.add(key)
    return False


def row_layout(packs: Sequence[_Packed], prompt_lens: Sequence[int], pad_id: int, dtype: torch.dtype,
               share: bool = True) -> RowLayout:
    """Lay out a micro-batch of packs whose first ``prompt_lens[r]`` tokens are row r's prompt.

    Rows whose prompts (but for the last token) are equal share one prefix. Without ``share``, or
    when no two rows share a prompt of more than one token, every row starts at 0 and the mask is
    the packs' own (padding rows see only themselves, so no softmax row is empty)."""
    if len(packs) != len(prompt_lens):
        raise ValueError(f"row_layout: {len(packs)} packs but {len(prompt_lens)} prompt lengths")
    for r, (p, n) in enumerate(zip(packs, prompt_lens)):
        if not 1 <= n <= len(p.input_ids):
            raise ValueError(f"row_layout: row {r} has a prompt of {n} tokens in a pack of {len(p.input_ids)}; "
                             "a prompt needs at least one token and must lie inside its pack")
    starts = [n - 1 for n in prompt_lens] if share else [0] * len(packs)
    keys = [tuple(p.input_ids[:s].tolist()) for p, s in zip(packs, starts)] if share else []
    if share and not shares_any(keys):
        starts, share = [0] * len(packs), False  # no two rows share a prompt: the plain layout
    b = len(packs)
    width = max(len(p.input_ids) - s for p, s in zip(packs, starts))
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    ctx_limit = torch.zeros(b, width, dtype=torch.long)  # in pack positions
    block_start = torch.zeros(b, width, dtype=torch.long)
    q_pos = torch.as_tensor(starts)[:, None] + torch.arange(width)[None, :]  # each column's pack position
    for r, (p, s) in enumerate(zip(packs, starts)):
        m = len(p.input_ids) - s
        ids[r, :m], pos[r, :m] = p.input_ids[s:], p.position_ids[s:]
        ctx_limit[r, :m], block_start[r, :m] = p.ctx_limit[s:], p.block_start[s:]
        block_start[r, m:] = q_pos[r, m:]  # a padding column sees only itself
    prefix_ids = prefix_mask = prefix_of_row = None
    n_prefix = 0
    if share:
        first: dict[tuple[int, ...], int] = {}
        for k in keys:
            if k:
                first.setdefault(k, len(first))
        # a one-token prompt has no prefix: its row sees none of the slots of the prefix it is
        # given (an empty prefix would be a row of padding alone, whose attention has nothing to see)
        prefix_of_row = torch.tensor([first[k] if k else 0 for k in keys], dtype=torch.long)
        n_prefix = max(starts)
        prefix_ids = torch.full((len(first), n_prefix), pad_id, dtype=torch.long)
        prefix_mask = torch.zeros(len(first), n_prefix, dtype=torch.long)
        for k, u in first.items():
            prefix_ids[u, : len(k)] = torch.as_tensor(k, dtype=torch.long)
            prefix_mask[u, : len(k)] = 1
    # the pack position each key column holds (-1: a prefix slot past the row's prefix, never visible)
    slot = torch.arange(n_prefix)[None, :].expand(b, -1)
    kv_prefix = torch.where(slot < torch.as_tensor(starts)[:, None], slot, torch.full_like(slot, -1))
    kv = torch.cat([kv_prefix, q_pos], dim=1)[:, None, :]  # [B, 1, P + Lq]
    q = q_pos[:, :, None]
    visible = (kv >= 0) & ((kv < ctx_limit[:, :, None]) | ((kv >= block_start[:, :, None]) & (kv <= q)))
    mask = torch.zeros(b, 1, width, n_prefix + width, dtype=dtype)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return RowLayout(ids, pos, mask, torch.as_tensor(starts, dtype=torch.long), prefix_ids, prefix_mask,
                     prefix_of_row)


def sharing_supported(model) -> bool:
    """Whether ``model`` can share prompts: not under ZeRO-3 in lockstep (a rank's prefix forward
    would be a collective the other ranks do not make), and its attention applies a 4-D mask after
    a cache exactly as given, so a shared prefix gives the unshared forward's values: every layer
    full attention (a sliding window crops the cache and masks by its own rule: measured wrong
    log-probs on a sliding-window Qwen2) under ``sdpa`` or ``eager`` attention (flash attention
    takes no 4-D mask)."""
    cfg = getattr(model, "config", None)
    if cfg is None or in_lockstep(model.parameters()):
        return False
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in (getattr(cfg, "layer_types", None)
                                                                                         or ())):
        return False
    return getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager")


def cache_kwarg(decoder) -> str:
    """The decoder's keyword for a KV cache: ``cache`` from transformers 5.x's renaming, else
    ``past_key_values``."""
    return _cache_kwarg_of(type(decoder))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(decoder_type: type) -> str:
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


def prefix_cache(decoder, layout: RowLayout, grad: bool = False):
    """The KV cache of the layout's prefixes (one forward of the U distinct prefixes), expanded to
    its B rows; None for an unshared layout. With ``grad`` the prefix forward records a graph, so
    a backward from the rows reaches the prompts' positions (each prefix's gradient summed over
    its rows through the expansion). A cache serves ONE forward: the decoder appends the rows'
    keys and values to it, so a layer that recomputes its forward in the backward (activation
    checkpointing) must not see one."""
    if not layout.shared:
        return None
    with torch.set_grad_enabled(grad):
        out = decoder(input_ids=layout.prefix_ids, attention_mask=layout.prefix_mask, use_cache=True)
    # transformers 5.x names the output's cache ``cache`` (``past_key_values`` before, deprecated)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    if cache is None:
        raise RuntimeError("prompt sharing: the decoder returned no KV cache for the prompts; turn prompt "
                           "sharing off (TrainConfig share_prompts: false; share_prompts=False in the API)")
    cache.reorder_cache(layout.prefix_of_row)  # index_select over the batch: prefix u -> its rows
    return cache


def decoder_hidden(decoder, layout: RowLayout) -> torch.Tensor:
    """Final hidden states [B, Lq, H] at the layout's row columns, the prefixes' included in the
    graph where autograd records."""
    kw = dict(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
              position_ids=layout.position_ids, use_cache=False)
    cache = prefix_cache(decoder, layout, grad=torch.is_grad_enabled())
    if cache is not None:
        kw[cache_kwarg(decoder)] = cache
    return decoder(**kw).last_hidden_state


def continuation_logprobs(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          pad_id: int, *, temperature: float = 1.0, chunk_tokens: int | None = None,
                          share: bool = True) -> list[torch.Tensor]:
    """log π(c_t | prompt ⊕ c_<t) at ``temperature`` of every token of each continuation (one
    tensor per row, on the model's device), from one forward of the micro-batch, the rows that
    share a prompt running it once. Where autograd records, the result carries the graph (the
    trainer's update); ``share`` must then be off under activation checkpointing
    (:func:`prefix_cache`)."""
    check_temperature(temperature)
    if len(prompts) != len(continuations):
        raise ValueError(f"continuation_logprobs: {len(prompts)} prompts but {len(continuations)} continuations")
    if share and is_checkpointing(model) and torch.is_grad_enabled():
        raise ValueError("continuation_logprobs: prompt sharing under activation checkpointing would recompute "
                         "the rows' forward against a cache it already extended; pass share=False")
    if not prompts:
        return []
    decoder, head = decoder_and_head(model)
    param = next(model.parameters())
    share = share and sharing_supported(model)
    if not share or not shares_any([p[:-1] for p in prompts]):  # nothing shared: the plain right-padded
        # forward, the very computation of versions before prompt sharing (share_prompts: false reproduces them)
        ids, att = pad_right([list(p) + list(c) for p, c in zip(prompts, continuations)], pad_id, param.device)
        mask = response_mask([len(p) for p in prompts], [len(c) for c in continuations], ids.shape[1], param.device)
        lp = token_logprobs(model, ids, att, mask, temperature, chunk_tokens)
        return [lp[j][mask[j]] for j in range(len(prompts))]
    packs = [plain_pack(p, c) for p, c in zip(prompts, continuations)]
    lay = row_layout(packs, [len(p) for p in prompts], pad_id, param.dtype, share).to(param.device)
    hidden = decoder_hidden(decoder, lay)
    width = lay.input_ids.shape[1]
    first = torch.as_tensor([len(p) for p in prompts], device=param.device) - lay.start  # first scored column
    n = torch.as_tensor([len(c) for c in continuations], device=param.device)
    col = torch.arange(width, device=param.device)[None, :]
    score = (col >= first[:, None]) & (col < (first + n)[:, None])
    pred = score[:, 1:]
    lp = scored_logprobs(head, hidden[:, :-1][pred], lay.input_ids[:, 1:][pred], temperature, chunk_tokens)
    return list(torch.split(lp, n.tolist()))
