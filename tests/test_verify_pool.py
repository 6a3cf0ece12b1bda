"""Verification in worker processes (l2t_core.verify_pool): the same verdicts as in-process, in
order; a pool that loses a worker loses no verdict."""

import os
import signal
import time

import pytest

from l2t_core.verify import MathVerifier, NumericVerifier, Verdict, run_with_deadline
from l2t_core.verify_pool import POISON_DETAIL, UNPROVEN_DETAIL, VerifierPool

# checks run against short deadlines and workers are killed and counted: alone under make test's two workers
pytestmark = pytest.mark.exclusive

MATH_CASES = [
    ("<think>\nSo it is a half.\n</think>\n\\boxed{\\frac{1}{2}}", "0.5"),
    ("<think>\nok\n</think>\nThe answer is \\boxed{3}", "4"),
    ("<think>\nnever closed", "7"),
    ("", "1"),
    ("<think>\nx\n</think>\n\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("<think>\ny\n</think>\n\\boxed{90^\\circ}", "90"),
    ("<think>\nz\n</think>\n\\boxed{3e8}", "3 \\times 10^{8}"),
    ("no think tags, just 12", "12"),
    ("<think>\nw\n</think>\n\\boxed{5}", ""),
]


def _ended(proc, timeout_s: float = 10.0) -> bool:
    """Whether worker ``proc`` has ended (reaped, or a zombie) within ``timeout_s``. Polled: the
    executor's own thread may reap the process while this one waits on it, and then one
    ``is_alive()`` can answer True once (its waitpid finds no child before the other thread has
    stored the exit code)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.is_alive():
            return True
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:  # gone (FileNotFoundError), or reaped between the open and the read (ESRCH)
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


class SlowVerifier:
    """Numeric verification that takes ``delay_s`` per check (a stand-in for a slow math-verify)."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def verify(self, response: str, reference: str) -> Verdict:
        time.sleep(self.delay_s)
        return NumericVerifier().verify(response, reference)


class HangingVerifier:
    """Numeric verification, except that a check of the response "hang" never ends: it is abandoned
    at the deadline (``run_with_deadline``), as a pathological math-verify expression would be."""

    timeout_s = 0.2

    def verify(self, response: str, reference: str) -> Verdict:
        if response == "hang":
            run_with_deadline(lambda: time.sleep(60), self.timeout_s)
            return Verdict(False, "timeout")
        return NumericVerifier().verify(response, reference)


def _in_worker() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None


class PoisonVerifier:
    """Numeric verification, except that in a worker the response "die" ends the process (as a
    segfault or the OOM killer would) and "hang" holds it for good without a deadline (as a check
    holding the interpreter in C would); ``everything=True``: every check ends its worker. In the
    test's own process (the trainer's) it verifies, but refuses "die" and "hang": a response that
    may have killed a worker must not be verified there. No ``canary``: the pool's canary is a
    response a worker verified, or its weak one."""

    timeout_s = 0.01

    def __init__(self, everything: bool = False):
        self.everything = everything

    def verify(self, response: str, reference: str) -> Verdict:
        if not _in_worker():
            if response in ("die", "hang"):
                raise AssertionError(f"{response!r} verified in the trainer's process")
            return NumericVerifier().verify(response, reference)
        if response == "die" or self.everything:
            os._exit(3)
        if response == "hang":
            time.sleep(3600)
        return NumericVerifier().verify(response, reference)


class BrokenInstallVerifier(PoisonVerifier):
    """In a worker, a check that gets as far as the real verification ends the process (a broken
    install: math-verify crashing on import); a response without a box is answered before that."""

    canary = ("\\boxed{3}", "3")

    def verify(self, response: str, reference: str) -> Verdict:
        if _in_worker() and "boxed" in response:
            os._exit(3)
        return NumericVerifier().verify(response, reference)


class DieThenBrokenVerifier(PoisonVerifier):
    """"die" ends its worker; the third time it does, it breaks the workers for good (every check
    in a worker ends it from then on), so a new worker cannot reproduce the canary."""

    def __init__(self, state_dir):
        super().__init__()
        self.state = str(state_dir)

    def verify(self, response: str, reference: str) -> Verdict:
        if _in_worker():
            broken = os.path.join(self.state, "broken")
            if os.path.exists(broken):
                os._exit(3)
            if response == "die":
                deaths = os.path.join(self.state, "deaths")
                with open(deaths, "a") as f:
                    f.write("x")
                if os.path.getsize(deaths) >= 3:
                    open(broken, "w").close()
                os._exit(3)
        return super().verify(response, reference)


class TimingOutVerifier:
    def verify(self, response: str, reference: str) -> Verdict:
        raise TimeoutError(f"the verifier's own timeout on {response!r}")


class RaisingVerifier:
    def verify(self, response: str, reference: str) -> Verdict:
        raise RuntimeError(f"cannot judge {response!r}")


@pytest.mark.parametrize("verifier", [MathVerifier(), NumericVerifier()], ids=["math", "numeric"])
def test_pool_verdicts_equal_in_process_verdicts_in_order(verifier):
    responses, refs = zip(*(MATH_CASES * 3))
    with VerifierPool(verifier, workers=2) as pool:
        got = pool.verify(responses, refs)
        again = pool.submit(responses[:4], refs[:4]).result()  # the same workers, reused
    assert got == [verifier.verify(r, a) for r, a in zip(responses, refs)]
    assert again == got[:4]
    assert pool.recycles == 0 and pool.breaks == 0
    assert pool._executor is None  # closed on exit
    assert pool.verify([], []) == []


def test_a_dead_worker_loses_no_verdict_and_the_pool_is_replaced():
    n = 24
    responses = [f"\\boxed{{{k}}}" for k in range(n)]
    refs = [str(k if k % 3 else k + 1) for k in range(n)]
    expected = [NumericVerifier().verify(r, a) for r, a in zip(responses, refs)]
    with VerifierPool(SlowVerifier(0.05), workers=2) as pool:
        pending = pool.submit(responses, refs)
        time.sleep(0.5)  # the workers have started and are busy with the first chunks
        os.kill(next(iter(pool._executor._processes)), signal.SIGKILL)
        assert pending.result() == expected
        assert pool.breaks == 1
        assert pool.verify(responses[:6], refs[:6]) == expected[:6]  # a new pool for the next batch
        assert pool.breaks == 1


def test_the_verifiers_own_error_is_raised_not_swallowed():
    with VerifierPool(RaisingVerifier(), workers=1) as pool:
        with pytest.raises(RuntimeError, match="cannot judge"):
            pool.verify(["a", "b"], ["1", "2"])


def test_bad_pools_are_refused_before_any_worker_starts():
    class Local:  # a class defined in a function does not pickle
        def verify(self, response, reference):
            return NumericVerifier().verify(response, reference)

    with pytest.raises(ValueError, match="cannot be sent to a worker process.*verify_workers: 0"):
        VerifierPool(Local(), workers=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        VerifierPool(MathVerifier(), workers=0)
    with pytest.raises(ValueError):  # one reference per response
        VerifierPool(MathVerifier(), workers=1).submit(["a", "b"], ["1"])


def test_reward_pass_with_a_pool_gets_the_same_outcomes(model, tokenizer):
    from l2t_core.config import RewardConfig
    from l2t_core.rewards.l2t import Rollout, compute_rewards

    prompt = tokenizer("What is 7 + 7?", add_special_tokens=False)["input_ids"]
    texts = ["<think>\nStep.\n\nSo 14.\n</think>\n\\boxed{14}", "<think>\nStep, 13.\n</think>\n\\boxed{13}",
             "garbage", "<think>\nunfinished"]
    rollouts = [Rollout(prompt, tokenizer(t, add_special_tokens=False)["input_ids"], t, "14", 0) for t in texts]
    serial = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig())
    with VerifierPool(MathVerifier(), workers=2) as pool:
        pooled = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(), verify_pool=pool)
    assert [x.outcome for x in pooled.responses] == [x.outcome for x in serial.responses] == [1.0, 0.0, 0.0, 0.0]
    assert [x.verdict_status for x in pooled.responses] == [x.verdict_status for x in serial.responses]
    assert [x.advantage for x in pooled.responses] == pytest.approx([x.advantage for x in serial.responses])
    assert pooled.timings["segment_verify_s"] > 0


