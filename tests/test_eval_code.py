"""HumanEval through the evaluation runner (l2t_core.eval.code): completion extraction, sandboxed
execution of real canonical solutions fed as responses, hand-computed pass@k, the tiny model end
to end and the ``l2t eval`` routing of code and math benchmarks into one report."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from l2t_core.data import data_dir
from l2t_core.eval.code import (
    CODE_INSTRUCTION,
    check_k_values,
    code_prompt,
    completion_from_code,
    evaluate_code,
    extract_code,
    humaneval_completion,
    score_code,
    summarize_code,
)
from l2t_core.eval.datasets import BenchmarkItem, load_benchmark
from l2t_core.eval.report import write_report
from l2t_core.eval.runner import ROW_COLUMNS, EvalSettings
from l2t_core.eval.sandbox import humaneval_program, run_many
from l2t_core.prompts import episode_instruction
from l2t_core.rollout import Completion
from l2t_core.rollout.hf import HFRolloutEngine

PNG = b"\x89PNG\r\n\x1a\n"

ADD = BenchmarkItem(
    id="toy/add", benchmark="humaneval", answer="    return a + b\n", entry_point="add",
    problem='import math\n\n\ndef add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n'
            '    """\n',
    test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n")


@pytest.fixture(scope="module")
def humaneval():
    if not (data_dir() / "humaneval.jsonl").is_file():
        pytest.skip(f"humaneval.jsonl is not in the data dir {data_dir()} (set L2T_DATA_DIR)")
    return load_benchmark("humaneval", allow_download=False, limit=10)


@pytest.mark.parametrize("response, code", [
    # the last python block after </think>; a block inside the thinking is ignored
    ("<think>\n```python\ndef f(): return 0\n```\n</think>\nSo:\n```python\ndef f():\n    return 1\n```\nDone.",
     "def f():\n    return 1\n"),
    ("<think>x</think>\n```python\nA = 1\n```\nor better\n```python\nA = 2\n```\n", "A = 2\n"),
    # a python-tagged block wins over a later untagged or other-language block
    ("<think>x</think>```python\nA = 1\n```\nOutput:\n```\n3\n```\n```text\nB\n```", "A = 1\n"),
    # no python tag: the last untagged block; other languages are not code for us
    ("</think>\n```bash\nls\n```\n```\n    return 7\n```", "    return 7\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```Python3 title\nx = 2\n```", "x = 2\n"),
    # no </think>: fences are searched in the whole text
    ("Here it is:\n```python\nx = 3\n```\n", "x = 3\n"),
    # an unclosed last fence (cut at the token budget) runs to the end
    ("</think>\n```python\ndef g():\n    return [", "def g():\n    return [\n"),
    # no fence: the raw text after </think>, leading blank lines dropped, the indentation kept
    ("<think>\nplan\n</think>\n\n   \n    return a + b\n\n", "    return a + b\n"),
    # neither: the raw text
    ("    return a - b", "    return a - b\n"),
    # only thinking, nothing after it
    ("<think>\n```python\nx = 1\n```\n</think>\n\n", ""),
    # an empty block right after </think> is no answer; the later block is
    ("<think>x</think>```python\n```\nThen the answer:\n```python\ndef f(x):\n    return 1\n```",
     "def f(x):\n    return 1\n"),
    # a closing fence at the end of the last line of code
    ("</think>```python\ndef f(x):\n    return 1```\nDone.", "def f(x):\n    return 1\n"),
    # a line that starts with a fence closes the block: four backticks, prose after it, or a new block
    ("```python\nx = 1\n````\nDone", "x = 1\n"),
    ("```python\nx = 2\n``` Explanation: it works\nmore prose", "x = 2\n"),
    ("```python\nx = 3\n```python\ny = 4\n```", "y = 4\n"),
])
def test_extract_code(response, code):
    assert extract_code(response) == code


