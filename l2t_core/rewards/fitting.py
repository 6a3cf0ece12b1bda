"""Fitting information gain G_k = J(s_k ⊕ z_k) − J(s_k) (METHOD.md §2; Eq. 3, first term).

J(s) is the policy's own probability of the correct answer when forced to answer from context s.

* ``answer_logprob`` (default): ``J(s) = exp(Σ_j log π(a_j | s ⊕ f ⊕ a_<j))``, teacher-forced,
  where f is the force-answer suffix and a the rendered reference answer. All K+1 values of one
  response come from ONE forward pass (:func:`answer_logprobs_packed`): the K+1 copies of f ⊕ a
  are packed after the response, each with a 4-D attention mask row that sees only the response
  prefix [0, b_k) and itself (causally), and position ids that continue from b_k.
  :func:`answer_logprobs_naive` is the per-prefix reference it is tested against.
* ``monte_carlo`` (MRT, the §3.2 analysis): J(s) is the share of m sampled forced answers that the
  verifier accepts (:func:`monte_carlo_j`).
* ``continuation`` (not the paper's; an option): J(s) is the share of m of the policy's own
  continuations of s, sampled without forcing and cut at the response budget, that reach the
  verified answer (:func:`monte_carlo_j` with ``caps``). The forced readouts above answer from
  what the SFT data says usually follows s; on a base whose SFT traces mostly wrote a hard step's
  result wrong and then repaired it, they believe a right result less than a wrong one
  (:func:`l2t_core.episode_credit.guess_trust`). A continuation sees what the policy really does
  next: it ends wrong after an unchecked wrong step unless the policy checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..engines.gather import lockstep_batches
from ..models import decoder_and_head


@dataclass(frozen=True)
class JItem:
    """One response for which J is computed at every context boundary.

    ``boundaries`` are response-token prefix lengths b_0 = 0 ≤ b_1 ≤ … ≤ b_K ≤ len(response_ids):
    J is computed for the contexts prompt ⊕ response[:b_k], k = 0..K (METHOD.md §2, s_1 = x).
    """

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    boundaries: Sequence[int]
    answer_ids: Sequence[int]

    def validate(self, where: str = "JItem") -> None:
        b = list(self.boundaries)
        if not b:
            raise ValueError(f"{where}: boundaries are empty; they need at least b_0 = 0")
        if b[0] != 0 or any(x > y for x, y in zip(b, b[1:])) or b[-1] > len(self.response_ids):
            raise ValueError(
                f"{where}: boundaries {b} must start at 0, be non-decreasing and end at most at the "
                f"response length {len(self.response_ids)}"
            )
        if not self.answer_ids:
            raise ValueError(f"{where}: the reference answer tokenized to nothing; J needs answer tokens")


def _check_force(force_ids: Sequence[int]) -> None:
    if len(force_ids) == 0:
        raise ValueError("the force-answer suffix f tokenized to nothing; J needs a non-empty suffix")


def _answer_logprob_from_hidden(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def answer_logprobs_naive(model, items: Sequence[JItem], force_ids: Sequence[int]) -> list[torch.Tensor]:
    """Reference: log J(s_k) for every boundary, one causal forward pass per prefix. Like the
    packed path, returns CPU tensors whatever the model's device."""
    _check_force(force_ids)
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    out = []
    for n, item in enumerate(items):
        item.validate(f"answer_logprobs_naive item {n}")
        vals = []
        for b in item.boundaries:
            ids = list(item.prompt_ids) + list(item.response_ids[:b]) + list(force_ids) + list(item.answer_ids)
            x = torch.tensor([ids], device=device)
            h = decoder(input_ids=x, use_cache=False).last_hidden_state[0]
            first = len(ids) - len(item.answer_ids)
            lp = _answer_logprob_from_hidden(head, h[first - 1 : len(ids) - 1], x[0, first:])
            vals.append(lp.sum())
        out.append(torch.stack(vals).cpu())
    return out


