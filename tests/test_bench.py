"""The benchmark runs and reports its keys (a smoke run; the numbers live in the README)."""

import json
import math
from pathlib import Path

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
    assert -1 <= res["spearman_last_block"] <= 1 and res["speedup_last_block"] > 0 and res["last_block_s"] > 0
    # the SVD is timed apart, both ways; --svd picks the one in the timed penalty
    assert res["svd"] == "exact" and set(res["svd_s"]) == set(res["spearman_by_svd"]) == {"exact", "randomized"}
    assert all(t > 0 for t in res["svd_s"].values()) and res["device"] == "cpu"
    assert main(["--quick", "--svd", "randomized"])["svd"] == "randomized"


@pytest.mark.slow
def test_penalty_fidelity_bench_quick_runs(capsys):
    import json

    from bench.penalty_fidelity import main

    res = main(["--quick"])
    assert json.loads(capsys.readouterr().out)["episodes"] == res["episodes"] > 0  # one JSON object on stdout
    for name in ("last_down_proj_r5", "last_down_proj_full_layer", "all_down_proj_r5", "all_down_proj_full_layer"):
        p = res["proxies"][name]
        assert -1 <= p["spearman"] <= 1 and p["seconds"] > 0
    assert res["proxies"]["all_down_proj_full_layer"]["targets"] == res["num_layers"]
    # below the last block the trainer's per-episode backwards, and the one backward beside them
    attribution = {name: p.get("attribution") for name, p in res["proxies"].items()}
    assert attribution["last_down_proj_r5"] == attribution["last_down_proj_full_layer"] == "exact_by_position"
    for name in ("all_down_proj_r5", "all_down_proj_full_layer"):
        assert attribution[name] == "per_episode" and attribution[f"{name}_single_backward"] == "single_backward"
        assert res["proxies"][name]["spearman"] != res["proxies"][f"{name}_single_backward"]["spearman"]
    assert attribution["random_layers"] in ("per_episode", "exact_by_position")  # the last block drawn alone
    assert res["spearman"] == res["proxies"]["last_down_proj_r5"]["spearman"]
    # the last block's position-wise layers: one backward, exact, four matrices (gate, up, down, o_proj)
    for name in ("last_block_r5", "last_block_full_layer"):
        assert attribution[name] == "exact_by_position" and res["proxies"][name]["targets"] == 4
    assert res["spearman_last_block"] == res["proxies"]["last_block_r5"]["spearman"]
    # whether each penalty, the exact one included, tells redundant episodes from the rest
    for sep in [res["exact_redundancy"]] + [p["redundancy"] for p in res["proxies"].values()]:
        assert sep["auc"] is None or 0.0 <= sep["auc"] <= 1.0
        assert set(sep["auc_by_kind"]) == {"restate", "repeat", "check_easy"}
    assert res["proxies"]["episode_length"]["redundancy"]["auc"] == res["exact_redundancy"]["length_auc"]
    copy = res["proxies"]["context_copy"]  # a reference signal: the share of an episode's pairs already said
    assert -1 <= copy["spearman"] <= 1 and copy["redundancy"]["length_auc"] == res["exact_redundancy"]["length_auc"]
    for name in ("surprise", "entropy"):  # the model's own uncertainty, reference signals
        assert -1 <= res["proxies"][name]["spearman"] <= 1


