"""Compression penalty (METHOD.md §3) against brute-force autograd references."""

import math

import pytest
import torch

from l2t_core.rewards import compression as comp


def _batch(vocab, lengths, prompt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths) + prompt
    ids = torch.randint(0, vocab, (len(lengths), L), generator=g)
    att = torch.zeros_like(ids)
    score = torch.zeros_like(ids, dtype=torch.bool)
    for i, n in enumerate(lengths):
        att[i, : prompt + n] = 1
        score[i, prompt : prompt + n] = True
    return ids, att, score


def test_per_token_signals_equal_per_token_autograd(model):
    name = comp.default_target(model)
    assert name.endswith("layers.7.mlp.down_proj")
    targets = comp.resolve_targets(model, None)
    ids, att, score = _batch(model.config.vocab_size, [9, 6])
    sig = comp.per_token_signals(model, ids, att, score, targets)
    assert sig.deltas[name].shape == (15, 64) and sig.inputs[name].shape == (15, 160)
    # brute force: a fresh forward per token, gradient of that ONE token's log-prob w.r.t. y
    layer = targets[name]
    n = 0
    for b in range(ids.shape[0]):
        for p in score[b].nonzero().flatten().tolist():
            store = {}

            def hook(mod, args, out):
                out.retain_grad()
                store["y"] = out

            h = layer.register_forward_hook(hook)
            try:
                logits = model(input_ids=ids[b : b + 1], attention_mask=att[b : b + 1]).logits[0].float()
            finally:
                h.remove()
            lp = torch.log_softmax(logits[p - 1], -1)[ids[b, p]]
            model.zero_grad()
            lp.backward()
            grad = store["y"].grad[0]
            # position-wise layer after the last attention: only position p-1 receives signal
            others = torch.cat([grad[: p - 1], grad[p:]])
            assert others.abs().max() < 1e-7
            torch.testing.assert_close(sig.deltas[name][n], grad[p - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(sig.logprobs[n], lp.detach(), atol=1e-5, rtol=0)
            n += 1
    assert n == 15
    assert all(p.requires_grad for p in model.parameters())  # parameters restored after the pass


def test_full_rank_proxy_equals_unprojected_penalty(model):
    targets = comp.resolve_targets(model, None)
    name, layer = next(iter(targets.items()))
    ids, att, score = _batch(model.config.vocab_size, [12, 10], seed=1)
    sig = comp.per_token_signals(model, ids, att, score, targets)
    seg = torch.tensor([0] * 5 + [1] * 7 + [2] * 3 + [3] * 7)
    a, d = sig.inputs[name], sig.deltas[name]
    full_rank = max(layer.weight.shape)
    basis = comp.low_rank_basis(layer.weight, full_rank)
    g = comp.low_rank_episode_scores(a, d, basis, seg, 4)
    assert g.shape == (4, 64, 160)
    proxy_sq = g.double().pow(2).sum((1, 2))
    explicit = torch.stack([(d[seg == k].T.double() @ a[seg == k].double()).pow(2).sum() for k in range(4)])
    gram = comp.full_episode_sqnorms(a, d, seg, 4)
    torch.testing.assert_close(proxy_sq, explicit, rtol=1e-5, atol=0)
    torch.testing.assert_close(gram, explicit, rtol=1e-9, atol=0)
    torch.testing.assert_close(comp.penalty(proxy_sq), comp.penalty(explicit), rtol=1e-5, atol=0)
    # the segment sum equals the per-episode autograd gradient of W itself (last block: exact)
    for k in range(4):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[score[:, 1:]]
        lp[seg == k].sum().backward()
        torch.testing.assert_close(layer.weight.grad.double(), (d[seg == k].T @ a[seg == k]).double(),
                                   atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_rank_follows_rank_frac_and_randomized_svd_spans_top_directions():
    assert comp.proxy_rank(1536, 8960, 0.05) == math.ceil(0.05 * 1536)
    assert comp.proxy_rank(64, 160, 0.05) == 4 and comp.proxy_rank(64, 160, rank=7) == 7
    torch.manual_seed(0)
    U0, _ = torch.linalg.qr(torch.randn(40, 40))
    V0, _ = torch.linalg.qr(torch.randn(30, 30))
    s = torch.tensor([10.0, 8, 6, 4] + [0.01] * 26)
    W = U0[:, :30] @ torch.diag(s) @ V0.T
    for method in ("exact", "randomized"):
        b = comp.low_rank_basis(W, 4, method)
        assert b.U.shape == (40, 4) and b.V.shape == (30, 4)
        # same subspace as the true top-4 singular vectors
        assert torch.linalg.matrix_norm(b.U @ b.U.T - U0[:, :4] @ U0[:, :4].T) < 1e-3
        assert torch.linalg.matrix_norm(b.V @ b.V.T - V0[:, :4] @ V0[:, :4].T) < 1e-3


def test_svd_proxy_refresh_schedule(model):
    targets = comp.resolve_targets(model, None)
    p = comp.SVDProxy(refresh_steps=3)
    assert p.refresh(targets, 0) and not p.refresh(targets, 1) and not p.refresh(targets, 2)
    assert p.refresh(targets, 3)


def test_exact_reference_equals_bruteforce_fisher_quadratic_form(micro_model):
    """P_k^exact = Δθ̃ᵀ F Δθ̃ with F = g gᵀ + λI built explicitly over ALL parameters."""
    m = micro_model
    params = list(m.parameters())
    n_params = sum(p.numel() for p in params)
    assert n_params < 4000
    ids = torch.randint(0, 40, (14,), generator=torch.Generator().manual_seed(2))
    score = torch.zeros(14, dtype=torch.bool)
    score[3:] = True
    ep = torch.full((14,), -1)
    ep[3:7], ep[7:8], ep[8:] = 0, 1, 2
    eta, lam = 0.5, 1e-2
    pen, sq = comp.exact_episode_penalties(m, ids, score, ep, 3, adapt_lr=eta, damping=lam)
    for k in range(3):
        m.zero_grad()
        logits = m(input_ids=ids[None]).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).squeeze(-1)
        lp[score[1:] & (ep[1:] == k)].sum().backward()
        g = torch.cat([p.grad.flatten().double() for p in params])
        F = torch.outer(g, g) + lam * torch.eye(n_params, dtype=torch.float64)
        step = eta * g
        brute = step @ F @ step
        torch.testing.assert_close(sq[k], g @ g, rtol=1e-4, atol=0)
        torch.testing.assert_close(pen[k], brute, rtol=1e-4, atol=0)
    m.zero_grad()


def test_penalty_closed_form():
    sq = torch.tensor([0.0, 2.0, 3.0])
    torch.testing.assert_close(comp.penalty(sq, adapt_lr=2.0, damping=0.1),
                               torch.tensor([0.0, 4 * (4 + 0.2), 4 * (9 + 0.3)], dtype=torch.float64))


def test_batch_normalisation():
    p = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64)  # responses: [1,3], [2], [2]
    resp = torch.tensor([0, 0, 1, 2])
    hat = comp.normalise_penalties(p, resp, 3)
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, resp, hat)
    assert totals.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(hat, p / (8 / 3))
    assert comp.normalise_penalties(torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1]), 2).tolist() == [0, 0]
    assert comp.normalise_penalties(p, resp, 3, "none") is p
    with pytest.raises(ValueError, match="penalty_norm"):
        comp.normalise_penalties(p, resp, 3, "bogus")


