"""Benchmark loaders (l2t_core.eval.datasets): the real files in the data dir, bad files, hub fallback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from l2t_core.data import data_dir
from l2t_core.eval.datasets import (
    BENCHMARKS,
    OMNI_TIERS,
    BenchmarkItem,
    DatasetError,
    get_spec,
    load_benchmark,
    benchmark_source,
    normalise_hub_rows,
    omni_tier,
)

REPO = Path(__file__).resolve().parents[1]


def _present() -> list[str]:
    """Benchmarks whose curated file is in the data dir (conftest points L2T_DATA_DIR at shared/data)."""
    return [n for n, s in BENCHMARKS.items() if (data_dir() / s.file).is_file()]


def _load_or_skip(name: str) -> list[BenchmarkItem]:
    if name not in _present():
        pytest.skip(f"{BENCHMARKS[name].file} is not in the data dir {data_dir()} (set L2T_DATA_DIR)")
    return load_benchmark(name, allow_download=False)


def test_the_shared_data_dir_has_the_manifest_sets():
    if not (data_dir() / "MANIFEST.md").is_file():
        pytest.skip(f"no MANIFEST.md in {data_dir()}")
    # every curated file of MANIFEST.md is in the registry; only the hub-only full Omni-MATH is not on disk
    assert sorted(set(BENCHMARKS) - set(_present())) == ["omni_math"]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_present_benchmark_loads_with_its_manifest_count(name):
    items = _load_or_skip(name)
    spec = BENCHMARKS[name]
    assert len(items) == spec.rows
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert it.benchmark == name
        assert isinstance(it.problem, str) and it.problem.strip()
        assert isinstance(it.answer, str) and it.answer.strip()
        assert all(isinstance(a, str) and a.strip() and a != it.answer for a in it.alternatives)
        if spec.kind == "code":
            assert it.test and it.entry_point and f"def {it.entry_point}" in it.problem
        else:
            assert it.test is None and it.entry_point is None


def test_math500_levels_are_the_manifest_levels():
    items = _load_or_skip("math500")
    assert Counter(it.level for it in items) == {5: 134, 4: 128, 3: 105, 2: 90, 1: 43}


def test_minerva_alternatives_come_from_deepscaler_without_the_prompts_own_answers():
    items = _load_or_skip("minerva")
    for it in items:
        listed = it.meta["answer_alternatives_deepscaler"]
        assert set(it.alternatives) <= set(listed)
        assert it.accepted_answers[0] == it.answer
    assert sum(len(it.alternatives) for it in items) == 130
    assert {"41.8^\\circ", "41.8^{\\circ}"} <= set(items[2].alternatives)
    assert items[10].alternatives == ("3.83 \\times 10^{35}",)
    # multi-part problems quote the earlier parts' solutions; DeepScaleR's list holds 38 of
    # those earlier answers, which a model could copy from its prompt
    by_id = {it.id: it for it in items}
    dropped = {it.id: sorted(set(it.meta["answer_alternatives_deepscaler"]) - {it.answer} - set(it.alternatives))
               for it in items}
    assert sum(map(len, dropped.values())) == 38
    assert dropped["minerva-145"] == ["1"] and "\\boxed{1}" in by_id["minerva-145"].problem
    assert by_id["minerva-145"].accepted_answers == ("400000",)
    assert dropped["minerva-57"] == ["4.4 \\times 10^7", "4.4e7"]  # part 0's \boxed{4.4e7}; part 1 is 0.53
    assert dropped["minerva-151"] == ["188"] and by_id["minerva-151"].accepted_answers == ("566",)
    # part 0's frequency, quoted unboxed as a result (=4.4677 \times 10^{14} {s}^{-1}); part 1 is the wave number
    assert dropped["minerva-149"] == ["4.4677 \\times 10^{14}"]
    assert by_id["minerva-149"].accepted_answers == ("1.4903e4",)


def test_an_answer_the_problem_states_is_not_an_alternative(tmp_path):
    spec = BENCHMARKS["minerva"]
    problem = ("Subproblem 0: the age in minutes.\n\nSolution: \\boxed{1} minute.\n\nFinal answer: The final "
               "answer is 1. I hope it is correct.\n\nSubproblem 1: the age in years.")
    rows = [{"id": "a", "problem": problem, "answer": "400000", "solution": None,
             "meta": {spec.alternatives_key: ["1", "4 \\times 10^{5}"]}},
            {"id": "b", "problem": "Part 0 gave The final answer is 3e8. I hope it is correct. Now part 1.",
             "answer": "2", "solution": None, "meta": {spec.alternatives_key: ["3 \\times 10^8", "2.0"]}},
            # results the quoted part computes, unboxed (4.47e14, 2.5 m); "x = 2.50" states neither 2 nor 2.5
            {"id": "c", "problem": "Solution: $v = c/\\lambda = 4.47 \\times 10^{14} s^{-1}$, x = 2.50, y = 2.5 m.",
             "answer": "7", "solution": None,
             "meta": {spec.alternatives_key: ["4.47\\times 10^{14}", "7.0", "2", "2.5"]}}]
    path = tmp_path / spec.file
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c = load_benchmark("minerva", tmp_path, strict_count=False)
    assert a.alternatives == ("4 \\times 10^{5}",) and b.alternatives == ("2.0",)
    assert c.alternatives == ("7.0", "2")


def test_omni_tiers_cover_every_row():
    items = _load_or_skip("omni_math_rule")
    tiers = Counter(it.tier for it in items)
    assert set(tiers) == set(OMNI_TIERS) and sum(tiers.values()) == 2821
    for it in items:
        d = it.meta["difficulty"]
        assert it.tier == ("d<=3" if d <= 3 else "3<d<=5" if d <= 5 else "5<d<=7" if d <= 7 else "d>7")


def test_omni_tier_boundaries():
    assert [omni_tier(d) for d in (1, 3, 3.25, 5, 5.5, 7, 7.5, 9.5)] == [
        "d<=3", "d<=3", "3<d<=5", "3<d<=5", "5<d<=7", "5<d<=7", "d>7", "d>7"]


def test_limit_returns_the_first_rows():
    items = _load_or_skip("gsm8k_test")
    assert [it.id for it in load_benchmark("gsm8k_test", allow_download=False, limit=3)] == [it.id for it in items[:3]]


# ---------------------------------------------------------------------------------------------
# Bad files: each raises DatasetError naming the file, the line and the field


def _row(i: int, **over) -> dict:
    row = {"id": f"p{i}", "problem": f"What is {i}+1?", "answer": str(i + 1), "solution": None, "meta": {}}
    row.update(over)
    return row


def _write(tmp_path: Path, name: str, lines: list[str | bytes]) -> Path:
    path = tmp_path / BENCHMARKS[name].file
    with open(path, "wb") as fh:
        for line in lines:
            fh.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def _rows(n: int, **over_at) -> list[str]:
    return [json.dumps(over_at.get(i, _row(i))) for i in range(n)]


def test_invalid_json_on_line_3(tmp_path):
    lines = _rows(30)
    lines[2] = '{"id": "p2", "problem": "x", "answer": }'
    path = _write(tmp_path, "aime24", lines)
    with pytest.raises(DatasetError) as err:
        load_benchmark("aime24", tmp_path, allow_download=False)
    assert err.value.path == path and err.value.line == 3
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "not valid JSON" in str(err.value)


def test_duplicate_id_names_both_lines(tmp_path):
    lines = _rows(30)
    lines[7] = json.dumps(_row(7, id="p2"))
    _write(tmp_path, "aime24", lines)
    with pytest.raises(DatasetError, match=r"line 8, field 'id': duplicate id 'p2' \(first seen on line 3\)") as err:
        load_benchmark("aime24", tmp_path, allow_download=False)
    assert (err.value.line, err.value.field) == (8, "id")
    # a huge duplicated id is quoted by a short prefix, not whole (found by tests/test_fuzz.py)
    big = "x" * 200_000
    lines[2], lines[7] = json.dumps(_row(2, id=big)), json.dumps(_row(7, id=big))
    _write(tmp_path, "aime24", lines)
    with pytest.raises(DatasetError, match=r"line 8, field 'id': duplicate id 'x{79}\.\.\. \(200,002 characters\) "
                       r"\(first seen on line 3\)") as err:
        load_benchmark("aime24", tmp_path, allow_download=False)
    assert len(str(err.value)) < 400


def test_empty_answer(tmp_path):
    lines = _rows(30)
    lines[4] = json.dumps(_row(4, answer="  "))
    path = _write(tmp_path, "aime24", lines)
    with pytest.raises(DatasetError, match="must be a non-empty string") as err:
        load_benchmark("aime24", tmp_path, allow_download=False)
    assert (err.value.path, err.value.line, err.value.field) == (path, 5, "answer")
    assert f"{path}, line 5, field 'answer'" in str(err.value)


def test_missing_humaneval_field(tmp_path):
    good = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    bad = dict(good, task_id="HumanEval/1")
    del bad["entry_point"]
    _write(tmp_path, "humaneval", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(DatasetError, match="missing") as err:
        load_benchmark("humaneval", tmp_path, allow_download=False)
    assert (err.value.line, err.value.field) == (2, "entry_point")


def test_wrong_count_is_an_error_unless_relaxed(tmp_path):
    path = _write(tmp_path, "aime24", _rows(29))
    with pytest.raises(DatasetError, match="has 29 rows but benchmark 'aime24' expects 30") as err:
        load_benchmark("aime24", tmp_path, allow_download=False)
    assert err.value.path == path and err.value.line is None
    assert len(load_benchmark("aime24", tmp_path, allow_download=False, strict_count=False)) == 29
    assert len(load_benchmark("aime24", tmp_path, allow_download=False, limit=5)) == 5


def test_non_utf8_bytes_name_the_field(tmp_path):
    lines: list[str | bytes] = list(_rows(30))
    lines[5] = b'{"id": "p5", "problem": "caf\xe9 costs 3", "answer": "6", "meta": {}}'
    path = _write(tmp_path, "aime24", lines)
    with pytest.raises(DatasetError, match="not UTF-8") as err:
        load_benchmark("aime24", tmp_path, allow_download=False)
    assert (err.value.path, err.value.line, err.value.field) == (path, 6, "problem")


def test_bad_meta_types(tmp_path):
    lines = [json.dumps(_row(i, meta={"difficulty": 2.0})) for i in range(2821)]
    lines[10] = json.dumps(_row(10, meta={"difficulty": "hard"}))
    _write(tmp_path, "omni_math_rule", lines)
    with pytest.raises(DatasetError, match="Omni-MATH difficulty") as err:
        load_benchmark("omni_math_rule", tmp_path, allow_download=False)
    assert (err.value.line, err.value.field) == (11, "meta.difficulty")


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(DatasetError, match="unknown benchmark 'math5000'.*math500"):
        get_spec("math5000")


# ---------------------------------------------------------------------------------------------
# Hub fallback


def test_missing_file_without_download_names_the_env_var_and_hub_id(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_benchmark("math500", tmp_path, allow_download=False)
    msg = str(err.value)
    assert "L2T_DATA_DIR" in msg and "HuggingFaceH4/MATH-500" in msg and "math500.jsonl" in msg
    assert "allow_download=True" in msg


def test_set_without_hub_copy_says_so(tmp_path):
    with pytest.raises(DatasetError, match="no public Hugging Face hub copy.*L2T_DATA_DIR"):
        load_benchmark("omni_math_rule", tmp_path)


def test_offline_hub_is_a_clear_error(tmp_path):
    """HF_HUB_OFFLINE=1 (huggingface_hub reads it at import, hence a fresh interpreter) with an empty
    HF cache: the download must fail with the hub id and the way out, and write no cache file."""
    code = (
        "from l2t_core.eval.datasets import DatasetError, load_benchmark\n"
        "try:\n    load_benchmark('aime24')\nexcept DatasetError as e:\n    print('DatasetError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "L2T_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "data").mkdir()  # where hub copies may be kept (a directory that does not exist is refused)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DatasetError:"), out.stdout + out.stderr
    assert "Maxwell-Jia/AIME_2024" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
    assert not (tmp_path / "data" / "aime24.hub.jsonl").exists()


def test_a_data_directory_that_does_not_exist_is_refused_rather_than_filled_with_hub_copies(tmp_path, monkeypatch):
    """A mistyped L2T_DATA_DIR (or data_dir) would make every benchmark a hub copy, which can differ
    from the curated file (fewer accepted answers): refused, naming the directory, before any download."""
    missing = tmp_path / "shraed" / "data"
    monkeypatch.setenv("L2T_DATA_DIR", str(missing))
    with pytest.raises(DatasetError, match=rf"the data directory {re.escape(str(missing))} \(L2T_DATA_DIR\) does "
                                           r"not exist.*create that directory first"):
        load_benchmark("aime24")
    with pytest.raises(DatasetError, match=r"\(data_dir\) does not exist"):
        load_benchmark("aime24", missing)
    assert not missing.exists()


def test_hub_rows_are_normalised_to_the_file_schema(tmp_path, caplog):
    gsm = normalise_hub_rows(get_spec("gsm8k_test"), [
        {"question": "Tom has 1,200 apples and buys 34. How many?", "answer": "1200+34=<<1200+34=1234>>1234\n#### 1,234"}])
    assert gsm == [{"id": "gsm8k-test-0", "problem": "Tom has 1,200 apples and buys 34. How many?", "answer": "1234",
                    "solution": "1200+34=<<1200+34=1234>>1234\n#### 1,234", "meta": {"hub_repo": "openai/gsm8k"}}]
    aime = normalise_hub_rows(get_spec("aime_1983_2023"), [
        {"ID": "2023-II-15", "Year": 2023, "Problem Number": 15, "Question": "q1", "Answer": "23", "Part": "II"},
        {"ID": "2024-II-1", "Year": 2024, "Problem Number": 1, "Question": "q2", "Answer": "5", "Part": "II"}])
    assert [r["id"] for r in aime] == ["aime-2023-II-15"]  # 2024 is an evaluation year, dropped
    math = normalise_hub_rows(get_spec("math_train"), [
        {"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$", "level": "Level 3", "type": "Algebra"},
        {"problem": "q", "solution": "no box here", "level": "Level 1", "type": "Algebra"}])
    assert [(r["answer"], r["meta"]["level"]) for r in math] == [("\\frac{1}{2}", "Level 3")]
    amc = normalise_hub_rows(get_spec("amc23"), [{"question": "q", "answer": 27.0, "id": 0}])
    assert amc[0]["answer"] == "27" and amc[0]["problem"] == "q"
    with pytest.raises(DatasetError, match=r"none of the columns \['Problem'\]"):
        normalise_hub_rows(get_spec("aime24"), [{"problem": "x", "answer": "1"}])
    # a changed hub schema or a row without an answer: a DatasetError naming it, never KeyError or "None"
    with pytest.raises(DatasetError, match=r"has no column 'ID' for its id .*update id_template"):
        normalise_hub_rows(get_spec("aime24"), [{"Problem": "x", "Answer": "1", "Solution": "s"}])
    with pytest.raises(DatasetError, match=r"hub row 0 of .* has no answer \(None"):
        normalise_hub_rows(get_spec("amc23"), [{"question": "q", "answer": None, "id": 0}])

    # a normalised hub copy is read back through the same validation, from <name>.hub.jsonl
    (tmp_path / "gsm8k_test.hub.jsonl").write_text(json.dumps(gsm[0]) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="has 1 rows but benchmark 'gsm8k_test' expects 1319"):
        load_benchmark("gsm8k_test", tmp_path, allow_download=False)
    with caplog.at_level("WARNING", logger="l2t_core.eval.datasets"):
        (item,) = load_benchmark("gsm8k_test", tmp_path, allow_download=False, strict_count=False)
    assert (item.id, item.answer, item.meta["hub_repo"]) == ("gsm8k-test-0", "1234", "openai/gsm8k")
    # never silently: the log says the data directory lacks the file, and a report records which copy it read
    assert "gsm8k_test: gsm8k_test.jsonl is not in the data directory" in caplog.text and "openai/gsm8k" in caplog.text
    assert benchmark_source("gsm8k_test", tmp_path) == f"hub copy openai/gsm8k ({tmp_path / 'gsm8k_test.hub.jsonl'})"
    (tmp_path / "gsm8k_test.jsonl").write_text("")
    assert benchmark_source("gsm8k_test", tmp_path) == str(tmp_path / "gsm8k_test.jsonl")


def test_omni_answers_cut_before_their_last_brace_are_closed_and_verify():
    """Four Omni-MATH rule answers lack their last ``}`` upstream; nothing verified against them."""
    from l2t_core.verify import MathVerifier

    items = {it.id: it for it in _load_or_skip("omni_math_rule")}
    closed = {"omni-rule-183": "\\frac{5055}{2^{15}}", "omni-rule-682": "\\frac{81^{10}}{82^{10}}",
              "omni-rule-710": "\\frac{2 k n}{n+k-1}-2 \\frac{k!n!}{(k+n-1)!}", "omni-rule-1469": "\\frac{11}{2^{20}}"}
    assert {i for i, it in items.items() if "answer_unclosed" in it.meta} == set(closed)
    v = MathVerifier()
    for id_, answer in closed.items():
        it = items[id_]
        assert it.answer == answer and it.meta["answer_unclosed"] == answer[:-1]
        assert v.verify(f"</think> \\boxed{{{answer}}}", it.answer).correct
        assert not v.verify("</think> \\boxed{\\frac{1}{3}}", it.answer).correct
