"""Episode reward, token credit and advantages (METHOD.md §4): hand-computed examples."""

import math

import pytest
import torch

from l2t_core import advantages as adv


def test_process_and_episode_rewards():
    g = torch.tensor([0.2, -0.1])
    p = torch.tensor([0.5, 1.5])
    r = adv.process_rewards(g, p, beta=0.6)
    torch.testing.assert_close(r, torch.tensor([0.2 - 0.3, -0.1 - 0.9], dtype=torch.float64))
    R = adv.episode_rewards(1.0, r, alpha=0.8)
    torch.testing.assert_close(R, torch.tensor([0.5 + 0.8 * -0.1, 0.5 + 0.8 * -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        adv.process_rewards(torch.tensor([float("nan")]), torch.tensor([0.0]), 0.6)


def test_process_rewards_charge_only_episodes_without_gain():
    g = torch.tensor([0.3, 0.0, -0.2])
    p = torch.tensor([1.0, 0.5, 2.0])
    r = adv.process_rewards(g, p, beta=0.6, penalty_on="no_gain")
    torch.testing.assert_close(r, torch.tensor([0.3, 0.0 - 0.3, -0.2 - 1.2], dtype=torch.float64))
    torch.testing.assert_close(adv.process_rewards(g, p, 0.6, "all"), adv.process_rewards(g, p, 0.6))
    with pytest.raises(ValueError, match="penalty_on must be 'all' or 'no_gain'"):
        adv.process_rewards(g, p, 0.6, "some")


@pytest.mark.parametrize("values, coef, name", [("copies", "copy_coef", "copy share"),
                                                 ("labels", "label_coef", "oracle label")])
def test_process_rewards_charge_each_extra_term(values, coef, name):
    """− γ·c_k (the copy share) and − λ·ℓ_k (the oracle label): charged with a weight, ignored at 0,
    refused when missing, of the wrong size or not finite."""
    g, p, c = torch.tensor([0.3, -0.1]), torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.8])
    r = adv.process_rewards(g, p, 0.6, **{values: c, coef: 0.5})
    torch.testing.assert_close(r, torch.tensor([0.3 - 0.6, -0.1 - 0.3 - 0.4], dtype=torch.float64))
    torch.testing.assert_close(adv.process_rewards(g, p, 0.6, **{values: c}), adv.process_rewards(g, p, 0.6))  # 0
    with pytest.raises(ValueError, match=f"one {name} per episode"):
        adv.process_rewards(g, p, 0.6, **{values: torch.tensor([0.1]), coef: 0.5})
    with pytest.raises(ValueError, match=f"one {name} per episode"):
        adv.process_rewards(g, p, 0.6, **{coef: 0.5})
    with pytest.raises(ValueError, match=f"{name}s has non-finite"):
        adv.process_rewards(g, p, 0.6, **{values: torch.tensor([0.1, float("nan")]), coef: 0.5})


def test_process_rewards_charge_both_extra_terms():
    g, p = torch.tensor([0.3, -0.1]), torch.tensor([1.0, 0.5])
    c, lab = torch.tensor([0.5, 0.8]), torch.tensor([0.0, 1.0])
    both = adv.process_rewards(g, p, 0.6, copies=c, copy_coef=0.5, labels=lab, label_coef=2.0)
    torch.testing.assert_close(both, torch.tensor([0.3 - 0.6 - 0.25, -0.1 - 0.3 - 0.4 - 2.0], dtype=torch.float64))


def test_surprise_weights_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25, 1.0, 0.1]))  # s = ln2, 2ln2, floor, ln10
    eps = torch.tensor([0, 0, 1, 1])
    w = adv.surprise_weights(logp, eps, 2)
    l10 = math.log(10)
    expected = [1 / 3, 2 / 3, 1e-6 / (1e-6 + l10), l10 / (1e-6 + l10)]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    assert adv.uniform_weights(eps, 2).tolist() == [0.5, 0.5, 0.5, 0.5]


def test_token_rewards_sum_to_episode_reward():
    R = torch.tensor([0.3, -0.2], dtype=torch.float64)
    eps = torch.tensor([0, 0, 0, 1, 1])
    w = adv.surprise_weights(torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.5]), eps, 2)
    r = adv.token_rewards(R, w, eps)
    torch.testing.assert_close(torch.zeros(2, dtype=torch.float64).index_add_(0, eps, r), R)
    torch.testing.assert_close(r[:3], 0.3 * torch.tensor([1, 2, 3], dtype=torch.float64) / 6)


def test_trimmed_mean_95():
    x = torch.arange(1, 41, dtype=torch.float64)  # n = 40: drop floor(1.0) = 1 at each tail
    assert adv.trimmed_mean(x).item() == pytest.approx(torch.arange(2, 40).double().mean().item())
    y = torch.tensor([100.0] + [1.0] * 38 + [-100.0])
    assert adv.trimmed_mean(y).item() == pytest.approx(1.0)
    small = torch.tensor([1.0, 2.0, 30.0])  # n = 3: floor(0.075) = 0 dropped
    assert adv.trimmed_mean(small).item() == pytest.approx(11.0)
    assert adv.trimmed_mean(torch.zeros(0)).item() == 0.0


def test_response_score_sum_is_eq5():
    R = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert adv.response_score(torch.ones(3), R, "sum").item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="score_agg"):
        adv.response_score(torch.ones(3), R, "median")


def test_group_advantage_population_std():
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    a = adv.group_advantages(s, g)
    sd = math.sqrt(2 / 3)  # population std of 1,2,3
    torch.testing.assert_close(a[:3], torch.tensor([-1 / (sd + 1e-6), 0.0, 1 / (sd + 1e-6)], dtype=torch.float64))
    assert a[3:5].tolist() == [0.0, 0.0]  # zero-variance group
    assert a[5].item() == 0.0  # group of one


