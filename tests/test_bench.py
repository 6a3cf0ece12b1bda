"""The benchmark runs and reports its keys (a smoke run; the numbers live in the README)."""

import math

import pytest


@pytest.mark.slow
def test_penalty_bench_quick_runs():
    from bench.penalty import main

    res = main(["--quick"])
    for key in ("speedup", "spearman", "packed_j_speedup", "packed_j_max_abs_diff"):
        assert math.isfinite(res[key])
    assert res["packed_j_max_abs_diff"] < 1e-4 and res["speedup"] > 0
    # the penalty taken from the reward pass's packed forward equals the standalone low-rank penalty
    assert res["fused_vs_standalone_max_rel_diff"] < 1e-4
    assert res["speedup_in_reward_pass"] > 0 and math.isfinite(res["spearman_full_layer"])


@pytest.mark.slow
def test_reward_overhead_bench_quick_runs():
    from bench.reward_overhead import main

    res = main(["--quick"])
    assert math.isfinite(res["reward_over_rollout"]) and res["reward_over_rollout"] > 0
    assert res["per_step_s"]["rollout_time_s"] > 0 and res["rollouts_per_step"] == 8


def test_eval_throughput_bench_quick_runs(capsys):
    import json

    from bench.eval_throughput import main

    res = main(["--quick", "--workers", "2"])
    assert json.loads(capsys.readouterr().out)["problems"] == 24
    assert res["gold_verified_correct"] == 1.0
    assert res["verifications_per_s"] > 0 and res["problems_per_s"] > 0
