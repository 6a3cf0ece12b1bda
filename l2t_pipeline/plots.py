"""Matplotlib plots attached to ``benchmark_reports`` as markdown metadata (inline PNG)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display: the plots only become PNG bytes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def png_data_uri(fig) -> str:
    """The figure as an inline base64 PNG data URI; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def png_markdown(fig, alt: str) -> str:
    """The figure as a markdown image with an inline base64 PNG; the figure is closed."""
    return f"![{alt}]({png_data_uri(fig)})"


def html_report(title: str, summary: dict, table: pd.DataFrame, images: list[tuple[str, str]]) -> str:
    """A self-contained HTML page: the summary numbers, the evaluation table and the figures
    (``images`` as (caption, data URI) pairs)."""
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{v:.4g}</td></tr>" if isinstance(v, float)
                   else f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary.items())
    figs = "".join(f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'
                   for alt, uri in images)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}</style></head><body>"
            f"<h1>{esc(title)}</h1><table>{rows}</table><h2>Evaluation</h2>"
            f"{table.to_html(index=False, float_format=lambda x: f'{x:.3f}')}{figs}</body></html>")


def eval_comparison(evals: pd.DataFrame, title: str):
    """Accuracy and mean response tokens per level, base model next to the checkpoint: numbered
    levels (the synthetic tasks) on a level axis, named groups (a real benchmark's ``level 3``,
    ``tier d<=3``, or only ``all``) one bar group each
    (:func:`l2t_core.eval.report.plot_models_by_group`)."""
    levels = evals.loc[evals["level"] != "all", "level"].astype(str)
    if not (len(levels) and levels.str.fullmatch(r"\d+").all()):
        from l2t_core.eval.report import plot_models_by_group

        return plot_models_by_group(evals, title)
    per_level = evals[evals["level"] != "all"].copy()
    per_level["level_num"] = per_level["level"].astype(int)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.4
    for ax, col, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "mean_tokens", "mean response tokens")):
        for j, kind in enumerate(("base", "checkpoint")):
            d = per_level[per_level["model_kind"] == kind].sort_values("level_num")
            ax.bar(d["level_num"] + (j - 0.5) * width, d[col], width=width, label=kind)
        ax.set_xlabel("level (operations)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    return fig


def training_curve(steps: pd.DataFrame, title: str):
    """Rollout accuracy and mean response tokens per training step."""
    d = steps.sort_values("step")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(d["step"], d["accuracy"], marker="o", label="rollout accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(d["step"], d["mean_tokens"], marker="s", color="tab:orange", label="mean tokens")
    ax2.set_ylabel("mean tokens")
    fig.legend(loc="upper right")
    ax.set_title(title)
    return fig
