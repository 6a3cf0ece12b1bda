"""The synthetic tasks' held-out splits as benchmarks of ``l2t eval``.

Every task of :data:`l2t_core.tasks.TASKS` gives one benchmark, ``<task>_heldout``
(``walk_heldout``, ``arithmetic_heldout``), evaluated and reported beside the file benchmarks
(MATH500, AIME, ...) by the same :func:`~l2t_core.eval.runner.evaluate_math`:

* the problems are the task's ``held_out_problems(levels, per_level, seed)``: ``per_level`` of
  every level in ``levels`` (all of a level's held-out problems where it has fewer: the walk has
  3 of level 1 and 5 of level 2), deterministic for a seed (default: the task's
  ``HELDOUT_SEED``, the one the warm start evaluates on). The held-out split is fixed by a hash of
  the problem text (:func:`l2t_core.tasks.common.split_of`), so no training set of any seed or
  size holds one of them (checked again on loading);
* each item's ``level`` is the problem's level (its number of moves or terms), so the report
  breaks the benchmark down per level as it does MATH500's levels;
* each item carries its task's prompt, ``task.build_task_prompt(p)`` (the statement and a
  newline), in :attr:`~l2t_core.eval.datasets.BenchmarkItem.prompt`: the synthetic model is
  trained on that prompt, not on METHOD.md §8's math template that file benchmarks get;
* the answer is the final digit; a response's boxed digit is verified by math-verify like every
  math answer.

:func:`load_eval_benchmark` is the loader of ``l2t eval``: a held-out name goes to
:func:`load_heldout`, any other name to :func:`~l2t_core.eval.datasets.load_benchmark` (an
unknown name fails there, listing the file and the held-out benchmarks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..tasks import TASKS, get_task
from ..tasks.common import split_of
from .datasets import BenchmarkItem, Kind, get_spec, heldout_benchmark_names, load_benchmark

DEFAULT_PER_LEVEL = 50


class HeldOutOptionError(ValueError):
    """A bad held-out option; ``option`` names it (``levels``, ``per_level`` or ``seed``)."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message)


def heldout_benchmarks() -> dict[str, str]:
    """Benchmark name -> task name, e.g. ``{'walk_heldout': 'walk', 'arithmetic_heldout': 'arithmetic'}``."""
    names = heldout_benchmark_names()
    return {name: task for name, task in zip(names, TASKS, strict=True)}


def is_heldout(name: str) -> bool:
    """Whether ``name`` is a synthetic held-out benchmark."""
    return name in heldout_benchmarks()


def task_levels(name: str) -> tuple[int, ...]:
    """The levels of the held-out benchmark ``name`` (its task's ``LEVELS``: 1..6)."""
    return tuple(get_task(_task_name(name)).LEVELS)


def _task_name(name: str) -> str:
    try:
        return heldout_benchmarks()[name]
    except KeyError:
        raise HeldOutOptionError("benchmark", f"{name!r} is not a synthetic held-out benchmark; those are "
                                 f"{', '.join(heldout_benchmarks())}") from None


