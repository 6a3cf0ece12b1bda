"""Colours and labels for plots that draw one bar, line or point per method or model.

Matplotlib's default cycle has ten colours, so an eleventh method is drawn in the first one's colour
(the miniature with eleven methods drew the last in GRPO's blue). :func:`series_colours` gives
every name its own colour, with no grey (the SFT base is drawn light grey beside them).

Methods that land close together in a scatter (two L2T options at the same accuracy and length)
had their names printed over each other; :func:`separate_labels` moves such labels apart.
"""

from __future__ import annotations

from collections.abc import Sequence


def distinct_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` pairwise different RGB(A) colours, none grey: tab10's for up to 9, then the light
    shades of tab20 (up to 18), evenly spaced samples of the ``turbo`` colour map beyond."""
    if n < 0:
        raise ValueError(f"distinct_colours: n must be >= 0, got {n}")
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors  # dark (= tab10) and light shades alternate
    palette = [tuple(c) for c in [*tab20[0::2], *tab20[1::2]] if len(set(c)) > 1]  # r = g = b: grey
    if n <= len(palette):
        return palette[:n]
    turbo = matplotlib.colormaps["turbo"]
    return [tuple(float(x) for x in turbo(0.05 + 0.9 * i / (n - 1))) for i in range(n)]


def series_colours(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per distinct name, in order of first appearance (the same name, the same colour,
    in every panel and every plot made from the same list)."""
    unique = list(dict.fromkeys(names))
    return dict(zip(unique, distinct_colours(len(unique))))


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def unoverlap(boxes: Sequence[Box], step: float, tries: int = 12) -> list[float]:
    """Vertical shifts, one per box, that keep the boxes from overlapping: each box in turn, in
    order, is left where it is if it overlaps none placed before it, else moved by ``step``, then
    ``-step``, ``2 * step``, ``-2 * step``, ... to the first place free of them (after ``tries``
    moves each way it stays where it is). The first box never moves."""
    if step <= 0:
        raise ValueError(f"unoverlap: step must be > 0, got {step}")
    offsets = [0.0] + [sign * k * step for k in range(1, tries + 1) for sign in (1, -1)]
    placed: list[Box] = []
    shifts: list[float] = []
    for x0, y0, x1, y1 in boxes:
        shift = next((d for d in offsets
                      if not any(_overlap((x0, y0 + d, x1, y1 + d), p) for p in placed)), 0.0)
        placed.append((x0, y0 + shift, x1, y1 + shift))
        shifts.append(shift)
    return shifts


def separate_labels(fig, *groups: Sequence) -> None:
    """Move the text of overlapping ``Axes.annotate`` labels apart vertically (by :func:`unoverlap`,
    one label height at a time), keeping each beside its point; each of ``groups`` (the labels of
    one axes) is separated on its own, after one draw of the figure. Call it once the axes' limits
    are final (after every point is drawn)."""
    groups = tuple(g for g in groups if g)
    if not groups:
        return
    fig.canvas.draw()  # before a draw, the data limits are not final and a label's extent is a unit box
    points_per_pixel = 72.0 / fig.dpi
    for labels in groups:
        extents = [a.get_window_extent() for a in labels]
        step = max(e.height for e in extents) * 1.1
        if step <= 0:
            continue
        shifts = unoverlap([(e.x0, e.y0, e.x1, e.y1) for e in extents], step)
        for a, shift in zip(labels, shifts):
            if shift and a.get_anncoords() == "offset points":
                dx, dy = a.xyann
                a.xyann = (dx, dy + shift * points_per_pixel)
