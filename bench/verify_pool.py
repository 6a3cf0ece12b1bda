"""Outcome verification in worker processes against in-process. Prints one JSON object.

The responses are MATH500's worked solutions written as a model would answer (the solution in a
think block, its last boxed answer after it), judged against their own gold answers and, to have
wrong answers too, against the next row's gold (``../shared/data/math500.jsonl``, through
``L2T_DATA_DIR``). ``in_process_s`` is :class:`~l2t_core.verify.MathVerifier` one response after
another, as the reward pass does with ``verify_workers: 0``; ``pool_s`` is
:class:`~l2t_core.verify_pool.VerifierPool` with ``--workers`` processes, started (and warmed on a
first batch) beforehand, as the trainer's pool is by its second step. ``speedup`` is their
ratio; ``same_verdicts`` checks that the pool judged every response alike. On a GPU node the
pool's work also runs beside the reward's policy pass, which this CPU-only bench does not show.
"""

from __future__ import annotations

import argparse
import time

from ._common import log, run_and_emit


def _responses(n: int) -> tuple[list[str], list[str]]:
    from l2t_core.data import data_dir, read_math_file
    from l2t_core.verify import extract_boxed

    rows = [r for r in read_math_file(data_dir() / "math500.jsonl") if r.get("solution")]
    if not rows:
        raise SystemExit("bench.verify_pool: math500.jsonl has no solutions; point L2T_DATA_DIR at ../shared/data")
    responses, refs = [], []
    for k in range(n):
        row, other = rows[k % len(rows)], rows[(k + 1) % len(rows)]
        boxed = extract_boxed(row["solution"]) or row["answer"]
        responses.append(f"<think>\n{row['solution']}\n</think>\nThe answer is $\\boxed{{{boxed}}}$.")
        refs.append(row["answer"] if k % 2 == 0 else other["answer"])
    return responses, refs


def run(*, n: int = 512, workers: int = 2) -> dict:
    from l2t_core.verify import MathVerifier
    from l2t_core.verify_pool import VerifierPool

    responses, refs = _responses(n)
    verifier = MathVerifier()
    verifier.verify(responses[0], refs[0])  # math-verify's imports, out of the timing
    t0 = time.perf_counter()
    serial = [verifier.verify(r, a) for r, a in zip(responses, refs)]
    in_process_s = time.perf_counter() - t0
    log(f"in-process: {n} responses in {in_process_s:.2f}s", "verify_pool")
    with VerifierPool(verifier, workers) as pool:
        t0 = time.perf_counter()
        pool.verify(responses[: 4 * workers], refs[: 4 * workers])  # the workers start and import
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pooled = pool.verify(responses, refs)
        pool_s = time.perf_counter() - t0
    log(f"pool of {workers}: {pool_s:.2f}s (start {start_s:.2f}s)", "verify_pool")
    return {
        "speedup": in_process_s / pool_s,
        "in_process_s": in_process_s,
        "pool_s": pool_s,
        "pool_start_s": start_s,
        "workers": workers,
        "responses": n,
        "correct_share": sum(v.correct for v in serial) / n,
        "same_verdicts": pooled == serial,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    ap.add_argument("-n", type=int, default=512, help="responses to verify")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    return run_and_emit(run, quick=args.quick, n=24 if args.quick else args.n, workers=args.workers)


if __name__ == "__main__":
    main()
