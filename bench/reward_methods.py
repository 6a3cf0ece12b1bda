"""What each method's reward costs on a trained policy's own rollouts. Prints one JSON object.

On a TRAINED checkpoint of the synthetic task (``--policy``, e.g. the warm start of ``l2t
warmstart``), this samples ``--group`` rollouts for each of ``--problems`` held-out problems
through the trainer's ``hf`` rollout engine and times, on those same rollouts,
:func:`~l2t_core.rewards.l2t.compute_rewards` for every method of ``--methods`` (its fastest of
``--repeats`` calls, and each call's seconds): the whole reward, its penalty part (``penalty_s``:
the signals' forward where the penalty has its own, its backwards, the episode-score reduction, the
SVD) and its fitting part (``fitting_s``), and ``reward_over_rollout``.

Besides the trainer's methods, two penalty options of ``bench.penalty_fidelity`` run as ``l2t``
variants, rank 5 %: ``l2t_last_block`` on the last block's four position-wise matrices
(``compression.targets: ["last_block"]``) and ``l2t_every_block`` on every block's MLP
down-projection (``["model.layers.*.mlp.down_proj"]``). The latter's blocks, like
``l2t_random_layers``', lie below an attention, so the trainer takes each episode's own gradient
there (``compression.attribution: per_episode``): one backward per episode, over a forward of
prompt ⊕ response of its own. ``l2t`` and ``l2t_last_block`` need one truncated backward of the
reward pass's forward.

``--quick`` uses a tiny random-init model and the character tokenizer (a smoke run for the tests;
the numbers mean nothing). Torch runs with ``--threads`` threads (default 1: on a shared 2-core
machine 2 OpenMP threads spin-wait behind other processes).
"""

from __future__ import annotations

import time

import torch

TAG = "bench.reward_methods"
METHODS = ("grpo", "length_penalty", "l2t", "l2t_no_penalty", "l2t_last_block", "l2t_random_layers",
           "l2t_every_block")
VARIANTS = {"l2t_last_block": ("l2t", {"compression": {"targets": ["last_block"]}}),
            "l2t_every_block": ("l2t", {"compression": {"targets": ["model.layers.*.mlp.down_proj"]}})}


def run(policy: str, *, methods: tuple[str, ...] = METHODS, problems: int = 8, group: int = 8, repeats: int = 2,
        temperature: float = 0.7, max_new_tokens: int = 448, levels=(3, 6), seed: int = 0) -> dict:
    from l2t_core.config import RewardConfig
    from l2t_core.models import load_policy
    from l2t_core.rewards.l2t import compute_rewards
    from l2t_core.verify import NumericVerifier

    from ._common import log, policy_facts, policy_rollouts

    model, tok = load_policy(policy)
    model.eval()
    log(f"rollouts: {problems} problems x {group}", TAG)
    rollouts, rollout_s, engine = policy_rollouts(model, tok, problems=problems, group=group, temperature=temperature,
                                                  max_new_tokens=max_new_tokens, levels=levels, seed=seed)
    verifier = NumericVerifier()
    out_methods, episodes = {}, None
    for name in methods:
        method, overrides = VARIANTS.get(name, (name, {}))
        cfg = RewardConfig(**overrides)
        calls = []
        for rep in range(repeats):
            log(f"{name}: reward {rep + 1}/{repeats}", TAG)
            t0 = time.perf_counter()
            batch = compute_rewards(model, tok, rollouts, method, cfg, verifier=verifier, sampler=engine, step=seed)
            calls.append({"reward_s": time.perf_counter() - t0, "penalty_s": batch.timings.get("penalty_s", 0.0),
                          "fitting_s": batch.timings.get("fitting_s", 0.0)})
        best = min(calls, key=lambda c: c["reward_s"])
        out_methods[name] = {**best, "reward_over_rollout": best["reward_s"] / rollout_s,
                             "calls_reward_s": [c["reward_s"] for c in calls], "method": method,
                             "overrides": overrides}
        episodes = [r.segmentation.num_episodes for r in batch.responses]
    return {
        "methods": out_methods,
        "rollout_s": rollout_s,
        "responses": len(rollouts),
        "mean_episodes": sum(episodes) / len(episodes) if episodes else 0.0,
        "mean_response_tokens": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
        "repeats": repeats,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        **policy_facts(model, policy),
    }


def main(argv: list[str] | None = None) -> dict:
    from ._common import policy_parser, run_on_policy

    ap = policy_parser(__doc__)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma separated; l2t_last_block and "
                    "l2t_every_block are the penalty options above")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="rollouts per problem")
    ap.add_argument("--repeats", type=int, default=2, help="reward calls per method (the fastest is reported)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=448)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke run)")
    a = ap.parse_args(argv)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    from typing import get_args

    from l2t_core.config import MethodName

    trainer_methods = get_args(MethodName)
    unknown = [m for m in methods if m not in trainer_methods and m not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench.reward_methods: unknown method(s) {unknown}; choose from "
                         f"{list(trainer_methods) + list(VARIANTS)}")
    torch.set_num_threads(a.threads)
    return run_on_policy("reward_methods", run, a.policy, quick=a.quick,
                         quick_kw=dict(problems=2, group=2, max_new_tokens=12, repeats=1), methods=methods,
                         problems=a.problems, group=a.group, repeats=a.repeats, temperature=a.temperature,
                         max_new_tokens=a.max_new_tokens, seed=a.seed)


if __name__ == "__main__":
    main()
