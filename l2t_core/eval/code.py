"""Sample, execute and score a model on HumanEval (METHOD.md §7: n = 64, pass@1 and pass@64).

:func:`evaluate_code` builds one prompt per problem (:func:`code_prompt`: the §8 segmentation
instruction, then the problem's signature and docstring in a ``python`` block), samples
``settings.n`` responses through any :class:`~l2t_core.rollout.RolloutEngine`, turns every
response into a completion of the prompt (:func:`humaneval_completion`), runs each program
(prompt + completion + tests) in the sandbox of :mod:`l2t_core.eval.sandbox` (1 s of CPU, memory
and file limits, no network; :func:`~l2t_core.eval.sandbox.run_many` runs them in parallel), and
summarises with the unbiased pass@k estimator, per problem and overall.

Completion extraction (:func:`extract_code`, then :func:`completion_from_code`):

1. the answer part is the text after the last ``</think>``; without one, the whole response;
2. the code is the last non-empty fenced block of the answer part tagged ``python``/``py``/
   ``python3`` (else the last untagged one; :func:`fenced_blocks`: a fence closes at a line of
   three backticks or at three backticks ending a line of code, and an unclosed last fence runs to
   the end); without a fence, the answer part itself;
3. code that defines the entry point at its top level is a *full definition*: it is appended
   after the prompt on its own lines (it redefines the function; the prompt's imports and helper
   functions stay available), a top-level ``if __name__ == "__main__":`` block is dropped, and
   prose lines before the first import/def are dropped when the code only compiles without them;
4. other code is a *body continuation* of the prompt's function: it is kept as is when its first
   line is indented and it compiles after the prompt; otherwise it is re-indented (dedented and
   indented by 4 spaces, or only its first line indented by 4 spaces, which repairs a stripped
   first line), whichever compiles first (compiling runs nothing).

The rows have the columns of :data:`~l2t_core.eval.runner.ROW_COLUMNS` (one per sample:
``correct`` = the program passed, ``status`` = the sandbox status, ``answer`` = the completion),
so math and code results go into one :func:`~l2t_core.eval.report.write_report` report.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap
import time
from collections import Counter
from collections.abc import Sequence

import pandas as pd

from ..prompts import THINK_CLOSE, encode_prompt
from ..rollout import Completion, RolloutEngine
from .datasets import BenchmarkItem
from .metrics import pass_at_k
from .journal import SampleJournal
from .runner import ROW_COLUMNS, EvalResult, EvalSettings, group_of, sample_responses
from .sandbox import HUMANEVAL_CPU_S, HUMANEVAL_TIMEOUT_S, ExecResult, humaneval_program, isolation_report, run_many

# METHOD.md §8's segmentation instruction, with the answer given as a Python code block.
CODE_INSTRUCTION = (
    "Break down your reasoning into logically coherent segments. Each segment should be enclosed in "
    "<episode_k> ... </episode_k> tags, where k is the segment number starting from 1. Ensure each "
    "<episode_i> contains only a single complete logical move, such as a definition, a formula "
    "derivation, a transformation, or a case split. Reason inside <think> ... </think>, then give the "
    "complete Python function (its signature, body and any imports it needs) in one ```python code block."
)

# METHOD.md §7: HumanEval is sampled 64 times per problem.
HUMANEVAL_N = 64

_OPEN_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)")
_LINE_FENCE = re.compile(r"[ \t]*```+[ \t]*([A-Za-z0-9_+.-]*)(.*)")  # a line that starts with a fence
_PYTHON_TAGS = frozenset({"python", "py", "python3"})
_CODE_START = re.compile(r"^(?:from[ \t]+\S+[ \t]+import\b|import[ \t]|(?:async[ \t]+)?def[ \t]|class[ \t]|@)", re.M)


def code_prompt(item: BenchmarkItem) -> str:
    """The prompt text of a HumanEval problem: the instruction, then its signature + docstring."""
    _check_code_item(item)
    return f"{CODE_INSTRUCTION}\n\nComplete this function:\n\n```python\n{item.problem.rstrip()}\n```\n"


def extract_code(response: str) -> str:
    """The code of a response (steps 1-2 of the module docstring), ending in a newline; "" if none."""
    if not isinstance(response, str):
        raise TypeError(f"extract_code: response must be a str, got {type(response).__name__}")
    cut = response.rfind(THINK_CLOSE)
    answer = response[cut + len(THINK_CLOSE):] if cut >= 0 else response
    tagged, untagged = None, None
    for tag, body in fenced_blocks(answer):
        if not body.strip():
            continue  # an empty block is no answer
        if tag in _PYTHON_TAGS:
            tagged = body
        elif not tag:
            untagged = body
    code = tagged if tagged is not None else untagged if untagged is not None else answer
    code = re.sub(r"\A(?:[ \t]*\r?\n)+", "", code)  # leading blank lines, not the first line's indent
    code = code.rstrip()
    return code + "\n" if code else ""


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, lower-cased; body) of every fenced block of ``text``, read line by line. A
    fence opens where a line holds three backticks (and the tag after them). It closes at a line
    that starts with three or more backticks (what follows them, if it is a tag such as
    ``python``, opens the next block; other text after them is prose) or at three backticks ending
    a line of code (``return 1````); an unclosed last block runs to the end of the text."""
    blocks: list[tuple[str, str]] = []
    lines = text.split("\n")
    i, opened = 0, None
    while i < len(lines) or opened is not None:
        if opened is None:
            m = _OPEN_FENCE.search(lines[i])
            i += 1
            if m is not None:
                opened = m.group(1).lower()
            continue
        body: list[str] = []
        reopened = None
        while i < len(lines):
            line = lines[i]
            i += 1
            fence = _LINE_FENCE.match(line)
            if fence is not None:  # a line that starts with a fence ends the block
                tag, after = fence.group(1), fence.group(2)
                reopened = tag.lower() if tag and not after.strip() else None
                break
            if line.rstrip().endswith("```"):  # code```: the block ends with this line's code
                body.append(line.rstrip()[:-3])
                break
            body.append(line)
        blocks.append((opened, "\n".join(body)))
        opened = reopened
    return blocks