@dataclass(frozen=True)
class HeldOutOptions:
    """Which held-out problems: ``levels`` (None: every level of the task), ``per_level`` problems
    of each (at most: all of a level where it has fewer), drawn with ``seed`` (None: the task's
    ``HELDOUT_SEED``)."""

    levels: tuple[int, ...] | None = None
    per_level: int = DEFAULT_PER_LEVEL
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.per_level, bool) or not isinstance(self.per_level, int) or self.per_level < 1:
            raise HeldOutOptionError("per_level", f"the number of problems per level must be an integer >= 1, "
                                     f"got {self.per_level!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise HeldOutOptionError("seed", f"the held-out seed must be an integer, got {self.seed!r}")
        if self.levels is not None:
            levels = tuple(self.levels)
            if not levels:
                raise HeldOutOptionError("levels", "name at least one level (or none at all for every level)")
            for lv in levels:
                if isinstance(lv, bool) or not isinstance(lv, int):
                    raise HeldOutOptionError("levels", f"levels are integers, got {lv!r}")
            twice = sorted({lv for lv in levels if levels.count(lv) > 1})
            if twice:
                raise HeldOutOptionError("levels", f"level {twice[0]} is given twice")
            object.__setattr__(self, "levels", levels)

    def check(self, name: str) -> None:
        """Fail with :class:`HeldOutOptionError` when a level is not one of benchmark ``name``'s."""
        valid = task_levels(name)
        bad = [lv for lv in self.levels or () if lv not in valid]
        if bad:
            raise HeldOutOptionError("levels", f"unknown level {bad[0]} for {name}; its levels are "
                                     f"{', '.join(map(str, valid))}")

    def describe(self, name: str) -> dict:
        """The resolved options of benchmark ``name`` (what the report records)."""
        task = get_task(_task_name(name))
        return {"task": _task_name(name), "split": "heldout", "prompt": "task (build_task_prompt)",
                "levels": list(self.levels or task.LEVELS), "per_level": self.per_level,
                "seed": task.HELDOUT_SEED if self.seed is None else self.seed}


def load_heldout(name: str, options: HeldOutOptions = HeldOutOptions()) -> list[BenchmarkItem]:
    """The held-out problems of benchmark ``name`` (``<task>_heldout``) as benchmark items, level
    by level: ``id``, ``problem`` and ``answer`` of the task's problem, ``level`` its level,
    ``prompt`` the task prompt, ``meta`` the task, the number of hard steps and the seed."""
    options.check(name)
    info = options.describe(name)
    task = get_task(info["task"])
    try:
        problems = task.held_out_problems(tuple(info["levels"]), options.per_level, info["seed"])
    except ValueError as exc:  # e.g. a level with fewer unique held-out problems than asked
        raise HeldOutOptionError("per_level", f"{name}: {exc}") from None
    items = []
    for p in problems:
        if split_of(p.problem) != "heldout":  # by construction; a changed task must not leak training data
            raise RuntimeError(f"{name}: problem {p.id} ({p.problem!r}) is not in the held-out split")
        items.append(BenchmarkItem(
            id=p.id, problem=p.problem, answer=p.answer, benchmark=name, level=p.level,
            prompt=task.build_task_prompt(p),
            meta={"task": info["task"], "hard_steps": p.num_hard, "seed": info["seed"]}))
    if len({i.id for i in items}) != len(items):
        raise RuntimeError(f"{name}: the held-out problems have duplicate ids")
    return items


def benchmark_kind(name: str) -> Kind:
    """``math`` for a held-out benchmark (verified like math answers), else the file benchmark's
    kind; an unknown name raises :class:`~l2t_core.eval.datasets.DatasetError` listing every
    benchmark."""
    return "math" if is_heldout(name) else get_spec(name).kind


def load_eval_benchmark(name: str, *, limit: int | None = None, heldout: HeldOutOptions = HeldOutOptions(),
                        data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> list[BenchmarkItem]:
    """The items ``l2t eval`` evaluates for ``name``: :func:`load_heldout` with ``heldout`` for a
    synthetic held-out benchmark (``limit`` does not apply: its size is ``heldout.per_level`` per
    level), :func:`~l2t_core.eval.datasets.load_benchmark` with ``limit`` for every other name."""
    if is_heldout(name):
        return load_heldout(name, heldout)
    return load_benchmark(name, data_dir, allow_download=allow_download, limit=limit)


def check_options(names: Sequence[str], options: HeldOutOptions) -> None:
    """Check ``options`` against every held-out benchmark among ``names`` (all of them when
    ``names`` holds none, so a bad level fails even before it would be used)."""
    chosen = [n for n in names if is_heldout(n)] or list(heldout_benchmarks())
    for name in chosen:
        options.check(name)
