"""`l2t miniature` end to end on a very small budget: every run trains through the real trainer,
is evaluated on the held-out split, and the report files (JSON, markdown, PNG plots) are written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2t_core.checkpoint import RunStorage
from l2t_core.metrics import read_table
from l2t_core.miniature import MiniatureConfig, run_miniature
from l2t_core.miniature_report import BEHAVIOUR, aggregate, markdown_table
from l2t_core.stats import mean_std, welch_difference

TINY = {
    "methods": ["grpo", "l2t"],
    "variants": {"l2t_additive": {"method": "l2t", "overrides": {"reward.credit.credit": "additive"}}},
    "seeds": [0],
    "warmstart": {"train_size": 200, "sft_steps": 15, "hidden_size": 32, "intermediate_size": 64,
                  "num_layers": 2, "eval_per_level": 2, "eval_levels": [1, 2], "eval_loss_size": 0,
                  "eval_max_new_tokens": 48},
    "steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 48,
    "eval_per_level": 2, "eval_levels": [1, 2], "workers": 1, "credit_problems": 2,
}


def test_config_rejects_unknown_methods_and_clashing_variants():
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        MiniatureConfig(methods=["ppo"])
    with pytest.raises(ValueError, match="clashes"):
        MiniatureConfig(methods=["grpo"], variants={"grpo": {"method": "l2t"}})
    with pytest.raises(ValueError, match="seeds"):
        MiniatureConfig(seeds=[])
    # two runs into one directory, a seed or level counted twice, a level the task lacks
    for bad, match in ((dict(seeds=[0, 0]), "seeds lists 0 more than once"),
                       (dict(methods=["grpo", "grpo"]), "methods lists grpo more than once"),
                       (dict(eval_levels=[2, 2]), "eval_levels lists 2 more than once"),
                       (dict(eval_levels=[9]), r"eval_levels \[9\] are not levels of the task")):
        with pytest.raises(ValueError, match=match):
            MiniatureConfig(**bad)
    # the runs' training configs are checked with the config, not after the warm start
    for overrides, match in (({"reward.credit.bta": 1}, "bta"), ({"steps.x": 1}, "'steps' is a setting, not a section")):
        with pytest.raises(ValueError, match=f"make an invalid training config: .*{match}"):
            MiniatureConfig(train_overrides=overrides)
        with pytest.raises(ValueError, match=match):
            MiniatureConfig(variants={"v": {"method": "l2t", "overrides": overrides}})


def test_aggregate_mean_std_and_ratios():
    def ev(seed, acc, tok):
        return {"seed": seed, "accuracy": acc, "mean_tokens": tok, "train_seconds": 1.0,
                "per_level": {"1": {"accuracy": acc, "mean_tokens": tok}}}

    base = {"accuracy": 0.5, "mean_tokens": 40.0, "per_level": {"1": {"accuracy": 0.5, "mean_tokens": 40.0}}}
    rep = aggregate({"grpo": [ev(0, 0.6, 40.0), ev(1, 0.8, 60.0)], "l2t": [ev(0, 0.7, 20.0), ev(1, 0.7, 30.0)]}, base)
    g = rep["methods"]["grpo"]
    assert g["accuracy"]["mean"] == pytest.approx(0.7) and g["accuracy"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert rep["vs_grpo"]["l2t"]["token_ratio"] == pytest.approx(25.0 / 50.0)
    assert rep["vs_grpo"]["l2t"]["accuracy_delta"] == pytest.approx(0.0)
    table = markdown_table(rep)
    assert "| l2t | 0.700 ± 0.000 | 25.0 ± 7.1 |" in table and "| SFT base |" in table
    # against the necessary trace: the floor row, tokens ÷ necessary, and the floor over GRPO
    rep = aggregate({"grpo": [ev(0, 0.6, 40.0), ev(1, 0.8, 60.0)], "l2t": [ev(0, 0.7, 20.0), ev(1, 0.7, 30.0)]}, base,
                    {"mean_tokens": 25.0, "per_level": {"1": 25.0}})
    assert rep["vs_floor"] == {"SFT base": pytest.approx(1.6), "grpo": pytest.approx(2.0), "l2t": pytest.approx(1.0)}
    assert rep["floor_over_grpo"] == pytest.approx(0.5)
    table = markdown_table(rep)
    assert "| necessary trace (floor) | – | 25.0 | – | 25.0 |" in table
    w = welch_difference([0.7, 0.7], [0.6, 0.8])
    assert rep["vs_grpo"]["l2t"]["accuracy_welch"] == w and w["low"] < 0 < w["high"]
    assert rep["vs_grpo"]["grpo"]["accuracy_welch"] is None  # no test of GRPO against itself
    assert f"| l2t | 0.50 | +0.000 | [{w['low']:+.3f}, {w['high']:+.3f}] p={w['p']:.2f} | 1.00 |" in table
    assert "| grpo | 1.00 | +0.000 | – | 2.00 |" in table and "0.50× GRPO's tokens" in table
    assert "behaviour" not in rep["methods"]["l2t"] and "restate_share" not in table
    # the episode census of the greedy responses, when the evaluations carry it
    census = dict(zip(BEHAVIOUR, (10.0, 0.5, 1.0, 1.0, 0.3, 0.9, 0.1)))
    rep = aggregate({"grpo": [{**ev(0, 0.6, 40.0), **census}, {**ev(1, 0.8, 60.0), **census, "restate_share": 0.0}]},
                    {**base, **census})
    assert rep["methods"]["grpo"]["behaviour"]["restate_share"]["mean"] == pytest.approx(0.45)
    table = markdown_table(rep)
    assert "| SFT base | 10.00 | 0.50 | 1.00 | 1.00 | 0.30 | 0.90 | 0.10 |" in table
    assert "| grpo | 10.00 | 0.50 | 1.00 | 1.00 | 0.30 | 0.45 | 0.10 |" in table
    # an evaluation from before a census field: "–" where it is missing, the base row included
    old = {k: v for k, v in census.items() if k != "hard_step_error"}
    table = markdown_table(aggregate({"grpo": [{**ev(0, 0.6, 40.0), **old}]}, {**base, **old}))
    assert "| SFT base | 10.00 | 0.50 | 1.00 | 1.00 | – | 0.90 | 0.10 |" in table


def test_tradeoff_points_and_plot(tmp_path):
    """The accuracy–token plane: overall means, seeds and the hardest level, the floor's tokens."""
    from l2t_core.miniature_report import plot_tradeoff, tradeoff_points

    def ev(seed, acc, tok, acc2, tok2):
        return {"seed": seed, "accuracy": acc, "mean_tokens": tok, "train_seconds": 1.0,
                "per_level": {"1": {"accuracy": 1.0, "mean_tokens": 10.0}, "2": {"accuracy": acc2, "mean_tokens": tok2}}}

    base = {"accuracy": 0.5, "mean_tokens": 40.0, "per_level": {"1": {"accuracy": 1.0, "mean_tokens": 20.0},
                                                                "2": {"accuracy": 0.25, "mean_tokens": 60.0}}}
    floor = {"mean_tokens": 15.0, "per_level": {"1": 8.0, "2": 22.0}}
    rep = aggregate({"grpo": [ev(0, 0.6, 40.0, 0.5, 70.0), ev(1, 0.8, 60.0, 0.7, 90.0)],
                     "l2t": [ev(0, 0.7, 20.0, 0.6, 30.0), ev(1, 0.7, 30.0, 0.6, 50.0)]}, base, floor)
    t = tradeoff_points(rep)
    assert t["level"] == "2" and t["floor"] == {"tokens": 15.0, "hardest": 22.0}
    g = t["points"]["grpo"]
    assert (g["tokens"], g["accuracy"]) == (pytest.approx(50.0), pytest.approx(0.7))
    assert g["seeds"] == [(40.0, 0.6), (60.0, 0.8)]
    assert g["hardest"]["tokens"] == pytest.approx(80.0) and g["hardest"]["accuracy"] == pytest.approx(0.6)
    assert t["points"]["l2t"]["hardest"]["tokens_std"] == pytest.approx(mean_std([30.0, 50.0])["std"])
    assert t["points"]["SFT base"]["hardest"] == {"tokens": 60.0, "accuracy": 0.25, "tokens_std": 0.0,
                                                  "accuracy_std": 0.0}
    assert tradeoff_points({k: v for k, v in rep.items() if k != "floor"})["floor"] is None
    path = plot_tradeoff(rep, tmp_path, prefix="sampled_")
    assert path == tmp_path / "sampled_tradeoff.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fault_totals_sum_over_seeds_and_tabulate_the_hardest_level():
    def ev(seed, faults, misled):
        lv = {"n": 10, "accuracy": 1 - sum(faults.values()) / 10, "mean_tokens": 5.0,
              "wrong": sum(faults.values()), "faults": faults, "faults_misled": misled,
              "faults_after": {"check": sum(faults.values()) - misled, "step": misled}}
        return {"seed": seed, "accuracy": lv["accuracy"], "mean_tokens": 5.0, "train_seconds": 1.0,
                "per_level": {"1": {**lv, "faults": {}, "wrong": 0, "faults_misled": 0, "accuracy": 1.0}, "2": lv}}

    base = {"accuracy": 0.9, "mean_tokens": 6.0,
            "per_level": {"1": {"accuracy": 1.0, "mean_tokens": 5.0},
                          "2": {"n": 10, "accuracy": 0.9, "mean_tokens": 7.0, "wrong": 1,
                                "faults": {"check_wrong": 1}, "faults_misled": 0,
                                "faults_after": {"step": 1}}}}
    rep = aggregate({"grpo": [ev(0, {"unchecked_guess": 2}, 0), ev(1, {"unchecked_guess": 1, "lost_value": 2}, 1)],
                     "length_penalty": [ev(0, {"missing_moves": 3}, 3), ev(1, {}, 0)]}, base)
    assert rep["methods"]["grpo"]["faults"]["2"] == {
        "n": 20, "wrong": 5, "faults": {"lost_value": 2, "unchecked_guess": 3}, "misled": 1,
        "after": {"check": 4, "step": 1}}
    assert rep["methods"]["grpo"]["faults"]["1"]["wrong"] == 0
    table = markdown_table(rep)
    assert "Why level 2's wrong greedy answers are wrong" in table
    assert ("| method | wrong / n | check_wrong | lost_value | missing_moves | unchecked_guess | misled | "
            "after check | after repeat |") in table
    assert "| SFT base | 1 / 10 | 1 | 0 | 0 | 0 | 0 | 0 | 0 |" in table
    assert "| grpo | 5 / 20 | 0 | 2 | 0 | 3 | 1 | 4 | 0 |" in table
    assert "| length_penalty | 3 / 20 | 0 | 0 | 3 | 0 | 3 | 0 | 0 |" in table
    # evaluations without the replay (another task, or older reports): no fault table
    plain = {k: v for k, v in ev(0, {}, 0).items()}
    plain["per_level"] = {"2": {"n": 10, "accuracy": 1.0, "mean_tokens": 5.0}}
    rep = aggregate({"grpo": [plain]}, base)
    assert "faults" not in rep["methods"]["grpo"] and "Why level" not in markdown_table(rep)


