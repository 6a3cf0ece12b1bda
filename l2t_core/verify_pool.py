"""Outcome verification in worker processes, beside the reward's policy pass.

math-verify is pure Python (sympy): a check takes milliseconds to seconds of one core, and a step
of a few hundred rollouts verifies for seconds on the trainer's process while its GPU waits.
:class:`VerifierPool` keeps ``workers`` processes (spawned once, reused every step);
:meth:`VerifierPool.submit` returns at once, and the reward pass
(:func:`~l2t_core.rewards.l2t.compute_rewards`) collects the verdicts after its policy forward, so
verification runs beside that forward and on other cores. The verdicts are the verifier's own,
in order (each worker runs ``verifier.verify``, deadline included).

A pool that breaks (a worker killed, out of memory) or stalls (no result within the verifier's
deadline per response, plus a minute) is replaced on the next batch, and the part of the batch it
lost is verified in the trainer's process: no verdict is lost and the step goes on. An exception
the verifier itself raises is raised, as it would be in-process. Workers that still run checks
abandoned past the verifier's deadline are replaced once their batch is in, which stops those
checks; in the trainer's process (``verify_workers: 0``) an abandoned check runs until it ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import time
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from .verify import Verdict, Verifier, abandoned_checks

log = logging.getLogger(__name__)


def _verify_chunk(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
    return [verifier.verify(response, reference) for response, reference in pairs]


def _verify_chunk_in_worker(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> tuple[list[Verdict], int]:
    """:func:`_verify_chunk` in a worker, and how many checks this worker has abandoned past their
    deadline that still run (:func:`~l2t_core.verify.run_with_deadline`: a thread cannot be killed,
    and a check that never ends, a pathological sympy expression, keeps a core busy for good)."""
    return _verify_chunk(verifier, pairs), abandoned_checks()


class PendingVerdicts:
    """Verdicts on their way from the pool (:meth:`VerifierPool.submit`)."""

    def __init__(self, pool: "VerifierPool", chunks: list[list[tuple[str, str]]],
                 futures: list[tuple[Future, ProcessPoolExecutor] | None]):
        self._pool, self._chunks, self._futures = pool, chunks, futures

    def result(self) -> list[Verdict]:
        """Every verdict, in the order submitted; a chunk whose worker died or stalled is verified here."""
        out: list[Verdict] = []
        per_check = float(getattr(self._pool.verifier, "timeout_s", 5.0))
        stuck: dict[int, tuple[ProcessPoolExecutor, int]] = {}
        for chunk, sent in zip(self._chunks, self._futures):
            if sent is not None:
                fut, executor = sent
                try:
                    verdicts, abandoned = fut.result(timeout=per_check * len(chunk) + self._pool.stall_slack_s)
                    out.extend(verdicts)
                    if abandoned:
                        stuck[id(executor)] = executor, max(abandoned, stuck.get(id(executor), (None, 0))[1])
                    continue
                except (BrokenProcessPool, CancelledError, FutureTimeout) as exc:
                    self._pool._broken(exc, executor)
            out.extend(_verify_chunk(self._pool.verifier, chunk))
        for executor, abandoned in stuck.values():  # the batch is in: its workers are idle
            self._pool._recycle(executor, abandoned)
        return out


class VerifierPool:
    """``workers`` spawned processes that run ``verifier.verify`` (which must pickle)."""

    def __init__(self, verifier: Verifier, workers: int, chunks_per_worker: int = 4, stall_slack_s: float = 60.0):
        if workers < 1:
            raise ValueError(f"VerifierPool: workers must be >= 1, got {workers}")
        try:
            pickle.dumps(verifier)
        except Exception as exc:
            raise ValueError(f"VerifierPool: the verifier {type(verifier).__name__} cannot be sent to a worker "
                             f"process ({type(exc).__name__}: {exc}); verify in-process (verify_workers: 0)") from exc
        self.verifier, self.workers, self.chunks_per_worker = verifier, workers, chunks_per_worker
        self.stall_slack_s = stall_slack_s  # beyond the verifier's deadlines, before a chunk counts as stalled
        self._executor: ProcessPoolExecutor | None = None
        self.breaks = 0  # how many times a broken pool was replaced
        self.recycles = 0  # how many times workers with abandoned checks were replaced

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: the trainer's process holds CUDA and torch's thread pools
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._executor

    def _broken(self, exc: BaseException, executor: ProcessPoolExecutor | None) -> None:
        """Replace ``executor`` (the one a failed chunk went to) if it is still the pool's."""
        if executor is not None and executor is self._executor:
            self.breaks += 1
            log.warning("verification worker pool failed (%s%s); verifying the rest of this batch in-process and "
                        "starting a new pool for the next", type(exc).__name__, f": {exc}" if str(exc) else "")
            self._executor = None
            # a stalled (even stopped) worker is not ended by shutdown(); kill them all (they hold no state)
            for proc in list((getattr(executor, "_processes", None) or {}).values()):
                proc.kill()
            executor.shutdown(wait=False, cancel_futures=True)

    def _recycle(self, executor: ProcessPoolExecutor, abandoned: int) -> None:
        """Replace ``executor``, whose workers run checks abandoned past their deadline, if it is
        still the pool's: ending the processes is the only way to stop those threads."""
        if executor is self._executor:
            self.recycles += 1
            log.warning("a verification worker still runs %d check(s) abandoned past the verifier's deadline; "
                        "replacing the workers so they stop", abandoned)
            self._executor = None
            for proc in list((getattr(executor, "_processes", None) or {}).values()):
                proc.kill()
            executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, responses: Sequence[str], references: Sequence[str]) -> PendingVerdicts:
        """Start verifying ``responses`` against ``references``; returns at once."""
        pairs = list(zip(responses, references, strict=True))
        n = min(len(pairs), self.workers * self.chunks_per_worker)
        chunks = [pairs[len(pairs) * k // n: len(pairs) * (k + 1) // n] for k in range(n)] if n else []
        futures: list[tuple[Future, ProcessPoolExecutor] | None] = []
        for chunk in chunks:
            executor = self._get()
            try:
                futures.append((executor.submit(_verify_chunk_in_worker, self.verifier, chunk), executor))
            except BrokenProcessPool as exc:
                self._broken(exc, executor)
                futures.append(None)
        return PendingVerdicts(self, chunks, futures)

    def verify(self, responses: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """Verdicts of every response, in order (:meth:`submit` and wait)."""
        return self.submit(responses, references).result()

    def close(self, grace_s: float = 10.0) -> None:
        """Stop the workers (a pool that is used again starts new ones): each idle worker ends on
        its own; one still running (a hung check, a stopped process) after ``grace_s`` is killed."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        procs = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
