"""Reference solutions turned into METHOD.md §8 traces, the training rows of ``l2t sft``.

A math JSONL file whose rows carry a worked ``solution`` (GSM8K's train split, for one) becomes
rows ``{id, problem, answer, response}``: each step of the solution is one ``<episode_k>`` inside
``<think>``, and the response ends in ``\\boxed{answer}`` (the format the trainer's prompt asks for,
:func:`~l2t_core.tasks.common.render_trace`). A policy fine-tuned on them writes episodes that L2T
can credit one by one.

Steps are the solution's non-empty lines (``split="lines"``: GSM8K writes one computation per line)
or its blank-line-separated paragraphs (``split="paragraphs"``). GSM8K's calculator annotations
(``<<48/2=24>>``) and its final ``#### 72`` line are removed: the answer is the row's ``answer``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Sequence

from .atomic_files import write_jsonl_atomic
from .tasks.common import render_trace

Split = Literal["lines", "paragraphs"]

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations
_FINAL_ANSWER_LINE = re.compile(r"^\s*####.*$", re.MULTILINE)  # GSM8K's "#### 72"
_TAG = re.compile(r"</?(?:episode_\d+|think)>")


def solution_steps(solution: str, split: Split = "lines") -> list[str]:
    """The steps of a worked solution: its non-empty lines or paragraphs, without GSM8K's
    calculator annotations and final ``####`` line, each stripped."""
    text = _FINAL_ANSWER_LINE.sub("", _CALCULATOR.sub("", solution))
    parts = text.splitlines() if split == "lines" else re.split(r"\n\s*\n", text)
    return [" ".join(p.split()) if split == "paragraphs" else p.strip() for p in parts if p.strip()]


def trace_row(row: dict, split: Split = "lines", max_episodes: int = 30) -> tuple[dict | None, str]:
    """The ``l2t sft`` row of a math row ``{id, problem, answer, solution}``, or None and why not
    (``no_solution``, ``too_many_steps``, ``tags_in_solution``); ``"ok"`` otherwise."""
    solution = row.get("solution")
    if not isinstance(solution, str) or not solution.strip():
        return None, "no_solution"
    if _TAG.search(solution):  # would nest inside the episode tags and break the segmentation
        return None, "tags_in_solution"
    steps = solution_steps(solution, split)
    if not steps:
        return None, "no_solution"
    if len(steps) > max_episodes:
        return None, "too_many_steps"
    return {"id": row["id"], "problem": row["problem"], "answer": row["answer"],
            "response": render_trace(steps, row["answer"])}, "ok"


def traces(rows: Iterable[dict], split: Split = "lines", max_episodes: int = 30,
           limit: int | None = None) -> tuple[list[dict], Counter]:
    """The trace rows of ``rows`` (the first ``limit`` usable ones) and the count of each outcome;
    an exact copy of an earlier trace (the same problem and response, which ``l2t sft`` refuses) is
    left out as ``duplicate``."""
    out: list[dict] = []
    outcomes: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        trace, outcome = trace_row(row, split, max_episodes)
        if trace is not None:
            key = (trace["problem"], trace["response"])
            if key in seen:
                trace, outcome = None, "duplicate"
            seen.add(key)
        outcomes[outcome] += 1
        if trace is not None:
            out.append(trace)
    return out, outcomes


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    """``rows`` as JSONL at ``path``, written to a temporary file beside it and renamed into place;
    an existing file is refused, never overwritten."""
    return write_jsonl_atomic(path, rows, overwrite=False)
