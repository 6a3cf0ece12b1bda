"""Reports of an evaluation: JSON + markdown + HTML with matplotlib plots, and the sample table.

:func:`write_report` takes the :class:`~l2t_core.eval.runner.EvalResult` of each benchmark of one
model (math results from :func:`~l2t_core.eval.runner.evaluate_math`, HumanEval results from
:func:`~l2t_core.eval.code.evaluate_code`; the tables show maj@k and pass@k where a benchmark has
them) and writes into ``out_dir``: ``report.json`` (summaries), ``report.md`` and ``report.html``
(tables and plots), ``eval_results.parquet`` (every sample; the pipeline's ``eval_results``
table), ``accuracy_tokens.png`` (pass@1 and mean tokens per benchmark, Fig. 2 style) and
``groups.png`` (pass@1 per level/tier). The per-level tables and plot cover the synthetic
held-out benchmarks (:mod:`l2t_core.eval.synthetic`, per task level) like MATH500's levels, and
the markdown and HTML name the task, levels and seed of each.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..atomic_files import cannot_create, save_figure_atomic, write_parquet_atomic, write_text_atomic
from ..plotting import series_colours
from .runner import EvalResult


def _bars(ax, labels, values, title, ylabel):
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def plot_report(results: Mapping[str, EvalResult], out_dir: Path, model: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.2 * len(names), 3.4))
    _bars(axes[0], names, [results[n].summary["pass@1"] for n in names], f"pass@1 — {model}", "pass@1")
    _bars(axes[1], names, [results[n].summary["mean_tokens"] for n in names], "mean response tokens", "tokens")
    fig.tight_layout()
    p1 = out_dir / "accuracy_tokens.png"
    save_figure_atomic(fig, p1, dpi=110)
    plt.close(fig)
    labels, values = [], []
    for n in names:
        for g, s in results[n].summary["per_group"].items():
            labels.append(f"{n}: {g}")
            values.append(s["pass@1"])
    fig, ax = plt.subplots(figsize=(3 + 0.5 * len(labels), 3.4))
    _bars(ax, labels, values, "pass@1 per level / tier", "pass@1")
    fig.tight_layout()
    p2 = out_dir / "groups.png"
    save_figure_atomic(fig, p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def metric_keys(summaries) -> list[str]:
    """The score columns of a set of benchmark summaries: pass@1 first, then every other pass@k /
    maj@k key in the order first seen (math summaries have maj@k, code summaries pass@k)."""
    keys = ["pass@1"]
    for s in summaries:
        keys += [k for k in s if re.fullmatch(r"(pass|maj)@\d+", k) and k not in keys]
    return keys


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_summary(results: Mapping[str, EvalResult], model: str) -> str:
    metrics = metric_keys(r.summary for r in results.values())
    lines = [f"# Evaluation of {model}", "",
             "| benchmark | problems | samples | " + " | ".join(metrics) + " | mean tokens |",
             "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for n, r in results.items():
        s = r.summary
        cells = " | ".join(_fmt(s.get(m)) for m in metrics)
        lines.append(f"| {n} | {s['problems']} | {s['samples']} | {cells} | {s['mean_tokens']:.1f} |")
    lines += ["", "| benchmark | group | problems | pass@1 | mean tokens |", "|---|---|---|---|---|"]
    for n, r in results.items():
        for g, s in r.summary["per_group"].items():
            lines.append(f"| {n} | {g} | {s['problems']} | {s['pass@1']:.3f} | {s['mean_tokens']:.1f} |")
    notes = heldout_notes(results)
    if notes:
        lines += ["", "Synthetic held-out benchmarks:", ""] + [f"- {n}: {text}" for n, text in notes.items()]
    return "\n".join(lines) + "\n"


def heldout_notes(results: Mapping[str, EvalResult]) -> dict[str, str]:
    """A line describing each synthetic held-out benchmark of ``results`` (those whose summary
    has the ``heldout`` record that ``l2t eval`` adds, see :mod:`l2t_core.eval.synthetic`)."""
    out = {}
    for n, r in results.items():
        h = r.summary.get("heldout")
        if isinstance(h, dict):
            out[n] = (f"held-out split of the synthetic {h.get('task')} task, levels "
                      f"{', '.join(map(str, h.get('levels', [])))}, up to {h.get('per_level')} problems per level "
                      f"(seed {h.get('seed')}), prompted with the task's own prompt")
    return out


class ReportDirError(ValueError):
    """An output directory that cannot take this evaluation's report."""


