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
