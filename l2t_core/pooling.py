"""Pool the seeds of several ``l2t miniature`` reports of one experiment, with the warm start as a block.

Seeds get added to an experiment after the fact: a second ``l2t miniature`` run with more seeds
for some methods writes a second ``miniature.json``. When both runs started from the same SFT
checkpoint their seeds can simply be pooled. When the warm start had to be rebuilt (a warm start
is bit-identical on one machine, not across CPUs), the second report comes from another
*realization* of the same base configuration, and every method's numbers there move together
(an easier or harder base). Pooling them naively would mix that shift into the comparison.

:func:`pool_reports` therefore treats each distinct warm start (reports whose SFT base evaluated
identically share one) as a block and compares two methods with the additive model

    y = block effect + method effect + noise

fitted by least squares on the two methods' seeds (Student's t with the residual degrees of
freedom, n_a + n_b − blocks − 1). With one block this is the pooled-variance two-sample t-test
(the reports' own comparisons use Welch's test, which does not pool variances); its estimate is
the weighted mean of the within-block differences, weights n_a·n_b/(n_a + n_b) per block
(:func:`blocked_difference`). Only configurations that agree on everything that can change a
result may be pooled (the RL budget, the evaluation, the warm start's settings); a difference
is refused with the setting's name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic
from .config import config_differences
from .miniature import NOT_COMPARED, MiniatureConfig
from .stats import mean_std

# configuration keys that say which runs a report holds (besides NOT_COMPARED: how fast they ran,
# where they live, how often they were saved), not what they measure
POOL_FREE = ("methods", "variants", "seeds", "credit_problems", *NOT_COMPARED)
REFERENCES = ("grpo", "length_penalty")


def blocked_difference(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]],
                       confidence: float = 0.95) -> dict:
    """Method a − method b adjusted for blocks: least squares on ``y = block + [method is a]·δ``.

    ``a`` and ``b`` map a block name to that block's values (one per seed). Returns ``{"delta",
    "low", "high", "p", "df", "n_a", "n_b", "blocks"}``, where ``blocks`` counts the blocks that
    hold both methods (only they inform δ; the others are dropped). ``low``, ``high`` and ``p`` are
    None when the residual degrees of freedom are 0 or the residuals are all 0."""
    import numpy as np
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"blocked_difference: confidence must lie in (0, 1), got {confidence}")
    shared = [k for k in a if k in b and len(a[k]) and len(b[k])]
    if not shared:
        raise ValueError("blocked_difference: no block holds values of both methods "
                         f"(a has {sorted(a)}, b has {sorted(b)})")
    y, rows = [], []
    for j, k in enumerate(shared):
        for is_a, vals in ((1.0, a[k]), (0.0, b[k])):
            for v in vals:
                x = [0.0] * (len(shared) + 1)
                x[j] = 1.0
                x[-1] = is_a
                rows.append(x)
                y.append(float(v))
    X, Y = np.asarray(rows), np.asarray(y)
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    delta = float(coef[-1])
    n_a = sum(len(a[k]) for k in shared)
    n_b = sum(len(b[k]) for k in shared)
    out = {"delta": delta, "low": None, "high": None, "p": None, "df": len(Y) - X.shape[1], "n_a": n_a,
           "n_b": n_b, "blocks": len(shared)}
    resid = Y - X @ coef
    sse = float(resid @ resid)
    if out["df"] < 1 or sse <= 1e-24:
        return out
    cov = sse / out["df"] * np.linalg.inv(X.T @ X)
    se = math.sqrt(float(cov[-1, -1]))
    t = stats.t.ppf(0.5 + confidence / 2, out["df"])
    out.update(low=delta - t * se, high=delta + t * se, p=float(2 * stats.t.sf(abs(delta) / se, out["df"])))
    return out


def _differences(saved: dict, first: MiniatureConfig) -> list[str]:
    """Settings in which a report's config differs from ``first`` (read through today's
    :class:`~l2t_core.miniature.MiniatureConfig`, so a field added since takes its default, the
    earlier behaviour), the warm start's as ``warmstart.<field>``; pool-free keys left out."""
    top = config_differences(saved, first, ignore=(*POOL_FREE, "warmstart"))
    warm = config_differences(saved.get("warmstart", {}), first.warmstart, ignore=NOT_COMPARED)
    return top + [f"warmstart.{k}" for k in warm]


