"""Policy loss (METHOD.md §5) and baseline rewards (§6) against direct formulas."""

import pytest
import torch

from l2t_core.losses import aggregate, k3_kl, policy_loss
from l2t_core.rewards.baselines import length_penalty_rewards, mrt_reward


def _brute(logp, old, ref, A, eps_l, eps_h, kappa):
    out = []
    for lp, o, rf, a in zip(logp.tolist(), old.tolist(), ref.tolist(), A.tolist()):
        rho = torch.exp(torch.tensor(lp - o)).item()
        clipped = min(max(rho, 1 - eps_l), 1 + eps_h)
        k3 = torch.exp(torch.tensor(rf - lp)).item() - (rf - lp) - 1
        out.append(-min(rho * a, clipped * a) + kappa * k3)
    return torch.tensor(out)


def test_token_mean_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(2, 5, generator=g) * 0.3 - 1 for _ in range(3))
    A = torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = policy_loss(logp, old, ref, A, mask, clip_low=0.2, clip_high=0.28, kl_coef=0.01)
    per_tok = _brute(logp[mask.bool()], old[mask.bool()], ref[mask.bool()], A[mask.bool()], 0.2, 0.28, 0.01)
    assert out.loss.item() == pytest.approx(per_tok.mean().item(), rel=1e-5)
    seq = policy_loss(logp, old, ref, A, mask, clip_low=0.2, clip_high=0.28, kl_coef=0.01, aggregation="seq_mean")
    assert seq.loss.item() == pytest.approx(((per_tok[:3].mean() + per_tok[3:].mean()) / 2).item(), rel=1e-5)


def test_clipping_and_gradient():
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)
    old = torch.zeros(1, 2)
    A = torch.tensor([[1.0, -1.0]])
    out = policy_loss(logp, old, None, A, torch.ones(1, 2), kl_coef=0.0)
    out.loss.backward()
    # ρ = e^0.5 > 1.2 with A > 0 and ρ = e^-0.5 < 0.8 with A < 0: both clipped, no gradient
    assert logp.grad.abs().max().item() == 0.0 and out.clip_frac.item() == 1.0


def test_k3_is_nonnegative_and_zero_at_equality():
    x = torch.linspace(-3, 3, 50)
    assert (k3_kl(x, x.flip(0)) >= 0).all() and k3_kl(x, x).abs().max() == 0


def test_loss_refuses_nan_and_bad_shapes():
    ok = torch.zeros(1, 3)
    bad = torch.tensor([[0.0, float("nan"), 0.0]])
    with pytest.raises(ValueError, match="NaN"):
        policy_loss(bad, ok, ok, ok, torch.ones(1, 3))
    # NaN on a padding position is ignored
    policy_loss(bad, ok, ok, ok, torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="one shape"):
        policy_loss(ok, torch.zeros(1, 2), ok, ok, torch.ones(1, 3))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(ok, ok, "sum")



@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_non_finite_padding_changes_neither_loss_nor_gradient(aggregation):
    """Padding (mask 0) is ignored (METHOD.md §5 aggregates over response tokens only): NaN or ±inf
    there, in any input, leaves the loss, its statistics and the gradient as with zeros there.
    Failed with a NaN loss: masking by multiplication keeps 0 · inf = NaN."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    inputs = {"logp": torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]),
              "old": torch.tensor([[-1.1, -1.9, 0.0], [-0.4, 0.0, 0.0]]),
              "ref": torch.tensor([[-1.0, -2.2, 0.0], [-0.6, 0.0, 0.0]]),
              "adv": torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.0, 0.0]])}

    def run(fill):
        x = {k: torch.where(mask.bool(), v, torch.tensor(fill[k])) for k, v in inputs.items()}
        lp = x["logp"].clone().requires_grad_(True)
        out = policy_loss(lp, x["old"], x["ref"], x["adv"], mask, aggregation=aggregation)
        out.loss.backward()
        return out, lp.grad

    want, want_grad = run({"logp": 0.0, "old": 0.0, "ref": 0.0, "adv": 0.0})
    assert torch.isfinite(want.loss)
    got, got_grad = run({"logp": float("nan"), "old": float("-inf"), "ref": float("inf"), "adv": float("nan")})
    for name in ("loss", "pg_loss", "kl", "clip_frac", "ratio_mean"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    torch.testing.assert_close(got_grad * mask, want_grad * mask)
    assert torch.isfinite(got_grad).all()

def test_length_penalty_by_hand():
    correct = torch.tensor([1, 1, 0, 1, 1, 0])
    lengths = torch.tensor([10, 20, 5, 30, 7, 9])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    r = length_penalty_rewards(correct, lengths, groups, alpha_lp=0.1)
    mu, sd = 20.0, (200 / 3) ** 0.5  # correct lengths 10, 20, 30 in group 0
    sig = lambda z: 1 / (1 + torch.exp(-torch.tensor(z)).item())
    assert r[0].item() == pytest.approx(1 - 0.1 * sig((10 - mu) / sd), rel=1e-5)
    assert r[1].item() == pytest.approx(1 - 0.05, rel=1e-5)
    assert r[2].item() == 0.0 and r[5].item() == 0.0
    assert r[4].item() == 1.0  # one correct response in its group: no penalty


def test_mrt_reward_telescopes():
    j = torch.tensor([0.25, 0.5, 0.25, 1.0])
    assert mrt_reward(1.0, j, alpha_mrt=1.0) == pytest.approx(1.75)
    assert mrt_reward(0.0, torch.tensor([0.5])) == 0.0
