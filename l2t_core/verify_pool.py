"""Outcome verification in worker processes, beside the reward's policy pass.

math-verify is pure Python (sympy): a check takes milliseconds to seconds of one core, and a step
of a few hundred rollouts verifies for seconds on the trainer's process while its GPU waits.
:class:`VerifierPool` keeps ``workers`` processes (spawned once, reused every step);
:meth:`VerifierPool.submit` returns at once, and the reward pass
(:func:`~l2t_core.rewards.l2t.compute_rewards`) collects the verdicts after its policy forward, so
verification runs beside that forward and on other cores. The verdicts are the verifier's own,
in order (each worker runs ``verifier.verify``, deadline included).

A pool that breaks (a worker killed, out of memory) or stalls (no result within the verifier's
deadline per response, plus a minute) is replaced, and the responses it lost are verified again in
new workers, not in the trainer's process, where the response that killed a worker would kill or
hang the trainer (and on resume the same rollouts would do it again):

1. each lost response alone, in parallel, in the new pool; most losses (a worker killed from
   outside) end here with the verdicts the lost chunk would have given;
2. the responses lost again, one at a time in a one-worker process. Each such worker first shows
   it can verify: it must reproduce a known verdict (the canary: the verifier's own ``canary``
   pair, such as :attr:`~l2t_core.verify.MathVerifier.canary`, which runs math-verify, else a
   response a worker judged before) within a start-up allowance, so here a response's stall
   clock never counts a worker's start (in step 1 it may: a response lost that way comes here).
   A response that ends or stalls two such workers is scored incorrect with status ``error``
   (:data:`POISON_DETAIL`): a response that kills its verifier is not credited, and the step
   goes on.

Where :data:`CANARY_TRIES` new workers in a row cannot reproduce the canary, the workers cannot
verify at all (a broken install, a machine out of memory), which explains the losses better than
the responses do: the pool stops using workers for good (:attr:`VerifierPool.disabled`, logged
with the reason) and verifies in the trainer's process from then on, the rest of this batch
included, except a response just lost alone in a worker that could verify, which is scored
``error`` (:data:`UNPROVEN_DETAIL`) rather than risked there.

Every verdict is the verifier's own, or ``error`` for a response that killed or stalled its
verifier. An exception the verifier itself raises (a ``TimeoutError`` included) is raised, as it
would be in-process. Workers that still run checks abandoned past the verifier's deadline are
replaced once their batch is in, which stops those checks; in the trainer's process
(``verify_workers: 0``) an abandoned check runs until it ends.
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

POISON_DETAIL = "the verification worker ended or stalled on this response twice (a healthy worker answered between)"
UNPROVEN_DETAIL = ("a verification worker ended or stalled on this response, and no new worker could verify; "
                   "not verified in the trainer's process")
WEAK_CANARY = ("", "0")  # for a verifier without a canary that has verified nothing in a worker yet
CANARY_TRIES = 3  # new workers that must fail the canary before the pool stops using workers
# verdicts that judge the answer, the same in every run: a canary's (a timeout or an error is not)
_REPRODUCIBLE = ("correct", "incorrect", "no_answer", "invalid_reference")


class _Lost(Exception):
    """A check's worker ended or stalled (not an error of the verifier)."""


def _wait(fut: Future, timeout_s: float):
    """``fut``'s result; :class:`_Lost` where its worker ended or did not answer within
    ``timeout_s``. The verifier's own exceptions pass through: a ``TimeoutError`` raised by the
    check itself is the same class as the wait's own, told apart by the future being done."""
    try:
        return fut.result(timeout=timeout_s)
    except (BrokenProcessPool, CancelledError) as exc:
        raise _Lost(exc) from exc
    except FutureTimeout as exc:
        if fut.done():  # the check's own TimeoutError, or an answer just after the deadline
            return fut.result()
        raise _Lost(exc) from exc


class _CannotVerify(Exception):
    """No new worker could reproduce the canary's verdict (the message says why)."""


