"""The copy share c_k (l2t_core.rewards.copying): hand-computed pairs, and the one-pass shares of a
response against the one-episode brute force on random responses."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2t_core.rewards.copying import context_overlap, episode_copy_shares


def test_context_overlap_counts_the_pairs_already_said():
    context = [1, 2, 3, 4]
    assert context_overlap(context, [2, 3, 4]) == 1.0  # (2,3), (3,4): both said
    assert context_overlap(context, [3, 4, 9, 1]) == pytest.approx(1 / 3)  # (3,4) of (3,4), (4,9), (9,1)
    assert context_overlap(context, [4, 3]) == 0.0  # the tokens, not the pair
    assert context_overlap(context, [4]) == 1.0 and context_overlap([], [4]) == 0.0  # one token: itself
    assert context_overlap(context, [1, 2, 3, 5], n=3) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="empty episode"):
        context_overlap(context, [])
    with pytest.raises(ValueError, match="n must be >= 1"):
        context_overlap(context, [1], n=0)


def test_episode_copy_shares_by_hand():
    # prompt (5, 6); episodes [5, 6, 7] | [7, 5, 6] | [] | [9]
    shares = episode_copy_shares([5, 6], [5, 6, 7, 7, 5, 6, 9], [0, 0, 0, 1, 1, 1, 3], 4)
    # (5,6) said, (6,7) not: 1/2; (7,5) not (the pair (7,7) spans two episodes and is context), (5,6) said: 1/2;
    # an episode without tokens copies nothing; a one-token episode is its token: 9 is new
    torch.testing.assert_close(shares, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert episode_copy_shares([1], [1, 1], [0, 1], 2).tolist() == [1.0, 1.0]
    assert episode_copy_shares([1], [], [], 0).numel() == 0


@settings(max_examples=60, deadline=None)
@given(prompt=st.lists(st.integers(0, 5), min_size=1, max_size=8),
       sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6),
       n=st.integers(1, 4), data=st.data())
def test_episode_copy_shares_equal_the_one_episode_reference(prompt, sizes, n, data):
    ids = data.draw(st.lists(st.integers(0, 5), min_size=sum(sizes), max_size=sum(sizes)))
    eid = np.repeat(np.arange(len(sizes)), sizes)
    got = episode_copy_shares(prompt, ids, eid, len(sizes), n)
    start = 0
    for k, size in enumerate(sizes):
        want = context_overlap(prompt + ids[:start], ids[start:start + size], n) if size else 0.0
        assert got[k].item() == pytest.approx(want)
        start += size


def test_episode_copy_shares_refuse_ids_that_do_not_fit():
    with pytest.raises(ValueError, match="2 episode ids for 3 response tokens"):
        episode_copy_shares([1], [1, 2, 3], [0, 0], 1)
    with pytest.raises(ValueError, match="never decrease"):
        episode_copy_shares([1], [1, 2], [1, 0], 2)
    with pytest.raises(ValueError, match=r"\[0, num_episodes\)"):
        episode_copy_shares([1], [1, 2], [0, 2], 2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        episode_copy_shares([1], [1], [0], 1, n=0)
