"""The ``hf`` rollout engine on CPU: group order, seeding, the caller's RNG, left padding against a
manual greedy loop, the ``finished`` flag, chunking and the prompt checks."""

from __future__ import annotations

import copy

import pytest
import torch

from l2t_core.rollout import SamplingParams
from l2t_core.rollout.hf import HFRolloutEngine

TEXTS = ["Let x = 5.", "Compute (3 + 4) * 2.", "Please output the final answer directly based on the above steps:"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ps = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in ps}) == 3  # three lengths: the batch needs left padding
    return ps


def _ids(groups):
    return [[c.response_ids for c in g] for g in groups]


def _greedy_manual(model, prompt, steps, eos):
    """Argmax over full forward passes of the prompt alone (no padding, no KV cache)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_groups_follow_prompt_order_and_echo_prompts(model, tokenizer, prompts):
    eng = HFRolloutEngine(model, tokenizer)
    groups = eng.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=1))
    assert [len(g) for g in groups] == [3, 3, 3]
    for g, p in zip(groups, prompts):
        for c in g:
            assert c.prompt_ids == list(p) and isinstance(c.prompt_ids, list)
            assert all(isinstance(t, int) for t in c.response_ids)
            assert tokenizer.eos_token_id not in c.response_ids
            assert len(c.response_ids) <= 10 and (c.finished or len(c.response_ids) == 10)
            assert c.text == tokenizer.decode(c.response_ids, skip_special_tokens=True)
    # greedy completions do not depend on the batch around them: reversing the prompts reverses the groups
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=6)
    assert _ids(eng.generate(prompts[::-1], greedy)) == _ids(eng.generate(prompts, greedy))[::-1]


def test_seeding_is_per_call_and_leaves_the_caller_rng_alone(model, tokenizer, prompts):
    eng = HFRolloutEngine(model, tokenizer)
    sp = lambda seed: SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=seed)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = _ids(eng.generate(prompts, sp(7)))
    assert torch.equal(state, torch.get_rng_state())
    b = _ids(eng.generate(prompts, sp(8)))
    c = _ids(eng.generate(prompts, sp(7)))  # no state carried over from the calls before
    assert a == c
    assert a != b
    assert len({tuple(r) for g in a for r in g}) > 1  # the n samples differ from one another
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    eng.generate(prompts, sp(9))
    assert torch.equal(torch.rand(3), expected)


def test_greedy_equals_a_manual_argmax_loop_despite_left_padding(model, tokenizer, prompts):
    eng = HFRolloutEngine(model, tokenizer)
    groups = eng.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8))
    for g, p in zip(groups, prompts):
        want = _greedy_manual(model, p, 8, tokenizer.eos_token_id)
        assert g[0].response_ids == want
        assert g[0].finished == (len(want) < 8)


def test_greedy_with_several_samples_repeats_the_greedy_completion(model, tokenizer, prompts):
    groups = HFRolloutEngine(model, tokenizer).generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=4))
    assert all(len(g) == 2 and g[0].response_ids == g[1].response_ids for g in groups)


def test_chunking_gives_the_same_greedy_completions(model, tokenizer, prompts):
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=6)
    one_batch = _ids(HFRolloutEngine(model, tokenizer, max_batch_sequences=256).generate(prompts, greedy))
    for size in (1, 2):
        chunked = HFRolloutEngine(model, tokenizer, max_batch_sequences=size).generate(prompts, greedy)
        assert _ids(chunked) == one_batch


def test_batch_chunks_keep_each_generate_call_within_the_token_budget():
    """KV-cache positions of a batch = sequences × (longest prompt + largest limit); a batch ends
    before it would pass max_tokens, a prompt over it alone runs alone; None: sequences only."""
    from l2t_core.rollout.hf import batch_chunks

    lengths, limits = [10, 12, 5000, 11, 4990], [4] * 5
    order = sorted(range(5), key=lambda i: lengths[i])  # 0, 3, 1, 4, 2
    assert batch_chunks(order, lengths, limits, 2, 256) == [[0, 3, 1, 4, 2]]
    assert batch_chunks(order, lengths, limits, 2, 2) == [[0, 3], [1, 4], [2]]
    assert batch_chunks(order, lengths, limits, 2, 256, max_tokens=20_016) == [[0, 3, 1], [4, 2]]  # 2·2·5004
    assert batch_chunks(order, lengths, limits, 2, 256, max_tokens=20_015) == [[0, 3, 1], [4], [2]]
    assert batch_chunks(order, lengths, limits, 2, 256, max_tokens=200) == [[0, 3, 1], [4], [2]]
    # the largest limit counts too: prompt 3's 30 new tokens leave no room for a third row
    assert batch_chunks(order, lengths, [4, 4, 4, 30, 4], 2, 256, max_tokens=200) == [[0, 3], [1], [4], [2]]
    assert batch_chunks(order, lengths, limits, 2, 2, max_tokens=10**9) == [[0, 3], [1, 4], [2]]


def test_a_token_budget_splits_calls_and_keeps_the_greedy_completions(model, tokenizer, prompts, monkeypatch):
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=5)
    want = _ids(HFRolloutEngine(model, tokenizer).generate(prompts, greedy))
    seen = []
    real = model.generate

    def spy(*args, **kw):
        seen.append(kw["input_ids"].shape)
        return real(*args, **kw)

    monkeypatch.setattr(model, "generate", spy)
    budget = 2 * (len(prompts[1]) + 5)  # greedy: one sequence a prompt; the two shorter prompts fit, not all three
    got = HFRolloutEngine(model, tokenizer, max_batch_tokens=budget).generate(prompts, greedy)
    assert _ids(got) == want and len(seen) == 2 and all(r * (w + 5) <= budget or r == 1 for r, w in seen)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        HFRolloutEngine(model, tokenizer, max_batch_tokens=0)


def test_batches_take_the_shortest_prompts_first_and_return_the_given_order(model, tokenizer, prompts, monkeypatch):
    """Prompts are batched shortest first (a batch of response prefixes of one length ends about
    together) with at most max_batch_sequences sequences, the call's setting over the engine's;
    the completions still come back in the order given."""
    long_, short, mid = prompts[2], prompts[0], prompts[1]
    given = [long_, short, mid]
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=5)
    want = _ids(HFRolloutEngine(model, tokenizer).generate(given, greedy))
    seen = []
    real = model.generate

    def spy(*args, **kw):
        seen.append((kw["input_ids"].shape[0], kw["input_ids"].shape[1], kw["num_return_sequences"]))
        return real(*args, **kw)

    monkeypatch.setattr(model, "generate", spy)
    eng = HFRolloutEngine(model, tokenizer, max_batch_sequences=256)
    groups = eng.generate(given, greedy, max_batch_sequences=2)  # greedy: one sequence a prompt, two a batch
    assert seen == [(2, len(mid), 1), (1, len(long_), 1)]
    assert [g[0].prompt_ids for g in groups] == [list(p) for p in given] and _ids(groups) == want
    seen.clear()
    sampled = eng.continue_from(given, SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=4),
                                max_batch_sequences=4)  # two samples a prompt: two prompts a batch
    assert seen == [(2, len(mid), 2), (1, len(long_), 2)]
    assert [[c.prompt_ids for c in g] for g in sampled] == [[list(p)] * 2 for p in given]
    seen.clear()
    eng.generate(given, greedy)  # the engine's own setting: one batch
    assert seen == [(3, len(long_), 1)]


def test_per_prompt_token_limits_cut_each_row_and_run_the_batch_to_the_largest(model, tokenizer, prompts,
                                                                                monkeypatch):
    """``max_new_tokens`` per prompt: one batch runs to its largest limit, so its rows are the
    unlimited batch's, each cut at its own limit (and not finished where cut); bad limits fail."""
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=1)
    eng = HFRolloutEngine(model, tokenizer)
    whole = eng.generate(prompts, sp)
    limits = [1, 6, 3]
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: seen.append(kw["max_new_tokens"]) or real(*a, **kw))
    cut = eng.continue_from(prompts, sp, max_new_tokens=limits)
    assert seen == [6]
    for g_cut, g_whole, lim in zip(cut, whole, limits):
        for c, w in zip(g_cut, g_whole):
            assert c.response_ids == w.response_ids[:lim]
            assert c.finished == (w.finished and len(w.response_ids) < lim)
    assert any(len(w.response_ids) > 1 for w in whole[0])  # the first limit did cut something
    seen.clear()
    eng.generate(prompts[:1], sp, max_new_tokens=[2])  # a batch of short limits stops early
    assert seen == [2]
    for bad, msg in (([1, 2], "2 max_new_tokens limits for 3 prompts"), ([1, 0, 2], r"max_new_tokens\[1\] = 0"),
                     ([1, 7, 2], r"outside 1\.\.6")):
        with pytest.raises(ValueError, match=msg):
            eng.generate(prompts, sp, max_new_tokens=bad)


