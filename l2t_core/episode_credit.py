"""How each method's reward credits each kind of episode, on responses sampled from a model.

The synthetic tasks know what every generated episode does (:meth:`classify_episodes`: a hard or
easy step, a check that repairs a wrong step or confirms a right one, a repeat, a restatement).
That makes the mechanism of a reward visible before any training: a reward that teaches a model
to drop redundant episodes and keep useful ones must give a correct response *without* a
redundant episode a higher group advantage than a correct response *with* one, and must not do
the same to useful checks. :func:`credit_by_kind` samples ``group_size`` responses per problem,
scores the same responses under every method (one :func:`~l2t_core.rewards.l2t.compute_rewards`
call each) and reports, per method:

* ``per_kind``: per episode kind (:attr:`EpisodeInfo.detail_key`), the number of episodes and the
  mean fitting gain G_k, normalised penalty P̂_k, episode reward R_k (METHOD.md §2–§4; zero for
  the outcome-only methods, which have no episode rewards) and mean per-token advantage A_{i,t}
  over the episode's tokens;
* ``with_minus_without``: per kind (:attr:`EpisodeInfo.key`), the mean over cells (the responses
  of one group with one outcome, correct or wrong) of mean A_i(responses containing the kind) −
  mean A_i(responses without it): negative means the method's advantage prefers leaving that kind
  out, the outcome being equal. A reward that keeps useful work has it negative for the redundant
  kinds and not for ``check_hard``;
* ``advantage_length_corr``: the mean within-cell Pearson correlation between A_i and the
  response length (−1: a pure length ranking);

* ``step_advantage``: :func:`step_gain_calibration` of each episode's mean token advantage, what
  the method's update teaches at a hard step: within one group and one hard move, the mean token
  advantage of results written wrong minus that of results written right (and of the check after
  them). Negative: the update pushes the typical mistake down against the right result, and the
  policy learns to guess better; near zero or positive: wrong guesses are learned like right ones
  (GRPO's broadcast credit is negative here only as far as a wrong guess ends in a wrong answer);

* ``penalty_separation`` (methods that charge the compression penalty, else None):
  :func:`redundancy_separation` of the episodes' normalised penalties P̂_k, whether the penalty can
  tell a redundant episode from a useful one at all, and how much of it a few episodes carry; and
  ``gain_separation`` (the l2t family, else None), the same of the fitting gains G_k;

and, once for the samples, ``copy_separation``: the same of :func:`context_overlap`, the share of
an episode's token pairs already in its context (the copy share c_k that the option
``reward.copying.coef`` charges): how far a signal that needs neither a model nor labels tells the
redundant episodes apart on these samples;

and, for every method of the l2t family (the others have no fitting gain), ``step_gain``:
:func:`step_gain_calibration` of the samples under that method's J (its ``fitting.estimator``);
the report's top-level ``step_gain`` is the first such method's.

Only responses that segment as tagged (METHOD.md §1) have episode kinds; the share is reported.

:func:`step_gain_calibration` asks whether the fitting gain G_k (METHOD.md §2) itself tells a wrong
step from a right one: within one group and one hard move (the j-th hard step of each response),
the mean G_k of direct results written wrong minus that of results written right, and the same
for the check that follows them. The gains of a step and its check telescope (their sum is the
same), so the fitting gain can only credit the right episode if J is calibrated about the
policy's own intermediate results: a wrong step should lower J (negative difference) and its
repair raise it. A positive difference means J rises when the model writes its typical wrong
guess, and the process reward then pays for wrong guesses. :func:`credit_by_kind` reports it
(``step_gain``) on its samples; :func:`rollout_step_gains` on a training run's logged rollouts.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter, defaultdict
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from .config import RewardConfig
from .models import eval_mode
from .rewards.copying import context_overlap
from .rewards.l2t import L2T_FAMILY, METHODS, Rollout, compute_rewards, has_fitting_gain, has_penalty
from .tasks.common import EpisodeInfo
from .verify import NumericVerifier
from .warmstart import _task_of_all, generate

REPORTED_KINDS = ("check_easy", "check_hard", "repeat", "restate")


def _paired(cells: Mapping[object, tuple[list[float], list[float]]]) -> dict:
    """Mean over cells of mean(wrong) − mean(right), with its standard error and the number of
    cells that have both."""
    diffs = [np.mean(wrong) - np.mean(right) for wrong, right in cells.values() if wrong and right]
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) >= 2 else None
    return {"wrong_minus_right": _mean(diffs), "stderr": se, "cells": len(diffs)}


def step_gain_calibration(responses: Iterable[tuple[object, Sequence[EpisodeInfo], Sequence[float]]],
                          what: str = "gains") -> dict:
    """Whether the fitting gain tells a wrong hard step from a right one (module docstring).

    ``responses``: ``(group, episode kinds, G_k per episode)`` of each tagged response. Cells are
    (group, j) for the j-th hard direct step of the responses; ``step`` compares the G_k of the steps
    written wrong with those written right, ``check`` the G_k of the check right after them (only
    where there is one). Each is ``{"wrong_minus_right", "stderr", "cells"}``, None/0 without a
    cell that has both. Any per-episode value compares the same way (``what`` names it in errors):
    :func:`credit_by_kind` passes each episode's mean token advantage for ``step_advantage``. A NaN
    value (an episode without tokens) is left out."""
    steps: dict = defaultdict(lambda: ([], []))
    checks: dict = defaultdict(lambda: ([], []))

    def add(cell: list, value) -> None:
        if np.isfinite(value):
            cell.append(float(value))

    for group, kinds, values in responses:
        if len(kinds) != len(values):
            raise ValueError(f"step_gain_calibration: {len(kinds)} episode kinds but {len(values)} {what} "
                             f"in group {group!r}; pass one value per episode of the same segmentation")
        j = 0
        for i, info in enumerate(kinds):
            if info.kind != "step" or not info.hard:
                continue
            add(steps[(group, j)][0 if info.wrong else 1], values[i])
            if i + 1 < len(kinds) and kinds[i + 1].kind == "check":
                add(checks[(group, j)][0 if info.wrong else 1], values[i + 1])
            j += 1
    return {"step": _paired(steps), "check": _paired(checks)}


def rollout_step_gains(run: str | os.PathLike, first_step: int = 1, last_step: int | None = None,
                       task: str = "walk") -> dict:
    """What a training run's process reward paid each kind of episode, from the rollouts it logged
    (``metrics/rollouts`` and ``metrics/episode_rewards``, :mod:`l2t_core.metrics`) for steps
    ``first_step`` to ``last_step``:

    * ``step``/``check``: :func:`step_gain_calibration` of the logged fitting gains (a group is one
      prompt of one step): does G_k tell a hard step written wrong from one written right?
    * ``by_kind``: per episode kind (:attr:`EpisodeInfo.detail_key`), the episodes, the mean fitting
      gain G_k, normalised penalty P̂_k and process reward r_k (METHOD.md §2–§4) and r_k per token (Σ r ÷
      Σ tokens), and the median P̂_k: what the update is pushed toward on average (a few episodes
      can carry most of a penalty; the median shows the typical one).

    Needs a method with episode rewards (the l2t family); responses whose logged episodes do not
    match their segmentation are left out."""
    from .checkpoint import RunStorage
    from .episodes import segment
    from .metrics import read_table
    from .tasks import get_task
    from .trainer import CONFIG_FILE

    if first_step < 1 or (last_step is not None and last_step < first_step):
        raise ValueError(f"rollout_step_gains: steps {first_step}..{last_step} are no range of training steps; give "
                         "1 <= first <= last")
    from .config import SegmentationConfig

    storage = RunStorage(str(run))
    seg_cfg = SegmentationConfig()
    if storage.exists(CONFIG_FILE):  # GRPO and the other baselines log G_k = 0 for every episode
        saved = json.loads(storage.read_bytes(CONFIG_FILE))
        method = saved["method"]
        # the episodes are those the run's reward saw: its own segmentation (max_episodes, numbering)
        seg_cfg = SegmentationConfig(**(saved.get("reward") or {}).get("segmentation", {}))
        if not has_fitting_gain(method):
            raise ValueError(f"rollout_step_gains: {run} was trained with method {method!r}, which computes no "
                             f"fitting gain (it logs G_k = 0 for every episode); give a run of {', '.join(L2T_FAMILY)}")
    rollouts, episodes = read_table(storage, "rollouts"), read_table(storage, "episode_rewards")
    if rollouts.empty or episodes.empty:
        raise ValueError(f"rollout_step_gains: {run} has no logged rollouts with episode rewards: it is not a "
                         "run directory of `l2t train`, or its method is outside the l2t family (which logs G_k "
                         "per episode)")
    last = int(rollouts["step"].max()) if last_step is None else last_step
    keep = lambda df: df[(df["step"] >= first_step) & (df["step"] <= last)]  # noqa: E731
    logged = {k: g.sort_values("episode") for k, g in keep(episodes).groupby(["step", "rank", "rollout"])}
    classify = get_task(task).classify_episodes
    cells = []  # (group key, episode kinds, that response's logged episode rows)
    for r in keep(rollouts).itertuples():
        seg = segment(r.response, seg_cfg.max_episodes, seg_cfg.numbering)
        g = logged.get((r.step, r.rank, r.rollout))
        if g is not None and seg.status == "tagged" and len(seg.episodes) == len(g):
            cells.append(((r.step, r.group), classify([e.text for e in seg.episodes]), g))
    calibration = step_gain_calibration((key, kinds, g["fitting_gain"].tolist()) for key, kinds, g in cells)
    return {"run": str(run), "steps": [first_step, last], **calibration,
            "by_kind": kind_rewards((kinds, g) for _, kinds, g in cells)}


def kind_rewards(responses: Iterable[tuple[Sequence[EpisodeInfo], "object"]]) -> dict:
    """Per episode kind (:attr:`EpisodeInfo.detail_key`) of ``(kinds, episode rows)`` responses (rows
    with the logged columns ``fitting_gain``, ``penalty_hat``, ``process_reward``, ``num_tokens``):
    ``n``, the means ``gain``, ``penalty_hat`` and ``process`` (r_k), ``process_per_token`` (Σ r_k ÷
    Σ tokens) and ``penalty_hat_median``, sorted by kind."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for kinds, rows in responses:
        for info, row in zip(kinds, rows.itertuples()):
            a = acc[info.detail_key]
            for key, value in (("gain", row.fitting_gain), ("penalty_hat", row.penalty_hat),
                               ("process", row.process_reward), ("tokens", row.num_tokens)):
                a[key].append(float(value))
    return {kind: {"n": len(a["gain"]), "gain": _mean(a["gain"]), "penalty_hat": _mean(a["penalty_hat"]),
                   "process": _mean(a["process"]),
                   "process_per_token": float(np.sum(a["process"]) / np.sum(a["tokens"])) if np.sum(a["tokens"]) else None,
                   "penalty_hat_median": float(np.median(a["penalty_hat"]))}
            for kind, a in sorted(acc.items())}


