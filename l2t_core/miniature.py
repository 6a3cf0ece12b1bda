"""`l2t miniature`: the paper's headline experiment (Fig. 2) in miniature, on a CPU.

From ONE SFT warm start on the synthetic task, every method (grpo, length_penalty, l2t, and any
ablation or variant) is trained with the same budget and seeds, then evaluated greedily on the
held-out split per difficulty level. Writes into ``--out``:

* ``miniature.json``: per method, ``accuracy`` and ``mean_tokens`` (mean and std over seeds),
  both per difficulty level, per-seed values, the headline ratios against GRPO, and ``behaviour``,
  the episode census of the greedy responses (redundant share, checks per hard and easy step,
  restatements kept and wrong; :func:`~l2t_core.warmstart.evaluate`);
* ``hardest_level``: accuracy on the hardest level per seed, and every method's difference from the
  length penalty and GRPO with Welch's 95 % interval over seeds (issue 3's second target);
* ``methods[name]["faults"]``: per level, why the wrong greedy answers are wrong, summed over seeds
  (each response's decisive fault, :func:`~l2t_core.tasks.walk.first_fault`; :func:`fault_totals`),
  tabulated for the hardest level;
* ``miniature.md``: the same as a table;
* ``accuracy.png``, ``tokens.png``: accuracy and mean response tokens per method and level;
* with ``eval_samples`` > 0, ``sampled``: the same report for an evaluation by sampling (pass@1 and
  maj@n at ``eval_temperature`` / ``eval_top_p``, METHOD.md §7; ``eval_sampled.json`` per run,
  ``base_eval_sampled.json``, ``sampled_accuracy.png``, ``sampled_tokens.png``);
* ``training.png`` and ``methods[name]["training"]``: rollout tokens and accuracy per training step,
  reward ÷ rollout time and the score–length correlation among correct responses
  (:mod:`~l2t_core.dynamics`).

Beside the methods the report carries the task's *necessary* trace length (``floor``: every step
once, every hard step checked, nothing redundant; :func:`~l2t_core.warmstart.necessary_tokens`),
the token floor a method can reach without losing the useful work, and every method's tokens
against it; and the credit-by-episode-kind probe of the SFT base (``credit``,
:mod:`~l2t_core.episode_credit`): which kinds of episode each method's advantage favours before
any training.

Runs go through the same :class:`~l2t_core.trainer.Trainer` as any other training job, in
``workers`` parallel processes (one torch thread each). Finished runs are kept, so re-running the
command after an interruption only does what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from .config import METHOD_NAMES, RewardConfig, TrainConfig, _Strict, config_differences
from .dynamics import SCALARS, aggregate_dynamics, dynamics_table, plot_dynamics, run_dynamics
from .plotting import series_colours
from .stats import mean_std, welch_difference
from .warmstart import WarmStartConfig

log = logging.getLogger("l2t.miniature")

DEFAULT_METHODS = ("grpo", "length_penalty", "l2t")


class Variant(_Strict):
    """An extra named run: a method plus dotted TrainConfig overrides (e.g. an improved L2T)."""

    method: str
    overrides: dict[str, Any] = Field(default_factory=dict)


class MiniatureConfig(_Strict):
    methods: tuple[str, ...] = DEFAULT_METHODS
    variants: dict[str, Variant] = Field(default_factory=dict, description="Extra named runs beside the methods.")
    seeds: tuple[int, ...] = (0, 1, 2)
    warmstart: WarmStartConfig = WarmStartConfig()
    # budget measured in docs/miniature/default: 843 s wall from nothing (warm start 230 s), 2 idle cores
    steps: int = Field(20, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2)
    lr: float = Field(3e-5, gt=0)
    kl_coef: float = Field(0.001, ge=0)
    temperature: float = Field(0.7, gt=0, description="Rollout temperature (at 1.0 the tiny SFT model's "
                                                       "samples are often malformed; measured worse).")
    max_new_tokens: int = Field(320, ge=1, description="Level-6 walk traces need about 250 tokens.")
    train_overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted TrainConfig overrides for every run.")
    eval_per_level: int = Field(60, ge=1, description="Held-out problems per difficulty level.")
    eval_levels: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    eval_samples: int = Field(0, ge=0, description="Responses sampled per held-out problem, beside the greedy "
                              "evaluation, for pass@1 and maj@n at eval_temperature and eval_top_p "
                              "(METHOD.md §7); 0: greedy only.")
    eval_temperature: float = Field(0.6, gt=0, description="Sampling temperature of the sampled evaluation (METHOD.md §7).")
    eval_top_p: float = Field(0.95, gt=0, le=1, description="Nucleus of the sampled evaluation (METHOD.md §7).")
    workers: int = Field(2, ge=1, description="Parallel training processes (one torch thread each).")
    checkpoint_every: int = Field(10, ge=1, description="Steps between a run's checkpoints (only the latest is "
                                  "kept): rerun an interrupted experiment with the same config and --out and "
                                  "every unfinished run resumes from its latest checkpoint, ending as an "
                                  "uninterrupted run would.")
    credit_problems: int = Field(24, ge=0, description="Problems (levels 4-6, group_size samples each) of the "
                                 "SFT base's credit-by-episode-kind probe (l2t_core.episode_credit); 0 skips it.")

    def model_post_init(self, __context) -> None:
        for m in self.methods:
            if m not in METHOD_NAMES:
                raise ValueError(f"unknown method {m!r} in methods; choose from {', '.join(METHOD_NAMES)}")
        for name, v in self.variants.items():
            if v.method not in METHOD_NAMES:
                raise ValueError(f"variant {name!r}: unknown method {v.method!r}")
            if name in self.methods:
                raise ValueError(f"variant name {name!r} clashes with a method name")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed")

    def sampled_decoding(self) -> dict | None:
        """How the sampled evaluation decodes (the keyword arguments of ``warmstart.evaluate``), or
        None when ``eval_samples`` is 0."""
        if not self.eval_samples:
            return None
        return {"samples": self.eval_samples, "temperature": self.eval_temperature, "top_p": self.eval_top_p,
                "seed": self.warmstart.seed}


def _set_nested(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def run_configs(out: Path, cfg: MiniatureConfig, policy: str) -> list[tuple[str, int, TrainConfig]]:
    """Every (name, seed, TrainConfig) of the experiment, all with the same budget."""
    runs = []
    named = [(m, m, {}) for m in cfg.methods] + [(n, v.method, v.overrides) for n, v in cfg.variants.items()]
    for name, method, overrides in named:
        for seed in cfg.seeds:
            data: dict[str, Any] = {
                "method": method, "policy": policy, "out": str(out / "runs" / f"{name}-s{seed}"),
                "steps": cfg.steps, "prompts_per_step": cfg.prompts_per_step, "seed": seed,
                "checkpoint_every": min(cfg.checkpoint_every, cfg.steps), "keep_checkpoints": 1, "device": "cpu",
                "data": {"source": cfg.warmstart.task, "train_size": 4000, "min_steps": cfg.warmstart.min_steps,
                         "max_steps": cfg.warmstart.max_steps, "seed": cfg.warmstart.seed},
                "optim": {"lr": cfg.lr, "weight_decay": 0.0, "warmup_frac": 0.1},
                "rollout": {"group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
                            "temperature": cfg.temperature,
                            "max_prompt_tokens": 512},
                "reward": {"loss": {"kl_coef": cfg.kl_coef}},
                "micro_batch_tokens": 16384,
            }
            for k, v in {**cfg.train_overrides, **overrides}.items():
                _set_nested(data, k, v)
            runs.append((name, seed, TrainConfig.model_validate(data)))
    return runs


def submission_order(runs: list[tuple[str, int, TrainConfig]]) -> list[tuple[str, int, TrainConfig]]:
    """The runs in the order they go to the worker pool: the slowest first (longest-processing-time
    first, so that a long run does not start last and leave the other workers idle), otherwise as
    listed. A run's cost is set by how it estimates J: sampling the policy's own continuations
    (``fitting.estimator: continuation``) costs several times a GRPO run on this CPU (3,000–4,600 s
    against 1,000–1,200 s at m = 2; lab notebook), sampled forced answers (``monte_carlo``, MRT)
    less, the teacher-forced J and the baselines about the same; more samples m cost more."""
    from .rewards.l2t import L2T_FAMILY

    def rank(run: tuple[str, int, TrainConfig]) -> tuple[int, int]:
        tcfg = run[2]
        f = tcfg.reward.fitting
        if tcfg.method in L2T_FAMILY and f.estimator == "continuation":
            return (0, -f.mc_samples)
        if tcfg.method == "mrt" or (tcfg.method in L2T_FAMILY and f.estimator == "monte_carlo"):
            return (1, -f.mc_samples)
        return (2, 0)
    return sorted(runs, key=rank)  # stable: ties keep the listed order


# settings that change how fast a result is made, where it lives or how often it is saved, not the
# result (a resumed run ends as an uninterrupted one: tests/test_trainer.py)
NOT_COMPARED = ("threads", "workers", "out", "checkpoint_every")


class ReuseError(ValueError):
    """A saved warm start, evaluation or run of the output directory was made with another
    configuration than the one asked for now."""


def _require_same(saved: dict, wanted, what: str, kind: str) -> None:
    """Refuse to reuse ``what`` when it was made with another configuration than ``wanted``
    (a pydantic config, or a plain dict of settings)."""
    if isinstance(wanted, dict):
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    else:
        diff = config_differences(saved, wanted, ignore=NOT_COMPARED)
    if diff:
        raise ReuseError(f"{what} was made with a different {kind} (fields: {', '.join(diff)}); "
                         "use a new --out, or delete it to redo it with the current configuration")


def _eval_settings(levels, per_level: int, max_new_tokens: int, task: str) -> dict:
    """What a held-out evaluation depends on besides the checkpoint (and, when sampled, its decoding):
    saved beside every evaluation and compared before one is reused."""
    return {"levels": list(levels), "per_level": per_level, "max_new_tokens": max_new_tokens, "task": task}


def _write_json(path: Path, obj: dict) -> dict:
    """Write ``obj`` to ``path`` whole or not at all (temp file, then rename); return it as read back
    (integer keys such as the levels become strings)."""
    obj = json.loads(json.dumps(obj))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return obj


def _relocated(saved: dict, tcfg: TrainConfig) -> dict:
    """``saved`` (a run's saved TrainConfig) with its ``policy`` read as ``tcfg``'s when both lie at
    the same place relative to their run directory: the experiment's own warm start, with the
    experiment directory moved or named by another path (relative, absolute) since the run was made."""
    pol, out = saved.get("policy"), saved.get("out")
    if not (isinstance(pol, str) and isinstance(out, str)) or any("://" in u for u in (pol, out, tcfg.policy, tcfg.out)):
        return saved
    if os.path.relpath(pol, out) == os.path.relpath(tcfg.policy, tcfg.out):
        return {**saved, "policy": tcfg.policy}
    return saved


def _tell(progress, name: str, seed: int, **event) -> None:
    """Send a run's progress (``step``: the last finished step; ``phase``: what it does now) to the
    parent's progress display, when there is one."""
    if progress is not None:
        progress.put({"run": f"{name} s{seed}", **event})


def _exit_with_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """Pool initializer: the worker stops within ``every_s`` seconds once the experiment's process
    is gone. A ``ProcessPoolExecutor``'s workers do not hear a SIGTERM or SIGKILL sent to their
    parent (a scheduler stopping the job, ``kill``): without this they trained on unattended,
    writing into the run directories a rerun of the experiment resumes from. Checkpoints are
    written atomically, so a run stopped this way resumes from its latest complete one."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_pool(workers: int, ctx, watch_every_s: float = 1.0) -> ProcessPoolExecutor:
    """The experiment's training processes; each stops when this process is gone (:func:`_exit_with_parent`)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                               initargs=(os.getpid(), watch_every_s))


def _train_and_eval(name: str, seed: int, tcfg_json: str, eval_json: str, levels, per_level, max_new_tokens,
                    task: str = "walk", sampled: dict | None = None, progress=None) -> dict:
    """One run in a worker process: train (or resume), then evaluate the final checkpoint greedily
    on the held-out split of the synthetic ``task`` (``eval.json``) and, when ``sampled`` gives
    ``warmstart.evaluate``'s sampling arguments, by sampling as well (``eval_sampled.json``,
    returned under the key ``"sampled"``). ``progress`` (a queue, or None) receives each finished
    step and the phase the run is in (:func:`_tell`)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # a worker process: the experiment's display shows its progress
    from .checkpoint import RunStorage
    from .models import load_policy
    from .trainer import Trainer

    tcfg = TrainConfig.model_validate_json(tcfg_json)
    done = Path(eval_json)
    model = tok = None
    kept: dict = {}
    if done.exists():  # a finished run is reused only if it was trained as asked now
        saved_cfg = done.parent / "train_config.json"
        if saved_cfg.exists():
            saved = _relocated(json.loads(saved_cfg.read_text()), tcfg)
            _require_same(saved, tcfg, f"run {done.parent}", "training configuration")
        _tell(progress, name, seed, step=tcfg.steps, phase="trained earlier")
    else:
        _tell(progress, name, seed, phase="training")
        result = Trainer(tcfg, show_progress=False).run(
            on_step=lambda row: _tell(progress, name, seed, step=int(row["step"])))
        model, tok = load_policy(result.checkpoint)
        # the run's own step times: a run resumed after an interruption counts its earlier sessions too
        kept = dict(name=name, seed=seed, train_seconds=float(result.steps["step_time_s"].sum()),
                    final_train_accuracy=float(result.steps["accuracy"].iloc[-5:].mean()),
                    final_train_tokens=float(result.steps["mean_tokens"].iloc[-5:].mean()))

    def policy():  # the model just trained, or a reused run's final checkpoint (loaded once)
        nonlocal model, tok
        if model is None:
            latest = RunStorage(tcfg.out).latest_checkpoint()
            if latest is None:
                raise FileNotFoundError(f"run {tcfg.out} has an evaluation but no complete checkpoint to evaluate; "
                                        "delete the run directory to train it again")
            model, tok = load_policy(latest[1])
        return model, tok

    _tell(progress, name, seed, phase="evaluating")
    ev = kept_evaluation(done, policy, levels, per_level, max_new_tokens, task, extra=kept, carry=RUN_FIELDS,
                         what="evaluation")
    if sampled:
        extra = {"name": name, "seed": seed, "train_seconds": ev.get("train_seconds")}
        ev = {**ev, "sampled": kept_evaluation(done.parent / "eval_sampled.json", policy, levels, per_level,
                                               max_new_tokens, task, sampled=sampled, extra=extra)}
    return ev


# what a run's evaluation records of its training, kept when the evaluation is made again
RUN_FIELDS = ("name", "seed", "train_seconds", "final_train_accuracy", "final_train_tokens")


def kept_evaluation(path: Path, policy, levels, per_level, max_new_tokens, task: str, *, sampled: dict | None = None,
                    extra: dict | None = None, carry: Sequence[str] = (), what: str | None = None) -> dict:
    """``warmstart.evaluate`` of ``policy()`` (a ``(model, tokenizer)``, loaded only when needed) on
    the held-out split, greedy or with the sampling arguments ``sampled``, kept in ``path`` with its
    settings (:func:`_eval_settings`) and ``extra``.

    A saved evaluation is reused when made with the same settings and a complete census; one that
    predates a census field (:func:`lacks_census`) is made again from the same checkpoint, keeping
    its ``carry`` fields. With other settings, a sampled evaluation is sampled again (it is an
    addition to the experiment), while a greedy one (``what`` names it in the error) is refused:
    it is the experiment's record, and other settings make another experiment."""
    from .warmstart import evaluate, held_out

    settings = {**_eval_settings(levels, per_level, max_new_tokens, task), **(sampled or {})}
    extra = dict(extra or {})
    if path.exists():
        saved = json.loads(path.read_text())
        recorded = saved.get("eval_settings")
        if sampled:
            other = recorded != settings
        else:  # greedy evaluations made before the settings were recorded are taken as they are
            if recorded is not None:
                _require_same(recorded, settings, f"{what or 'evaluation'} {path}", "evaluation settings")
            other = False
        if not other and not lacks_census(saved):
            return saved
        log.info("%s %s; evaluating the checkpoint again", path,
                 "was made with other settings" if other else "predates the current episode census")
        extra = {**{k: saved[k] for k in carry if k in saved}, **extra}
    model, tok = policy()
    ev = evaluate(model, tok, held_out(levels, per_level, task=task), max_new_tokens=max_new_tokens, **(sampled or {}))
    return _write_json(path, {**ev, **extra, "eval_settings": settings})


# warmstart.evaluate's census of the greedy responses' episodes, reported per method
BEHAVIOUR = ("mean_episodes", "redundant_share", "hard_check_rate", "easy_check_rate", "hard_step_error",
             "restate_share", "restate_wrong_share")


def lacks_census(ev: dict) -> bool:
    """Whether a saved evaluation predates a field of the census (:data:`BEHAVIOUR`): it is then made
    again from the same checkpoint, since its numbers are only comparable with a complete one."""
    return any(k not in ev for k in BEHAVIOUR)


def is_greedy(decoding: dict | None) -> bool:
    """Whether an evaluation decoded greedily (``warmstart.evaluate``'s ``decoding``; reports made
    before it was recorded were greedy)."""
    return not decoding or decoding.get("temperature", 0) == 0


def decoding_label(decoding: dict | None) -> str:
    """How an evaluation decoded (``warmstart.evaluate``'s ``decoding``), in words for reports."""
    if is_greedy(decoding):
        return "greedy"
    return (f"sampled (pass@1 over {decoding['samples']} per problem, temperature {decoding['temperature']:g}, "
            f"top-p {decoding['top_p']:g})")


def aggregate(evals: dict[str, list[dict]], base: dict, floor: dict | None = None) -> dict:
    """Mean and std over seeds per method, overall and per level, plus the headline ratios (and
    every method's tokens over the necessary trace's, ``floor``, when given). Greedy and sampled
    evaluations aggregate alike; ``decoding`` says which (the base's), and maj@n
    (``maj_accuracy``) is kept where every run has it."""
    out: dict[str, Any] = {"decoding": base.get("decoding"), "base": base, "methods": {}}
    if floor is not None:
        out["floor"] = floor
    for name, runs in evals.items():
        levels = sorted({lv for r in runs for lv in r["per_level"]}, key=int)
        out["methods"][name] = {
            "accuracy": mean_std([r["accuracy"] for r in runs]),
            "mean_tokens": mean_std([r["mean_tokens"] for r in runs]),
            "per_level": {
                lv: {
                    "accuracy": mean_std([r["per_level"][lv]["accuracy"] for r in runs]),
                    "mean_tokens": mean_std([r["per_level"][lv]["mean_tokens"] for r in runs]),
                } for lv in levels
            },
            "seeds": [{**{k: r[k] for k in ("seed", "accuracy", "mean_tokens", "train_seconds") if k in r},
                       "per_level_accuracy": {lv: r["per_level"][lv]["accuracy"] for lv in r["per_level"]}}
                      for r in runs],
        }
        if all("maj_accuracy" in r for r in runs):
            m = out["methods"][name]
            m["maj_accuracy"] = mean_std([r["maj_accuracy"] for r in runs])
            for lv in levels:
                m["per_level"][lv]["maj_accuracy"] = mean_std([r["per_level"][lv]["maj_accuracy"] for r in runs])
        kept = [k for k in BEHAVIOUR if all(k in r for r in runs)]
        if kept:  # what the greedy responses keep and drop (warmstart.evaluate's episode census)
            out["methods"][name]["behaviour"] = {k: mean_std([r[k] for r in runs]) for k in kept}
        faults = fault_totals(runs)
        if faults:
            out["methods"][name]["faults"] = faults
    ms = out["methods"]
    if "grpo" in ms:
        g = ms["grpo"]
        out["vs_grpo"] = {
            name: {
                "token_ratio": m["mean_tokens"]["mean"] / max(g["mean_tokens"]["mean"], 1e-9),
                "accuracy_delta": m["accuracy"]["mean"] - g["accuracy"]["mean"],
                # the same difference with Welch's 95 % interval over seeds (target 1: "equal or better")
                "accuracy_welch": None if name == "grpo" else welch_difference(
                    [r["accuracy"] for r in m["seeds"]], [r["accuracy"] for r in g["seeds"]]),
            } for name, m in ms.items()
        }
    if floor is not None:
        out["vs_floor"] = {"SFT base": base["mean_tokens"] / floor["mean_tokens"],
                           **{name: m["mean_tokens"]["mean"] / floor["mean_tokens"] for name, m in ms.items()}}
        if "grpo" in ms:  # the lowest tokens ÷ GRPO a method can reach while doing all the useful work
            out["floor_over_grpo"] = floor["mean_tokens"] / max(ms["grpo"]["mean_tokens"]["mean"], 1e-9)
    hardest = hardest_level(out)
    if hardest is not None:
        out["hardest_level"] = hardest
    return out


def fault_totals(runs: list[dict]) -> dict:
    """Why the wrong greedy answers are wrong, per level, summed over seeds (``warmstart.evaluate``'s
    replay of each response, :func:`~l2t_core.tasks.walk.first_fault`): ``n`` responses, ``wrong``,
    ``faults`` (wrong responses per decisive fault kind), ``misled`` (those that followed a wrong
    ``then`` list or restatement) and ``after`` (those whose faulty episode came right after a
    check, a repeat, ...). {} when the task does not replay responses."""
    out: dict[str, dict] = {}
    levels = sorted({lv for r in runs for lv in r["per_level"]}, key=int)
    for lv in levels:
        parts = [r["per_level"][lv] for r in runs if lv in r["per_level"]]
        if not parts or any("faults" not in p for p in parts):
            continue
        kinds: dict[str, int] = {}
        after: dict[str, int] = {}
        for p in parts:
            for k, c in p["faults"].items():
                kinds[k] = kinds.get(k, 0) + c
            for k, c in p.get("faults_after", {}).items():
                after[k] = after.get(k, 0) + c
        out[lv] = {"n": sum(p["n"] for p in parts), "wrong": sum(p["wrong"] for p in parts),
                   "faults": dict(sorted(kinds.items())), "misled": sum(p.get("faults_misled", 0) for p in parts),
                   "after": dict(sorted(after.items()))}
    return out


def fault_table(report: dict) -> str | None:
    """The hardest level's wrong answers by decisive fault, per method (counts over seeds), or None."""
    ms = report["methods"]
    levels = [set(m.get("faults", {})) for m in ms.values()]
    shared = set.intersection(*levels) if levels else set()
    if not shared:
        return None
    lv = max(shared, key=int)
    base = fault_totals([report["base"]]).get(lv)  # the base's evaluation, in the methods' shape
    rows_of = {"SFT base": base} if base else {}
    rows_of.update({name: m["faults"][lv] for name, m in ms.items()})
    kinds = sorted({k for v in rows_of.values() for k in v["faults"]})
    word = "greedy" if is_greedy(report.get("decoding")) else "sampled"
    head = [f"Why level {lv}'s wrong {word} answers are wrong (counts summed over seeds; the decisive fault of "
            "each response, `l2t_core.tasks.walk.first_fault`; *misled*: it followed a wrong `then` list or "
            "restatement; *after check / repeat*: the faulty episode came right after a check / a repeat):", "",
            "| method | wrong / n | " + " | ".join(kinds) + " | misled | after check | after repeat |",
            "|---|---|" + "---|" * (len(kinds) + 3)]
    rows = []
    for name, v in rows_of.items():
        rows.append(f"| {name} | {v['wrong']} / {v['n']} | " + " | ".join(str(v["faults"].get(k, 0)) for k in kinds)
                    + f" | {v['misled']} | {v['after'].get('check', 0)} | {v['after'].get('repeat', 0)} |")
    return "\n".join(head + rows)


def hardest_level(report: dict, references: tuple[str, ...] = ("length_penalty", "grpo")) -> dict | None:
    """Issue 3's second target as numbers: accuracy on the hardest level every method was evaluated
    on, per seed, and each method's difference of means from each reference method present (and
    from the SFT base's single value) with Welch's 95 % interval over seeds
    (:func:`~l2t_core.stats.welch_difference`). None when no level is shared by every method."""
    ms = report["methods"]
    shared = set.intersection(*(set(m["per_level"]) for m in ms.values())) if ms else set()
    if not shared:
        return None
    level = max(shared, key=int)
    values = {name: [s["per_level_accuracy"][level] for s in m["seeds"]] for name, m in ms.items()}
    base = report["base"]["per_level"].get(level, {}).get("accuracy")
    methods = {}
    for name, v in values.items():
        st = mean_std(v)
        methods[name] = {"values": v, **st, "vs_base": None if base is None else st["mean"] - base}
    out: dict[str, Any] = {
        "level": level, "decoding": report.get("decoding"), "base": base, "methods": methods,
        "vs": {ref: {name: welch_difference(v, values[ref]) for name, v in values.items() if name != ref}
               for ref in references if ref in values},
    }
    return out


def add_dynamics(report: dict, runs: list[tuple[str, int, TrainConfig]]) -> None:
    """Each method's training dynamics (:mod:`~l2t_core.dynamics`) from its runs' metrics: per seed
    (scalars only) and aggregated over seeds (with the seed-mean curve) as ``methods[name]["training"]``."""
    per: dict[str, list[dict]] = {}
    for name, seed, tcfg in runs:
        if name in report["methods"]:
            per.setdefault(name, []).append(run_dynamics(tcfg.out))
    for name, ds in per.items():
        m = report["methods"][name]
        m["training"] = aggregate_dynamics(ds)
        for s, d in zip(m["seeds"], ds):
            s["training"] = {k: d[k] for k in SCALARS}


def markdown_table(report: dict) -> str:
    """The report as markdown: accuracy and tokens per method and level, then the ratios, the
    episode census, the hardest level, its faults, the training dynamics and the credit probe (each
    where the report has it), then the same for the sampled evaluation (``report["sampled"]``)."""
    ms = report["methods"]
    levels = sorted({lv for m in ms.values() for lv in m["per_level"]}, key=int)
    label = decoding_label(report.get("decoding"))
    word = "greedy" if is_greedy(report.get("decoding")) else "sampled"
    maj = bool(ms) and all("maj_accuracy" in m for m in ms.values()) and "maj_accuracy" in report["base"]
    n = (report.get("decoding") or {}).get("samples")
    head = "| method | accuracy | " + (f"maj@{n} | " if maj else "") + "mean tokens | " + \
        " | ".join(f"acc L{lv}" for lv in levels) + " | " + " | ".join(f"tok L{lv}" for lv in levels) + " |"
    sep = "|" + "---|" * (3 + maj + 2 * len(levels))
    rows = [f"Held-out accuracy, {label}:", "", head, sep]
    b = report["base"]
    rows.append("| SFT base | " + f"{b['accuracy']:.3f} | " + (f"{b['maj_accuracy']:.3f} | " if maj else "")
                + f"{b['mean_tokens']:.1f} | "
                + " | ".join(f"{b['per_level'][lv]['accuracy']:.2f}" for lv in levels) + " | "
                + " | ".join(f"{b['per_level'][lv]['mean_tokens']:.1f}" for lv in levels) + " |")
    if "floor" in report:
        f = report["floor"]
        rows.append("| necessary trace (floor) | – | " + ("– | " if maj else "") + f"{f['mean_tokens']:.1f} | " + " | ".join("–" for _ in levels)
                    + " | " + " | ".join(f"{f['per_level'][lv]:.1f}" if lv in f["per_level"] else "–" for lv in levels)
                    + " |")
    for name, m in ms.items():
        pl = m["per_level"]
        rows.append(
            f"| {name} | {m['accuracy']['mean']:.3f} ± {m['accuracy']['std']:.3f} | "
            + (f"{m['maj_accuracy']['mean']:.3f} | " if maj else "")
            + f"{m['mean_tokens']['mean']:.1f} ± {m['mean_tokens']['std']:.1f} | "
            + " | ".join(f"{pl[lv]['accuracy']['mean']:.2f}" if lv in pl else "–" for lv in levels) + " | "
            + " | ".join(f"{pl[lv]['mean_tokens']['mean']:.1f}" if lv in pl else "–" for lv in levels) + " |"
        )
    if "vs_grpo" in report:
        rows.append("")
        vf = report.get("vs_floor", {})
        rows.append("| method | tokens ÷ GRPO | accuracy − GRPO | … Welch 95 % over seeds | tokens ÷ necessary |")
        rows.append("|---|---|---|---|---|")
        for name, v in report["vs_grpo"].items():
            w = v.get("accuracy_welch")
            rows.append(f"| {name} | {v['token_ratio']:.2f} | {v['accuracy_delta']:+.3f} | "
                        f"{_interval(w) if w else '–'} | {f'{vf[name]:.2f}' if name in vf else '–'} |")
        if "floor_over_grpo" in report:
            rows.append("")
            rows.append(f"The necessary trace is {report['floor_over_grpo']:.2f}× GRPO's tokens: the lowest token ratio "
                        "a method can reach without dropping useful checks (SFT base: "
                        f"{vf['SFT base']:.2f}× the necessary trace).")
    if any("behaviour" in m for m in ms.values()):
        rows += ["", f"Episodes of the {word} held-out responses (mean over seeds): episodes per response, share "
                 "of redundant episodes (restatements, repeats, easy-step checks), checks per hard and per easy "
                 "step, the share of hard steps written wrong (before any check: how good the direct guesses "
                 "are), responses that restate the problem, and those whose restatement is wrong:", "",
                 "| method | " + " | ".join(BEHAVIOUR) + " |", "|---|" + "---|" * len(BEHAVIOUR)]
        if any(k in b for k in BEHAVIOUR):
            rows.append("| SFT base | " + " | ".join(f"{b[k]:.2f}" if k in b else "–" for k in BEHAVIOUR) + " |")
        for name, m in ms.items():
            if "behaviour" in m:
                rows.append(f"| {name} | " + " | ".join(
                    f"{m['behaviour'][k]['mean']:.2f}" if k in m["behaviour"] else "–" for k in BEHAVIOUR) + " |")
    if "hardest_level" in report:
        rows += ["", hardest_level_table(report["hardest_level"])]
    faults = fault_table(report)
    if faults:
        rows += ["", faults]
    training = {k: m["training"] for k, m in ms.items() if "training" in m}
    if training:
        rows += ["", "Training dynamics (sampled rollouts at the training temperature; first and last "
                 f"{next(iter(training.values()))['window']} steps, "
                 "mean over seeds; Spearman within each group's correct responses):", "", dynamics_table(training)]
    if report.get("credit"):
        from .episode_credit import credit_table

        c = report["credit"]
        rows += ["", f"Credit by episode kind on the SFT base ({c['responses']} responses at temperature "
                 f"{c['temperature']}, {c['tagged_share']:.0%} tagged): mean group advantage of responses with the kind "
                 "minus those without it, within a group and an outcome (negative: the method favours leaving it "
                 "out; cells: the (group, outcome) cells that have both); and the mean token advantage of a hard "
                 "step written wrong minus one written right, within a group and a hard move (negative: the "
                 "update teaches better guesses); for the methods that charge the compression penalty, the "
                 "AUC of a redundant episode paying more penalty than a useful one (0.5: blind to "
                 "redundancy).", "",
                 credit_table(c)]
    if report.get("sampled"):
        rows += ["", "## Sampled evaluation (METHOD.md §7)", "", markdown_table(report["sampled"]).rstrip("\n")]
    return "\n".join(rows) + "\n"


def _interval(d: dict) -> str:
    """A :func:`~l2t_core.stats.welch_difference` interval as ``[low, high] p=…``."""
    return "(no interval)" if d["low"] is None else f"[{d['low']:+.3f}, {d['high']:+.3f}] p={d['p']:.2f}"


def hardest_level_table(h: dict) -> str:
    """The hardest level's accuracy per seed and each method against the references (Welch 95 %)."""
    refs = list(h["vs"])

    def cell(d: dict | None) -> str:
        return "–" if d is None else f"{d['delta']:+.3f} {_interval(d)}"

    word = "greedy" if is_greedy(h.get("decoding")) else "sampled pass@1"
    rows = [f"Hardest level (L{h['level']}): {word} accuracy per seed, mean ± std, and the difference of means "
            "from " + " and ".join(refs) + " with Welch's 95 % interval over seeds"
            + (f" (SFT base: {h['base']:.2f})" if h["base"] is not None else "") + ":", "",
            "| method | per seed | mean ± std | − SFT base | " + " | ".join(f"− {r}" for r in refs) + " |",
            "|---|---|---|---|" + "---|" * len(refs)]
    for name, m in h["methods"].items():
        vs_base = "–" if m["vs_base"] is None else f"{m['vs_base']:+.3f}"
        rows.append(f"| {name} | {', '.join(f'{v:.2f}' for v in m['values'])} | {m['mean']:.3f} ± {m['std']:.3f} | "
                    f"{vs_base} | " + " | ".join(cell(h["vs"][r].get(name)) for r in refs) + " |")
    return "\n".join(rows)


def plot(report: dict, out: Path, prefix: str = "") -> list[Path]:
    """Grouped bars per difficulty level: accuracy and mean tokens, mean ± std over seeds
    (``{prefix}accuracy.png``, ``{prefix}tokens.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = report["methods"]
    levels = sorted({lv for m in ms.values() for lv in m["per_level"]}, key=int)
    colours = series_colours(list(ms))
    paths = []
    greedy = is_greedy(report.get("decoding"))
    for key, fname, ylabel in (("accuracy", f"{prefix}accuracy.png", "greedy accuracy" if greedy else "sampled pass@1"),
                               ("mean_tokens", f"{prefix}tokens.png",
                                "mean response tokens" if greedy else "mean sampled response tokens")):
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(levels), 3.6))
        width = 0.8 / (len(ms) + 1)
        base = report["base"]
        ax.bar([i - 0.4 + width / 2 for i in range(len(levels))],
               [base["per_level"][lv][key] for lv in levels], width, label="SFT base", color="lightgray")
        for j, (name, m) in enumerate(ms.items(), start=1):
            xs = [i - 0.4 + width / 2 + j * width for i in range(len(levels))]
            ax.bar(xs, [m["per_level"][lv][key]["mean"] for lv in levels], width,
                   yerr=[m["per_level"][lv][key]["std"] for lv in levels], capsize=2, label=name,
                   color=colours[name])
        floor = report.get("floor", {}).get("per_level", {})
        if key == "mean_tokens" and floor:  # the necessary trace: what a method can reach without losing useful work
            xs = [i for i, lv in enumerate(levels) if lv in floor]
            ax.hlines([floor[levels[i]] for i in xs], [i - 0.42 for i in xs], [i + 0.42 for i in xs], colors="black",
                      linestyles="dashed", linewidth=1, label="necessary trace (floor)")
        ax.set_xticks(range(len(levels)), [f"level {lv}" for lv in levels])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per difficulty level (mean ± std over seeds)")
        ax.legend(fontsize=8, ncols=2)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def tradeoff_points(report: dict) -> dict:
    """Where each method (and the SFT base) sits on the accuracy–token plane, overall and on the
    hardest level: ``{name: {"tokens", "accuracy", "tokens_std", "accuracy_std", "seeds": [(tokens,
    accuracy), ...], "hardest": {...the same means and stds on the hardest level}}}``, and ``floor``:
    the necessary trace's tokens (overall, hardest level) when the report has it."""
    ms = report["methods"]
    levels = sorted({lv for m in ms.values() for lv in m["per_level"]} | set(report["base"]["per_level"]), key=int)
    top = levels[-1]
    base = report["base"]

    def point(tokens, accuracy) -> dict:  # a method's mean_std dicts, or the base's plain numbers
        tok, acc = (v if isinstance(v, dict) else {"mean": v, "std": 0.0} for v in (tokens, accuracy))
        return {"tokens": tok["mean"], "accuracy": acc["mean"], "tokens_std": tok["std"], "accuracy_std": acc["std"]}

    points: dict = {"SFT base": {**point(base["mean_tokens"], base["accuracy"]), "seeds": [],
                                 "hardest": point(base["per_level"][top]["mean_tokens"], base["per_level"][top]["accuracy"])}}
    for name, m in ms.items():
        lv = m["per_level"].get(top)
        points[name] = {**point(m["mean_tokens"], m["accuracy"]),
                        "seeds": [(r["mean_tokens"], r["accuracy"]) for r in m["seeds"]],
                        "hardest": None if lv is None else point(lv["mean_tokens"], lv["accuracy"])}
    floor = report.get("floor")
    return {"level": top, "points": points,
            "floor": None if not floor else {"tokens": floor["mean_tokens"], "hardest": floor["per_level"].get(top)}}


def plot_tradeoff(report: dict, out: Path, prefix: str = "") -> Path:
    """``{prefix}tradeoff.png``: accuracy against mean tokens per method (mean ± std over seeds, the
    seeds as dots), overall and on the hardest level, with the SFT base and the necessary trace's
    tokens (dashed): up and to the left is better, and a method left of another at the same height
    says the same with fewer tokens (issue 3's first target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = tradeoff_points(report)
    colours = series_colours(list(report["methods"]))
    greedy = is_greedy(report.get("decoding"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, hardest in zip(axes, (False, True)):
        for name, pt in t["points"].items():
            p = pt["hardest"] if hardest else pt
            if p is None:
                continue
            colour = "gray" if name == "SFT base" else colours[name]
            ax.errorbar(p["tokens"], p["accuracy"], xerr=p["tokens_std"], yerr=p["accuracy_std"], fmt="s" if
                        name == "SFT base" else "o", color=colour, capsize=3, label=name)
            if not hardest:
                for x, y in pt["seeds"]:
                    ax.plot(x, y, ".", color=colour, alpha=0.5)
            ax.annotate(name, (p["tokens"], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        f = t["floor"] and (t["floor"]["hardest"] if hardest else t["floor"]["tokens"])
        if f:
            ax.axvline(f, color="black", linestyle="dashed", linewidth=1, label="necessary trace")
        ax.set_xlabel("mean response tokens" if greedy else "mean sampled response tokens")
        ax.set_ylabel("greedy accuracy" if greedy else "sampled pass@1")
        ax.set_title(f"level {t['level']} (hardest)" if hardest else "all levels")
    axes[0].legend(fontsize=7)
    fig.suptitle("accuracy against tokens (mean ± std over seeds; up and left is better)")
    fig.tight_layout()
    path = out / f"{prefix}tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _probe_view(reward: RewardConfig) -> dict:
    """What of a reward configuration the credit probe uses (not the loss: no update is made)."""
    return reward.model_dump(mode="json", exclude={"loss"})


def probe_configs(cfg: MiniatureConfig, policy: str | os.PathLike) -> dict[str, tuple[str, RewardConfig]]:
    """``{name: (method, RewardConfig)}`` of every method and variant, as its runs train
    (``train_overrides`` and the variant's overrides applied): what the credit probe scores. Where
    the runs would be written does not enter a reward configuration, so none is asked for."""
    first = cfg.seeds[0]
    return {name: (t.method, t.reward) for name, seed, t in run_configs(Path("."), cfg, str(policy)) if seed == first}


def base_credit(out: Path, cfg: MiniatureConfig, sft_dir: Path) -> dict | None:
    """The SFT base's credit-by-episode-kind probe (``credit.json``, reused when its settings match)
    of every method and variant, with :func:`~l2t_core.episode_credit.guess_trust` on the same
    problems (walk task, a method with a fitting gain). A saved probe that lacks ``step_gain``,
    ``step_advantage`` or ``penalty_separation`` is made again; one that lacks only ``guess_trust``
    gets it added."""
    if not cfg.credit_problems:
        return None
    from .episode_credit import credit_by_kind, guess_trust
    from .models import load_policy
    from .rewards.l2t import has_fitting_gain

    path = out / "credit.json"
    configs = probe_configs(cfg, sft_dir)
    settings = {"problems": cfg.credit_problems, "group_size": cfg.group_size, "temperature": cfg.temperature,
                "max_new_tokens": cfg.max_new_tokens, "methods": list(cfg.methods), "task": cfg.warmstart.task}
    default = _probe_view(RewardConfig())
    views = {name: (method, _probe_view(reward)) for name, (method, reward) in configs.items()}
    own = {name: [method, view] for name, (method, view) in views.items() if method != name or view != default}
    if own:  # variants, or rewards set by train_overrides (absent otherwise: older probes stay reusable)
        settings["configs"] = own
    has_gains = any(has_fitting_gain(m) for m, _ in configs.values())
    task = cfg.warmstart.task_module()
    top = max(cfg.warmstart.min_steps, cfg.warmstart.max_steps - 2)
    problems = task.dataset(cfg.credit_problems, top, cfg.warmstart.max_steps, seed=cfg.warmstart.seed + 7)
    wants_trust = (has_gains and cfg.warmstart.task == "walk"
                   and any(m.hard for p in problems for m in p.moves))  # guess_trust reads after hard moves
    report = None
    if path.exists():
        saved = json.loads(path.read_text())
        made_before = ("step_gain" not in saved and has_gains) or any(  # made before these fields
            "step_advantage" not in m or "penalty_separation" not in m for m in saved.get("methods", {}).values())
        if saved.get("settings") == settings and not made_before:
            if "guess_trust" in saved or not wants_trust:
                return saved
            report = saved
    model, tok = load_policy(sft_dir)
    if report is None:
        log.info("credit probe: %d problems x %d samples under %s", len(problems), cfg.group_size,
                 ", ".join(configs))
        report = credit_by_kind(model, tok, problems, configs, group_size=cfg.group_size,
                                temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.warmstart.seed)
        report["settings"] = settings
    if wants_trust:
        log.info("credit probe: whom J believes after an unchecked hard step (%d problems)", len(problems))
        report["guess_trust"] = guess_trust(model, tok, problems, seed=cfg.warmstart.seed)
    return _write_json(path, report)


def _show_progress(progress, bar, per_run: dict) -> None:
    """Move each run's bar to the events its worker sent (:func:`_tell`) since the last call."""
    while progress is not None:
        try:
            ev = progress.get_nowait()
        except queue.Empty:
            return
        update = {"phase": ev["phase"]} if "phase" in ev else {}
        if "step" in ev:
            update["completed"] = ev["step"]
        bar.update(per_run[ev["run"]], **update)


def run_miniature(out: str | os.PathLike, cfg: MiniatureConfig | None = None, *, show_progress: bool = True) -> dict:
    """The experiment (see the module docstring). With ``show_progress``, one bar per run moved by
    its worker's steps, and transformers' own loading bars off."""
    from .models import transformers_bars_off

    with transformers_bars_off() if show_progress else contextlib.nullcontext():
        return _run_miniature(out, cfg, show_progress=show_progress)


def _run_miniature(out: str | os.PathLike, cfg: MiniatureConfig | None, *, show_progress: bool) -> dict:
    import multiprocessing as mp

    from rich.progress import MofNCompleteColumn, Progress, TextColumn

    from .models import load_policy
    from transformers import AutoTokenizer

    from .warmstart import held_out, necessary_tokens, warm_start

    cfg = cfg or MiniatureConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "miniature_config.json").write_text(cfg.model_dump_json(indent=2))
    t0 = time.perf_counter()
    sft_dir = out / "sft"
    if (sft_dir / "warmstart.json").exists():  # reused only if built with the same warm-start config
        _require_same(json.loads((sft_dir / "warmstart.json").read_text())["config"], cfg.warmstart,
                      f"warm start {sft_dir}", "warm-start configuration")
    else:
        log.info("warm start: SFT of the tiny model on the synthetic task")
        warm_start(sft_dir, cfg.warmstart)
    base = kept_evaluation(out / "base_eval.json", lambda: load_policy(sft_dir), cfg.eval_levels, cfg.eval_per_level,
                           cfg.max_new_tokens, cfg.warmstart.task, what="base evaluation")
    log.info("SFT base: accuracy %.3f, %.1f tokens", base["accuracy"], base["mean_tokens"])
    sampled = cfg.sampled_decoding()
    base_sampled = None
    if sampled:
        base_sampled = kept_evaluation(out / "base_eval_sampled.json", lambda: load_policy(sft_dir), cfg.eval_levels,
                                       cfg.eval_per_level, cfg.max_new_tokens, cfg.warmstart.task, sampled=sampled)
        log.info("SFT base, %s: accuracy %.3f, %.1f tokens", decoding_label(base_sampled["decoding"]),
                 base_sampled["accuracy"], base_sampled["mean_tokens"])
    eval_problems = held_out(cfg.eval_levels, cfg.eval_per_level, task=cfg.warmstart.task)
    floor = necessary_tokens(AutoTokenizer.from_pretrained(str(sft_dir)), eval_problems)
    credit = base_credit(out, cfg, sft_dir)

    runs = run_configs(out, cfg, str(sft_dir))
    evals: dict[str, list[dict]] = {}
    sampled_evals: dict[str, list[dict]] = {}
    ctx = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        # the workers report each finished step through a queue (none without a display); its manager
        # closes after the pool, which waits for its workers
        progress = stack.enter_context(ctx.Manager()).Queue() if show_progress else None
        pool = stack.enter_context(worker_pool(cfg.workers, ctx))
        bar = stack.enter_context(Progress(*Progress.get_default_columns(), MofNCompleteColumn(),
                                           TextColumn("{task.fields[phase]}"), disable=not show_progress))
        task = bar.add_task(f"miniature: {len(runs)} runs", total=len(runs), phase="")
        per_run = {f"{name} s{seed}": bar.add_task(f"  {name} s{seed}", total=tcfg.steps, phase="waiting")
                   for name, seed, tcfg in runs}
        futs = {
            pool.submit(_train_and_eval, name, seed, tcfg.model_dump_json(), str(Path(tcfg.out) / "eval.json"),
                        cfg.eval_levels, cfg.eval_per_level, cfg.max_new_tokens, cfg.warmstart.task,
                        sampled, progress): (name, seed)
            for name, seed, tcfg in submission_order(runs)
        }
        pending = set(futs)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _show_progress(progress, bar, per_run)
            for fut in finished:
                name, seed = futs[fut]
                ev = fut.result()
                if "sampled" in ev:
                    sampled_evals.setdefault(name, []).append(ev.pop("sampled"))
                evals.setdefault(name, []).append(ev)
                bar.update(task, advance=1)
                bar.update(per_run[f"{name} s{seed}"], phase="done")
                log.info("%s seed %d: accuracy %.3f, %.1f tokens (%.0fs)", name, seed, ev["accuracy"],
                         ev["mean_tokens"], ev["train_seconds"])
    order = list(cfg.methods) + list(cfg.variants)
    evals = {k: sorted(evals[k], key=lambda r: r["seed"]) for k in order if k in evals}
    report = aggregate(evals, base, floor)
    if base_sampled is not None:
        report["sampled"] = aggregate({k: sorted(sampled_evals[k], key=lambda r: r["seed"]) for k in evals},
                                      base_sampled, floor)
    add_dynamics(report, runs)
    report["credit"] = credit
    report["seconds"] = time.perf_counter() - t0
    report["config"] = json.loads(cfg.model_dump_json())
    (out / "miniature.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(report)
    (out / "miniature.md").write_text(f"# L2T miniature\n\n{table}")
    report["plots"] = [str(p) for p in plot(report, out)] + [str(plot_tradeoff(report, out))]
    if "sampled" in report:
        report["plots"] += [str(p) for p in plot(report["sampled"], out, prefix="sampled_")]
        report["plots"].append(str(plot_tradeoff(report["sampled"], out, prefix="sampled_")))
    report["plots"].append(str(plot_dynamics({k: m["training"] for k, m in report["methods"].items()},
                                             out / "training.png")))
    report["table_path"] = str(out / "miniature.md")
    log.info("miniature done in %.0fs; table at %s", report["seconds"], out / "miniature.md")
    return report