def defines_entry_point(code: str, entry_point: str) -> bool:
    """Whether ``code`` (after dedenting) defines ``entry_point`` at its top level."""
    pattern = rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\("
    return re.search(pattern, textwrap.dedent(code), re.M) is not None


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1:
        return False
    sides = [node.test.left, *node.test.comparators]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return isinstance(node.test.ops[0], ast.Eq) and len(names) == 1 and len(consts) == 1


def _drop_main_guard(code: str) -> str:
    """``code`` without its top-level ``if __name__ == "__main__":`` blocks (as is if it does not parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    lines = code.splitlines(keepends=True)
    drop = set()
    for node in tree.body:
        if _is_main_guard(node):
            drop.update(range(node.lineno - 1, node.end_lineno or node.lineno))
    return "".join(line for i, line in enumerate(lines) if i not in drop) if drop else code


def _compiles(source: str) -> bool:
    try:
        compile(source, "<humaneval completion>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def completion_from_code(item: BenchmarkItem, code: str) -> str:
    """The completion that :func:`~l2t_core.eval.sandbox.humaneval_program` appends to the prompt
    (steps 3-4 of the module docstring)."""
    _check_code_item(item)
    if not code.strip():
        return ""
    sep = "" if item.problem.endswith("\n") else "\n"
    if defines_entry_point(code, item.entry_point):
        full = _drop_main_guard(textwrap.dedent(code)).rstrip()
        start = _CODE_START.search(full)
        if start and start.start() > 0 and not _compiles(full) and _compiles(full[start.start():]):
            full = full[start.start():]  # prose before the code (an answer without a fence)
        return f"\n{full}\n"
    first = next(line for line in code.splitlines() if line.strip())
    as_is = code if first[:1] in (" ", "\t") else None
    reindented = textwrap.indent(textwrap.dedent(code), "    ")
    first_fixed = "    " + code.lstrip(" \t")
    candidates = [c for c in (as_is, reindented, first_fixed) if c is not None]
    for cand in candidates:
        if _compiles(item.problem + sep + cand):
            return sep + cand
    return sep + candidates[0]  # none compiles: the sandbox reports the SyntaxError


def humaneval_completion(item: BenchmarkItem, response: str) -> str:
    """A model response turned into the completion of ``item``'s prompt (see the module docstring)."""
    return completion_from_code(item, extract_code(response))


def _check_code_item(item: BenchmarkItem) -> None:
    if not getattr(item, "test", None) or not getattr(item, "entry_point", None):
        raise ValueError(f"{getattr(item, 'benchmark', '?')} item {getattr(item, 'id', item)!r} has no "
                         "test/entry_point: "
                         "code evaluation needs HumanEval items from load_benchmark('humaneval'); math "
                         "benchmarks go through evaluate_math")


def check_k_values(k_values: Sequence[int], n: int) -> tuple[int, ...]:
    """``k_values`` sorted and deduplicated; each must be an integer in [1, n]."""
    ks = tuple(sorted(set(k_values)))
    if not ks:
        raise ValueError("pass@k: no k values given; use e.g. (1, n)")
    bad = [k for k in ks if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k: k values {bad} are outside [1, n={n}]; draw at least k samples per problem "
                         f"(raise n) or drop those k")
    return ks


def failure_kind(result: ExecResult) -> str:
    """A short label of why a program did not pass: the exception name, or the sandbox status."""
    if result.status in ("failed", "error") and result.detail:
        head = result.detail.split(":", 1)[0].strip()
        if re.fullmatch(r"[A-Za-z_][\w.]*", head):
            return head
    return result.status


def summarize_code(rows: pd.DataFrame, k_values: Sequence[int]) -> dict:
    """pass@k (unbiased estimator, mean over problems) and mean tokens, overall, per group and per problem.

    Every problem must have at least ``max(k_values)`` samples. A problem is its benchmark's (two
    benchmarks of one table may reuse an id); ``per_problem`` names one ``benchmark/id`` where the
    table holds several benchmarks."""
    key = ["benchmark", "problem_id"] if "benchmark" in rows and rows["benchmark"].nunique() > 1 else "problem_id"
    counts = rows.groupby(key, sort=False)["correct"].agg(["size", "sum"])
    ks = check_k_values(k_values, int(counts["size"].min()))

    def block(df: pd.DataFrame) -> dict:
        c = df.groupby(key, sort=False)["correct"].agg(["size", "sum"])
        out = {"problems": int(len(c)), "samples": int(len(df))}
        for k in ks:
            out[f"pass@{k}"] = float(sum(pass_at_k(int(n), int(s), k) for n, s in zip(c["size"], c["sum"])) / len(c))
        out.update(mean_tokens=float(df["response_tokens"].mean()), finished_share=float(df["finished"].mean()))
        return out

    out = block(rows)
    out["per_group"] = {str(g): block(df) for g, df in rows.groupby("group", sort=True)}
    out["per_problem"] = {"/".join(map(str, pid)) if isinstance(pid, tuple) else str(pid):
                          {"samples": int(n), "passed": int(s), **{f"pass@{k}": pass_at_k(int(n), int(s), k) for k in ks}}
                          for pid, n, s in zip(counts.index, counts["size"], counts["sum"])}
    out["status_counts"] = {str(k): int(v) for k, v in rows["status"].value_counts().sort_index().items()}
    return out


def score_code(items: Sequence[BenchmarkItem], groups: Sequence[Sequence[Completion]], *,
               k_values: Sequence[int] | None = None, workers: int | None = None, keep_text: bool = True,
               dedupe: bool = True, **limits) -> EvalResult:
    """Execute and score sampled responses: ``groups[i]`` holds the completions of ``items[i]``.

    Every sample's program runs in the sandbox (``limits`` are :func:`~l2t_core.eval.sandbox.run_program`
    keywords; default 1 s CPU and a 5 s wall clock per program, METHOD.md §7). With ``dedupe``
    identical programs run once. ``k_values`` defaults to ``(1, n)``."""
    if not items:
        raise ValueError("score_code: no problems to evaluate")
    if len(items) != len(groups):
        raise ValueError(f"score_code: {len(items)} problems but {len(groups)} groups of completions")
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"score_code: every problem needs the same positive number of samples, got {sorted(sizes)}")
    n = sizes.pop()
    ks = check_k_values(k_values if k_values is not None else (1, n), n)
    for item in items:
        _check_code_item(item)
    limits = {"cpu_s": HUMANEVAL_CPU_S, "timeout_s": HUMANEVAL_TIMEOUT_S, **limits}
    flat = [(item, k, c, humaneval_completion(item, c.text)) for item, g in zip(items, groups)
            for k, c in enumerate(g)]
    programs = [humaneval_program(item, comp) for item, _, _, comp in flat]
    unique = list(dict.fromkeys(programs)) if dedupe else programs
    t0 = time.perf_counter()
    results = run_many(unique, workers=workers or os.cpu_count() or 1, **limits)
    exec_s = time.perf_counter() - t0
    by_program = dict(zip(unique, results)) if dedupe else None
    outcomes = [by_program[p] for p in programs] if dedupe else results
    rows = pd.DataFrame([{
        "benchmark": item.benchmark, "problem_id": item.id, "sample": k, "group": group_of(item),
        "response_tokens": len(c.response_ids), "finished": bool(c.finished), "correct": r.passed,
        "status": r.status, "answer": comp if keep_text else None, "response": c.text if keep_text else None,
    } for (item, k, c, comp), r in zip(flat, outcomes)], columns=list(ROW_COLUMNS))
    summary = summarize_code(rows, ks)
    summary.update(
        k_values=list(ks), execution_s=exec_s, programs_run=len(unique),
        failure_kinds=dict(Counter(failure_kind(r) for r in outcomes if not r.passed).most_common()),
        sandbox={**limits, "isolation": "audit-hook" if limits.get("isolation") == "audit-hook"
                 else isolation_report()["mode"]})
    return EvalResult(rows, summary)


