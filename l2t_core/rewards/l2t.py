"""The whole L2T reward path for a batch of rollouts (METHOD.md §1–§4, and §6's baselines).

:func:`compute_rewards` takes rollouts (prompt and response token ids, the response text, the
reference answer and a group id per prompt) and returns, per response, the segmentation, the
outcome, every episode's G_k, P_k, P̂_k, r_k^prg and R_k, the token rewards, the response score,
the group advantage and the per-token advantages. Each step is one of the small functions in
:mod:`~l2t_core.episodes`, :mod:`.fitting`, :mod:`.compression`, :mod:`~l2t_core.advantages`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .. import advantages as adv
from ..config import L2T_FAMILY, METHOD_NAMES, CompressionConfig, MethodName, RewardConfig
from ..episodes import Segmentation, TokenEpisodes, segment, token_episode_ids
from ..logprobs import check_temperature, pad_right, scored_logprobs
from ..prompts import FORCE_ANSWER_SUFFIX, render_answer
from ..verify import MathVerifier, Verifier
from . import compression as comp
from .baselines import length_penalty_rewards, mrt_reward
from .copying import episode_copy_shares
from .oracle import redundancy_labels
from ..engines.gather import lockstep_batches
from ..models import decoder_and_head
from ..prefix_sharing import continuation_logprobs, decoder_hidden, prefix_cache, row_layout, sharing_supported
from ..timing import device_clock
from .fitting import (
    JItem,
    fitting_gains,
    log_j_of_batch,
    microbatches,
    monte_carlo_j,
    pack_item,
    plain_pack,
)

Method = MethodName  # the config's list of methods, one place for both
METHODS: tuple[str, ...] = METHOD_NAMES


def has_fitting_gain(method: str) -> bool:
    """Whether ``method`` computes the fitting gain G_k (METHOD.md §2): the l2t family; the others
    report G_k = 0 for every episode."""
    return method in L2T_FAMILY


def has_penalty(method: str, cfg: RewardConfig) -> bool:
    """Whether ``method`` under ``cfg`` charges the compression penalty (METHOD.md §3): ``l2t`` and
    ``l2t_random_layers`` with β > 0; the other methods report P_k = 0 for every episode."""
    return method in ("l2t", "l2t_random_layers") and cfg.credit.beta > 0


def penalty_targets(model, method: str, c: CompressionConfig) -> dict[str, torch.nn.Linear]:
    """θ of the compression penalty (METHOD.md §3), name → nn.Linear in model order: the §5.3(iii)
    ablation's random blocks for ``l2t_random_layers``, else ``c.targets`` (None: the last block's
    down-projection). Raises on a name the model lacks, so the trainer calls it before any rollout."""
    if method == "l2t_random_layers":
        return comp.resolve_targets(model, comp.random_layer_targets(model, c.random_layer_frac, c.seed))
    return comp.resolve_targets(model, c.targets)


def sampled_j(method: str, cfg: RewardConfig) -> str | None:
    """How ``method`` under ``cfg`` estimates J by sampling (METHOD.md §2): ``"monte_carlo"``
    (sampled forced answers; MRT always), ``"continuation"`` (the policy's own continuations), or
    None where J is teacher-forced (``answer_logprob``) or not computed at all."""
    if method == "mrt":
        return "monte_carlo"
    if method in L2T_FAMILY and cfg.fitting.estimator != "answer_logprob":
        return cfg.fitting.estimator
    return None


def longest_sampled_sequence(method: str, cfg: RewardConfig, max_prompt_tokens: int, max_new_tokens: int,
                             force_len: int) -> int:
    """Tokens of the longest sequence a rollout engine holds in a training step (vLLM's
    ``max_model_len``): a rollout, prompt + response; under the ``monte_carlo`` J (and MRT) also a
    whole response's prefix + the force-answer suffix (``force_len`` tokens) + a forced answer of
    ``mc_max_new_tokens``. The ``continuation`` J stays within a rollout's length: each
    continuation is capped at the response budget its prefix leaves."""
    longest = max_prompt_tokens + max_new_tokens
    if sampled_j(method, cfg) == "monte_carlo":
        longest += force_len + cfg.fitting.mc_max_new_tokens
    return longest


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    reference: str
    group_id: int
    finished: bool = False  # the response ended with EOS (not cut at the token limit)


@dataclass
class ResponseReward:
    """Everything the reward path computed for one response."""

    segmentation: Segmentation
    tokens: TokenEpisodes
    outcome: float
    verdict_status: str
    log_j: torch.Tensor  # [K+1]
    gains: torch.Tensor  # [K]
    penalties: torch.Tensor  # [K] raw P_k
    penalties_hat: torch.Tensor  # [K] normalised P̂_k
    process: torch.Tensor  # [K] r_k^prg
    episode_reward: torch.Tensor  # [K] R_k
    logp_old: torch.Tensor | None  # [T]; None when the caller said it would use the current policy's
    token_reward: torch.Tensor  # [T]
    score: float = 0.0
    advantage: float = 0.0
    token_advantage: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    copies: torch.Tensor | None = None  # [K] copy shares c_k where reward.copying.coef > 0, else None
    labels: torch.Tensor | None = None  # [K] oracle redundancy labels ℓ_k where reward.oracle.coef > 0, else None
    eos_logp_old: float | None = None  # log π_old(EOS | the whole response) of a finished one (eos_id given)


@dataclass
class RewardBatch:
    method: str
    responses: list[ResponseReward]
    timings: dict[str, float]


def response_offsets(tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character offsets of ``ids`` in ``text``.

    The tokenizer's offset mapping on the full response is used when re-tokenizing the text gives
    back exactly ``ids`` (METHOD.md §1). Otherwise (sampling can produce a non-canonical token
    sequence) offsets come from the lengths of the decoded prefixes, computed span by span
    (:func:`span_decode_offsets`) when the decoder concatenates, else by full prefix decoding.
    The rollout engines decode with ``skip_special_tokens=True``: where ``text`` is ``ids`` decoded
    so and not with the special tokens kept, the decoding here skips them too, so a special token
    sampled inside the response is zero-width and the tokens after it keep their own offsets.
    """
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    if list(enc["input_ids"]) == list(ids):
        return [tuple(o) for o in enc["offset_mapping"]]
    skip = _decode_many(tokenizer, [ids], True)[0] == text != _decode_many(tokenizer, [ids])[0]
    # each token decoded alone: exact when the pieces concatenate to the text (no multi-byte
    # character split across tokens); O(T) instead of the O(T²) prefix decoding below
    pieces = _decode_many(tokenizer, [[int(t)] for t in ids], skip)
    if "".join(pieces) == text:
        ends = np.cumsum([len(p) for p in pieces]).tolist()
        return [(e - len(p), e) for p, e in zip(pieces, ends)]
    spans = span_decode_offsets(tokenizer, text, ids, pieces, skip_special_tokens=skip)
    return spans if spans is not None else prefix_decode_offsets(tokenizer, text, ids, skip_special_tokens=skip)


def _decode_many(tokenizer, seqs: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
    """``decode`` of each id sequence, special tokens kept (unless ``skip_special_tokens``) and no
    clean-up. A fast tokenizer decodes them all in one batched call of its Rust backend (the same
    decoder ``decode`` runs, without the per-call Python conversion); others call ``decode`` per
    sequence."""
    seqs = [[int(t) for t in s] for s in seqs]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return list(backend.decode_batch(seqs, skip_special_tokens=skip_special_tokens))
    return [tokenizer.decode(s, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
            for s in seqs]


def _offsets_from_prefix_lengths(lengths: Sequence[int], text_len: int) -> list[tuple[int, int]]:
    """Token t spans [len(decode(ids[:t])), len(decode(ids[:t+1]))), kept monotone and inside the text."""
    out, prev = [], 0
    for cur in lengths:
        cur = min(max(cur, prev), text_len)
        out.append((prev, cur))
        prev = cur
    return out


def prefix_decode_offsets(tokenizer, text: str, ids: Sequence[int], *,
                          skip_special_tokens: bool = False) -> list[tuple[int, int]]:
    """Offsets from the lengths of the decoded prefixes ids[:t+1] (O(T²) characters; the general
    fallback, one batched backend call on a fast tokenizer)."""
    lengths = [len(s) for s in _decode_many(tokenizer, [ids[: t + 1] for t in range(len(ids))], skip_special_tokens)]
    return _offsets_from_prefix_lengths(lengths, len(text))


def span_decode_offsets(tokenizer, text: str, ids: Sequence[int], pieces: Sequence[str], *,
                        skip_special_tokens: bool = False) -> list[tuple[int, int]] | None:
    """The offsets :func:`prefix_decode_offsets` gives, in O(T + Σ run²) instead of O(T²).

    ``pieces`` are the tokens decoded one by one. A token whose piece holds U+FFFD carries part of
    a character split across tokens (a byte-level token); each maximal run of such tokens is
    decoded as one span, and only the prefixes inside a run are decoded. Every other token is its
    own span. When the spans' texts concatenate to ``text`` the decoder is concatenative at span
    boundaries, so each global prefix length is the characters before its span plus the length of
    the prefix inside it. Returns None when they do not (a decoder that adds or strips characters
    between tokens), and the caller falls back to full prefix decoding.
    """
    n = len(ids)
    bad = ["\ufffd" in p for p in pieces]
    spans, i = [], 0  # (start, end) token ranges: a run of split tokens, or one clean token
    while i < n:
        j = i + 1
        while bad[i] and j < n and bad[j]:
            j += 1
        spans.append((i, j))
        i = j
    runs = [(a, b) for a, b in spans if bad[a]]
    decoded = iter(_decode_many(tokenizer, [ids[a : t + 1] for a, b in runs for t in range(a, b)], skip_special_tokens))
    lengths: list[int] = []
    parts: list[str] = []
    pos = 0
    for a, b in spans:
        prefixes = [next(decoded) for _ in range(a, b)] if bad[a] else [pieces[a]]
        lengths += [pos + len(p) for p in prefixes]
        parts.append(prefixes[-1])
        pos += len(prefixes[-1])
    if "".join(parts) != text:
        return None
    return _offsets_from_prefix_lengths(lengths, len(text))


@dataclass
class PolicyPass:
    """What one pass of the policy over a batch of rollouts gives the reward (:func:`episode_pass`)."""

    log_j: list[torch.Tensor] | None  # per response, log J at b_0..b_K (packed layout); None without J
    sqnorms: list[torch.Tensor] | None  # per response, ‖g_k‖² summed over targets; None without penalty
    logps: list[torch.Tensor] | None  # per response, log π(z_t) of every response token
    eos_logps: list[float | None] | None  # per response, log π(EOS | response) if finished; None without eos_id
    penalty_s: float  # seconds of the truncated backward and the episode-score reduction
    total_s: float


def _plain_per_episode(model, rollouts: Sequence[Rollout], local: torch.Tensor, targets, proxy, pad_id: int,
                       device, head_chunk_tokens) -> comp.EpisodeSignals:
    """:func:`~.compression.per_episode_sqnorms` of a micro-batch laid out as prompt ⊕ response
    (no J suffixes). ``local`` [B, L_packed] holds each scored token's episode in the packed layout,
    whose prompt ⊕ response positions come first, so its first L_plain columns serve here too."""
    # right-padded with a [B, L] padding mask: the model's own causal path, flash attention where it has one
    ids, att = pad_right([list(r.prompt_ids) + list(r.response_ids) for r in rollouts], pad_id, device)
    episodes = local[:, : ids.shape[1]].to(device)
    return comp.per_episode_sqnorms(model, ids, att, episodes >= 0, episodes, targets, proxy=proxy,
                                    head_chunk_tokens=head_chunk_tokens)


def episode_pass(
    model,
    rollouts: Sequence[Rollout],
    token_eps: Sequence[TokenEpisodes],
    pad_id: int,
    max_tokens: int,
    *,
    j_items: Sequence[JItem] | None = None,
    force_ids: Sequence[int] | None = None,
    targets: dict[str, torch.nn.Linear] | None = None,
    proxy: comp.SVDProxy | None = None,
    want_logps: bool = True,
    temperature: float = 1.0,
    head_chunk_tokens: int | None = None,
    eos_id: int | None = None,
    attribution: str = "per_episode",
    share_prompts: bool = True,
) -> PolicyPass:
    """ONE forward per micro-batch for everything the reward needs from the policy.

    With ``j_items`` each rollout is laid out as prompt ⊕ response ⊕ (f ⊕ a) × (K+1) with the
    packed mask of :mod:`.fitting`, so log J at every boundary (METHOD.md §2) comes from this
    forward; the response positions see exactly their causal prefix, so log π(z_t) and the
    penalty's per-token signals (§3) read there are those of a plain forward. With ``targets`` a
    truncated backward through the same forward gives ‖g_k‖²: in the rank-r proxy when ``proxy``
    is given, else un-projected (Gram blocks; full_layer mode and the random_layers ablation).
    Per-token a_t and δ_t are reduced to episode scores and dropped per micro-batch. The log π
    returned are at ``temperature`` (the sampling distribution, ``LossConfig.logprob_temperature``);
    J and the penalty's signals are always those of the model at temperature 1. ``head_chunk_tokens``:
    the output head's logits a chunk of tokens at a time (:func:`~l2t_core.logprobs.scored_logprobs`).
    ``eos_id``: wherever log π is returned, also log π(EOS | prompt ⊕ response) of each finished
    rollout, at ``temperature``, from the same forward (the last response position's hidden state;
    for a trainer that trains the EOS token, ``LossConfig.train_eos``).
    ``attribution`` (``CompressionConfig.attribution``): with ``per_episode`` and a target that
    one backward cannot attribute by position (:func:`~.compression.attributed_by_position`), the
    episodes' gradients come from one backward each (:func:`~.compression.per_episode_sqnorms`);
    with ``j_items`` those backwards run over a second forward of prompt ⊕ response alone, shorter
    than the packed layout by its J suffixes, and the packed forward (J, log π) runs without a graph.
    ``share_prompts``: the rollouts of a micro-batch that share a prompt run it once
    (:mod:`l2t_core.prefix_sharing`); not with per-episode backwards, which reach the prompt's
    positions, nor under ZeRO-3 in lockstep, where every rank must make the same forwards.
    """
    check_temperature(temperature)
    t_start = time.perf_counter()
    decoder, head = decoder_and_head(model)
    param = next(model.parameters())
    device = param.device
    if j_items is not None:
        if force_ids is None:
            raise ValueError("episode_pass: j_items need force_ids (the force-answer suffix)")
        packs = []
        for n, item in enumerate(j_items):
            item.validate(f"episode_pass J item {n}")
            packs.append(pack_item(item, force_ids))
    else:
        packs = [plain_pack(r.prompt_ids, r.response_ids) for r in rollouts]
    n_items = len(rollouts)
    log_j: list[torch.Tensor | None] = [None] * n_items
    sq_out: list[torch.Tensor | None] = [None] * n_items
    lp_out: list[torch.Tensor | None] = [None] * n_items
    want_eos = eos_id is not None and (want_logps or bool(targets))
    eos_out: list[float | None] = [None] * n_items
    penalty_s = 0.0
    if attribution not in ("per_episode", "single_backward"):
        raise ValueError(f"episode_pass: attribution must be 'per_episode' or 'single_backward', got {attribution!r}")
    per_episode = bool(targets) and attribution == "per_episode" and not comp.attributed_by_position(model, targets)
    share = share_prompts and not per_episode and sharing_supported(model)
    # under ZeRO-3 with several ranks every rank runs as many forwards (and truncated backwards) as
    # the busiest one; a dummy's results are dropped
    for batch, keep in lockstep_batches(microbatches([len(p.input_ids) for p in packs], max_tokens),
                                        model.parameters()):
        bp = [packs[i] for i in batch]
        # column j of row r is position starts[r] + j of its pack (0 unless the prompt is shared)
        lay = row_layout(bp, [len(rollouts[i].prompt_ids) for i in batch], pad_id, param.dtype, share).to(device)
        starts = lay.start.tolist()
        ids, pos, mask = lay.input_ids, lay.position_ids, lay.attention_mask
        length = ids.shape[1]
        score = torch.zeros(len(bp), length, dtype=torch.bool)
        local = torch.full((len(bp), length), -1, dtype=torch.long)  # episode within its response
        offsets, n_seg = [], 0
        for r, i in enumerate(batch):
            p, t = len(rollouts[i].prompt_ids) - starts[r], len(rollouts[i].response_ids)
            score[r, p : p + t] = True
            local[r, p : p + t] = torch.as_tensor(token_eps[i].episode_ids)
            offsets.append(n_seg)
            n_seg += token_eps[i].num_episodes
        score_d = score.to(device)
        return_hidden = j_items is not None or temperature != 1.0 or want_eos

        def packed_hidden() -> torch.Tensor:  # the packed forward without a graph
            with torch.no_grad():
                return decoder_hidden(decoder, lay)

        if per_episode:  # implies targets
            if j_items is not None:
                # the K backwards run over prompt ⊕ response alone, not over the J suffixes the packed
                # layout appends ((K+1)·|f ⊕ a| more positions, a third of a walk row; their cotangent
                # is zero): one more forward, of the plain layout, for K shorter backwards. Every
                # micro-batch takes this path, so ZeRO-3 ranks issue the same forwards
                t0 = device_clock(device)
                sig = _plain_per_episode(model, [rollouts[i] for i in batch], local, targets, proxy, pad_id, device,
                                         head_chunk_tokens)
                penalty_s += device_clock(device) - t0
                sig.hidden = packed_hidden()
            else:
                sig = comp.per_episode_sqnorms(model, ids, mask, score_d, local.to(device), targets, proxy=proxy,
                                               position_ids=pos, return_hidden=return_hidden,
                                               head_chunk_tokens=head_chunk_tokens)
                penalty_s += sig.backward_s
            rows = sig.sqnorms.cpu()
            total = torch.cat([rows[r, : token_eps[i].num_episodes] for r, i in enumerate(batch)])
        elif targets:
            sig = comp.per_token_signals(model, ids, mask, score_d, targets, position_ids=pos,
                                         return_hidden=return_hidden, head_chunk_tokens=head_chunk_tokens,
                                         cache=prefix_cache(decoder, lay))
            t0 = device_clock(device)
            seg_ids = (local + torch.as_tensor(offsets)[:, None])[score].to(device)  # (row, position) order, as in sig
            total = comp.episode_sqnorms(sig, seg_ids, n_seg, proxy).cpu()
            penalty_s += sig.backward_s + device_clock(device) - t0
        if targets:
            hidden, lp_rows = sig.hidden, sig.logprobs.cpu()
            if temperature != 1.0:  # the penalty's log π is at 1; the loss's at the sampling temperature
                with torch.no_grad():
                    lp_rows = _scored_logprobs(head, hidden, ids, score_d, temperature, head_chunk_tokens).cpu()
            for r, i in enumerate(batch if keep else []):
                sq_out[i] = total[offsets[r] : offsets[r] + token_eps[i].num_episodes]
        else:
            hidden = packed_hidden()
            lp_rows = None
            if want_logps:
                with torch.no_grad():
                    lp_rows = _scored_logprobs(head, hidden, ids, score_d, temperature, head_chunk_tokens).cpu()
        # one head call per micro-batch, a dummy's too (under ZeRO-3 each call is a collective)
        batch_j = log_j_of_batch(head, hidden, bp, starts) if j_items is not None else None
        eos_rows = None
        if want_eos:  # one head call per micro-batch too
            last = [len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids) - 1 - s for i, s in zip(batch, starts)]
            with torch.no_grad():
                h = hidden[torch.arange(len(batch), device=device), torch.tensor(last, device=device)]
                eos_rows = scored_logprobs(head, h, torch.full((len(batch),), eos_id, device=device), temperature,
                                           head_chunk_tokens).cpu()
        if not keep:
            continue
        if eos_rows is not None:
            for i, v in zip(batch, eos_rows.tolist()):
                eos_out[i] = v if rollouts[i].finished else None
        if lp_rows is not None:
            for i, lp in zip(batch, torch.split(lp_rows, score.sum(dim=1).tolist())):
                lp_out[i] = lp
        if batch_j is not None:
            for i, lj in zip(batch, batch_j):
                log_j[i] = lj
    return PolicyPass(
        log_j=log_j if j_items is not None else None,  # type: ignore[arg-type]
        sqnorms=sq_out if targets else None,  # type: ignore[arg-type]
        logps=lp_out if (want_logps or targets) else None,  # type: ignore[arg-type]
        eos_logps=eos_out if want_eos else None,
        penalty_s=penalty_s,
        total_s=time.perf_counter() - t_start,
    )


def _scored_logprobs(head, hidden: torch.Tensor, ids: torch.Tensor, score: torch.Tensor, temperature: float,
                     chunk_tokens: int | None = None) -> torch.Tensor:
    """log softmax(head(h_{p-1}) / τ)[z_p] at the scored positions p, in (row, position) order."""
    pred = score[:, 1:]
    return scored_logprobs(head, hidden[:, :-1][pred], ids[:, 1:][pred], temperature, chunk_tokens)


@torch.no_grad()
def response_logprobs(model, rollouts: Sequence[Rollout], pad_id: int, max_tokens: int,
                      temperature: float = 1.0, share_prompts: bool = True) -> list[torch.Tensor]:
    """log π(z_t) of every response token at ``temperature``, micro-batched (no gradient), the
    rollouts of a micro-batch that share a prompt running it once with ``share_prompts``
    (:mod:`l2t_core.prefix_sharing`; not under ZeRO-3 in lockstep, where every rank must make the
    same forwards)."""
    out: list[torch.Tensor | None] = [None] * len(rollouts)
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    for batch, keep in lockstep_batches(microbatches(lengths, max_tokens), model.parameters()):  # ZeRO-3: in step
        rs = [rollouts[i] for i in batch]
        lps = continuation_logprobs(model, [r.prompt_ids for r in rs], [r.response_ids for r in rs], pad_id,
                                    temperature=temperature, share=share_prompts)
        for lp, i in zip(lps, batch if keep else []):
            out[i] = lp.cpu()
    return out  # type: ignore[return-value]


def compute_rewards(
    model,
    tokenizer,
    rollouts: Sequence[Rollout],
    method: str = "l2t",
    cfg: RewardConfig | None = None,
    *,
    verifier: Verifier | None = None,
    proxy: comp.SVDProxy | None = None,
    step: int = 0,
    sample_seed: int | None = None,
    need_logp_old: bool = True,
    temperature: float = 1.0,
    all_sum: Callable[[list[float]], list[float]] | None = None,
    sampler=None,
    head_chunk_tokens: int | None = None,
    eos_id: int | None = None,
    share_prompts: bool = True,
    verify_pool=None,
) -> RewardBatch:
    """Rewards and advantages for a batch of rollouts under ``method`` (METHOD.md §4, §6).

    ``need_logp_old=False`` (a trainer that makes one update per batch, so π_old is the policy it
    is about to differentiate) skips the extra forward pass of log π_old where no reward needs it:
    the outcome-only methods; the L2T family still gets it from the pass it makes anyway (the
    penalty) or needs it for the surprise weights. ``logp_old`` is then None. ``temperature``: that of
    log π_old (and so of the surprise weights), the rollout temperature when the loss uses it
    (``LossConfig.logprob_temperature``, :func:`~l2t_core.logprobs.logprob_temperature`).
    ``all_sum``: in a multi-rank step (each rank scores its share of the batch), a function summing
    a list of numbers over the ranks; the penalty's batch normalisation then covers the whole step.
    ``sampler``: a rollout engine holding the same policy; the sampled estimators of J
    (``continuation``, ``monte_carlo`` and MRT's) sample through it (vLLM reuses the prefixes it
    has cached) instead of an ``hf`` engine over ``model``. ``head_chunk_tokens``: the policy pass
    computes the output head's logits a chunk of tokens at a time (``TrainConfig.head_chunk_tokens``).
    ``eos_id``: with ``logp_old``, each finished rollout's ``eos_logp_old`` too (``LossConfig.train_eos``).
    ``sample_seed``: the seed of J's sampled continuations (default ``step``; each rank of a
    multi-rank run passes its own, so that the ranks' samples draw on different random streams).
    ``share_prompts``: the policy pass runs each distinct prompt of a micro-batch once
    (:mod:`l2t_core.prefix_sharing`; ``TrainConfig.share_prompts``). ``verify_pool``: a
    :class:`~l2t_core.verify_pool.VerifierPool` over ``verifier`` that verifies the outcomes in
    worker processes while the policy pass runs (``TrainConfig.verify_workers``); the same verdicts.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not rollouts:
        raise ValueError("compute_rewards: the batch has no rollouts")
    cfg = cfg or RewardConfig()
    if verify_pool is not None:
        if verifier is not None and verifier is not verify_pool.verifier:
            raise ValueError("compute_rewards: verify_pool verifies with its own verifier; pass that one as "
                             "verifier, or none")
        verifier = verify_pool.verifier
    verifier = verifier or MathVerifier()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    segs, teps, outs, statuses = [], [], [], []
    for n, r in enumerate(rollouts):
        if len(r.prompt_ids) == 0:
            raise ValueError(f"rollout {n}: the prompt has no tokens; every rollout needs its prompt ids")
    # with a pool the outcomes are verified in its workers while this process runs the policy pass
    pending = (verify_pool.submit([r.response_text for r in rollouts], [r.reference for r in rollouts])
               if verify_pool is not None else None)
    for r in rollouts:
        seg = segment(r.response_text, cfg.segmentation.max_episodes, cfg.segmentation.numbering)
        offs = response_offsets(tokenizer, r.response_text, r.response_ids)
        segs.append(seg)
        teps.append(token_episode_ids(seg, offs))
        if pending is None:
            v = verifier.verify(r.response_text, r.reference)
            outs.append(v.reward)
            statuses.append(v.status)
    timings["segment_verify_s"] = time.perf_counter() - t0
    groups = torch.tensor([r.group_id for r in rollouts])

    # one pass of the policy (§2, §3): log J at every boundary for the L2T family (packed layout),
    # the penalty's episode scores through a truncated backward of the same forward, log π_old
    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    needs_penalty = has_penalty(method, cfg)
    c = cfg.compression
    surprise = method in L2T_FAMILY and cfg.credit.token_weights == "surprise"
    want_logps = need_logp_old or surprise
    packed_j = method in L2T_FAMILY and cfg.fitting.estimator == "answer_logprob"
    k_per = [t.num_episodes for t in teps]
    force_ids = tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    targets, proxy_used, svd_s = None, None, 0.0
    if needs_penalty:
        targets = penalty_targets(model, method, c)
        if method != "l2t_random_layers" and c.mode == "low_rank":
            proxy = proxy or comp.SVDProxy(c.rank_frac, c.rank, c.svd, c.svd_oversample, c.svd_refresh_steps, c.seed)
            t_svd = device_clock(device)
            proxy.refresh(targets, step)  # the SVD, when due (every svd_refresh_steps)
            svd_s = device_clock(device) - t_svd
            proxy_used = proxy
    items = None
    if packed_j:
        items = []
        for r, te in zip(rollouts, teps):
            ans = tokenizer(render_answer(r.reference), add_special_tokens=False)["input_ids"]
            items.append(JItem(r.prompt_ids, r.response_ids, te.boundaries.tolist(), ans))
    sqnorms = [torch.zeros(k, dtype=torch.float64) for k in k_per]
    logps: list[torch.Tensor | None] = [None] * len(rollouts)
    eos_logps: list[float | None] = [None] * len(rollouts)
    log_js: list[torch.Tensor] = [torch.zeros(k + 1) for k in k_per]
    penalty_s = 0.0
    if needs_penalty or packed_j or want_logps:
        res = episode_pass(model, rollouts, teps, pad_id, cfg.fitting.max_tokens_per_batch, j_items=items,
                           force_ids=force_ids, targets=targets, proxy=proxy_used, want_logps=want_logps,
                           temperature=temperature, head_chunk_tokens=head_chunk_tokens, eos_id=eos_id,
                           attribution=c.attribution, share_prompts=share_prompts)
        sqnorms = res.sqnorms or sqnorms
        logps = res.logps or logps
        eos_logps = res.eos_logps or eos_logps
        log_js = res.log_j or log_js
        penalty_s = res.penalty_s
    penalty_s += svd_s
    sampling = sampled_j(method, cfg)
    if sampling is not None:
        f = cfg.fitting
        continuation = sampling == "continuation"
        contexts, refs, owner, caps = [], [], [], []
        for n, (r, te) in enumerate(zip(rollouts, teps)):
            for b in te.boundaries.tolist():
                contexts.append(list(r.prompt_ids) + list(r.response_ids[:b]) + ([] if continuation else list(force_ids)))
                refs.append(r.reference)
                owner.append(n)
                caps.append(f.continuation_budget - b)
        j = monte_carlo_j(
            model, tokenizer, contexts, refs, lambda t, ref: verifier.verify(t, ref).correct,
            samples=f.mc_samples, max_new_tokens=f.continuation_budget if continuation else f.mc_max_new_tokens,
            temperature=f.mc_temperature, seed=step if sample_seed is None else sample_seed,
            caps=caps if continuation else None,
            batch_contexts=f.continuation_batch if continuation else None,
            engine=sampler, max_batch_tokens=f.max_tokens_per_batch,
        )
        owner_t = torch.tensor(owner)
        log_js = [torch.log(j[owner_t == n].clamp(min=0)) for n in range(len(rollouts))]
    # penalty_s: the proxy's SVD refresh, the truncated backward (or the per-episode backwards and,
    # beside the packed J layout, their own forward) and the episode-score reduction; fitting_s: the
    # rest of the policy pass (the forward, J, log π_old) and any Monte Carlo J
    timings["penalty_s"] = penalty_s
    timings["penalty_svd_s"] = svd_s
    timings["fitting_s"] = device_clock(device) - t0 - penalty_s
    if pending is not None:  # segment_verify_s counts the wait that the policy pass did not cover
        t_wait = time.perf_counter()
        for v in pending.result():
            outs.append(v.reward)
            statuses.append(v.status)
        timings["segment_verify_s"] += time.perf_counter() - t_wait

    # penalties: P_k and the batch normalisation P̂_k
    raw = [comp.penalty(sq, c.adapt_lr, c.damping) if needs_penalty else torch.zeros(k, dtype=torch.float64)
           for sq, k in zip(sqnorms, k_per)]
    flat = torch.cat(raw) if raw else torch.zeros(0, dtype=torch.float64)
    resp_of = torch.repeat_interleave(torch.arange(len(rollouts)), torch.tensor(k_per))
    hat = (comp.normalise_penalties(flat, resp_of, len(rollouts), c.penalty_norm, all_sum, group_of_response=groups)
           if needs_penalty else flat)
    if needs_penalty and c.penalty_clip is not None:
        hat = comp.clip_penalties(hat, resp_of, groups, c.penalty_clip)
    hat_split = torch.split(hat, k_per)

    # credit (§4) and advantages
    cr = cfg.credit
    beta = 0.0 if method == "l2t_no_penalty" else cr.beta
    copy_coef = cfg.copying.coef if method in L2T_FAMILY else 0.0
    label_coef = cfg.oracle.coef if method in L2T_FAMILY else 0.0
    results = []
    for n, r in enumerate(rollouts):
        k, te = k_per[n], teps[n]
        gains = fitting_gains(log_js[n]) if has_fitting_gain(method) else torch.zeros(k)
        copies = (episode_copy_shares(r.prompt_ids, r.response_ids, te.episode_ids, k, cfg.copying.ngram)
                  if copy_coef else None)
        labels = (redundancy_labels([e.text for e in segs[n].episodes], cfg.oracle.task, cfg.oracle.hard_check_bonus)
                  if label_coef else None)
        process = adv.process_rewards(gains, hat_split[n], beta, cr.penalty_on, copies, copy_coef, labels, label_coef)
        ep_r = adv.episode_rewards(outs[n], process, cr.alpha)
        ids = torch.as_tensor(te.episode_ids)
        if surprise:  # the L2T family spreads R_k by surprise; the other methods use no token credit
            w = adv.surprise_weights(logps[n], ids, k, cr.surprise_floor)
        else:
            w = adv.uniform_weights(ids, k)
        tok_r = adv.token_rewards(ep_r, w, ids) if k else torch.zeros(0, dtype=torch.float64)
        results.append(ResponseReward(
            segmentation=segs[n], tokens=te, outcome=outs[n], verdict_status=statuses[n],
            log_j=log_js[n], gains=gains, penalties=raw[n], penalties_hat=hat_split[n], process=process,
            episode_reward=ep_r, logp_old=logps[n], token_reward=tok_r, eos_logp_old=eos_logps[n], copies=copies,
            labels=labels,
        ))

    outcomes = torch.tensor(outs, dtype=torch.float64)
    lengths = torch.tensor([len(r.response_ids) for r in rollouts])
    additive = method in L2T_FAMILY and cr.credit == "additive"
    if additive:  # outcome's GRPO advantage + z-scored process reward per episode (project option)
        scores = outcomes if cr.additive_outcome == "outcome" else length_penalty_rewards(
            outcomes, lengths, groups, cfg.baselines.length_penalty_alpha)
    elif method in L2T_FAMILY:
        scores = torch.stack([adv.response_score(x.token_reward, x.episode_reward, cr.score_agg, cr.trim_frac)
                              for x in results])
        if cr.process_scope == "correct":  # project option: the process score only ranks correct responses
            scores = adv.correct_scope_scores(outcomes, scores, groups, cr.correct_bonus)
    elif method == "length_penalty":
        scores = length_penalty_rewards(outcomes, lengths, groups, cfg.baselines.length_penalty_alpha)
    elif method == "mrt":
        scores = torch.tensor([mrt_reward(outs[n], torch.exp(log_js[n]), cfg.baselines.mrt_alpha)
                               for n in range(len(rollouts))], dtype=torch.float64)
    else:
        scores = outcomes
    a = adv.group_advantages(scores, groups, cr.std_eps)
    if cr.correct_floor:  # project option: shaping never pushes a correct response down
        a = adv.floor_correct_advantages(a, outcomes)
    zs = adv.group_episode_zscores([x.process for x in results], groups, cr.std_eps) if additive else None
    for n, x in enumerate(results):
        x.score, x.advantage = float(scores[n]), float(a[n])
        t = len(rollouts[n].response_ids)
        if additive:
            x.token_advantage = adv.additive_token_advantages(
                a[n], zs[n], torch.as_tensor(x.tokens.episode_ids), cr.process_coef)
        elif method in L2T_FAMILY and cr.credit == "paper":
            x.token_advantage = adv.token_advantages(a[n], x.token_reward)
        else:  # scalar advantage broadcast to every token (GRPO, the scalar baselines, credit='broadcast')
            x.token_advantage = torch.full((t,), float(a[n]), dtype=torch.float64)
    return RewardBatch(method=method, responses=results, timings=timings)