def check_report_dir(out_dir, *, model: str, benchmarks: list[str]) -> None:
    """Before any sampling (creating nothing): ``out_dir`` can be written, and holds no report of another evaluation
    (another model, or benchmarks this one lacks), which :func:`write_report` would replace. The
    same evaluation's report, or the part of it a crash left, is completed by its rerun
    (:func:`finished_results` keeps what was evaluated with the same weights and settings)."""
    out = Path(out_dir)
    why = cannot_create(out)  # nothing is created here: the nearest existing directory must let it be
    if why:
        raise ReportDirError(f"cannot write the report into {out}: {why}; choose another --out")
    report = out / "report.json"
    if not report.is_file():
        return
    try:
        held = json.loads(report.read_text())
        held_model, held_benchmarks = held["model"], sorted(held["benchmarks"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ReportDirError(f"{report} exists and is not a report of l2t eval; choose another --out or remove "
                             f"it") from None
    same_model = held_model == model or (Path(held_model).exists() and Path(held_model).resolve() == Path(model).resolve())
    # the same evaluation, or its rerun after a crash (the report holds the benchmarks finished then)
    if not (same_model and set(held_benchmarks) <= set(benchmarks)):
        raise ReportDirError(
            f"{out} holds the report of {held_model} on {', '.join(held_benchmarks)}; this evaluation ({model} on "
            f"{', '.join(benchmarks)}) would replace it. Choose another --out, or remove that report first")


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def finished_results(out_dir, identities: Mapping[str, dict]) -> dict[str, EvalResult]:
    """The benchmarks of the report in ``out_dir`` (one :func:`check_report_dir` let through: this
    model, some of these benchmarks) that a rerun of the same evaluation need not evaluate again:
    their rows and summary, where the report recorded how they were evaluated (``evaluation``:
    engine, sampling, limit, data) and that equals ``identities[name]``. One evaluated otherwise
    fails (:class:`ReportDirError`, naming what differs): the rerun would mix two evaluations in one
    report. A benchmark reported without that record (an earlier version) is evaluated again."""
    out = Path(out_dir)
    report, table = out / "report.json", out / "eval_results.parquet"
    if not (report.is_file() and table.is_file()):
        return {}
    held = json.loads(report.read_text())["benchmarks"]
    rows = pd.read_parquet(table)
    found = {}
    for name, summary in held.items():
        recorded = summary.get("evaluation") if isinstance(summary, dict) else None
        if recorded is None or name not in identities:
            continue
        wanted = _as_json(identities[name])
        if recorded != wanted:
            differ = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
            changes = "; ".join(f"{k}: {recorded.get(k)} there, {wanted.get(k)} now" for k in differ)
            raise ReportDirError(
                f"{out} holds {name} evaluated with other settings ({changes}); this run would mix two "
                "evaluations in one report. Rerun with those settings to complete it, or choose another --out")
        kept = rows[rows["benchmark"] == name].drop(columns="model").reset_index(drop=True)
        if len(kept):  # reported but without its rows (a table from elsewhere): evaluated again
            found[name] = EvalResult(rows=kept, summary=summary)
    return found


def write_report(out_dir, results: Mapping[str, EvalResult], *, model: str) -> dict:
    """Write the report files of ``results`` (benchmark name -> result) into ``out_dir``."""
    if not results:
        raise ValueError("write_report: no benchmark results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = pd.concat([r.rows.assign(model=model) for r in results.values()], ignore_index=True)
    write_parquet_atomic(rows, out / "eval_results.parquet", index=False)
    summary = {"model": model, "benchmarks": {n: r.summary for n, r in results.items()}}
    write_text_atomic(out / "report.json", json.dumps(summary, indent=1, default=str))
    md = markdown_summary(results, model)
    plots = plot_report(results, out, model)
    write_text_atomic(out / "report.md", md + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    metrics = metric_keys(r.summary for r in results.values())
    table = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{r.summary['problems']}</td>"
        + "".join(f"<td>{_fmt(r.summary.get(m))}</td>" for m in metrics)
        + f"<td>{r.summary['mean_tokens']:.1f}</td></tr>" for n, r in results.items())
    head = "".join(f"<th>{m}</th>" for m in metrics)
    groups = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(str(g))}</td><td>{s['problems']}</td>"
        f"<td>{s['pass@1']:.3f}</td><td>{s['mean_tokens']:.1f}</td></tr>"
        for n, r in results.items() for g, s in r.summary["per_group"].items())
    notes = "".join(f"<li>{html.escape(n)}: {html.escape(text)}</li>" for n, text in heldout_notes(results).items())
    write_text_atomic(
        out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation of {html.escape(model)}</title></head>"
        f"<body><h1>Evaluation of {html.escape(model)}</h1><table border='1' cellpadding='4'>"
        f"<tr><th>benchmark</th><th>problems</th>{head}<th>mean tokens</th></tr>{table}</table>"
        "<h2>Per level / tier</h2><table border='1' cellpadding='4'><tr><th>benchmark</th><th>group</th>"
        f"<th>problems</th><th>pass@1</th><th>mean tokens</th></tr>{groups}</table>"
        + (f"<h2>Synthetic held-out benchmarks</h2><ul>{notes}</ul>" if notes else "")
        + "".join(f"<p><img src='{p.name}' alt='{p.stem}'></p>" for p in plots) + "</body></html>")
    summary["files"] = {k: str(out / k) for k in ("report.json", "report.md", "report.html", "eval_results.parquet")}
    summary["plots"] = [str(p) for p in plots]
    return summary


def plot_models_by_group(table: pd.DataFrame, title: str, *, group: str = "level", model: str = "model_kind"):
    """A figure of accuracy and mean response tokens per group (x: the values of ``group`` in
    their order of appearance, e.g. ``all``, ``level 1``, ``tier d<=3``), one bar per model (the
    values of ``model``, e.g. base and checkpoint). ``table`` has the columns ``group``, ``model``,
    ``accuracy`` and ``mean_tokens`` (one row per model and group, as the pipeline's
    ``eval_results``). Returns the matplotlib figure; the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [c for c in (group, model, "accuracy", "mean_tokens") if c not in table.columns]
    if missing:
        raise ValueError(f"plot_models_by_group: the table lacks the column(s) {missing}")
    groups = list(dict.fromkeys(table[group].astype(str)))
    models = list(dict.fromkeys(table[model].astype(str)))
    colours = series_colours(models)
    width = 0.8 / max(1, len(models))
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.1 * len(groups), 3.4))
    panels = ((axes[0], "accuracy", "accuracy (pass@1)"), (axes[1], "mean_tokens", "mean response tokens"))
    for ax, col, label in panels:
        for j, name in enumerate(models):
            sub = table[table[model].astype(str) == name]
            by_group = dict(zip(sub[group].astype(str), sub[col].astype(float)))
            values = [by_group.get(g, float("nan")) for g in groups]  # no bar where a model lacks a group
            ax.bar([i + (j - (len(models) - 1) / 2) * width for i in range(len(groups))], values, width=width,
                   label=name, color=colours[name])
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