def test_episode_uncertainty_matches_one_prefix_at_a_time(model):
    """Each episode's mean surprise and entropy equal a forward per prefix (no padding, no batching)."""
    import torch

    from bench.penalty_fidelity import episode_uncertainty

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (14,), generator=g)
    tep = torch.tensor([-1] * 4 + [0, 0, 0, 1, 2, 2, 2, 2, 1, 1])  # 4 prompt tokens, 3 episodes
    surprise, entropy = episode_uncertainty(model, [(ids, tep >= 0, tep, 3, None)])
    want_s, want_h = [[] for _ in range(3)], [[] for _ in range(3)]
    for t in range(4, 14):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, :t]).logits[0, -1].double(), dim=-1)
        want_s[tep[t]].append(-logp[ids[t]].item())
        want_h[tep[t]].append(-(logp.exp() * logp).sum().item())
    torch.testing.assert_close(surprise[0], torch.tensor([sum(v) / len(v) for v in want_s], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy[0], torch.tensor([sum(v) / len(v) for v in want_h], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def test_penalty_fidelity_refuses_a_missing_checkpoint(tmp_path):
    from bench.penalty_fidelity import main

    with pytest.raises(SystemExit, match="l2t warmstart --out"):
        main(["--policy", str(tmp_path / "nothing")])


def test_continuation_j_bench_quick_runs(capsys):
    import json

    from bench.continuation_j import main

    res = main(["--quick"])
    out = json.loads(capsys.readouterr().out)  # one JSON object on stdout
    assert out["continuation_over_rollout"] == res["continuation_over_rollout"] > 0
    assert set(res["estimators"]) == {"answer_logprob", "continuation_b4", "continuation_b32"}
    assert res["estimators"]["continuation_b32"]["reward_over_rollout"] == res["continuation_over_rollout"]
    assert res["responses"] == 4 and res["prefixes"] >= 8 and res["rollout_s"] > 0
    # the paper's J generates nothing; the continuation J decodes for every prefix
    est = res["estimators"]
    assert est["answer_logprob"]["decoded_sequence_steps"] == 0
    assert est["continuation_b4"]["decoded_sequence_steps"] >= res["prefixes"] * 2


def test_reward_methods_bench_quick_runs(capsys):
    import json

    from bench.reward_methods import main

    res = main(["--quick"])
    out = json.loads(capsys.readouterr().out)  # one JSON object on stdout
    assert set(out["methods"]) == set(res["methods"]) == {"grpo", "length_penalty", "l2t", "l2t_no_penalty",
                                                          "l2t_last_block", "l2t_random_layers", "l2t_every_block"}
    assert res["responses"] == 4 and res["rollout_s"] > 0
    for name, m in res["methods"].items():
        assert m["reward_s"] > 0 and m["reward_over_rollout"] == m["reward_s"] / res["rollout_s"]
        # only the methods with a compression penalty spend time on it
        assert (m["penalty_s"] > 0) == (name in ("l2t", "l2t_last_block", "l2t_random_layers", "l2t_every_block")), name
    assert res["methods"]["l2t_every_block"]["method"] == "l2t"


def test_reward_methods_bench_refuses_an_unknown_method():
    from bench.reward_methods import main

    with pytest.raises(SystemExit, match="unknown method.*'l2t_fast'"):
        main(["--quick", "--methods", "l2t,l2t_fast"])


def test_continuation_j_bench_refuses_a_missing_checkpoint(tmp_path):
    from bench.continuation_j import main

    with pytest.raises(SystemExit, match="l2t warmstart --out"):
        main(["--policy", str(tmp_path / "nothing")])


@pytest.mark.slow
def test_reward_overhead_bench_quick_runs():
    from bench.reward_overhead import main

    res = main(["--quick"])
    assert math.isfinite(res["reward_over_rollout"]) and res["reward_over_rollout"] > 0
    assert res["per_step_s"]["rollout_time_s"] > 0 and res["rollouts_per_step"] == 8


def test_verify_pool_bench_quick_runs(capsys):
    import json

    from bench.verify_pool import main

    res = main(["--quick", "--workers", "2"])
    assert json.loads(capsys.readouterr().out)["responses"] == 24
    assert res["same_verdicts"] is True and res["speedup"] > 0
    assert 0.3 < res["correct_share"] < 0.7  # own golds accepted, the next row's rejected


@pytest.mark.slow
def test_eval_throughput_bench_quick_runs(capsys):
    import json

    from bench.eval_throughput import main

    res = main(["--quick", "--workers", "2"])
    assert json.loads(capsys.readouterr().out)["problems"] == 24
    assert res["gold_verified_correct"] == 1.0
    assert res["verifications_per_s"] > 0 and res["problems_per_s"] > 0


def test_paper_scale_plan_from_a_measured_file(tmp_path, capsys):
    """The plan's cost model: an update costs 3 forwards without checkpointing (4 with), ZeRO-3
    shards more than ZeRO-2, GPU hours scale with the rollouts, and the tiny-model check is reported."""
    import json

    from bench.paper_scale import flops_per_rollout, main

    f = flops_per_rollout(1e9, 2, 64, 100, 1000, 10, 12, checkpointing=False)
    assert f["update"] / f["reference"] == pytest.approx(3.0)
    assert flops_per_rollout(1e9, 2, 64, 100, 1000, 10, 12)["update"] / f["reference"] == pytest.approx(4.0, rel=0.01)
    measured = {"parameters": 891008, "layers": 4, "hidden": 128, "mean_tokens": 160.0, "episodes_per_response": 1.0,
                "rollout_s": 4.4, "reward_fitting_s": 1.9, "ref_s": 1.3, "update_s": 4.0, "threads": 1, "device": "cpu"}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(measured))
    out = main(["--measured", str(path)])
    assert json.loads(capsys.readouterr().out)["method"] == out["method"]
    assert out["tiny_model_check"]["update_over_reference"]["measured"] == pytest.approx(4.0 / 1.3)
    small, big = out["plan"]
    for row in (small, big):
        assert row["memory_zero3"]["train_state_gb"] < row["memory_zero2"]["train_state_gb"]
        aime, numina = row["per_epoch"].values()
        assert numina["gpu_hours_total"] / aime["gpu_hours_total"] == pytest.approx(4000 / 919)
    assert big["per_epoch"][next(iter(big["per_epoch"]))]["gpu_hours_total"] > \
        small["per_epoch"][next(iter(small["per_epoch"]))]["gpu_hours_total"]


@pytest.mark.slow
def test_train_memory_bench_quick_runs(capsys):
    """Every pass runs in its own process under each setting asked for and reports a peak and a
    time; the memory options change nothing but memory and time (their outputs equal plain's).
    Two settings, four processes of about 7 s each: that a chunked head and activation
    checkpointing leave each pass's outputs unchanged is tested in tests/test_trainer.py and
    tests/test_config_and_rewards.py."""
    from bench.train_memory import PASSES, main

    res = main(["--quick", "--settings", "plain", "both"])
    assert json.loads(capsys.readouterr().out)["passes"].keys() == PASSES.keys()  # one JSON object on stdout
    for which, settings in PASSES.items():
        by = res["passes"][which]
        assert set(by) == {s for s in settings if s in ("plain", "both")}
        for setting, r in by.items():
            assert "error" not in r and r["seconds"] > 0 and r["peak_bytes"] >= 0, (which, setting, r)
            if setting != "plain":
                assert r["max_rel_diff"] < 1e-4, (which, setting)


def test_train_memory_bench_fails_on_a_failed_case_not_on_running_out_of_memory():
    """A case that failed (a crash, a timeout) makes the benchmark exit non-zero, so bench/gpu.sh
    reports the step FAILED; running out of memory is a result, not a failure."""
    import subprocess
    import sys

    from bench.train_memory import failures

    result = {"passes": {"update": {"plain": {"out_of_memory": True, "error": "CUDA out of memory"},
                                    "both": {"peak_bytes": 1, "seconds": 0.1}},
                         "reward": {"plain": {"error": "timed out after 1 s (--case-timeout)"}}}}
    assert failures(result) == ["reward/plain"]
    assert failures({"passes": {"update": {"plain": result["passes"]["update"]["plain"]}}}) == []
    # a child that cannot finish in time: the whole benchmark exits 1 and says which case
    proc = subprocess.run([sys.executable, "-m", "bench.train_memory", "--quick", "--passes", "reference",
                           "--settings", "plain", "--case-timeout", "0.01"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "reference/plain" in proc.stderr
    assert json.loads(proc.stdout)["passes"]["reference"]["plain"]["error"].startswith("timed out")


def test_train_memory_bench_presets_and_bad_arguments():
    from bench.train_memory import parse

    args = parse(["--preset", "qwen2-1.5b"])  # the paper's base-model shape at its completion length
    assert (args.hidden, args.layers, args.vocab, args.response, args.dtype) == (1536, 28, 151936, 16384, "bfloat16")
    with pytest.raises(SystemExit):
        parse(["--episodes", "0"])
    with pytest.raises(SystemExit):
        parse(["--chunk", "0"])


def test_gpu_script_runs_the_named_steps_times_them_out_and_refuses_unknown_tags(tmp_path):
    """bench/gpu.sh, driven by a stand-in interpreter (no GPU here): ONLY picks the steps, each
    step's output lands in its own file, a failing or hanging step fails the run (exit 1) and the
    others still run, and a tag it does not know, or none at all, is refused (exit 2) before any
    step, so a short GPU lease is not spent on a typo."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in *train_memory*) sleep 30;; esac\necho "ran $*"\n')
    fake.chmod(0o755)

    def run(only: str, step_timeout: int = 60):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(out), "ONLY": only,
               "STEP_TIMEOUT": str(step_timeout)}
        proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        return proc, out

    proc, out = run("tests penalty")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["penalty_qwen05b.json", "penalty_qwen05b_randomized.json",
                                                     "penalty_tiny.json", "pytest.txt"]
    assert "ran -m pytest" in (out / "pytest.txt").read_text() and "skipped (ONLY=tests penalty)" in proc.stderr
    proc, out = run("tests memory", step_timeout=2)  # the memory step hangs: timed out, the run fails
    assert proc.returncode == 1 and "TIMED OUT after 2 s" in proc.stderr and "CUDA tests: ok" in proc.stderr
    for only in ("tests,memory", "test", " "):
        proc, out = run(only)
        assert proc.returncode == 2, (only, proc.stderr)
        assert not out.exists() or not any(out.iterdir()), only
