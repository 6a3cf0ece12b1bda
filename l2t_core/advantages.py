"""Episode reward, token credit and group advantages (METHOD.md §4; Eq. 5; review answer R3Rw).

All functions are pure and work on one response's tensors (or one batch's scores with group ids).
Notation: K episodes, T_i tokens in response i, ``episode_ids[t]`` ∈ [0, K) for each token.
"""

from __future__ import annotations

import math

import torch


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has non-finite values at positions {bad}; rewards must be finite numbers")


def _charge(out: torch.Tensor, name: str, coef: float, values: torch.Tensor | None) -> torch.Tensor:
    """out − coef · values, with ``values`` one finite number per episode (the checks of a process term)."""
    if values is None or values.shape != out.shape:
        raise ValueError(f"a {name} weight of {coef} needs one {name} per episode ({tuple(out.shape)}), got "
                         f"{None if values is None else tuple(values.shape)}")
    _check_finite(f"{name}s", values)
    return out - coef * values.double()


def process_rewards(gains: torch.Tensor, penalties_hat: torch.Tensor, beta: float,
                    penalty_on: str = "all", copies: torch.Tensor | None = None,
                    copy_coef: float = 0.0, labels: torch.Tensor | None = None,
                    label_coef: float = 0.0) -> torch.Tensor:
    """r_k^prg = G_k − β · P̂_k (METHOD.md §4).

    ``penalty_on="no_gain"`` (this project's option, not the paper's) charges the penalty only to
    episodes that did not move J toward the answer: r_k^prg = G_k − β · P̂_k · 1[G_k ≤ 0].
    ``copies`` c_k with ``copy_coef`` γ (this project's option, :mod:`l2t_core.rewards.copying`)
    also charges each episode the share of it that its context already said: − γ · c_k.
    ``labels`` ℓ_k with ``label_coef`` λ (a diagnostic control, :mod:`l2t_core.rewards.oracle`)
    charges each episode the synthetic task's own redundancy label: − λ · ℓ_k.
    """
    _check_finite("fitting gains G_k", gains)
    _check_finite("normalised penalties P̂_k", penalties_hat)
    if penalty_on == "all":
        charged = penalties_hat.double()
    elif penalty_on == "no_gain":
        charged = torch.where(gains <= 0, penalties_hat.double(), torch.zeros((), dtype=torch.float64))
    else:
        raise ValueError(f"penalty_on must be 'all' or 'no_gain', got {penalty_on!r}")
    out = gains.double() - beta * charged
    if copy_coef:
        out = _charge(out, "copy share", copy_coef, copies)
    if label_coef:
        out = _charge(out, "oracle label", label_coef, labels)
    return out


def episode_rewards(r_out: float, process: torch.Tensor, alpha: float) -> torch.Tensor:
    """R_k = r_out / K + α · r_k^prg (METHOD.md §4, Eq. 5)."""
    k = process.numel()
    if k == 0:
        return process.double()
    if not math.isfinite(r_out):
        raise ValueError(f"the outcome reward r_out must be finite, got {r_out}")
    return r_out / k + alpha * process.double()


def surprise_weights(
    logp_old: torch.Tensor, episode_ids: torch.Tensor, num_episodes: int, floor: float = 1e-6
) -> torch.Tensor:
    """w_t = s_t / Σ_{t'∈k} s_{t'} with s_t = max(−log π_old(z_t), floor) (METHOD.md §4).

    The weights of each episode's tokens sum to 1.
    """
    _check_finite("old log-probabilities log π_old(z_t)", logp_old)
    s = torch.clamp(-logp_old.double(), min=floor)
    totals = torch.zeros(num_episodes, dtype=torch.float64).index_add_(0, episode_ids, s)
    return s / totals[episode_ids]


def uniform_weights(episode_ids: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """w_t = 1 / |episode k| (the uniform-credit variant)."""
    counts = torch.bincount(episode_ids, minlength=num_episodes).double()
    return 1.0 / counts[episode_ids]


def token_rewards(episode_reward: torch.Tensor, weights: torch.Tensor, episode_ids: torch.Tensor) -> torch.Tensor:
    """r_t = R_k · w_t for t in episode k (METHOD.md §4)."""
    return episode_reward.double()[episode_ids] * weights.double()


def trimmed_mean(x: torch.Tensor, trim_frac: float = 0.05) -> torch.Tensor:
    """Mean after dropping floor(trim_frac/2 · n) values at each tail (METHOD.md §4: the 95 %
    truncated mean drops 2.5 % at each tail, at least 0 values). Empty input gives 0."""
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64)
    cut = int(math.floor(trim_frac / 2 * n))
    xs = torch.sort(x.double()).values
    return xs[cut : n - cut].mean()


def response_score(
    token_reward: torch.Tensor, episode_reward: torch.Tensor, agg: str = "trimmed_mean", trim_frac: float = 0.05
) -> torch.Tensor:
    """S_i (METHOD.md §4, Decision score_agg).

    ``trimmed_mean``: the 95 % truncated mean of {r_t}. ``sum``: Σ_k R_k = r_out + α Σ_k r_k^prg,
    Eq. 5 as written (taken over episodes, so an episode that owns no token still counts).
    """
    if agg == "trimmed_mean":
        return trimmed_mean(token_reward, trim_frac)
    if agg == "sum":
        return episode_reward.double().sum()
    raise ValueError(f"score_agg must be 'trimmed_mean' or 'sum', got {agg!r}")