@pytest.mark.slow
def test_miniature_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mini"
    report = run_miniature(out, MiniatureConfig.model_validate(TINY), show_progress=True)
    shown = capsys.readouterr()  # each run's bar, moved by the steps its worker reported
    for run in ("grpo s0", "l2t s0", "l2t_additive s0"):
        assert re.search(rf"{run} .* 2/2 done", shown.out), shown.out
    assert "Loading weights" not in shown.out + shown.err  # transformers' own bars stay out of the display
    data = json.loads((out / "miniature.json").read_text())
    assert set(data["methods"]) == {"grpo", "l2t", "l2t_additive"}
    for m in data["methods"].values():
        assert set(m["per_level"]) == {"1", "2"}
        assert 0.0 <= m["accuracy"]["mean"] <= 1.0 and m["mean_tokens"]["mean"] > 0
    assert "vs_grpo" in data and (out / "miniature.md").read_text().startswith("# L2T miniature")
    assert set(data["floor"]["per_level"]) == {"1", "2"} and 0 < data["floor"]["mean_tokens"]
    # the credit probe scores every method and variant, the variant as its runs train (its override)
    credit = data["credit"]
    assert set(credit["methods"]) == {"grpo", "l2t", "l2t_additive"} and credit["responses"] == 2 * TINY["group_size"]
    assert credit["settings"]["configs"]["l2t_additive"][1]["credit"]["credit"] == "additive"
    assert set(credit["settings"]["configs"]) == {"l2t_additive"}  # the methods at their defaults are not listed
    assert all("step_advantage" in m for m in credit["methods"].values())
    assert credit["methods"]["grpo"]["penalty_separation"] is None  # only a method charging the penalty has one
    assert "auc" in credit["methods"]["l2t"]["penalty_separation"]
    assert "Credit by episode kind" in (out / "miniature.md").read_text()
    trust = data["credit"]["guess_trust"]  # whom J believes after an unchecked hard step, on the same problems
    assert trust["problems"] == 2 and trust["hard_moves"] > 0 and 0 <= trust["right"]["repair_share"] <= 1
    assert "J takes the written result for the typical mistake" in (out / "miniature.md").read_text()
    for p in report["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "training.png").exists() and "Training dynamics" in (out / "miniature.md").read_text()
    assert str(out / "tradeoff.png") in report["plots"]
    for m in data["methods"].values():  # the training dynamics of every run, read back from its metrics
        t = m["training"]
        assert t["seeds"] == 1 and t["curve"]["step"] == [1, 2] and len(t["curve"]["mean_tokens"]) == 2
        assert 0 < t["rollout_tokens_first"]["mean"] <= TINY["max_new_tokens"] and t["reward_over_rollout"]["mean"] > 0
        assert set(m["seeds"][0]["training"]) >= {"rollout_accuracy_last", "score_length_spearman"}
        assert set(m["behaviour"]) == set(BEHAVIOUR) and 0 <= m["behaviour"]["redundant_share"]["mean"] <= 1
        f = m["faults"]["2"]  # every wrong held-out answer has its decisive fault
        assert f["n"] == 2 and f["wrong"] == sum(f["faults"].values()) and f["misled"] <= f["wrong"]
    for name, m in data["methods"].items():  # training time: the run's step times, resumed sessions included
        steps = read_table(RunStorage(str(out / "runs" / f"{name}-s0")), "train_steps")
        assert m["seeds"][0]["train_seconds"] == pytest.approx(steps["step_time_s"].sum()) and len(steps) == 2
    # finished runs are kept: a second call trains nothing and gives the same numbers, read without
    # starting a worker; a refused configuration is refused before any starts
    import l2t_core.miniature as miniature

    def no_workers(*a, **k):
        raise AssertionError("a worker pool started for finished runs")

    monkeypatch.setattr(miniature, "worker_pool", no_workers)
    credit = json.loads((out / "credit.json").read_text())
    (out / "credit.json").write_text(json.dumps({**{k: v for k, v in credit.items() if k != "guess_trust"},
                                                 "kept": True}))  # a probe saved before guess_trust existed
    again = run_miniature(out, MiniatureConfig.model_validate(TINY), show_progress=False)
    assert again["methods"] == report["methods"]
    credit_again = json.loads((out / "credit.json").read_text())  # guess_trust added; the sampled probe kept
    assert credit_again["kept"] and credit_again["guess_trust"] == credit["guess_trust"]
    # ...but never when the configuration changed: stale results are refused, naming the fields
    with pytest.raises(ValueError, match=r"different training configuration \(fields: optim\)"):
        run_miniature(out, MiniatureConfig.model_validate({**TINY, "lr": 1e-4}), show_progress=False)
    with pytest.raises(ValueError, match=r"different evaluation settings \(fields: max_new_tokens\)"):
        run_miniature(out, MiniatureConfig.model_validate({**TINY, "max_new_tokens": 40}), show_progress=False)
    with pytest.raises(ValueError, match=r"warm start .* different warm-start configuration \(fields: sft_steps\)"):
        run_miniature(out, MiniatureConfig.model_validate({**TINY, "warmstart": {**TINY["warmstart"], "sft_steps": 16}}),
                      show_progress=False)
    # the command line says the same in one line (ReuseError), and nothing is overwritten
    from l2t_core.cli import main as cli_main

    changed = out.parent / "changed.json"
    changed.write_text(json.dumps({**TINY, "lr": 1e-4}))
    before = (out / "miniature.json").read_text()
    recorded = (out / "miniature_config.json").read_text()
    with pytest.raises(SystemExit, match=rf"^l2t miniature --out {re.escape(str(out))}: run .* different training configuration"):
        cli_main(["miniature", "-q", "--config", str(changed), "--out", str(out)])
    assert (out / "miniature.json").read_text() == before
    assert (out / "miniature_config.json").read_text() == recorded  # still the configuration that made it
    monkeypatch.undo()
    # the sampled evaluation (METHOD.md §7) beside the greedy one: the trained runs are reused
    sampled = run_miniature(out, MiniatureConfig.model_validate({**TINY, "eval_samples": 2}), show_progress=False)
    assert sampled["methods"] == report["methods"]  # the greedy part unchanged: nothing trained again
    s = sampled["sampled"]
    assert s["decoding"] == {"samples": 2, "temperature": 0.6, "top_p": 0.95, "seed": 0}
    assert set(s["methods"]) == set(report["methods"]) and s["base"]["n"] == 2 * 4 and "maj_accuracy" in s["base"]
    for name, m in s["methods"].items():
        assert set(m["per_level"]) == {"1", "2"} and 0 <= m["maj_accuracy"]["mean"] <= 1
        ev = json.loads((out / "runs" / f"{name}-s0" / "eval_sampled.json").read_text())
        assert ev["n"] == 2 * 4 and ev["eval_settings"]["samples"] == 2
        assert m["accuracy"]["mean"] == ev["accuracy"] and m["seeds"][0]["train_seconds"] == ev["train_seconds"]
    assert s["hardest_level"]["level"] == "2" and s["vs_grpo"]["l2t"]["token_ratio"] > 0
    md = (out / "miniature.md").read_text()
    assert "## Sampled evaluation (METHOD.md §7)" in md and "| method | accuracy | maj@2 | mean tokens |" in md
    assert "Hardest level (L2): sampled pass@1 accuracy per seed" in md
    assert (out / "sampled_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sampled_tradeoff.png").read_bytes()[:4] == b"\x89PNG" and str(out / "sampled_tradeoff.png") in sampled["plots"]
    # other sampling settings sample again from the kept checkpoints, still without training
    more = run_miniature(out, MiniatureConfig.model_validate({**TINY, "eval_samples": 3}), show_progress=False)
    assert more["sampled"]["base"]["n"] == 3 * 4 and more["methods"] == report["methods"]
    assert json.loads((out / "runs" / "l2t-s0" / "eval_sampled.json").read_text())["n"] == 3 * 4
    # an experiment directory moved elsewhere is still the same experiment: nothing is redone
    moved = tmp_path / "elsewhere" / "mini"
    shutil.move(out, moved)
    there = run_miniature(moved, MiniatureConfig.model_validate({**TINY, "eval_samples": 3}), show_progress=False)
    assert there["methods"] == report["methods"] and there["sampled"]["methods"] == more["sampled"]["methods"]
    # an evaluation made before a census field existed is made again from the kept checkpoint, nothing trained
    run = moved / "runs" / "l2t-s0"
    stale = [run / "eval.json", run / "eval_sampled.json", moved / "base_eval.json", moved / "base_eval_sampled.json"]
    for f in stale:
        d = json.loads(f.read_text())
        del d["hard_step_error"]
        f.write_text(json.dumps(d))
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    redone = run_miniature(moved, MiniatureConfig.model_validate({**TINY, "eval_samples": 3}), show_progress=False)
    assert all("hard_step_error" in json.loads(f.read_text()) for f in stale)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert redone["methods"] == report["methods"] and redone["sampled"]["methods"] == more["sampled"]["methods"]
    untimed = lambda ev: {k: v for k, v in ev.items() if k != "seconds"}  # noqa: E731
    assert untimed(redone["base"]) == untimed(report["base"])
    assert untimed(redone["sampled"]["base"]) == untimed(more["sampled"]["base"])


def test_a_moved_experiment_keeps_its_runs_but_not_another_warm_start():
    from l2t_core.config import TrainConfig
    from l2t_core.miniature import _relocated

    here = TrainConfig(policy="/new/exp/sft", out="/new/exp/runs/grpo-s0")
    saved = {"policy": "exp/sft", "out": "exp/runs/grpo-s0"}  # made with a relative --out
    assert _relocated(saved, here)["policy"] == "/new/exp/sft"
    for other in ({"policy": "/elsewhere/sft", "out": "exp/runs/grpo-s0"},  # another warm start
                  {"policy": "s3://bucket/exp/sft", "out": "s3://bucket/exp/runs/grpo-s0"}):  # URLs: as saved
        assert _relocated(other, here) == other


def test_runs_train_on_the_warm_start_task(tmp_path):
    from l2t_core.miniature import run_configs

    for task in ("walk", "arithmetic"):
        cfg = MiniatureConfig.model_validate({**TINY, "warmstart": {**TINY["warmstart"], "task": task}})
        runs = run_configs(tmp_path, cfg, str(tmp_path / "sft"))
        assert runs and all(t.data.source == task for _, _, t in runs)


def test_the_slowest_runs_go_to_the_workers_first(tmp_path):
    """Longest first: runs sampling the policy's continuations for J, then a penalty with one
    backward per episode, then sampled forced answers (more samples first), then the rest in the
    order listed (methods, then variants; seeds in order)."""
    from l2t_core.miniature import run_configs, submission_order

    cont = {"reward.fitting.estimator": "continuation", "reward.fitting.mc_samples": 2,
            "reward.fitting.continuation_budget": TINY["max_new_tokens"]}
    cfg = MiniatureConfig.model_validate({
        **TINY, "methods": ["grpo", "length_penalty", "l2t", "mrt", "l2t_random_layers"], "seeds": [0, 1],
        "variants": {"l2t_mc": {"method": "l2t", "overrides": {"reward.fitting.estimator": "monte_carlo"}},
                     "l2t_cont": {"method": "l2t", "overrides": cont},
                     "l2t_cont4": {"method": "l2t", "overrides": {**cont, "reward.fitting.mc_samples": 4}},
                     "grpo_cont": {"method": "grpo", "overrides": cont},  # GRPO estimates no J
                     "l2t_rl_single": {"method": "l2t_random_layers",
                                       "overrides": {"reward.compression.attribution": "single_backward"}},
                     "l2t_every": {"method": "l2t", "overrides": {"reward.compression.targets": ["model.layers.*.mlp.down_proj"]}},
                     "l2t_last": {"method": "l2t", "overrides": {"reward.compression.targets": ["last_block"]}}}})
    runs = run_configs(tmp_path, cfg, str(tmp_path / "sft"))
    order = [f"{name}-s{seed}" for name, seed, _ in submission_order(runs)]
    assert order == ["l2t_cont4-s0", "l2t_cont4-s1", "l2t_cont-s0", "l2t_cont-s1",
                     "l2t_random_layers-s0", "l2t_random_layers-s1", "l2t_every-s0", "l2t_every-s1",  # per episode
                     "mrt-s0", "mrt-s1", "l2t_mc-s0", "l2t_mc-s1",  # both m = 4: as listed
                     "grpo-s0", "grpo-s1", "length_penalty-s0", "length_penalty-s1", "l2t-s0", "l2t-s1",
                     "grpo_cont-s0", "grpo_cont-s1", "l2t_rl_single-s0", "l2t_rl_single-s1", "l2t_last-s0",
                     "l2t_last-s1"]  # the last block's layers: one backward
    assert sorted(order) == sorted(f"{n}-s{s}" for n, s, _ in runs)  # every run, once


def test_runs_checkpoint_along_the_way_and_finished_runs_stay_reusable(tmp_path):
    """Runs save a checkpoint every ``checkpoint_every`` steps, so an interrupted experiment resumes
    (the trainer's resume equals an uninterrupted run: tests/test_trainer.py); how often a finished
    run was saved does not make it another run."""
    from l2t_core.miniature import _require_same, run_configs

    long = MiniatureConfig.model_validate({**TINY, "steps": 80})
    runs = run_configs(tmp_path, long, str(tmp_path / "sft"))
    assert {t.checkpoint_every for _, _, t in runs} == {10} and {t.keep_checkpoints for _, _, t in runs} == {1}
    short = run_configs(tmp_path, MiniatureConfig.model_validate({**TINY, "steps": 4}), str(tmp_path / "sft"))
    assert {t.checkpoint_every for _, _, t in short} == {4}  # never past the last step
    _, _, tcfg = runs[0]
    saved_once = json.loads(tcfg.model_copy(update={"checkpoint_every": 80}).model_dump_json())
    _require_same(saved_once, tcfg, "run", "training configuration")  # a run saved only at its end is reused
    with pytest.raises(ValueError, match=r"fields: optim"):
        _require_same({**saved_once, "optim": {**saved_once["optim"], "lr": 1e-4}}, tcfg, "run",
                      "training configuration")
    with pytest.raises(ValueError, match="checkpoint_every"):
        MiniatureConfig.model_validate({**TINY, "checkpoint_every": 0})


def test_hardest_level_per_seed_and_welch_against_the_references():
    def ev(seed, acc6, acc1=1.0):
        return {"seed": seed, "accuracy": (acc1 + acc6) / 2, "mean_tokens": 50.0, "train_seconds": 1.0,
                "per_level": {"1": {"accuracy": acc1, "mean_tokens": 20.0}, "6": {"accuracy": acc6, "mean_tokens": 80.0}}}

    base = {"accuracy": 0.8, "mean_tokens": 60.0,
            "per_level": {"1": {"accuracy": 1.0, "mean_tokens": 30.0}, "6": {"accuracy": 0.6, "mean_tokens": 90.0}}}
    lp, l2t, grpo = [0.42, 0.60, 0.72], [0.62, 0.77, 0.65], [0.65, 0.43, 0.65]
    rep = aggregate({"grpo": [ev(s, a) for s, a in enumerate(grpo)],
                     "length_penalty": [ev(s, a) for s, a in enumerate(lp)],
                     "l2t": [ev(s, a) for s, a in enumerate(l2t)]}, base)
    h = rep["hardest_level"]
    assert h["level"] == "6" and h["base"] == 0.6 and h["methods"]["l2t"]["values"] == l2t
    assert h["methods"]["l2t"]["vs_base"] == pytest.approx(sum(l2t) / 3 - 0.6)
    assert h["methods"]["length_penalty"]["std"] == pytest.approx(mean_std(lp)["std"])
    assert set(h["vs"]) == {"length_penalty", "grpo"} and set(h["vs"]["length_penalty"]) == {"grpo", "l2t"}
    assert h["vs"]["length_penalty"]["l2t"] == welch_difference(l2t, lp)
    assert rep["methods"]["l2t"]["seeds"][1]["per_level_accuracy"] == {"1": 1.0, "6": 0.77}
    table = markdown_table(rep)
    d = h["vs"]["length_penalty"]["l2t"]
    assert "Hardest level (L6)" in table and "(SFT base: 0.60)" in table
    assert (f"| l2t | 0.62, 0.77, 0.65 | {sum(l2t) / 3:.3f} ± {mean_std(l2t)['std']:.3f} | {sum(l2t) / 3 - 0.6:+.3f} | "
            f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] p={d['p']:.2f} |") in table
    assert "| length_penalty | 0.42, 0.60, 0.72 |" in table and "| – |" in table  # no difference from itself
    # one seed each: the difference without an interval; no level every method shares: no section
    one = aggregate({"grpo": [ev(0, 0.5)], "length_penalty": [ev(0, 0.4)]}, base)
    assert one["hardest_level"]["vs"]["length_penalty"]["grpo"]["low"] is None
    assert "+0.100 (no interval)" in markdown_table(one)
    apart = aggregate({"grpo": [{**ev(0, 0.5), "per_level": {"1": {"accuracy": 1.0, "mean_tokens": 2.0}}}],
                       "l2t": [{**ev(0, 0.5), "per_level": {"6": {"accuracy": 0.5, "mean_tokens": 2.0}}}]}, base)
    assert "hardest_level" not in apart and "Hardest level" not in markdown_table(apart)
    # no reference method among the runs (an ablation experiment): the base is the only comparison
    ablation = aggregate({"l2t": [ev(s, a) for s, a in enumerate(l2t)]}, base)
    sentence, table = markdown_table(ablation).split("Hardest level (L6)")[1].split("\n\n")[:2]
    assert sentence.endswith("difference of means from the SFT base (SFT base: 0.60):")
    lines = table.splitlines()
    assert lines[0] == "| method | per seed | mean ± std | − SFT base |"
    assert all(ln.count("|") == 5 for ln in lines), lines


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for a PID 1 that may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_training_workers_stop_when_the_experiment_process_is_killed(tmp_path):
    """SIGKILL (or a SIGTERM without handler) reaches the experiment's process only; its pool's
    workers must not train on unattended."""
    script = tmp_path / "experiment.py"
    script.write_text(
        "import multiprocessing as mp, os, signal, time\n"
        "from l2t_core.miniature import worker_pool\n"
        "if __name__ == '__main__':\n"
        "    pool = worker_pool(1, mp.get_context('spawn'), watch_every_s=0.1)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env) as proc:
        worker = int(proc.stdout.readline())  # not read to its end: a surviving worker holds the pipe open
        assert proc.wait(timeout=120) == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"training worker {worker} outlived the killed experiment process")

