"""Training prompts for a run: a synthetic task (``walk`` or ``arithmetic``) or a math JSONL file
from the data directory."""

from __future__ import annotations

from dataclasses import dataclass

from .config import DataConfig
from .data import read_math_jsonl
from .eval.datasets import DatasetError
from .prompts import build_prompt
from .tasks import TASKS, get_task
from .verify import MathVerifier, NumericVerifier, Verifier


class TrainingDataError(ValueError):
    """The run's training prompts cannot be used: an empty or malformed ``data.source``, or a
    prompt the tokenizer or ``rollout.max_prompt_tokens`` refuses. Raised before any compute; the
    message names the field, the file or problem, and how to fix it (``l2t train`` prints it as
    one line)."""


@dataclass(frozen=True)
class TrainProblem:
    id: str
    prompt: str
    answer: str
    level: int | None = None


def load_training_problems(cfg: DataConfig) -> list[TrainProblem]:
    """The run's training problems; fails with a clear message on an empty or unreadable source."""
    if cfg.source in TASKS:
        task = get_task(cfg.source)
        probs = task.dataset(cfg.train_size, cfg.min_steps, cfg.max_steps, seed=cfg.seed)
        out = [TrainProblem(p.id, task.build_task_prompt(p), p.answer, p.steps) for p in probs]
    else:
        try:
            rows = read_math_jsonl(cfg.source)[: cfg.train_size]
        except DatasetError as exc:  # the file, line and field of the bad row (a missing file stays an OSError)
            raise TrainingDataError(f"data.source {cfg.source!r}: {exc}") from exc
        out = [TrainProblem(r["id"], build_prompt(r["problem"]), r["answer"], None) for r in rows]
    if not out:
        raise TrainingDataError(f"training data {cfg.source!r} gave no problems; check data.source and data.train_size")
    return out


def verifier_for(cfg: DataConfig) -> Verifier:
    """Exact numeric comparison for the synthetic tasks; math-verify for real math data."""
    return NumericVerifier() if cfg.source in TASKS else MathVerifier()
