"""Matplotlib plots attached to ``benchmark_reports`` as markdown metadata (inline PNG)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: the plots only become PNG bytes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def png_markdown(fig, alt: str) -> str:
    """The figure as a markdown image with an inline base64 PNG; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def eval_comparison(evals: pd.DataFrame, title: str):
    """Accuracy and mean response tokens per level, base model next to the checkpoint."""
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
