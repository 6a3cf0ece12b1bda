"""Sample, verify and score a model on a math benchmark (METHOD.md §7).

:func:`evaluate_math` generates ``n`` samples per problem through any
:class:`~l2t_core.rollout.RolloutEngine` (vLLM on a GPU, ``hf`` on a CPU), verifies every sample
against the problem's accepted answers (gold first, math-verify; in a process pool when
``verify_workers > 1``; a sample cut at ``max_new_tokens`` before ``</think>`` has no answer:
:func:`cut_while_thinking`), and returns one row per sample plus a summary: pass@1 (mean correctness
over the n samples), maj@k on the first k samples, mean response tokens, and both per
level/tier. Items with a prompt of their own (the synthetic held-out sets of
:mod:`l2t_core.eval.synthetic`) are prompted with it, every other item with METHOD.md §8's math
prompt (:func:`prompt_text`). The rows are what the pipeline loads into DuckDB
(``eval_results``). HumanEval goes through :func:`l2t_core.eval.code.evaluate_code`, which
samples with :func:`sample_responses` and writes rows of the same columns.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from rich.progress import Progress

from ..prompts import THINK_CLOSE, build_prompt, encode_prompt
from ..rollout import Completion, RolloutEngine, SamplingParams
from ..verify import MathVerifier, Verdict, equivalent_answers
from .datasets import BenchmarkItem
from .journal import SampleJournal, journal_key
from .metrics import answer_classes, maj_at_k

log = logging.getLogger(__name__)

ROW_COLUMNS = ("benchmark", "problem_id", "sample", "group", "response_tokens", "finished", "correct",
               "status", "answer", "response")


@dataclass(frozen=True)
class EvalSettings:
    """Sampling of METHOD.md §7: n = 20, temperature 0.6, top-p 0.95; maj@4."""

    n: int = 20
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 16384
    maj_k: int = 4
    seed: int = 0
    prompts_per_call: int = 64
    verify_workers: int = 1
    verify_timeout_s: float = 5.0
    keep_text: bool = True

    def __post_init__(self) -> None:
        for name in ("n", "maj_k", "prompts_per_call", "verify_workers", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"EvalSettings.temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalSettings.top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.verify_timeout_s) and self.verify_timeout_s > 0):
            raise ValueError(f"EvalSettings.verify_timeout_s must be a finite number > 0, got {self.verify_timeout_s}")


def eval_identity(settings: EvalSettings) -> dict:
    """The settings that change an evaluation's results (not how many processes verify)."""
    return {k: getattr(settings, k) for k in ("n", "temperature", "top_p", "max_new_tokens", "maj_k", "seed",
                                              "prompts_per_call", "verify_timeout_s", "keep_text")}


@dataclass
class EvalResult:
    rows: pd.DataFrame  # one row per sample (ROW_COLUMNS)
    summary: dict = field(default_factory=dict)


def group_of(item: BenchmarkItem) -> str:
    """The breakdown key of an item: its Omni-MATH tier, else its level, else 'all'."""
    if item.tier is not None:
        return f"tier {item.tier}"
    if item.level is not None:
        return f"level {item.level}"
    return "all"


def prompt_text(item: BenchmarkItem) -> str:
    """The prompt text of an item: its own ``prompt`` when it has one (the synthetic held-out
    sets carry their task's prompt, see :mod:`l2t_core.eval.synthetic`), else METHOD.md §8's
    math prompt of its problem (:func:`~l2t_core.prompts.build_prompt`)."""
    return item.prompt if item.prompt is not None else build_prompt(item.problem)


CUT_WHILE_THINKING = Verdict(False, "no_answer", None, "cut at max_new_tokens before </think>: no final answer")


def cut_while_thinking(completion: Completion) -> bool:
    """Whether a completion ran into the token limit without closing its think block: it gave no
    final answer, and the last box or number of its unfinished reasoning is not one (the verifier
    alone, which sees no ``finished`` flag, would score the whole text as the answer span)."""
    return not completion.finished and THINK_CLOSE not in completion.text


def verify_completions(completions: Sequence[Completion], accepted: Sequence[tuple[str, ...]], *,
                       workers: int = 1, timeout_s: float = 5.0) -> list[Verdict]:
    """:func:`verify_all` of sampled completions, in order: one cut at the token limit before
    ``</think>`` is not verified and gets :data:`CUT_WHILE_THINKING` (:func:`cut_while_thinking`)."""
    answered = [k for k, c in enumerate(completions) if not cut_while_thinking(c)]
    checked = verify_all([completions[k].text for k in answered], [accepted[k] for k in answered],
                         workers=workers, timeout_s=timeout_s)
    verdicts = [CUT_WHILE_THINKING] * len(completions)
    for k, v in zip(answered, checked):
        verdicts[k] = v
    return verdicts


