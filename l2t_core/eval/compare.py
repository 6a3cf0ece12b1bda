"""Cross-model comparison of evaluation reports (Fig. 2 style): accuracy and tokens side by side.

:func:`compare_reports` reads the ``report.json`` of several report directories written by
:func:`~l2t_core.eval.report.write_report` (``l2t eval --out DIR``), one per model or method,
and writes one comparison into ``out_dir``:

* ``comparison.json``: per model and benchmark pass@1, mean response tokens, every other pass@k /
  maj@k the reports have, ``accuracy_delta`` (pass@1 − the base's), ``token_ratio``
  (tokens / the base's tokens) and ``efficiency`` (the base's tokens / tokens, METHOD.md §7);
  per model the same over the benchmarks every report has (``average``: unweighted means over
  benchmarks, the ratios taken of those means); the benchmarks left out and any warnings;
* ``comparison.md`` and ``comparison.html``: the same as tables;
* ``comparison.png`` (grouped bars of pass@1 and mean tokens per benchmark, one bar per model)
  and ``token_ratio.png`` (tokens relative to the base, 1 = the base's budget).

:func:`compare_summaries` does the numbers from in-memory summaries (``{model: {benchmark:
summary}}``, e.g. ``{name: result.summary}`` of :class:`~l2t_core.eval.runner.EvalResult`).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..atomic_files import save_figure_atomic, write_text_atomic
from ..plotting import series_colours

REQUIRED = ("pass@1", "mean_tokens", "problems", "samples")
AVERAGE = "average"


class ReportError(ValueError):
    """A report directory or summary that cannot be compared; the message says which and how to fix it."""


def load_report(report_dir) -> dict:
    """The ``report.json`` of a report directory, checked to hold per-benchmark summaries."""
    d = Path(report_dir)
    path = d / "report.json"
    if not path.is_file():
        why = "does not exist" if not d.exists() else "has no report.json"
        raise ReportError(f"{d}: {why}; pass a directory written by `l2t eval --out DIR` (write_report)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); re-run `l2t eval` to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict) or not data["benchmarks"]:
        raise ReportError(f"{path}: expected an object with a non-empty 'benchmarks' mapping (benchmark -> "
                          "summary), as write_report writes")
    _check_summaries(data["benchmarks"], str(path))
    return data


def _check_summaries(benchmarks: Mapping[str, Mapping], where: str) -> None:
    for bench, s in benchmarks.items():
        if not isinstance(s, Mapping):
            raise ReportError(f"{where}: benchmark {bench!r}: the summary must be a mapping, got {type(s).__name__}")
        missing = [k for k in REQUIRED if k not in s]
        if missing:
            raise ReportError(f"{where}: benchmark {bench!r} lacks {missing}; summaries come from "
                              "evaluate_math / evaluate_code")
        for k in ("pass@1", "mean_tokens"):
            v = s[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ReportError(f"{where}: benchmark {bench!r}: {k} must be a finite number >= 0, got {v!r}")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _extra_metrics(summary: Mapping) -> dict:
    return {k: summary[k] for k in summary if re.fullmatch(r"(pass|maj)@\d+", k) and k != "pass@1"}


# what an evaluation record (l2t eval's "evaluation") holds that does not make two models' numbers
# incomparable: which model (the point of comparing), where and by which engine it ran
NOT_RESULT_CHANGING = {"model", "engine", "device"}


def _comparable(key: str, value):
    """A record's value as far as it changes the numbers: sampling without how the calls are cut or
    whether texts are kept, a data file by its name (the same file in another checkout)."""
    if key == "sampling" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("keep_text", "prompts_per_call")}
    if key == "data" and isinstance(value, str) and not value.startswith("hub copy"):
        return Path(value).name
    return value


def compare_summaries(models: Mapping[str, Mapping[str, Mapping]], base: str, *,
                      sources: Mapping[str, str] | None = None) -> dict:
    """The comparison of ``models`` (model name -> benchmark -> summary) against model ``base``.

    Benchmarks that not every model has are left out (listed under ``skipped``); benchmarks whose
    problem or sample counts differ between models are compared but named in ``warnings``."""
    if len(models) < 2:
        raise ReportError(f"a comparison needs at least two models, got {len(models)}: {list(models)}")
    if base not in models:
        raise ReportError(f"base model {base!r} is not among the compared models {list(models)}; pass one of them "
                          "as --base (or name the reports with --names)")
    for name, benchmarks in models.items():
        if not benchmarks:
            raise ReportError(f"model {name!r} has no benchmark summaries")
        _check_summaries(benchmarks, f"model {name!r}")
    first = next(iter(models.values()))
    common = [b for b in first if all(b in m for m in models.values())]
    skipped = {b: sorted(n for n, m in models.items() if b not in m)
               for b in dict.fromkeys(b for m in models.values() for b in m) if b not in common}
    if not common:
        raise ReportError("the reports share no benchmark: "
                          + "; ".join(f"{n}: {sorted(m)}" for n, m in models.items()))
    warnings = []
    for b in common:
        for key in ("problems", "samples"):
            seen = {n: models[n][b][key] for n in models}
            if len(set(seen.values())) > 1:
                warnings.append(f"{b}: {key} differ between models ({seen}); the numbers are not on the same problems "
                                "or sample counts")
        # how each was evaluated (l2t eval records it): other sampling, a token budget or another data file
        # changes pass@1 and tokens as much as the model does
        recorded = {n: models[n][b].get("evaluation") for n in models}
        if all(isinstance(r, dict) for r in recorded.values()):
            for key in sorted({k for r in recorded.values() for k in r} - NOT_RESULT_CHANGING):
                seen = {n: json.dumps(_comparable(key, r.get(key)), sort_keys=True) for n, r in recorded.items()}
                if len(set(seen.values())) > 1:
                    values = ", ".join(f"{n}: {v}" for n, v in seen.items())
                    warnings.append(f"{b}: evaluated with other {key} ({values}); the models are not compared under "
                                    "the same evaluation")
    rows = []
    for name, benchmarks in models.items():
        for b in common:
            s, sb = benchmarks[b], models[base][b]
            if sb["mean_tokens"] == 0:
                warnings.append(f"{b}: the base's mean tokens are 0, so token ratios are undefined")
            rows.append({
                "model": name, "benchmark": b, "problems": s["problems"], "samples": s["samples"],
                "pass@1": s["pass@1"], "mean_tokens": s["mean_tokens"], **_extra_metrics(s),
                "accuracy_delta": s["pass@1"] - sb["pass@1"],
                "token_ratio": _ratio(s["mean_tokens"], sb["mean_tokens"]),
                "efficiency": _ratio(sb["mean_tokens"], s["mean_tokens"]),
            })
    mean = {n: {"pass@1": sum(models[n][b]["pass@1"] for b in common) / len(common),
                "mean_tokens": sum(models[n][b]["mean_tokens"] for b in common) / len(common)} for n in models}
    average = [{"model": n, "benchmark": AVERAGE, "benchmarks": len(common), **mean[n],
                "accuracy_delta": mean[n]["pass@1"] - mean[base]["pass@1"],
                "token_ratio": _ratio(mean[n]["mean_tokens"], mean[base]["mean_tokens"]),
                "efficiency": _ratio(mean[base]["mean_tokens"], mean[n]["mean_tokens"])} for n in models]
    return {"base": base, "models": list(models), "benchmarks": common, "rows": rows, "average": average,
            "skipped": skipped, "warnings": list(dict.fromkeys(warnings)),
            "sources": dict(sources) if sources else {}}


def _num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _extra_keys(comparison: Mapping) -> list[str]:
    keys: list[str] = []
    for r in comparison["rows"]:
        keys += [k for k in r if re.fullmatch(r"(pass|maj)@\d+", k) and k != "pass@1" and k not in keys]
    return keys


def comparison_tables(comparison: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table (per model and benchmark, then the averages)."""
    extra = _extra_keys(comparison)
    head = ["model", "benchmark", "pass@1", *extra, "Δ pass@1 vs base", "mean tokens", "tokens / base",
            "efficiency (base / tokens)"]
    cells = []
    for r in [*comparison["rows"], *comparison["average"]]:
        cells.append([r["model"], r["benchmark"], _num(r["pass@1"]), *(_num(r.get(k)) for k in extra),
                      f"{r['accuracy_delta']:+.3f}", _num(r["mean_tokens"], 1), _num(r["token_ratio"]),
                      _num(r["efficiency"], 2)])
    return head, cells


