"""How much the L2T reward adds to a training step. Prints one JSON object.

``reward_over_rollout`` = L2T reward time ÷ rollout (generation) time, summed over the measured
steps of a real :class:`~l2t_core.trainer.Trainer` run (method ``l2t``, paper defaults), after one
warm-up step. The reward time covers segmentation, verification, the packed one-pass J of every
episode boundary and the penalty's forward/backward (which also yields log π_old). Target
(issue 3): <= 0.25. The model is a tiny random-init Qwen2 built locally, so responses run to
``max_new_tokens``; the prompts are a synthetic JSONL in a temporary data directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(*, steps: int = 3, prompts: int = 8, group: int = 8, max_new_tokens: int = 192, hidden: int = 128,
        layers: int = 4, threads: int | None = None, seed: int = 0) -> dict:
    from l2t_core.config import TrainConfig
    from l2t_core.models import build_tiny_qwen2, build_tokenizer
    from l2t_core.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="l2t-bench-") as tmp:
        tmp = Path(tmp)
        rows = [{"id": f"p{i}", "problem": f"Add {i} and {i + 3}, then multiply by 2.", "answer": str(2 * (2 * i + 3))}
                for i in range(64)]
        (tmp / "data").mkdir()
        (tmp / "data" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        corpus = [f"<think>\n<episode_1>{r['problem']}</episode_1>\n</think>\n\n\\boxed{{{r['answer']}}}" for r in rows]
        tok = build_tokenizer(corpus * 4, vocab_size=400)
        model = build_tiny_qwen2(len(tok), hidden_size=hidden, num_layers=layers, intermediate_size=hidden * 3, seed=seed)
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        old = os.environ.get("L2T_DATA_DIR")
        os.environ["L2T_DATA_DIR"] = str(tmp / "data")
        try:
            cfg = TrainConfig(policy=str(tmp / "model"), out=str(tmp / "run"), method="l2t", steps=steps + 1,
                              prompts_per_step=prompts, checkpoint_every=10_000, seed=seed,
                              data={"source": "bench.jsonl"}, optim={"lr": 1e-5},
                              rollout={"group_size": group, "max_new_tokens": max_new_tokens, "max_prompt_tokens": 512})
            tr = Trainer(cfg, show_progress=False)
            tr.setup()
            tr.train_step(1)  # warm-up
            rows_out = []
            for s in range(2, steps + 2):
                rows_out.append(tr.train_step(s))
        finally:
            if old is None:
                os.environ.pop("L2T_DATA_DIR", None)
            else:
                os.environ["L2T_DATA_DIR"] = old
    tot = {k: sum(r[k] for r in rows_out) for k in
           ("rollout_time_s", "reward_time_s", "ref_time_s", "update_time_s", "step_time_s",
            "reward_segment_verify_s", "reward_penalty_s", "reward_fitting_s")}
    return {
        "reward_over_rollout": tot["reward_time_s"] / tot["rollout_time_s"],
        "target": 0.25,
        "per_step_s": {k: v / len(rows_out) for k, v in tot.items()},
        "mean_tokens": sum(r["mean_tokens"] for r in rows_out) / len(rows_out),
        "episodes_per_response": sum(r["episodes_per_response"] for r in rows_out) / len(rows_out),
        "rollouts_per_step": prompts * group,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "steps_measured": len(rows_out),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    kw = dict(steps=1, prompts=2, group=4, max_new_tokens=48, hidden=64, layers=2) if args.quick else {}
    out = run(threads=args.threads, **kw)
    out["quick"] = args.quick
    out["seconds"] = time.perf_counter() - t0
    json.dump(out, sys.stdout, indent=1)
    print()
    return out


if __name__ == "__main__":
    main()