def test_group_normalisation():
    p = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 6.0, 0.0], dtype=torch.float64)
    resp = torch.tensor([0, 0, 1, 2, 3, 4, 5])  # responses 0..5; totals 4, 2, 2, 0, 6, 0
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # group means 3, 1, 3; groups 1 and 2 hold a zero response
    hat = comp.normalise_penalties(p, resp, 6, "group_response_mean", group_of_response=groups)
    torch.testing.assert_close(hat, torch.tensor([1 / 3, 1.0, 2 / 3, 2.0, 0.0, 2.0, 0.0], dtype=torch.float64))
    totals = torch.zeros(6, dtype=torch.float64).index_add_(0, resp, hat)
    for g in range(3):  # the average response of every group pays 1
        assert totals[groups == g].mean().item() == pytest.approx(1.0)
    # one group: the batch normalisation; an all-zero group stays zero beside a non-zero one
    one = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(comp.normalise_penalties(p, resp, 6, "group_response_mean", group_of_response=one),
                               comp.normalise_penalties(p, resp, 6))
    z = torch.tensor([0.0, 0.0, 4.0, 2.0], dtype=torch.float64)
    got = comp.normalise_penalties(z, torch.arange(4), 4, "group_response_mean",
                                   group_of_response=torch.tensor([0, 0, 1, 1]))
    assert got.tolist() == pytest.approx([0.0, 0.0, 4 / 3, 2 / 3])
    with pytest.raises(ValueError, match="group id"):
        comp.normalise_penalties(p, resp, 6, "group_response_mean")