def check_poolable(reports: Sequence[dict], labels: Sequence[str]) -> None:
    """Refuse reports that differ in anything that changes a result, or that disagree on what a
    variant name means."""
    if len(reports) < 2:
        raise ValueError(f"pool: give at least two reports, got {len(reports)}")
    try:
        first = MiniatureConfig.model_validate(reports[0]["config"])
    except ValueError as e:
        raise ValueError(f"pool: {labels[0]} holds no valid miniature config: {e}") from None
    for rep, lab in zip(reports[1:], labels[1:]):
        diff = _differences(rep["config"], first)
        if diff:
            raise ValueError(f"pool: {lab} differs from {labels[0]} in {', '.join(map(repr, diff))}; only runs of "
                             "one experiment (same warm-start settings, RL budget and evaluation) can be pooled")
    meaning: dict[str, tuple[str, Any]] = {}
    for rep, lab in zip(reports, labels):
        cfg = rep["config"]
        named = {m: {"method": m, "overrides": {}} for m in cfg.get("methods", ())}
        named.update(cfg.get("variants", {}))
        for name, v in named.items():
            seen = meaning.setdefault(name, (lab, v))
            if seen[1] != v:
                raise ValueError(f"pool: {name!r} means {seen[1]} in {seen[0]} but {v} in {lab}")


def _blocks(reports: Sequence[dict]) -> list[int]:
    """The warm-start block of each report: reports whose SFT base evaluated identically share one.
    The evaluation's wall time (``seconds``) is not part of what it found: the same base evaluated
    again (a second ``l2t miniature`` into another directory) takes another time."""
    keys: list[str] = []
    out = []
    for rep in reports:
        k = json.dumps({f: v for f, v in rep["base"].items() if f != "seconds"}, sort_keys=True)
        if k not in keys:
            keys.append(k)
        out.append(keys.index(k))
    return out


def _pool_decoding(reports: Sequence[dict], blocks: list[int], labels: Sequence[str]) -> dict:
    per: dict[str, dict[str, list[dict]]] = {}  # method -> block -> seed records
    for rep, blk, lab in zip(reports, blocks, labels):
        for name, m in rep["methods"].items():
            got = per.setdefault(name, {}).setdefault(f"B{blk}", [])
            seeds = {s["seed"] for s in got}
            for s in m["seeds"]:
                if s["seed"] in seeds:
                    raise ValueError(f"pool: {name} seed {s['seed']} is in two reports on the same warm start "
                                     f"(again in {lab}); the same run would count twice")
                got.append(s)
    shared = set.intersection(*(set(s["per_level_accuracy"]) for by in per.values() for v in by.values() for s in v))
    level = max(shared, key=int) if shared else None
    metrics = ["accuracy", "mean_tokens"] + ([f"L{level}"] if level else [])

    def values(name: str, metric: str) -> dict[str, list[float]]:
        return {blk: [s["per_level_accuracy"][level] if metric == f"L{level}" else s[metric] for s in v]
                for blk, v in per[name].items()}

    out: dict[str, Any] = {"hardest_level": level, "methods": {}}
    for name, by in per.items():
        row: dict[str, Any] = {"seeds": {blk: [s["seed"] for s in v] for blk, v in by.items()}}
        for metric in metrics:
            vals = values(name, metric)
            row[metric] = {"values": vals, **mean_std([x for v in vals.values() for x in v])}
        if "grpo" in per:  # tokens ÷ GRPO's within each block, averaged over the blocks that hold both
            g = values("grpo", "mean_tokens")
            ratios = [mean_std(v)["mean"] / mean_std(g[blk])["mean"] for blk, v in values(name, "mean_tokens").items()
                      if blk in g]
            row["tokens_over_grpo"] = sum(ratios) / len(ratios) if ratios else None
        row["vs"] = {}
        for ref in REFERENCES:
            if ref in per and ref != name:
                try:
                    row["vs"][ref] = {metric: blocked_difference(values(name, metric), values(ref, metric))
                                      for metric in metrics}
                except ValueError:  # no warm start holds both: nothing to compare
                    continue
        out["methods"][name] = row
    return out


