"""One colour per method in every plot, however many methods (matplotlib's cycle repeats after ten);
labels of points that land together moved apart."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
from matplotlib.axes import Axes

from l2t_core.plotting import distinct_colours, separate_labels, series_colours, unoverlap

matplotlib.use("Agg")


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 18, 19, 40])
def test_distinct_colours_are_distinct_and_never_grey(n):
    colours = distinct_colours(n)
    assert len(colours) == n and len(set(colours)) == n
    assert all(len(set(c[:3])) > 1 for c in colours)  # r = g = b would be grey, the SFT base's colour


def test_distinct_colours_rejects_a_negative_count():
    with pytest.raises(ValueError, match="n must be >= 0"):
        distinct_colours(-1)


def test_series_colours_one_per_name_in_order_of_appearance():
    got = series_colours(["b", "a", "b", "c"])
    assert list(got) == ["b", "a", "c"] and len(set(got.values())) == 3
    assert got == series_colours(["b", "a", "c"])  # the same names, the same colours


@pytest.fixture
def bar_colours(monkeypatch):
    """label -> the colour each labelled ``Axes.bar`` call asked for (None: matplotlib's cycle)."""
    seen: dict[str, list] = {}
    real = Axes.bar

    def spy(self, *args, **kwargs):
        if "label" in kwargs:
            seen.setdefault(kwargs["label"], []).append(kwargs.get("color"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    return seen


def _distinct_per_label(seen: dict[str, list], names: list[str]) -> None:
    assert set(names) <= set(seen)
    for name in names:  # one colour per method, in every panel ...
        assert len({tuple(c) for c in seen[name]}) == 1 and seen[name][0] is not None
    assert len({tuple(seen[n][0]) for n in names}) == len(names)  # ... and no two methods alike


def test_miniature_plot_gives_twelve_methods_twelve_colours(tmp_path, bar_colours):
    from l2t_core.miniature_report import plot

    names = [f"method_{i}" for i in range(12)]
    cell = {"mean": 0.5, "std": 0.1}
    report = {
        "decoding": None,
        "base": {"per_level": {"1": {"accuracy": 0.4, "mean_tokens": 50.0}}},
        "methods": {n: {"per_level": {"1": {"accuracy": cell, "mean_tokens": cell}}} for n in names},
    }
    paths = plot(report, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "tokens.png"] and all(p.stat().st_size for p in paths)
    _distinct_per_label(bar_colours, names)
    assert bar_colours["SFT base"] == ["lightgray", "lightgray"]


def test_models_by_group_plot_gives_every_model_its_colour(bar_colours):
    import matplotlib.pyplot as plt

    from l2t_core.eval.report import plot_models_by_group

    names = [f"model_{i}" for i in range(11)]
    table = pd.DataFrame([{"group": g, "model_kind": n, "accuracy": 0.5, "mean_tokens": 10.0}
                          for n in names for g in ("all", "level 1")])
    plt.close(plot_models_by_group(table, "t", group="group"))
    _distinct_per_label(bar_colours, names)


def test_dynamics_plot_gives_eleven_methods_eleven_line_colours(tmp_path, monkeypatch):
    from l2t_core.dynamics import plot_dynamics

    seen: dict[str, list] = {}
    real = Axes.plot

    def spy(self, *args, **kwargs):
        seen.setdefault(kwargs.get("label"), []).append(kwargs.get("color"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    names = [f"method_{i}" for i in range(11)]
    curve = {"step": [1, 2, 3], "mean_tokens": [10.0, 9.0, 8.0], "accuracy": [0.5, 0.6, 0.7]}
    path = plot_dynamics({n: {"curve": curve} for n in names}, tmp_path / "training.png")
    assert path.stat().st_size > 0
    _distinct_per_label(seen, names)


def test_unoverlap_moves_only_what_overlaps_up_then_down():
    boxes = [(0, 0, 10, 2), (5, 1, 15, 3), (20, 0, 30, 2), (0, 0, 10, 2), (0, 0, 10, 2)]
    # the 2nd overlaps the 1st: up one step; the 3rd is apart; the 4th and 5th sit on the 1st:
    # up one or two steps still meets the moved 2nd (x 5-15, y 3-5), so the 4th goes down one, the
    # 5th down two
    assert unoverlap(boxes, step=2.0) == [0.0, 2.0, 0.0, -2.0, -4.0]
    assert unoverlap([], step=1.0) == []
    # with no free place within `tries` steps each way, a box stays where it is
    assert unoverlap([(0, 0, 1, 10), (0, 0, 1, 10)], step=1.0, tries=3) == [0.0, 0.0]
    with pytest.raises(ValueError, match="step must be > 0"):
        unoverlap(boxes, step=0.0)


def test_separate_labels_keeps_two_labels_of_one_point_apart():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2], "o")
    anns = [ax.annotate(name, (1.5, 1.5), textcoords="offset points", xytext=(4, 4))
            for name in ("l2t_cont_add", "l2t_cont_add_pc2", "far")]
    anns[2].xy = (1.0, 1.0)
    fig.canvas.draw()
    before = [a.get_window_extent() for a in anns]
    assert before[0].overlaps(before[1]) and before[0].width > 20
    separate_labels(fig, anns)
    fig.canvas.draw()
    after = [a.get_window_extent() for a in anns]
    assert not after[0].overlaps(after[1])
    assert after[0].x0 == pytest.approx(before[0].x0) and after[1].x0 == pytest.approx(before[1].x0)
    assert anns[0].xyann == (4, 4) and anns[2].xyann == (4, 4)  # what did not overlap stays
    plt.close(fig)


def test_separate_labels_separates_each_axes_group_on_its_own_after_one_draw(monkeypatch):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    groups = []
    for ax in axes:
        ax.plot([1, 2], [1, 2], "o")
        groups.append([ax.annotate(name, (1.5, 1.5), textcoords="offset points", xytext=(4, 4))
                       for name in ("grpo", "l2t")])
    alone = [axes[1].annotate("base", (1.0, 1.0), textcoords="offset points", xytext=(4, 4))]
    draws = []
    draw = fig.canvas.draw
    monkeypatch.setattr(fig.canvas, "draw", lambda: (draws.append(1), draw())[1])
    separate_labels(fig, *groups, alone, [])
    assert len(draws) == 1
    fig.canvas.draw()
    for group in groups:
        a, b = (x.get_window_extent() for x in group)
        assert not a.overlaps(b)
    assert alone[0].xyann == (4, 4)
    plt.close(fig)