def test_penalty_clip_per_group_against_a_loop():
    hat = torch.tensor([0.1, 5.0, 0.3, 0.2, 0.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    resp = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # responses 0..3
    groups = torch.tensor([7, 7, 2, 9])  # ids need not be contiguous; group 2 is all zero
    got = comp.clip_penalties(hat, resp, groups, 2.0)
    # brute force: each episode's group mean over every episode of that group
    want = []
    for e in range(len(hat)):
        g = groups[resp[e]]
        members = [hat[i].item() for i in range(len(hat)) if groups[resp[i]] == g]
        want.append(min(hat[e].item(), 2.0 * sum(members) / len(members)))
    assert got.tolist() == pytest.approx(want)
    assert got[1].item() == pytest.approx(2.0 * 5.6 / 4) and got[4:6].tolist() == [0.0, 0.0]
    # monotone within a group and a no-op for a large enough c
    assert got[0] < got[3] < got[2] < got[1]
    torch.testing.assert_close(comp.clip_penalties(hat, resp, groups, 100.0), hat)
    assert comp.clip_penalties(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long), 2.0).numel() == 0
    with pytest.raises(ValueError, match="penalty_clip must be > 0"):
        comp.clip_penalties(hat, resp, groups, 0.0)
    with pytest.raises(ValueError, match="response ids"):
        comp.clip_penalties(hat, resp[:3], groups, 2.0)


def test_random_layers_and_targets(model):
    names = comp.random_layer_targets(model, 0.3, seed=0)
    assert len(names) == 3 and all(n.endswith("mlp.down_proj") for n in names)
    assert names == comp.random_layer_targets(model, 0.3, seed=0)
    with pytest.raises(comp.TargetError, match="not a module"):
        comp.resolve_targets(model, ["model.layers.99.mlp.down_proj"])
    with pytest.raises(comp.TargetError, match="not an nn.Linear"):
        comp.resolve_targets(model, ["model.layers.0.mlp"])
    # the output head and a pattern that reaches it are refused: the penalty's signals come from the blocks
    for names in (["lm_head"], ["*"], ["last_block", "lm_head"]):
        with pytest.raises(comp.TargetError, match=r"\['lm_head'\] are outside the transformer blocks \(model\.layers\.\*\)"):
            comp.resolve_targets(model, names)


def test_target_patterns_select_every_block_in_model_order(model):
    n_layers = model.config.num_hidden_layers
    got = comp.resolve_targets(model, [comp.ALL_DOWN_PROJ])
    assert list(got) == [f"model.layers.{i}.mlp.down_proj" for i in range(n_layers)]
    assert all(isinstance(m, torch.nn.Linear) for m in got.values())
    # a pattern and an explicit name that overlap give each module once; "*.mlp*" skips the MLP modules
    # themselves (not nn.Linear) and keeps their three projections per block
    mixed = comp.resolve_targets(model, ["model.layers.7.mlp.down_proj", "model.layers.[67].mlp.down_proj"])
    assert list(mixed) == ["model.layers.6.mlp.down_proj", "model.layers.7.mlp.down_proj"]
    assert len(comp.resolve_targets(model, ["model.layers.0.mlp*"])) == 3
    with pytest.raises(comp.TargetError, match="matches no nn.Linear"):
        comp.resolve_targets(model, ["model.layers.*.mlp.up"])


def test_multi_target_signals_are_not_cut_by_later_targets(model):
    """With two targets, the lower one's δ must still see the path through the upper one."""
    names = ["model.layers.5.mlp.down_proj", "model.layers.7.mlp.down_proj"]
    ids, att, score = _batch(model.config.vocab_size, [6], seed=4)
    both = comp.per_token_signals(model, ids, att, score, comp.resolve_targets(model, names))
    low_only = comp.per_token_signals(model, ids, att, score, comp.resolve_targets(model, names[:1]))
    torch.testing.assert_close(both.deltas[names[0]], low_only.deltas[names[0]], atol=1e-6, rtol=0)


def test_low_rank_scores_are_chunk_invariant_and_skip_unsegmented_tokens():
    from l2t_core.rewards.compression import LowRankBasis, low_rank_episode_scores

    g = torch.Generator().manual_seed(0)
    a, d = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(50, 5, generator=g, dtype=torch.float64)
    seg = torch.randint(-1, 4, (50,), generator=g)
    U, V = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(7, 2, dtype=torch.float64))[0]
    basis = LowRankBasis(U=U, V=V)
    ref = torch.stack([(U.T @ d[seg == k].T) @ (a[seg == k] @ V) for k in range(4)])
    for chunk in (1, 7, 10_000):
        torch.testing.assert_close(low_rank_episode_scores(a, d, basis, seg, 4, max_chunk_elements=chunk * 6), ref)