def plot_comparison(comparison: Mapping, out_dir: Path) -> list[Path]:
    """Grouped bars: pass@1 and mean tokens per benchmark (one bar per model), and the token ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, benches = comparison["models"], [*comparison["benchmarks"], AVERAGE]
    rows = {(r["model"], r["benchmark"]): r for r in [*comparison["rows"], *comparison["average"]]}
    width = 0.8 / len(models)
    xs = range(len(benches))
    colours = series_colours(models)

    def grouped(ax, key: str, title: str, ylabel: str, names: Sequence[str]) -> None:
        for j, m in enumerate(names):
            vals = [rows[(m, b)][key] for b in benches]
            vals = [math.nan if v is None else v for v in vals]
            ax.bar([x + (j - (len(names) - 1) / 2) * width for x in xs], vals, width,
                   label=m, color=colours[m])
        ax.set_xticks(list(xs), benches, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.0 * len(benches) * max(1, len(models) / 2), 3.8))
    grouped(axes[0], "pass@1", "pass@1", "pass@1", models)
    grouped(axes[1], "mean_tokens", "mean response tokens", "tokens", models)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=min(len(models), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    p1 = out_dir / "comparison.png"
    save_figure_atomic(fig, p1, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3 + 0.8 * len(benches) * max(1, len(models) / 2), 3.6))
    others = [m for m in models if m != comparison["base"]]
    grouped(ax, "token_ratio", f"tokens relative to {comparison['base']}", "tokens / base tokens", others)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = out_dir / "token_ratio.png"
    save_figure_atomic(fig, p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def write_comparison(out_dir, comparison: Mapping) -> dict:
    """Write ``comparison`` (from :func:`compare_summaries`) as JSON, markdown, HTML and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_comparison(comparison, out)
    head, cells = comparison_tables(comparison)
    title = f"Comparison against {comparison['base']}"
    notes = [f"- {b} left out: missing from {', '.join(m)}" for b, m in comparison["skipped"].items()]
    notes += [f"- warning: {w}" for w in comparison["warnings"]]
    md = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    md += ["", f"`{AVERAGE}`: unweighted means over the {len(comparison['benchmarks'])} shared benchmarks; "
           "the ratios are of those means."]
    md += ([""] + notes if notes else []) + [""] + [f"![{p.stem}]({p.name})" for p in plots]
    files = {"comparison.json": out / "comparison.json", "comparison.md": out / "comparison.md",
             "comparison.html": out / "comparison.html"}
    write_text_atomic(files["comparison.md"], "\n".join(md) + "\n")
    esc = html.escape
    table = ("<table border='1' cellpadding='4'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells) + "</table>")
    write_text_atomic(
        files["comparison.html"],
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title></head><body>"
        f"<h1>{esc(title)}</h1>{table}" + "".join(f"<p>{esc(n[2:])}</p>" for n in notes)
        + "".join(f"<p><img src='{p.name}' alt='{p.stem}'></p>" for p in plots) + "</body></html>")
    write_text_atomic(files["comparison.json"], json.dumps(comparison, indent=1))
    return {"files": {k: str(v) for k, v in files.items()}, "plots": [str(p) for p in plots]}


def compare_reports(report_dirs: Sequence, out_dir, *, base: str | None = None,
                    names: Sequence[str] | None = None) -> dict:
    """Compare the reports in ``report_dirs`` (named by ``names``, else by their ``model`` field)
    against ``base`` (a name; default the first report) and write the comparison into ``out_dir``."""
    dirs = [Path(d) for d in report_dirs]
    if names is not None and len(names) != len(dirs):
        raise ReportError(f"{len(names)} names for {len(dirs)} report directories; give one name per directory")
    reports = [load_report(d) for d in dirs]
    labels = list(names) if names is not None else [str(r.get("model") or d.name) for r, d in zip(reports, dirs)]
    dup = sorted({n for n in labels if labels.count(n) > 1})
    if dup:
        raise ReportError(f"the reports {[str(d) for d, n in zip(dirs, labels) if n in dup]} share the model name(s) "
                          f"{dup}; name each report with --names (names=...)")
    models = {n: r["benchmarks"] for n, r in zip(labels, reports)}
    comparison = compare_summaries(models, base if base is not None else labels[0],
                                   sources={n: str(d) for n, d in zip(labels, dirs)})
    written = write_comparison(out_dir, comparison)
    return {**comparison, **written}
