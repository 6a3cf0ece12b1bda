"""`make demo-core`: the core L2T reward path on the embedded default, end to end on a CPU
(`make demo` is the Dagster lineage, :mod:`l2t_pipeline.demo`).

1. Warm-starts the embedded default (:func:`~l2t_core.warmstart.warm_start`): the synthetic
   digit-walk task (:mod:`l2t_core.tasks.walk`), a character tokenizer and a tiny Qwen2, SFT on episode-tagged traces with
   useful (hard-step) and redundant re-checks, and a greedy held-out evaluation per level.
2. Saves the model with ``save_pretrained`` and reloads it with ``from_pretrained``.
3. Samples a group of responses per held-out prompt and scores every group with each method
   (grpo, length_penalty, mrt, l2t, ...): segmentation, outcome, per-episode fitting gain G_k,
   normalised compression penalty P̂_k, episode reward R_k, response score and advantage.
4. Writes ``rewards.json`` (every response with its per-episode rewards), ``config.json`` and
   ``summary.json`` under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .atomic_files import write_text_atomic
from .config import RewardConfig
from .models import load_policy
from .rewards.l2t import METHODS, Rollout, compute_rewards
from .rollout import SamplingParams
from .rollout.hf import HFRolloutEngine
from .verify import NumericVerifier
from .warmstart import WarmStartConfig, held_out, warm_start

log = logging.getLogger("l2t.demo")
console = Console()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output directory")
    ap.add_argument("--sft-steps", type=int, default=WarmStartConfig.model_fields["sft_steps"].default)
    ap.add_argument("--groups", type=int, default=4, help="held-out prompts to score")
    ap.add_argument("--group-size", type=int, default=6, help="responses sampled per prompt (G)")
    ap.add_argument("--eval-problems", type=int, default=120, help="held-out problems for the greedy evaluation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    ws = WarmStartConfig(sft_steps=args.sft_steps, seed=args.seed, eval_per_level=max(1, args.eval_problems // 6))
    ckpt = out / "sft"
    warm_start(ckpt, ws)
    model, tok = load_policy(ckpt)
    log.info("saved and reloaded the SFT checkpoint from %s", ckpt)
    report = json.loads((ckpt / "warmstart.json").read_text())
    acc, mean_tok = report["accuracy"], report["mean_tokens"]
    losses = [report["final_loss"]]
    log.info("greedy held-out accuracy %.3f, mean response tokens %.1f", acc, mean_tok)
    verifier = NumericVerifier()
    scored = held_out(levels=(3,), per_level=args.groups, seed=args.seed + 10_000, task=ws.task)
    prompts = [ws.task_module().build_task_prompt(p) for p in scored]
    engine = HFRolloutEngine(model, tok)
    groups = engine.generate([tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
                             SamplingParams(n=args.group_size, temperature=1.0, max_new_tokens=240, seed=args.seed))
    rollouts = [Rollout(c.prompt_ids, c.response_ids, c.text, scored[g].answer, g)
                for g, group in enumerate(groups) for c in group]
    cfg = RewardConfig(fitting={"mc_samples": 4, "mc_max_new_tokens": 8})
    summary = {"sft_final_loss": losses[-1], "greedy_accuracy": acc, "greedy_mean_tokens": mean_tok, "methods": {}}
    table = Table(title=f"Advantages of the first group (G={args.group_size}) per method")
    table.add_column("resp")
    table.add_column("K")
    table.add_column("ok")
    table.add_column("tokens")
    for m in METHODS:
        table.add_column(m)
    per_method = {}
    for m in METHODS:
        t0 = time.perf_counter()
        per_method[m] = compute_rewards(model, tok, rollouts, m, cfg, verifier=verifier)
        summary["methods"][m] = {"seconds": time.perf_counter() - t0, "timings": per_method[m].timings}
    l2t = per_method["l2t"].responses
    for i in range(args.group_size):
        r = l2t[i]
        table.add_row(str(i), str(r.segmentation.num_episodes), "✓" if r.outcome else "✗",
                      str(len(rollouts[i].response_ids)),
                      *[f"{per_method[m].responses[i].advantage:+.2f}" for m in METHODS])
    console.print(table)

    best = max(range(len(l2t)), key=lambda i: (l2t[i].outcome, l2t[i].segmentation.num_episodes))
    ep = Table(title=f"L2T episode rewards of response {best} (outcome {l2t[best].outcome:.0f})")
    for c in ("k", "episode", "G_k", "P̂_k", "r_k^prg", "R_k"):
        ep.add_column(c)
    r = l2t[best]
    for k, e in enumerate(r.segmentation.episodes):
        ep.add_row(str(k + 1), e.text[:40], f"{float(r.gains[k]):+.4f}", f"{float(r.penalties_hat[k]):.3f}",
                   f"{float(r.process[k]):+.4f}", f"{float(r.episode_reward[k]):+.4f}")
    console.print(ep)

    records = []
    for i, ro in enumerate(rollouts):
        rec = {"group": ro.group_id, "response": ro.response_text, "reference": ro.reference, "methods": {}}
        for m in METHODS:
            x = per_method[m].responses[i]
            rec["methods"][m] = {
                "status": x.segmentation.status, "outcome": x.outcome, "score": x.score, "advantage": x.advantage,
                "gains": x.gains.tolist(), "penalties_hat": x.penalties_hat.tolist(),
                "episode_rewards": x.episode_reward.tolist(),
            }
        records.append(rec)
    write_text_atomic(out / "rewards.json", json.dumps(records, indent=1))
    write_text_atomic(out / "config.json", cfg.model_dump_json(indent=2))
    summary["seconds"] = time.perf_counter() - t_start
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    console.print(f"[bold green]done[/] in {summary['seconds']:.0f}s: greedy accuracy {acc:.3f}, "
                  f"{mean_tok:.1f} tokens; rewards in {out / 'rewards.json'}")
    return summary


if __name__ == "__main__":
    main()