def test_finished_flag_eos_stripping_and_max_new_tokens(model, tokenizer, prompts):
    eos = tokenizer.eos_token_id
    biased = copy.deepcopy(model)
    bias = {"value": 4.4}  # the tiny model's logits are nearly flat: P(eos) is about 0.2 a step

    def add_eos_bias(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos] += bias["value"]
        return logits

    biased.lm_head.register_forward_hook(add_eos_bias)
    eng = HFRolloutEngine(biased, tokenizer)
    groups = eng.generate(prompts, SamplingParams(n=16, temperature=1.0, max_new_tokens=6, seed=3))
    flat = [c for g in groups for c in g]
    assert any(c.finished for c in flat) and not all(c.finished for c in flat)
    for c in flat:
        assert eos not in c.response_ids and tokenizer.pad_token_id not in c.response_ids
        assert (len(c.response_ids) < 6) if c.finished else (len(c.response_ids) == 6)
    bias["value"] = 1e4  # eos always wins: every completion is empty and finished
    for g in eng.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6)):
        assert [(c.response_ids, c.text, c.finished) for c in g] == [([], "", True)] * 2
    bias["value"] = -1e4  # eos never wins: every completion runs to max_new_tokens
    for g in eng.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=5)):
        assert len(g[0].response_ids) == 5 and not g[0].finished


