"""Training prompts for a run: a synthetic task (``walk`` or ``arithmetic``) or a math JSONL file:
a path (``./my.jsonl``, ``/data/x.jsonl``) where it is, a bare name in the data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .data import data_dir, data_file, read_math_file
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


def source_path(source: str) -> Path:
    """The JSONL file of a ``data.source`` that is no synthetic task. A path that says where it is
    (``./my.jsonl``, ``../x.jsonl``, ``/data/x.jsonl``, ``~/x.jsonl``) is read there. Any other name
    (``math500.jsonl``, ``sub/x.jsonl``) is looked up in the data directory
    (:func:`~l2t_core.data.data_file`), as it always was, and only where it is not there relative to
    the working directory: a file in the working directory never shadows the data directory's.
    FileNotFoundError, naming where it looked, when there is no such file."""
    path = Path(source).expanduser()
    if source.startswith(("./", "../", "/", "~")):
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        return path
    in_data = data_dir() / source
    if in_data.is_file():
        return in_data
    if path.is_file():
        return path
    if path.name == source:
        return data_file(source)  # its message names the data directory and L2T_DATA_DIR
    raise FileNotFoundError(f"no file at {in_data} (the data directory, L2T_DATA_DIR) nor at {path}")


def load_training_problems(cfg: DataConfig) -> list[TrainProblem]:
    """The run's training problems; fails with a clear message on an empty or unreadable source."""
    if cfg.source in TASKS:
        task = get_task(cfg.source)
        probs = task.dataset(cfg.train_size, cfg.min_steps, cfg.max_steps, seed=cfg.seed)
        out = [TrainProblem(p.id, task.build_task_prompt(p), p.answer, p.steps) for p in probs]
    else:
        try:
            rows = read_math_file(source_path(cfg.source))[: cfg.train_size]
        except DatasetError as exc:  # the file, line and field of the bad row
            raise TrainingDataError(f"data.source {cfg.source!r}: {exc}") from exc
        except FileNotFoundError as exc:
            raise TrainingDataError(
                f"data.source {cfg.source!r} is neither a synthetic task ({', '.join(TASKS)}) nor a file: {exc}") from None
        out = [TrainProblem(r["id"], build_prompt(r["problem"]), r["answer"], None) for r in rows]
    if not out:
        raise TrainingDataError(f"training data {cfg.source!r} gave no problems; check data.source and data.train_size")
    return out


def verifier_for(cfg: DataConfig) -> Verifier:
    """Exact numeric comparison for the synthetic tasks; math-verify for real math data."""
    return NumericVerifier() if cfg.source in TASKS else MathVerifier()