class TimedSlowVerifier(SlowVerifier):
    timeout_s = 0.01  # the deadline per check the pool's stall limit is built from


def test_stopped_workers_are_replaced_and_their_chunks_verified_again_in_new_workers():
    n = 16
    responses = [f"\\boxed{{{k}}}" for k in range(n)]
    refs = [str(k) for k in range(n)]
    expected = [NumericVerifier().verify(r, a) for r, a in zip(responses, refs)]
    with VerifierPool(TimedSlowVerifier(0.05), workers=2, stall_slack_s=3.0) as pool:
        assert pool.verify(responses[:2], refs[:2]) == expected[:2]  # the workers are up
        stopped = list(pool._executor._processes.values())
        for proc in stopped:  # workers that never answer
            os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        assert pool.verify(responses, refs) == expected
        assert time.perf_counter() - t0 < 30
        assert pool.breaks >= 1  # 1, unless a new worker took over 3 s to start (its chunk is then verified again)
        for proc in stopped:
            assert _ended(proc)  # killed, not left stopped
        assert pool.verify(responses[:4], refs[:4]) == expected[:4]


def test_a_response_that_kills_its_worker_scores_error_and_the_rest_keep_their_verdicts():
    n = 12
    responses = [f"\\boxed{{{k}}}" for k in range(n)]
    refs = [str(k if k % 4 else k + 1) for k in range(n)]
    responses[5] = "die"
    expected = [NumericVerifier().verify(r, a) for r, a in zip(responses, refs)]
    expected[5] = Verdict(False, "error", None, POISON_DETAIL)
    with VerifierPool(PoisonVerifier(), workers=2) as pool:
        assert pool.verify(responses, refs) == expected
        assert (pool.poisoned, pool.unproven, pool.in_process) == (1, 0, 0) and pool.breaks >= 1
        assert pool.verify(responses[:4], refs[:4]) == expected[:4]  # new workers for the next batch