class AcceptedAnswers:
    """A verifier whose reference is a tuple of accepted answers (gold first): correct when the
    response matches any of them. ``timeout_s`` is one check's deadline times the most answers a
    reference has, the longest one verification can take (what a worker pool waits for)."""

    canary = ("\\boxed{\\frac{1}{2}}", ("0.5",))  # runs math-verify, for a worker pool (see MathVerifier.canary)

    def __init__(self, timeout_s: float, most_answers: int = 1):
        self.check = MathVerifier(timeout_s)
        self.timeout_s = timeout_s * max(1, most_answers)

    def verify(self, response: str, accepted: tuple[str, ...]) -> Verdict:
        last = None
        for ans in accepted:
            last = self.check.verify(response, ans)
            if last.correct:
                return last
        return last  # type: ignore[return-value]


def verify_all(responses: Sequence[str], accepted: Sequence[tuple[str, ...]], *, workers: int = 1,
               timeout_s: float = 5.0) -> list[Verdict]:
    """Verdicts of every response against its accepted answers, in order; with ``workers`` > 1 in
    a :class:`~l2t_core.verify_pool.VerifierPool` (spawned processes, so none is forked from a
    process that holds a GPU engine; a worker that dies or stalls is replaced)."""
    from ..verify_pool import VerifierPool

    references = [tuple(a) for a in accepted]
    if len(references) != len(responses):
        raise ValueError(f"verify_all: {len(responses)} responses but {len(references)} accepted-answer tuples")
    verifier = AcceptedAnswers(timeout_s, max((len(a) for a in references), default=1))
    if workers <= 1 or len(references) < 2 * workers:
        return [verifier.verify(r, a) for r, a in zip(responses, references)]
    pool = VerifierPool(verifier, workers)
    try:
        return pool.verify(list(responses), references)
    finally:
        pool.close()


def majority_classes(answers: Sequence[str | None]) -> list[int | None]:
    """:func:`~l2t_core.eval.metrics.answer_classes` under :func:`~l2t_core.verify.equivalent_answers`:
    the voting classes of maj@k and of the best-of-N majority selector."""
    return answer_classes([a if isinstance(a, str) else None for a in answers], equivalent_answers)


def summarize(rows: pd.DataFrame, maj_k: int) -> dict:
    """pass@1, maj@k and mean tokens of a sample table, overall and per group; maj@k votes over
    mathematically equivalent answers (:func:`majority_classes`)."""

    def block(df: pd.DataFrame) -> dict:
        # a problem is its benchmark's: two benchmarks of one table may reuse an id
        per_problem = df.groupby(["benchmark", "problem_id"] if "benchmark" in df else "problem_id", sort=False)
        majs = []
        for _, g in per_problem:
            g = g.sort_values("sample")
            if len(g) >= maj_k:
                first = list(g["answer"])[:maj_k]
                majs.append(maj_at_k(majority_classes(first), list(g["correct"])[:maj_k], maj_k))
        return {
            "problems": int(per_problem.ngroups),
            "samples": int(len(df)),
            "pass@1": float(per_problem["correct"].mean().mean()),
            f"maj@{maj_k}": float(sum(majs) / len(majs)) if majs else None,
            "mean_tokens": float(df["response_tokens"].mean()),
            "finished_share": float(df["finished"].mean()),
        }

    out = block(rows)
    out["per_group"] = {str(k): block(g) for k, g in rows.groupby("group", sort=True)}
    return out