def _walk_only(problems: Sequence, name: str, why: str) -> None:
    """Refuse ``problems`` of any task but the walk, for the probes that read the walk's own moves."""
    from .tasks import walk

    task = _task_of_all(problems, name)
    if task is not walk:
        raise ValueError(f"{name}: the walk task only ({why}); got problems of {task.__name__.rsplit('.', 1)[-1]}")


def guess_trust(model, tokenizer, problems: Sequence, *, seed: int = 0) -> dict:
    """Whom the forced-answer readout J believes right after an unchecked hard step of the walk: the
    written result, or the repair of the typical mistake it might be (why :func:`step_gain_calibration`
    can come out positive).

    For every hard move of every walk problem, the reference trace with a check after each hard
    move (no other optional episode) is cut right after that move's direct episode, once with the
    result written right and once written as the fast guess (one hop short; both traces are right
    up to there). J is read for three answers: the truth, the answer of *trusting* a wrong result
    (the walk then ends one hop short) and that of *repairing* a right one as if it were the
    mistake (one hop further). Returns, per written result (``right``, ``wrong``), the mean J of
    each answer (``truth``, ``trust``/``repair``) and ``repair_share``, the mean of
    J(repairing answer) / (J(trusting answer) + J(repairing answer)): how much of J's belief
    takes the written result for the mistake. ``gain_wrong_minus_right`` is the mean over moves of
    J(truth | wrong written) − J(truth | right written), the difference of the two steps' fitting
    gains G_k (their contexts before the step are the same), with its standard error.

    The forced-answer examples of the SFT corpus (a trace cut anywhere, answered with the TRUE
    answer) teach the readout to repair a written hard result as often as the corpus got it wrong,
    unless it can tell a right result from the typical mistake. A readout that cannot has the
    same ``repair_share`` for both, and with a share above 1/2 J is higher after the wrong result
    than after the right one: the fitting gain pays for the mistake. Measured on the walk warm
    starts (tiny model, 2,400 SFT steps; right / wrong): guess_error 0.25: 0.25 / 0.48 (gain
    difference −0.18); 0.4: 0.52 / 0.52 (+0.05); 0.6: 0.50 / 0.63 (+0.15).
    """
    from .rewards.fitting import JItem, answer_logprobs_packed
    from .tasks import walk
    from .tasks.common import render_answer
    from .warmstart import _force_ids, _j_item

    _walk_only(problems, "guess_trust", "its typical mistake is one hop short on a cycle")
    styles = {w: walk.TraceStyle(guess_error=float(w == "wrong"), hard_check=1.0, easy_check=0.0, repeat=0.0,
                                 restate=0.0) for w in ("right", "wrong")}
    rng = random.Random(seed)  # unused by these styles (every choice has probability 0 or 1)
    items, where = [], []  # where: (problem, written, answer label, the hard moves' cuts) per item
    for n, p in enumerate(problems):
        prompt = tokenizer(walk.build_task_prompt(p), add_special_tokens=False)["input_ids"]
        truth = int(p.answer)
        answers = {"right": {"truth": truth, "repair": walk.hop(truth, 1)},
                   "wrong": {"truth": truth, "trust": walk.hop(truth, 9)}}  # F is a 10-cycle: 9 hops = one back
        for written, style in styles.items():
            tr = walk.build_trace(p, rng, style)
            text = tr.text
            item, _ = _j_item(tokenizer, p, prompt, tokenizer(text, add_special_tokens=False)["input_ids"], text)
            if item is None:
                raise ValueError(f"guess_trust: the reference trace of problem {n} does not segment as tagged")
            cuts = [k + 1 for k, e in enumerate(tr.episodes) if e.kind == "step" and e.hard]
            for label, a in answers[written].items():
                ans = tokenizer(render_answer(str(a)), add_special_tokens=False)["input_ids"]
                items.append(JItem(item.prompt_ids, item.response_ids, item.boundaries, ans))
                where.append((n, written, label, cuts))
    if not any(w[3] for w in where):
        raise ValueError(f"guess_trust: none of the {len(problems)} problems has a hard move")
    j: dict = {}  # (problem, written, label) -> J at each hard move's cut
    for log_j, (n, written, label, cuts) in zip(answer_logprobs_packed(model, items, _force_ids(tokenizer)), where):
        probs = log_j.exp().tolist()
        j[(n, written, label)] = [probs[k] for k in cuts]
    # one row per hard move; columns: J(truth), J(repair) after a right result; J(truth), J(trust) after a wrong one
    a = np.array([row for n in range(len(problems)) for row in zip(
        j[(n, "right", "truth")], j[(n, "right", "repair")], j[(n, "wrong", "truth")], j[(n, "wrong", "trust")])])

    def share(repair, trust):  # of J's belief in the two readings, the repairing one's
        total = repair + trust
        return float(np.mean(np.where(total > 0, repair / np.where(total > 0, total, 1.0), 0.5)))

    diffs = a[:, 2] - a[:, 0]
    return {"problems": len(problems), "hard_moves": len(a),
            "right": {"truth": float(a[:, 0].mean()), "repair": float(a[:, 1].mean()),
                      "repair_share": share(a[:, 1], a[:, 0])},
            "wrong": {"truth": float(a[:, 2].mean()), "trust": float(a[:, 3].mean()),
                      "repair_share": share(a[:, 2], a[:, 3])},
            "gain_wrong_minus_right": float(diffs.mean()),
            "stderr": float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) >= 2 else None}


