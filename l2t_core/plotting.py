"""Colours for plots that draw one bar or line per method or model.

Matplotlib's default cycle has ten colours, so an eleventh method is drawn in the first one's colour
(the miniature with eleven methods drew the last in GRPO's blue). :func:`series_colours` gives
every name its own colour, with no grey (the SFT base is drawn light grey beside them).
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
