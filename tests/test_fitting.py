"""Fitting gain (METHOD.md §2): packed single-pass J equals naive per-prefix J."""

import random

import pytest
import torch

from l2t_core.rewards.fitting import (
    JItem,
    answer_logprobs_naive,
    answer_logprobs_packed,
    fitting_gains,
    monte_carlo_j,
)


def _item(rng, vocab, k, prompt_len=None):
    resp = [rng.randrange(vocab) for _ in range(rng.randrange(3 * k, 8 * k + 4))]
    cuts = sorted(rng.sample(range(1, len(resp) + 1), k))
    return JItem([rng.randrange(vocab) for _ in range(prompt_len or rng.randrange(2, 15))], resp, [0] + cuts,
                 [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))])


@pytest.mark.parametrize("k", [1, 3, 12])
def test_packed_equals_naive(model, k):
    rng = random.Random(k)
    items = [_item(rng, model.config.vocab_size, k)]
    force = [rng.randrange(model.config.vocab_size) for _ in range(9)]
    naive = answer_logprobs_naive(model, items, force)
    packed = answer_logprobs_packed(model, items, force)
    assert len(packed[0]) == k + 1
    torch.testing.assert_close(packed[0], naive[0], atol=1e-4, rtol=0)


def test_packed_equals_naive_on_padded_batches_and_microbatches(model):
    rng = random.Random(7)
    items = [_item(rng, model.config.vocab_size, k) for k in (1, 3, 12, 5, 2)]
    items.append(JItem([3, 4], [5, 6, 7], [0, 0, 3], [9]))  # an episode with zero tokens
    force = [11, 12, 13]
    naive = answer_logprobs_naive(model, items, force)
    for budget in (100_000, 150):  # one padded batch; many small ones
        packed = answer_logprobs_packed(model, items, force, max_tokens_per_batch=budget)
        for a, b in zip(packed, naive):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_packed_is_exact_under_eager_attention(tiny_dir):
    from l2t_core.models import load_policy

    m, _ = load_policy(tiny_dir)
    m.config._attn_implementation = "eager"
    rng = random.Random(3)
    items = [_item(rng, m.config.vocab_size, 4), _item(rng, m.config.vocab_size, 2)]
    for a, b in zip(answer_logprobs_packed(m, items, [1, 2]), answer_logprobs_naive(m, items, [1, 2])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_gains_are_differences_of_j():
    log_j = torch.log(torch.tensor([0.1, 0.4, 0.3, 0.9]))
    torch.testing.assert_close(fitting_gains(log_j), torch.tensor([0.3, -0.1, 0.6]), atol=1e-6, rtol=0)
    assert fitting_gains(torch.tensor([float("-inf"), 0.0])).tolist() == [1.0]  # J = 0 is legal


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gains_refuse_non_finite(bad):
    with pytest.raises(ValueError, match="NaN"):
        fitting_gains(torch.tensor([0.0, bad]))


def test_bad_items_fail_clearly(model):
    with pytest.raises(ValueError, match="non-decreasing"):
        answer_logprobs_packed(model, [JItem([1], [2, 3], [0, 3, 1], [4])], [5])
    with pytest.raises(ValueError, match="answer tokens"):
        answer_logprobs_packed(model, [JItem([1], [2, 3], [0, 2], [])], [5])
    with pytest.raises(ValueError, match="force-answer suffix"):
        answer_logprobs_packed(model, [JItem([1], [2, 3], [0, 2], [4])], [])


def test_monte_carlo_j_counts_verified_samples(model, tokenizer):
    ctx = tokenizer("Please output the final answer directly based on the above steps:")["input_ids"]
    always = monte_carlo_j(model, tokenizer, [ctx, ctx[:5]], ["1", "2"], lambda t, r: True, samples=3,
                           max_new_tokens=4, seed=0)
    never = monte_carlo_j(model, tokenizer, [ctx], ["1"], lambda t, r: False, samples=3, max_new_tokens=4, seed=0)
    assert always.tolist() == [1.0, 1.0] and never.tolist() == [0.0]
    # a verifier that accepts only the reference "2" sees exactly the samples of context 2
    seen = []
    monte_carlo_j(model, tokenizer, [ctx, ctx], ["a", "b"], lambda t, r: seen.append(r) or False, samples=2,
                  max_new_tokens=2, seed=0)
    assert seen == ["a", "a", "b", "b"]


def test_monte_carlo_j_without_an_engine_keeps_to_its_token_budget(model, tokenizer, monkeypatch):
    """Without the trainer's engine, monte_carlo_j's own hf engine cuts its generate calls to
    max_batch_tokens KV-cache positions (sequences × (longest context + new-token limit)); the
    reward pass gives it RewardConfig.fitting.max_tokens_per_batch."""
    from l2t_core.config import RewardConfig
    from l2t_core.rewards.l2t import Rollout, compute_rewards

    ctx = tokenizer("Please output the final answer directly based on the above steps:")["input_ids"]
    contexts = [ctx, ctx[:8], ctx[:6], ctx[:4]]
    calls = []
    real = model.generate

    def spy(*args, **kw):
        calls.append(kw["input_ids"].shape[0] * kw.get("num_return_sequences", 1) * (kw["input_ids"].shape[1] + 3))
        return real(*args, **kw)

    monkeypatch.setattr(model, "generate", spy)
    monte_carlo_j(model, tokenizer, contexts, ["1"] * 4, lambda t, r: False, samples=2, max_new_tokens=3, seed=0)
    assert len(calls) == 1
    calls.clear()
    budget = 2 * 2 * (len(ctx) + 3)  # two contexts of two samples each at the most
    monte_carlo_j(model, tokenizer, contexts, ["1"] * 4, lambda t, r: False, samples=2, max_new_tokens=3, seed=0,
                  max_batch_tokens=budget)
    assert len(calls) >= 2 and max(calls) <= budget, calls
    calls.clear()
    cfg = RewardConfig.model_validate({"fitting": {"estimator": "monte_carlo", "mc_samples": 2, "mc_max_new_tokens": 3,
                                                   "max_tokens_per_batch": budget}})
    rollout = Rollout(prompt_ids=ctx[:4], response_ids=ctx[4:20], response_text=tokenizer.decode(ctx[4:20]),
                      reference="1", group_id=0)
    compute_rewards(model, tokenizer, [rollout, rollout], "l2t_no_penalty", cfg)
    assert len(calls) >= 2 and max(calls) <= budget, calls


def test_monte_carlo_j_samples_a_repeated_context_once(model, tokenizer):
    """The prompt is s_1 of every response in a group: a context given again with the same cap and
    reference is sampled once (the engine sees it once) and every copy gets its J."""
    from l2t_core.rollout.hf import HFRolloutEngine

    class Spy(HFRolloutEngine):
        def continue_from(self, contexts, params, **kw):
            asked.append([list(c) for c in contexts])
            return super().continue_from(contexts, params, **kw)

    asked = []
    ctx = tokenizer("Please output the final answer directly based on the above steps:")["input_ids"]
    contexts, caps = [ctx, ctx[:5], ctx, ctx, ctx[:5]], [4, 4, 4, 2, 4]
    verified = []
    j = monte_carlo_j(model, tokenizer, contexts, ["r"] * 5, lambda t, r: verified.append(t) or len(t) % 2 == 0,
                      samples=3, max_new_tokens=4, seed=0, caps=caps, engine=Spy(model, tokenizer))
    assert asked == [[ctx, ctx[:5], ctx]]  # the third context differs from the first by its cap
    assert len(verified) == 3 * 3
    assert j[2] == j[0] and j[4] == j[1]
    hand = [sum(len(t) % 2 == 0 for t in verified[3 * u:3 * u + 3]) / 3 for u in range(3)]
    assert j.tolist() == pytest.approx([hand[0], hand[1], hand[0], hand[2], hand[1]])


def test_monte_carlo_j_caps_cut_each_contexts_generations_to_its_budget():
    """The continuation estimator's caps: each context is sampled only up to its cap (the engine
    is asked for that many new tokens), its samples are those of the uncapped batch cut there (the
    same batch, so the same stream), a context with no budget left (cap <= 0) is never sampled
    (J = 0), and batching keeps the order of contexts and samples. (A character tokenizer, so that
    a cut sample decodes to a prefix of the whole one; a random model may sample lone bytes, which
    decode to one replacement character each, so the cut is checked as a strict prefix.)"""
    from l2t_core.models import build_char_tokenizer, build_tiny_qwen2
    from l2t_core.rollout.hf import HFRolloutEngine

    class Spy(HFRolloutEngine):
        def continue_from(self, contexts, params, **kw):
            asked.append(([list(c) for c in contexts], kw.get("max_new_tokens")))
            return super().continue_from(contexts, params, **kw)

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=24, seed=2).eval()
    ctx = tokenizer("from 6: >> >", add_special_tokens=False)["input_ids"]
    full, capped, asked = [], [], []
    monte_carlo_j(model, tokenizer, [ctx, ctx[:6]], ["a", "b"], lambda t, r: full.append((r, t)) or False,
                  samples=2, max_new_tokens=5, seed=3, caps=[5, 5])
    j = monte_carlo_j(model, tokenizer, [ctx, ctx[:6], ctx], ["a", "b", "c"],
                      lambda t, r: capped.append((r, t)) or True, samples=2, max_new_tokens=5, seed=3,
                      caps=[2, 5, 0], engine=Spy(model, tokenizer))
    assert j.tolist() == [1.0, 1.0, 0.0]  # the third context had no budget left: never sampled, never verified
    assert asked == [([ctx, ctx[:6]], [2, 5])]  # each context asks for its cap only
    assert [r for r, _ in capped] == ["a", "a", "b", "b"]
    for (_, cut), (_, whole) in zip(capped[:2], full[:2]):  # the same samples, cut to 2 tokens
        assert whole.startswith(cut)
    assert any(len(w) > len(c) for (_, w), (_, c) in zip(full[:2], capped[:2]))  # ...and the cut cut something
    assert capped[2:] == full[2:4]  # a cap of max_new_tokens cuts nothing
    seen = []
    monte_carlo_j(model, tokenizer, [ctx, ctx[:6], ctx[:3]], ["a", "b", "c"], lambda t, r: seen.append(r) or False,
                  samples=2, max_new_tokens=3, seed=0, caps=[3, 3, 3], batch_contexts=2)
    assert seen == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(ValueError, match="a cap of 9 tokens exceeds max_new_tokens=5"):
        monte_carlo_j(model, tokenizer, [ctx], ["a"], lambda t, r: True, max_new_tokens=5, caps=[9])
    with pytest.raises(ValueError, match="1 contexts but 2 caps"):
        monte_carlo_j(model, tokenizer, [ctx], ["a"], lambda t, r: True, caps=[1, 2])