CheckPlace = Literal["middle", "last"]


def check_decisions(model, tokenizer, problems: Sequence, *, seed: int = 0, gradients: bool = False,
                    context: Literal["mixed", "necessary"] = "mixed") -> dict:
    """How the model decides to write a check right after a step of the walk, for easy and for hard
    steps: the two decisions a shortening policy must tell apart (drop the easy-step check, keep
    the hard-step one).

    The reference trace of every problem (every step right, no repeat or restatement; ``context``
    ``mixed``: each step followed by a check with probability 1/2, drawn with ``seed``; ``necessary``:
    every hard step checked, no easy one) is cut right after each step, where the model decides.
    After a step with moves after it (``middle``) the next episode's opening tag always follows and
    its first token decides: p is the probability of the check's first token after the tag. After the
    last step (``last``) the tag itself decides, against ``</think>``: p is the probability of the
    next episode's opening tag (a check, or a repeat) right after the step's closing tag and newline.
    Returns per place and step kind (``middle``/``last`` × ``easy``/``hard``) the number of decision
    points, the mean log-odds log p − log(1 − p) and the mean p; per place, ``gap``, the hard mean
    log-odds minus the easy one. With ``gradients``, also per place ``gradient_cosine``, the cosine of
    the mean gradients (over all parameters) of the easy and of the hard log-odds, and
    ``hard_per_easy``, (ḡ_hard · ḡ_easy) / ‖ḡ_easy‖²: to first order, how far a small step that lowers
    the easy points' mean log-odds by one lowers the hard points' (1: the two decisions move as one;
    0: independently).

    The probe needs a tokenizer with the episode tags as their own tokens (the warm start's character
    tokenizer): every cut must tokenize as a prefix of the whole trace.

    Measured on the rebuilt concise walk warm start (120 held-out problems of levels 3–6, ``mixed``):
    middle gap 3.31 (gradient cosine 0.59, hard_per_easy 0.50), last gap 1.84 (0.90, 0.89); after 80
    RL steps of any reward (the paper's L2T, the copy share, an oracle) the middle gap is 4.4–4.9 and
    the last one still 1.74–1.91 (lab notebook).
    """
    import torch

    from .tasks import walk

    _walk_only(problems, "check_decisions", "its checks follow easy or hard moves")
    if context not in ("mixed", "necessary"):
        raise ValueError(f"check_decisions: context must be 'mixed' or 'necessary', got {context!r}")
    style = walk.TraceStyle(guess_error=0.0, hard_check=0.5 if context == "mixed" else 1.0,
                            easy_check=0.5 if context == "mixed" else 0.0, repeat=0.0, restate=0.0)
    rng = random.Random(seed)

    def ids_of(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    points: dict[tuple[CheckPlace, str], list[tuple[list[int], int]]] = defaultdict(list)  # (context, token)
    for n, p in enumerate(problems):
        prompt = ids_of(walk.build_task_prompt(p))
        tr = walk.build_trace(p, rng, style)
        text = tr.text
        full = ids_of(text)
        for j, e in enumerate(tr.episodes):
            if e.kind != "step":
                continue
            last = e.step == len(p.moves) - 1
            close = f"</episode_{j + 1}>\n"
            tag = f"<episode_{j + 2}>"
            at = text.index(close) + len(close) + (0 if last else len(tag))
            pre = ids_of(text[:at])
            # the decisive token: the check's first one after the tag, or (last step) the tag itself
            ahead = ids_of(text[:at] + (tag if last else walk.check_text(0, walk.Move(">"))))
            if full[:len(pre)] != pre or ahead[:len(pre)] != pre:
                raise ValueError(f"check_decisions: problem {n}: the trace cut after its step {e.step + 1} does not "
                                 "tokenize as a prefix of the trace; this probe needs a tokenizer with the episode "
                                 "tags as their own tokens (the warm start's character tokenizer)")
            points[("last" if last else "middle", "hard" if e.hard else "easy")].append((prompt + pre, ahead[len(pre)]))
    places = [pl for pl in ("middle", "last") if points[(pl, "easy")] and points[(pl, "hard")]]
    if not places:
        raise ValueError(f"check_decisions: none of the {len(problems)} problems' traces has both an easy and a hard "
                         "step at the same place (give problems of several moves)")
    device = next(model.parameters()).device

    def log_odds(ids: list[int], token: int) -> torch.Tensor:
        logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)[token]
        return lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-7))

    def mean_gradient(pts) -> torch.Tensor:
        params = [q for q in model.parameters() if q.requires_grad]
        acc = [torch.zeros_like(q, dtype=torch.float64) for q in params]
        for ids, token in pts:
            for a, g in zip(acc, torch.autograd.grad(log_odds(ids, token), params, allow_unused=True)):
                if g is not None:
                    a += g.double()
        return torch.cat([a.flatten() for a in acc]) / len(pts)

    out: dict = {"problems": len(problems), "context": context}
    with eval_mode(model):
        for pl in places:
            res: dict = {}
            for kind in ("easy", "hard"):
                with torch.no_grad():
                    lo = np.array([float(log_odds(ids, token)) for ids, token in points[(pl, kind)]])
                res[kind] = {"points": len(lo), "log_odds": float(lo.mean()), "check_prob": float((1 / (1 + np.exp(-lo))).mean())}
            res["gap"] = res["hard"]["log_odds"] - res["easy"]["log_odds"]
            if gradients:
                ge, gh = mean_gradient(points[(pl, "easy")]), mean_gradient(points[(pl, "hard")])
                res["gradient_cosine"] = float(ge @ gh / (ge.norm() * gh.norm()))
                res["hard_per_easy"] = float(gh @ ge / (ge @ ge))
            out[pl] = res
    return out