def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (S_i − mean_g S) / (std_g S + eps), population std, per group (METHOD.md §4).

    A group of one gets A = 0; a group whose scores are all equal gets A = 0.
    """
    _check_finite("response scores S_i", scores)
    s = scores.double()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    g = len(uniq)
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(s))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, s) / count
    var = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, (s - mean[inv]) ** 2) / count
    adv = (s - mean[inv]) / (var.sqrt()[inv] + eps)
    return torch.where(count[inv] > 1, adv, torch.zeros_like(adv))


def floor_correct_advantages(advantages: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """The ``correct_floor`` option (this project's, not METHOD.md's): A_i ← max(A_i, 0) for a
    correct response (o_i > 0); a wrong response keeps its A_i.

    Where a group's correct responses differ only in their shaping score (length, process reward),
    the group advantage of §4 pushes the lower-scored correct ones down on every token, their
    correct steps included; floored, shaping only pushes the better correct responses up. The
    token mean of a group's advantages is then no longer zero.
    """
    if advantages.shape != outcomes.shape:
        raise ValueError(f"floor_correct_advantages: {advantages.numel()} advantages for {outcomes.numel()} outcomes")
    return torch.where(outcomes > 0, advantages.clamp(min=0.0), advantages)


def correct_scope_scores(
    outcomes: torch.Tensor, process_scores: torch.Tensor, group_ids: torch.Tensor, bonus: float = 0.5
) -> torch.Tensor:
    """The ``process_scope: correct`` option (this project's variant, not METHOD.md's): the process
    score only ranks the CORRECT responses of a group, as the length penalty does with lengths (§6).

    S_i = o_i + bonus · u_i for a correct response (o_i = 1), u_i = 2 (s_i − min) / (max − min) − 1 ∈
    [−1, 1] over the group's correct responses' paper scores s_i (0 when fewer than two are correct or
    all are equal); a wrong response keeps S_i = o_i, so a group with no correct response gets no
    advantage at all, and with ``bonus`` < 1 a correct response always outscores a wrong one.
    """
    if not 0.0 <= bonus < 1.0:
        raise ValueError(f"correct-scope bonus must be in [0, 1) so that a correct response outscores a wrong one, "
                         f"got {bonus}")
    _check_finite("process scores", process_scores)
    o = outcomes.double()
    s = process_scores.double()
    out = o.clone()
    correct = o > 0.5
    for g in torch.unique(group_ids).tolist():
        m = (group_ids == g) & correct
        if int(m.sum()) < 2:
            continue
        lo, hi = s[m].min(), s[m].max()
        if hi > lo:
            out[m] = o[m] + bonus * (2.0 * (s[m] - lo) / (hi - lo) - 1.0)
    return out


def grpo_advantages(outcomes: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The outcome-only baseline's scalar advantage (r_i − mean_g r) / (std_g r + eps) (§4, §6)."""
    return group_advantages(outcomes, group_ids, eps)


def token_advantages(advantage: float | torch.Tensor, token_reward: torch.Tensor) -> torch.Tensor:
    """A_{i,t} = A_i · T_i · c_t with c_t = |r_t| / Σ_t' |r_t'| (METHOD.md §4).

    The token mean of A_{i,t} is A_i; if Σ|r_t| = 0, c_t = 1/T_i (GRPO's broadcast).
    """
    n = token_reward.numel()
    if n == 0:
        return token_reward.double()
    a = torch.as_tensor(advantage, dtype=torch.float64)
    mag = token_reward.double().abs()
    total = mag.sum()
    c = mag / total if total > 0 else torch.full_like(mag, 1.0 / n)
    return a * n * c


def group_episode_zscores(
    process: list[torch.Tensor], group_ids: torch.Tensor, eps: float = 1e-6
) -> list[torch.Tensor]:
    """Each episode's process reward r_k^prg z-scored over all episodes of its group (population
    std); the process term of the ``additive`` credit option (this project's variant, not METHOD.md's).
    A group with fewer than two episodes, or all equal, gets zeros."""
    out = []
    groups = group_ids.tolist()
    pooled: dict[int, torch.Tensor] = {}
    for g in set(groups):
        parts = [process[i].double() for i in range(len(process)) if groups[i] == g and process[i].numel()]
        pooled[g] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    for i, p in enumerate(process):
        allp = pooled[groups[i]]
        if allp.numel() < 2 or p.numel() == 0:
            out.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        _check_finite("process rewards", allp)
        mu, sd = allp.mean(), allp.std(unbiased=False)
        out.append((p.double() - mu) / (sd + eps))
    return out


def additive_token_advantages(
    outcome_advantage: float | torch.Tensor, episode_z: torch.Tensor, episode_ids: torch.Tensor, coef: float
) -> torch.Tensor:
    """A_{i,t} = A_i^outcome + coef · z_{k(t)} (the ``additive`` credit option)."""
    a = torch.as_tensor(outcome_advantage, dtype=torch.float64)
    if episode_ids.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    return a + coef * episode_z.double()[episode_ids.long()]