def test_a_response_that_hangs_its_worker_scores_error():
    responses = [f"\\boxed{{{k}}}" for k in range(5)] + ["hang"]
    refs = [str(k) for k in range(6)]
    expected = [NumericVerifier().verify(r, a) for r, a in zip(responses, refs)]
    expected[-1] = Verdict(False, "error", None, POISON_DETAIL)
    with VerifierPool(PoisonVerifier(), workers=2, stall_slack_s=1.0) as pool:
        assert pool.verify(responses, refs) == expected
        assert (pool.poisoned, pool.unproven, pool.in_process) == (1, 0, 0)


@pytest.mark.parametrize("verifier", [PoisonVerifier(everything=True), BrokenInstallVerifier()],
                         ids=["every_check_dies", "real_checks_die"])
def test_workers_that_cannot_verify_at_all_leave_verification_to_the_trainers_process(verifier):
    """Where a fresh worker cannot reproduce the canary's verdict (even where it answers checks
    that stop short of the real verification), the responses are not to blame: none is scored
    ``error``; the pool verifies in this process from then on."""
    responses = [f"\\boxed{{{k}}}" for k in range(6)]
    refs = [str(k % 3) for k in range(6)]
    expected = [NumericVerifier().verify(r, a) for r, a in zip(responses, refs)]
    with VerifierPool(verifier, workers=2) as pool:
        assert pool.verify(responses, refs) == expected
        assert (pool.poisoned, pool.unproven, pool.in_process) == (0, 0, 6) and pool.disabled
        assert pool.verify(responses[:3], refs[:3]) == expected[:3] and pool.in_process == 9
        assert pool._executor is None  # no worker started again


def test_a_response_lost_alone_before_the_workers_broke_scores_error_and_is_not_verified_here(tmp_path):
    """"die" ends its worker in the batch, alone in the new pool, and alone in an isolated worker
    that had answered the canary; after that no worker can verify. It is scored ``error``
    (unproven), not verified in this process; the rest are verified here."""
    responses = [f"\\boxed{{{k}}}" for k in range(8)]
    refs = [str(k) for k in range(8)]
    responses[3] = "die"
    expected = [NumericVerifier().verify(r, a) for r, a in zip(responses, refs)]
    expected[3] = Verdict(False, "error", None, UNPROVEN_DETAIL)
    with VerifierPool(DieThenBrokenVerifier(tmp_path), workers=2) as pool:
        assert pool.verify(responses, refs) == expected
        assert (pool.poisoned, pool.unproven) == (0, 1) and pool.disabled
        assert (tmp_path / "deaths").read_text() == "xxx"


def test_the_verifiers_own_timeout_error_is_raised_not_taken_for_a_stall():
    with VerifierPool(TimingOutVerifier(), workers=1) as pool:
        with pytest.raises(TimeoutError, match="the verifier's own timeout"):
            pool.verify(["a", "b"], ["1", "2"])
        assert pool.breaks == 0


def test_workers_running_abandoned_checks_are_replaced_once_their_batch_is_in():
    """A check past its deadline is abandoned, and its thread would run on in the worker for good;
    the worker is replaced after the batch, which ends that thread with its process."""
    with VerifierPool(HangingVerifier(), workers=1) as pool:
        pending = pool.submit(["hang", "\\boxed{2}"], ["1", "2"])
        workers = list(pool._executor._processes.values())
        assert [v.correct for v in pending.result()] == [False, True]
        assert pool.recycles == 1 and pool._executor is None
        for proc in workers:
            assert _ended(proc)
        assert pool.verify(["\\boxed{3}"], ["3"])[0].correct  # new workers
        assert pool.recycles == 1


def test_close_does_not_wait_forever_for_a_stopped_worker():
    pool = VerifierPool(NumericVerifier(), workers=1)
    assert pool.verify(["\\boxed{1}"], ["1"])[0].correct
    proc = next(iter(pool._executor._processes.values()))
    os.kill(proc.pid, signal.SIGSTOP)
    t0 = time.perf_counter()
    pool.close(grace_s=1.0)
    assert time.perf_counter() - t0 < 30 and pool._executor is None
    assert _ended(proc)


def test_reward_pass_refuses_a_pool_with_another_verifier(model, tokenizer):
    from l2t_core.rewards.l2t import Rollout, compute_rewards

    rollouts = [Rollout([1, 2], [3], "\\boxed{1}", "1", 0)]
    with VerifierPool(MathVerifier(), workers=1) as pool:
        with pytest.raises(ValueError, match="its own verifier"):
            compute_rewards(model, tokenizer, rollouts, "grpo", verifier=NumericVerifier(), verify_pool=pool)
