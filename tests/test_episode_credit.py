"""Credit by episode kind (l2t_core.episode_credit), the necessary-trace floor and the episode keys."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from l2t_core.episode_credit import credit_by_kind, credit_table, kind_effects, method_configs
from l2t_core.config import RewardConfig
from l2t_core.tasks import arithmetic, walk
from l2t_core.warmstart import necessary_tokens


def test_episode_keys_split_hardness_and_repairs():
    infos = walk.classify_episodes(["goal from 6: >> >", "6>>2 then >", "check 6>4>1", "1>7 then end",
                                    "check 1>7", "again 1>7 then end"])
    assert [i.key for i in infos] == ["restate", "step_hard", "check_hard", "step_easy", "check_easy", "repeat"]
    # 6>>2 is a wrong direct result (F[F[6]] = 1), so the check after it is a repair
    assert infos[2].detail_key == "check_hard_repair" and infos[4].detail_key == "check_easy"
    assert walk.classify_episodes(["6>>1 then end", "check 6>4>1"])[1].detail_key == "check_hard_confirm"
    assert arithmetic.EpisodeInfo("other").key == "other"


def test_necessary_tokens_is_the_trace_with_every_hard_check_and_nothing_redundant():
    class CharTok:  # one token per character: the counts are the texts' lengths
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    rng = random.Random(0)
    problems = [walk.make_problem(rng, lv, idx=i) for i, lv in enumerate([1, 3, 3, 6])]
    floor = necessary_tokens(CharTok(), problems)
    style = walk.TraceStyle(guess_error=0.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=0.0)
    want = {}
    for p in problems:
        text = walk.build_trace(p, random.Random(5), style).text
        kinds = [e.kind for e in walk.build_trace(p, random.Random(5), style).episodes]
        assert kinds.count("check") == sum(m.hard for m in p.moves) and "repeat" not in kinds and "restate" not in kinds
        want.setdefault(str(p.level), []).append(len(text))
    assert floor["per_level"] == {lv: sum(v) / len(v) for lv, v in want.items()}
    assert floor["mean_tokens"] == pytest.approx(sum(sum(v) for v in want.values()) / len(problems))
    # the reference traces the SFT model imitates are never shorter than the floor
    for p in problems:
        ref = walk.build_trace(p, random.Random(1), walk.TraceStyle(easy_check=1.0, repeat=1.0)).text
        assert len(ref) > len(walk.build_trace(p, random.Random(1), style).text)


def test_kind_effects_by_hand():
    c = Counter
    groups = {
        0: [(1.0, c(check_easy=1), 50), (2.0, c(), 40), (0.0, c(check_easy=2, repeat=1), 70)],
        1: [(0.5, c(check_easy=1), 30), (0.5, c(check_easy=1), 30)],  # no response without: not counted
        2: [(-1.0, c(restate=1), 20), (1.0, c(), 10)],
    }
    eff = kind_effects(groups)
    w = eff["with_minus_without"]
    assert w["check_easy"] == {"delta": pytest.approx((1.0 + 0.0) / 2 - 2.0), "cells": 1}
    assert w["repeat"] == {"delta": pytest.approx(0.0 - 1.5), "cells": 1}
    assert w["restate"] == {"delta": pytest.approx(-2.0), "cells": 1}
    assert w["check_hard"] == {"delta": None, "cells": 0}
    # group 1 has no spread: no correlation; groups 0 and 2 are perfectly (anti-)ordered
    import numpy as np

    r0 = float(np.corrcoef([1.0, 2.0, 0.0], [50, 40, 70])[0, 1])
    assert eff["advantage_length_corr"] == {"mean": pytest.approx((r0 - 1.0) / 2), "cells": 2}
    table = credit_table({"methods": {"l2t": {**eff}}})
    assert "| l2t | -1.500 (1) | n/a | -1.500 (1) | -2.000 (1) |" in table
    assert table.splitlines()[2].endswith("| n/a | n/a |")  # a report made before step_advantage, penalty AUC
    table = credit_table({"methods": {"l2t": {**eff, "penalty_separation": {"auc": 0.625}},
                                      "grpo": {**eff, "penalty_separation": None}}})
    assert table.splitlines()[2].endswith("| 0.62 |") and table.splitlines()[3].endswith("| – |")


def test_method_configs_and_bad_input(model, tokenizer):
    tok = tokenizer
    cfgs = method_configs(["grpo", "l2t"])
    assert cfgs["l2t"][0] == "l2t" and isinstance(cfgs["l2t"][1], RewardConfig)
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        method_configs({"mine": ("ppo", RewardConfig())})
    with pytest.raises(ValueError, match="no methods"):
        method_configs([])
    problems = [walk.make_problem(random.Random(0), 2)]
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        credit_by_kind(model, tok, problems, group_size=1)
    with pytest.raises(ValueError, match="no problems"):
        credit_by_kind(model, tok, [])


def test_credit_by_kind_runs_every_method_on_the_same_samples(model, tokenizer):
    tok = tokenizer
    rng = random.Random(0)
    problems = [walk.make_problem(rng, 2, idx=i) for i in range(2)]
    rep = credit_by_kind(model, tok, problems, ["grpo", "l2t"], group_size=2, max_new_tokens=12, temperature=1.0)
    assert rep["responses"] == 4 and set(rep["methods"]) == {"grpo", "l2t"}
    assert 0.0 <= rep["tagged_share"] <= 1.0 and 0.0 <= rep["accuracy"] <= 1.0
    for m in rep["methods"].values():
        assert set(m["with_minus_without"]) == {"check_easy", "check_hard", "repeat", "restate"}
    # l2t's gains give the step-gain calibration (without cells when no response is tagged)
    assert "step_gain" in rep and (rep["step_gain"]["step"]["cells"] == 0 or rep["tagged_share"] > 0)
    assert rep["methods"]["l2t"]["step_gain"] == rep["step_gain"] and "step_gain" not in rep["methods"]["grpo"]
    assert "step_gain" not in credit_by_kind(model, tok, problems, ["grpo"], group_size=2, max_new_tokens=12)
    # only a method that charges the compression penalty reports how it separates redundant episodes
    assert rep["methods"]["grpo"]["penalty_separation"] is None
    assert set(rep["methods"]["l2t"]["penalty_separation"]) >= {"auc", "length_auc", "top_share", "auc_by_kind"}
    assert rep["methods"]["grpo"]["gain_separation"] is None and "auc" in rep["methods"]["l2t"]["gain_separation"]


def test_penalty_separation_against_hand_counted_pairs():
    """AUC = share of (redundant, other) pairs where the redundant episode pays more, ties half."""
    from l2t_core.episode_credit import redundancy_separation

    restate, repeat = walk.EpisodeInfo("restate"), walk.EpisodeInfo("repeat")
    easy_check, step = walk.EpisodeInfo("check", hard=False), walk.EpisodeInfo("step", hard=True)
    hard_check = walk.EpisodeInfo("check", hard=True)
    eps = [(restate, 3.0, 10), (repeat, 1.0, 4), (easy_check, 2.0, 2),  # redundant
           (step, 2.0, 4), (hard_check, 0.0, 8),  # the rest
           (walk.EpisodeInfo("other"), 99.0, 1), (step, float("nan"), 3)]  # left out
    sep = redundancy_separation(eps, top=0.2)
    assert (sep["redundant"], sep["other"]) == (3, 2)
    # pairs: 3>2, 3>0, 1<2, 1>0, 2=2 (half), 2>0 -> 4.5 of 6
    assert sep["auc"] == pytest.approx(4.5 / 6)
    assert sep["auc_by_kind"] == {"restate": 1.0, "repeat": 0.5, "check_easy": 0.75}
    # per token: 0.3, 0.25, 1.0 against 0.5, 0.0 -> 0.3<0.5, 0.3>0, 0.25<0.5, 0.25>0, 1>0.5, 1>0 -> 4 of 6
    assert sep["per_token_auc"] == pytest.approx(4 / 6)
    # tokens 10, 4, 2 against 4, 8 -> 10>4, 10>8, 4=4 (half), 4<8, 2<4, 2<8 -> 2.5 of 6
    assert sep["length_auc"] == pytest.approx(2.5 / 6)
    assert sep["top_share"] == pytest.approx(3.0 / 8.0)  # the largest one episode of 5 carries 3 of 8
    assert sep["median"] == {"redundant": 2.0, "other": 1.0}
    none = redundancy_separation([(step, 1.0, 3)])
    assert none["auc"] is None and none["auc_by_kind"]["restate"] is None and none["median"]["redundant"] is None
    assert redundancy_separation([(step, 0.0, 3)])["top_share"] is None  # nothing charged: no share to give
    gains = redundancy_separation([(repeat, -0.1, 4), (step, 0.2, 4), (hard_check, 0.0, 4)])
    assert gains["auc"] == 0.0 and gains["top_share"] is None  # a gain: lower on the redundant episode


def test_credit_table_reports_the_copy_separation():
    sep = {"auc": 0.8, "length_auc": 0.6, "auc_by_kind": {"restate": 0.9, "repeat": 0.85, "check_easy": None}}
    table = credit_table({"methods": {}, "copy_separation": sep})
    assert "with AUC 0.80 (restatements 0.90, repeats 0.85, easy-step checks n/a; the episode's length alone 0.60)" in table


def _hard(wrong: bool) -> "walk.EpisodeInfo":
    return walk.EpisodeInfo("step", hard=True, wrong=wrong)


def test_step_gain_calibration_pairs_wrong_and_right_hard_steps_within_a_group_and_move():
    from l2t_core.episode_credit import step_gain_calibration, step_gain_sentence

    check = lambda wrong: walk.EpisodeInfo("check", hard=True, wrong=wrong)  # noqa: E731
    easy = walk.EpisodeInfo("step", hard=False)
    responses = [
        # group 0, first hard move: wrong 0.3 (check -0.2), right 0.1 (check 0.0) -> step +0.2, check -0.2
        ("g0", [easy, _hard(True), check(True)], [0.9, 0.3, -0.2]),
        ("g0", [_hard(False), check(False)], [0.1, 0.0]),
        # group 1: two wrong (mean 0.5) vs one right (0.1) on the first move -> +0.4; no check -> no check cell
        ("g1", [_hard(True)], [0.4]),
        ("g1", [_hard(True), easy], [0.6, 0.0]),
        ("g1", [_hard(False), _hard(True)], [0.1, 7.0]),  # its second hard move has no right partner
        ("g2", [_hard(True)], [1.0]),  # a group with only wrong steps pairs nothing
    ]
    cal = step_gain_calibration(responses)
    assert cal["step"]["cells"] == 2 and cal["step"]["wrong_minus_right"] == pytest.approx((0.2 + 0.4) / 2)
    assert cal["step"]["stderr"] == pytest.approx(0.1)  # std of (0.2, 0.4) with ddof 1 over sqrt(2)
    assert cal["check"] == {"wrong_minus_right": pytest.approx(-0.2), "stderr": None, "cells": 1}
    assert "+0.300 ± 0.100 (2 cells); of the check after it: -0.200 (1 cells)" in step_gain_sentence(cal)
    assert "J rises when the model writes a wrong step" in step_gain_sentence(cal)  # 0.3 >= 2 standard errors
    noisy = {**cal, "step": {**cal["step"], "stderr": 0.2}}
    assert "no evidence either way" in step_gain_sentence(noisy)
    calibrated = {**cal, "step": {**cal["step"], "wrong_minus_right": -0.3}}
    assert "as the fitting gain needs" in step_gain_sentence(calibrated)
    assert step_gain_calibration([])["step"] == {"wrong_minus_right": None, "stderr": None, "cells": 0}
    assert "nothing to compare" in step_gain_sentence(step_gain_calibration([]))  # `l2t step-gains` on such a run
    # every cell the same difference, or none at all: zero spread is no evidence of a zero difference
    flat = {"step": {"wrong_minus_right": 0.0, "stderr": 0.0, "cells": 60}, "check": cal["check"]}
    assert "no evidence either way" in step_gain_sentence(flat)
    with pytest.raises(ValueError, match="2 episode kinds but 1 gains"):
        step_gain_calibration([("g", [_hard(True), easy], [0.1])])
    # any per-episode value: an episode without a value (NaN: no tokens) is left out of its cell
    adv = step_gain_calibration([("g", [_hard(True)], [0.5]), ("g", [_hard(True)], [float("nan")]),
                                 ("g", [_hard(False)], [1.0])], what="token advantages")
    assert adv["step"] == {"wrong_minus_right": pytest.approx(-0.5), "stderr": None, "cells": 1}
    with pytest.raises(ValueError, match="1 episode kinds but 2 token advantages"):
        step_gain_calibration([("g", [_hard(True)], [0.1, 0.2])], what="token advantages")


def test_rollout_step_gains_reads_a_runs_logged_rollouts(tmp_path, capsys):
    """Joined by (step, rank, rollout), grouped by (step, group), in the chosen window of steps."""
    from l2t_core.checkpoint import RunStorage
    from l2t_core.episode_credit import rollout_step_gains
    from l2t_core.metrics import MetricsWriter

    wrong = walk.render_trace(("6>>4 then >", "check 6>4>1", "1>7 then end"), "7")  # F[F[6]] = 1
    right = walk.render_trace(("6>>1 then >", "check 6>4>1", "1>7 then end"), "7")
    writer = MetricsWriter(RunStorage(str(tmp_path)))
    for step, (g_wrong, g_right) in ((1, (0.5, 0.2)), (2, (0.1, 0.4))):
        for i, (text, g) in enumerate(((wrong, g_wrong), (right, g_right), ("no tags", None))):
            writer.add("rollouts", [{"step": step, "rank": 0, "rollout": i, "group": 0, "response": text}])
            if g is not None:  # G_k of the step, its check and the last step; P̂_k 0.1, 0.2, 0.3
                writer.add("episode_rewards", [{"step": step, "rank": 0, "rollout": i, "episode": k + 1,
                                                "fitting_gain": v, "penalty_hat": 0.1 * (k + 1),
                                                "process_reward": v - 0.06 * (k + 1), "num_tokens": 10}
                                               for k, v in enumerate((g, -g, 0.05))])
    writer.flush(1, 2)
    both = rollout_step_gains(tmp_path)
    assert both["steps"] == [1, 2] and both["step"]["cells"] == 2
    assert both["step"]["wrong_minus_right"] == pytest.approx(((0.5 - 0.2) + (0.1 - 0.4)) / 2)
    # what the process reward paid each kind: the wrong step's check repairs it, the right one's confirms
    by_kind = both["by_kind"]
    assert list(by_kind) == ["check_hard_confirm", "check_hard_repair", "step_easy", "step_hard"]
    assert by_kind["step_hard"]["n"] == 4 and by_kind["step_hard"]["gain"] == pytest.approx((0.5 + 0.2 + 0.1 + 0.4) / 4)
    assert by_kind["check_hard_repair"]["gain"] == pytest.approx(-(0.5 + 0.1) / 2)
    easy = by_kind["step_easy"]
    assert easy["n"] == 4 and easy["penalty_hat"] == pytest.approx(0.3) and easy["penalty_hat_median"] == pytest.approx(0.3)
    assert easy["process"] == pytest.approx(0.05 - 0.18) and easy["process_per_token"] == pytest.approx((0.05 - 0.18) / 10)
    late = rollout_step_gains(tmp_path, first_step=2)
    assert late["step"]["wrong_minus_right"] == pytest.approx(-0.3) and late["check"]["wrong_minus_right"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no logged rollouts with episode rewards"):
        rollout_step_gains(tmp_path / "empty")
    # the same through the command line, one JSON line per run with the reading in words
    from l2t_core.cli import main

    assert main(["step-gains", str(tmp_path), "--steps", "2", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == [2, 2] and out["step"] == late["step"] and "no evidence either way" in out["reading"]  # one cell
    with pytest.raises(SystemExit, match="l2t step-gains: .*no logged rollouts"):
        main(["step-gains", str(tmp_path / "empty")])
    # a baseline logs G_k = 0 for every episode: refused, not read as "no difference"
    (tmp_path / "train_config.json").write_text(json.dumps({"method": "grpo"}))
    with pytest.raises(ValueError, match="method 'grpo', which computes no fitting gain"):
        rollout_step_gains(tmp_path)
    with pytest.raises(SystemExit, match=r"steps 2\.\.1 are no range"):
        main(["step-gains", str(tmp_path), "--steps", "2", "1"])
    (tmp_path / "train_config.json").write_text(json.dumps({"method": "l2t_no_penalty"}))
    assert rollout_step_gains(tmp_path, first_step=2)["step"] == late["step"]



def test_rollout_step_gains_segments_with_the_runs_own_segmentation(tmp_path):
    """A run trained with segmentation.numbering='ignore' logged episode rewards for misnumbered
    traces (its reward segmented them as tagged): the reading segments them the same way. Failed
    with the default segmentation: every such response read as malformed and was left out."""
    from l2t_core.checkpoint import RunStorage
    from l2t_core.config import TrainConfig
    from l2t_core.episode_credit import rollout_step_gains
    from l2t_core.episodes import segment
    from l2t_core.metrics import MetricsWriter

    def misnumbered(text):  # <episode_2> ... <episode_3>: 1, 3, 4 instead of 1, 2, 3
        for k in (3, 2):
            text = text.replace(f"episode_{k}>", f"episode_{k + 1}>")
        return text

    wrong = misnumbered(walk.render_trace(("6>>4 then >", "check 6>4>1", "1>7 then end"), "7"))
    right = misnumbered(walk.render_trace(("6>>1 then >", "check 6>4>1", "1>7 then end"), "7"))
    assert segment(wrong).status == "malformed" and segment(wrong, numbering="ignore").status == "tagged"
    cfg = TrainConfig(policy="p", method="l2t", reward={"segmentation": {"numbering": "ignore"}})
    (tmp_path / "train_config.json").write_text(cfg.model_dump_json())
    writer = MetricsWriter(RunStorage(str(tmp_path)))
    for i, (text, g) in enumerate(((wrong, 0.5), (right, 0.2))):
        writer.add("rollouts", [{"step": 1, "rank": 0, "rollout": i, "group": 0, "response": text}])
        writer.add("episode_rewards", [{"step": 1, "rank": 0, "rollout": i, "episode": k + 1, "fitting_gain": v,
                                        "penalty_hat": 0.1, "process_reward": v, "num_tokens": 10}
                                       for k, v in enumerate((g, -g, 0.05))])
    writer.flush(1, 1)
    out = rollout_step_gains(tmp_path)
    assert out["step"]["cells"] == 1 and out["step"]["wrong_minus_right"] == pytest.approx(0.5 - 0.2)
    assert out["by_kind"]["step_hard"]["n"] == 2

def test_step_gain_comes_from_the_first_method_that_has_a_fitting_gain():
    """grpo, the length penalty and MRT report G_k = 0 for every episode: the probe's step_gain must
    not be read from them (it once was, when grpo came first, and said J was calibrated)."""
    from l2t_core.episode_credit import gain_source

    assert gain_source(method_configs(["grpo", "length_penalty", "mrt", "l2t_no_penalty", "l2t"])) == "l2t_no_penalty"
    assert gain_source(method_configs(["grpo", "length_penalty"])) is None
    assert gain_source({"mine": ("l2t_random_layers", RewardConfig()), "l2t": ("l2t", RewardConfig())}) == "mine"


def _brute_j(model, tok, prompt: str, prefix: str, answer: str) -> float:
    """J = p(\\boxed{answer} | prompt ⊕ prefix ⊕ force suffix) by one plain forward pass."""
    import torch

    from l2t_core.prompts import FORCE_ANSWER_SUFFIX, render_answer

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = enc(prompt) + enc(prefix) + enc(FORCE_ANSWER_SUFFIX)
    ans = enc(render_answer(answer))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + ans])).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, a] for i, a in enumerate(ans)).exp())


def _walk_probe_cli(tmp_path, capsys, model, tok, command: str, *args: str) -> dict:
    """``l2t COMMAND --model tiny=DIR ARGS`` on ``model`` saved with its tokenizer; its one JSON line."""
    from l2t_core.cli import main

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main([command, "--model", f"tiny={tmp_path / 'm'}", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_guess_trust_reads_j_right_after_each_hard_step_for_the_three_answers(tmp_path, capsys):
    """Against plain forward passes on the cut texts, on a random tiny model with the warm start's
    character tokenizer (episode tags are single tokens, so a cut text tokenizes as the prefix)."""
    from l2t_core.episode_credit import guess_trust
    from l2t_core.models import build_char_tokenizer, build_tiny_qwen2

    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=3).eval()
    moves = (walk.Move(">>"), walk.Move(">"), walk.Move(">>"))
    problems = [walk._problem(4, moves, 0), walk._problem(7, (walk.Move(">"), walk.Move(">>")), 1)]
    res = guess_trust(model, tok, problems)
    assert res["problems"] == 2 and res["hard_moves"] == 3
    want = {("right", "truth"): [], ("right", "repair"): [], ("wrong", "truth"): [], ("wrong", "trust"): []}
    for p in problems:
        x, truth = p.start, int(p.answer)
        episodes = []
        for i, m in enumerate(p.moves):
            rest = p.moves[i + 1:]
            if m.hard:
                for written, value in (("right", m.apply(x)), ("wrong", walk.hop(x, 1))):
                    body = episodes + [walk.step_text(x, m, value, rest)]
                    prefix = "<think>\n" + "".join(f"<episode_{k}>{t}</episode_{k}>\n" for k, t in enumerate(body, 1))
                    other = ("repair", walk.hop(truth, 1)) if written == "right" else ("trust", walk.hop(truth, 9))
                    for label, a in (("truth", truth), other):
                        want[(written, label)].append(_brute_j(model, tok, walk.build_task_prompt(p), prefix, str(a)))
                episodes += [walk.step_text(x, m, m.apply(x), rest), walk.check_text(x, m)]
            else:
                episodes.append(walk.step_text(x, m, m.apply(x), rest))
            x = m.apply(x)
    for (written, label), js in want.items():
        assert res[written][label] == pytest.approx(sum(js) / len(js), rel=1e-4, abs=1e-7), (written, label)
    diffs = [w - r for w, r in zip(want[("wrong", "truth")], want[("right", "truth")])]
    assert res["gain_wrong_minus_right"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4, abs=1e-7)
    shares = [b / (a + b) for a, b in zip(want[("right", "truth")], want[("right", "repair")])]
    assert res["right"]["repair_share"] == pytest.approx(sum(shares) / len(shares), rel=1e-4)
    with pytest.raises(ValueError, match="walk task only"):
        guess_trust(model, tok, [arithmetic.make_problem(random.Random(0), 2)])
    with pytest.raises(ValueError, match="none of the 1 problems has a hard move"):
        guess_trust(model, tok, [walk._problem(2, (walk.Move(">"),), 0)])
    # the command line: saved checkpoints, held-out problems, one JSON line per model with the reading
    out = _walk_probe_cli(tmp_path, capsys, model, tok, "guess-trust", "--problems", "3", "--min-steps", "2")
    held = walk.dataset(3, 2, 6, seed=0, split="heldout")
    assert out["model"] == "tiny" and out["problems"] == 3
    assert out["gain_wrong_minus_right"] == pytest.approx(guess_trust(model, tok, held)["gain_wrong_minus_right"],
                                                          rel=1e-4, abs=1e-7)
    assert "J takes the written result for the typical mistake" in out["reading"]
    from l2t_core.cli import main

    with pytest.raises(SystemExit, match="l2t guess-trust: --model '=x': write NAME=DIR"):
        main(["guess-trust", "--model", "=x"])
    for command in ("guess-trust", "check-odds", "credit"):  # a step range the task lacks: before any model loads
        with pytest.raises(SystemExit, match=rf"l2t {command} --min-steps/--max-steps: .*got 6, 4"):
            main([command, "--model", "/no/such/model", "--min-steps", "6", "--max-steps", "4"])


def test_credit_command_scores_the_same_samples_under_each_estimator(tmp_path, capsys):
    from l2t_core.cli import main
    from l2t_core.models import build_char_tokenizer, build_tiny_qwen2

    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=24, seed=4)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main(["credit", "--model", str(tmp_path / "m"), "--problems", "2", "--group-size", "2",
                 "--max-new-tokens", "12", "--mc-samples", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["estimator"] for x in lines] == ["answer_logprob", "continuation"]
    for x in lines:  # the same samples: same outcomes; a random model tags nothing, so nothing to compare
        assert x["responses"] == 4 and x["accuracy"] == lines[0]["accuracy"]
        assert set(x["step_gain"]) == {"step", "check"} and "nothing to compare" in x["reading"]
        assert x["step_advantage"]["step"]["cells"] == 0
    # every method and variant of a miniature config, as its runs train them, beside an estimator
    cfg = tmp_path / "mini.json"
    cfg.write_text(json.dumps({"methods": ["grpo"], "variants": {
        "l2t_add": {"method": "l2t", "overrides": {"reward.credit.credit": "additive", "reward.credit.beta": 0.2}}}}))
    assert main(["credit", "--model", str(tmp_path / "m"), "--config", str(cfg), "--estimator", "answer_logprob",
                 "--problems", "2", "--group-size", "2", "--max-new-tokens", "12"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["name"], x["method"]) for x in lines] == [("grpo", "grpo"), ("l2t_add", "l2t"), ("answer_logprob", "l2t")]
    assert "step_gain" not in lines[0] and "step_gain" in lines[1] and lines[2]["estimator"] == "answer_logprob"
    with pytest.raises(SystemExit, match="unknown method 'ppo'"):
        cfg.write_text(json.dumps({"methods": ["ppo"]}))
        main(["credit", "--model", str(tmp_path / "m"), "--config", str(cfg)])
    with pytest.raises(SystemExit, match="--estimator continuation is also a method or variant name"):
        cfg.write_text(json.dumps({"methods": [], "variants": {"continuation": {"method": "l2t"}}}))
        main(["credit", "--model", str(tmp_path / "m"), "--config", str(cfg), "--estimator", "continuation"])


def test_step_advantage_is_what_each_update_teaches_a_wrong_hard_step(monkeypatch):
    """On fixed samples of one group (a hard move guessed wrong and unchecked, so answered wrong,
    and the same move written right): GRPO broadcasts A_i = -1 and +1 (population std), so the
    wrong step's tokens get 2 less than the right one's."""
    import l2t_core.episode_credit as ec
    from l2t_core.models import build_char_tokenizer, build_tiny_qwen2
    from l2t_core.rollout.base import Completion
    from l2t_core.tasks.common import render_trace

    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=24, seed=4)
    problem = walk.make_problem(random.Random(3), 1, hard_prob=1.0)
    move, x = problem.moves[0], problem.start
    texts = [render_trace([walk.step_text(x, move, r, [])], str(r)) for r in (walk.fast_guess(x, move), move.apply(x))]

    def fixed_samples(model, tokenizer, problems, **kw):
        return [[Completion([], tokenizer(t, add_special_tokens=False)["input_ids"], t, True) for t in texts]
                for _ in problems]

    monkeypatch.setattr(ec, "generate", fixed_samples)
    rep = credit_by_kind(model, tok, [problem], ["grpo", "l2t"], group_size=2, max_new_tokens=64)
    assert rep["tagged_share"] == 1.0 and rep["accuracy"] == 0.5
    grpo = rep["methods"]["grpo"]["step_advantage"]
    assert grpo["step"]["cells"] == 1 and grpo["step"]["wrong_minus_right"] == pytest.approx(-2.0, abs=1e-5)
    assert grpo["check"]["cells"] == 0  # neither step is checked
    assert rep["methods"]["l2t"]["step_advantage"]["step"]["cells"] == 1
    assert "| -2.000 (1) |" in credit_table(rep)
    # the reference signal, once for the samples: two steps, both useful, so no AUC
    assert (rep["copy_separation"]["redundant"], rep["copy_separation"]["other"]) == (0, 2)
    assert rep["copy_separation"]["auc"] is None and "For reference" not in credit_table(rep)


def test_check_decisions_read_the_check_token_in_the_middle_and_the_tag_after_the_last_step(tmp_path, capsys):
    """Against plain forward passes on the cut texts (a random tiny model, the warm start's character
    tokenizer), and the gradient transfer against per-point autograd."""
    import torch

    from l2t_core.episode_credit import check_decisions
    from l2t_core.models import build_char_tokenizer, build_tiny_qwen2

    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=5).eval()
    moves = (walk.Move(">>"), walk.Move(">"), walk.Move(">>"), walk.Move(">"))
    problems = [walk._problem(4, moves, 0), walk._problem(7, (walk.Move(">"), walk.Move(">>")), 1)]
    res = check_decisions(model, tok, problems, context="necessary", gradients=True)

    def brute(prefix_text, prompt, nxt):  # log-odds of the first token of nxt after prefix_text
        pre = tok(prefix_text, add_special_tokens=False)["input_ids"]
        token = tok(prefix_text + nxt, add_special_tokens=False)["input_ids"][len(pre)]
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + pre
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[token]
        return lp - torch.log1p(-lp.exp())

    want = {(pl, k): [] for pl in ("middle", "last") for k in ("easy", "hard")}
    for p in problems:  # the necessary trace: every hard step checked, nothing else
        x, body = p.start, []
        for i, m in enumerate(p.moves):
            body.append(walk.step_text(x, m, m.apply(x), p.moves[i + 1:]))
            k = len(body)
            head = "<think>\n" + "".join(f"<episode_{n}>{t}</episode_{n}>\n" for n, t in enumerate(body, 1))
            last = i == len(p.moves) - 1
            point = (head, f"<episode_{k + 1}>") if last else (head + f"<episode_{k + 1}>", "check")
            want[("last" if last else "middle", "hard" if m.hard else "easy")].append((walk.build_task_prompt(p), *point))
            if m.hard:
                body.append(walk.check_text(x, m))
            x = m.apply(x)
    for (pl, k), pts in want.items():
        lo = [brute(text, prompt, nxt).item() for prompt, text, nxt in pts]
        assert res[pl][k]["points"] == len(pts)
        assert res[pl][k]["log_odds"] == pytest.approx(sum(lo) / len(lo), rel=1e-4, abs=1e-5), (pl, k)
    for pl in ("middle", "last"):
        g = {}
        for k in ("easy", "hard"):
            grads = []
            for prompt, text, nxt in want[(pl, k)]:
                model.zero_grad()
                brute(text, prompt, nxt).backward()
                grads.append(torch.cat([q.grad.flatten().double() for q in model.parameters()]))
            g[k] = torch.stack(grads).mean(0)
        assert res[pl]["hard_per_easy"] == pytest.approx(float(g["hard"] @ g["easy"] / (g["easy"] @ g["easy"])), rel=1e-3)
        assert res[pl]["gradient_cosine"] == pytest.approx(
            float(g["hard"] @ g["easy"] / (g["hard"].norm() * g["easy"].norm())), rel=1e-3)
        assert res[pl]["gap"] == pytest.approx(res[pl]["hard"]["log_odds"] - res[pl]["easy"]["log_odds"])
    with pytest.raises(ValueError, match="walk task only"):
        check_decisions(model, tok, [arithmetic.make_problem(random.Random(0), 2)])
    with pytest.raises(ValueError, match="has both an easy and a hard step"):
        check_decisions(model, tok, [walk._problem(2, (walk.Move(">"),), 0)])
    # the command line: one JSON line per model, on held-out problems
    out = _walk_probe_cli(tmp_path, capsys, model, tok, "check-odds", "--problems", "4", "--context", "necessary")
    held = walk.dataset(4, 3, 6, seed=0, split="heldout")
    assert out["model"] == "tiny" and out["context"] == "necessary" and "gradient_cosine" not in out["middle"]
    assert out["middle"]["gap"] == pytest.approx(check_decisions(model, tok, held, context="necessary")["middle"]["gap"])