@dataclass
class _Packed:
    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L]
    ctx_limit: torch.Tensor  # [L] positions kv < ctx_limit[q] are visible to q
    block_start: torch.Tensor  # [L] positions block_start[q] <= kv <= q are visible to q
    pred_pos: torch.Tensor  # [N] positions whose next-token prediction is an answer token
    targets: torch.Tensor  # [N]
    suffix_of: torch.Tensor  # [N] which boundary k each prediction belongs to


def pack_item(item: JItem, force_ids: Sequence[int]) -> _Packed:
    """Lay out prompt ⊕ response ⊕ (f ⊕ a) × (K+1) with its visibility rule (METHOD.md §2)."""
    prompt, resp = list(item.prompt_ids), list(item.response_ids)
    suffix = list(force_ids) + list(item.answer_ids)
    n_p, n_ctx, m, m_f = len(prompt), len(prompt) + len(resp), len(suffix), len(force_ids)
    bounds = torch.as_tensor(list(item.boundaries), dtype=torch.long)
    k1 = len(bounds)
    length = n_ctx + k1 * m
    ids = torch.tensor(prompt + resp + suffix * k1, dtype=torch.long)
    ar = torch.arange(length)
    j = torch.arange(m)
    pos = torch.cat([torch.arange(n_ctx), (n_p + bounds[:, None] + j[None, :]).reshape(-1)])
    block_starts = n_ctx + torch.arange(k1) * m
    ctx_limit = torch.cat([ar[:n_ctx] + 1, (n_p + bounds).repeat_interleave(m)])
    block_start = torch.cat([torch.full((n_ctx,), length), block_starts.repeat_interleave(m)])
    ja = torch.arange(len(item.answer_ids))
    pred_pos = (block_starts[:, None] + m_f - 1 + ja[None, :]).reshape(-1)
    targets = torch.as_tensor(list(item.answer_ids), dtype=torch.long).repeat(k1)
    suffix_of = torch.arange(k1).repeat_interleave(len(item.answer_ids))
    return _Packed(ids, pos, ctx_limit, block_start, pred_pos, targets, suffix_of)


def packed_attention_mask(packs: Sequence[_Packed], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, L, L]: 0 where visible, dtype-min elsewhere. Padding rows see
    only themselves, so no softmax row is empty (no NaN)."""
    b = len(packs)
    ctx_limit = torch.zeros(b, length, dtype=torch.long)
    block_start = torch.arange(length).repeat(b, 1)
    for i, p in enumerate(packs):
        n = len(p.input_ids)
        ctx_limit[i, :n] = p.ctx_limit
        block_start[i, :n] = p.block_start
    q = torch.arange(length)[None, :, None]
    kv = torch.arange(length)[None, None, :]
    visible = (kv < ctx_limit[:, :, None]) | ((kv >= block_start[:, :, None]) & (kv <= q))
    mask = torch.zeros(b, 1, length, length, dtype=dtype)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return mask


def microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy batches (in length order) whose padded size B · max(L) stays within ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def plain_pack(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> _Packed:
    """prompt ⊕ response with a plain causal visibility rule and no answer suffix (no J)."""
    ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long)
    n = len(ids)
    empty = torch.zeros(0, dtype=torch.long)
    return _Packed(ids, torch.arange(n), torch.arange(n) + 1, torch.full((n,), n), empty, empty, empty)


def packed_inputs(packs: Sequence[_Packed], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded input ids and position ids [B, L] of a micro-batch of packs, and L."""
    length = max(len(p.input_ids) for p in packs)
    ids = torch.full((len(packs), length), pad_id, dtype=torch.long)
    pos = torch.zeros(len(packs), length, dtype=torch.long)
    for r, p in enumerate(packs):
        ids[r, : len(p.input_ids)] = p.input_ids
        pos[r, : len(p.input_ids)] = p.position_ids
    return ids, pos, length