def test_completion_full_definition_vs_body_and_sandbox_outcomes():
    full = "```python\nimport math\n\ndef add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n" \
           "    print(add(1, 2))\n" \
           "    raise SystemExit(3)\n```"
    cases = {
        "full": (f"<think>ok</think>\n{full}", "\nimport math\n\ndef add(a, b):\n    return a + b\n"),
        "full, indented in a list": ("</think>\n1. code:\n   ```python\n   def add(a, b):\n       return b + a\n   ```",
                                     "\ndef add(a, b):\n    return b + a\n"),
        "full after prose, no fence": ("</think>\nHere is the function:\n\nfrom math import fsum\ndef add(a, b):\n"
                                       "    return int(fsum([a, b]))",
                                       "\nfrom math import fsum\ndef add(a, b):\n    return int(fsum([a, b]))\n"),
        "body": ("</think>\n```python\n    s = a + b\n    return s\n```", "    s = a + b\n    return s\n"),
        "body at column 0": ("```python\ns = a + b\nif s:\n    return s\nreturn 0\n```",
                             "    s = a + b\n    if s:\n        return s\n    return 0\n"),
        "body, first line stripped": ("</think>\n\nif a:\n        return a + b\n    return b",
                                      "    if a:\n        return a + b\n    return b\n"),
        "raw body": ("    return math.fsum([a, b])", "    return math.fsum([a, b])\n"),
    }
    for name, (response, completion) in cases.items():
        assert humaneval_completion(ADD, response) == completion, name
    wrong = {"wrong body": "    return a - b\n", "syntax error": "</think>\n```python\n    return (a +\n```",
             "other function": "```python\ndef plus(a, b):\n    return a + b\n```", "empty": "<think>x</think>"}
    programs = [humaneval_program(ADD, humaneval_completion(ADD, r)) for r, _ in cases.values()]
    programs += [humaneval_program(ADD, humaneval_completion(ADD, r)) for r in wrong.values()]
    results = run_many(programs, workers=2, cpu_s=1, timeout_s=10)
    got = dict(zip([*cases, *wrong], (r.status for r in results)))
    assert got == {**{n: "passed" for n in cases}, **{n: "failed" for n in wrong}}, \
        [(n, r.detail) for n, r in zip([*cases, *wrong], results)]
    assert "SyntaxError" in results[len(cases) + 1].detail
    assert completion_from_code(ADD, "") == "" and completion_from_code(ADD, "  \n") == ""


def test_canonical_solutions_pass_through_extraction_and_wrong_ones_fail(humaneval):
    styles = [
        lambda it: f"<think>\nplan\n</think>\n\n```python\n{it.problem}{it.answer}```\nThat is all.",  # full def
        lambda it: f"<think>\nplan\n</think>\n```python\n{it.answer}\n```",  # body in a fence
        lambda it: f"<think>\nplan\n</think>\n{it.answer}",  # raw body (same program as the line above)
        lambda it: "</think>\n```python\n    return None\n```",  # wrong body
        lambda it: f"```python\ndef {it.entry_point}(*args, **kwargs):\n    raise ValueError('nope')\n```",  # wrong def
    ]
    groups = [[Completion([1], [0] * (10 * (j + 1)), style(it), finished=j != 4) for j, style in enumerate(styles)]
              for it in humaneval]
    res = score_code(humaneval, groups, k_values=(1, 2, 5), workers=2)
    rows, s = res.rows, res.summary
    assert list(rows.columns) == list(ROW_COLUMNS) and len(rows) == 50
    by_sample = rows.groupby("sample")["correct"].all()
    assert by_sample.tolist() == [True, True, True, False, False], rows[["problem_id", "sample", "status"]]
    assert not rows.loc[rows["sample"] >= 3, "correct"].any()
    assert s["programs_run"] == 40  # the body in a fence and the raw body are one program
    # hand-computed: c = 3 of n = 5 in every problem
    assert s["pass@1"] == pytest.approx(0.6)
    assert s["pass@2"] == pytest.approx(1 - 1 / 10)  # 1 - C(2,2)/C(5,2)
    assert s["pass@5"] == pytest.approx(1.0)
    assert s["per_problem"]["HumanEval/0"] == {"samples": 5, "passed": 3, "pass@1": pytest.approx(0.6),
                                               "pass@2": pytest.approx(0.9), "pass@5": 1.0}
    assert s["mean_tokens"] == pytest.approx(30.0) and s["finished_share"] == pytest.approx(0.8)
    # `return None` fails an assertion, except in mean_absolute_deviation (HumanEval/4), whose test
    # does arithmetic on the result; the raising definition fails with its ValueError everywhere
    assert s["failure_kinds"] == {"ValueError": 10, "AssertionError": 9, "TypeError": 1}, s["failure_kinds"]
    assert rows.loc[(rows["problem_id"] == "HumanEval/4") & (rows["sample"] == 3), "status"].item() == "failed"
    assert s["status_counts"] == {"failed": 20, "passed": 30}
    assert s["per_group"]["all"]["pass@2"] == pytest.approx(0.9)


