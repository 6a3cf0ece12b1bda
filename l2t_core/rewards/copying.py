"""The copy share of an episode: how much of it its context already said (this project's option,
not the paper's).

L2T's process reward (METHOD.md §4) is meant to single out episodes that add nothing. On the
synthetic task neither of its halves does: the compression penalty measures how surprising an
episode is to the model and the fitting gain how it moves J, and a fluent restatement or a
repeated step is neither surprising nor, to J, useless (``bench.penalty_fidelity``'s
``redundancy`` AUC 0.51–0.59 for the exact penalty, the credit probe's ``gain_separation``
0.48–0.49; lab notebook). What they miss is visible without a model or labels: the share of an
episode's token n-grams that already occur in its context (the prompt and the response before
it) tells a redundant episode from a useful one with AUC 0.80–0.82 on the tiny models' own samples
(restatements 0.83–0.87, repeats 0.86–0.88, checks of easy steps only 0.63–0.69: a check copies
the step it checks whether that step was easy or hard).

:func:`episode_copy_shares` gives c_k ∈ [0, 1] for every episode of a response;
``reward.copying.coef`` γ > 0 charges it in the process reward,
r_k^prg = G_k − β·P̂_k − γ·c_k (:func:`~l2t_core.advantages.process_rewards`), the way an n-gram
repetition penalty charges repeated text, but per episode, so the credit (METHOD.md §4) can push
down the episode that copies and not the whole response.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def context_overlap(context: Sequence[int], episode: Sequence[int], n: int = 2) -> float:
    """The share of an episode's token n-grams that already occur in its context (the prompt and the
    response before the episode): 1 for a verbatim copy, 0 for wholly new text; an episode shorter
    than ``n`` counts its tokens as one n-gram. The one-episode reference of :func:`episode_copy_shares`
    (and the ``context_copy`` / ``copy_separation`` rows of the benchmarks)."""
    if n < 1:
        raise ValueError(f"context_overlap: n must be >= 1, got {n}")
    episode = list(episode)
    if not episode:
        raise ValueError("context_overlap: an empty episode has no n-grams; skip zero-token episodes")
    m = min(n, len(episode))
    context = list(context)
    seen = {tuple(context[i:i + m]) for i in range(len(context) - m + 1)}
    grams = [tuple(episode[i:i + m]) for i in range(len(episode) - m + 1)]
    return sum(g in seen for g in grams) / len(grams)


def episode_copy_shares(prompt_ids: Sequence[int], response_ids: Sequence[int], episode_ids: Sequence[int],
                        num_episodes: int, n: int = 2) -> torch.Tensor:
    """c_k for k = 1..K: :func:`context_overlap` of each episode's tokens against the prompt and
    the response tokens before the episode, float64 [K].

    ``episode_ids`` [T] is the episode of each response token (contiguous and non-decreasing, as
    :func:`~l2t_core.episodes.token_episode_ids` makes them). An episode with no tokens copies
    nothing (c_k = 0; its fitting gain is 0 too). One pass over the tokens: the context's m-grams
    (m ≤ n) are added as the context grows, so a response costs O(T·n), not O(K·T).
    """
    if n < 1:
        raise ValueError(f"episode_copy_shares: n must be >= 1, got {n}")
    ids = [int(t) for t in response_ids]
    eid = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
    if len(eid) != len(ids):
        raise ValueError(f"episode_copy_shares: {len(eid)} episode ids for {len(ids)} response tokens")
    if len(eid) and (eid.min() < 0 or eid.max() >= num_episodes or (np.diff(eid) < 0).any()):
        raise ValueError("episode_copy_shares: episode ids must lie in [0, num_episodes) and never decrease "
                         "(token_episode_ids makes them so)")
    out = torch.zeros(num_episodes, dtype=torch.float64)
    seq = [int(t) for t in prompt_ids] + ids
    start = len(prompt_ids)  # seq index of the first response token
    seen: list[set] = [set() for _ in range(n + 1)]  # seen[m]: the context's m-grams
    grown = 0  # seq[:grown] is in `seen`

    def grow(to: int) -> None:
        nonlocal grown
        for end in range(grown + 1, to + 1):  # the m-grams ending at seq[end - 1]
            for m in range(1, n + 1):
                if end >= m:
                    seen[m].add(tuple(seq[end - m:end]))
        grown = max(grown, to)

    lo = 0
    while lo < len(eid):
        k = int(eid[lo])
        hi = lo
        while hi < len(eid) and eid[hi] == k:
            hi += 1
        grow(start + lo)
        episode = ids[lo:hi]
        m = min(n, len(episode))
        grams = [tuple(episode[i:i + m]) for i in range(len(episode) - m + 1)]
        out[k] = sum(g in seen[m] for g in grams) / len(grams)
        lo = hi
    return out