def log_j_of_batch(head, hidden: torch.Tensor, packs: Sequence[_Packed],
                   starts: Sequence[int] | None = None) -> list[torch.Tensor]:
    """log J(s_k), k = 0..K, of every pack of a micro-batch from its final hidden states [B, L, H]
    (row r: ``packs[r]``; with ``starts``, column j of row r holds its pack's position
    ``starts[r] + j``, as in :func:`l2t_core.prefix_sharing.row_layout`), on the CPU, no grad,
    through ONE call of the output head: under ZeRO-3 each call gathers the head's weight (a
    collective), so the number of calls must not depend on how many items a rank's micro-batch holds."""
    starts = [0] * len(packs) if starts is None else list(starts)
    with torch.no_grad():
        rows = torch.cat([torch.full((len(p.pred_pos),), r, dtype=torch.long) for r, p in enumerate(packs)])
        pos = torch.cat([p.pred_pos - s for p, s in zip(packs, starts)])
        targets = torch.cat([p.targets for p in packs]).to(hidden.device)
        lp = _answer_logprob_from_hidden(head, hidden[rows.to(hidden.device), pos.to(hidden.device)], targets).cpu()
        out = []
        for p, part in zip(packs, torch.split(lp, [len(p.pred_pos) for p in packs])):
            k1 = int(p.suffix_of.max()) + 1 if len(p.suffix_of) else 0
            out.append(torch.zeros(k1).index_add_(0, p.suffix_of, part))
        return out


@torch.no_grad()
def answer_logprobs_packed(
    model, items: Sequence[JItem], force_ids: Sequence[int], max_tokens_per_batch: int = 32768
) -> list[torch.Tensor]:
    """log J(s_k) for every boundary of every item; one forward pass per item (batched).

    Returns one float32 tensor of length K+1 per item, in input order. (The trainer's reward pass,
    :func:`l2t_core.rewards.l2t.episode_pass`, runs the same layout and also takes the penalty's
    signals from it.)
    """
    _check_force(force_ids)
    decoder, head = decoder_and_head(model)
    param = next(model.parameters())
    packs = []
    for n, item in enumerate(items):
        item.validate(f"answer_logprobs_packed item {n}")
        packs.append(pack_item(item, force_ids))
    results: list[torch.Tensor | None] = [None] * len(items)
    # under ZeRO-3 with several ranks every rank runs as many forwards as the busiest one
    for batch, keep in lockstep_batches(microbatches([len(p.input_ids) for p in packs], max_tokens_per_batch),
                                        model.parameters()):
        bp = [packs[i] for i in batch]
        ids, pos, length = packed_inputs(bp)
        mask = packed_attention_mask(bp, length, param.dtype)
        hidden = decoder(
            input_ids=ids.to(param.device),
            attention_mask=mask.to(param.device),
            position_ids=pos.to(param.device),
            use_cache=False,
        ).last_hidden_state
        log_j = log_j_of_batch(head, hidden, bp)  # a dummy's too: every rank makes the same head calls
        for i, lj in zip(batch if keep else [], log_j):
            results[i] = lj
    return results  # type: ignore[return-value]


def fitting_gains(log_j: torch.Tensor) -> torch.Tensor:
    """G_k = J(s_k ⊕ z_k) − J(s_k) = exp(log J_k) − exp(log J_{k−1}), k = 1..K (Eq. 3).

    ``log_j`` holds log J at b_0..b_K; the result has length K. Non-finite inputs raise.
    """
    if torch.isnan(log_j).any() or (log_j == float("inf")).any():
        raise ValueError(
            f"fitting_gains: log J has NaN/+inf values {log_j.tolist()}; the policy produced "
            "non-finite logits (check the model dtype and weights)"
        )
    j = torch.exp(log_j.double())
    return (j[1:] - j[:-1]).float()