def test_summarize_code_hand_computed_and_k_checks():
    rows = pd.DataFrame({"problem_id": ["a"] * 4 + ["b"] * 4, "sample": list(range(4)) * 2, "group": ["all"] * 8,
                         "correct": [False, True, False, False, True, False, True, False],
                         "response_tokens": [10, 20, 30, 40, 50, 60, 70, 80], "finished": [True] * 7 + [False],
                         "status": ["failed", "passed", "timeout", "failed", "passed", "failed", "passed", "killed"]})
    s = summarize_code(rows, (4, 1, 2))
    assert s["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert s["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)  # 1 - C(n-c,2)/C(4,2)
    assert s["pass@4"] == 1.0 and s["mean_tokens"] == 45.0 and s["finished_share"] == 7 / 8
    assert s["per_problem"]["a"]["passed"] == 1 and s["per_problem"]["b"]["pass@2"] == pytest.approx(5 / 6)
    assert s["status_counts"] == {"failed": 3, "killed": 1, "passed": 3, "timeout": 1}
    # two benchmarks of one table that reuse an id are two problems
    both = summarize_code(rows.assign(benchmark=["x"] * 4 + ["y"] * 4, problem_id=["p"] * 8), (4, 1, 2))
    assert (both["problems"], both["pass@2"]) == (2, s["pass@2"]) and sorted(both["per_problem"]) == ["x/p", "y/p"]
    with pytest.raises(ValueError, match=r"outside \[1, n=4\]"):
        summarize_code(rows, (1, 5))
    with pytest.raises(ValueError, match="no k values"):
        check_k_values((), 4)
    assert check_k_values([64, 1, 1], 64) == (1, 64)


def test_code_prompt_and_bad_inputs(humaneval, model, tokenizer):
    first_sentences = episode_instruction().split(" Reason inside")[0]
    assert CODE_INSTRUCTION.startswith(first_sentences)  # METHOD.md §8's segmentation instruction
    p = code_prompt(humaneval[0])
    assert p.startswith(CODE_INSTRUCTION) and p.endswith(f"\n\n```python\n{humaneval[0].problem.rstrip()}\n```\n")
    math_item = load_benchmark("aime24", limit=1)[0]
    engine = HFRolloutEngine(model, tokenizer)
    with pytest.raises(ValueError, match="load_benchmark\\('humaneval'\\)"):
        evaluate_code(engine, tokenizer, [math_item], EvalSettings(n=1))
    with pytest.raises(ValueError, match="no problems"):
        evaluate_code(engine, tokenizer, [], EvalSettings(n=1))
    with pytest.raises(ValueError, match=r"outside \[1, n=2\]"):
        evaluate_code(engine, tokenizer, humaneval[:1], EvalSettings(n=2), k_values=(1, 64))
    with pytest.raises(ValueError, match="1 problems but 2 groups"):
        score_code(humaneval[:1], [[], []])
    with pytest.raises(ValueError, match="same positive number of samples"):
        c = Completion([1], [2], "x", True)
        score_code(humaneval[:2], [[c], [c, c]])


