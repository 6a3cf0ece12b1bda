"""The oracle redundancy label of an episode: a diagnostic control, not a method.

Every process reward this project measured on the synthetic tasks (the paper's two halves, the
continuation J, the copy share of :mod:`l2t_core.rewards.copying`) moves L2T along the length
penalty's accuracy–token line (lab notebook). The question that leaves is whether a better
process *signal* could leave that line at all, or whether the policy cannot drop one kind of
episode without the other however it is credited. A synthetic task knows which of its episodes
are redundant (a restatement, a repeated step, a check of an easy step: :attr:`EpisodeInfo.redundant`),
so it can answer it: with ``reward.oracle.coef`` λ > 0 the process reward charges each episode its
label ℓ_k ∈ {0, 1}, r_k^prg = G_k − β·P̂_k − γ·c_k − λ·ℓ_k (:func:`~l2t_core.advantages.process_rewards`);
with ``reward.oracle.hard_check_bonus`` b > 0 a check of a hard step gets ℓ_k = −b, so the oracle
also pays the checks a policy must keep, not only charges the ones it may drop.

No real task has such labels, so this is a ceiling for what per-episode credit can buy on the
synthetic task, never a training option for math: the run config names the task whose classifier
gives the labels and must train on that task (``TrainConfig`` refuses anything else).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..tasks import get_task


def redundancy_labels(texts: Sequence[str], task: str = "walk", hard_check_bonus: float = 0.0) -> torch.Tensor:
    """ℓ_k = 1 for an episode that the task's classifier calls redundant (a restatement, a repeat,
    a check of an easy step), −``hard_check_bonus`` for a check of a hard step (the useful check,
    whether or not the step it checks was wrong: its value is the chance that it was), else 0
    (steps, and text the classifier cannot read).

    ``texts``: one response's episode texts in order (a check is read against the step before it).
    """
    infos = get_task(task).classify_episodes(list(texts))
    return torch.tensor([1.0 if x.redundant else -hard_check_bonus if x.kind == "check" else 0.0 for x in infos],
                        dtype=torch.float64)