def sample_responses(engine: RolloutEngine, prompts: Sequence[Sequence[int]], settings: EvalSettings, *,
                     show_progress: bool = False, journal: SampleJournal | None = None) -> list[list[Completion]]:
    """``settings.n`` completions per prompt, ``settings.prompts_per_call`` prompts per engine call.

    The call for the chunk that starts at prompt ``s`` is seeded ``settings.seed + s``, so the same
    items and settings draw the same samples. With a ``journal``, each call's completions are kept
    as it returns, and the chunks the journal already holds for these prompts and settings are not
    sampled again (a rerun after a crash: :mod:`~l2t_core.eval.journal`). Shared by
    :func:`evaluate_math` and :func:`~l2t_core.eval.code.evaluate_code`."""
    params = SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    done = {}
    if journal is not None:
        sampling = {**dataclasses.asdict(params), "prompts_per_call": settings.prompts_per_call,
                    "engine": getattr(engine, "name", None)}
        done = journal.begin(journal_key(prompts, sampling), prompts)
    groups: list[list[Completion]] = []
    with Progress(disable=not show_progress) as bar:
        task = bar.add_task(f"sampling {len(prompts)} problems x {settings.n}", total=len(prompts))
        if done:
            log.info("resuming: %d of %d problems sampled before (%s)", sum(len(g) for g in done.values()),
                     len(prompts), journal.path)
        for s in range(0, len(prompts), settings.prompts_per_call):
            chunk = prompts[s: s + settings.prompts_per_call]
            if s in done and len(done[s]) == len(chunk):
                groups += done[s]
            else:
                out = engine.generate(chunk, dataclasses.replace(params, seed=settings.seed + s))
                if journal is not None:
                    journal.record(s, out)
                groups += out
            bar.update(task, advance=len(chunk))
    if len(groups) != len(prompts) or any(len(g) != settings.n for g in groups):
        raise RuntimeError(f"rollout engine {getattr(engine, 'name', engine)!r} returned {len(groups)} groups of "
                           f"sizes {sorted({len(g) for g in groups})} for {len(prompts)} prompts x n={settings.n}")
    return groups


def evaluate_math(engine: RolloutEngine, tokenizer, items: Sequence[BenchmarkItem],
                  settings: EvalSettings = EvalSettings(), *, show_progress: bool = False,
                  journal: SampleJournal | None = None) -> EvalResult:
    """Sample ``settings.n`` responses per item with ``engine``, verify and summarise them.

    Each item is prompted with :func:`prompt_text` (its own prompt, else the §8 math prompt),
    encoded by :func:`~l2t_core.prompts.encode_prompt`. ``journal``: see :func:`sample_responses`."""
    if not items:
        raise ValueError("evaluate_math: no problems to evaluate")
    t0 = time.perf_counter()
    prompts = [encode_prompt(tokenizer, prompt_text(i)) for i in items]
    groups = sample_responses(engine, prompts, settings, show_progress=show_progress, journal=journal)
    gen_s = time.perf_counter() - t0
    result = score_math(items, groups, settings)
    result.summary.update(generation_s=gen_s)
    return result


def score_math(items: Sequence[BenchmarkItem], groups: Sequence[Sequence[Completion]],
               settings: EvalSettings = EvalSettings()) -> EvalResult:
    """Verify and summarise sampled responses: ``groups[i]`` holds the completions of ``items[i]``
    (the second half of :func:`evaluate_math`). A completion cut at the token limit before
    ``</think>`` is not verified: it has no answer (:func:`cut_while_thinking`)."""
    if len(items) != len(groups):
        raise ValueError(f"score_math: {len(items)} problems but {len(groups)} groups of completions")
    kinds = {getattr(i, "benchmark", "") for i in items}
    flat = [(item, k, c) for item, g in zip(items, groups) for k, c in enumerate(g)]
    t1 = time.perf_counter()
    verdicts = verify_completions([c for _, _, c in flat], [i.accepted_answers for i, _, _ in flat],
                                  workers=settings.verify_workers, timeout_s=settings.verify_timeout_s)
    verify_s = time.perf_counter() - t1
    rows = pd.DataFrame([{
        "benchmark": item.benchmark, "problem_id": item.id, "sample": k, "group": group_of(item),
        "response_tokens": len(c.response_ids), "finished": bool(c.finished), "correct": bool(v.correct),
        "status": v.status, "answer": v.extracted, "response": c.text if settings.keep_text else None,
    } for (item, k, c), v in zip(flat, verdicts)], columns=list(ROW_COLUMNS))
    summary = summarize(rows, settings.maj_k)
    statuses = {str(k): int(v) for k, v in rows["status"].value_counts().sort_index().items()}
    summary.update(benchmarks=sorted(kinds), verification_s=verify_s, settings=dict(settings.__dict__),
                   statuses=statuses)
    if statuses.get("timeout"):  # scored wrong: say so, it lowers pass@1 for no fault of the model
        log.warning("%s: %d of %d answer checks ran out of their %.1f s and count as wrong (status 'timeout'); "
                    "a larger --verify-timeout or more --verify-workers checks them", ", ".join(sorted(kinds)),
                    statuses["timeout"], len(rows), settings.verify_timeout_s)
    return EvalResult(rows, summary)