def test_tiny_model_end_to_end_on_three_problems(humaneval, model, tokenizer, tmp_path):
    items = humaneval[:3]
    settings = EvalSettings(n=4, max_new_tokens=16, prompts_per_call=2)
    res = evaluate_code(HFRolloutEngine(model, tokenizer), tokenizer, items, settings, k_values=(1, 4), workers=2)
    rows, s = res.rows, res.summary
    assert len(rows) == 12 and rows["problem_id"].tolist() == [i.id for i in items for _ in range(4)]
    assert all(sorted(g) == [0, 1, 2, 3] for _, g in rows.groupby("problem_id")["sample"])
    assert rows["response_tokens"].between(0, 16).all() and set(rows["benchmark"]) == {"humaneval"}
    assert set(rows["status"]) <= {"passed", "failed", "timeout", "killed", "error"}
    assert (rows["correct"] == (rows["status"] == "passed")).all()
    assert {"pass@1", "pass@4"} <= set(s) and set(s["per_problem"]) == {i.id for i in items}
    assert s["pass@1"] == pytest.approx(rows.groupby("problem_id")["correct"].mean().mean())
    assert 0.0 <= s["pass@1"] <= s["pass@4"] <= 1.0 and s["samples"] == 12 and s["problems"] == 3
    assert s["mean_tokens"] == pytest.approx(rows["response_tokens"].mean())
    assert s["settings"]["n"] == 4 and s["k_values"] == [1, 4] and s["sandbox"]["cpu_s"] == 1
    rep = write_report(tmp_path / "rep", {"humaneval": res}, model="tiny")
    for p in rep["plots"]:
        assert open(p, "rb").read(8) == PNG
    assert "pass@4" in (tmp_path / "rep" / "report.md").read_text()
    assert "<th>pass@4</th>" in (tmp_path / "rep" / "report.html").read_text()
    back = pd.read_parquet(rep["files"]["eval_results.parquet"])
    assert len(back) == 12 and list(back.columns) == [*ROW_COLUMNS, "model"]


def test_l2t_eval_routes_code_and_math_into_one_report(tiny_dir, tmp_path, capsys):
    from l2t_core.cli import main

    out = tmp_path / "rep"
    assert main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "humaneval", "aime24", "--limit", "2",
                 "--n", "2", "--max-new-tokens", "4", "--sandbox-workers", "2", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["pass@1"]) == {"humaneval", "aime24"} and set(printed["pass@k"]["humaneval"]) == {"pass@2"}
    rows = pd.read_parquet(out / "eval_results.parquet")
    assert rows.groupby("benchmark").size().to_dict() == {"aime24": 4, "humaneval": 4}
    report = json.loads((out / "report.json").read_text())["benchmarks"]
    assert "pass@2" in report["humaneval"] and "maj@4" not in report["humaneval"]
    assert "maj@4" in report["aime24"] and "pass@2" not in report["aime24"]
    md = (out / "report.md").read_text()
    assert "| benchmark | problems | samples | pass@1 | pass@2 | maj@4 | mean tokens |" in md
    # no pass@2 for math; maj@4 needs 4 samples
    assert re.search(r"\| aime24 \| 2 \| 4 \| [0-9.]+ \| – \| – \|", md)
    with pytest.raises(SystemExit, match="outside"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "humaneval", "--limit", "1", "--n", "2",
              "--pass-k", "1", "5", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="must be >= 1"):
        main(["eval", "-q", "--model", str(tiny_dir), "--benchmarks", "humaneval", "--n", "0",
              "--out", str(tmp_path / "x")])
