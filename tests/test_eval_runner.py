"""The evaluation machinery end to end on real benchmark slices with the tiny model: sample
counts, token statistics, verification, report files and valid PNG plots. (The tiny model
scores about 0 on MATH500/AIME; the checks are on the machinery.)"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from l2t_core.eval.datasets import load_benchmark
from l2t_core.eval.report import write_report
from l2t_core.eval.runner import EvalSettings, evaluate_math, summarize, verify_all
from l2t_core.rollout.hf import HFRolloutEngine

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_model_on_math500_and_aime24_slices(model, tokenizer, tmp_path):
    engine = HFRolloutEngine(model, tokenizer)
    settings = EvalSettings(n=4, max_new_tokens=12, maj_k=4, prompts_per_call=8)
    results = {}
    for name in ("math500", "aime24"):
        items = load_benchmark(name, limit=20)
        res = evaluate_math(engine, tokenizer, items, settings)
        rows = res.rows
        assert len(rows) == 20 * 4 and rows["problem_id"].nunique() == 20
        assert all(sorted(g) == [0, 1, 2, 3] for _, g in rows.groupby("problem_id")["sample"])
        assert rows["response_tokens"].between(0, 12).all()
        assert res.summary["samples"] == 80 and 0.0 <= res.summary["pass@1"] <= 1.0
        assert res.summary["mean_tokens"] == pytest.approx(rows["response_tokens"].mean())
        results[name] = res
    assert set(results["math500"].summary["per_group"]) <= {f"level {i}" for i in range(1, 6)}
    rep = write_report(tmp_path / "report", results, model="tiny")
    for f in rep["files"].values():
        assert (tmp_path / "report" / f.split("/")[-1]).stat().st_size > 0
    for p in rep["plots"]:
        assert open(p, "rb").read(8) == PNG
    back = pd.read_parquet(rep["files"]["eval_results.parquet"])
    assert len(back) == 160 and set(back["benchmark"]) == {"math500", "aime24"}
    assert json.loads(open(rep["files"]["report.json"]).read())["benchmarks"]["aime24"]["problems"] == 20


@pytest.mark.slow
def test_verification_and_summary_on_gold_answers():
    items = load_benchmark("math500", limit=12)
    gold = [f"<think>\nok\n</think>\n\n\\boxed{{{i.answer}}}" for i in items]
    other = [f"<think>\nok\n</think>\n\n\\boxed{{{items[(k + 1) % 12].answer}}}" for k in range(12)]
    v_gold = verify_all(gold, [i.accepted_answers for i in items])
    v_other = verify_all(other, [i.accepted_answers for i in items], workers=2)
    assert all(v.correct for v in v_gold) and sum(v.correct for v in v_other) <= 1
    rows = pd.DataFrame({"problem_id": ["a"] * 4 + ["b"] * 4, "sample": list(range(4)) * 2, "group": ["g"] * 8,
                         "correct": [True, False, False, True, False, False, False, True],
                         "answer": ["1", "2", "2", "1", "5", "5", "6", "7"], "response_tokens": [10] * 8,
                         "finished": [True] * 8})
    s = summarize(rows, 4)
    assert s["pass@1"] == pytest.approx((0.5 + 0.25) / 2) and s["maj@4"] == pytest.approx(0.5)
    assert s["per_group"]["g"]["problems"] == 2
    # two benchmarks of one table that reuse an id are two problems, not one of eight samples
    both = rows.assign(benchmark=["x"] * 4 + ["y"] * 4, problem_id=["1"] * 8)
    s2 = summarize(both, 4)
    assert (s2["problems"], s2["pass@1"], s2["maj@4"]) == (2, s["pass@1"], s["maj@4"])


def test_settings_and_empty_input_errors(model, tokenizer):
    with pytest.raises(ValueError, match="no problems"):
        evaluate_math(HFRolloutEngine(model, tokenizer), tokenizer, [])
    for bad, field in ((dict(n=0), "n"), (dict(maj_k=0), "maj_k"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                       (dict(verify_timeout_s=float("inf")), "verify_timeout_s")):
        with pytest.raises(ValueError, match=rf"EvalSettings\.{field} must be"):
            EvalSettings(**bad)
    EvalSettings(temperature=0.0, top_p=1.0)  # greedy is allowed


def test_l2t_eval_command_writes_a_report(tiny_dir, tmp_path, capsys):
    from l2t_core.cli import main

    assert main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "amc23", "--limit", "3",
                 "--n", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "rep")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["pass@1"]) == {"aime24", "amc23"}
    rows = pd.read_parquet(tmp_path / "rep" / "eval_results.parquet")
    assert len(rows) == 2 * 3 * 2 and (tmp_path / "rep" / "report.html").is_file()
    with pytest.raises(SystemExit, match="outside"):  # pass@3 from 2 samples: refused before any compute
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "humaneval", "--limit", "1", "--n", "2",
              "--pass-k", "3", "--out", str(tmp_path / "x")])
    # refused before any sampling: a report of another evaluation in --out (kept), an --out that cannot be
    # written, bad sampling flags (named as flags), a temperature vLLM would raise to its floor
    before = (tmp_path / "rep" / "report.json").read_text()
    with pytest.raises(SystemExit, match=r"--out: .*rep holds the report of .* on aime24, amc23; this evaluation "
                                         r"\(.* on aime25\) would replace it"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime25", "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "report.json").read_text() == before
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--out: cannot write the report into .*file/r: .*file is a file"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "--out", str(tmp_path / "file" / "r")])
    with pytest.raises(SystemExit, match=r"l2t eval: --top-p must be in \(0, 1\], got 0.0"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "--top-p", "0", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match=r"l2t eval: --temperature=0.005 with the vllm engine"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "--engine", "vllm", "--temperature",
              "0.005", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()
    # a flag that would change nothing in this evaluation is refused, not ignored
    for extra, flag in ((["--pass-k", "1"], "--pass-k"), (["--heldout-levels", "1"], "--heldout-\\*"),
                        (["--vllm-max-model-len", "64"], "--vllm-\\*")):
        with pytest.raises(SystemExit, match=f"l2t eval {flag}: applies to .*which this evaluation has not"):
            main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", *extra, "--out", str(tmp_path / "y")])


def test_l2t_eval_keeps_the_finished_benchmarks_when_a_later_one_fails(tiny_dir, tmp_path, monkeypatch):
    """The report is rewritten after every benchmark: a failure in the second keeps the first's
    samples and scores (files written whole, never half)."""
    import l2t_core.eval.runner as runner
    from l2t_core.cli import main

    real, calls = runner.evaluate_math, []

    def second_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the GPU fell off the bus")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "evaluate_math", second_fails)
    with pytest.raises(RuntimeError, match="fell off"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "amc23", "--limit", "2", "--n", "1",
              "--max-new-tokens", "4", "--out", str(tmp_path / "rep")])
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert list(report["benchmarks"]) == ["aime24"]
    # its rerun may replace what the crash left (the same model, those benchmarks and more); another may not
    from l2t_core.eval.report import ReportDirError, check_report_dir

    check_report_dir(tmp_path / "rep", model=str(tiny_dir), benchmarks=["aime24", "amc23"])
    with pytest.raises(ReportDirError, match="holds the report of"):
        check_report_dir(tmp_path / "rep", model=str(tiny_dir), benchmarks=["amc23"])
    assert len(pd.read_parquet(tmp_path / "rep" / "eval_results.parquet")) == 2
    assert not list((tmp_path / "rep").glob(".*.tmp"))


def test_l2t_eval_with_vllm_gives_it_the_gpu(tiny_dir, tmp_path, capsys, monkeypatch):
    """``--engine vllm``: the engine gets the evaluation's memory share and model length, and the
    transformers copy it syncs from stays on the CPU (vLLM loads its own); bad shares are refused
    before anything loads. (vLLM cannot be installed here: the engine factory is recorded and an
    ``hf`` engine samples in its place.)"""
    import l2t_core.models as models
    import l2t_core.rollout as rollout
    from l2t_core.cli import main

    seen = {}
    real_load = models.load_policy

    def load(path, device="cpu", **kw):
        seen["device"] = device
        return real_load(path, device=device, **kw)

    def make(engine, model, tok, **kw):
        seen["engine"], seen["kw"] = engine, kw
        return HFRolloutEngine(model, tok)

    monkeypatch.setattr(models, "load_policy", load)
    monkeypatch.setattr(rollout, "make_rollout_engine", make)
    assert main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "--limit", "1", "--n", "1",
                 "--max-new-tokens", "2", "--engine", "vllm", "--device", "cuda", "--vllm-max-model-len", "64",
                 "--out", str(tmp_path / "rep")]) == 0
    assert seen == {"device": "cpu", "engine": "vllm",
                    "kw": {"model_path": str(tiny_dir), "gpu_memory_utilization": 0.9, "max_model_len": 64}}
    seen.clear()
    with pytest.raises(SystemExit, match="vllm-gpu-memory-utilization"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "--engine", "vllm",
              "--vllm-gpu-memory-utilization", "1.5", "--out", str(tmp_path / "x")])
    assert seen == {}


# ---------------------------------------------------------------------------------------------
# The synthetic tasks' held-out splits as benchmarks of `l2t eval` (l2t_core.eval.synthetic)


def _stub_engine(answer_of):
    """A rollout engine that records its prompts and answers each with ``answer_of(prompt_ids)``."""
    from l2t_core.rollout.base import Completion, RolloutEngine

    class Stub(RolloutEngine):
        name = "stub"

        def __init__(self):
            self.prompts = []

        def generate(self, prompts, params):
            self.prompts += [list(p) for p in prompts]
            out = []
            for p in prompts:
                text = answer_of(list(p))
                out.append([Completion(list(p), [1] * len(text), text, True) for _ in range(params.n)])
            return out

        def sync_weights(self, model):
            pass

    return Stub()


def test_heldout_benchmarks_are_the_tasks_held_out_splits_level_by_level():
    from l2t_core.eval.synthetic import HeldOutOptions, heldout_benchmarks, load_eval_benchmark
    from l2t_core.prompts import build_prompt
    from l2t_core.tasks import TASKS, get_task
    from l2t_core.tasks.common import split_of

    assert heldout_benchmarks() == {f"{t}_heldout": t for t in TASKS}
    expected = {"walk_heldout": {1: 3, 2: 4, 3: 4}, "arithmetic_heldout": {1: 4, 2: 4, 3: 4}}  # walk: 3 of level 1
    for name, task_name in heldout_benchmarks().items():
        task = get_task(task_name)
        opts = HeldOutOptions(levels=(1, 2, 3), per_level=4)
        items = load_eval_benchmark(name, heldout=opts, limit=1)  # --limit is for file benchmarks only
        assert items == load_eval_benchmark(name, heldout=opts)  # deterministic
        assert pd.Series([i.level for i in items]).value_counts().sort_index().to_dict() == expected[name]
        assert len({i.id for i in items}) == len(items) and {i.benchmark for i in items} == {name}
        training = {p.problem for p in task.dataset(5000, 1, 3, seed=0)}
        for i in items:
            assert split_of(i.problem) == "heldout" and i.problem not in training
            assert i.prompt == task.build_task_prompt(i.problem) != build_prompt(i.problem)
            assert i.answer in {str(d) for d in range(10)} and i.accepted_answers == (i.answer,)
        full = load_eval_benchmark(name)  # default: every level, up to 50 per level
        assert sorted({i.level for i in full}) == list(task.LEVELS) and len(full) <= 50 * len(task.LEVELS)
    walk = load_eval_benchmark("walk_heldout")
    assert [sum(i.level == lv for i in walk) for lv in range(1, 7)] == [3, 5, 12, 26, 46, 50]


def test_heldout_items_are_prompted_with_their_task_prompt_and_boxed_digits_verify(tokenizer):
    from l2t_core.eval.runner import group_rows, prompt_text
    from l2t_core.eval.synthetic import HeldOutOptions, load_heldout
    from l2t_core.prompts import build_prompt, encode_prompt

    walk = load_heldout("walk_heldout", HeldOutOptions(levels=(1, 2), per_level=50))
    real = load_benchmark("math500", limit=2)
    items = [*real, *walk]
    by_prompt = {tuple(encode_prompt(tokenizer, prompt_text(i))): i for i in items}
    assert [prompt_text(i) for i in real] == [build_prompt(i.problem) for i in real]

    def answer(prompt_ids):  # right on walk problems of even index, one off on the others
        item = by_prompt[tuple(prompt_ids)]
        if item.benchmark != "walk_heldout":
            return "<think>\nx\n</think>\n\n\\boxed{0}"
        value = int(item.answer) + (walk.index(item) % 2)
        return f"<think>\n<episode_1>{item.problem}</episode_1>\n</think>\n\n\\boxed{{{value % 10}}}"

    engine = _stub_engine(answer)
    res = evaluate_math(engine, tokenizer, items, EvalSettings(n=2, maj_k=2))
    assert engine.prompts == [encode_prompt(tokenizer, build_prompt(i.problem)) for i in real] + \
        [encode_prompt(tokenizer, i.prompt) for i in walk]
    rows = res.rows[res.rows["benchmark"] == "walk_heldout"]
    want = [k % 2 == 0 for k in range(len(walk)) for _ in range(2)]
    assert list(rows["correct"]) == want and set(rows["status"]) == {"correct", "incorrect"}
    assert set(res.summary["per_group"]) >= {"level 1", "level 2"}
    groups = group_rows(res.rows).set_index("level")
    assert groups.loc["walk_heldout level 1", "n"] == 3 and groups.loc["walk_heldout level 2", "n"] == 5
    assert groups.loc["walk_heldout level 1", "accuracy"] == pytest.approx(2 / 3)  # problems 0 and 2 of 0, 1, 2
    boxed = [f"<think>\n<episode_1>{walk[0].problem}</episode_1>\n</think>\n\n\\boxed{{{d}}}" for d in (7, 8)]
    assert [v.correct for v in verify_all(boxed, [("7",), ("7",)])] == [True, False]  # math-verify on a digit


def test_heldout_bad_names_and_options_fail_naming_the_option(tiny_dir, tmp_path):
    from l2t_core.cli import main
    from l2t_core.eval.datasets import DatasetError, get_spec
    from l2t_core.eval.synthetic import HeldOutOptionError, HeldOutOptions, load_heldout

    base = ["eval", "-q", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--benchmarks"]
    with pytest.raises(SystemExit, match=r"--benchmarks: unknown benchmark 'walk'.*math500.*walk_heldout, "
                                         r"arithmetic_heldout"):
        main([*base, "math500", "walk"])
    with pytest.raises(SystemExit, match=r"--heldout-per-level: .*per level must be an integer >= 1, got 0"):
        main([*base, "walk_heldout", "--heldout-per-level", "0"])
    with pytest.raises(SystemExit, match=r"--heldout-per-level: .*got -3"):
        main([*base, "aime24", "--heldout-per-level", "-3"])  # checked even where no held-out set is asked for
    with pytest.raises(SystemExit, match=r"--heldout-levels: unknown level 7 for walk_heldout; its levels are "
                                         r"1, 2, 3, 4, 5, 6"):
        main([*base, "walk_heldout", "--heldout-levels", "1", "7"])
    with pytest.raises(SystemExit, match=r"--heldout-levels: level 2 is given twice"):
        main([*base, "arithmetic_heldout", "--heldout-levels", "2", "2"])
    with pytest.raises(SystemExit, match=r"--heldout-per-level: arithmetic_heldout: .*could only draw"):
        main([*base, "arithmetic_heldout", "--heldout-levels", "1", "--heldout-per-level", "300"])
    with pytest.raises(HeldOutOptionError, match="at least one level") as err:
        HeldOutOptions(levels=())
    assert err.value.option == "levels"
    with pytest.raises(HeldOutOptionError, match="not a synthetic held-out benchmark"):
        load_heldout("math500")
    with pytest.raises(DatasetError, match="synthetic held-out set .*load_heldout"):
        get_spec("walk_heldout")
    assert not (tmp_path / "x").exists()  # every one failed before any compute


@pytest.mark.slow
def test_l2t_eval_on_math500_aime24_slices_and_walk_heldout_in_one_report(tiny_dir, tmp_path, capsys):
    """Issue 4's proof on this machine: `l2t eval` on 20-problem slices of MATH500 and AIME24 and
    on the walk task's held-out split (up to 4 problems of each level 1-6), one report."""
    from l2t_core.cli import main

    out = tmp_path / "rep"
    assert main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "math500", "aime24", "walk_heldout",
                 "--limit", "20", "--n", "2", "--max-new-tokens", "8", "--heldout-per-level", "4",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(printed["pass@1"]) == ["math500", "aime24", "walk_heldout"]
    rows = pd.read_parquet(out / "eval_results.parquet")
    per_level = [3, 4, 4, 4, 4, 4]  # the walk has only 3 held-out problems of level 1
    assert rows.groupby("benchmark").size().to_dict() == {"math500": 40, "aime24": 40, "walk_heldout": 2 * 23}
    assert rows.groupby("benchmark")["problem_id"].nunique().to_dict() == {"math500": 20, "aime24": 20,
                                                                           "walk_heldout": 23}
    assert rows["response_tokens"].between(0, 8).all() and rows["sample"].isin([0, 1]).all()
    report = json.loads((out / "report.json").read_text())["benchmarks"]
    walk = report["walk_heldout"]
    assert (walk["problems"], walk["samples"]) == (23, 46)
    assert walk["mean_tokens"] == pytest.approx(rows[rows["benchmark"] == "walk_heldout"]["response_tokens"].mean())
    assert walk["heldout"] == {"task": "walk", "split": "heldout", "prompt": "task (build_task_prompt)",
                               "levels": [1, 2, 3, 4, 5, 6], "per_level": 4, "seed": 1_000_003}
    assert list(walk["per_group"]) == [f"level {lv}" for lv in range(1, 7)]
    assert [g["problems"] for g in walk["per_group"].values()] == per_level
    assert [g["samples"] for g in walk["per_group"].values()] == [2 * n for n in per_level]
    for g, s in walk["per_group"].items():
        sub = rows[(rows["benchmark"] == "walk_heldout") & (rows["group"] == g)]
        assert s["mean_tokens"] == pytest.approx(sub["response_tokens"].mean())
        assert s["pass@1"] == pytest.approx(sub.groupby("problem_id")["correct"].mean().mean())
    assert set(report["math500"]["per_group"]) <= {f"level {i}" for i in range(1, 6)}
    assert report["aime24"]["problems"] == 20 and "heldout" not in report["aime24"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for lv, n in enumerate(per_level, 1):
        assert re.search(rf"\| walk_heldout \| level {lv} \| {n} \| [0-9.]+ \| [0-9.]+ \|", md)
        assert f"<tr><td>walk_heldout</td><td>level {lv}</td><td>{n}</td>" in page
    assert re.search(r"\| walk_heldout \| 23 \| 46 \|", md) and "- walk_heldout: held-out split of the synthetic " \
        "walk task, levels 1, 2, 3, 4, 5, 6, up to 4 problems per level (seed 1000003)" in md
    assert "<td>math500</td><td>level" in page and "Synthetic held-out benchmarks" in page
    for png in ("accuracy_tokens.png", "groups.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"![{png[:-4]}]({png})" in md


# A warm start small enough for a test: walk levels 1-3, 2 layers of hidden 64, batch 8, 1500 SFT
# steps, on plain reference traces (no wrong guesses, re-checks, repeats or restatements, no
# forced-answer examples). Measured on one thread of the shared 2-core machine, seeds 0-4: SFT
# 38-49 s (42-54 s with the warm start's own evaluation); greedy accuracy on the 20 held-out
# problems of levels 1-3: 0.95, 0.85, 0.90, 1.00, 1.00 (chance: 0.1). 1200 steps: 1.00, 1.00, 0.55,
# 0.85, 0.95; levels 1-2 only (8 held-out problems), 1000 steps: 1.00, 0.88, 0.62; batches of 32
# stay on the loss plateau (accuracy 0-0.12 after 200-300 steps), as do the default traces at
# hidden 64 (0.25 after 800 steps of batch 8, levels 1-2).
QUICK_WARM_START = dict(min_steps=1, max_steps=3, hidden_size=64, num_layers=2, intermediate_size=192,
                        guess_error=0.0, hard_check=0.0, easy_check=0.0, repeat=0.0, restate=0.0, forced_frac=0.0,
                        sft_steps=1500, batch_size=8, train_size=2000, eval_loss_size=0, eval_levels=(1, 2, 3),
                        eval_max_new_tokens=96, threads=1)


@pytest.mark.slow
def test_l2t_eval_scores_a_quick_warm_start_on_walk_heldout(tmp_path, capsys):
    """Accuracy on the synthetic held-out set is meaningful: a warm-started model scores far
    above chance (0.1) on every held-out walk problem of levels 1-3 through `l2t eval`, and the
    report agrees with the warm start's own greedy evaluation (l2t_core.warmstart.evaluate:
    the same problems, task prompt and greedy decoding, the task's exact numeric check)."""
    from l2t_core.cli import main
    from l2t_core.warmstart import WarmStartConfig, warm_start

    model_dir = warm_start(tmp_path / "sft", WarmStartConfig(seed=0, **QUICK_WARM_START), show_progress=False)
    own = json.loads((model_dir / "warmstart.json").read_text())
    out = tmp_path / "rep"
    assert main(["eval", "-q", "--model", str(model_dir), "--benchmarks", "walk_heldout", "--heldout-levels", "1", "2",
                 "3", "--n", "1", "--temperature", "0", "--max-new-tokens", "96", "--out", str(out)]) == 0
    walk = json.loads((out / "report.json").read_text())["benchmarks"]["walk_heldout"]
    assert walk["problems"] == 3 + 5 + 12 == own["evaluation"]["n"]  # every held-out problem of levels 1-3
    assert walk["finished_share"] == 1.0
    assert walk["pass@1"] >= 0.7  # seed 0 measured 0.95; the least of seeds 0-4 0.85; chance 0.1
    per_level = {g.removeprefix("level "): s["pass@1"] for g, s in walk["per_group"].items()}
    assert per_level == pytest.approx(own["accuracy_per_level"], abs=0.01)


def test_unboxed_correct_answers_count_in_the_majority_vote():
    """A response that states its answer without a box is verified by math-verify's extraction;
    that answer must also be its vote in maj@k (it was None, so maj@4 was 0 while pass@1 was 1)."""
    responses = ["<think>\nok\n</think>\n\nThe answer is 18.", "<think>\nok\n</think>\n\nSo it is $18$.",
                 "<think>\nok\n</think>\n\n\\boxed{18}", "<think>\nok\n</think>\n\nThe answer is 20."]
    verdicts = verify_all(responses, [("18",)] * 4)
    assert [v.correct for v in verdicts] == [True, True, True, False]
    assert [v.extracted for v in verdicts] == ["18", "18", "18", "20"]
    rows = pd.DataFrame({"problem_id": ["p"] * 4, "sample": range(4), "group": ["all"] * 4,
                         "correct": [v.correct for v in verdicts], "answer": [v.extracted for v in verdicts],
                         "response_tokens": [5] * 4, "finished": [True] * 4})
    s = summarize(rows, 4)
    assert s["pass@1"] == pytest.approx(0.75) and s["maj@4"] == 1.0


def test_equivalent_answers_vote_together_in_maj_at_k():
    """maj@k votes over answers, not strings: 0.5, \\frac{1}{2} and \\dfrac12 are one answer. Grouped
    by their text the four votes were four classes, the tie went to the first (a wrong 7) and maj@4
    was 0 where three of four samples agree on the right answer."""
    responses = ["<think>\nok\n</think>\n\n\\boxed{7}", "<think>\nok\n</think>\n\n\\boxed{0.5}",
                 "<think>\nok\n</think>\n\n\\boxed{\\frac{1}{2}}", "<think>\nok\n</think>\n\n\\boxed{\\dfrac12}"]
    verdicts = verify_all(responses, [("\\frac{1}{2}",)] * 4)
    assert [v.correct for v in verdicts] == [False, True, True, True]
    assert len({v.extracted for v in verdicts}) == 4
    rows = pd.DataFrame({"problem_id": ["p"] * 4, "sample": range(4), "group": ["all"] * 4,
                         "correct": [v.correct for v in verdicts], "answer": [v.extracted for v in verdicts],
                         "response_tokens": [5] * 4, "finished": [True] * 4})
    s = summarize(rows, 4)
    assert s["pass@1"] == pytest.approx(0.75) and s["maj@4"] == 1.0 and s["per_group"]["all"]["maj@4"] == 1.0


def test_a_response_cut_before_closing_its_think_block_has_no_answer():
    """A response that ran into max_new_tokens inside its reasoning gave no final answer; the
    verifier alone scores the whole text as the answer span, so the last number of the unfinished
    reasoning (70 here, AIME 2025 I-1's answer) counted as correct."""
    from l2t_core.eval.runner import score_math
    from l2t_core.rollout import Completion

    item = load_benchmark("aime25", limit=1)[0]
    assert item.answer == "70"
    texts = [("<think>\nThe bases are 21 and 49. Recheck the sum: 21 + 49 = 70", False),
             ("<think>\nThen \\boxed{70}? Let me check b = 49 again", False),
             ("<think>\n21 + 49 = 70\n</think>\n\nThe sum is \\boxed{70}. Each base", False),  # cut after answering
             ("<think>\n21 + 49 = 70\n</think>\n\n\\boxed{70}", True),
             ("The bases are 21 and 49, so the sum is \\boxed{70}.", True)]  # finished without tags
    group = [Completion([1], [5] * (10 + k), text, finished) for k, (text, finished) in enumerate(texts)]
    res = score_math([item], [group], EvalSettings(n=5, maj_k=4))
    assert res.rows["correct"].tolist() == [False, False, True, True, True]
    assert res.rows["status"].tolist()[:2] == ["no_answer", "no_answer"]
    assert res.rows["response_tokens"].tolist() == [10, 11, 12, 13, 14]  # cut ones still count their tokens
    assert res.summary["pass@1"] == pytest.approx(0.6)


def test_l2t_eval_cut_short_resumes_where_it_stopped_with_the_same_samples(tiny_dir, tmp_path, monkeypatch):
    """An evaluation that crashes in its second benchmark's second engine call, run again into the
    same --out: the first benchmark is kept as reported, the second resumes after the calls it
    had made (its journal), and the report equals an uninterrupted run's (a call's seed depends on
    its start only). A rerun with other settings is refused, naming them; the journal is gone once
    its benchmark is reported."""
    from l2t_core.cli import main
    from l2t_core.rollout.hf import HFRolloutEngine

    args = ["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "amc23", "--limit", "3", "--n", "2",
            "--max-new-tokens", "6", "--prompts-per-call", "2"]
    real, calls = HFRolloutEngine.generate, []

    def generate(self, prompts, params, **kw):
        calls.append(len(prompts))
        if fail_at and len(calls) == fail_at:
            raise RuntimeError("the GPU fell off the bus")
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    fail_at = None
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert calls == [2, 1, 2, 1]  # two benchmarks of 3 problems, 2 problems per call
    calls.clear()
    fail_at = 4  # amc23's second call
    with pytest.raises(RuntimeError, match="fell off"):
        main([*args, "--out", str(tmp_path / "cut")])
    assert list(json.loads((tmp_path / "cut" / "report.json").read_text())["benchmarks"]) == ["aime24"]
    assert (tmp_path / "cut" / ".samples" / "amc23.jsonl").is_file()
    with pytest.raises(SystemExit, match=r"--out: .*cut holds aime24 evaluated with other settings \(sampling: "):
        main([*args[:-1], "3", "--out", str(tmp_path / "cut")])  # another --prompts-per-call
    calls.clear()
    fail_at = None
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert calls == [1]  # aime24 kept, amc23's first call kept: only its last one sampled
    whole = pd.read_parquet(tmp_path / "whole" / "eval_results.parquet")
    resumed = pd.read_parquet(tmp_path / "cut" / "eval_results.parquet")
    pd.testing.assert_frame_equal(whole, resumed)
    assert not (tmp_path / "cut" / ".samples").exists()  # journals and lock removed once reported
    report = json.loads((tmp_path / "cut" / "report.json").read_text())["benchmarks"]
    assert report["amc23"]["statuses"] and report["amc23"]["evaluation"]["sampling"]["prompts_per_call"] == 2

    # another model's samples are never resumed: cut in its first benchmark (no report yet), then
    # another model (a copy with other weights) into the same --out samples everything
    from l2t_core.models import load_policy

    other = tmp_path / "other_model"
    model, tok = load_policy(tiny_dir)
    for param in model.parameters():
        param.data.mul_(0.9)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    calls.clear()
    fail_at = 2
    with pytest.raises(RuntimeError, match="fell off"):
        main([*args, "--out", str(tmp_path / "two")])
    calls.clear()
    fail_at = None
    assert main([*args[:3], str(other), *args[4:], "--out", str(tmp_path / "two")]) == 0
    assert calls == [2, 1, 2, 1]
    # the same path with other weights since (retrained): its report is not completed from the old one
    (other / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(SystemExit, match=r"--out: .*two holds aime24 evaluated with other settings \(model: "):
        main([*args[:3], str(other), *args[4:], "--out", str(tmp_path / "two")])


def test_a_sample_journal_keeps_whole_chunks_of_the_same_prompts_and_settings(tmp_path):
    """Chunks come back as completions of their prompts; a line torn by a crash (and any after it)
    is dropped and later appends follow whole lines; other prompts or settings start it over."""
    from l2t_core.eval.journal import SampleJournal, journal_key
    from l2t_core.rollout.base import Completion

    prompts = [[1, 2], [3], [4, 5, 6]]
    key = journal_key(prompts, {"n": 1, "seed": 0})
    path = tmp_path / "j.jsonl"
    j = SampleJournal(path)
    assert j.begin(key, prompts) == {}
    j.record(0, [[Completion([1, 2], [7], "a", True)], [Completion([3], [8, 9], "b", False)]])
    with open(path, "a") as f:
        f.write('{"start": 2, "groups": [[[[1')  # the crash
    again = SampleJournal(path).begin(key, prompts)
    assert again == {0: [[Completion([1, 2], [7], "a", True)], [Completion([3], [8, 9], "b", False)]]}
    j2 = SampleJournal(path)
    j2.begin(key, prompts)
    j2.record(2, [[Completion([4, 5, 6], [], "", False)]])
    assert sorted(SampleJournal(path).begin(key, prompts)) == [0, 2]
    assert SampleJournal(path).begin(journal_key(prompts, {"n": 2, "seed": 0}), prompts) == {}
    assert SampleJournal(path).begin(key, prompts) == {}  # started over for the other settings


def test_a_journal_has_one_writer_and_a_second_is_refused_naming_the_first(tiny_dir, tmp_path):
    """held(): a second holder of the same lock (another process, or another open of it) is
    refused at once with the first's note; released, the lock file is gone and it can be held
    again. l2t eval refuses a second evaluation into the same --out while one writes there."""
    from l2t_core.cli import main
    from l2t_core.eval.journal import JournalInUse, held

    lock = tmp_path / "samples" / ".lock"
    with held(lock, "l2t eval --out A"):
        with pytest.raises(JournalInUse, match=r"\.lock is held by l2t eval --out A \(pid \d+ on "):
            with held(lock, "another"):
                pass
        assert lock.is_file()
    assert not lock.parent.exists()  # nor its directory, left empty
    with held(lock, "again"):
        assert "again" in lock.read_text()

    out = tmp_path / "out"
    with held(out / ".samples" / ".lock", "l2t eval --out out"):
        with pytest.raises(SystemExit, match=r"--out: another evaluation writes into .*out now \(.*held by l2t eval"):
            main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "aime24", "--limit", "2", "--out", str(out)])
