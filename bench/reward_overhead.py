"""How much the L2T reward adds to a training step. Prints one JSON object.

``reward_over_rollout`` = L2T reward time ÷ rollout (generation) time, summed over the measured
steps of a real :class:`~l2t_core.trainer.Trainer` run (method ``l2t``, paper defaults for the
reward: α 0.8, β 0.6, answer-logprob J, low-rank penalty on the last MLP down-projection), after
one warm-up step. Target (issue 3): <= 0.25.

The reward time is the trainer's ``reward_time_s``: segmentation and verification
(``reward_segment_verify_s``), ONE packed forward per micro-batch that gives J at every episode
boundary and log π_old (``reward_fitting_s``), the penalty's truncated backward through that same
forward and its episode-score reduction, and the proxy's SVD refresh (``reward_penalty_s``, of which
``reward_penalty_svd_s`` is the SVD), and the credit/advantage arithmetic (``reward_other_s``, the remainder). The rest of the step is reported
too: reference log-probs (``ref_s``), the policy update (``update_s``) and the metrics bookkeeping
(``record_s``, the step time not covered by the four phases).

The model is a tiny random-init Qwen2 built locally, so responses usually run to
``max_new_tokens`` (default 192, a realistic length for the ratio); the prompts are a synthetic
JSONL (§8 episode instruction included) in a temporary data directory. ``--profile`` adds the
top functions of a cProfile of one more reward computation (cumulative time) to the JSON.

Torch runs with one thread by default: this machine's 2 cores are shared, and with 2 OpenMP
threads behind other processes small kernels spin-wait (generation slowed ~100x in a probe),
which distorts the ratio. ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from ._common import DATA_FILE, build_workspace, data_dir_env, log, run_and_emit, torch_threads

TARGET = 0.25
PARTS = ("segment_verify_s", "penalty_s", "fitting_s")


def _profile_reward(tr, step: int, top: int = 25) -> list[dict]:
    """cProfile one extra reward computation on step ``step``'s rollouts (cumulative time)."""
    import cProfile
    import pstats

    from l2t_core.rewards.l2t import compute_rewards

    rollouts, _, _ = tr._rollouts(step)
    prof = cProfile.Profile()
    prof.enable()
    compute_rewards(tr.engine.unwrapped(), tr.tokenizer, rollouts, tr.cfg.method, tr.cfg.reward,
                    verifier=tr.verifier, proxy=tr.proxy, step=step)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{'/'.join(file.rsplit('/', 2)[-2:])}:{line}({fn})",
                     "calls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: r["cumtime_s"], reverse=True)
    return rows[:top]


