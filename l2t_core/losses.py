"""Clipped policy-gradient loss with a k3 KL to the frozen reference (METHOD.md §5, §4.3 of the
paper). Inputs are [B, T] token tensors with a 0/1 ``mask`` of the response tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref − logπ) − (ref − logπ) − 1, an unbiased, non-negative KL estimator (§5)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str = "token_mean") -> torch.Tensor:
    """``token_mean``: mean over all response tokens of the batch. ``seq_mean``: mean over
    sequences of per-sequence token means (GRPO's original) (METHOD.md §5)."""
    m = mask.to(values.dtype)
    if how == "token_mean":
        return (values * m).sum() / m.sum().clamp(min=1.0)
    if how == "seq_mean":
        per_seq = (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        has = (m.sum(-1) > 0).to(values.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1.0)
    raise ValueError(f"loss aggregation must be 'token_mean' or 'seq_mean', got {how!r}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.001,
    aggregation: str = "token_mean",
) -> LossOutput:
    """ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A) + κ·k3, ρ = exp(logπ_θ − logπ_old) (METHOD.md §5)."""
    shapes = {t.shape for t in (logp, old_logp, advantages, mask)}
    if ref_logp is not None:
        shapes.add(ref_logp.shape)
    if len(shapes) != 1:
        raise ValueError(f"policy_loss: token tensors must share one shape, got {sorted(map(tuple, shapes))}")
    m = mask.bool()
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)) + (
        (("ref_logp", ref_logp),) if ref_logp is not None else ()
    ):
        if not torch.isfinite(t[m]).all():
            raise ValueError(f"policy_loss: {name} has NaN/inf on response tokens; refusing to step on them")
    # padding is ignored whatever it holds: neutral values there (ratio 1, k3 0, A 0), since the
    # aggregation's 0 · NaN or 0 · inf would be NaN (torch.where passes no gradient to padding)
    logp = torch.where(m, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    old_logp = torch.where(m, old_logp, logp.detach())
    advantages = torch.where(m, advantages, torch.zeros((), dtype=advantages.dtype, device=advantages.device))
    if ref_logp is not None:
        ref_logp = torch.where(m, ref_logp, logp.detach())
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    pg = -surrogate
    kl = k3_kl(logp, ref_logp) if (ref_logp is not None and kl_coef > 0) else torch.zeros_like(logp)
    token_loss = pg + kl_coef * kl
    loss = aggregate(token_loss, mask, aggregation)
    with torch.no_grad():
        was_clipped = ((ratio * advantages) > (clipped * advantages)).to(logp.dtype)
        stats = dict(
            pg_loss=aggregate(pg, mask, aggregation),
            kl=aggregate(kl, mask, "token_mean"),
            clip_frac=aggregate(was_clipped, mask, "token_mean"),
            ratio_mean=aggregate(ratio, mask, "token_mean"),
        )
    return LossOutput(loss=loss, **stats)