def redundancy_separation(episodes: Iterable[tuple[EpisodeInfo, float, int]], top: float = 0.05) -> dict:
    """Whether a per-episode value tells redundant episodes from useful ones (METHOD.md §3, §10):
    the compression penalty P̂_k (which should be higher on redundant episodes) or the fitting gain
    G_k (which should be lower on them).

    ``episodes``: ``(kind, value, tokens)`` of every episode of the tagged responses. Redundant are
    restatements, repeats and checks of easy steps (:attr:`EpisodeInfo.redundant`); the rest,
    direct steps and checks of hard steps (``other`` is left out). Reported, each None without both
    sides:

    * ``auc``: the probability that a random redundant episode has the larger value than a random
      other one (ties count half; Mann–Whitney U ÷ n₁n₂). 0.5: the value cannot tell them apart. For
      a penalty to teach a model to drop redundant episodes while keeping the rest it must be well
      above 0.5; for a gain, well below;
    * ``per_token_auc``: the same for value ÷ tokens (a cost per token said, not per episode);
    * ``length_auc``: the same for the episode's token count alone, the baseline a penalty should
      beat (a length penalty sees only this);
    * ``top_share``: of a non-negative value (a penalty), the share of the total carried by the
      ``top`` (5 %) largest episodes; near 1 means a few outliers carry it and the typical episode
      pays next to nothing (None when some value is negative or all are zero);
    * ``median``: the median value of the redundant and of the other episodes;
    * ``auc_by_kind``: ``auc`` of each redundant kind alone (``restate``, ``repeat``,
      ``check_easy``) against the other episodes, so one conspicuous kind cannot hide the rest.
    """
    from scipy.stats import mannwhitneyu

    # per side: the value, the value per token, the token count
    red: dict[str, list[float]] = {"v": [], "t": [], "n": []}
    rest: dict[str, list[float]] = {"v": [], "t": [], "n": []}
    by_kind: dict[str, list[float]] = defaultdict(list)
    for info, value, n in episodes:
        if info.kind == "other" or n <= 0 or not np.isfinite(value):
            continue
        side = red if info.redundant else rest
        side["v"].append(float(value))
        side["n"].append(float(n))
        side["t"].append(float(value) / n)
        if info.redundant:
            by_kind[info.key].append(float(value))

    def auc(x: list[float], y: list[float]) -> float | None:
        return float(mannwhitneyu(x, y, alternative="two-sided").statistic) / (len(x) * len(y)) if x and y else None

    every = np.array(red["v"] + rest["v"])
    out: dict = {"redundant": len(red["v"]), "other": len(rest["v"]), "top_share": None,
                 "median": {"redundant": None, "other": None},
                 "auc": auc(red["v"], rest["v"]), "per_token_auc": auc(red["t"], rest["t"]),
                 "length_auc": auc(red["n"], rest["n"]),
                 "auc_by_kind": {k: auc(by_kind.get(k, []), rest["v"]) for k in ("restate", "repeat", "check_easy")}}
    if every.size and every.min() >= 0 and every.sum() > 0:
        m = max(1, int(np.ceil(top * every.size)))
        out["top_share"] = float(np.sort(every)[::-1][:m].sum() / every.sum())
    for name, side in (("redundant", red), ("other", rest)):
        if side["v"]:
            out["median"][name] = float(np.median(side["v"]))
    return out


