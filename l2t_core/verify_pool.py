"""Outcome verification in worker processes, beside the reward's policy pass.

math-verify is pure Python (sympy): a check takes milliseconds to seconds of one core, and a step
of a few hundred rollouts verifies for seconds on the trainer's process while its GPU waits.
:class:`VerifierPool` keeps ``workers`` processes (spawned once, reused every step);
:meth:`VerifierPool.submit` returns at once, and the reward pass
(:func:`~l2t_core.rewards.l2t.compute_rewards`) collects the verdicts after its policy forward, so
verification runs beside that forward and on other cores. The verdicts are the verifier's own,
in order (each worker runs ``verifier.verify``, deadline included).

A pool that breaks (a worker killed, out of memory) is replaced on the next batch, and the part of
the batch it lost is verified in the trainer's process: no verdict is lost and the step goes on.
An exception the verifier itself raises is raised, as it would be in-process.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from .verify import Verdict, Verifier

log = logging.getLogger(__name__)


def _verify_chunk(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
    return [verifier.verify(response, reference) for response, reference in pairs]


class PendingVerdicts:
    """Verdicts on their way from the pool (:meth:`VerifierPool.submit`)."""

    def __init__(self, pool: "VerifierPool", chunks: list[list[tuple[str, str]]], futures: list[Future | None]):
        self._pool, self._chunks, self._futures = pool, chunks, futures

    def result(self) -> list[Verdict]:
        """Every verdict, in the order submitted; a chunk whose worker died is verified here."""
        out: list[Verdict] = []
        for chunk, fut in zip(self._chunks, self._futures):
            if fut is not None:
                try:
                    out.extend(fut.result())
                    continue
                except BrokenProcessPool as exc:
                    self._pool._broken(exc)
            out.extend(_verify_chunk(self._pool.verifier, chunk))
        return out


class VerifierPool:
    """``workers`` spawned processes that run ``verifier.verify`` (which must pickle)."""

    def __init__(self, verifier: Verifier, workers: int, chunks_per_worker: int = 4):
        if workers < 1:
            raise ValueError(f"VerifierPool: workers must be >= 1, got {workers}")
        try:
            pickle.dumps(verifier)
        except Exception as exc:
            raise ValueError(f"VerifierPool: the verifier {type(verifier).__name__} cannot be sent to a worker "
                             f"process ({type(exc).__name__}: {exc}); verify in-process (verify_workers: 0)") from exc
        self.verifier, self.workers, self.chunks_per_worker = verifier, workers, chunks_per_worker
        self._executor: ProcessPoolExecutor | None = None
        self.breaks = 0  # how many times a broken pool was replaced

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: the trainer's process holds CUDA and torch's thread pools
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._executor

    def _broken(self, exc: BaseException) -> None:
        if self._executor is not None:
            self.breaks += 1
            log.warning("verification worker pool broke (%s: %s); verifying this batch's rest in-process and "
                        "starting a new pool for the next", type(exc).__name__, exc)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def submit(self, responses: Sequence[str], references: Sequence[str]) -> PendingVerdicts:
        """Start verifying ``responses`` against ``references``; returns at once."""
        pairs = list(zip(responses, references, strict=True))
        n = min(len(pairs), self.workers * self.chunks_per_worker)
        chunks = [pairs[len(pairs) * k // n: len(pairs) * (k + 1) // n] for k in range(n)] if n else []
        futures: list[Future | None] = []
        for chunk in chunks:
            try:
                futures.append(self._get().submit(_verify_chunk, self.verifier, chunk))
            except BrokenProcessPool as exc:
                self._broken(exc)
                futures.append(None)
        return PendingVerdicts(self, chunks, futures)

    def verify(self, responses: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """Verdicts of every response, in order (:meth:`submit` and wait)."""
        return self.submit(responses, references).result()

    def close(self) -> None:
        """Stop the workers (a pool that is used again starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
