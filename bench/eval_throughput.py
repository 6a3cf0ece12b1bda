"""Throughput of the evaluation suite (issue 4). Prints one JSON object.

* ``verifications_per_s``: MATH500 responses ``\\boxed{gold}`` verified against their gold
  answers (math-verify), in a process pool over all cores (``--workers``, default: every core).
* ``problems_per_s``: problems evaluated per second by :func:`l2t_core.eval.runner.evaluate_math`
  with the ``hf`` engine, a tiny random-init Qwen2 built locally, ``--samples`` (20) samples per
  problem and ``--max-new-tokens`` tokens at most; sampling, verification and summaries included.

The data directory is ``L2T_DATA_DIR`` (``../shared/data`` under ``make``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

from ._common import emit, log, torch_threads


def run(*, problems: int = 500, eval_problems: int = 8, samples: int = 20, max_new_tokens: int = 64,
        workers: int | None = None, threads: int | None = 1) -> dict:
    from l2t_core.eval.datasets import load_benchmark
    from l2t_core.eval.runner import EvalSettings, evaluate_math, verify_all
    from l2t_core.models import build_tiny_qwen2, build_tokenizer, load_policy
    from l2t_core.prompts import build_prompt
    from l2t_core.rollout.hf import HFRolloutEngine

    workers = workers or os.cpu_count() or 1
    items = load_benchmark("math500", limit=problems)
    texts = [f"<think>\nDone.\n</think>\n\n\\boxed{{{i.answer}}}" for i in items]
    t0 = time.perf_counter()
    verdicts = verify_all(texts, [i.accepted_answers for i in items], workers=workers)
    verify_s = time.perf_counter() - t0
    ok = sum(v.correct for v in verdicts)
    log(f"verified {len(items)} gold answers in {verify_s:.1f}s ({ok} correct)", "eval_throughput")

    with tempfile.TemporaryDirectory() as tmp, torch_threads(threads) as n_threads:
        corpus = [build_prompt(i.problem) for i in items[:64]] + texts[:64]
        tok = build_tokenizer(corpus, vocab_size=512)
        build_tiny_qwen2(len(tok), hidden_size=128, num_layers=4, intermediate_size=384, seed=0).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model, tok = load_policy(tmp)
        sub = items[:eval_problems]
        settings = EvalSettings(n=samples, max_new_tokens=max_new_tokens, prompts_per_call=eval_problems,
                                verify_workers=workers)
        t0 = time.perf_counter()
        res = evaluate_math(HFRolloutEngine(model, tok), tok, sub, settings)
        eval_s = time.perf_counter() - t0
    return {
        "verifications_per_s": len(items) / verify_s,
        "gold_verified_correct": ok / len(items),
        "problems_per_s": len(sub) / eval_s,
        "samples_per_s": len(sub) * samples / eval_s,
        "eval_generation_s": res.summary["generation_s"],
        "eval_verification_s": res.summary["verification_s"],
        "eval_mean_tokens": res.summary["mean_tokens"],
        "problems": len(items), "eval_problems": len(sub), "samples": samples, "max_new_tokens": max_new_tokens,
        "workers": workers, "threads": n_threads,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--eval-problems", type=int, default=8)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a few problems, for tests")
    a = ap.parse_args(argv)
    if a.quick:
        a.problems, a.eval_problems, a.samples, a.max_new_tokens = 24, 2, 2, 8
    with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter (e.g. DeepSpeed's accelerator line)
        res = run(problems=a.problems, eval_problems=a.eval_problems, samples=a.samples,
                  max_new_tokens=a.max_new_tokens, workers=a.workers, threads=a.threads)
    return emit(res)


if __name__ == "__main__":
    main()
