"""Pooling the seeds of several miniature reports (``l2t_core.pooling``, ``l2t pool``): the
block-adjusted difference against textbook and brute-force references, and the bookkeeping of
blocks, seeds and configurations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from l2t_core.cli import main as cli_main
from l2t_core.pooling import blocked_difference, pool_reports, pooled_markdown

CONFIG = {"methods": ["grpo", "length_penalty"], "variants": {}, "seeds": [0, 1, 2], "workers": 2,
          "credit_problems": 24, "steps": 80, "lr": 3e-5, "eval_samples": 4,
          "warmstart": {"seed": 0, "guess_error": 0.4, "threads": 2}}


def _report(base_acc: float, runs: dict[str, list[tuple[int, float, float, float]]], sampled: bool = True,
            **config) -> dict:
    """A miniature.json with the fields pooling reads: per method, seeds (seed, accuracy, tokens, L6)."""
    def part(shift: float) -> dict:
        return {"base": {"accuracy": base_acc + shift, "mean_tokens": 200.0},
                "methods": {name: {"seeds": [{"seed": s, "accuracy": a + shift, "mean_tokens": t,
                                              "per_level_accuracy": {"1": 1.0, "6": l6 + shift}}
                                             for s, a, t, l6 in rs]} for name, rs in runs.items()}}
    rep = {"config": json.loads(json.dumps({**CONFIG, **config})), **part(0.0)}
    if sampled:
        rep["sampled"] = part(-0.01)
    return rep


def test_one_block_is_students_two_sample_t():
    a, b = [0.91, 0.95, 0.93, 0.97], [0.88, 0.90, 0.93]
    got = blocked_difference({"x": a}, {"x": b})
    ref = stats.ttest_ind(a, b, equal_var=True)
    ci = ref.confidence_interval(0.95)
    assert got["delta"] == pytest.approx(np.mean(a) - np.mean(b))
    assert (got["low"], got["high"], got["p"]) == pytest.approx((ci.low, ci.high, ref.pvalue))
    assert (got["df"], got["n_a"], got["n_b"], got["blocks"]) == (5, 4, 3, 1)


def test_blocks_match_the_within_block_brute_force_and_ignore_block_shifts():
    rng = np.random.default_rng(0)
    sizes = {"b0": (3, 3), "b1": (2, 4), "b2": (1, 2)}
    a = {k: list(rng.normal(0.9 + 0.05 * i, 0.02, na)) for i, (k, (na, _)) in enumerate(sizes.items())}
    b = {k: list(rng.normal(0.85 + 0.05 * i, 0.02, nb)) for i, (k, (_, nb)) in enumerate(sizes.items())}
    got = blocked_difference(a, b)
    # Frisch-Waugh-Lovell: take out each block's mean, then regress y on the method indicator
    x, y = [], []
    for k in sizes:
        vals = a[k] + b[k]
        ind = [1.0] * len(a[k]) + [0.0] * len(b[k])
        x += list(np.asarray(ind) - np.mean(ind))
        y += list(np.asarray(vals) - np.mean(vals))
    x, y = np.asarray(x), np.asarray(y)
    delta = x @ y / (x @ x)
    df = len(y) - len(sizes) - 1
    se = np.sqrt(((y - delta * x) @ (y - delta * x)) / df / (x @ x))
    assert got["delta"] == pytest.approx(delta)
    assert got["df"] == df
    assert got["high"] - got["delta"] == pytest.approx(stats.t.ppf(0.975, df) * se)
    assert got["p"] == pytest.approx(2 * stats.t.sf(abs(delta) / se, df))
    # the closed form of the estimate: within-block differences weighted n_a n_b / (n_a + n_b)
    w = {k: na * nb / (na + nb) for k, (na, nb) in sizes.items()}
    assert got["delta"] == pytest.approx(sum(w[k] * (np.mean(a[k]) - np.mean(b[k])) for k in sizes) / sum(w.values()))
    shifted = blocked_difference({k: [v + 0.3 * i for v in a[k]] for i, k in enumerate(sizes)},
                                 {k: [v + 0.3 * i for v in b[k]] for i, k in enumerate(sizes)})
    for key in ("delta", "low", "high", "p"):
        assert shifted[key] == pytest.approx(got[key])
    # ignoring the blocks would mix the block shift into the difference
    pooled = np.mean(np.concatenate(list(a.values()))) - np.mean(np.concatenate(list(b.values())))
    assert abs(pooled - got["delta"]) > 0.005


def test_blocked_difference_undefined_cases():
    assert blocked_difference({"x": [1.0]}, {"x": [0.5]})["p"] is None  # no residual degrees of freedom
    same = blocked_difference({"x": [1.0, 1.0]}, {"x": [0.5, 0.5]})
    assert same["delta"] == pytest.approx(0.5) and same["low"] is None  # no spread: no interval claimed
    with pytest.raises(ValueError, match="no block holds values of both"):
        blocked_difference({"x": [1.0]}, {"y": [1.0]})
    with pytest.raises(ValueError, match="confidence"):
        blocked_difference({"x": [1.0]}, {"x": [1.0]}, confidence=1.0)


def test_pool_reports_blocks_seeds_and_references():
    first = _report(0.93, {"grpo": [(0, 0.98, 230, 0.97), (1, 0.99, 228, 0.96), (2, 0.97, 233, 0.99)],
                           "length_penalty": [(0, 0.95, 150, 0.89), (1, 0.96, 145, 0.94), (2, 0.94, 148, 0.94)]})
    same_base = _report(0.93, {"length_penalty": [(3, 0.97, 151, 0.95), (4, 0.94, 148, 0.90)]},
                        methods=["length_penalty"], seeds=[3, 4])
    pooled = pool_reports([first, same_base], ["a", "b"])
    assert pooled["blocks"] == {"a": "B0", "b": "B0"}  # one SFT base: the seeds simply pool
    lp = pooled["greedy"]["methods"]["length_penalty"]
    assert lp["seeds"] == {"B0": [0, 1, 2, 3, 4]}
    assert lp["L6"]["mean"] == pytest.approx(np.mean([0.89, 0.94, 0.94, 0.95, 0.90]))
    assert lp["tokens_over_grpo"] == pytest.approx(np.mean([150, 145, 148, 151, 148]) / np.mean([230, 228, 233]))
    ref = stats.ttest_ind([0.89, 0.94, 0.94, 0.95, 0.90], [0.97, 0.96, 0.99], equal_var=True)
    assert lp["vs"]["grpo"]["L6"]["p"] == pytest.approx(ref.pvalue)
    assert "length_penalty" not in lp["vs"] and pooled["greedy"]["hardest_level"] == "6"
    assert pooled["sampled"]["methods"]["length_penalty"]["L6"]["mean"] == pytest.approx(lp["L6"]["mean"] - 0.01)

    rebuilt = _report(0.95, {"grpo": [(3, 0.99, 220, 0.99), (4, 0.99, 225, 0.98)],
                             "length_penalty": [(3, 0.97, 151, 0.95), (4, 0.94, 148, 0.90)]}, seeds=[3, 4])
    pooled = pool_reports([first, rebuilt], ["a", "c"])
    assert pooled["blocks"] == {"a": "B0", "c": "B1"}  # another warm-start build: a block of its own
    lp = pooled["greedy"]["methods"]["length_penalty"]
    assert lp["seeds"] == {"B0": [0, 1, 2], "B1": [3, 4]}
    assert lp["tokens_over_grpo"] == pytest.approx(np.mean([np.mean([150, 145, 148]) / np.mean([230, 228, 233]), 149.5 / 222.5]))
    assert lp["vs"]["grpo"]["L6"]["blocks"] == 2
    assert "| length_penalty | 3 (B0) + 2 (B1) |" in pooled_markdown(pooled)


def test_the_same_base_evaluated_again_is_one_block_whatever_its_evaluation_took():
    """A second ``l2t miniature`` into another directory rebuilds and re-evaluates the same warm
    start (bit for bit on one machine); only the evaluation's wall time differs, so it is the same
    block and the seeds pool as one two-sample t-test."""
    first = _report(0.93, {"grpo": [(0, 0.98, 230, 0.97), (1, 0.99, 228, 0.96)]})
    again = _report(0.93, {"grpo": [(2, 0.97, 233, 0.99)]}, seeds=[2])
    first["base"]["seconds"], again["base"]["seconds"] = 20.9, 25.2
    pooled = pool_reports([first, again], ["a", "b"])
    assert pooled["blocks"] == {"a": "B0", "b": "B0"}
    assert pooled["greedy"]["methods"]["grpo"]["seeds"] == {"B0": [0, 1, 2]}
    again["base"]["accuracy"] = 0.95  # another evaluation result: another build, another block
    assert pool_reports([first, again], ["a", "b"])["blocks"] == {"a": "B0", "b": "B1"}


def test_pool_reports_refuses_what_cannot_be_pooled():
    base = _report(0.93, {"grpo": [(0, 0.98, 230, 0.97), (1, 0.99, 228, 0.96)]})
    with pytest.raises(ValueError, match="at least two"):
        pool_reports([base])
    with pytest.raises(ValueError, match=r"b differs from a in 'warmstart\.guess_error'"):
        pool_reports([base, _report(0.93, {}, warmstart={"seed": 0, "guess_error": 0.25, "threads": 2})], ["a", "b"])
    with pytest.raises(ValueError, match="'lr'"):
        pool_reports([base, _report(0.93, {}, lr=1e-4)], ["a", "b"])
    # a field added since a report was written takes its default; how often runs were saved is free
    pool_reports([base, _report(0.93, {"grpo": [(6, 0.99, 230, 0.97)]}, seeds=[6], checkpoint_every=5,
                                eval_top_p=0.95)], ["a", "b"])
    with pytest.raises(ValueError, match="'eval_top_p'"):
        pool_reports([base, _report(0.93, {}, eval_top_p=0.9)], ["a", "b"])
    # threads, workers and which methods and seeds ran are free to differ
    pool_reports([base, _report(0.93, {"grpo": [(5, 0.99, 230, 0.97)]}, workers=1, seeds=[5],
                                warmstart={"seed": 0, "guess_error": 0.4, "threads": 1})], ["a", "b"])
    with pytest.raises(ValueError, match="grpo seed 1 is in two reports on the same warm start"):
        pool_reports([base, _report(0.93, {"grpo": [(1, 0.99, 230, 0.97)]})], ["a", "b"])
    v1 = {"x": {"method": "l2t", "overrides": {"reward.fitting.estimator": "continuation",
                                               "reward.fitting.continuation_budget": 320}}}
    v2 = {"x": {"method": "l2t", "overrides": {}}}
    with pytest.raises(ValueError, match="'x' means"):
        pool_reports([_report(0.93, {}, variants=v1), _report(0.93, {}, variants=v2)], ["a", "b"])


def test_cli_pool_writes_the_tables_and_explains_errors(tmp_path, capsys):
    dirs = []
    for i, rep in enumerate([_report(0.93, {"grpo": [(0, 0.98, 230, 0.97), (1, 0.99, 228, 0.96)]}),
                             _report(0.93, {"grpo": [(2, 0.97, 231, 0.95)]}, seeds=[2])]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "miniature.json").write_text(json.dumps(rep))
        dirs.append(str(d))
    assert cli_main(["pool", *dirs, "--out", str(tmp_path / "pooled")]) == 0
    saved = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    assert saved["greedy"]["methods"]["grpo"]["seeds"] == {"B0": [0, 1, 2]}
    assert "| grpo | 3 (B0) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"l2t pool: .*missing/miniature.json does not exist"):
        cli_main(["pool", dirs[0], str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "pooled.json").exists()