def pool_reports(reports: Sequence[dict], labels: Sequence[str] | None = None) -> dict:
    """Pool the seeds of ``miniature.json`` reports of one experiment (see the module docstring):
    greedy, and sampled where every report has it. Per method and metric (accuracy, mean tokens,
    hardest-level accuracy): the values per warm-start block, their mean and std, tokens ÷ GRPO's,
    and the block-adjusted difference from GRPO and from the length penalty."""
    labels = list(labels) if labels is not None else [f"report {i}" for i in range(len(reports))]
    if len(labels) != len(reports):
        raise ValueError(f"pool: {len(labels)} labels for {len(reports)} reports")
    check_poolable(reports, labels)
    blocks = _blocks(reports)
    out: dict[str, Any] = {"sources": labels, "blocks": {lab: f"B{b}" for lab, b in zip(labels, blocks)},
                           "model": "y = warm-start block + method; least squares, Student's t (l2t_core.pooling)",
                           "greedy": _pool_decoding(reports, blocks, labels)}
    if all("sampled" in r for r in reports):
        out["sampled"] = _pool_decoding([r["sampled"] for r in reports], blocks, labels)
    return out


def _fmt(d: dict | None) -> str:
    if d is None:
        return "–"
    if d["p"] is None:
        return f"{d['delta']:+.3f}"
    return f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] p = {d['p']:.2f}"


def pooled_markdown(pooled: dict) -> str:
    """The pooled comparison as markdown tables, one per decoding."""
    lines = [f"Pooled over {len(pooled['sources'])} reports: "
             + ", ".join(f"`{s}` ({b})" for s, b in pooled["blocks"].items())
             + ". Blocks are warm-start builds; differences are block-adjusted (" + pooled["model"] + ")."]
    for dec in ("greedy", "sampled"):
        if dec not in pooled:
            continue
        p = pooled[dec]
        lv = p["hardest_level"]
        hard = f" L{lv} | L{lv} − length penalty | L{lv} − GRPO |" if lv else ""
        lines += ["", f"{dec.capitalize()}:", "",
                  "| method | seeds | accuracy | tokens ÷ GRPO | accuracy − GRPO |" + hard,
                  "|---|---|---|---|---|" + ("---|---|---|" if lv else "")]
        for name, m in p["methods"].items():
            seeds = " + ".join(f"{len(v)} ({b})" for b, v in m["seeds"].items())
            ratio = "–" if m.get("tokens_over_grpo") is None else f"{m['tokens_over_grpo']:.2f}"
            vs = m["vs"]
            row = (f"| {name} | {seeds} | {m['accuracy']['mean']:.3f} ± {m['accuracy']['std']:.3f} | {ratio} | "
                   f"{_fmt(vs.get('grpo', {}).get('accuracy'))} |")
            if lv:
                row += (f" {m[f'L{lv}']['mean']:.3f} ± {m[f'L{lv}']['std']:.3f} | "
                        f"{_fmt(vs.get('length_penalty', {}).get(f'L{lv}'))} | {_fmt(vs.get('grpo', {}).get(f'L{lv}'))} |")
            lines.append(row)
    return "\n".join(lines) + "\n"


def pool_directories(dirs: Sequence[str | Path], out: str | Path) -> dict:
    """:func:`pool_reports` of ``DIR/miniature.json`` for each directory; writes ``pooled.json`` and
    ``pooled.md`` into ``out``."""
    reports, labels = [], []
    for d in dirs:
        f = Path(d) / "miniature.json"
        if not f.is_file():
            raise FileNotFoundError(f"pool: {f} does not exist; give directories written by `l2t miniature`")
        reports.append(json.loads(f.read_text()))
        labels.append(str(d))
    pooled = pool_reports(reports, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("pooled.json", json.dumps(pooled, indent=1)), ("pooled.md", pooled_markdown(pooled))):
        write_text_atomic(out / name, text)
    return pooled
