"""The report of `l2t miniature` (:mod:`l2t_core.miniature`): from every run's held-out evaluation,
the per-method means and standard deviations over seeds, overall and per level, with the
headline ratios against GRPO (:func:`aggregate`); the hardest level per seed with Welch's
intervals against the length penalty and GRPO (:func:`hardest_level`, issue 3's second target);
why the hardest level's wrong answers are wrong (:func:`fault_totals`); the markdown of
``miniature.md`` (:func:`markdown_table`); and the plots: accuracy and tokens per method and level
(:func:`plot`) and accuracy against tokens (:func:`plot_tradeoff`, from :func:`tradeoff_points`).

Everything here is a pure function of evaluation dicts (``warmstart.evaluate``'s, with the run's
``name``, ``seed`` and ``train_seconds``) and of the report they make, so :mod:`~l2t_core.pooling`
and the tests build reports without training anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic_files import save_figure_atomic
from .dynamics import dynamics_table
from .plotting import separate_labels, series_colours
from .stats import mean_std, welch_difference


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
    against = (" and ".join(refs) + " with Welch's 95 % interval over seeds") if refs else "the SFT base"
    rows = [f"Hardest level (L{h['level']}): {word} accuracy per seed, mean ± std, and the difference of means "
            f"from {against}" + (f" (SFT base: {h['base']:.2f})" if h["base"] is not None else "") + ":", "",
            "| method | per seed | mean ± std | − SFT base |" + "".join(f" − {r} |" for r in refs),
            "|---|---|---|---|" + "---|" * len(refs)]
    for name, m in h["methods"].items():
        vs_base = "–" if m["vs_base"] is None else f"{m['vs_base']:+.3f}"
        rows.append(f"| {name} | {', '.join(f'{v:.2f}' for v in m['values'])} | {m['mean']:.3f} ± {m['std']:.3f} | "
                    f"{vs_base} |" + "".join(f" {cell(h['vs'][r].get(name))} |" for r in refs))
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
        save_figure_atomic(fig, p, dpi=110)
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
    labels: list[list] = [[], []]
    for ax, hardest, ax_labels in zip(axes, (False, True), labels):
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
            ax_labels.append(ax.annotate(name, (p["tokens"], p["accuracy"]), textcoords="offset points",
                                         xytext=(4, 4), fontsize=7))
        f = t["floor"] and (t["floor"]["hardest"] if hardest else t["floor"]["tokens"])
        if f:
            ax.axvline(f, color="black", linestyle="dashed", linewidth=1, label="necessary trace")
        ax.set_xlabel("mean response tokens" if greedy else "mean sampled response tokens")
        ax.set_ylabel("greedy accuracy" if greedy else "sampled pass@1")
        ax.set_title(f"level {t['level']} (hardest)" if hardest else "all levels")
    axes[0].legend(fontsize=7)
    fig.suptitle("accuracy against tokens (mean ± std over seeds; up and left is better)")
    fig.tight_layout()
    separate_labels(fig, *labels)  # two options at the same point printed their names over each other
    path = out / f"{prefix}tradeoff.png"
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