def test_grpo_baseline_is_the_textbook_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    g = torch.zeros(8, dtype=torch.long)
    mean, std = r.mean(), r.std(unbiased=False)
    torch.testing.assert_close(adv.grpo_advantages(r, g), ((r - mean) / (std + 1e-6)).double())


def test_token_advantages_mean_and_reduction():
    r = torch.tensor([0.1, -0.3, 0.0, 0.6], dtype=torch.float64)
    a = adv.token_advantages(2.0, r)
    assert a.mean().item() == pytest.approx(2.0)
    torch.testing.assert_close(a, 2.0 * 4 * r.abs() / 1.0)
    # all c_t equal: GRPO broadcast
    assert adv.token_advantages(-1.5, torch.full((5,), 0.2, dtype=torch.float64)).tolist() == pytest.approx([-1.5] * 5)
    # Σ|r_t| = 0: c_t = 1/T
    assert adv.token_advantages(0.7, torch.zeros(4)).tolist() == pytest.approx([0.7] * 4)
    assert adv.token_advantages(0.7, torch.zeros(0)).numel() == 0


def test_additive_credit_option_is_signed_and_reduces_to_grpo():
    from l2t_core.advantages import additive_token_advantages, group_episode_zscores

    process = [torch.tensor([1.0, -1.0]), torch.tensor([3.0]), torch.tensor([5.0, 0.0])]
    groups = torch.tensor([0, 0, 1])
    z = group_episode_zscores(process, groups)
    pooled = torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64)
    ref = (pooled - pooled.mean()) / (pooled.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(torch.cat(z[:2]), ref)
    torch.testing.assert_close(z[2], torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-5, rtol=0)
    ids = torch.tensor([0, 0, 1])
    # a wrong response (negative outcome advantage) still pushes its good episode up relative to its bad one
    a = additive_token_advantages(-0.5, torch.tensor([1.0, -1.0]), ids, coef=0.5)
    assert a.tolist() == [0.0, 0.0, -1.0]
    # coef 0: GRPO's broadcast
    assert additive_token_advantages(0.7, torch.tensor([1.0, -1.0]), ids, 0.0).tolist() == [0.7, 0.7, 0.7]
    assert group_episode_zscores([torch.tensor([2.0])], torch.tensor([0]))[0].tolist() == [0.0]


def _brute_correct_scope(outcomes, scores, groups, bonus):
    """Element by element, as the option's docstring states it."""
    out = []
    for i, (o, s, g) in enumerate(zip(outcomes, scores, groups)):
        if o < 0.5:
            out.append(o)
            continue
        peers = [scores[j] for j in range(len(scores)) if groups[j] == g and outcomes[j] > 0.5]
        lo, hi = min(peers), max(peers)
        out.append(o + (bonus * (2 * (s - lo) / (hi - lo) - 1) if len(peers) > 1 and hi > lo else 0.0))
    return out


def test_correct_scope_scores_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 12
        outcomes = (torch.rand(n, generator=gen) > 0.5).double()
        scores = torch.randn(n, generator=gen, dtype=torch.float64)
        groups = torch.randint(0, 3, (n,), generator=gen)
        got = adv.correct_scope_scores(outcomes, scores, groups, 0.4)
        ref = _brute_correct_scope(outcomes.tolist(), scores.tolist(), groups.tolist(), 0.4)
        assert got.tolist() == pytest.approx(ref)
        # every correct response outscores every wrong one of its group
        for g in groups.unique():
            m = groups == g
            c, w = got[m & (outcomes > 0.5)], got[m & (outcomes < 0.5)]
            if c.numel() and w.numel():
                assert c.min() > w.max()


def test_correct_scope_ignores_wrong_responses_process_scores():
    outcomes = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # group 0 all wrong: whatever their process scores (a short wrong response scoring high under
    # the paper score), the group gets no advantage; group 1's ranking keeps the paper order
    scores = torch.tensor([5.0, -3.0, 0.1, 0.2, 0.9, 0.5], dtype=torch.float64)
    s = adv.correct_scope_scores(outcomes, scores, groups, 0.5)
    a = adv.group_advantages(s, groups)
    assert a[:3].tolist() == [0.0, 0.0, 0.0]
    assert s[3:].tolist() == pytest.approx([0.5, 1.5, 1.0 + 0.5 * (2 * 0.3 / 0.7 - 1)])
    # one correct response, or ties: no bonus; bonus 0 is GRPO's outcome score
    one = adv.correct_scope_scores(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 9.0]), torch.tensor([0, 0]), 0.5)
    assert one.tolist() == [1.0, 0.0]
    assert adv.correct_scope_scores(outcomes, scores, groups, 0.0).tolist() == outcomes.tolist()
    with pytest.raises(ValueError, match="bonus"):
        adv.correct_scope_scores(outcomes, scores, groups, 1.0)
    with pytest.raises(ValueError, match="process scores"):
        adv.correct_scope_scores(outcomes, torch.full((6,), float("nan")), groups, 0.5)


def test_correct_floor_keeps_wrong_advantages_and_floors_correct_ones():
    a = torch.tensor([0.9, -0.3, -0.6, 1.2, -1.2, 0.0], dtype=torch.float64)
    o = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    got = adv.floor_correct_advantages(a, o)
    assert got.tolist() == [0.9, 0.0, -0.6, 1.2, -1.2, 0.0]
    with pytest.raises(ValueError, match="3 advantages for 6 outcomes"):
        adv.floor_correct_advantages(a[:3], o)
