"""The evaluation machinery end to end on real benchmark slices with the tiny model: sample
counts, token statistics, verification, report files and valid PNG plots. (The tiny model
scores about 0 on MATH500/AIME; the checks are on the machinery.)"""

from __future__ import annotations

import json

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
