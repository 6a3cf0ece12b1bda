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
  (each response's decisive fault, :func:`~l2t_core.tasks.walk.first_fault`;
  :func:`~l2t_core.miniature_report.fault_totals`),
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
``workers`` parallel processes (one torch thread each), the slowest first
(:func:`submission_order`). Finished runs are kept, so re-running the command after an
interruption only does what is missing. The report's tables and plots are made by
:mod:`~l2t_core.miniature_report`.
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

from pydantic import Field, ValidationError

from .config import METHOD_NAMES, RewardConfig, TrainConfig, _Strict, config_differences
from .atomic_files import write_json_atomic, write_text_atomic
from .dynamics import SCALARS, aggregate_dynamics, plot_dynamics, run_dynamics
from .miniature_report import aggregate, decoding_label, lacks_census, markdown_table, plot, plot_tradeoff
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
        for field, values in (("methods", self.methods), ("seeds", self.seeds), ("eval_levels", self.eval_levels)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:  # two runs into one directory, or one seed or level counted twice in the statistics
                raise ValueError(f"{field} lists {', '.join(map(str, twice))} more than once; give each once")
        from .warmstart import LEVELS

        outside = sorted(set(self.eval_levels) - set(LEVELS))
        if outside:
            raise ValueError(f"eval_levels {outside} are not levels of the task (its levels: "
                             f"{', '.join(map(str, LEVELS))})")
        try:  # every run's TrainConfig, checked now rather than after the warm start and the base evaluation
            run_configs(Path("."), self, "policy")
        except ValueError as exc:  # a pydantic ValidationError is one: its errors on one line
            detail = ("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                      if isinstance(exc, ValidationError) else str(exc))
            raise ValueError(f"train_overrides or a variant's overrides make an invalid training config: "
                             f"{detail}") from None

    def sampled_decoding(self) -> dict | None:
        """How the sampled evaluation decodes (the keyword arguments of ``warmstart.evaluate``), or
        None when ``eval_samples`` is 0."""
        if not self.eval_samples:
            return None
        return {"samples": self.eval_samples, "temperature": self.eval_temperature, "top_p": self.eval_top_p,
                "seed": self.warmstart.seed}


def _set_nested(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"{dotted!r}: {'.'.join(parts[:i + 1])!r} is a setting, not a section of settings")
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
    less, the teacher-forced J and the baselines about the same; more samples m cost more. A
    penalty on blocks below the last one (``l2t_random_layers``, ``compression.targets``) takes one
    backward per episode (``compression.attribution: per_episode``): it goes right after the
    continuation J (``l2t_random_layers`` 2,890–2,910 s for 80 steps where ``l2t`` took 580 s, with
    the backwards over the packed J layout; about half the penalty's time since; lab notebook).
    ``targets: ["last_block"]`` takes the one backward, like the default."""
    from .rewards.compression import LAST_BLOCK
    from .rewards.l2t import has_penalty, sampled_j

    order = {"continuation": 0, "monte_carlo": 2}

    def per_episode_penalty(tcfg: TrainConfig) -> bool:
        c = tcfg.reward.compression
        below_last = tcfg.method == "l2t_random_layers" or any(t != LAST_BLOCK for t in c.targets or ())
        return has_penalty(tcfg.method, tcfg.reward) and below_last and c.attribution == "per_episode"

    def rank(run: tuple[str, int, TrainConfig]) -> tuple[int, int]:
        tcfg = run[2]
        sampling = sampled_j(tcfg.method, tcfg.reward)
        if sampling is not None:
            return order[sampling], -tcfg.reward.fitting.mc_samples
        return (1, 0) if per_episode_penalty(tcfg) else (3, 0)
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
    write_json_atomic(path, obj)
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
        _require_trained_as(done.parent, tcfg)
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


def _require_trained_as(run: Path, tcfg: TrainConfig) -> None:
    """Refuse a finished ``run`` trained with another configuration than ``tcfg`` (naming the fields)."""
    saved_cfg = run / "train_config.json"
    if saved_cfg.exists():
        saved = _relocated(json.loads(saved_cfg.read_text()), tcfg)
        _require_same(saved, tcfg, f"run {run}", "training configuration")


def finished_run(tcfg: TrainConfig, eval_json: Path, levels, per_level, max_new_tokens, task: str,
                 sampled: dict | None) -> dict | None:
    """What :func:`_train_and_eval` returns for a run that is already trained and evaluated with
    these settings, read in this process without loading a model; None when the run must train or
    be evaluated (again) in a worker. A run trained with another configuration, or a greedy
    evaluation made with other settings, is refused here, before any worker starts."""
    if not eval_json.exists():
        return None
    _require_trained_as(eval_json.parent, tcfg)
    greedy = _eval_settings(levels, per_level, max_new_tokens, task)
    ev, redo = _saved_evaluation(eval_json, greedy, sampled=False, what="evaluation")
    if ev is None or redo:
        return None
    if not sampled:
        return ev
    more, redo = _saved_evaluation(eval_json.parent / "eval_sampled.json", {**greedy, **sampled}, sampled=True,
                                   what=None)
    return None if more is None or redo else {**ev, "sampled": more}


# what a run's evaluation records of its training, kept when the evaluation is made again
RUN_FIELDS = ("name", "seed", "train_seconds", "final_train_accuracy", "final_train_tokens")


def kept_evaluation(path: Path, policy, levels, per_level, max_new_tokens, task: str, *, sampled: dict | None = None,
                    extra: dict | None = None, carry: Sequence[str] = (), what: str | None = None) -> dict:
    """``warmstart.evaluate`` of ``policy()`` (a ``(model, tokenizer)``, loaded only when needed) on
    the held-out split, greedy or with the sampling arguments ``sampled``, kept in ``path`` with its
    settings (:func:`_eval_settings`) and ``extra``.

    A saved evaluation is reused when made with the same settings and a complete census; one that
    predates a census field (:func:`~l2t_core.miniature_report.lacks_census`) is made again from
    the same checkpoint, keeping its ``carry`` fields. With other settings, a sampled evaluation is
    sampled again (it is an addition to the experiment), while a greedy one (``what`` names it in
    the error) is refused: it is the experiment's record, and other settings make another
    experiment."""
    from .warmstart import evaluate, held_out

    settings = {**_eval_settings(levels, per_level, max_new_tokens, task), **(sampled or {})}
    saved, redo = _saved_evaluation(path, settings, sampled=bool(sampled), what=what)
    if saved is not None and not redo:
        return saved
    extra = dict(extra or {})
    if saved is not None:
        log.info("%s %s; evaluating the checkpoint again", path, redo)
        extra = {**{k: saved[k] for k in carry if k in saved}, **extra}
    model, tok = policy()
    ev = evaluate(model, tok, held_out(levels, per_level, task=task), max_new_tokens=max_new_tokens, **(sampled or {}))
    return _write_json(path, {**ev, **extra, "eval_settings": settings})


def _saved_evaluation(path: Path, settings: dict, *, sampled: bool, what: str | None) -> tuple[dict | None, str]:
    """The evaluation saved in ``path`` (None if there is none) and why :func:`kept_evaluation` must
    make it again ("" when it is reused as it is); a greedy one made with other ``settings`` is refused."""
    if not path.exists():
        return None, ""
    saved = json.loads(path.read_text())
    recorded = saved.get("eval_settings")
    if sampled and recorded != settings:
        return saved, "was made with other settings"
    # greedy evaluations made before the settings were recorded are taken as they are
    if not sampled and recorded is not None:
        _require_same(recorded, settings, f"{what or 'evaluation'} {path}", "evaluation settings")
    return saved, "predates the current episode census" if lacks_census(saved) else ""


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

    def collect(name: str, seed: int, ev: dict) -> None:
        if "sampled" in ev:
            sampled_evals.setdefault(name, []).append(ev.pop("sampled"))
        evals.setdefault(name, []).append(ev)
        log.info("%s seed %d: accuracy %.3f, %.1f tokens (%.0fs)", name, seed, ev["accuracy"],
                 ev["mean_tokens"], ev["train_seconds"])

    todo = []  # the runs to train or evaluate in workers; finished ones are read here, and no worker starts for them
    for name, seed, tcfg in submission_order(runs):
        ev = finished_run(tcfg, Path(tcfg.out) / "eval.json", cfg.eval_levels, cfg.eval_per_level,
                          cfg.max_new_tokens, cfg.warmstart.task, sampled)
        if ev is None:
            todo.append((name, seed, tcfg))
        else:
            collect(name, seed, ev)
    ctx = mp.get_context("spawn")
    with contextlib.ExitStack() as stack:
        # the workers report each finished step through a queue (none without a display); its manager
        # closes after the pool, which waits for its workers
        progress = stack.enter_context(ctx.Manager()).Queue() if show_progress and todo else None
        pool = stack.enter_context(worker_pool(cfg.workers, ctx)) if todo else None
        bar = stack.enter_context(Progress(*Progress.get_default_columns(), MofNCompleteColumn(),
                                           TextColumn("{task.fields[phase]}"), disable=not show_progress))
        task = bar.add_task(f"miniature: {len(runs)} runs", total=len(runs), completed=len(runs) - len(todo), phase="")
        waiting = {(name, seed) for name, seed, _ in todo}
        per_run = {f"{name} s{seed}": bar.add_task(f"  {name} s{seed}", total=tcfg.steps,
                                                   **({"phase": "waiting"} if (name, seed) in waiting else
                                                      {"phase": "done earlier", "completed": tcfg.steps}))
                   for name, seed, tcfg in runs}
        futs = {
            pool.submit(_train_and_eval, name, seed, tcfg.model_dump_json(), str(Path(tcfg.out) / "eval.json"),
                        cfg.eval_levels, cfg.eval_per_level, cfg.max_new_tokens, cfg.warmstart.task,
                        sampled, progress): (name, seed)
            for name, seed, tcfg in todo
        }
        pending = set(futs)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _show_progress(progress, bar, per_run)
            for fut in finished:
                name, seed = futs[fut]
                collect(name, seed, fut.result())
                bar.update(task, advance=1)
                bar.update(per_run[f"{name} s{seed}"], phase="done")
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
    # what reruns this directory, written with its report: a configuration refused as another than the
    # one that made a run (here, or inside a worker) leaves the record of the one that made it
    write_text_atomic(out / "miniature_config.json", cfg.model_dump_json(indent=2))
    write_text_atomic(out / "miniature.json", json.dumps(report, indent=1))
    table = markdown_table(report)
    write_text_atomic(out / "miniature.md", f"# L2T miniature\n\n{table}")
    report["plots"] = [str(p) for p in plot(report, out)] + [str(plot_tradeoff(report, out))]
    if "sampled" in report:
        report["plots"] += [str(p) for p in plot(report["sampled"], out, prefix="sampled_")]
        report["plots"].append(str(plot_tradeoff(report["sampled"], out, prefix="sampled_")))
    report["plots"].append(str(plot_dynamics({k: m["training"] for k, m in report["methods"].items()},
                                             out / "training.png")))
    report["table_path"] = str(out / "miniature.md")
    log.info("miniature done in %.0fs; table at %s", report["seconds"], out / "miniature.md")
    return report
