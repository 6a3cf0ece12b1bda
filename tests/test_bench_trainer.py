"""The trainer benchmarks run end to end (``--quick``) and report finite, positive numbers; the
measured values themselves are reported in the README, not asserted here."""

from __future__ import annotations

import json
import math

import pytest


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_reward_overhead_quick(capsys):
    from bench.reward_overhead import main

    res = main(["--quick"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(res))  # stdout: exactly one JSON object
    for key in ("reward_over_rollout", "rollout_s", "reward_s", "update_s", "step_s", "mean_tokens",
                "parameters", "threads", "generated_tokens_per_s"):
        assert _positive(res[key]), (key, res[key])
    for key in ("reward_segment_verify_s", "reward_penalty_s", "reward_fitting_s", "ref_s"):
        assert math.isfinite(res[key]) and res[key] >= 0, (key, res[key])
    assert res["method"] == "l2t" and res["group_size"] == 4 and res["prompts_per_step"] == 2
    parts = res["reward_segment_verify_s"] + res["reward_penalty_s"] + res["reward_fitting_s"]
    assert parts <= res["reward_s"] * 1.001
    # the proxy's SVD refresh is part of the penalty's time, not the J pass's
    assert 0 < res["reward_penalty_svd_s"] <= res["reward_penalty_s"] and res["svd"] == "exact"
    assert res["reward_over_rollout"] == pytest.approx(res["reward_s"] / res["rollout_s"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_trainer_vs_trl_quick(capsys):
    pytest.importorskip("trl")
    from bench.trainer_vs_trl import main

    res = main(["--quick"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(res))
    assert "error" not in res, res.get("error")
    for key in ("step_throughput_ratio", "generation_throughput_ratio"):
        assert _positive(res[key]), (key, res[key])
    for side in ("ours", "trl"):
        for key in ("step_tokens_per_s", "generation_tokens_per_s", "generated_tokens_per_step",
                    "prompt_tokens_per_step"):
            assert _positive(res[side][key]), (side, key, res[side][key])
    # same prompts on both sides, so the same prompt tokens per step
    assert res["ours"]["prompt_tokens_per_step"] == res["trl"]["prompt_tokens_per_step"]
    assert res["trl_version"] and res["threads"] >= 1


@pytest.mark.parametrize("bench", ["trainer_vs_trl", "sft_vs_trl"])
def test_the_trl_benchmarks_without_trl_print_an_error(bench, monkeypatch, capsys):
    import importlib

    b = importlib.import_module(f"bench.{bench}")
    monkeypatch.setattr(b, "_trl_version", lambda: None)
    res = b.main(["--quick"])
    out = json.loads(capsys.readouterr().out)
    assert "trl is not installed" in out["error"] and "step_throughput_ratio" not in out
    assert res["error"] == out["error"]


@pytest.mark.slow
def test_sft_vs_trl_quick(capsys):
    pytest.importorskip("trl")
    from bench.sft_vs_trl import main

    res = main(["--quick"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(res))
    assert "error" not in res, res.get("error")
    assert _positive(res["step_throughput_ratio"])
    for side in ("ours", "trl"):
        assert res[side]["measured_steps"] >= 3 and _positive(res[side]["examples_per_s"])
        assert _positive(res[side]["tokens_per_example"])
    assert res["step_throughput_ratio"] == pytest.approx(res["ours"]["examples_per_s"] / res["trl"]["examples_per_s"])
