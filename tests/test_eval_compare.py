"""Fig. 2-style comparison of reports (l2t_core.eval.compare): two report directories written by
write_report from handcrafted sample rows; every number below is computed by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from l2t_core.eval.code import summarize_code
from l2t_core.eval.compare import ReportError, compare_reports, compare_summaries, load_report
from l2t_core.eval.report import write_report
from l2t_core.eval.runner import ROW_COLUMNS, EvalResult, summarize

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(benchmark: str, correct: list[bool], tokens: list[int], group: str) -> pd.DataFrame:
    """Two problems with len(correct) / 2 samples each."""
    n = len(correct) // 2
    return pd.DataFrame({
        "benchmark": benchmark, "problem_id": [f"{benchmark}-a"] * n + [f"{benchmark}-b"] * n,
        "sample": list(range(n)) * 2, "group": group, "response_tokens": tokens, "finished": True,
        "correct": correct, "status": ["correct" if c else "wrong" for c in correct],
        "answer": ["1" if c else "2" for c in correct], "response": "r"}, columns=list(ROW_COLUMNS))


def _report(path, model: str, math_correct, math_tokens, code_correct, code_tokens) -> None:
    m = _rows("math500", math_correct, math_tokens, "level 1")
    c = _rows("humaneval", code_correct, code_tokens, "all")
    c["status"] = ["passed" if x else "failed" for x in code_correct]
    write_report(path, {"math500": EvalResult(m, summarize(m, 2)),
                        "humaneval": EvalResult(c, summarize_code(c, (1, 2)))}, model=model)


@pytest.fixture()
def reports(tmp_path):
    # base: math500 pass@1 = (1/2 + 2/2) / 2 = 0.75, 250 tokens; humaneval pass@1 = (1/2 + 0) / 2 = 0.25,
    #       pass@2 = (1 + 0) / 2 = 0.5, 50 tokens
    _report(tmp_path / "base", "base", [True, False, True, True], [100, 200, 300, 400],
            [True, False, False, False], [40, 60, 80, 20])
    # l2t:  math500 pass@1 = (1 + 1/2) / 2 = 0.75, 100 tokens; humaneval pass@1 = (1 + 1/2) / 2 = 0.75,
    #       pass@2 = 1, 25 tokens
    _report(tmp_path / "l2t", "l2t", [True, True, False, True], [50, 50, 100, 200],
            [True, True, True, False], [10, 30, 20, 40])
    return tmp_path / "base", tmp_path / "l2t"


def test_comparison_numbers_tables_and_plots(reports, tmp_path):
    res = compare_reports(reports, tmp_path / "cmp", base="base")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["models"] == ["base", "l2t"] and data["base"] == "base"
    assert data["benchmarks"] == ["math500", "humaneval"] and data["skipped"] == {} and data["warnings"] == []
    rows = {(r["model"], r["benchmark"]): r for r in data["rows"]}
    assert rows[("base", "math500")] == {
        "model": "base", "benchmark": "math500", "problems": 2, "samples": 4, "pass@1": 0.75, "mean_tokens": 250.0,
        "maj@2": 1.0, "accuracy_delta": 0.0, "token_ratio": 1.0, "efficiency": 1.0}
    l2t_math = rows[("l2t", "math500")]
    assert (l2t_math["pass@1"], l2t_math["mean_tokens"]) == (0.75, 100.0)
    assert l2t_math["accuracy_delta"] == 0.0 and l2t_math["token_ratio"] == pytest.approx(0.4)
    assert l2t_math["efficiency"] == pytest.approx(2.5)
    assert l2t_math["maj@2"] == 0.5  # problem b's answers '2' (wrong), '1': the tie goes to the first
    l2t_code = rows[("l2t", "humaneval")]
    assert (l2t_code["pass@1"], l2t_code["pass@2"], l2t_code["mean_tokens"]) == (0.75, 1.0, 25.0)
    assert rows[("base", "humaneval")]["pass@2"] == 0.5
    assert l2t_code["accuracy_delta"] == pytest.approx(0.5) and l2t_code["token_ratio"] == pytest.approx(0.5)
    assert l2t_code["efficiency"] == pytest.approx(2.0) and "maj@2" not in l2t_code
    avg = {r["model"]: r for r in data["average"]}
    assert avg["base"]["pass@1"] == pytest.approx(0.5) and avg["base"]["mean_tokens"] == pytest.approx(150.0)
    assert avg["l2t"]["pass@1"] == pytest.approx(0.75) and avg["l2t"]["mean_tokens"] == pytest.approx(62.5)
    assert avg["l2t"]["token_ratio"] == pytest.approx(62.5 / 150) and avg["l2t"]["efficiency"] == pytest.approx(2.4)
    assert avg["l2t"]["accuracy_delta"] == pytest.approx(0.25) and avg["l2t"]["benchmarks"] == 2
    assert data["sources"] == {"base": str(reports[0]), "l2t": str(reports[1])}
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| model | benchmark | pass@1 | maj@2 | pass@2 | Δ pass@1 vs base | mean tokens | tokens / base |" in md
    assert "| l2t | math500 | 0.750 | 0.500 | – | +0.000 | 100.0 | 0.400 | 2.50 |" in md
    assert "| l2t | humaneval | 0.750 | – | 1.000 | +0.500 | 25.0 | 0.500 | 2.00 |" in md
    assert "| l2t | average | 0.750 | – | – | +0.250 | 62.5 | 0.417 | 2.40 |" in md
    html = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<td>0.417</td>" in html and "token_ratio.png" in html
    assert [p.split("/")[-1] for p in res["plots"]] == ["comparison.png", "token_ratio.png"]
    for p in res["plots"]:
        with open(p, "rb") as fh:
            assert fh.read(8) == PNG
        assert (tmp_path / "cmp" / p.split("/")[-1]).stat().st_size > 2000


def test_names_base_default_skipped_benchmarks_and_warnings(reports, tmp_path):
    res = compare_reports(reports, tmp_path / "cmp", names=["B", "L"])
    assert res["base"] == "B" and res["models"] == ["B", "L"]
    base, l2t = (load_report(d)["benchmarks"] for d in reports)
    extra = dict(l2t, aime24={**l2t["math500"], "problems": 30})
    other = dict(l2t, math500={**l2t["math500"], "problems": 3})
    c = compare_summaries({"base": base, "l2t": extra, "grpo": other}, "l2t")
    assert c["benchmarks"] == ["math500", "humaneval"] and c["skipped"] == {"aime24": ["base", "grpo"]}
    assert len(c["warnings"]) == 1 and "math500: problems differ" in c["warnings"][0]
    # how each benchmark was evaluated (l2t eval's record): another token budget is said
    evaluation = {"engine": "hf", "limit": None, "sampling": {"n": 2, "max_new_tokens": 512}, "data": "math500.jsonl"}
    cut = {"math500": {**base["math500"], "evaluation": evaluation}}
    longer = {"math500": {**l2t["math500"], "evaluation": {**evaluation, "engine": "vllm",
                                                           "sampling": {"n": 2, "max_new_tokens": 4096}}}}
    w = compare_summaries({"base": cut, "l2t": longer}, "base")["warnings"]
    assert len(w) == 1 and w[0].startswith("math500: evaluated with other sampling (base: {") and "4096" in w[0]
    assert compare_summaries({"base": cut, "l2t": cut}, "base")["warnings"] == []
    rows = {(r["model"], r["benchmark"]): r for r in c["rows"]}
    assert rows[("base", "math500")]["token_ratio"] == pytest.approx(2.5)  # 250 / 100 tokens
    assert rows[("base", "humaneval")]["accuracy_delta"] == pytest.approx(-0.5)


def test_bad_inputs_say_what_and_how(reports, tmp_path):
    with pytest.raises(ReportError, match="does not exist; pass a directory written by `l2t eval --out DIR`"):
        compare_reports([reports[0], tmp_path / "nope"], tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="has no report.json"):
        load_report(tmp_path / "empty")
    (tmp_path / "empty" / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_report(tmp_path / "empty")
    (tmp_path / "empty" / "report.json").write_text(
        json.dumps({"model": "m", "benchmarks": {"math500": {"pass@1": 1}}}))
    with pytest.raises(ReportError, match=r"math500.*lacks \['mean_tokens', 'problems', 'samples'\]"):
        load_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="base model 'gpt' is not among.*--base"):
        compare_reports(reports, tmp_path / "x", base="gpt")
    with pytest.raises(ReportError, match="share the model name.*--names"):
        compare_reports([reports[0], reports[0]], tmp_path / "x")
    with pytest.raises(ReportError, match="2 names for 1 report"):
        compare_reports([reports[0]], tmp_path / "x", names=["a", "b"])
    with pytest.raises(ReportError, match="at least two models"):
        compare_reports([reports[0]], tmp_path / "x")
    base = load_report(reports[0])["benchmarks"]
    with pytest.raises(ReportError, match="share no benchmark"):
        compare_summaries({"a": {"x": base["math500"]}, "b": {"y": base["math500"]}}, "a")
    with pytest.raises(ReportError, match="mean_tokens must be a finite number"):
        compare_summaries({"a": base, "b": {"math500": {**base["math500"], "mean_tokens": float("nan")}}}, "a")
    assert not (tmp_path / "x").exists()  # nothing written on bad input


def test_l2t_compare_command(reports, tmp_path, capsys):
    from l2t_core.cli import main

    assert main(["compare", "--reports", *map(str, reports), "--base", "base", "--out", str(tmp_path / "c")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["average"]["l2t"]["token_ratio"] == pytest.approx(62.5 / 150)
    assert (tmp_path / "c" / "comparison.md").is_file() and len(out["plots"]) == 2
    with pytest.raises(SystemExit, match="l2t compare: base model 'x'"):
        main(["compare", "--reports", *map(str, reports), "--base", "x", "--out", str(tmp_path / "d")])
