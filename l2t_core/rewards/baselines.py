"""Baseline rewards (METHOD.md §6): the length penalty of Arora & Zanette (2025) and MRT's
progress reward (Qu et al. 2025). Outcome-only GRPO is :func:`l2t_core.advantages.grpo_advantages`."""

from __future__ import annotations

import torch


def length_penalty_rewards(
    correct: torch.Tensor, lengths: torch.Tensor, group_ids: torch.Tensor, alpha_lp: float = 0.1, eps: float = 1e-6
) -> torch.Tensor:
    """r = 1[correct] · (1 − α_lp · σ((len − μ_c)/σ_c)) per group (METHOD.md §6).

    μ_c, σ_c are the mean and population std of the correct responses' lengths in the group; with
    fewer than 2 correct responses the penalty term is 0. Incorrect responses get 0.
    """
    c = correct.bool()
    ln = lengths.double()
    out = c.double().clone()
    for g in torch.unique(group_ids):
        in_g = group_ids == g
        sel = in_g & c
        if int(sel.sum()) < 2:
            continue
        mu = ln[sel].mean()
        sd = ln[sel].std(unbiased=False)
        z = (ln[sel] - mu) / (sd + eps)
        out[sel] = 1.0 - alpha_lp * torch.sigmoid(z)
    return out


def mrt_reward(r_out: float, j_mc: torch.Tensor, alpha_mrt: float = 1.0) -> float:
    """r = r_out + α_mrt · Σ_k [J_mc(s_k ⊕ z_k) − J_mc(s_k)] (METHOD.md §6).

    ``j_mc`` holds the Monte-Carlo J at b_0..b_K; the progress sum telescopes to J_K − J_0.
    """
    if j_mc.numel() < 2:
        return float(r_out)
    progress = (j_mc[1:] - j_mc[:-1]).sum()
    return float(r_out + alpha_mrt * progress)
