"""Chained mod-10 arithmetic with controllable difficulty (the embedded default task).

A problem applies ``steps`` operations to a start digit, everything mod 10. Its reference trace
has one ``<episode_k>`` per operation in the METHOD.md §8 format; with probability
``recheck_prob`` a step is followed by a redundant re-check episode, so a model fine-tuned on the
traces over-thinks like the paper's base models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    steps: int
    ops: tuple[tuple[str, int], ...]
    start: int


def make_problem(rng: random.Random, steps: int, idx: int = 0) -> Problem:
    if steps < 1:
        raise ValueError(f"make_problem: steps must be >= 1, got {steps}")
    start = rng.randrange(10)
    ops = tuple((rng.choice("+-*"), rng.randrange(1, 10)) for _ in range(steps))
    x = start
    for op, b in ops:
        x = OPS[op](x, b)
    text = f"Start with {start}. " + " ".join(f"{WORDS[op]} {b}." for op, b in ops) + " Work mod 10."
    return Problem(f"arith-{steps}-{idx}", text, str(x), steps, ops, start)


def trace(p: Problem, rng: random.Random, recheck_prob: float = 0.5) -> str:
    """The episode-tagged reasoning and answer for ``p`` (the response, after the prompt)."""
    eps, x = [], p.start
    for op, b in p.ops:
        y = OPS[op](x, b)
        eps.append(f"{x} {op} {b} = {y}")
        if rng.random() < recheck_prob:
            eps.append(f"check {x} {op} {b} = {y}")
        x = y
    body = "\n".join(f"<episode_{k}>{e}</episode_{k}>" for k, e in enumerate(eps, 1))
    return f"<think>\n{body}\n</think>\n\n\\boxed{{{x}}}"


def dataset(n: int, min_steps: int = 1, max_steps: int = 4, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(min_steps, max_steps), i) for i in range(n)]