def run(*, steps: int = 3, prompts: int = 8, group: int = 8, max_new_tokens: int = 192, hidden: int = 128,
        layers: int = 4, threads: int | None = 1, seed: int = 0, method: str = "l2t",
        profile: bool = False, device: str = "cpu", intermediate: int | None = None, heads: int = 4,
        kv_heads: int = 2, svd: str = "exact", share_prompts: bool = True, verify_workers: int = 0) -> dict:
    from l2t_core.config import TrainConfig
    from l2t_core.trainer import Trainer

    with torch_threads(threads) as n_threads, tempfile.TemporaryDirectory(prefix="l2t-bench-") as tmp:
        ws = build_workspace(tmp, n_problems=max(64, prompts * (steps + 2)), hidden=hidden, layers=layers, seed=seed,
                             intermediate=intermediate, heads=heads, kv_heads=kv_heads)
        with data_dir_env(ws.data_dir):
            cfg = TrainConfig(policy=str(ws.model_dir), out=f"{tmp}/run", method=method, steps=steps + 1,
                              prompts_per_step=prompts, checkpoint_every=10_000, seed=seed, log_rollouts=False,
                              device=device, share_prompts=share_prompts, verify_workers=verify_workers,
                              data={"source": DATA_FILE}, optim={"lr": 1e-6},
                              reward={"compression": {"svd": svd}},
                              rollout={"group_size": group, "max_new_tokens": max_new_tokens,
                                       "max_prompt_tokens": 1024})
            tr = Trainer(cfg, show_progress=False)
            tr.setup()
            log(f"warm-up step ({prompts} prompts x G={group}, max_new_tokens={max_new_tokens})", "reward_overhead")
            tr.train_step(1)
            rows = []
            for s in range(2, steps + 2):
                rows.append(tr.train_step(s))
                log(f"step {s}: rollout {rows[-1]['rollout_time_s']:.2f}s reward {rows[-1]['reward_time_s']:.2f}s",
                    "reward_overhead")
            prof = _profile_reward(tr, steps + 2) if profile else None
            tr.close()
    n = len(rows)
    tot = {k: sum(r.get(k, 0.0) for r in rows) for k in
           ("rollout_time_s", "reward_time_s", "ref_time_s", "update_time_s", "step_time_s")
           + tuple(f"reward_{p}" for p in PARTS) + ("reward_penalty_svd_s",)}
    per = {k: v / n for k, v in tot.items()}
    reward_other = per["reward_time_s"] - sum(per[f"reward_{p}"] for p in PARTS)
    record = per["step_time_s"] - sum(per[k] for k in ("rollout_time_s", "reward_time_s", "ref_time_s",
                                                          "update_time_s"))
    ratio = tot["reward_time_s"] / tot["rollout_time_s"]
    mean_tokens = sum(r["mean_tokens"] for r in rows) / n
    out = {
        "reward_over_rollout": ratio,
        "target": TARGET,
        "target_met": ratio <= TARGET,
        "method": method,
        "svd": svd,
        "share_prompts": share_prompts,
        "verify_workers": verify_workers,
        "rollout_s": per["rollout_time_s"],
        "reward_s": per["reward_time_s"],
        "reward_segment_verify_s": per["reward_segment_verify_s"],
        "reward_penalty_s": per["reward_penalty_s"],
        "reward_penalty_svd_s": per["reward_penalty_svd_s"],  # part of reward_penalty_s
        "reward_fitting_s": per["reward_fitting_s"],
        "reward_other_s": reward_other,
        "ref_s": per["ref_time_s"],
        "update_s": per["update_time_s"],
        "record_s": record,
        "step_s": per["step_time_s"],
        "per_step_s": per,
        "group_size": group,
        "prompts_per_step": prompts,
        "rollouts_per_step": prompts * group,
        "max_new_tokens": max_new_tokens,
        "mean_tokens": mean_tokens,
        "episodes_per_response": sum(r["episodes_per_response"] for r in rows) / n,
        "generated_tokens_per_s": mean_tokens * prompts * group / per["rollout_time_s"],
        "parameters": ws.parameters,
        "hidden": hidden,
        "layers": layers,
        "intermediate": intermediate or hidden * 3,
        "heads": heads,
        "kv_heads": kv_heads,
        "vocab": ws.vocab,
        "threads": n_threads,
        "steps_measured": n,
        "device": str(tr.device),
        "device_name": torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else "cpu",
    }
    if prof is not None:
        out["profile_reward_top"] = prof
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="G, rollouts per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 x hidden)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--method", default="l2t")
    ap.add_argument("--svd", default="exact", choices=("exact", "randomized"), help="CompressionConfig.svd")
    ap.add_argument("--no-share-prompts", dest="share_prompts", action="store_false",
                    help="TrainConfig.share_prompts off: every rollout runs its prompt in every pass")
    ap.add_argument("--verify-workers", type=int, default=0,
                    help="TrainConfig.verify_workers: verify in worker processes beside the policy pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    ap.add_argument("--profile", action="store_true", help="add a cProfile of one reward computation")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="the trainer's device (TrainConfig.device); phases are timed after a CUDA sync")
    args = ap.parse_args(argv)
    kw = dict(steps=args.steps, prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens,
              hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads,
              kv_heads=args.kv_heads, svd=args.svd, share_prompts=args.share_prompts,
              verify_workers=args.verify_workers)
    if args.quick:
        kw.update(steps=1, prompts=2, group=4, max_new_tokens=48, hidden=64, layers=2)
    return run_and_emit(run, quick=args.quick, threads=args.threads, method=args.method, profile=args.profile,
                        device=args.device, **kw)


if __name__ == "__main__":
    main()