def test_penalty_normalisation_over_ranks_equals_the_whole_batch():
    """Split across ranks (each normalising its share with all_sum over the ranks), P̂ equals the
    one-process normalisation of the whole batch; without all_sum each rank's mean would differ."""
    from l2t_core.rewards.compression import normalise_penalties

    g = torch.Generator().manual_seed(0)
    pen = torch.rand(12, generator=g, dtype=torch.float64) * torch.tensor([1.0] * 6 + [10.0] * 6, dtype=torch.float64)
    resp = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    whole = normalise_penalties(pen, resp, 6)
    shares = [(pen[:6], resp[:6], 3), (pen[6:], resp[6:] - 3, 3)]  # rank 0: responses 0-2, rank 1: 3-5
    totals = [[float(p.sum()), float(n)] for p, _, n in shares]

    def all_sum(values):  # what an all-reduce over the two ranks returns
        return [sum(t[i] for t in totals) for i in range(len(values))]

    split = torch.cat([normalise_penalties(p, r, n, all_sum=all_sum) for p, r, n in shares])
    torch.testing.assert_close(split, whole)
    local = torch.cat([normalise_penalties(p, r, n) for p, r, n in shares])
    assert not torch.allclose(local, whole)


def _episode_gradients_by_autograd(model, ids, att, score, episodes, names):
    """Brute force: each row alone, one backward per episode, ∇_W Σ_{t∈k} log π(z_t) of each
    target weight (every parameter's gradient on); ‖·‖² per row and episode, and the gradients."""
    modules = dict(model.named_modules())
    sq, grads = {}, {}
    for b in range(ids.shape[0]):
        n = int(att[b].sum())
        logits = model(input_ids=ids[b: b + 1, :n]).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[b, 1:n, None]).squeeze(-1)
        ep, sc = episodes[b, 1:n], score[b, 1:n]
        for k in range(int(ep.max()) + 1):
            g = torch.autograd.grad(lp[sc & (ep == k)].sum(), [modules[m].weight for m in names], retain_graph=True)
            grads[b, k] = dict(zip(names, g))
            sq[b, k] = sum(float(x.double().pow(2).sum()) for x in g)
    return sq, grads


def _episodes_of(score, sizes):
    """Episode ids (-1 off the scored tokens): row b's scored tokens cut into episodes of ``sizes[b]``."""
    ep = torch.full(score.shape, -1, dtype=torch.long)
    for b, row in enumerate(sizes):
        ep[b, score[b]] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    return ep


def test_per_episode_sqnorms_equal_each_episodes_own_gradient_in_any_block(model):
    """METHOD.md §3's full per-episode gradients, for blocks that a later attention follows (the
    random-layers ablation): one batched backward per episode slot equals a separate autograd
    backward per episode, padded rows and episode chunks of one included; the single backward's
    per-position attribution does not (it credits a position with every later token's signal)."""
    names = ["model.layers.0.mlp.down_proj", "model.layers.3.mlp.down_proj", "model.layers.7.mlp.down_proj"]
    targets = comp.resolve_targets(model, names)
    assert not comp.attributed_by_position(model, names) and comp.attributed_by_position(model, names[2:])
    assert comp.attributed_by_position(model, ["model.layers.7.mlp.up_proj", "model.layers.7.self_attn.o_proj"])
    assert not comp.attributed_by_position(model, ["model.layers.7.self_attn.v_proj"])
    ids, att, score = _batch(model.config.vocab_size, [11, 7], seed=5)
    episodes = _episodes_of(score, [[4, 3, 4], [2, 5]])
    want, _ = _episode_gradients_by_autograd(model, ids, att, score, episodes, names)
    for chunk in (1 << 26, 1):  # all slots in one batched backward; one slot per backward
        got = comp.per_episode_sqnorms(model, ids, att, score, episodes, targets, max_chunk_elements=chunk)
        assert got.sqnorms.shape == (2, 3) and got.sqnorms[1, 2] == 0  # row 1 has two episodes
        for (b, k), v in want.items():
            assert float(got.sqnorms[b, k]) == pytest.approx(v, rel=1e-4)
    sig = comp.per_token_signals(model, ids, att, score, targets)
    single = comp.episode_sqnorms(sig, episodes[score], 3)  # row 0 only: its episodes are 0..2
    assert float(single[0]) != pytest.approx(want[0, 0], rel=0.05)
    torch.testing.assert_close(got.logprobs, sig.logprobs, atol=1e-5, rtol=0)
    # the last block's down-projection alone: one backward was exact already, and both agree
    last = comp.resolve_targets(model, names[2:])
    exact = comp.per_episode_sqnorms(model, ids, att, score, episodes, last).sqnorms
    seg = (episodes + torch.tensor([[0], [3]]))[score]
    flat = comp.episode_sqnorms(comp.per_token_signals(model, ids, att, score, last), seg, 5)
    torch.testing.assert_close(torch.cat([exact[0], exact[1, :2]]), flat, rtol=1e-4, atol=1e-12)
    with pytest.raises(ValueError, match="exactly at the scored tokens"):
        comp.per_episode_sqnorms(model, ids, att, score, torch.zeros_like(episodes), targets)