def monte_carlo_j(
    model,
    tokenizer,
    contexts: Sequence[Sequence[int]],
    references: Sequence[str],
    verify: Callable[[str, str], bool],
    *,
    samples: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int | None = None,
    caps: Sequence[int] | None = None,
    batch_contexts: int | None = None,
    engine=None,
    max_batch_tokens: int | None = None,
) -> torch.Tensor:
    """J_mc(s) = share of ``samples`` generations from context s that ``verify`` accepts (§2).

    For the ``monte_carlo`` estimator ``contexts`` end with the force-answer suffix f and the
    generations are forced answers; for ``continuation`` they are response prefixes and the
    generations the policy's own continuations. ``caps`` (one per context, at most
    ``max_new_tokens``) cuts each context's generations to that many tokens before they are
    verified (the response budget left after the prefix; a cap of 0 or less leaves nothing to
    verify, so J = 0). The samples come from a rollout ``engine``
    (:class:`~l2t_core.rollout.base.RolloutEngine`: the trainer's, e.g. vLLM with its prefix
    cache) by :meth:`~l2t_core.rollout.base.RolloutEngine.continue_from`, or, without one, from an
    ``hf`` engine over ``model`` whose generate calls hold at most ``max_batch_tokens`` KV-cache
    positions (:class:`~l2t_core.rollout.hf.HFRolloutEngine`; an engine given keeps its own
    budget); seeded by ``seed``, ``batch_contexts`` contexts a batch where the engine batches by
    call (its own setting when None). Contexts given more than once with the same cap (the prompt,
    s_1, of every response in a group) are sampled once and share their J.
    """
    if len(references) != len(contexts):
        raise ValueError(f"monte_carlo_j: {len(contexts)} contexts but {len(references)} references")
    if caps is not None and len(caps) != len(contexts):
        raise ValueError(f"monte_carlo_j: {len(contexts)} contexts but {len(caps)} caps")
    if caps and max(caps) > max_new_tokens:
        raise ValueError(f"monte_carlo_j: a cap of {max(caps)} tokens exceeds max_new_tokens={max_new_tokens}")
    if engine is None:
        from ..rollout.hf import HFRolloutEngine

        engine = HFRolloutEngine(model, tokenizer, max_batch_tokens=max_batch_tokens)
    # where sampling is a collective (RolloutEngine.lockstep), a rank with nothing to sample still
    # makes the engine's call, so that every rank makes the same calls
    lockstep = engine.lockstep()
    if not contexts and not lockstep:
        return torch.zeros(0)
    first: dict[tuple, int] = {}  # (context, cap, reference) -> the index of its first occurrence
    keys = [(tuple(c), None if caps is None else caps[i], references[i]) for i, c in enumerate(contexts)]
    unique = [first.setdefault(k, i) for i, k in enumerate(keys)]
    # a context without budget left (cap <= 0) has nothing to verify: it is not sampled at all, and
    # the others generate only up to their cap (what would be cut off anyway is never sampled)
    todo = sorted(i for i in set(unique) if caps is None or caps[i] > 0)
    generated = _engine_samples(engine, [contexts[i] for i in todo], samples, max_new_tokens, temperature, seed,
                                batch_contexts, None if caps is None else [caps[i] for i in todo]
                                ) if todo or lockstep else []
    j = torch.zeros(len(contexts))
    for i, rows in zip(todo, generated):  # each context's samples, cut at its cap, verified
        cap = None if caps is None else caps[i]
        hits = [verify(tokenizer.decode(ids[:cap], skip_special_tokens=True), references[i]) for ids in rows]
        j[i] = sum(map(float, hits)) / samples
    return j[torch.tensor(unique, dtype=torch.long)]


def _engine_samples(engine, contexts, samples, max_new_tokens, temperature, seed,
                    batch_contexts, limits=None) -> list[list[list[int]]]:
    """``samples`` generated token ids per context, through a rollout engine; ``limits``: each
    context's own limit on new tokens (at most ``max_new_tokens``)."""
    from ..rollout.base import SamplingParams

    params = SamplingParams(n=samples, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed or 0)
    groups = engine.continue_from(contexts, params,
                                  max_batch_sequences=None if batch_contexts is None else batch_contexts * samples,
                                  max_new_tokens=limits)
    return [[c.response_ids for c in group] for group in groups]
