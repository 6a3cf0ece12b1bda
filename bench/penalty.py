"""Benchmark of the reward math's fast paths (METHOD.md §2, §3). Prints one JSON object.

* ``speedup``: exact all-parameter penalty time / low-rank penalty time, same batch.
* ``spearman``: rank correlation of low-rank vs exact penalties across all episodes.
* ``packed_j_speedup``: naive per-prefix J time / packed one-pass J time.
Targets (issue 2): speedup >= 100, spearman >= 0.9, packed_j_speedup >= 3 at 12 episodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _cuts(g: torch.Generator, total: int, k: int) -> list[int]:
    """k contiguous episodes of random lengths (>= 1) covering ``total`` tokens."""
    inner = torch.randperm(total - 1, generator=g)[: k - 1].add(1).sort().values.tolist()
    return [0] + inner + [total]


def run(responses=4, episodes=12, response_tokens=240, prompt_tokens=20, hidden=128, layers=8,
        intermediate=352, vocab=512, seed=0, repeats=3, exact_repeats=1) -> dict:
    from l2t_core.models import build_tiny_qwen2
    from l2t_core.rewards import compression as comp
    from l2t_core.rewards.fitting import JItem, answer_logprobs_naive, answer_logprobs_packed

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_tiny_qwen2(vocab, hidden_size=hidden, num_layers=layers, intermediate_size=intermediate, seed=seed)
    L = prompt_tokens + response_tokens
    ids = torch.randint(0, vocab, (responses, L), generator=g)
    att = torch.ones_like(ids)
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, prompt_tokens:] = True
    tok_ep = torch.full((responses, L), -1)
    cuts = []
    for i in range(responses):
        c = _cuts(g, response_tokens, episodes)
        cuts.append(c)
        for k in range(episodes):
            tok_ep[i, prompt_tokens + c[k] : prompt_tokens + c[k + 1]] = k
    seg_ids = (tok_ep + torch.arange(responses)[:, None] * episodes)[score]

    targets = comp.resolve_targets(model, None)
    name = next(iter(targets))

    def low_rank():
        proxy = comp.SVDProxy(rank_frac=0.05)
        proxy.refresh(targets, 0)
        sig = comp.per_token_signals(model, ids, att, score, targets)
        gk = comp.low_rank_episode_scores(sig.inputs[name], sig.deltas[name], proxy.bases[name], seg_ids,
                                          responses * episodes)
        return comp.penalty(gk.double().pow(2).sum((1, 2)))

    def exact():
        return torch.cat([comp.exact_episode_penalties(model, ids[i], score[i], tok_ep[i], episodes)[0]
                          for i in range(responses)])

    print(f"[bench.penalty] low-rank penalty x{repeats}", file=sys.stderr)
    t_lr, p_lr = _timed(low_rank, repeats)
    print(f"[bench.penalty] exact all-parameter penalty x{exact_repeats}", file=sys.stderr)
    t_ex, p_ex = _timed(exact, exact_repeats)
    from scipy.stats import spearmanr

    rho = float(spearmanr(p_lr.numpy(), p_ex.numpy()).statistic)

    force = torch.randint(0, vocab, (15,), generator=g).tolist()
    items = [JItem(ids[i, :prompt_tokens].tolist(), ids[i, prompt_tokens:].tolist(), cuts[i][:-1] + [response_tokens],
                   torch.randint(0, vocab, (5,), generator=g).tolist()) for i in range(responses)]
    print("[bench.penalty] naive vs packed J", file=sys.stderr)
    t_naive, j_naive = _timed(lambda: answer_logprobs_naive(model, items, force), repeats)
    t_packed, j_packed = _timed(lambda: answer_logprobs_packed(model, items, force), repeats)
    diff = max(float((a - b).abs().max()) for a, b in zip(j_naive, j_packed))
    d_out, d_in = targets[name].weight.shape
    out = {
        "speedup": t_ex / t_lr,
        "spearman": rho,
        "packed_j_speedup": t_naive / t_packed,
        "lowrank_s": t_lr,
        "exact_s": t_ex,
        "naive_j_s": t_naive,
        "packed_j_s": t_packed,
        "packed_j_max_abs_diff": diff,
        "model_params": sum(p.numel() for p in model.parameters()),
        "num_layers": layers,
        "target": name,
        "rank": comp.proxy_rank(d_out, d_in, 0.05),
        "responses": responses,
        "episodes_per_response": episodes,
        "response_tokens": response_tokens,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    out["targets_met"] = {"speedup>=100": out["speedup"] >= 100, "spearman>=0.9": rho >= 0.9,
                          "packed_j_speedup>=3": out["packed_j_speedup"] >= 3}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--response-tokens", type=int, default=240)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small configuration for a smoke run (seconds)")
    a = ap.parse_args(argv)
    kw = dict(responses=a.responses, episodes=a.episodes, response_tokens=a.response_tokens, hidden=a.hidden,
              layers=a.layers, seed=a.seed)
    if a.quick:
        kw.update(responses=2, episodes=4, response_tokens=40, hidden=32, layers=8, intermediate=64, vocab=128, repeats=1)
    res = run(**kw)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
