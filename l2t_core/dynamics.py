"""Training dynamics of a run, read back from its metrics tables (:mod:`l2t_core.metrics`).

A final greedy evaluation says where a run ended; these numbers say how it got there, which is
what decides whether a longer run would help:

* rollout tokens and accuracy over the first and the last ``window`` steps (sampled at the
  training temperature, so they move before the greedy evaluation does);
* ``reward_over_rollout``: reward time ÷ rollout time over the whole run (issue 3's overhead
  measure, as :mod:`bench.reward_overhead` reports it for one step);
* ``score_length_spearman``: within every group, the Spearman rank correlation between the
  response score and the response length among the group's CORRECT responses, averaged over the
  groups where both vary. It says whether a method's score pays for brevity at all: the length
  penalty gives −1 by construction, outcome-only GRPO has no such group (every correct response
  scores 1), and L2T's process reward lies in between (METHOD.md §4, §10);
* ``gain_length_spearman`` and ``penalty_length_spearman``: the same within-group correlation for
  the two process parts of an L2T response, Σ_k G_k and Σ_k P̂_k (from the episode table). They
  say where a score's length signal comes from: Σ_k G_k telescopes to J at the end minus J at the
  start (METHOD.md §2), so it need not grow with length, and P_k ∝ ‖g_k‖⁴ sums to a few outlier
  episodes' share; what is left is the token mean of the paper's score (1/T).
  ``penalty_length_spearman_early`` is the penalty's over the first quarter of the steps: on a
  base that over-thinks, short responses are the surprising ones, so it starts negative (the
  penalty pays for length) and says whether training released that brake;
* ``curve``: rollout tokens and accuracy per step, for the plot.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .atomic_files import save_figure_atomic
from .checkpoint import RunStorage
from .metrics import read_table
from .plotting import series_colours
from .stats import mean_std

SCALARS = ("rollout_tokens_first", "rollout_tokens_last", "rollout_accuracy_first", "rollout_accuracy_last",
           "reward_over_rollout", "score_length_spearman", "gain_length_spearman", "penalty_length_spearman",
           "penalty_length_spearman_early")


def within_group_spearman(rollouts: pd.DataFrame, column: str = "score",
                          against: str = "num_tokens") -> tuple[float | None, int]:
    """Mean over (step, group) of Spearman(``column``, ``against``) among the group's correct
    responses, over the groups with at least three correct responses where both vary.
    Returns (mean or None when no group qualifies, number of groups used)."""
    if rollouts.empty or column not in rollouts:
        return None, 0
    correct = rollouts[rollouts["outcome"] == 1.0]
    rhos = []
    for _, g in correct.groupby(["step", "group"], sort=False):
        if len(g) < 3 or g[column].nunique() < 2 or g[against].nunique() < 2:
            continue
        rho = g[column].rank().corr(g[against].rank())  # Pearson of ranks = Spearman (average ties)
        if not math.isnan(rho):
            rhos.append(float(rho))
    return (sum(rhos) / len(rhos) if rhos else None), len(rhos)


def score_length_spearman(rollouts: pd.DataFrame) -> tuple[float | None, int]:
    """:func:`within_group_spearman` of the response score against the response length."""
    return within_group_spearman(rollouts, "score")


def with_episode_sums(rollouts: pd.DataFrame, episodes: pd.DataFrame) -> pd.DataFrame:
    """``rollouts`` with ``gain_sum`` (Σ_k G_k) and ``penalty_hat_sum`` (Σ_k P̂_k) of each response
    from the episode table (NaN for a response without episodes)."""
    if rollouts.empty or episodes.empty:
        return rollouts
    keys = [k for k in ("run_id", "step", "rank", "rollout") if k in rollouts and k in episodes]
    sums = (episodes.groupby(keys, sort=False)
            .agg(gain_sum=("fitting_gain", "sum"), penalty_hat_sum=("penalty_hat", "sum")).reset_index())
    return rollouts.merge(sums, on=keys, how="left")


def run_dynamics(run_dir: str | Path, window: int = 5) -> dict:
    """The training dynamics of the run in ``run_dir`` (see the module docstring). Raises
    ``FileNotFoundError`` naming the directory when it holds no step metrics."""
    storage = RunStorage(str(run_dir))
    steps = read_table(storage, "train_steps")
    if steps.empty:
        raise FileNotFoundError(f"no train_steps metrics under {run_dir}/metrics: is it a training run directory "
                                "that has finished at least one checkpoint?")
    steps = steps.sort_values("step").drop_duplicates("step", keep="last")
    first, last = steps.head(window), steps.tail(window)
    rollout_s = float(steps["rollout_time_s"].sum())
    rollouts = with_episode_sums(read_table(storage, "rollouts"), read_table(storage, "episode_rewards"))
    rho, groups = score_length_spearman(rollouts)
    early_end = int(steps["step"].iloc[max(len(steps) // 4, 1) - 1])  # the last step of the first quarter
    early = rollouts[rollouts["step"] <= early_end] if not rollouts.empty else rollouts
    return {
        "steps": int(len(steps)),
        "window": window,
        "rollout_tokens_first": float(first["mean_tokens"].mean()),
        "rollout_tokens_last": float(last["mean_tokens"].mean()),
        "rollout_accuracy_first": float(first["accuracy"].mean()),
        "rollout_accuracy_last": float(last["accuracy"].mean()),
        "reward_over_rollout": float(steps["reward_time_s"].sum()) / rollout_s if rollout_s > 0 else None,
        "score_length_spearman": rho,
        "spearman_groups": groups,
        "gain_length_spearman": within_group_spearman(rollouts, "gain_sum")[0],
        "penalty_length_spearman": within_group_spearman(rollouts, "penalty_hat_sum")[0],
        "penalty_length_spearman_early": within_group_spearman(early, "penalty_hat_sum")[0],
        "curve": {"step": [int(s) for s in steps["step"]],
                  "mean_tokens": [float(x) for x in steps["mean_tokens"]],
                  "accuracy": [float(x) for x in steps["accuracy"]]},
    }


def aggregate_dynamics(runs: list[dict]) -> dict:
    """Mean and std over seeds of every scalar of :func:`run_dynamics` (None where no seed has it),
    and the seed-mean curve over the steps all runs share."""
    out: dict = {"window": runs[0]["window"], "seeds": len(runs)}
    for key in SCALARS:
        xs = [r[key] for r in runs if r.get(key) is not None]
        if not xs:
            out[key] = None
            continue
        out[key] = {**mean_std(xs), "n": len(xs)}
    n = min(len(r["curve"]["step"]) for r in runs)
    out["curve"] = {"step": runs[0]["curve"]["step"][:n],
                    **{k: [sum(r["curve"][k][i] for r in runs) / len(runs) for i in range(n)]
                       for k in ("mean_tokens", "accuracy")}}
    return out


def dynamics_table(methods: dict[str, dict]) -> str:
    """Markdown: per method, rollout tokens and accuracy first → last window, reward/rollout time
    and the score–length correlation among correct responses (means over seeds)."""

    def f(d, fmt):
        return "–" if d is None else format(d["mean"], fmt)

    rows = ["| method | rollout tokens first → last | rollout accuracy first → last | reward ÷ rollout time "
            "| Spearman(score, length \\| correct) | … of Σ G_k | … of Σ P̂_k (first ¼ of steps; all) |",
            "|---|---|---|---|---|---|---|"]
    for name, d in methods.items():
        rows.append(f"| {name} | {f(d['rollout_tokens_first'], '.1f')} → {f(d['rollout_tokens_last'], '.1f')} | "
                    f"{f(d['rollout_accuracy_first'], '.3f')} → {f(d['rollout_accuracy_last'], '.3f')} | "
                    f"{f(d['reward_over_rollout'], '.2f')} | {f(d['score_length_spearman'], '+.2f')} | "
                    f"{f(d.get('gain_length_spearman'), '+.2f')} | "
                    f"{f(d.get('penalty_length_spearman_early'), '+.2f')}; {f(d.get('penalty_length_spearman'), '+.2f')} |")
    return "\n".join(rows)


def plot_dynamics(methods: dict[str, dict], path: Path, smooth: int = 5) -> Path:
    """Two panels, rollout mean tokens and rollout accuracy per training step (seed mean, running
    mean over ``smooth`` steps), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = series_colours(list(methods))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, d in methods.items():
        c = d["curve"]
        for ax, key in zip(axes, ("mean_tokens", "accuracy")):
            ys = pd.Series(c[key]).rolling(smooth, min_periods=1).mean()
            ax.plot(c["step"], ys, label=name, color=colours[name])
    for ax, label in zip(axes, ("rollout mean tokens", "rollout accuracy")):
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} (seed mean, running mean of {smooth})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
