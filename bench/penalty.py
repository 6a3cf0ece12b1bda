"""Benchmark of the reward math's fast paths (METHOD.md §2, §3). Prints one JSON object.

* ``speedup``: exact all-parameter penalty time / low-rank penalty time, same batch, the low-rank
  penalty standalone (its own forward, the truncated backward, the projections).
* ``speedup_in_reward_pass``: exact time / what the low-rank penalty ADDS to the trainer's reward
  pass, which already runs one packed forward for J and log π_old (``episode_pass`` with the penalty
  minus ``episode_pass`` without it). This is the cost the trainer pays.
* ``spearman``: rank correlation of the low-rank (paper default r = 5 %) vs exact penalties across
  all episodes; ``spearman_full_layer`` for the un-projected layer (``mode='full_layer'``),
  ``spearman_by_rank_frac`` for other ranks, ``spearman_episode_length`` for the episode length
  alone (a baseline: how much of the ranking is just length); ``spearman_last_block`` (and
  ``speedup_last_block``) for the option ``compression.targets: ["last_block"]`` at r = 5 %: every
  Linear of the last block that no attention follows, from the same one truncated backward.
* ``packed_j_speedup``: naive per-prefix J time / packed one-pass J time.
Targets (issue 2): speedup >= 100, spearman >= 0.9, packed_j_speedup >= 3 at 12 episodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch

from l2t_core.timing import device_clock


def _timed(fn, repeats: int, device: torch.device):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = device_clock(device)
        out = fn()
        times.append(device_clock(device) - t0)
    return statistics.median(times), out


def _cuts(g: torch.Generator, total: int, k: int) -> list[int]:
    """k contiguous episodes of random lengths (>= 1) covering ``total`` tokens."""
    inner = torch.randperm(total - 1, generator=g)[: k - 1].add(1).sort().values.tolist()
    return [0] + inner + [total]


def run(responses=4, episodes=12, response_tokens=240, prompt_tokens=20, hidden=128, layers=8,
        intermediate=352, vocab=512, seed=0, repeats=3, exact_repeats=1, device: str = "cpu",
        heads: int = 4, kv_heads: int = 2, svd: str = "exact") -> dict:
    from l2t_core.models import build_tiny_qwen2, resolve_device
    from l2t_core.rewards import compression as comp
    from l2t_core.episodes import TokenEpisodes
    from l2t_core.rewards.fitting import JItem, answer_logprobs_naive, answer_logprobs_packed
    from l2t_core.rewards.l2t import Rollout, episode_pass

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    try:
        dev = resolve_device(device)
    except RuntimeError as e:  # a command-line mistake: the message, not a traceback
        raise SystemExit(f"bench.penalty --device: {e}") from None
    model = build_tiny_qwen2(vocab, hidden_size=hidden, num_layers=layers, intermediate_size=intermediate,
                             num_heads=heads, num_kv_heads=kv_heads, seed=seed).to(dev)
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
    ids, att, score, tok_ep, seg_ids = (t.to(dev) for t in (ids, att, score, tok_ep, seg_ids))

    targets = comp.resolve_targets(model, None)
    name = next(iter(targets))

    def proxy_sqnorms(sig, proxy) -> torch.Tensor:
        """‖g_k‖² of every episode in the proxy's rank-r basis."""
        gk = comp.low_rank_episode_scores(sig.inputs[name], sig.deltas[name], proxy.bases[name], seg_ids,
                                          responses * episodes)
        return gk.double().pow(2).sum((1, 2))

    def low_rank():
        proxy = comp.SVDProxy(rank_frac=0.05, method=svd)
        proxy.refresh(targets, 0)
        return comp.penalty(proxy_sqnorms(comp.per_token_signals(model, ids, att, score, targets), proxy))

    def full_layer():
        sig = comp.per_token_signals(model, ids, att, score, targets)
        return comp.penalty(comp.full_episode_sqnorms(sig.inputs[name], sig.deltas[name], seg_ids, responses * episodes))

    block = comp.resolve_targets(model, [comp.LAST_BLOCK])

    def last_block():  # compression.targets: ["last_block"], rank 5 %, the same one truncated backward
        proxy = comp.SVDProxy(rank_frac=0.05, method=svd)
        proxy.refresh(block, 0)
        sig = comp.per_token_signals(model, ids, att, score, block)
        return comp.penalty(comp.episode_sqnorms(sig, seg_ids, responses * episodes, proxy))

    def exact():
        return torch.cat([comp.exact_episode_penalties(model, ids[i], score[i], tok_ep[i], episodes)[0]
                          for i in range(responses)])

    print(f"[bench.penalty] low-rank penalty x{repeats}", file=sys.stderr)
    t_lr, p_lr = _timed(low_rank, repeats, dev)
    t_full, p_full = _timed(full_layer, repeats, dev)
    t_block, p_block = _timed(last_block, repeats, dev)
    print(f"[bench.penalty] exact all-parameter penalty x{exact_repeats}", file=sys.stderr)
    t_ex, p_ex = _timed(exact, exact_repeats, dev)
    p_ex = p_ex.cpu()
    from scipy.stats import spearmanr

    def rho_of(x) -> float:
        return float(spearmanr(x.cpu().numpy(), p_ex.numpy()).statistic)

    sig = comp.per_token_signals(model, ids, att, score, targets)
    by_rank = {}
    for rf in (0.01, 0.05, 0.1, 0.25):
        proxy = comp.SVDProxy(rank_frac=rf)
        proxy.refresh(targets, 0)
        by_rank[str(rf)] = rho_of(proxy_sqnorms(sig, proxy))
    # the basis alone (recomputed every svd_refresh_steps steps in training): exact vs randomized SVD
    svd_s, rho_svd = {}, {}
    for method in ("exact", "randomized"):
        proxy = comp.SVDProxy(rank_frac=0.05, method=method)
        svd_s[method], _ = _timed(lambda: proxy.refresh(targets, 0, force=True), repeats, dev)
        rho_svd[method] = rho_of(proxy_sqnorms(sig, proxy))
    lengths = torch.bincount(seg_ids.cpu(), minlength=responses * episodes).double()

    # the penalty inside the trainer's reward pass: one packed forward for J and log π_old is run anyway
    force = torch.randint(0, vocab, (15,), generator=g).tolist()
    items = [JItem(ids[i, :prompt_tokens].tolist(), ids[i, prompt_tokens:].tolist(), cuts[i][:-1] + [response_tokens],
                   torch.randint(0, vocab, (5,), generator=g).tolist()) for i in range(responses)]
    rollouts = [Rollout(it.prompt_ids, it.response_ids, "", "", i) for i, it in enumerate(items)]
    teps = [TokenEpisodes(tok_ep[i, prompt_tokens:].cpu().numpy(), np.asarray(cuts[i])) for i in range(responses)]

    def reward_pass(with_penalty: bool):
        proxy = None
        if with_penalty:
            proxy = comp.SVDProxy(rank_frac=0.05, method=svd)
            proxy.refresh(targets, 0)
        return episode_pass(model, rollouts, teps, 0, 1 << 20, j_items=items, force_ids=force,
                            targets=targets if with_penalty else None, proxy=proxy)

    print("[bench.penalty] reward pass with and without the penalty", file=sys.stderr)
    # alternate the two passes and take the median of the paired differences (drift cancels)
    reward_pass(True), reward_pass(False)  # warm-up
    pairs = []
    for _ in range(max(25, repeats)):
        t0 = device_clock(dev)
        res_pen = reward_pass(True)
        t1 = device_clock(dev)
        reward_pass(False)
        t2 = device_clock(dev)
        pairs.append((t1 - t0, t2 - t1))
    t_pass_pen = statistics.median(p[0] for p in pairs)
    t_pass_j = statistics.median(p[1] for p in pairs)
    marginal = max(statistics.median(a - b for a, b in pairs), 1e-9)
    proxy = comp.SVDProxy(rank_frac=0.05, method=svd)
    proxy.refresh(targets, 0)
    standalone_sq = proxy_sqnorms(sig, proxy).cpu()
    fused_rel_diff = float(((torch.cat(res_pen.sqnorms) - standalone_sq).abs() / standalone_sq.clamp(min=1e-30)).max())

    print("[bench.penalty] naive vs packed J", file=sys.stderr)
    t_naive, j_naive = _timed(lambda: answer_logprobs_naive(model, items, force), repeats, dev)
    t_packed, j_packed = _timed(lambda: answer_logprobs_packed(model, items, force), repeats, dev)
    diff = max(float((a - b).abs().max()) for a, b in zip(j_naive, j_packed))
    d_out, d_in = targets[name].weight.shape
    out = {
        "speedup": t_ex / t_lr,
        "speedup_in_reward_pass": t_ex / marginal,
        "speedup_full_layer": t_ex / t_full,
        "spearman": rho_of(p_lr),
        "spearman_full_layer": rho_of(p_full),
        "spearman_last_block": rho_of(p_block),
        "speedup_last_block": t_ex / t_block,
        "spearman_by_rank_frac": by_rank,
        "spearman_episode_length": rho_of(lengths),
        "svd": svd,
        "svd_s": svd_s,
        "spearman_by_svd": rho_svd,
        "packed_j_speedup": t_naive / t_packed,
        "lowrank_s": t_lr,
        "exact_s": t_ex,
        "full_layer_s": t_full,
        "last_block_s": t_block,
        "reward_pass_s": t_pass_j,
        "reward_pass_with_penalty_s": t_pass_pen,
        "penalty_in_reward_pass_s": marginal,
        "fused_vs_standalone_max_rel_diff": fused_rel_diff,
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
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
    }
    out["targets_met"] = {"speedup>=100": out["speedup"] >= 100,
                          "speedup_in_reward_pass>=100": out["speedup_in_reward_pass"] >= 100,
                          "spearman>=0.9": out["spearman"] >= 0.9,
                          "spearman_full_layer>=0.9": out["spearman_full_layer"] >= 0.9,
                          "packed_j_speedup>=3": out["packed_j_speedup"] >= 3}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--response-tokens", type=int, default=240)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=352, help="MLP width (the down-projection's d_in)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (CUDA where available)")
    ap.add_argument("--svd", default="exact", choices=("exact", "randomized"),
                    help="the proxy's SVD in the timed low-rank penalty (CompressionConfig.svd)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small configuration for a smoke run (seconds)")
    a = ap.parse_args(argv)
    kw = dict(responses=a.responses, episodes=a.episodes, response_tokens=a.response_tokens, hidden=a.hidden,
              layers=a.layers, intermediate=a.intermediate, vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads,
              seed=a.seed, device=a.device, svd=a.svd)
    if a.quick:
        kw.update(responses=2, episodes=4, response_tokens=40, hidden=32, layers=8, intermediate=64, vocab=128, repeats=1)
    res = run(**kw)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
