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
from typing import Literal, Sequence

import numpy as np
import torch

from .. import advantages as adv
from ..config import RewardConfig
from ..episodes import Segmentation, TokenEpisodes, segment, token_episode_ids
from ..logprobs import pad_right, response_mask, token_logprobs
from ..prompts import FORCE_ANSWER_SUFFIX, render_answer
from ..verify import MathVerifier, Verifier
from . import compression as comp
from .baselines import length_penalty_rewards, mrt_reward
from .fitting import JItem, answer_logprobs_packed, fitting_gains, microbatches, monte_carlo_j

Method = Literal["grpo", "length_penalty", "mrt", "l2t", "l2t_no_penalty", "l2t_random_layers"]
METHODS: tuple[str, ...] = ("grpo", "length_penalty", "mrt", "l2t", "l2t_no_penalty", "l2t_random_layers")


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    reference: str
    group_id: int


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


@dataclass
class RewardBatch:
    method: str
    responses: list[ResponseReward]
    timings: dict[str, float]


def response_offsets(tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character offsets of ``ids`` in ``text``.

    The tokenizer's offset mapping on the full response is used when re-tokenizing the text gives
    back exactly ``ids`` (METHOD.md §1). Otherwise (sampling can produce a non-canonical token
    sequence) offsets come from the lengths of the decoded prefixes.
    """
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    if list(enc["input_ids"]) == list(ids):
        return [tuple(o) for o in enc["offset_mapping"]]
    out, prev = [], 0
    for t in range(len(ids)):
        cur = len(tokenizer.decode(list(ids[: t + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False))
        cur = min(max(cur, prev), len(text))
        out.append((prev, cur))
        prev = cur
    return out


def episode_sqnorms_and_logps(
    model,
    rollouts: Sequence[Rollout],
    token_eps: Sequence[TokenEpisodes],
    targets: dict[str, torch.nn.Linear],
    proxy: comp.SVDProxy | None,
    pad_id: int,
    max_tokens: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """‖g_k‖² per episode (summed over targets) and log π(z_t) per response token.

    One forward/backward per micro-batch; per-token a_t and δ_t are reduced to episode scores and
    dropped at once, so memory stays at one micro-batch of activations. ``proxy=None`` uses the
    full, un-projected gradients (random_layers ablation).
    """
    device = next(model.parameters()).device
    sq_out: list[torch.Tensor | None] = [None] * len(rollouts)
    lp_out: list[torch.Tensor | None] = [None] * len(rollouts)
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    for batch in microbatches(lengths, max_tokens):
        seqs = [list(rollouts[i].prompt_ids) + list(rollouts[i].response_ids) for i in batch]
        ids, att = pad_right(seqs, pad_id)
        score = torch.zeros_like(ids, dtype=torch.bool)
        seg = torch.full(ids.shape, -1, dtype=torch.long)
        offsets, n_seg = [], 0
        for r, i in enumerate(batch):
            p, t = len(rollouts[i].prompt_ids), len(rollouts[i].response_ids)
            score[r, p : p + t] = True
            seg[r, p : p + t] = torch.as_tensor(token_eps[i].episode_ids) + n_seg
            offsets.append(n_seg)
            n_seg += token_eps[i].num_episodes
        sig = comp.per_token_signals(model, ids.to(device), att.to(device), score.to(device), targets)
        seg_ids = seg[score].to(device)  # scored tokens in (row, position) order, as in sig
        total = torch.zeros(n_seg, dtype=torch.float64, device=device)
        for name in targets:
            a, d = sig.inputs[name], sig.deltas[name]
            if proxy is not None:
                g = comp.low_rank_episode_scores(a, d, proxy.bases[name], seg_ids, n_seg)
                total += g.double().pow(2).sum(dim=(1, 2))
            else:
                total += comp.full_episode_sqnorms(a, d, seg_ids, n_seg)
        lp_rows = sig.logprobs.cpu()
        counts = score.sum(dim=1).tolist()
        lp_split = torch.split(lp_rows, counts)
        for r, i in enumerate(batch):
            k = token_eps[i].num_episodes
            sq_out[i] = total[offsets[r] : offsets[r] + k].cpu()
            lp_out[i] = lp_split[r]
    return sq_out, lp_out  # type: ignore[return-value]


@torch.no_grad()
def response_logprobs(model, rollouts: Sequence[Rollout], pad_id: int, max_tokens: int) -> list[torch.Tensor]:
    """log π(z_t) of every response token, micro-batched (no gradient)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(rollouts)
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    for batch in microbatches(lengths, max_tokens):
        rs = [rollouts[i] for i in batch]
        ids, att = pad_right([list(r.prompt_ids) + list(r.response_ids) for r in rs], pad_id, device)
        mask = response_mask([len(r.prompt_ids) for r in rs], [len(r.response_ids) for r in rs], ids.shape[1], device)
        lp = token_logprobs(model, ids, att, mask)
        for j, i in enumerate(batch):
            out[i] = lp[j][mask[j]].cpu()
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
    need_logp_old: bool = True,
) -> RewardBatch:
    """Rewards and advantages for a batch of rollouts under ``method`` (METHOD.md §4, §6).

    ``need_logp_old=False`` (a trainer that makes one update per batch, so π_old is the policy it
    is about to differentiate) skips the extra forward pass of log π_old where no reward needs it:
    the outcome-only methods; the L2T family still gets it from the pass it makes anyway (the
    penalty) or needs it for the surprise weights. ``logp_old`` is then None.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not rollouts:
        raise ValueError("compute_rewards: the batch has no rollouts")
    cfg = cfg or RewardConfig()
    verifier = verifier or MathVerifier()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    segs, teps, outs, statuses = [], [], [], []
    for n, r in enumerate(rollouts):
        if len(r.prompt_ids) == 0:
            raise ValueError(f"rollout {n}: the prompt has no tokens; every rollout needs its prompt ids")
        seg = segment(r.response_text, cfg.segmentation.max_episodes)
        offs = response_offsets(tokenizer, r.response_text, r.response_ids)
        segs.append(seg)
        teps.append(token_episode_ids(seg, offs))
        v = verifier.verify(r.response_text, r.reference)
        outs.append(v.reward)
        statuses.append(v.status)
    timings["segment_verify_s"] = time.perf_counter() - t0
    groups = torch.tensor([r.group_id for r in rollouts])

    # log π_old per token and (for the L2T family) the penalty's episode scores, in one pass
    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    needs_penalty = method in ("l2t", "l2t_random_layers") and cfg.credit.beta > 0
    c = cfg.compression
    surprise = method.startswith("l2t") and cfg.credit.token_weights == "surprise"
    if not needs_penalty:  # no penalty: log π_old from a plain no-grad forward, if anyone needs it
        sqnorms = [torch.zeros(t.num_episodes, dtype=torch.float64) for t in teps]
        if need_logp_old or surprise:
            logps = response_logprobs(model, rollouts, pad_id, cfg.fitting.max_tokens_per_batch)
        else:
            logps = [None] * len(rollouts)
    else:
        if method == "l2t_random_layers":
            targets = comp.resolve_targets(model, comp.random_layer_targets(model, c.random_layer_frac, c.seed))
            proxy_used = None
        else:
            targets = comp.resolve_targets(model, c.targets)
            proxy = proxy or comp.SVDProxy(c.rank_frac, c.rank, c.svd, c.svd_oversample, c.svd_refresh_steps, c.seed)
            proxy.refresh(targets, step)
            proxy_used = proxy
        sqnorms, logps = episode_sqnorms_and_logps(
            model, rollouts, teps, targets, proxy_used, pad_id, cfg.fitting.max_tokens_per_batch
        )
    timings["penalty_s"] = time.perf_counter() - t0

    k_per = [t.num_episodes for t in teps]
    # fitting gain (§2): answer_logprob J for the L2T family; MC J for MRT
    t0 = time.perf_counter()
    force_ids = tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    log_js: list[torch.Tensor] = [torch.zeros(k + 1) for k in k_per]
    if method.startswith("l2t") and cfg.fitting.estimator == "answer_logprob":
        items = []
        for r, te in zip(rollouts, teps):
            ans = tokenizer(render_answer(r.reference), add_special_tokens=False)["input_ids"]
            items.append(JItem(r.prompt_ids, r.response_ids, te.boundaries.tolist(), ans))
        log_js = answer_logprobs_packed(model, items, force_ids, cfg.fitting.max_tokens_per_batch)
    elif method == "mrt" or (method.startswith("l2t") and cfg.fitting.estimator == "monte_carlo"):
        contexts, refs, owner = [], [], []
        for n, (r, te) in enumerate(zip(rollouts, teps)):
            for b in te.boundaries.tolist():
                contexts.append(list(r.prompt_ids) + list(r.response_ids[:b]) + list(force_ids))
                refs.append(r.reference)
                owner.append(n)
        j = monte_carlo_j(
            model, tokenizer, contexts, refs, lambda t, ref: verifier.verify(t, ref).correct,
            samples=cfg.fitting.mc_samples, max_new_tokens=cfg.fitting.mc_max_new_tokens,
            temperature=cfg.fitting.mc_temperature, seed=step,
        )
        owner_t = torch.tensor(owner)
        log_js = [torch.log(j[owner_t == n].clamp(min=0)) for n in range(len(rollouts))]
    timings["fitting_s"] = time.perf_counter() - t0

    # penalties: P_k and the batch normalisation P̂_k
    raw = [comp.penalty(sq, c.adapt_lr, c.damping) if needs_penalty else torch.zeros(k, dtype=torch.float64)
           for sq, k in zip(sqnorms, k_per)]
    flat = torch.cat(raw) if raw else torch.zeros(0, dtype=torch.float64)
    resp_of = torch.repeat_interleave(torch.arange(len(rollouts)), torch.tensor(k_per))
    hat = comp.normalise_penalties(flat, resp_of, len(rollouts), c.penalty_norm) if needs_penalty else flat
    hat_split = torch.split(hat, k_per)

    # credit (§4) and advantages
    cr = cfg.credit
    beta = 0.0 if method == "l2t_no_penalty" else cr.beta
    results = []
    for n, r in enumerate(rollouts):
        k, te = k_per[n], teps[n]
        gains = fitting_gains(log_js[n]) if method.startswith("l2t") else torch.zeros(k)
        process = adv.process_rewards(gains, hat_split[n], beta)
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
            episode_reward=ep_r, logp_old=logps[n], token_reward=tok_r,
        ))

    outcomes = torch.tensor(outs, dtype=torch.float64)
    additive = method.startswith("l2t") and cr.credit == "additive"
    if additive:  # outcome's GRPO advantage + z-scored process reward per episode (project option)
        scores = outcomes
    elif method.startswith("l2t"):
        scores = torch.stack([adv.response_score(x.token_reward, x.episode_reward, cr.score_agg, cr.trim_frac)
                              for x in results])
    elif method == "length_penalty":
        lengths = torch.tensor([len(r.response_ids) for r in rollouts])
        scores = length_penalty_rewards(outcomes, lengths, groups, cfg.baselines.length_penalty_alpha)
    elif method == "mrt":
        scores = torch.tensor([mrt_reward(outs[n], torch.exp(log_js[n]), cfg.baselines.mrt_alpha)
                               for n in range(len(rollouts))], dtype=torch.float64)
    else:
        scores = outcomes
    a = adv.group_advantages(scores, groups, cr.std_eps)
    zs = adv.group_episode_zscores([x.process for x in results], groups, cr.std_eps) if additive else None
    for n, x in enumerate(results):
        x.score, x.advantage = float(scores[n]), float(a[n])
        t = len(rollouts[n].response_ids)
        if additive:
            x.token_advantage = adv.additive_token_advantages(
                a[n], zs[n], torch.as_tensor(x.tokens.episode_ids), cr.process_coef)
        elif method.startswith("l2t"):
            x.token_advantage = adv.token_advantages(a[n], x.token_reward)
        else:  # scalar advantage broadcast to every token (GRPO and the scalar baselines)
            x.token_advantage = torch.full((t,), float(a[n]), dtype=torch.float64)
    return RewardBatch(method=method, responses=results, timings=timings)
