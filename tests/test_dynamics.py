"""Training dynamics read back from a run's metrics tables: the score–length correlation against a
brute-force Spearman, the first/last windows and the reward-time share against hand sums."""

from __future__ import annotations

import itertools
import random

import pandas as pd
import pytest

from l2t_core.checkpoint import RunStorage
from l2t_core.dynamics import aggregate_dynamics, dynamics_table, run_dynamics, score_length_spearman
from l2t_core.metrics import MetricsWriter


def _brute_spearman(xs, ys):
    """Spearman with average ranks for ties, from its definition."""
    def ranks(v):
        return [sum(1 for w in v if w < x) + (sum(1 for w in v if w == x) + 1) / 2 for x in v]

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def _rows(step, group, triples):
    return [{"step": step, "group": group, "score": s, "num_tokens": n, "outcome": o} for s, n, o in triples]


def test_score_length_spearman_only_counts_correct_responses_of_groups_where_both_vary():
    rows = (
        _rows(1, 0, [(1.2, 10, 1.0), (1.0, 20, 1.0), (0.8, 30, 1.0), (5.0, 1, 0.0)])   # -1; the wrong one ignored
        + _rows(1, 1, [(1.0, 10, 1.0), (1.0, 20, 1.0), (1.0, 30, 1.0)])               # scores constant: skipped
        + _rows(2, 0, [(0.5, 10, 1.0), (0.9, 20, 1.0), (0.7, 20, 1.0), (0.1, 9, 0.0)])  # a tie in length
        + _rows(2, 1, [(0.5, 10, 1.0), (0.9, 20, 1.0), (0.0, 5, 0.0), (0.0, 6, 0.0)])   # two correct: skipped
    )
    rho, groups = score_length_spearman(pd.DataFrame(rows))
    expected = (-1.0 + _brute_spearman([0.5, 0.9, 0.7], [10, 20, 20])) / 2
    assert groups == 2 and rho == pytest.approx(expected)
    assert score_length_spearman(pd.DataFrame(rows[4:7])) == (None, 0)  # outcome-only GRPO: no group qualifies
    assert score_length_spearman(pd.DataFrame()) == (None, 0)


def test_score_length_spearman_matches_brute_force_on_random_groups():
    rng = random.Random(0)
    rows, want = [], []
    for step, group in itertools.product(range(3), range(4)):
        scores = [round(rng.random(), 1) for _ in range(6)]
        lengths = [rng.randint(5, 9) for _ in range(6)]
        rows += _rows(step, group, [(s, n, 1.0) for s, n in zip(scores, lengths)])
        if len(set(scores)) > 1 and len(set(lengths)) > 1:
            want.append(_brute_spearman(scores, lengths))
    rho, groups = score_length_spearman(pd.DataFrame(rows))
    assert groups == len(want) and rho == pytest.approx(sum(want) / len(want))


def test_run_dynamics_reads_the_metrics_tables_of_a_run(tmp_path):
    storage = RunStorage(str(tmp_path / "run"))
    w = MetricsWriter(storage)
    steps = [{"step": s, "mean_tokens": 100.0 - s, "accuracy": 0.5 + 0.01 * s, "rollout_time_s": 2.0,
              "reward_time_s": 0.5 * (s % 2)} for s in range(1, 13)]
    w.add("train_steps", steps[:6])
    w.add("rollouts", _rows(1, 0, [(1.0, 10, 1.0), (0.5, 20, 1.0), (0.0, 30, 1.0)]))
    w.flush(1, 6)
    w.add("train_steps", steps[6:])
    w.add("rollouts", _rows(7, 0, [(1.0, 30, 1.0), (0.5, 20, 1.0), (0.0, 10, 1.0)])
          + _rows(7, 1, [(1.0, 10, 1.0), (0.5, 20, 1.0), (0.0, 30, 1.0)]))
    w.flush(7, 12)
    d = run_dynamics(tmp_path / "run", window=3)
    assert d["steps"] == 12 and d["curve"]["step"] == list(range(1, 13))
    assert d["rollout_tokens_first"] == pytest.approx(98.0) and d["rollout_tokens_last"] == pytest.approx(89.0)
    assert d["rollout_accuracy_first"] == pytest.approx(0.52) and d["rollout_accuracy_last"] == pytest.approx(0.61)
    assert d["reward_over_rollout"] == pytest.approx(6 * 0.5 / (12 * 2.0))
    assert d["score_length_spearman"] == pytest.approx(-1 / 3) and d["spearman_groups"] == 3

    agg = aggregate_dynamics([d, {**d, "rollout_tokens_last": 91.0, "score_length_spearman": None}])
    assert agg["rollout_tokens_last"] == {"mean": pytest.approx(90.0), "std": pytest.approx(2 ** 0.5), "n": 2}
    assert agg["score_length_spearman"]["n"] == 1 and agg["seeds"] == 2 and agg["window"] == 3
    assert agg["curve"]["mean_tokens"] == d["curve"]["mean_tokens"]
    assert d["gain_length_spearman"] is None and d["penalty_length_spearman"] is None  # no episode table
    table = dynamics_table({"l2t": agg, "grpo": {**agg, "score_length_spearman": None}})
    assert "| l2t | 98.0 → 90.0 | 0.520 → 0.610 | 0.12 | -0.33 | – | –; – |" in table and table.endswith("| – | – | –; – |")


def test_score_parts_against_length_from_the_episode_table(tmp_path):
    """Σ_k G_k and Σ_k P̂_k per response are summed from the episode rows (matched on step, rank and
    rollout, so two ranks' rollout 0 stay apart) and ranked against length within groups; the early
    penalty correlation reads the first quarter of the steps only."""
    storage = RunStorage(str(tmp_path / "run"))
    w = MetricsWriter(storage)
    w.add("train_steps", [{"step": s, "mean_tokens": 50.0, "accuracy": 1.0, "rollout_time_s": 1.0,
                           "reward_time_s": 0.5} for s in range(1, 5)])
    rng = random.Random(3)
    rollouts, episodes, want_g, want_p = [], [], [], []
    for rank in (0, 1):
        lengths = rng.sample(range(10, 90), 5)
        gains = [[rng.uniform(-1, 1) for _ in range(rng.randint(1, 4))] for _ in lengths]
        pens = [[rng.uniform(0, 2) for _ in g] for g in gains]
        for i, (n, g, p) in enumerate(zip(lengths, gains, pens)):
            rollouts.append({"step": 1 + 3 * rank, "rank": rank, "rollout": i, "group": rank, "score": 0.0,
                             "num_tokens": n, "outcome": 1.0})
            episodes += [{"step": 1 + 3 * rank, "rank": rank, "rollout": i, "episode": k + 1, "fitting_gain": gk,
                          "penalty_hat": pk} for k, (gk, pk) in enumerate(zip(g, p))]
        want_g.append(_brute_spearman([sum(g) for g in gains], lengths))
        want_p.append(_brute_spearman([sum(p) for p in pens], lengths))
    w.add("rollouts", rollouts)
    w.add("episode_rewards", episodes)
    w.flush(1, 4)
    d = run_dynamics(tmp_path / "run", window=1)
    assert d["penalty_length_spearman_early"] == pytest.approx(want_p[0])  # step 1 of 4: rank 0's group only
    assert d["gain_length_spearman"] == pytest.approx(sum(want_g) / 2)
    assert d["penalty_length_spearman"] == pytest.approx(sum(want_p) / 2)
    assert d["score_length_spearman"] is None  # every score equal: no group qualifies


def test_run_dynamics_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train_steps metrics under .*empty"):
        run_dynamics(tmp_path / "empty")