def method_configs(methods: Sequence[str] | Mapping[str, tuple[str, RewardConfig]]) -> dict[str, tuple[str, RewardConfig]]:
    """``{name: (method, RewardConfig)}`` from method names (paper defaults) or such a mapping."""
    if isinstance(methods, Mapping):
        out = dict(methods)
    else:
        out = {m: (m, RewardConfig()) for m in methods}
    if not out:
        raise ValueError("credit_by_kind: no methods to compare")
    for name, (method, cfg) in out.items():
        if method not in METHODS:
            raise ValueError(f"credit_by_kind: {name!r} uses unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(cfg, RewardConfig):
            raise TypeError(f"credit_by_kind: {name!r} needs a RewardConfig, got {type(cfg).__name__}")
    return out


def gain_source(configs: Mapping[str, tuple[str, RewardConfig]]) -> str | None:
    """The first of :func:`method_configs`' entries whose method computes the fitting gain (the l2t
    family; the others report G_k = 0), whose gains give ``step_gain``; None when there is none."""
    return next((name for name, (method, _) in configs.items() if has_fitting_gain(method)), None)


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def kind_effects(cells: Mapping[object, Sequence[tuple[float, Counter, int]]]) -> dict:
    """``with_minus_without`` and ``advantage_length_corr`` from the tagged responses of each cell
    (a group and an outcome): ``(advantage, Counter of EpisodeInfo.key, response tokens)`` each."""
    effects = {}
    for kind in REPORTED_KINDS:
        diffs = []
        for rows in cells.values():
            with_k = [a for a, kinds, _ in rows if kinds[kind] > 0]
            without = [a for a, kinds, _ in rows if kinds[kind] == 0]
            if with_k and without:
                diffs.append(np.mean(with_k) - np.mean(without))
        effects[kind] = {"delta": _mean(diffs), "cells": len(diffs)}
    corrs = []
    for rows in cells.values():
        adv = np.array([a for a, _, _ in rows], dtype=float)
        length = np.array([n for _, _, n in rows], dtype=float)
        if len(rows) >= 2 and adv.std() > 0 and length.std() > 0:
            corrs.append(float(np.corrcoef(adv, length)[0, 1]))
    return {"with_minus_without": effects, "advantage_length_corr": {"mean": _mean(corrs), "cells": len(corrs)}}


def credit_by_kind(model, tokenizer, problems: Sequence, methods: Sequence[str] | Mapping[str, tuple[str, RewardConfig]]
                   = ("grpo", "length_penalty", "l2t"), *, group_size: int = 8, temperature: float = 0.7,
                   max_new_tokens: int = 320, seed: int = 0) -> dict:
    """Per-kind credit of every method on the same ``group_size`` sampled responses per problem
    (see the module docstring for the fields)."""
    if group_size < 2:
        raise ValueError(f"credit_by_kind: group_size must be >= 2 (advantages are relative to the group), got {group_size}")
    if not problems:
        raise ValueError("credit_by_kind: no problems")
    configs = method_configs(methods)
    task = _task_of_all(problems, "credit_by_kind")
    comps = generate(model, tokenizer, problems, max_new_tokens=max_new_tokens, n=group_size,
                     temperature=temperature, seed=seed)
    rollouts = []
    for gid, (p, group) in enumerate(zip(problems, comps)):
        prompt = tokenizer(task.build_task_prompt(p), add_special_tokens=False)["input_ids"]
        rollouts += [Rollout(prompt, list(c.response_ids), c.text, p.answer, gid) for c in group]
    verifier = NumericVerifier()
    report: dict = {"problems": len(problems), "responses": len(rollouts), "group_size": group_size,
                    "temperature": temperature, "methods": {}}
    source = gain_source(configs)
    copied: list = []  # (kind, context_overlap, tokens) of every tagged episode, for copy_separation
    for name, (method, cfg) in configs.items():
        t0 = time.perf_counter()
        batch = compute_rewards(model, tokenizer, rollouts, method, cfg, verifier=verifier)
        reward_seconds = time.perf_counter() - t0
        fields: dict = defaultdict(lambda: defaultdict(list))
        cells: dict = defaultdict(list)
        gains: list = []
        advantages: list = []
        penalised: list = []  # (kind, P̂_k, tokens) of every tagged episode, for penalty_separation
        gained: list = []  # (kind, G_k, tokens), for gain_separation
        for r, x in zip(rollouts, batch.responses):
            if x.segmentation.status != "tagged":
                continue
            kinds = task.classify_episodes([e.text for e in x.segmentation.episodes])
            if has_fitting_gain(method) and len(x.gains) == len(kinds):
                gains.append((r.group_id, kinds, x.gains.tolist()))
            token_adv = x.token_advantage.detach().cpu().numpy()
            per_episode = [float("nan")] * len(kinds)
            for k, info in enumerate(kinds):
                on_k = x.tokens.episode_ids == k
                if not on_k.any():
                    continue
                per_episode[k] = float(token_adv[on_k].mean())
                f = fields[info.detail_key]
                f["token_advantage"].append(per_episode[k])
                for key, values in (("gain", x.gains), ("penalty_hat", x.penalties_hat), ("episode_reward", x.episode_reward)):
                    f[key].append(float(values[k]) if k < len(values) else 0.0)
                n_tokens = int(on_k.sum())
                if not report["methods"]:  # the same for every method: once
                    first = int(np.flatnonzero(on_k)[0])
                    copied.append((info, context_overlap(list(r.prompt_ids) + list(r.response_ids[:first]),
                                                         np.asarray(r.response_ids)[on_k].tolist()), n_tokens))
                if k < len(x.penalties_hat):
                    penalised.append((info, float(x.penalties_hat[k]), n_tokens))
                if k < len(x.gains):
                    gained.append((info, float(x.gains[k]), n_tokens))
            advantages.append((r.group_id, kinds, per_episode))
            cells[(r.group_id, x.outcome)].append((x.advantage, Counter(i.key for i in kinds), len(r.response_ids)))
        report["methods"][name] = {
            "method": method,
            "reward_seconds": reward_seconds,
            "per_kind": {kind: {"n": len(f["token_advantage"]), **{key: _mean(v) for key, v in f.items()},
                                "penalty_hat_median": float(np.median(f["penalty_hat"]))}
                         for kind, f in sorted(fields.items())},
            "penalty_separation": redundancy_separation(penalised) if has_penalty(method, cfg) else None,
            "gain_separation": redundancy_separation(gained) if has_fitting_gain(method) else None,
            **kind_effects(cells),
            "step_advantage": step_gain_calibration(advantages, what="token advantages"),
        }
        if has_fitting_gain(method):  # per method: J's estimator may differ (fitting.estimator)
            report["methods"][name]["step_gain"] = step_gain_calibration(gains)  # no cells when nothing is tagged
        if name == source:
            report["step_gain"] = report["methods"][name]["step_gain"]
    report["copy_separation"] = redundancy_separation(copied)
    # of the last method's batch, as scored (the outcome does not depend on the method)
    report["tagged_share"] = float(np.mean([x.segmentation.status == "tagged" for x in batch.responses]))
    report["accuracy"] = float(np.mean([x.outcome for x in batch.responses]))
    return report


def credit_table(report: dict) -> str:
    """Markdown: per method, ``with_minus_without`` per kind, the advantage/length correlation,
    ``step_advantage`` (hard step written wrong − right, mean token advantage) and the penalty's
    ``penalty_separation`` AUC (– for a method without the penalty; n/a in reports made before it)."""
    head = ("| method | " + " | ".join(f"{k} (cells)" for k in REPORTED_KINDS)
            + " | corr(A, length) | hard step A, wrong − right (cells) | penalty AUC, redundant > useful |")
    lines = [head, "|---" * (len(REPORTED_KINDS) + 4) + "|"]
    for name, m in report["methods"].items():
        cells = []
        for k in REPORTED_KINDS:
            e = m["with_minus_without"][k]
            cells.append("n/a" if e["delta"] is None else f"{e['delta']:+.3f} ({e['cells']})")
        c = m["advantage_length_corr"]["mean"]
        st = (m.get("step_advantage") or {}).get("step") or {"wrong_minus_right": None}
        guess = "n/a" if st["wrong_minus_right"] is None else (
            f"{st['wrong_minus_right']:+.3f}" + ("" if st["stderr"] is None else f" ± {st['stderr']:.3f}")
            + f" ({st['cells']})")
        if "penalty_separation" not in m:
            auc = "n/a"
        elif m["penalty_separation"] is None:
            auc = "–"
        else:
            auc = _auc(m["penalty_separation"]["auc"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'n/a' if c is None else f'{c:+.2f}'} | {guess} | {auc} |")
    cs = report.get("copy_separation")
    if cs and cs["auc"] is not None:
        lines += ["", f"For reference, the share of an episode's token pairs already in its context (no model, no "
                      f"labels; `context_overlap`) tells a redundant episode from a useful one with AUC {cs['auc']:.2f} "
                      f"(restatements {_auc(cs['auc_by_kind']['restate'])}, repeats {_auc(cs['auc_by_kind']['repeat'])}, "
                      f"easy-step checks {_auc(cs['auc_by_kind']['check_easy'])}; the episode's length alone "
                      f"{_auc(cs['length_auc'])})."]
    g = report.get("step_gain")
    if g and g["step"]["cells"]:
        lines += ["", step_gain_sentence(g)]
    if report.get("guess_trust"):
        lines += ["", guess_trust_sentence(report["guess_trust"])]
    return "\n".join(lines)


def _auc(a: float | None) -> str:
    return "n/a" if a is None else f"{a:.2f}"


def guess_trust_sentence(trust: dict) -> str:
    """:func:`guess_trust` in words, for reports."""
    se = "" if trust["stderr"] is None else f" ± {trust['stderr']:.3f}"
    return (f"Right after an unchecked hard step (reference traces, {trust['hard_moves']} moves), J takes the "
            f"written result for the typical mistake and repairs it with share {trust['right']['repair_share']:.2f} "
            f"when it is right and {trust['wrong']['repair_share']:.2f} when it is wrong; J(truth) is "
            f"{trust['right']['truth']:.2f} after a right result and {trust['wrong']['truth']:.2f} after a wrong one "
            f"(gain difference wrong − right {trust['gain_wrong_minus_right']:+.3f}{se}). Where J is higher after the "
            "wrong result, the fitting gain pays for the mistake and charges its repair.")


def step_gain_sentence(calibration: dict) -> str:
    """:func:`step_gain_calibration` in words, for reports."""
    def fmt(d):
        se = "" if d["stderr"] is None else f" ± {d['stderr']:.3f}"
        return f"{d['wrong_minus_right']:+.3f}{se} ({d['cells']} cells)"

    st, ck = calibration["step"], calibration["check"]
    if not st["cells"]:
        return ("No group has a hard step written wrong and one written right at the same move: nothing to "
                "compare (untagged responses, or guesses all right or all wrong).")
    text = (f"Fitting gain of a hard step written wrong minus one written right (same group, same move): "
            f"{fmt(st)}")
    if ck["cells"]:
        text += f"; of the check after it: {fmt(ck)}"
    d, se = st["wrong_minus_right"], st["stderr"]
    if se is None or abs(d) <= 2 * se:
        verdict = "The difference is within twice its standard error: no evidence either way"
    elif d > 0:
        verdict = ("J rises when the model writes a wrong step: the fitting gain pays for wrong guesses and "
                   "charges their repairs")
    else:
        verdict = "J falls at a wrong step and rises at its repair, as the fitting gain needs"
    return text + f". {verdict}."
