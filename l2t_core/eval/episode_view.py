"""Per-episode reward view (METHOD.md §7): a response rendered with each episode's fitting gain
G_k, normalised penalty P̂_k and process reward r_k, coloured by r_k (green helps, red hurts).

:func:`render_episode_rewards` takes responses with their
:class:`~l2t_core.rewards.l2t.ResponseReward` and returns a self-contained HTML page; every
piece of model text is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from ..rewards.l2t import ResponseReward


def reward_colour(r: float, scale: float) -> str:
    """Background for a process reward: white at 0, green for r > 0, red for r < 0, full at |r| = scale."""
    if not math.isfinite(r) or scale <= 0:
        return "rgb(255,255,255)"
    a = min(1.0, abs(r) / scale)
    fade = int(round(255 * (1 - 0.6 * a)))
    return f"rgb({fade},255,{fade})" if r > 0 else f"rgb(255,{fade},{fade})" if r < 0 else "rgb(255,255,255)"


def render_response(title: str, reward: ResponseReward, scale: float) -> str:
    seg = reward.segmentation
    parts = [f"<h2>{html.escape(title)}</h2>",
             f"<p>outcome {reward.outcome:.0f} · {seg.num_episodes} episodes · status {html.escape(seg.status)}"
             f" · advantage {reward.advantage:+.3f}</p>"]
    cursor = 0
    text = seg.response
    for k, ep in enumerate(seg.episodes):
        if ep.start > cursor:
            parts.append(f"<span class='ctx'>{html.escape(text[cursor:ep.start])}</span>")
        g, p, r = float(reward.gains[k]), float(reward.penalties_hat[k]), float(reward.process[k])
        tip = f"episode {k + 1}: G_k {g:+.4f}, P̂_k {p:.4f}, r_k {r:+.4f}"
        parts.append(f"<span class='ep' style='background:{reward_colour(r, scale)}' title='{html.escape(tip)}'>"
                     f"<sup>{k + 1}</sup>{html.escape(text[ep.start:ep.end])}</span>")
        cursor = ep.end
    if cursor < len(text):
        parts.append(f"<span class='ctx'>{html.escape(text[cursor:])}</span>")
    rows = "".join(f"<tr><td>{k + 1}</td><td>{float(reward.gains[k]):+.4f}</td>"
                   f"<td>{float(reward.penalties_hat[k]):.4f}</td><td>{float(reward.process[k]):+.4f}</td></tr>"
                   for k in range(seg.num_episodes))
    parts.append("<table><tr><th>k</th><th>G_k</th><th>P̂_k</th><th>r_k</th></tr>" + rows + "</table>")
    head, text_parts, table = parts[:2], parts[2:-1], parts[-1]
    return "<section>" + "".join(head) + "<pre>" + "".join(text_parts) + "</pre>" + table + "</section>"


def render_episode_rewards(responses: Sequence[tuple[str, ResponseReward]], *, title: str = "Episode rewards") -> str:
    """An HTML page with one section per ``(title, reward)``; colours share one scale (max |r_k|)."""
    if not responses:
        raise ValueError("render_episode_rewards: no responses to render")
    rs = [abs(float(x)) for _, r in responses for x in r.process if math.isfinite(float(x))]
    scale = max(rs, default=0.0) or 1.0
    body = "".join(render_response(t, r, scale) for t, r in responses)
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto} pre{white-space:pre-wrap;border:1px solid #ccc;"
             "padding:.5em} .ep{border-radius:3px} sup{color:#555} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