def test_model_mode_is_restored_and_sync_weights_switches_module(model, tokenizer, prompts):
    m = copy.deepcopy(model)
    eng = HFRolloutEngine(m, tokenizer)
    m.train()
    eng.generate(prompts[:1], SamplingParams(n=1, temperature=0, max_new_tokens=2))
    assert m.training
    m.eval()
    eng.generate(prompts[:1], SamplingParams(n=1, temperature=0, max_new_tokens=2))
    assert not m.training
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1.0)  # argmax becomes argmin: the first greedy token changes
    eng.sync_weights(other)
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=3)
    got = eng.generate(prompts, greedy)
    assert [g[0].response_ids for g in got] == [_greedy_manual(other, p, 3, tokenizer.eos_token_id) for p in prompts]


def test_prompt_checks_fail_with_clear_messages(model, tokenizer):
    eng = HFRolloutEngine(model, tokenizer, max_prompt_tokens=4)
    sp = SamplingParams(n=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts to generate from"):
        eng.generate([], sp)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        eng.generate([[5, 6], []], sp)
    with pytest.raises(ValueError, match=r"prompt 0 has 5 tokens, over the limit of 4.*rollout\.max_prompt_tokens"):
        eng.generate([[1, 2, 3, 4, 5]], sp)
    assert len(eng.generate([[5, 6, 7, 8]], sp)[0]) == 1  # exactly at the limit is fine

    class NoEos:
        eos_token_id = None
        pad_token_id = None

    with pytest.raises(ValueError, match="no eos token"):
        HFRolloutEngine(model, NoEos())


def test_checkpoint_generation_config_does_not_change_sampling(model, tokenizer, prompts):
    m = copy.deepcopy(model)
    m.generation_config.repetition_penalty = 50.0  # as a Qwen2.5-Instruct generation_config.json sets 1.05
    got = HFRolloutEngine(m, tokenizer).generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8))
    assert [g[0].response_ids for g in got] == [_greedy_manual(m, p, 8, tokenizer.eos_token_id) for p in prompts]
