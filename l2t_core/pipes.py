"""Optional Dagster Pipes reporting for the ``l2t`` entrypoints.

When the Dagster pipeline launches ``python -m l2t_core.cli train --config FILE`` through a Pipes
client (``l2t_pipeline``), the launcher puts ``DAGSTER_PIPES_CONTEXT`` into the environment. Then
:func:`pipes_session` opens the Pipes connection and the entrypoint streams its log lines and the
run's materialization metadata (final step, checkpoint URL, last-step accuracy and tokens, ...)
back to the orchestrator. Launched by hand, the same entrypoint runs standalone: the session is a
no-op and ``dagster_pipes`` is never imported, so ``l2t_core`` keeps no hard Dagster dependency.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from .urls import redact_url

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import RunResult

log = logging.getLogger("l2t.pipes")

# the variable every Dagster Pipes context injector sets (dagster_pipes.DAGSTER_PIPES_CONTEXT_ENV_VAR)
PIPES_CONTEXT_ENV_VAR = "DAGSTER_PIPES_CONTEXT"

# last-step columns of the trainer's train_steps table reported as materialization metadata
STEP_METADATA_COLUMNS = (
    "accuracy", "mean_tokens", "episodes_per_response", "tagged_share", "finished_share", "score_mean", "kl", "loss",
    "grad_norm", "fitting_gain_mean", "penalty_hat_mean", "process_reward_mean", "step_time_s",
)


def launched_by_pipes(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by a Dagster Pipes client."""
    return PIPES_CONTEXT_ENV_VAR in (os.environ if environ is None else environ)


def launch_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank in a ``torchrun``/``deepspeed`` launch (``RANK``; 0 when alone)."""
    raw = (os.environ if environ is None else environ).get("RANK", "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"RANK={raw!r} is not a whole number; it is set by torchrun/deepspeed for each rank") from None


def _clean(value: Any) -> Any:
    """A JSON-safe metadata value (numpy scalars to Python, NaN/inf to None)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class PipesReporter:
    """What an entrypoint reports; every method is a no-op when ``context`` is None (standalone)."""

    def __init__(self, context: Any | None = None):
        self.context = context

    @property
    def active(self) -> bool:
        return self.context is not None

    def log(self, message: str, level: str = "info") -> None:
        """A log line in the orchestrator's run log (and always in this process's own log)."""
        getattr(log, level)(message)
        if self.context is not None:
            getattr(self.context.log, level)(message)

    def report_materialization(self, metadata: Mapping[str, Any]) -> None:
        """Materialization metadata of the asset the orchestrator launched this process for.
        ``None`` values are dropped (Pipes metadata has no null type)."""
        if self.context is None:
            return
        clean = {k: _clean(v) for k, v in metadata.items()}
        self.context.report_asset_materialization(metadata={k: v for k, v in clean.items() if v is not None})

    def report_custom(self, payload: Any) -> None:
        """Any JSON-serialisable payload, read by the orchestrator with ``get_custom_messages()``."""
        if self.context is not None:
            self.context.report_custom_message(payload)


@contextmanager
def pipes_session(environ: Mapping[str, str] | None = None) -> Iterator[PipesReporter]:
    """A :class:`PipesReporter` connected to Dagster when launched by Pipes, else a standalone one.

    Under Pipes an exception raised inside the block is reported to the orchestrator (the
    ``dagster_pipes`` context does that when it closes) and then propagates. In a multi-process
    launch only rank 0 talks to the orchestrator (one report, one message stream); the other ranks
    get a standalone reporter.
    """
    if not launched_by_pipes(environ) or launch_rank(environ) != 0:
        yield PipesReporter(None)
        return
    try:
        from dagster_pipes import open_dagster_pipes
    except ImportError as exc:
        raise RuntimeError(
            f"{PIPES_CONTEXT_ENV_VAR} is set, so this process was launched by Dagster Pipes, but the "
            "'dagster-pipes' package is not installed; install the project's 'pipeline' extra"
        ) from exc
    line_buffered_stderr()
    with open_dagster_pipes() as context:
        yield PipesReporter(context)


def line_buffered_stderr() -> None:
    """Make ``sys.stderr`` line-buffered where it writes through (``PYTHONUNBUFFERED``, as the
    training image sets): Dagster Pipes writes each message and its newline as two calls, which
    write-through makes two writes, and in a multi-rank pod another rank's log line on the same
    stderr could land between them and lose the message. Line-buffered, a message of up to 8 KiB
    leaves in one write."""
    stderr = sys.stderr
    if getattr(stderr, "write_through", False) and hasattr(stderr, "reconfigure"):
        stderr.reconfigure(write_through=False, line_buffering=True)


def train_metadata(result: "RunResult", latest_checkpoint: str | None = None) -> dict[str, Any]:
    """Materialization metadata of a finished training run: where it is, how far it got, and the
    last step's metrics (``STEP_METADATA_COLUMNS`` that the run's train_steps table has)."""
    checkpoint = result.checkpoint or latest_checkpoint
    meta: dict[str, Any] = {
        "run_url": redact_url(result.out),
        "final_step": int(result.final_step),
        "checkpoint": redact_url(checkpoint) if checkpoint else None,
        "logged_steps": int(len(result.steps)),
    }
    if len(result.steps):
        last = result.steps.sort_values("step").iloc[-1]
        meta["run_id"] = str(last.get("run_id", ""))
        for col in STEP_METADATA_COLUMNS:
            if col in last.index:
                meta[f"last_{col}"] = _clean(last[col])
    return meta


def step_line(row: Mapping[str, Any]) -> str:
    """One human-readable line for a step's metrics row (accuracy, tokens, KL, time)."""
    nan = float("nan")
    return (f"step {int(row['step'])}: accuracy {row.get('accuracy', nan):.3f}, "
            f"mean tokens {row.get('mean_tokens', nan):.1f}, kl {row.get('kl', nan):.4f}, "
            f"{row.get('step_time_s', nan):.1f}s")


def step_lines(result: "RunResult", skip: Iterable[int] = ()) -> list[str]:
    """One line per logged step of a finished run, except the steps in ``skip`` (already reported)."""
    done = set(skip)
    rows = result.steps.sort_values("step").iterrows() if len(result.steps) else []
    return [step_line(row) for _, row in rows if int(row["step"]) not in done]