def _verify_chunk(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
    return [verifier.verify(response, reference) for response, reference in pairs]


def _verify_chunk_in_worker(verifier: Verifier, pairs: Sequence[tuple[str, str]]) -> tuple[list[Verdict], int]:
    """:func:`_verify_chunk` in a worker, and how many checks this worker has abandoned past their
    deadline that still run (:func:`~l2t_core.verify.run_with_deadline`: a thread cannot be killed,
    and a check that never ends, a pathological sympy expression, keeps a core busy for good)."""
    return _verify_chunk(verifier, pairs), abandoned_checks()


def _spawn(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the trainer's process holds CUDA and torch's thread pools
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _kill(executor: ProcessPoolExecutor) -> None:
    """End ``executor``'s workers now: a stalled (even stopped) worker is not ended by
    ``shutdown()``, and they hold no state."""
    for proc in list((getattr(executor, "_processes", None) or {}).values()):
        proc.kill()
    executor.shutdown(wait=False, cancel_futures=True)


class PendingVerdicts:
    """Verdicts on their way from the pool (:meth:`VerifierPool.submit`)."""

    def __init__(self, pool: "VerifierPool", chunks: list[list[tuple[str, str]]],
                 futures: list[tuple[Future, ProcessPoolExecutor] | None]):
        self._pool, self._chunks, self._futures = pool, chunks, futures

    def result(self) -> list[Verdict]:
        """Every verdict, in the order submitted; the responses of a chunk whose worker died or
        stalled are verified again in new workers (the module's docstring)."""
        out: list[Verdict | None] = []
        lost: list[int] = []
        per_check = self._pool.per_check_s
        stuck: dict[int, tuple[ProcessPoolExecutor, int]] = {}
        for chunk, sent in zip(self._chunks, self._futures):
            if sent is not None:
                fut, executor = sent
                try:
                    verdicts, abandoned = _wait(fut, per_check * len(chunk) + self._pool.stall_slack_s)
                except _Lost as lost_with:
                    self._pool._broken(lost_with.__cause__, executor)
                else:
                    out.extend(verdicts)
                    self._pool._remember(chunk[0], verdicts[0])
                    if abandoned:
                        stuck[id(executor)] = executor, max(abandoned, stuck.get(id(executor), (None, 0))[1])
                    continue
            lost.extend(range(len(out), len(out) + len(chunk)))
            out.extend([None] * len(chunk))
        for executor, abandoned in stuck.values():  # the batch is in: its workers are idle
            self._pool._recycle(executor, abandoned)
        if lost:
            pairs = [pair for chunk in self._chunks for pair in chunk]
            for i, verdict in self._pool._recover({i: pairs[i] for i in lost}).items():
                out[i] = verdict
        return out  # type: ignore[return-value]


class VerifierPool:
    """``workers`` spawned processes that run ``verifier.verify`` (which must pickle). One thread
    submits and collects (the trainer's reward pass, an evaluation): it holds no lock."""

    def __init__(self, verifier: Verifier, workers: int, chunks_per_worker: int = 4, stall_slack_s: float = 60.0,
                 start_timeout_s: float = 120.0):
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
        self.start_timeout_s = start_timeout_s  # for a fresh worker to start and answer the canary
        self.poisoned = 0  # responses scored ``error``: they ended or stalled two healthy workers
        self.unproven = 0  # responses scored ``error``: lost alone with a worker, and no worker could verify after
        self.in_process = 0  # responses verified in this process because no worker could verify at all
        self.disabled: str | None = None  # why the pool stopped using workers (they could not verify)
        self._known: tuple[tuple[str, str], Verdict] | None = None  # a pair a worker verified, and its verdict
        self._canary_expected: Verdict | None = None

    @property
    def per_check_s(self) -> float:
        """The verifier's deadline per check (5 s where it has none), from which stalls are judged."""
        return float(getattr(self.verifier, "timeout_s", 5.0))

    def _get(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = _spawn(self.workers)
        return self._executor

    def _remember(self, pair: tuple[str, str], verdict: Verdict) -> None:
        """Keep the first pair a worker judged (no timeout or error, which need not recur), with its
        verdict: a canary for a verifier without one."""
        if self._known is None and verdict.status in _REPRODUCIBLE:
            self._known = (pair, verdict)

    def _canary(self) -> tuple[tuple[str, str], Verdict]:
        """A pair and the verdict a healthy worker must give it: the verifier's ``canary`` (its
        verdict taken here once: a fixed check its author chose, safe in any process), else a pair a
        worker verified before, else :data:`WEAK_CANARY` (which proves little more than a live worker)."""
        own = getattr(self.verifier, "canary", None)
        if own is None and self._known is not None:
            return self._known
        pair = tuple(own) if own is not None else WEAK_CANARY
        expected = self._canary_expected or self.verifier.verify(*pair)
        if expected.status in _REPRODUCIBLE:  # a timeout here (a loaded trainer) is asked again next time
            self._canary_expected = expected
        return pair, expected  # type: ignore[return-value]

    def _in_process(self, lost: dict[int, tuple[str, str]]) -> dict[int, Verdict]:
        self.in_process += len(lost)
        return dict(zip(lost, _verify_chunk(self.verifier, list(lost.values()))))

    def _recover(self, lost: dict[int, tuple[str, str]]) -> dict[int, Verdict]:
        """Verdicts of the responses a broken or stalled pool lost (the module's docstring, steps 1-2)."""
        if self.disabled:
            return self._in_process(lost)
        log.warning("verifying the %d response(s) the failed pool lost again, each alone in new workers", len(lost))
        out: dict[int, Verdict] = {}
        executor = self._get()
        sent: dict[int, Future] = {}
        for i, pair in lost.items():
            try:
                sent[i] = executor.submit(_verify_chunk_in_worker, self.verifier, [pair])
            except BrokenProcessPool as exc:
                self._broken(exc, executor)
                break
        abandoned = 0
        for i, fut in sent.items():
            try:
                verdicts, left = _wait(fut, self.per_check_s + self.stall_slack_s)
            except _Lost as lost_with:
                self._broken(lost_with.__cause__, executor)
                continue
            out[i], abandoned = verdicts[0], max(abandoned, left)
            self._remember(lost[i], verdicts[0])
        if abandoned:
            self._recycle(executor, abandoned)
        again = {i: pair for i, pair in lost.items() if i not in out}
        if again:
            out.update(self._isolate(again))
        return out

    def _isolate(self, lost: dict[int, tuple[str, str]]) -> dict[int, Verdict]:
        """Step 2: each response alone in a one-worker process that has reproduced the canary's
        verdict, tried in two such workers before it is scored ``error``."""
        log.warning("verifying %d response(s) one at a time in an isolated worker: one of them ended or stalled "
                    "the verification workers", len(lost))
        out: dict[int, Verdict] = {}
        worker: ProcessPoolExecutor | None = None

        def fresh_worker() -> ProcessPoolExecutor:
            """A new one-worker process that reproduces the canary's verdict within the start-up
            allowance; :class:`_CannotVerify` after :data:`CANARY_TRIES` new workers did not."""
            nonlocal worker
            why = ""
            for _ in range(CANARY_TRIES):
                if worker is not None:
                    _kill(worker)
                worker = _spawn(1)
                pair, expected = self._canary()
                try:
                    verdicts, abandoned = _wait(worker.submit(_verify_chunk_in_worker, self.verifier, [pair]),
                                                self.start_timeout_s + self.per_check_s)
                except _Lost as exc:
                    why = f"it ended or did not answer within {self.start_timeout_s + self.per_check_s:g} s " \
                          f"({type(exc.__cause__).__name__})"
                    continue
                except Exception as exc:  # noqa: BLE001 - failing the canary in any way: it cannot verify
                    why = f"{type(exc).__name__}: {exc}"
                    continue
                if verdicts[0] == expected and not abandoned:
                    return worker
                why = f"it gave {verdicts[0]} where {expected} was expected"
            _kill(worker)
            worker = None
            raise _CannotVerify(why)

        def attempt(pair: tuple[str, str]) -> Verdict | None:
            """The verdict of ``pair`` in a worker that can verify, or None if the worker ended or
            stalled on it."""
            nonlocal worker
            current = worker or fresh_worker()
            try:
                fut = current.submit(_verify_chunk_in_worker, self.verifier, [pair])
            except BrokenProcessPool:  # it ended after its last answer, before this check: not this response's doing
                current = fresh_worker()
                try:
                    fut = current.submit(_verify_chunk_in_worker, self.verifier, [pair])
                except BrokenProcessPool:
                    raise _CannotVerify("a new worker that reproduced the canary ended before it took a check") from None
            try:
                verdicts, abandoned = _wait(fut, self.per_check_s + self.stall_slack_s)
            except _Lost:
                _kill(current)
                worker = None
                return None
            if abandoned:  # a check past its deadline runs on in that worker: end it before the next
                _kill(current)
                worker = None
            return verdicts[0]

        try:
            items = list(lost.items())
            for k, (i, pair) in enumerate(items):
                lost_alone = False
                try:
                    verdict = attempt(pair)
                    if verdict is None:  # lost alone: once more, in a new worker that can verify
                        lost_alone = True
                        verdict = attempt(pair)
                except _CannotVerify as exc:
                    self._give_up(str(exc), out, i if lost_alone else None, items[k + 1:] if lost_alone else items[k:])
                    break
                if verdict is None:
                    self.poisoned += 1
                    log.warning("response %d of the batch ended or stalled two verification workers: scored incorrect "
                                "with status 'error' (first 200 characters: %r)", i, pair[0][:200])
                    verdict = Verdict(False, "error", None, POISON_DETAIL)
                out[i] = verdict
            return out
        finally:
            if worker is not None:
                _kill(worker)

    def _give_up(self, why: str, out: dict[int, Verdict], suspect: int | None,
                 rest: list[tuple[int, tuple[str, str]]]) -> None:
        """No new worker can verify: stop using workers; ``suspect`` (lost alone in a worker that
        could verify) is scored ``error``, ``rest`` verified in this process."""
        self.disabled = f"{CANARY_TRIES} new verification workers could not reproduce the canary's verdict (last: {why})"
        log.error("%s; verifying in this process from now on (the rest of this batch: %d response(s))",
                  self.disabled, len(rest))
        if suspect is not None:
            self.unproven += 1
            out[suspect] = Verdict(False, "error", None, UNPROVEN_DETAIL)
        out.update(self._in_process(dict(rest)))

    def _broken(self, exc: BaseException, executor: ProcessPoolExecutor | None) -> None:
        """Replace ``executor`` (the one a failed chunk went to) if it is still the pool's."""
        if executor is not None and executor is self._executor:
            self.breaks += 1
            log.warning("verification worker pool failed (%s%s); replacing it", type(exc).__name__,
                        f": {exc}" if str(exc) else "")
            self._executor = None
            _kill(executor)

    def _recycle(self, executor: ProcessPoolExecutor, abandoned: int) -> None:
        """Replace ``executor``, whose workers run checks abandoned past their deadline, if it is
        still the pool's: ending the processes is the only way to stop those threads."""
        if executor is self._executor:
            self.recycles += 1
            log.warning("a verification worker still runs %d check(s) abandoned past the verifier's deadline; "
                        "replacing the workers so they stop", abandoned)
            self._executor = None
            _kill(executor)

    def submit(self, responses: Sequence[str], references: Sequence[str]) -> PendingVerdicts:
        """Start verifying ``responses`` against ``references``; returns at once."""
        pairs = list(zip(responses, references, strict=True))
        n = min(len(pairs), self.workers * self.chunks_per_worker)
        chunks = [pairs[len(pairs) * k // n: len(pairs) * (k + 1) // n] for k in range(n)] if n else []
        futures: list[tuple[Future, ProcessPoolExecutor] | None] = []
        for chunk in chunks:
            if self.disabled:  # verified in this process when collected
                futures.append(None)
                continue
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
