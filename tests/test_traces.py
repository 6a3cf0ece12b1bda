"""Worked solutions as METHOD.md §8 traces (l2t_core.traces, `l2t traces`), the rows `l2t sft` trains on."""

from __future__ import annotations

import json

import pytest

from l2t_core.episodes import segment
from l2t_core.traces import solution_steps, trace_row, traces, write_jsonl

GSM = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
       "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_gsm8k_solution_steps_drop_calculator_annotations_and_the_answer_line():
    assert solution_steps(GSM) == ["Natalia sold 48/2 = 24 clips in May.",
                                   "Natalia sold 48+24 = 72 clips altogether in April and May."]
    assert solution_steps("First,\nwe add.\n\n  Then  we\nmultiply.\n", "paragraphs") == ["First, we add.",
                                                                                        "Then we multiply."]


def test_a_trace_segments_into_its_steps_and_ends_in_the_boxed_answer():
    from l2t_core.verify import MathVerifier

    row, outcome = trace_row({"id": "g0", "problem": "How many clips?", "answer": "72", "solution": GSM})
    assert outcome == "ok" and set(row) == {"id", "problem", "answer", "response"}
    seg = segment(row["response"])
    assert seg.status == "tagged" and [e.text for e in seg.episodes] == solution_steps(GSM)
    assert row["response"].endswith("</think>\n\n\\boxed{72}")
    assert MathVerifier().verify(row["response"], "72").correct


@pytest.mark.parametrize("solution, outcome", [
    (None, "no_solution"), ("  \n#### 3", "no_solution"), ("a\nb\nc", "too_many_steps"),
    ("<episode_1>x</episode_1>", "tags_in_solution"), ("we think </think> now", "tags_in_solution"),
])
def test_rows_that_give_no_trace_say_why(solution, outcome):
    assert trace_row({"id": "x", "problem": "p", "answer": "3", "solution": solution}, max_episodes=2) == (
        None, outcome)


def test_limit_and_outcome_counts():
    rows = [{"id": str(i), "problem": f"p{i}", "answer": "1", "solution": None if i % 2 else "s"} for i in range(7)]
    out, outcomes = traces(rows, limit=3)
    assert [r["id"] for r in out] == ["0", "2", "4"] and outcomes == {"ok": 3, "no_solution": 2}
    # an exact copy of an earlier trace (another id, the same problem and solution) is left out: l2t sft refuses it
    out, outcomes = traces([*rows[:3], {**rows[2], "id": "copy"}, rows[4]])
    assert [r["id"] for r in out] == ["0", "2", "4"] and outcomes == {"ok": 3, "no_solution": 1, "duplicate": 1}


def test_write_jsonl_refuses_to_overwrite_and_leaves_no_temporary_file(tmp_path):
    path = write_jsonl([{"a": "é"}], tmp_path / "t.jsonl")
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n'
    with pytest.raises(FileExistsError, match="already exists"):
        write_jsonl([{"a": 2}], path)
    with pytest.raises(TypeError):
        write_jsonl([{"a": object()}], tmp_path / "u.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_gsm8k_train_traces_are_tagged_and_verify(tmp_path, capsys):
    """`l2t traces gsm8k_train.jsonl` from the data directory: every trace segments as tagged
    episodes, one per solution line, and its boxed answer verifies against the row's answer;
    `l2t sft` reads the file back."""
    from l2t_core.cli import main
    from l2t_core.data import data_file
    from l2t_core.sft import check_traces, read_sft_jsonl
    from l2t_core.verify import MathVerifier

    try:
        data_file("gsm8k_train.jsonl")
    except FileNotFoundError:
        pytest.skip("gsm8k_train.jsonl is not in the data directory (L2T_DATA_DIR)")
    out = tmp_path / "gsm.jsonl"
    assert main(["traces", "gsm8k_train.jsonl", "--out", str(out), "--limit", "200", "-q"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "traces": 200, "rows": {"ok": 200}}
    rows = read_sft_jsonl(out)
    assert check_traces(rows) == {"segmentation": {"tagged": 200},
                                  "answers": {"checked": 200, "correct": 200, "wrong_ids": []}}
    wrong = [r.id for r in rows[:50] if MathVerifier().verify(r.response, str(int(r.answer) + 1)).correct]
    assert not wrong  # the check can fail: a wrong answer does not verify
    with pytest.raises(SystemExit, match=r"no row of .*gives a trace \(\{'no_solution': 2\}\)"):
        bare = tmp_path / "bare.jsonl"
        bare.write_text('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": "p", "answer": "2"}\n')
        main(["traces", str(bare), "--out", str(tmp_path / "x.jsonl"), "-q"])