def evaluate_code(engine: RolloutEngine, tokenizer, items: Sequence[BenchmarkItem],
                  settings: EvalSettings = EvalSettings(n=HUMANEVAL_N), *, k_values: Sequence[int] | None = None,
                  workers: int | None = None, show_progress: bool = False, journal: SampleJournal | None = None,
                  **limits) -> EvalResult:
    """Sample ``settings.n`` responses per HumanEval item with ``engine``, run and score them.

    ``k_values`` (default ``(1, settings.n)``; each in [1, n]) are the reported pass@k;
    ``workers`` sandboxes run at once (default: the CPU count); ``limits`` go to the sandbox;
    ``journal``: see :func:`~l2t_core.eval.runner.sample_responses`."""
    if not items:
        raise ValueError("evaluate_code: no problems to evaluate")
    for item in items:
        _check_code_item(item)
    ks = check_k_values(k_values if k_values is not None else (1, settings.n), settings.n)
    t0 = time.perf_counter()
    prompts = [encode_prompt(tokenizer, code_prompt(i)) for i in items]
    groups = sample_responses(engine, prompts, settings, show_progress=show_progress, journal=journal)
    gen_s = time.perf_counter() - t0
    result = score_code(items, groups, k_values=ks, workers=workers, keep_text=settings.keep_text, **limits)
    result.summary.update(benchmarks=sorted({i.benchmark for i in items}), generation_s=gen_s,
                          settings=dict(settings.__dict__))
    return result
