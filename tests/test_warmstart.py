"""The SFT warm start: a tiny end-to-end run, the saved checkpoint and report, evaluation and G_k."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from l2t_core.models import build_char_tokenizer, build_tiny_qwen2, load_policy
from l2t_core.prompts import FORCE_ANSWER_SUFFIX
from l2t_core.sft import encode_pairs, lr_factor, sft
from l2t_core.tasks import arithmetic
from l2t_core.tasks.walk import TraceStyle, build_task_prompt, build_trace, dataset
from l2t_core.prompts import render_answer
from l2t_core.warmstart import (
    WarmStartConfig, answer_readout, check_gains, evaluate, held_out, sft_pairs, warm_start,
)

TINY = dict(
    train_size=200, sft_steps=20, batch_size=8, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
    intermediate_size=48, eval_levels=(1, 2), eval_per_level=3, eval_max_new_tokens=24, eval_loss_size=8,
)


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("warm")
    assert warm_start(out, WarmStartConfig(**TINY), show_progress=False) == out
    return out


def test_warm_start_writes_a_loadable_checkpoint_and_report(warm_dir):
    model, tok = load_policy(warm_dir)
    assert tok.eos_token == "<|endoftext|>" and len(tok("<episode_3>", add_special_tokens=False)["input_ids"]) == 1
    report = json.loads((warm_dir / "warmstart.json").read_text())
    for key in ("config", "final_loss", "eval_loss", "sft_seconds", "wall_seconds", "accuracy",
                "accuracy_per_level", "mean_tokens", "evaluation", "parameters"):
        assert key in report
    assert WarmStartConfig.model_validate(report["config"]) == WarmStartConfig(**TINY)
    assert math.isfinite(report["final_loss"]) and report["final_loss"] > 0
    assert set(report["accuracy_per_level"]) == {"1", "2"}
    assert report["parameters"] == sum(p.numel() for p in model.parameters())


def test_warm_start_is_deterministic_on_one_machine(warm_dir, tmp_path):
    """The same configuration on the same machine gives the same loss curve and weights to the bit
    (data, batches and init are seeded; across CPUs float kernels may differ, README)."""
    torch.set_num_threads(1)
    again = warm_start(tmp_path / "again", WarmStartConfig(**TINY), show_progress=False)
    first, second = (json.loads((d / "warmstart.json").read_text()) for d in (warm_dir, again))
    assert first["loss_curve"] == second["loss_curve"] and first["final_loss"] == second["final_loss"]
    a, b = load_policy(warm_dir)[0].state_dict(), load_policy(again)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_counts_per_level(warm_dir):
    model, tok = load_policy(warm_dir)
    probs = held_out((1, 3), 2) + held_out((3,), 1, seed=5)
    ev = evaluate(model, tok, probs, max_new_tokens=16, batch_size=4)
    assert ev["n"] == 5 and set(ev["per_level"]) == {"1", "3"}
    assert ev["per_level"]["1"]["n"] == 2 and ev["per_level"]["3"]["n"] == 3
    for s in [ev, *ev["per_level"].values()]:
        assert 0 <= s["accuracy"] <= 1 and 0 < s["mean_tokens"] <= 16
        for k in ("mean_episodes", "redundant_share", "hard_check_rate", "easy_check_rate", "tagged_share"):
            assert k in s


def test_evaluate_sampled_pass_at_1_and_majority(monkeypatch):
    """pass@1 is the mean correctness over every sample, per level too; maj@n votes per problem on
    the extracted answers (unanswered samples abstain, ties go to the earliest answer)."""
    import l2t_core.warmstart as ws
    from l2t_core.rollout.base import Completion

    p1, p3 = held_out((1,), 1)[0], held_out((3,), 1)[0]
    wrong = lambda p: str((int(p.answer) + 1) % 10)  # noqa: E731
    answers = {p1.id: [p1.answer, wrong(p1), wrong(p1), p1.answer],  # tie 2:2, the right one first: solved
               p3.id: [wrong(p3), None, p3.answer, wrong(p3)]}       # 2 wrong beat 1 right: not solved
    asked = {}

    def fake_generate(model, tokenizer, problems, **kw):
        asked.update(kw)
        return [[Completion([], [0] * 5, "no answer" if a is None else f"\\boxed{{{a}}}", True) for a in answers[p.id]]
                for p in problems]

    monkeypatch.setattr(ws, "generate", fake_generate)
    ev = ws.evaluate(None, None, [p1, p3], max_new_tokens=8, samples=4, temperature=0.6, top_p=0.95, seed=3)
    assert asked == {"max_new_tokens": 8, "batch_size": 64, "n": 4, "temperature": 0.6, "top_p": 0.95, "seed": 3}
    assert ev["n"] == 8 and ev["accuracy"] == pytest.approx(3 / 8) and ev["maj_accuracy"] == pytest.approx(0.5)
    assert ev["per_level"]["1"]["accuracy"] == 0.5 and ev["per_level"]["1"]["maj_accuracy"] == 1.0
    assert ev["per_level"]["3"]["accuracy"] == 0.25 and ev["per_level"]["3"]["maj_accuracy"] == 0.0
    assert ev["decoding"] == {"samples": 4, "temperature": 0.6, "top_p": 0.95, "seed": 3}


def test_evaluate_samples_a_real_model_reproducibly(warm_dir):
    model, tok = load_policy(warm_dir)
    probs = held_out((1, 2), 2)
    ev = evaluate(model, tok, probs, max_new_tokens=12, batch_size=4, samples=3, temperature=1.0, seed=7)
    assert ev["n"] == 12 and ev["per_level"]["1"]["n"] == 6 and 0 <= ev["maj_accuracy"] <= 1
    again = evaluate(model, tok, probs, max_new_tokens=12, batch_size=4, samples=3, temperature=1.0, seed=7)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in ev.items() if k != "seconds"}
    greedy = evaluate(model, tok, probs, max_new_tokens=12, batch_size=4)
    assert greedy["n"] == 4 and "maj_accuracy" not in greedy and greedy["decoding"]["temperature"] == 0
    with pytest.raises(ValueError, match="greedy decoding .* one response per problem"):
        evaluate(model, tok, probs, max_new_tokens=12, samples=2)


def test_check_gains_on_reference_traces(warm_dir):
    model, tok = load_policy(warm_dir)
    style = TraceStyle(guess_error=1.0, hard_check=1.0, easy_check=1.0, repeat=0.0, restate=0.0)
    res = check_gains(model, tok, dataset(4, 2, 2, seed=3, hard_prob=0.5), source="reference", n=2, style=style)
    assert res["scored"] == res["responses"] == 8
    assert {"step_hard", "check_hard", "check_hard_repair"} <= set(res["mean_gain"])
    assert res["count"]["check_hard"] == res["count"]["step_hard"] == res["count"]["check_hard_repair"]


def _naive_j(model, tok, prompt: str, response: str, answer: str) -> float:
    """p(answer | prompt, response, f) from one plain forward pass over the concatenation."""
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = enc(prompt) + enc(response) + enc(FORCE_ANSWER_SUFFIX)
    ans = enc(answer)
    ids = torch.tensor([ctx + ans])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return math.exp(sum(logp[len(ctx) - 1 + j, a].item() for j, a in enumerate(ans)))


def test_answer_readout_equals_naive_j_at_trace_start_and_end(warm_dir):
    model, tok = load_policy(warm_dir)
    style = TraceStyle(guess_error=1.0, hard_check=1.0, easy_check=1.0, repeat=0.0, restate=0.0)
    prob = dataset(1, 3, 3, seed=5, hard_prob=0.5)[0]
    res = answer_readout(model, tok, [prob], style=style, seed=4)
    trace = build_trace(prob, random.Random(4), style).text
    prompt, answer = build_task_prompt(prob), render_answer(prob.answer)
    assert res["traces"] == 1
    assert res["j_start"] == pytest.approx(_naive_j(model, tok, prompt, "", answer), abs=1e-5)
    assert res["j_end"] == pytest.approx(_naive_j(model, tok, prompt, trace, answer), abs=1e-5)
    assert 0 < res["j_mid"] < 1
    report = json.loads((warm_dir / "warmstart.json").read_text())["answer_readout"]
    assert report["traces"] > 0 and 0 <= report["j_start"] <= 1 and 0 <= report["j_end"] <= 1


def test_answer_readout_rejects_traces_that_never_segment(warm_dir, monkeypatch):
    from l2t_core.tasks import walk

    model, tok = load_policy(warm_dir)
    monkeypatch.setattr(walk, "build_trace", lambda *a, **k: SimpleNamespace(text="no think tags here"))
    with pytest.raises(ValueError, match="none of the 1 reference traces segments as tagged"):
        answer_readout(model, tok, dataset(1, 2, 2, seed=1), style=TraceStyle())


def test_sft_pairs_forced_share_and_targets():
    probs = dataset(400, 1, 3, seed=1)
    pairs = sft_pairs(probs, TraceStyle(), forced_frac=0.3, seed=0)
    forced = [e for e in pairs if len(e) == 4]
    assert abs(len(forced) / len(pairs) - 0.3) < 0.07
    assert all(len(e) == 2 and e[1].startswith("<think>") for e in pairs if len(e) != 4)
    by_prompt = {build_task_prompt(p): p.answer for p in probs}
    for prompt, prefix, suffix, target in forced:
        assert suffix == FORCE_ANSWER_SUFFIX and target == f"\\boxed{{{by_prompt[prompt]}}}"


def test_sft_validates_and_schedules():
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16)
    with pytest.raises(ValueError):
        sft(model, tok, [], steps=1)
    with pytest.raises(ValueError):
        sft(model, tok, [("a", "b")], steps=0)
    with pytest.raises(ValueError, match="even"):
        sft(model, tok, [("a", "b", "c")], steps=1)
    res = sft(model, tok, [("Compute (1+2) mod 10.\n", "3"), ("p\n", "<think>", "f", "4")] * 2, steps=3, batch_size=2,
              eval_pairs=[("x\n", "y")], show_progress=False)
    assert len(res.losses) == 3 and res.eval_losses[-1][0] == 3
    (ids, trained), = encode_pairs(tok, [("p\n", "<think>", "ff", "4")])
    assert ids == tok("p\n<think>ff4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert trained == [False, False, True, False, False, True, True]
    assert lr_factor(0, 100, 0.1, 0.0) == pytest.approx(0.1) and lr_factor(10, 100, 0.1, 0.0) == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.1, 0.05) == pytest.approx(0.05, abs=1e-3)


def test_task_selection():
    assert WarmStartConfig().task == "walk"
    arith = WarmStartConfig(task="arithmetic")
    assert arith.task_module() is arithmetic and isinstance(arith.trace_style(), arithmetic.TraceStyle)
    assert isinstance(WarmStartConfig().trace_style(), TraceStyle)
    held = held_out((2,), 3, task="arithmetic")
    assert all(p.problem.startswith("Compute (") for p in held)
    assert all(p.problem.startswith("from ") for p in held_out((2,), 3))
    pairs = sft_pairs(arithmetic.dataset(20, 1, 2, seed=0), arith.trace_style(), forced_frac=0.0, seed=0)
    assert all(prompt.startswith("Compute (") and "<episode_1>" in resp for prompt, resp in pairs)
    with pytest.raises(ValueError, match="mix tasks"):
        sft_pairs(dataset(2) + arithmetic.dataset(2), TraceStyle(), forced_frac=0.0, seed=0)
    with pytest.raises(ValueError):
        WarmStartConfig(task="chess")


def test_config_validation():
    with pytest.raises(ValueError):
        WarmStartConfig(min_steps=4, max_steps=2)
    with pytest.raises(ValueError):
        WarmStartConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError):
        WarmStartConfig(unknown_field=1)
    with pytest.raises(ValueError, match="concise"):
        WarmStartConfig(concise=-0.1)
    assert WarmStartConfig(concise=0.2).trace_style().concise == 0.2 and WarmStartConfig().trace_style().concise == 0.0


def test_response_record_flags_a_restatement_that_drops_a_move():
    """A restatement that is not the problem word for word (the failure of an over-compressed
    restatement: a move dropped, which the steps after it follow) is counted apart."""
    import random as _random

    from l2t_core.tasks import walk
    from l2t_core.warmstart import response_record, summarize

    p = walk.dataset(1, 4, 4, seed=3)[0]
    style = walk.TraceStyle(guess_error=0.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=1.0)
    text = walk.build_trace(p, _random.Random(0), style).text + "\n\n\\boxed{" + p.answer + "}"
    goal = f"goal {p.expression}"
    assert goal in text
    short = text.replace(goal, goal.rsplit(" ", 1)[0], 1)  # the last move dropped
    good, bad = response_record(p, text, 100, True), response_record(p, short, 99, True)
    assert good["restate"] == bad["restate"] == 1
    assert good["restate_wrong"] == 0 and bad["restate_wrong"] == 1
    s = summarize([good, bad, response_record(p, text.replace(f"<episode_1>{goal}</episode_1>\n", ""), 90, True)])
    assert s["restate_share"] == 2 / 3 and s["restate_wrong_share"] == 1 / 3


def test_summarize_counts_the_decisive_fault_of_each_wrong_response():
    """Each wrong response of a task that replays responses (the walk) carries its decisive fault
    (:func:`~l2t_core.tasks.walk.first_fault`); summarize counts them over the wrong responses only."""
    from l2t_core.tasks import walk
    from l2t_core.warmstart import response_record, summarize

    p = walk.Problem("w", "from 6: >> >", "7", 2, 6, (walk.Move(walk.HARD), walk.Move(walk.EASY)))

    def resp(*episodes, answer="7"):
        return walk.render_trace(episodes, answer)

    right = response_record(p, resp("6>>4 then >", "check 6>4>1", "1>7 then end"), 30, True)
    guess = response_record(p, resp("6>>4 then >", "4>1 then end", answer="1"), 20, True)
    lost = response_record(p, resp("6>>1 then end", answer="1"), 10, True)  # its then-list dropped the last move
    untagged = response_record(p, "\\boxed{3}", 1, True)
    assert right["correct"] and right["fault"] is None
    assert (guess["fault"], guess["fault_misled"]) == ("unchecked_guess", False)
    assert (lost["fault"], lost["fault_misled"]) == ("missing_moves", True)
    assert untagged["fault"] == "malformed" and not untagged["correct"]
    assert (right["fault_after"], guess["fault_after"], lost["fault_after"]) == (None, None, "step")
    s = summarize([right, guess, lost, untagged])
    assert s["wrong"] == 3 and s["faults_misled"] == 1 and s["faults_after"] == {"none": 2, "step": 1}
    assert s["faults"] == {"malformed": 1, "missing_moves": 1, "unchecked_guess": 1}
    # a task without the replay (the arithmetic task) reports no faults
    q = arithmetic.dataset(1, 1, 1, seed=0)[0]
    r = response_record(q, "\\boxed{" + q.answer + "}", 3, True)
    assert "fault" not in r and "faults" not in summarize([r])


def test_hard_step_error_is_the_share_of_hard_steps_written_wrong_checked_or_not():
    """``hard_step_error``: of all hard steps, those whose direct result is wrong (a one-hop-short
    guess), whether a check repairs it afterwards or not; how good the policy's guesses are."""
    from l2t_core.tasks import walk
    from l2t_core.warmstart import response_record, summarize

    p = walk.Problem("w", "from 6: >> >", "7", 2, 6, (walk.Move(walk.HARD), walk.Move(walk.EASY)))
    repaired = response_record(p, walk.render_trace(("6>>4 then >", "check 6>4>1", "1>7 then end"), "7"), 30, True)
    unchecked = response_record(p, walk.render_trace(("6>>4 then >", "4>1 then end"), "1"), 20, True)
    right = response_record(p, walk.render_trace(("6>>1 then >", "1>7 then end"), "7"), 20, True)
    assert (repaired["step_hard_wrong"], unchecked["step_hard_wrong"], right["step_hard_wrong"]) == (1, 1, 0)
    assert repaired["correct"] and not unchecked["correct"] and right["correct"]
    assert summarize([repaired, unchecked, right])["hard_step_error"] == 2 / 3
    assert summarize([right])["hard_step_error"] == 0.0
    assert summarize([response_record(p, "\\boxed{7}", 3, True)])["hard_step_error"] == 0.0  # no hard step at all


def test_eval_mode_restores_the_training_mode_also_after_an_error():
    import torch

    from l2t_core.models import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for training in (True, False):
        model.train(training)
        with eval_mode(model) as m:
            assert m is model and not model.training and not model[1].training
        assert model.training is training
    model.train()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            raise RuntimeError("inside")
    assert model.training
