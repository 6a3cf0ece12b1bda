"""SFT warm start of the tiny policy on a synthetic task, and its evaluation.

The task is ``WarmStartConfig.task``: ``walk`` (the default, :mod:`l2t_core.tasks.walk`) or
``arithmetic`` (:mod:`l2t_core.tasks.arithmetic`); every function here uses the task the problems
it is given belong to.

* :func:`warm_start` builds the task corpus (reference traces with useful and redundant
  re-checks, plus forced-answer examples), the character tokenizer and a tiny Qwen2, runs SFT,
  and saves the checkpoint with ``save_pretrained`` and a ``warmstart.json`` report.
* :func:`evaluate` decodes held-out problems (greedily, or ``samples`` per problem for pass@1 and
  maj@n) and reports, per difficulty level, accuracy, response tokens, episodes, and how often the
  model re-checks hard and easy steps.
* :func:`answer_readout` measures how sharply the forced-answer readout J knows the true answer
  after complete reference traces (what L2T's fitting gain needs to carry signal).
* :func:`check_gains` measures the fitting gain G_k (METHOD.md §2) of every kind of episode: on
  the SFT model a re-check of a hard step (move) should raise J on average, one of an easy step not.

Run ``python -m l2t_core.warmstart --out DIR`` to warm-start (if DIR has no checkpoint yet) and
measure both; the numbers go to ``DIR/measure.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field

from .atomic_files import write_text_atomic
from .config import _Strict
from .episodes import segment, token_episode_ids
from .eval.metrics import answer_key, maj_at_k
from .models import build_char_tokenizer, build_tiny_qwen2, load_policy
from .prompts import FORCE_ANSWER_SUFFIX, render_answer
from .rewards.fitting import JItem, answer_logprobs_packed, fitting_gains
from .rewards.l2t import response_offsets
from .rollout.base import SamplingParams
from .rollout.hf import HFRolloutEngine
from .sft import sft
from .tasks import TASKS, TaskName, get_task, task_of
from .tasks.common import restatement_text
from .tasks.walk import HELDOUT_SEED, LEVELS  # the same in both tasks
from .verify import NumericVerifier

log = logging.getLogger("l2t.warmstart")


SFT_STEPS_DEFAULT = 800
READOUT_PER_LEVEL = 10  # reference traces per evaluation level for warm_start's answer_readout
MAX_STEPS_DEFAULT = 6


class WarmStartConfig(_Strict):
    """Task, corpus, model and SFT settings of the warm start.

    The defaults were measured on the ``walk`` task (1 torch thread, 2 shared CPU cores, 4 layers,
    hidden 128, lr 3e-3, batch 32, guess_error 0.6, hard_check 0.8, easy_check 0.6, levels 1-6
    trained; greedy accuracy on 50 problems per level 1..6):

    ==============================================  =====  ====  ================================
    trace format                                    steps  acc   per level 1..6
    ==============================================  =====  ====  ================================
    unlabelled moves (``6>>1``)                     800    --    1.0 / 0.7 / -- / 0.45 / -- / 0.3
    labels counting up (``b 6>>1``)                 800    0.65  1.0/.94/.90/.42/.38/.24
    labels up, ``->``/``>>`` moves                  700    0.74  1.0/1.0/1.0/.66/.60/.16
    labels counting down to ``a``, ``->``/``>>``    700    0.71  1.0/1.0/.88/.60/.40/.38
    remaining moves (``6>>1 then > >>``, chosen)    800    0.80  1.0/1.0/.92/.82/.54/.54
    ==============================================  =====  ====  ================================

    (Those runs used PERM with a fixed point and random, not held-out, problems.) The defaults
    themselves (``python -m l2t_core.warmstart --threads 1``): SFT 536 s for 800 steps, final loss
    0.113; held-out greedy accuracy 1.0 / 1.0 / 1.0 / 0.92 / 0.48 / 0.36 on levels 1..6 (n = 3, 5,
    12, 26, 46, 50: all held-out problems of levels 1-5), 0.59 over the 142 problems, 0.79 as the
    mean of the levels. Greedy, the model writes a wrong direct result on 69 % of hard moves and
    on no easy move, and checks 97 % of hard moves. Mean G_k on reference traces: check after a
    hard move +0.038, after an easy move +0.005, repeat -0.018, restatement +0.004. The
    arithmetic task reached 0.09 after 600 steps with the same model and SFT settings. (All measured
    with the 320-token character vocabulary, before the force-answer instruction became one token.)
    """

    seed: int = 0
    task: TaskName = Field("walk", description="The synthetic task: 'walk' (learnable on a CPU) or 'arithmetic'.")
    min_steps: int = Field(1, ge=1, le=6, description="Fewest steps (moves, terms) in a training problem.")
    max_steps: int = Field(MAX_STEPS_DEFAULT, ge=1, le=6, description="Most steps in a training problem.")
    hard_prob: float = Field(0.5, ge=0, le=1, description="Chance that a step is hard (two hops; a carry).")
    train_size: int = Field(20000, ge=1, description="Training problems (one SFT example each).")
    # reference traces (the task's TraceStyle)
    guess_error: float = Field(0.6, ge=0, le=1, description="A hard step's direct result is the typical mistake.")
    hard_check: float = Field(0.8, ge=0, le=1, description="Useful re-check after a hard step.")
    easy_check: float = Field(0.6, ge=0, le=1, description="Redundant re-check after an easy step.")
    repeat: float = Field(0.1, ge=0, le=1, description="Redundant verbatim repeat of a step.")
    restate: float = Field(0.2, ge=0, le=1, description="Redundant restatement of the problem first.")
    concise: float = Field(0.0, ge=0, le=1, description=(
        "Share of traces with no redundant episode at all (hard steps still checked), so the base has "
        "seen the short contexts a shortening policy moves into."))
    forced_frac: float = Field(0.25, ge=0, lt=1, description="Share of forced-answer examples in the corpus.")
    # model (build_tiny_qwen2)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(384, ge=8)
    # SFT
    sft_steps: int = Field(SFT_STEPS_DEFAULT, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    eval_loss_size: int = Field(200, ge=0, description="Held-out SFT examples for the evaluation loss.")
    # greedy evaluation written into warmstart.json
    eval_levels: tuple[int, ...] = LEVELS
    eval_per_level: int = Field(50, ge=1)
    eval_max_new_tokens: int = Field(320, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads for the warm start (None: unchanged).")

    def model_post_init(self, __context) -> None:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")

    def task_module(self):
        """The module of ``task`` (:mod:`l2t_core.tasks.walk` or :mod:`l2t_core.tasks.arithmetic`)."""
        return get_task(self.task)

    def trace_style(self):
        """The task's ``TraceStyle`` with this config's probabilities."""
        return self.task_module().TraceStyle(self.guess_error, self.hard_check, self.easy_check, self.repeat,
                                             self.restate, self.concise)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def _task_of_all(problems: Sequence, where: str):
    """The one task module all ``problems`` belong to."""
    if not problems:
        raise ValueError(f"{where}: no problems")
    mods = {task_of(p).__name__ for p in problems}
    if len(mods) > 1:
        raise ValueError(f"{where}: the problems mix tasks ({', '.join(sorted(mods))})")
    return task_of(problems[0])


def held_out(levels: Sequence[int] = LEVELS, per_level: int = 50, seed: int = HELDOUT_SEED,
             task: TaskName = "walk") -> list:
    """The held-out evaluation problems of ``task``: ``per_level`` unique ones per level (all of a
    level's held-out problems when it has fewer, see :func:`l2t_core.tasks.walk.held_out_problems`),
    never in training."""
    return get_task(task).held_out_problems(levels, per_level, seed)


def sft_pairs(problems: Sequence, style, forced_frac: float, seed: int) -> list[tuple[str, ...]]:
    """One SFT example per problem: ``(prompt, response)`` with a whole reference trace, or, for a
    share ``forced_frac``, a forced-answer example ``(prompt, prefix, suffix, answer)``: the trace
    cut at a uniformly drawn episode boundary k = 0..K, the force-answer suffix (not trained) and
    the true answer (see :func:`~l2t_core.tasks.walk.forced_answer_example`). The problems' task
    builds prompts and traces; ``style`` is a ``TraceStyle`` (any object with its fields).
    """
    if not 0 <= forced_frac < 1:
        raise ValueError(f"sft_pairs: forced_frac must be in [0, 1), got {forced_frac}")
    task = _task_of_all(problems, "sft_pairs")
    rng = random.Random(seed)
    pairs = []
    for p in problems:
        prompt = task.build_task_prompt(p)
        tr = task.build_trace(p, rng, style)
        if rng.random() < forced_frac:
            k = rng.randint(0, len(tr.episodes))
            pairs.append(task.forced_answer_example(prompt, tr.text, k, p.answer))
        else:
            pairs.append((prompt, tr.text))
    return pairs


# --------------------------------------------------------------------------------------------
# Greedy evaluation
# --------------------------------------------------------------------------------------------


def generate(model, tokenizer, problems: Sequence, *, max_new_tokens: int, batch_size: int = 64,
             n: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    """Completions of every problem's task prompt (``n`` each), in the order of ``problems`` (the
    engine batches the prompts by length)."""
    task = _task_of_all(problems, "generate")
    engine = HFRolloutEngine(model, tokenizer, max_batch_sequences=batch_size)
    prompts = [tokenizer(task.build_task_prompt(p), add_special_tokens=False)["input_ids"] for p in problems]
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    return engine.generate(prompts, params)


def response_record(problem, text: str, n_tokens: int, finished: bool, verifier=None) -> dict:
    """Correctness, length and episode kinds (in the vocabulary of the problem's task) of one response."""
    verifier = verifier or NumericVerifier()
    seg = segment(text)
    kinds = task_of(problem).classify_episodes([e.text for e in seg.episodes]) if seg.status == "tagged" else []
    count = defaultdict(int)
    for e in kinds:
        key = e.kind if e.kind in ("restate", "repeat", "other") else f"{e.kind}_{'hard' if e.hard else 'easy'}"
        count[key] += 1
        count["step_hard_wrong"] += e.kind == "step" and e.hard and e.wrong  # a direct hard result written wrong
    # a restatement that is not the problem word for word (a move dropped): later steps follow it
    goal = restatement_text(problem)
    count["restate_wrong"] = sum(k.kind == "restate" and e.text.strip() != goal for k, e in zip(kinds, seg.episodes))
    verdict = verifier.verify(text, problem.answer)
    return {
        "level": problem.level, "correct": verdict.correct, "answer": verdict.extracted, "tokens": n_tokens,
        "episodes": seg.num_episodes, "tagged": seg.status == "tagged", "finished": finished,
        "redundant": sum(e.redundant for e in kinds), **count, **_fault(problem, seg, verdict),
    }


def _fault(problem, seg, verdict) -> dict:
    """``fault`` (the kind of the decisive fault of the task's ``first_fault``, None when the walk
    is right throughout), ``fault_misled`` and ``fault_after`` (the kind of the episode before the
    faulty one), for tasks that replay responses; {} for others."""
    replay = getattr(task_of(problem), "first_fault", None)
    if replay is None:
        return {}
    if seg.status != "tagged":
        return {"fault": "malformed", "fault_misled": False, "fault_after": None}
    f = replay(problem, [e.text for e in seg.episodes], verdict.extracted)
    if f is None:
        return {"fault": None, "fault_misled": False, "fault_after": None}
    return {"fault": f.kind, "fault_misled": f.misled, "fault_after": f.after}


def summarize(records: Sequence[dict]) -> dict:
    """Means over response records; check rates are per step (checks of hard steps / hard steps)."""
    n = len(records)
    tot = lambda k: sum(r.get(k, 0) for r in records)  # noqa: E731
    episodes = tot("episodes")
    checks = tot("check_hard") + tot("check_easy")
    return {
        "n": n,
        "accuracy": tot("correct") / n,
        "mean_tokens": tot("tokens") / n,
        "mean_episodes": episodes / n,
        "tagged_share": tot("tagged") / n,
        "finished_share": tot("finished") / n,
        "redundant_share": tot("redundant") / max(1, episodes),
        "hard_check_rate": tot("check_hard") / max(1, tot("step_hard")),
        "easy_check_rate": tot("check_easy") / max(1, tot("step_easy")),
        "checks_on_hard_share": tot("check_hard") / max(1, checks),
        "hard_step_error": tot("step_hard_wrong") / max(1, tot("step_hard")),
        "mean_hard_steps": tot("step_hard") / n,
        "mean_easy_steps": tot("step_easy") / n,
        "restate_share": sum(r.get("restate", 0) > 0 for r in records) / n,
        "restate_wrong_share": sum(r.get("restate_wrong", 0) > 0 for r in records) / n,
        **_fault_counts(records),
    }


def _fault_counts(records: Sequence[dict]) -> dict:
    """Why the wrong responses are wrong: ``wrong`` (their number), ``faults`` (how many of them
    have each decisive fault kind of the task's ``first_fault``; ``none`` when the replay finds
    the walk right but the verifier does not) and ``faults_misled`` (how many followed a wrong
    ``then`` list or restatement) and ``faults_after`` (how many came right after each kind of
    episode: ``check``, ``repeat``, ``step``, ``restate``, ``none`` for the first episode or an
    untagged response). {} when the task does not replay responses."""
    wrong = [r for r in records if not r["correct"]]
    if not records or any("fault" not in r for r in records):
        return {}
    faults: dict[str, int] = defaultdict(int)
    after: dict[str, int] = defaultdict(int)
    for r in wrong:
        faults[r["fault"] or "none"] += 1
        after[r.get("fault_after") or "none"] += 1
    return {"wrong": len(wrong), "faults": dict(sorted(faults.items())),
            "faults_misled": sum(bool(r["fault_misled"]) for r in wrong), "faults_after": dict(sorted(after.items()))}


def evaluate(model, tokenizer, problems: Sequence, max_new_tokens: int = 320, batch_size: int = 64, *,
             samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Decode ``problems`` (of one task); overall and per-level (keys "1".."6") summaries.

    Greedy by default. With ``temperature`` > 0, ``samples`` responses per problem are drawn at that
    temperature and ``top_p`` (seeded by ``seed``), and every summary is over all of them: its
    ``accuracy`` is pass@1, the mean verified correctness over the samples (METHOD.md §7), and with
    ``samples`` >= 2 it also has ``maj_accuracy``, maj@``samples``: a problem counts as solved when
    the most frequent extracted answer among its samples is right (``l2t_core.eval.metrics.maj_at_k``:
    unanswered samples abstain, ties go to the earliest answer).

    Each summary has ``n`` (responses), ``accuracy``, ``mean_tokens``, ``mean_episodes``,
    ``tagged_share``, ``finished_share``, ``redundant_share`` (episodes that are restatements,
    repeats or easy-step checks), ``hard_check_rate`` and ``easy_check_rate`` (checks per hard /
    easy step), ``checks_on_hard_share``, ``hard_step_error`` (the share of hard steps whose
    written result is wrong, before any check repairs it: how good the policy's direct guesses
    are), ``mean_hard_steps``, ``mean_easy_steps``,
    ``restate_share`` (responses that restate the problem) and ``restate_wrong_share`` (responses
    whose restatement is not the problem word for word, e.g. a move dropped, which the steps after it
    then follow). The result also records ``decoding`` (what was asked, for reports and reuse checks).
    """
    if samples < 1:
        raise ValueError(f"evaluate: samples must be >= 1, got {samples}")
    if temperature == 0 and samples != 1:
        raise ValueError(f"evaluate: greedy decoding (temperature 0) gives one response per problem, "
                         f"got samples={samples}; give a temperature > 0 to sample {samples} per problem")
    t0 = time.perf_counter()
    _task_of_all(problems, "evaluate")
    verifier = NumericVerifier()
    comps = generate(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     n=samples, temperature=temperature, top_p=top_p, seed=seed)
    records = [[response_record(p, c.text, len(c.response_ids), c.finished, verifier) for c in group]
               for p, group in zip(problems, comps)]
    flat = [r for group in records for r in group]
    out = summarize(flat)
    by_level: dict[int, list] = defaultdict(list)
    for group in records:
        by_level[group[0]["level"]].append(group)
    out["per_level"] = {str(lv): summarize([r for g in by_level[lv] for r in g]) for lv in sorted(by_level)}
    if samples > 1:
        def maj(groups) -> float:
            return sum(maj_at_k([r["answer"] for r in g], [r["correct"] for r in g], samples, key=answer_key)
                       for g in groups) / len(groups)

        out["maj_accuracy"] = maj(records)
        for lv, groups in by_level.items():
            out["per_level"][str(lv)]["maj_accuracy"] = maj(groups)
    out["decoding"] = {"samples": samples, "temperature": temperature, "top_p": top_p if temperature > 0 else None,
                       "seed": seed if temperature > 0 else None}
    out["seconds"] = time.perf_counter() - t0
    return out


def necessary_tokens(tokenizer, problems: Sequence) -> dict:
    """Mean response tokens of the *necessary* reference trace of ``problems``, overall and per
    level (keys "1".."6"): every step once, a check after every hard step (the repair a fast guess
    needs), no check of an easy step, no repeat, no restatement. The token floor a method can
    reach without giving up the useful work; the miniature reports every method against it."""
    task = _task_of_all(problems, "necessary_tokens")
    style = task.TraceStyle(guess_error=0.0, hard_check=1.0, easy_check=0.0, repeat=0.0, restate=0.0)
    rng = random.Random(0)  # unused by this style: every choice has probability 0 or 1
    by_level = defaultdict(list)
    for p in problems:
        text = task.build_trace(p, rng, style).text
        by_level[p.level].append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    every = [n for ns in by_level.values() for n in ns]
    return {"mean_tokens": sum(every) / len(every),
            "per_level": {str(lv): sum(ns) / len(ns) for lv, ns in sorted(by_level.items())}}


# --------------------------------------------------------------------------------------------
# Fitting gain per kind of episode
# --------------------------------------------------------------------------------------------

GainKind = Literal["step_hard", "step_easy", "check_hard", "check_easy", "repeat", "restate", "other"]


def _force_ids(tokenizer) -> list[int]:
    return tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]


def _j_item(tokenizer, problem, prompt_ids: list[int], ids: list[int], text: str):
    """``(JItem, Segmentation)`` of one response to ``problem`` (J at every episode boundary of the
    true answer), or ``(None, seg)`` when the response does not segment as tagged."""
    seg = segment(text)
    if seg.status != "tagged" or not ids:
        return None, seg
    te = token_episode_ids(seg, response_offsets(tokenizer, text, ids))
    ans = tokenizer(render_answer(problem.answer), add_special_tokens=False)["input_ids"]
    return JItem(prompt_ids, ids, te.boundaries.tolist(), ans), seg


@torch.no_grad()
def answer_readout(model, tokenizer, problems: Sequence, *, style=None, seed: int = 0) -> dict:
    """How sharply the model's forced-answer readout J (METHOD.md §2) knows the true answer, on
    one complete, correct reference trace per problem (drawn with ``style``).

    Returns the mean J = p(a* | x, s_k, f) at the start of the trace (k = 0), at its middle
    episode boundary and at its end (k = K), over the tagged traces. A model that answers
    correctly when it generates but whose J_K stays far below 1 at the end of a correct trace
    gives L2T's fitting gain G_k = J_k − J_{k−1} (and the MRT progress reward) little to rank
    episodes by. Measured on the over-thinking walk warm starts (48 traces, levels 1-6): J_K 0.27
    with the old 320-token vocabulary, where the instruction is ~60 tokens (greedy accuracy 0.94);
    0.74 and 0.72 with the one-token instruction after 800 and 1600 SFT steps (accuracy 0.50 and
    0.99: the 800-step run did not learn levels 4-6).
    """
    task = _task_of_all(problems, "answer_readout")
    style = style if style is not None else task.TraceStyle()
    rng = random.Random(seed)
    items = []
    for p in problems:
        text = task.build_trace(p, rng, style).text
        prompt = tokenizer(task.build_task_prompt(p), add_special_tokens=False)["input_ids"]
        item, _ = _j_item(tokenizer, p, prompt, tokenizer(text, add_special_tokens=False)["input_ids"], text)
        if item is not None:
            items.append(item)
    if not items:
        raise ValueError(f"answer_readout: none of the {len(problems)} reference traces segments as tagged")
    starts, mids, ends = [], [], []
    for log_j in answer_logprobs_packed(model, items, _force_ids(tokenizer)):
        j = log_j.exp()
        starts.append(float(j[0]))
        mids.append(float(j[len(j) // 2]))
        ends.append(float(j[-1]))
    return {"traces": len(items), "j_start": sum(starts) / len(starts), "j_mid": sum(mids) / len(mids),
            "j_end": sum(ends) / len(ends)}


@torch.no_grad()
def check_gains(model, tokenizer, problems: Sequence, *, source: Literal["samples", "reference"] = "samples",
                n: int = 4, temperature: float = 1.0, max_new_tokens: int = 320, style=None,
                seed: int = 0) -> dict:
    """Mean fitting gain G_k = J(s_k ⊕ z_k) − J(s_k) (METHOD.md §2, answer_logprob J) per kind of
    episode, over responses to ``problems``.

    ``source="samples"``: ``n`` responses per problem sampled from the model at ``temperature``
    (what RL scores); ``"reference"``: ``n`` reference traces drawn with ``style``. Checks of hard
    steps are also split by whether the step they check was wrong (``check_hard_repair``) or
    right (``check_hard_confirm``). Only responses that segment as tagged are scored. ``style``
    (reference traces) defaults to the problems' task's ``TraceStyle()``.
    """
    task = _task_of_all(problems, "check_gains")
    style = style if style is not None else task.TraceStyle()
    prompts = [tokenizer(task.build_task_prompt(p), add_special_tokens=False)["input_ids"] for p in problems]
    rows: list[tuple[int, list[int], str]] = []  # (problem index, response ids, response text)
    if source == "samples":
        comps = generate(model, tokenizer, problems, max_new_tokens=max_new_tokens, n=n,
                         temperature=temperature, seed=seed)
        rows = [(i, c.response_ids, c.text) for i, g in enumerate(comps) for c in g]
    elif source == "reference":
        rng = random.Random(seed)
        for i, p in enumerate(problems):
            for _ in range(n):
                text = task.build_trace(p, rng, style).text
                rows.append((i, tokenizer(text, add_special_tokens=False)["input_ids"], text))
    else:
        raise ValueError(f"check_gains: source must be 'samples' or 'reference', got {source!r}")
    items, kinds = [], []
    for i, ids, text in rows:
        item, seg = _j_item(tokenizer, problems[i], prompts[i], ids, text)
        if item is None:
            continue
        items.append(item)
        kinds.append(task.classify_episodes([e.text for e in seg.episodes]))
    gains = defaultdict(list)
    for log_j, ks in zip(answer_logprobs_packed(model, items, _force_ids(tokenizer)), kinds):
        for g, e in zip(fitting_gains(log_j).tolist(), ks):
            gains[e.key].append(g)
            if e.detail_key != e.key:
                gains[e.detail_key].append(g)
    return {
        "source": source, "responses": len(rows), "scored": len(items),
        "mean_gain": {k: sum(v) / len(v) for k, v in sorted(gains.items())},
        "count": {k: len(v) for k, v in sorted(gains.items())},
    }


# --------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------


def warm_start(out_dir, cfg: WarmStartConfig | None = None, *, show_progress: bool = True) -> Path:
    """Build the corpus, tokenizer and tiny Qwen2, run SFT, save model, tokenizer and
    ``warmstart.json`` (config, losses, held-out greedy evaluation, wall time) in ``out_dir``."""
    cfg = cfg or WarmStartConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the report goes first and comes back last: a build cut short leaves weights without a report,
    # which nothing reuses (l2t miniature and the pipeline reuse a warm start by its report)
    (out / "warmstart.json").unlink(missing_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    style = cfg.trace_style()
    task = cfg.task_module()
    train = task.dataset(cfg.train_size, cfg.min_steps, cfg.max_steps, seed=cfg.seed, hard_prob=cfg.hard_prob)
    pairs = sft_pairs(train, style, cfg.forced_frac, cfg.seed)
    eval_pairs = []
    if cfg.eval_loss_size:
        dev = task.dataset(cfg.eval_loss_size, cfg.min_steps, cfg.max_steps, seed=cfg.seed + 1, split="heldout",
                      hard_prob=cfg.hard_prob)
        eval_pairs = sft_pairs(dev, style, cfg.forced_frac, cfg.seed + 1)
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(len(tok), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                             num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             intermediate_size=cfg.intermediate_size, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("warm start (%s task): %d SFT examples, tiny Qwen2 of %.2fM parameters", cfg.task, len(pairs),
             n_params / 1e6)
    res = sft(model, tok, pairs, steps=cfg.sft_steps, batch_size=cfg.batch_size, lr=cfg.lr,
              warmup_frac=cfg.warmup_frac, eval_pairs=eval_pairs, seed=cfg.seed, show_progress=show_progress)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ev = evaluate(model, tok, held_out(cfg.eval_levels, cfg.eval_per_level, task=cfg.task), cfg.eval_max_new_tokens)
    readout = answer_readout(model, tok, held_out(cfg.eval_levels, READOUT_PER_LEVEL, task=cfg.task), style=style)
    if readout["j_end"] < 0.5 * ev["accuracy"]:
        log.warning("the forced-answer readout is weak: J of the true answer after a complete correct trace is "
                    "%.2f on average, against a greedy accuracy of %.2f; L2T's fitting gain will have little "
                    "signal to rank episodes by (measured: a force-answer instruction of many tokens, as in the "
                    "old 320-token character vocabulary, left J at 0.27; one token gives 0.72)",
                    readout["j_end"], ev["accuracy"])
    report = {
        "config": json.loads(cfg.model_dump_json()),
        "parameters": n_params,
        "vocab_size": len(tok),
        "sft_examples": len(pairs),
        "final_loss": res.final_loss,
        "loss_curve": [sum(res.losses[i:i + 10]) / len(res.losses[i:i + 10]) for i in range(0, len(res.losses), 10)],
        "eval_loss": res.eval_losses[-1][1] if res.eval_losses else None,
        "sft_seconds": res.seconds,
        "threads": torch.get_num_threads(),
        "evaluation": ev,
        "accuracy": ev["accuracy"],
        "accuracy_per_level": {lv: s["accuracy"] for lv, s in ev["per_level"].items()},
        "mean_tokens": ev["mean_tokens"],
        "answer_readout": readout,
        "wall_seconds": time.perf_counter() - t0,
    }
    write_text_atomic(out / "warmstart.json", json.dumps(report, indent=1))
    log.info("warm start done in %.0fs (SFT %.0fs): loss %.3f, held-out greedy accuracy %.3f, %.1f tokens, "
             "J of the true answer after a reference trace %.2f", report["wall_seconds"], res.seconds,
             res.final_loss, ev["accuracy"], ev["mean_tokens"], readout["j_end"])
    return out


def measure(out_dir, cfg: WarmStartConfig | None = None, *, gain_problems: int = 60, n: int = 4, seed: int = 0) -> dict:
    """Warm-start into ``out_dir`` unless it already holds one, then measure the greedy
    evaluation and the mean G_k per kind of episode on sampled and reference responses; writes
    ``measure.json`` there and returns it."""
    cfg = cfg or WarmStartConfig()
    out = Path(out_dir)
    if not (out / "warmstart.json").exists():
        warm_start(out, cfg)
    model, tok = load_policy(out)
    levels = tuple(range(cfg.min_steps, cfg.max_steps + 1))
    probs = held_out(levels, max(1, gain_problems // len(levels)), seed=HELDOUT_SEED + 77, task=cfg.task)
    result = {
        "warmstart": json.loads((out / "warmstart.json").read_text()),
        "gains_samples": check_gains(model, tok, probs, source="samples", n=n, seed=seed),
        "gains_reference": check_gains(model, tok, probs, source="reference", n=n, style=cfg.trace_style(), seed=seed),
    }
    write_text_atomic(out / "measure.json", json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/warmstart", help="checkpoint directory (reused when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--task", choices=TASKS, default=None, help="synthetic task (default: walk)")
    ap.add_argument("--gain-problems", type=int, default=60)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    over = {"threads": args.threads, "sft_steps": args.sft_steps, "task": args.task}
    over = {k: v for k, v in over.items() if v is not None}
    cfg = WarmStartConfig(**over)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.out, cfg, gain_problems=args.gain_problems)
    ws = res["warmstart"]
    print(json.dumps({
        "sft_seconds": ws["sft_seconds"], "final_loss": ws["final_loss"], "eval_loss": ws["eval_loss"],
        "accuracy": ws["accuracy"], "accuracy_per_level": ws["accuracy_per_level"], "mean_tokens": ws["mean_tokens"],
        "redundant_share": ws["evaluation"]["redundant_share"],
        "hard_check_rate": ws["evaluation"]["hard_check_rate"], "easy_check_rate": ws["evaluation"]["easy_check_rate"],
        "gains_samples": res["gains_samples"]["mean_gain"], "gains_reference": res["gains_reference"]["mean_gain"],
    }, indent=1))
    return res


if __name__ == "__main__":
    main()