def test_last_block_targets_take_one_exact_backward(model):
    """'last_block': the last block's MLP projections and attention output projection, whatever the
    depth; ONE backward gives each episode's gradient of all four exactly (brute-force autograd per
    episode), un-projected and in the proxy at full rank."""
    last = model.config.num_hidden_layers - 1
    names = comp.last_block_targets(model)
    assert sorted(names) == sorted(f"model.layers.{last}.{n}" for n in
                                   ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert comp.attributed_by_position(model, names)
    targets = comp.resolve_targets(model, [comp.LAST_BLOCK])
    assert list(targets) == [n for n, _ in model.named_modules() if n in names]  # model order
    # with other names beside it, each module once
    assert len(comp.resolve_targets(model, [comp.LAST_BLOCK, f"model.layers.{last}.mlp.down_proj",
                                            "model.layers.0.mlp.down_proj"])) == 5
    ids, att, score = _batch(model.config.vocab_size, [9, 6], seed=7)
    episodes = _episodes_of(score, [[3, 2, 4], [4, 2]])
    want, _ = _episode_gradients_by_autograd(model, ids, att, score, episodes, list(targets))
    seg = (episodes + torch.tensor([[0], [3]]))[score]
    sig = comp.per_token_signals(model, ids, att, score, targets)
    got = comp.episode_sqnorms(sig, seg, 5)
    full = comp.SVDProxy(rank=10_000)
    full.refresh(targets, 0)
    in_proxy = comp.episode_sqnorms(sig, seg, 5, full)
    for (b, k), v in want.items():
        assert float(got[3 * b + k]) == pytest.approx(v, rel=1e-4)
        assert float(in_proxy[3 * b + k]) == pytest.approx(v, rel=1e-4)


def test_per_episode_sqnorms_in_the_low_rank_proxy(model):
    """With a proxy, ‖Uᵀ G_k V‖² of each episode's own gradient G_k."""
    names = ["model.layers.2.mlp.down_proj"]
    targets = comp.resolve_targets(model, names)
    proxy = comp.SVDProxy(rank=6)
    proxy.refresh(targets, 0)
    ids, att, score = _batch(model.config.vocab_size, [9, 8], seed=6)
    episodes = _episodes_of(score, [[5, 4], [3, 3, 2]])
    _, grads = _episode_gradients_by_autograd(model, ids, att, score, episodes, names)
    got = comp.per_episode_sqnorms(model, ids, att, score, episodes, targets, proxy=proxy).sqnorms
    basis = proxy.bases[names[0]]
    for (b, k), g in grads.items():
        want = float((basis.U.T @ g[names[0]] @ basis.V).double().pow(2).sum())
        assert float(got[b, k]) == pytest.approx(want, rel=1e-4)


def test_per_episode_sqnorms_run_the_busiest_ranks_backward_count(model, monkeypatch):
    """Under ZeRO-3 every rank runs as many backwards as the busiest (each gathers weights, a
    collective): the extra ones carry no episode and change nothing."""
    names = ["model.layers.1.mlp.down_proj"]
    targets = comp.resolve_targets(model, names)
    ids, att, score = _batch(model.config.vocab_size, [8, 6], seed=7)
    episodes = _episodes_of(score, [[3, 5], [2, 2, 2]])
    alone = comp.per_episode_sqnorms(model, ids, att, score, episodes, targets, max_chunk_elements=1).sqnorms
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(kwargs["grad_outputs"].shape[0])
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(comp, "lockstep_count", lambda n, params: n + 2)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    padded = comp.per_episode_sqnorms(model, ids, att, score, episodes, targets, max_chunk_elements=1).sqnorms
    assert calls == [1, 1, 1, 1, 1]  # three episode slots, one at a time, then two with no episode
    torch.testing.assert_close(padded, alone, rtol=0, atol=0)
