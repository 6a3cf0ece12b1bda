"""Procedural tasks for the embedded CPU default.

* ``walk`` (:mod:`.walk`, the default): a digit walk on a fixed permutation; one-operand lookups,
  learnable by the tiny model in a few CPU minutes.
* ``arithmetic`` (:mod:`.arithmetic`): chained mod-10 arithmetic with product terms; two-operand
  lookups, too slow for the tiny model to learn on a CPU.

Both modules offer the same API (``Problem``, ``dataset``, ``held_out_problems``,
``build_task_prompt``, ``TraceStyle``, ``build_trace``, ``forced_answer_example``,
``classify_episodes``, ``LEVELS``, ``HELDOUT_SEED``, ...); what does not depend on the task (the
problem and step records, the draw loop and split, the trace loop, forced answers, the episode
classifier) is written once in :mod:`.common` and re-exported by both.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

TaskName = Literal["walk", "arithmetic"]
TASKS: tuple[str, ...] = ("walk", "arithmetic")


def get_task(name: str) -> ModuleType:
    """The task module called ``name`` ('walk' or 'arithmetic')."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{name}")


def task_of(problem) -> ModuleType:
    """The task module a problem object was made by."""
    mod = type(problem).__module__
    name = mod.rsplit(".", 1)[-1]
    if not mod.startswith(f"{__name__}.") or name not in TASKS or type(problem).__name__ != "Problem":
        raise ValueError(f"not a problem of a synthetic task ({', '.join(TASKS)}): {type(problem).__name__} from {mod}")
    return get_task(name)
