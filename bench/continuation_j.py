"""What the ``continuation`` estimator of J costs next to the rollout. Prints one JSON object.

``reward.fitting.estimator: continuation`` (this project's option, not the paper's) reads J(s_k)
as the share of the policy's own continuations of every episode prefix s_k that reach the
verified answer (:func:`~l2t_core.rewards.fitting.monte_carlo_j`). It samples ``mc_samples``
continuations from each of the K + 1 prefixes of every response, so it generates several times the
rollout's tokens; the paper's ``answer_logprob`` J is one packed forward.

On a TRAINED checkpoint of the synthetic task (``--policy``, e.g. the warm start of ``l2t
warmstart``), this samples ``--group`` rollouts for each of ``--problems`` held-out problems
through the trainer's ``hf`` rollout engine and times, on those rollouts, the full L2T reward
(:func:`~l2t_core.rewards.l2t.compute_rewards`, method ``l2t``, penalty included) with the paper's
J and with the continuation J at each ``--batches`` size (``continuation_batch``: prefixes per
generate call; the engine takes them shortest first). Reported: ``rollout_s``, per estimator
``reward_s``, ``reward_over_rollout`` and ``decoded_sequence_steps`` (sequences × decode steps of
the continuations' generate calls, a count that CPU load does not move); the headline
``continuation_over_rollout`` is at the default ``continuation_batch``.

``--quick`` uses a tiny random-init model and the character tokenizer (a smoke run for the tests;
the numbers mean nothing). Torch runs with ``--threads`` threads (default 2).
"""

from __future__ import annotations

import time

import torch

TAG = "bench.continuation_j"


def run(policy: str, *, problems: int = 8, group: int = 8, samples: int = 2, temperature: float = 0.7,
        max_new_tokens: int = 448, batches: tuple[int, ...] = (256, 64, 32, 16), levels=(4, 6), seed: int = 0) -> dict:
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
    response_tokens = sum(len(r.response_ids) for r in rollouts)
    default_batch = RewardConfig().fitting.continuation_batch
    configs = {"answer_logprob": {}}
    for b in dict.fromkeys((*batches, default_batch)):
        configs[f"continuation_b{b}"] = {"estimator": "continuation", "mc_samples": samples, "mc_temperature": temperature,
                                         "continuation_budget": max_new_tokens, "continuation_batch": b}
    estimators, verifier = {}, NumericVerifier()
    steps = []  # per generate call: (sequences, decode steps): what the continuations cost, noise-free
    real_generate = model.generate

    def counting_generate(*args, **kw):
        out = real_generate(*args, **kw)
        steps.append((out.shape[0], out.shape[1] - kw["input_ids"].shape[1]))
        return out

    model.generate = counting_generate
    for name, fit in configs.items():
        log(f"reward with {name}", TAG)
        steps.clear()
        t0 = time.perf_counter()
        batch = compute_rewards(model, tok, rollouts, "l2t", RewardConfig(fitting=fit), verifier=verifier,
                                sampler=engine, step=seed)
        secs = time.perf_counter() - t0
        estimators[name] = {"reward_s": secs, "reward_over_rollout": secs / rollout_s,
                            "continuation_batch": fit.get("continuation_batch"),
                            # sequences x decode steps over the generate calls (a batch runs to its longest row)
                            "decoded_sequence_steps": sum(n * t for n, t in steps)}
    model.generate = real_generate
    prefixes = sum(r.segmentation.num_episodes + 1 for r in batch.responses)  # the same under every estimator
    head = estimators[f"continuation_b{default_batch}"]
    return {
        "continuation_over_rollout": head["reward_over_rollout"],
        "continuation_over_answer_logprob": head["reward_s"] / estimators["answer_logprob"]["reward_s"],
        "default_continuation_batch": default_batch,
        "estimators": estimators,
        "rollout_s": rollout_s,
        "responses": len(rollouts),
        "prefixes": prefixes,  # K + 1 per response: the contexts each continuation J samples from
        "mean_response_tokens": response_tokens / len(rollouts),
        "mc_samples": samples,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        **policy_facts(model, policy),
    }


def main(argv: list[str] | None = None) -> dict:
    from ._common import policy_parser, run_on_policy

    ap = policy_parser(__doc__)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="rollouts per problem")
    ap.add_argument("--samples", type=int, default=2, help="mc_samples: continuations per prefix")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=448, help="rollout length and continuation budget")
    ap.add_argument("--batches", default="256,64,32,16", help="continuation_batch sizes to time, comma separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke run)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    batches = tuple(int(b) for b in a.batches.split(",") if b.strip())
    return run_on_policy("continuation_j", run, a.policy, quick=a.quick,
                         quick_kw=dict(problems=2, group=2, max_new_tokens=12, batches=(4,)), problems=a.problems,
                         group=a.group, samples=a.samples, temperature=a.temperature,
                         max_new_tokens=a.max_new_tokens, batches=batches, seed=a.seed)

if __name__ == "__main__":
    main()