# ----------------------------------------------------------------------------------------------
# Per-group rows (the pipeline's eval_results table)

GROUP_ROW_COLUMNS = ("level", "n", "accuracy", "mean_tokens", "mean_episodes", "tagged_share", "finished_share",
                     "redundant_share")


def episode_counts(response: str) -> tuple[int, bool, int]:
    """``(episodes, tagged, repeated)`` of one response: its number of episodes (METHOD.md §1
    segmentation), whether they were tagged, and how many episodes repeat an earlier episode of the
    same response word for word (case and whitespace ignored; empty episodes never count).

    Real benchmarks have no classifier of re-checks and restatements (the synthetic tasks do), so
    a verbatim repeat is the redundancy measured on them."""
    from ..episodes import segment

    seg = segment(response)
    seen: set[str] = set()
    repeated = 0
    for episode in seg.episodes:
        key = " ".join(episode.text.split()).lower()
        if key and key in seen:
            repeated += 1
        seen.add(key)
    return seg.num_episodes, seg.status == "tagged", repeated


def _group_stats(rows: pd.DataFrame) -> dict:
    """``n`` (problems), pass@1, mean tokens, episode and finish statistics of a sample table that
    carries ``episodes``, ``tagged`` and ``repeated`` columns."""
    per_problem = rows.groupby(["benchmark", "problem_id"], sort=False)["correct"].mean()
    episodes = int(rows["episodes"].sum())
    return {
        "n": int(len(per_problem)),
        "accuracy": float(per_problem.mean()),
        "mean_tokens": float(rows["response_tokens"].mean()),
        "mean_episodes": float(rows["episodes"].mean()),
        "tagged_share": float(rows["tagged"].mean()),
        "finished_share": float(rows["finished"].mean()),
        "redundant_share": float(rows["repeated"].sum() / max(1, episodes)),
    }


def group_labels(rows: pd.DataFrame) -> pd.Series:
    """The ``level`` label of every sample row: its :func:`group_of` key (``level 3``,
    ``tier d<=3``), prefixed with the benchmark when the rows hold several benchmarks
    (``math500 level 3``); a benchmark without levels or tiers is one group named after the
    benchmark (several benchmarks) or none at all (one benchmark: ``'all'`` covers it). Items
    without a group in a benchmark that has groups are ``ungrouped``."""
    several = rows["benchmark"].nunique() > 1
    labels = pd.Series("all", index=rows.index, dtype=object)
    for bench, sub in rows.groupby("benchmark", sort=False):
        if set(sub["group"]) == {"all"}:
            labels[sub.index] = bench if several else "all"
            continue
        names = sub["group"].where(sub["group"] != "all", "ungrouped")
        labels[sub.index] = (f"{bench} " + names) if several else names
    return labels


def group_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Overall (``level='all'``) then per-group rows of an :func:`evaluate_math` sample table (one
    or several benchmarks), with the columns :data:`GROUP_ROW_COLUMNS`:

    ``n`` problems, ``accuracy`` = pass@1 (per-problem mean correctness, averaged over problems),
    ``mean_tokens`` / ``mean_episodes`` per response, ``tagged_share`` (responses segmented by
    their episode tags), ``finished_share`` (responses that ended before the token budget) and
    ``redundant_share`` (episodes repeating an earlier one, see :func:`episode_counts`). Groups are
    those of :func:`group_labels`; they partition the problems, so the ``'all'`` row's ``n`` is
    the sum of the groups' and its accuracy their ``n``-weighted mean. Needs the response text
    (``EvalSettings.keep_text=True``) to count episodes.
    """
    if rows.empty:
        raise ValueError("group_rows: no sample rows; evaluate at least one problem")
    if rows["response"].isna().any():
        raise ValueError("group_rows: the sample rows have no response text to segment into episodes; "
                         "evaluate with EvalSettings(keep_text=True)")
    counts = [episode_counts(text) for text in rows["response"]]
    data = rows.assign(episodes=[c[0] for c in counts], tagged=[c[1] for c in counts],
                       repeated=[c[2] for c in counts], label=group_labels(rows))
    out = [{"level": "all", **_group_stats(data)}]
    out += [{"level": label, **_group_stats(sub)}
            for label, sub in data.groupby("label", sort=True) if label != "all"]
    return pd.DataFrame(out, columns=list(GROUP_ROW_COLUMNS))
