"""Typed config validation and the whole reward path on bad inputs (METHOD.md §1–§6)."""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from l2t_core.config import CompressionConfig, CreditConfig, RewardConfig, TrainConfig
from l2t_core.rewards.l2t import METHODS, Rollout, compute_rewards, response_offsets
from l2t_core.verify import NumericVerifier, Verdict

GOOD = "<think>\n<episode_1>3 + 4 = 7</episode_1>\n<episode_2>7 * 2 = 14</episode_2>\n</think>\n\n\\boxed{14}"
REDUNDANT = ("<think>\n<episode_1>3 + 4 = 7</episode_1>\n<episode_2>Check: 3 + 4 = 7</episode_2>\n"
             "<episode_3>7 * 2 = 14</episode_3>\n</think>\n\n\\boxed{14}")
BAD_INPUTS = {
    "empty": "",
    "no_think": "7 * 2 = 14 so \\boxed{14}",
    "unclosed_tags": "<think><episode_1>3 + 4 = 7<episode_2>",
    "no_answer": "<think>thinking</think>",
    "huge_episode": "<think><episode_1>" + "x" * 5000 + "</episode_1></think>\\boxed{1}",
    "binary_junk": "\x00\x01\ufffd<episode_9></think></think>\\boxed{",
}


def test_defaults_are_the_papers():
    c = RewardConfig()
    assert (c.credit.alpha, c.credit.beta, c.compression.damping, c.compression.rank_frac) == (0.8, 0.6, 1e-5, 0.05)
    assert (c.loss.clip_low, c.loss.clip_high, c.loss.kl_coef) == (0.2, 0.2, 0.001)
    assert c.segmentation.max_episodes == 30 and c.fitting.estimator == "answer_logprob"
    assert RewardConfig.model_validate(json.loads(c.model_dump_json())) == c  # round-trips


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="beta"):
        CreditConfig(beta=-0.1)
    with pytest.raises(ValidationError, match="bogus"):
        CreditConfig(bogus=1)
    with pytest.raises(ValidationError, match="score_agg"):
        CreditConfig(score_agg="median")
    with pytest.raises(ValidationError, match="rank_frac"):
        CompressionConfig(rank_frac=0.0)


def _rollouts(tokenizer, texts, ref="14"):
    prompt = tokenizer("Compute (3 + 4) * 2.")["input_ids"]
    return [Rollout(prompt, tokenizer(t, add_special_tokens=False)["input_ids"], t, ref, i // 4)
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_finite_rewards_on_bad_inputs(model, tokenizer, method):
    texts = [GOOD, REDUNDANT] + list(BAD_INPUTS.values())
    # one sample per prefix: MRT's Monte Carlo J pads every prefix to the 5,000-token episode's
    cfg = RewardConfig(fitting={"mc_samples": 1, "mc_max_new_tokens": 4})
    batch = compute_rewards(model, tokenizer, _rollouts(tokenizer, texts), method, cfg, verifier=NumericVerifier())
    assert len(batch.responses) == len(texts)
    for text, r in zip(texts, batch.responses):
        assert torch.isfinite(torch.as_tensor(r.score)) and torch.isfinite(r.token_advantage).all()
        assert len(r.token_advantage) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert len(r.gains) == len(r.penalties_hat) == r.segmentation.num_episodes
    by = dict(zip(["good", "redundant"] + list(BAD_INPUTS), batch.responses))
    assert by["good"].outcome == 1.0 and by["redundant"].outcome == 1.0 and by["no_answer"].outcome == 0.0
    assert by["empty"].segmentation.status == "empty" and by["unclosed_tags"].segmentation.status == "malformed"
    if method.startswith("l2t"):
        for r in batch.responses:
            if len(r.token_advantage):  # the token mean of A_{i,t} is A_i
                assert r.token_advantage.mean().item() == pytest.approx(r.advantage, abs=1e-9)
    if method in ("l2t", "l2t_random_layers"):
        totals = torch.stack([r.penalties_hat.sum() for r in batch.responses])
        assert totals.mean().item() == pytest.approx(1.0)  # the average response pays 1
    else:
        assert all(float(r.penalties_hat.abs().sum()) == 0.0 for r in batch.responses)


def test_continuation_estimator_continues_each_prefix_without_the_force_suffix(model, tokenizer, monkeypatch):
    """fitting.estimator = continuation: J at every boundary b from the policy's own continuations of
    prompt ⊕ response[:b] (no force-answer suffix), each cut at continuation_budget − b tokens; the
    gains are the differences of those J. The real sampler runs too, on the tiny model."""
    import l2t_core.rewards.l2t as l2t_rewards
    from l2t_core.config import TrainConfig

    rollouts = _rollouts(tokenizer, [GOOD, REDUNDANT])
    cfg = RewardConfig(fitting={"estimator": "continuation", "mc_samples": 2, "continuation_budget": 60,
                                "continuation_batch": 3})
    calls = []

    def fake(model_, tok_, contexts, refs, verify, **kw):
        calls.append((contexts, refs, kw))
        return torch.linspace(0.1, 0.9, len(contexts))

    monkeypatch.setattr(l2t_rewards, "monte_carlo_j", fake)
    batch = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    (contexts, refs, kw), = calls
    want, caps = [], []
    for r, x in zip(rollouts, batch.responses):
        b = [0] + [len(tokenizer(r.response_text[:c], add_special_tokens=False)["input_ids"])
                   for c in x.segmentation.boundaries]
        want += [list(r.prompt_ids) + list(r.response_ids[:k]) for k in b]
        caps += [60 - k for k in b]
    assert contexts == want and refs == ["14"] * len(want)
    assert kw["caps"] == caps and kw["max_new_tokens"] == 60 and kw["samples"] == 2 and kw["batch_contexts"] == 3
    j = torch.linspace(0.1, 0.9, len(contexts))
    k0 = batch.responses[0].segmentation.num_episodes
    assert batch.responses[0].gains.tolist() == pytest.approx((j[1:k0 + 1] - j[:k0]).tolist(), abs=1e-6)
    # the samples' seed: the step by default, or the rank's own (the trainer's ranks other than 0)
    assert kw["seed"] == 0
    for extra, seed in (({"step": 4}, 4), ({"step": 4, "sample_seed": 9}, 9)):
        compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier(), **extra)
        assert calls[-1][2]["seed"] == seed
    monkeypatch.undo()
    real = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    for r in real.responses:
        assert torch.isfinite(r.token_advantage).all() and all(-1.0 <= g <= 1.0 for g in r.gains.tolist())
    # through a rollout engine (the trainer passes its own): continue_from, past the prompt limit
    from l2t_core.rollout.base import SamplingParams
    from l2t_core.rollout.hf import HFRolloutEngine

    class Parity(NumericVerifier):  # a random tiny model never boxes 14: accept by the text's parity instead
        def verify(self, response, reference):
            return Verdict(len(response) % 2 == 0, "correct" if len(response) % 2 == 0 else "incorrect")

    engine = HFRolloutEngine(model, tokenizer, max_prompt_tokens=8)  # every context is longer
    via = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=Parity(), sampler=engine, step=5)
    assert engine.max_prompt_tokens == 8  # the limit is back for the rollouts
    with pytest.raises(ValueError, match="over the limit of 8"):
        engine.generate(contexts[:1], SamplingParams(n=1, max_new_tokens=2))
    free = HFRolloutEngine(model, tokenizer)  # by hand: the same seeded samples, cut at each cap, verified
    # the prompt (s_1 of both responses) is sampled once; then continuation_batch contexts x mc_samples a batch
    assert contexts[0] == contexts[k0 + 1] and caps[0] == caps[k0 + 1]
    unique = list(dict.fromkeys((tuple(c), cap) for c, cap in zip(contexts, caps)))
    assert len(unique) < len(contexts)  # (the two responses share more than their prompt)
    unique = [u for u in unique if u[1] > 0]  # no budget left: not sampled (J = 0)
    # each context generates up to its cap only
    groups = free.generate([list(c) for c, _ in unique], SamplingParams(n=2, temperature=1.0, max_new_tokens=60, seed=5),
                           max_batch_sequences=3 * 2, max_new_tokens=[cap for _, cap in unique])
    of = dict(zip(unique, groups))
    texts = [[tokenizer.decode(c.response_ids, skip_special_tokens=True) for c in of[(tuple(ctx), cap)]]
             if cap > 0 else [] for ctx, cap in zip(contexts, caps)]
    j_hand = torch.tensor([sum(len(t) % 2 == 0 for t in ts) / 2 if cap > 0 else 0.0 for ts, cap in zip(texts, caps)])
    assert 0 < float(j_hand.mean()) < 1  # not all alike: the comparison can fail
    n0 = k0 + 1  # J at the first response's K + 1 boundaries, then the second's
    for r, js in ((via.responses[0], j_hand[:n0]), (via.responses[1], j_hand[n0:])):
        assert r.gains.tolist() == pytest.approx((js[1:] - js[:-1]).tolist(), abs=1e-6)
    # the budget may not exceed the rollouts' own
    with pytest.raises(ValidationError, match=r"continuation_budget \(60\) exceeds rollout.max_new_tokens \(40\)"):
        TrainConfig(policy="p", reward=cfg, rollout={"max_new_tokens": 40})


def test_temperatures_the_vllm_engine_would_change_are_refused_before_any_compute():
    """vLLM samples any temperature in (0, 0.01) at 0.01; a vllm run asking for one (to roll out,
    or to sample J's continuations) is refused by its config, naming the field; hf keeps them."""
    TrainConfig(policy="p", rollout={"engine": "hf", "temperature": 0.005})
    TrainConfig(policy="p", rollout={"engine": "vllm", "temperature": 0.0})  # greedy
    with pytest.raises(ValidationError, match=r"rollout.temperature=0.005 with the vllm engine"):
        TrainConfig(policy="p", rollout={"engine": "vllm", "temperature": 0.005})
    cont = {"fitting": {"estimator": "continuation", "mc_temperature": 0.001, "continuation_budget": 16}}
    with pytest.raises(ValidationError, match=r"reward.fitting.mc_temperature=0.001 with the vllm engine"):
        TrainConfig(policy="p", reward=cont, rollout={"engine": "vllm", "max_new_tokens": 16})
    TrainConfig(policy="p", reward={"fitting": {"mc_temperature": 0.001}}, rollout={"engine": "vllm"})  # not sampled


@pytest.mark.parametrize("method,estimator", [("l2t", "monte_carlo"), ("mrt", "answer_logprob"),
                                              ("l2t", "continuation")])
def test_sampled_contexts_fit_the_engines_model_length(model, tokenizer, monkeypatch, method, estimator):
    """The longest sequence the reward pass asks a rollout engine for (a context plus its new
    tokens) fits ``longest_sampled_sequence``, which sizes vLLM's ``max_model_len``; under the
    monte_carlo J (and MRT) the forced answers reach past a rollout's own length."""
    import l2t_core.rewards.l2t as l2t_rewards
    from l2t_core.prompts import FORCE_ANSWER_SUFFIX

    rollouts = _rollouts(tokenizer, [GOOD, REDUNDANT])
    longest_response = max(len(r.response_ids) for r in rollouts)
    cfg = RewardConfig(fitting={"estimator": estimator, "mc_max_new_tokens": 7,
                                "continuation_budget": longest_response})
    seen = []

    def fake(model_, tok_, contexts, refs, verify, *, max_new_tokens, caps=None, **kw):
        caps = caps or [max_new_tokens] * len(contexts)
        seen.append(max(len(c) + min(cap, max_new_tokens) for c, cap in zip(contexts, caps)))
        return torch.full((len(contexts),), 0.5)

    monkeypatch.setattr(l2t_rewards, "monte_carlo_j", fake)
    compute_rewards(model, tokenizer, rollouts, method, cfg, verifier=NumericVerifier())
    force_len = len(tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"])
    bound = l2t_rewards.longest_sampled_sequence(method, cfg, len(rollouts[0].prompt_ids), longest_response, force_len)
    rollout_len = len(rollouts[0].prompt_ids) + longest_response
    assert len(seen) == 1 and seen[0] <= bound
    if estimator == "continuation":  # prefix + continuation stay within a rollout's budget
        assert bound == rollout_len
    else:  # a forced answer after the last episode reaches past the rollout's own length
        assert seen[0] > rollout_len


def test_l2t_gains_telescope_to_j_difference(model, tokenizer):
    batch = compute_rewards(model, tokenizer, _rollouts(tokenizer, [GOOD, REDUNDANT]), "l2t", verifier=NumericVerifier())
    for r in batch.responses:
        j = torch.exp(r.log_j.double())
        assert r.gains.sum().item() == pytest.approx((j[-1] - j[0]).item(), abs=1e-6)
        # sum aggregation = r_out + α Σ r_prg
    cfg = RewardConfig(credit={"score_agg": "sum"})
    s = compute_rewards(model, tokenizer, _rollouts(tokenizer, [GOOD]), "l2t", cfg, verifier=NumericVerifier())
    r = s.responses[0]
    assert r.score == pytest.approx(r.outcome + 0.8 * float(r.process.sum()))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reward_pass_with_a_chunked_head_gives_the_same_rewards(model, tokenizer, temperature):
    """head_chunk_tokens changes how the policy pass holds its logits, not what it computes: the
    same J, penalties (their truncated backward runs through the checkpointed chunks), log π_old
    and advantages."""
    rollouts = _rollouts(tokenizer, [GOOD, REDUNDANT, GOOD, REDUNDANT])
    calls = {None: 0, 3: 0}
    out = {}
    for c in calls:
        handle = model.get_output_embeddings().register_forward_hook(
            lambda *_, c=c: calls.__setitem__(c, calls[c] + 1))
        try:
            out[c] = compute_rewards(model, tokenizer, rollouts, "l2t", verifier=NumericVerifier(),
                                     temperature=temperature, head_chunk_tokens=c)
        finally:
            handle.remove()
    whole, chunked = out[None], out[3]
    assert calls[3] > calls[None] + 10  # many small chunks, each also recomputed in the backward
    for a, b in zip(whole.responses, chunked.responses):
        for field in ("log_j", "penalties", "penalties_hat", "logp_old", "token_advantage"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-7, msg=field)
        assert float(a.penalties.abs().max()) > 0


def test_unknown_method_and_empty_batch(model, tokenizer):
    with pytest.raises(ValueError, match="unknown method"):
        compute_rewards(model, tokenizer, _rollouts(tokenizer, [GOOD]), "ppo")
    with pytest.raises(ValueError, match="no rollouts"):
        compute_rewards(model, tokenizer, [], "l2t")
    with pytest.raises(ValueError, match="reference answer is empty"):
        compute_rewards(model, tokenizer, _rollouts(tokenizer, [GOOD], ref=" "), "l2t")


def test_offsets_for_non_canonical_token_sequences(tokenizer):
    text = "ab"
    ids = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert response_offsets(tokenizer, text, ids) == [(0, 1), (1, 2)]


def test_additive_credit_through_the_reward_path(model, tokenizer):
    texts = [GOOD, REDUNDANT] + list(BAD_INPUTS.values())
    cfg = RewardConfig(credit={"credit": "additive", "process_coef": 0.5})
    batch = compute_rewards(model, tokenizer, _rollouts(tokenizer, texts), "l2t", cfg, verifier=NumericVerifier())
    from l2t_core.advantages import grpo_advantages

    outcomes = torch.tensor([r.outcome for r in batch.responses], dtype=torch.float64)
    groups = torch.tensor([i // 4 for i in range(len(texts))])
    # the response-level advantage is the outcome's GRPO advantage
    torch.testing.assert_close(torch.tensor([r.advantage for r in batch.responses], dtype=torch.float64),
                               grpo_advantages(outcomes, groups))
    for r in batch.responses:
        assert torch.isfinite(r.token_advantage).all()
        if r.segmentation.num_episodes > 1:
            ids = torch.as_tensor(r.tokens.episode_ids)
            per_ep = [r.token_advantage[ids == k].unique() for k in range(r.segmentation.num_episodes)]
            assert all(len(u) == 1 for u in per_ep)  # constant within an episode


def test_additive_credit_with_a_length_penalised_outcome(model, tokenizer):
    """additive_outcome='length_penalty': the outcome term is the GRPO advantage of the length
    baseline's reward (a longer correct response scores less), the process term is unchanged."""
    from l2t_core.advantages import grpo_advantages
    from l2t_core.rewards.baselines import length_penalty_rewards

    texts = [GOOD, REDUNDANT, GOOD.replace("{14}", "{15}"), BAD_INPUTS["no_answer"]]
    rollouts = _rollouts(tokenizer, texts)
    plain = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(credit={"credit": "additive"}),
                            verifier=NumericVerifier())
    cfg = RewardConfig(credit={"credit": "additive", "additive_outcome": "length_penalty"},
                       baselines={"length_penalty_alpha": 0.4})
    lp = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    outcomes = torch.tensor([r.outcome for r in lp.responses], dtype=torch.float64)
    assert outcomes.tolist() == [1.0, 1.0, 0.0, 0.0]
    lengths = torch.tensor([len(r.response_ids) for r in rollouts])
    assert lengths[1] > lengths[0]  # the redundant trace is the longer correct one
    groups = torch.zeros(4, dtype=torch.long)
    scores = length_penalty_rewards(outcomes, lengths, groups, 0.4)
    assert [r.score for r in lp.responses] == pytest.approx(scores.tolist())
    assert lp.responses[0].score > lp.responses[1].score > 0  # the longer correct response pays
    a = grpo_advantages(scores, groups)
    for n, (r, q) in enumerate(zip(lp.responses, plain.responses)):
        assert r.advantage == pytest.approx(float(a[n]))
        # same process term: the token advantages differ by the change of the outcome term alone
        torch.testing.assert_close(r.token_advantage - r.advantage, q.token_advantage - q.advantage)
    with pytest.raises(ValueError, match="additive_outcome='length_penalty' sets the outcome term"):
        RewardConfig(credit={"additive_outcome": "length_penalty"})


def test_correct_scope_through_the_reward_path(model, tokenizer):
    """process_scope='correct': a group with no correct response gets no advantage at all (the paper
    score ranks its wrong responses by their process reward), correct responses outscore wrong ones,
    and the per-episode rewards, penalty included, are those of the paper default."""
    wrong = [GOOD.replace("{14}", "{15}"), REDUNDANT.replace("{14}", "{13}"),
             BAD_INPUTS["unclosed_tags"], BAD_INPUTS["no_answer"]]
    texts = [GOOD, REDUNDANT, GOOD.replace("{14}", "{12}"), BAD_INPUTS["empty"]] + wrong
    rollouts = _rollouts(tokenizer, texts)
    paper = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(), verifier=NumericVerifier())
    cfg = RewardConfig(credit={"process_scope": "correct", "correct_bonus": 0.3},
                       compression={"penalty_norm": "group_response_mean"})
    scoped = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    assert [r.outcome for r in scoped.responses] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert any(abs(r.advantage) > 1e-3 for r in paper.responses[4:])  # the paper ranks the all-wrong group
    for r in scoped.responses[4:]:
        assert r.advantage == 0.0 and r.token_advantage.abs().max().item() == 0.0
    correct = [r.score for r in scoped.responses[:2]]
    assert sorted(correct) == pytest.approx([0.7, 1.3])  # min-max rank over the two correct: 1 ± bonus
    assert min(correct) > max(r.score for r in scoped.responses[2:4])
    # the paper order among the correct responses is kept
    assert (correct[0] > correct[1]) == (paper.responses[0].score > paper.responses[1].score)
    # credit='broadcast': the same scores and advantages, every token carries its response's advantage
    cfg_b = RewardConfig(credit={"process_scope": "correct", "correct_bonus": 0.3, "credit": "broadcast"},
                         compression={"penalty_norm": "group_response_mean"})
    bcast = compute_rewards(model, tokenizer, rollouts, "l2t", cfg_b, verifier=NumericVerifier())
    for r, rb in zip(scoped.responses, bcast.responses):
        assert rb.score == pytest.approx(r.score) and rb.advantage == pytest.approx(r.advantage)
        assert rb.token_advantage.tolist() == pytest.approx([r.advantage] * r.token_advantage.numel())
    assert any(not torch.allclose(r.token_advantage, rb.token_advantage)
               for r, rb in zip(scoped.responses, bcast.responses))  # the paper credit is not a broadcast
    with pytest.raises(ValidationError, match="process_scope"):
        CreditConfig(process_scope="correct", credit="additive")
    with pytest.raises(ValidationError, match="correct_bonus"):
        CreditConfig(correct_bonus=1.0)


def test_correct_floor_through_the_reward_path(model, tokenizer):
    """credit.correct_floor: the same scores, and every correct response's advantage (and token
    advantage) is the unfloored one clamped at 0, for L2T and the length penalty alike."""
    # a group whose responses are all correct (shaping alone ranks them), and one with wrong ones
    texts = [GOOD, REDUNDANT, GOOD, REDUNDANT, GOOD, REDUNDANT, GOOD.replace("{14}", "{12}"), BAD_INPUTS["empty"]]
    rollouts = _rollouts(tokenizer, texts)
    for method, credit in (("l2t", {"process_scope": "correct", "credit": "broadcast"}), ("length_penalty", {})):
        plain = compute_rewards(model, tokenizer, rollouts, method, RewardConfig(credit=credit),
                                verifier=NumericVerifier())
        floored = compute_rewards(model, tokenizer, rollouts, method,
                                  RewardConfig(credit={**credit, "correct_floor": True}), verifier=NumericVerifier())
        assert [r.outcome for r in plain.responses] == [1.0] * 6 + [0.0, 0.0]
        assert any(r.advantage < 0 for r in plain.responses[:4])  # correct responses pushed down
        assert all(r.advantage < 0 for r in plain.responses[6:])  # wrong ones too, and they stay so
        for p, f in zip(plain.responses, floored.responses):
            assert f.score == pytest.approx(p.score)
            want = max(p.advantage, 0.0) if p.outcome > 0 else p.advantage
            assert f.advantage == pytest.approx(want)
            assert f.token_advantage.tolist() == pytest.approx([want] * f.token_advantage.numel())


def _plain_reference(model, tokenizer, rollouts, teps, targets, basis):
    """The unfused path: a plain causal forward/backward per response for ‖g_k‖² and log π(z_t),
    and the naive per-prefix J."""
    from l2t_core.rewards import compression as comp

    sq, lps = [], []
    for r, te in zip(rollouts, teps):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        score = torch.zeros_like(ids, dtype=torch.bool)
        score[0, len(r.prompt_ids):] = True
        sig = comp.per_token_signals(model, ids, torch.ones_like(ids), score, targets)
        seg = torch.as_tensor(te.episode_ids)
        name = next(iter(targets))
        if basis is None:
            s = comp.full_episode_sqnorms(sig.inputs[name], sig.deltas[name], seg, te.num_episodes)
        else:
            s = comp.low_rank_episode_scores(sig.inputs[name], sig.deltas[name], basis, seg, te.num_episodes)
            s = s.double().pow(2).sum((1, 2))
        sq.append(s)
        lps.append(sig.logprobs)
    return sq, lps


def _two_groups_with_plain_rewards(model, tokenizer):
    """Two groups of a good and a redundant trace each (the second group's boxed answers changed)
    and their rewards under the paper-default L2T."""
    texts = [GOOD, REDUNDANT, GOOD.replace("{14}", "{12}"), REDUNDANT.replace("{14}", "{13}")]
    rollouts = _rollouts(tokenizer, texts)
    for i, r in enumerate(rollouts):
        r.group_id = i // 2
    return rollouts, compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(), verifier=NumericVerifier())


def test_penalty_clip_through_the_reward_path(model, tokenizer):
    from l2t_core.rewards import compression as comp

    rollouts, plain = _two_groups_with_plain_rewards(model, tokenizer)
    cfg = RewardConfig(compression={"penalty_clip": 0.5})
    clipped = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    hat = torch.cat([r.penalties_hat for r in plain.responses])
    k = [r.penalties_hat.numel() for r in plain.responses]
    want = comp.clip_penalties(hat, torch.repeat_interleave(torch.arange(4), torch.tensor(k)),
                               torch.tensor([0, 0, 1, 1]), 0.5)
    got = torch.cat([r.penalties_hat for r in clipped.responses])
    torch.testing.assert_close(got, want)
    assert (got < hat - 1e-12).any()  # c = 0.5 bites on these responses
    for a, b in zip(plain.responses, clipped.responses):  # the gains and raw P_k are untouched
        torch.testing.assert_close(a.gains, b.gains)
        torch.testing.assert_close(a.penalties, b.penalties)
    with pytest.raises(ValueError, match="penalty_clip"):
        RewardConfig(compression={"penalty_clip": -1.0})


def test_penalty_on_no_gain_through_the_reward_path(model, tokenizer):
    rollouts, plain = _two_groups_with_plain_rewards(model, tokenizer)
    gated = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(credit={"penalty_on": "no_gain"}),
                            verifier=NumericVerifier())
    beta = RewardConfig().credit.beta
    gains = torch.cat([r.gains for r in plain.responses]).double()
    assert (gains > 0).any()  # (the G_k <= 0 side: test_advantages, by hand)
    for a, b in zip(plain.responses, gated.responses):
        torch.testing.assert_close(a.penalties_hat, b.penalties_hat)  # the penalty itself is unchanged...
        g = a.gains.double()
        torch.testing.assert_close(b.process, torch.where(g > 0, g, g - beta * a.penalties_hat.double()))
        torch.testing.assert_close(a.process, g - beta * a.penalties_hat.double())  # ...only who pays it


def test_copy_share_through_the_reward_path(model, tokenizer):
    """reward.copying.coef γ charges each episode its copy share: r_k = G_k − β·P̂_k − γ·c_k, with c_k
    the brute-force share of its token pairs already in the prompt or the response before it; the
    gains and penalties are untouched, and the redundant trace's repeated episodes copy more."""
    from l2t_core.rewards.copying import context_overlap

    rollouts, plain = _two_groups_with_plain_rewards(model, tokenizer)
    cfg = RewardConfig(copying={"coef": 0.7})
    charged = compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier())
    for r, a, b in zip(rollouts, plain.responses, charged.responses):
        assert a.copies is None
        eid = np.asarray(b.tokens.episode_ids)
        want = []
        for k in range(b.tokens.num_episodes):
            at = np.flatnonzero(eid == k)
            want.append(context_overlap(list(r.prompt_ids) + list(r.response_ids[:at[0]]),
                                        [r.response_ids[t] for t in at]) if len(at) else 0.0)
        torch.testing.assert_close(b.copies, torch.tensor(want, dtype=torch.float64))
        torch.testing.assert_close(b.gains, a.gains)
        torch.testing.assert_close(b.penalties_hat, a.penalties_hat)
        torch.testing.assert_close(b.process, a.process - 0.7 * b.copies)
    good, redundant = charged.responses[0].copies, charged.responses[1].copies
    assert redundant.max() > good.max()  # the re-checks repeat what was said
    # no process reward, nothing to charge: the outcome-only methods ignore it, a TrainConfig refuses it
    grpo = compute_rewards(model, tokenizer, rollouts, "grpo", cfg, verifier=NumericVerifier())
    assert all(x.copies is None for x in grpo.responses)
    with pytest.raises(ValueError, match="reward.copying.coef .* method 'grpo'"):
        TrainConfig(method="grpo", policy="p", reward=cfg)
    TrainConfig(method="l2t_no_penalty", policy="p", reward=cfg)
    with pytest.raises(ValueError, match="ngram"):
        RewardConfig(copying={"ngram": 0})


@pytest.mark.parametrize("projected", [True, False])
def test_one_policy_pass_equals_separate_j_penalty_and_logp_passes(model, tokenizer, projected):
    """episode_pass takes J, ‖g_k‖² and log π(z_t) from ONE packed forward (and a truncated backward);
    each equals its separate computation on the plain causal layout, padded micro-batches included."""
    from l2t_core.episodes import segment, token_episode_ids
    from l2t_core.prompts import FORCE_ANSWER_SUFFIX, render_answer
    from l2t_core.rewards import compression as comp
    from l2t_core.rewards.fitting import JItem, answer_logprobs_naive
    from l2t_core.rewards.l2t import episode_pass

    texts = [GOOD, REDUNDANT, "", BAD_INPUTS["unclosed_tags"], GOOD + " and more words to pad"]
    rollouts = _rollouts(tokenizer, texts)
    teps = [token_episode_ids(segment(r.response_text), response_offsets(tokenizer, r.response_text, r.response_ids))
            for r in rollouts]
    force = tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    ans = tokenizer(render_answer("14"), add_special_tokens=False)["input_ids"]
    items = [JItem(r.prompt_ids, r.response_ids, te.boundaries.tolist(), ans) for r, te in zip(rollouts, teps)]
    targets = comp.resolve_targets(model, None)
    proxy = None
    if projected:
        proxy = comp.SVDProxy(rank_frac=0.05)
        proxy.refresh(targets, 0)
    basis = proxy.bases[next(iter(targets))] if projected else None
    for budget in (100_000, 150):  # one micro-batch with padding; one response per micro-batch
        res = episode_pass(model, rollouts, teps, tokenizer.pad_token_id or 0, budget, j_items=items, force_ids=force,
                           targets=targets, proxy=proxy)
        sq_ref, lp_ref = _plain_reference(model, tokenizer, rollouts, teps, targets, basis)
        j_ref = answer_logprobs_naive(model, items, force)
        for n in range(len(rollouts)):
            torch.testing.assert_close(res.log_j[n], j_ref[n], atol=1e-4, rtol=0)
            torch.testing.assert_close(res.sqnorms[n], sq_ref[n], atol=1e-9, rtol=1e-4)
            torch.testing.assert_close(res.logps[n], lp_ref[n], atol=1e-5, rtol=0)
        assert res.penalty_s > 0 and res.total_s >= res.penalty_s
    # without targets: a no-grad pass gives the same J and log-probabilities, and no penalty
    plain = episode_pass(model, rollouts, teps, 0, 100_000, j_items=items, force_ids=force)
    assert plain.sqnorms is None and plain.penalty_s == 0.0
    for n in range(len(rollouts)):
        torch.testing.assert_close(plain.log_j[n], res.log_j[n], atol=1e-5, rtol=0)
        torch.testing.assert_close(plain.logps[n], res.logps[n], atol=1e-5, rtol=0)


def test_full_layer_mode_is_the_unprojected_layer_penalty(model, tokenizer):
    """CompressionConfig.mode='full_layer' (project option) equals the rank-r proxy with r = full rank."""
    rollouts = _rollouts(tokenizer, [GOOD, REDUNDANT, GOOD + " x"])
    full = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(compression={"mode": "full_layer"}),
                           verifier=NumericVerifier())
    big = compute_rewards(model, tokenizer, rollouts, "l2t", RewardConfig(compression={"rank": 10_000}),
                          verifier=NumericVerifier())
    default = compute_rewards(model, tokenizer, rollouts, "l2t", verifier=NumericVerifier())
    for a, b, d in zip(full.responses, big.responses, default.responses):
        torch.testing.assert_close(a.penalties, b.penalties, rtol=1e-6, atol=1e-12)
        assert not torch.allclose(a.penalties, d.penalties)  # r = 5 % is a different estimate
    with pytest.raises(ValidationError, match="mode"):
        CompressionConfig(mode="random_layers")  # the ablation is the method l2t_random_layers


def test_compression_target_pattern_in_the_reward_path(model, tokenizer):
    """compression.targets as a pattern (every block's down-projection) runs through compute_rewards
    like the explicit list of names, and adds every block's ‖g_k‖² to the last block's."""
    from l2t_core.rewards import compression as comp

    rollouts = _rollouts(tokenizer, [GOOD, REDUNDANT])
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(model.config.num_hidden_layers)]

    def run(targets):
        cfg = RewardConfig(compression={"mode": "full_layer", "targets": targets, "penalty_norm": "none"})
        return compute_rewards(model, tokenizer, rollouts, "l2t", cfg, verifier=NumericVerifier()).responses

    pattern, listed, last = run([comp.ALL_DOWN_PROJ]), run(names), run(None)
    for a, b, c in zip(pattern, listed, last):
        torch.testing.assert_close(a.penalties, b.penalties, rtol=1e-6, atol=1e-12)
        assert (a.penalties > c.penalties).all()
    # "last_block": the last block's four position-wise matrices, named for the model at hand
    block, block_listed = run([comp.LAST_BLOCK]), run(comp.last_block_targets(model))
    for a, b, c in zip(block, block_listed, last):
        torch.testing.assert_close(a.penalties, b.penalties, rtol=1e-6, atol=1e-12)
        assert (a.penalties > c.penalties).all()


def test_fast_offsets_equal_prefix_decoding_on_random_token_sequences(tokenizer):
    """The per-token fast path gives the same offsets as decoding every prefix, on non-canonical
    sequences (random tokens, multi-byte characters split across byte-level tokens included)."""
    import random

    from l2t_core.rewards.l2t import prefix_decode_offsets, span_decode_offsets

    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    texts = ["é ü 你好 → ∑", "<episode_1>3 + 4</episode_1>"]
    seqs = [[rng.choice(vocab) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    seqs += [tokenizer(t, add_special_tokens=False)["input_ids"][::-1] for t in texts]  # reversed: non-canonical
    split = 0
    for ids in seqs:
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        want = prefix_decode_offsets(tokenizer, text, ids)
        assert response_offsets(tokenizer, text, ids) == want
        pieces = [tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids]
        if "".join(pieces) != text:  # a character split across tokens: the span-by-span path must hold
            split += 1
            assert span_decode_offsets(tokenizer, text, ids, pieces) == want
    assert split >= 5  # the random sequences do exercise it
    # a decoder that is not concatenative at a span boundary is detected, not trusted
    ids = seqs[0]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pieces = [tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids]
    assert span_decode_offsets(tokenizer, text + "x", ids, pieces) is None


def test_batched_prefix_decoding_equals_decoding_each_prefix(tokenizer):
    """prefix_decode_offsets' one batched backend call gives the lengths of ``decode`` per prefix."""
    import random

    from l2t_core.rewards.l2t import prefix_decode_offsets

    assert tokenizer.backend_tokenizer is not None and not tokenizer.clean_up_tokenization_spaces  # the batched branch
    rng = random.Random(1)
    vocab = list(range(len(tokenizer)))  # special tokens included
    for _ in range(20):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        want, prev = [], 0
        for t in range(len(ids)):
            cur = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            cur = min(max(cur, prev), len(text))
            want.append((prev, cur))
            prev = cur
        assert prefix_decode_offsets(tokenizer, text, ids) == want


def test_config_differences_fill_new_fields_with_defaults_and_ignore_locations():
    """A config saved before a field existed matches today's default; real changes are named."""
    from l2t_core.config import TrainConfig, config_differences

    cur = TrainConfig(policy="p", out="/runs/a", method="l2t")
    saved = json.loads(cur.model_dump_json())
    del saved["reward"]["segmentation"]["numbering"]  # written by a version without the option
    assert config_differences(saved, cur) == []
    saved["out"] = "/moved/a"
    assert config_differences(saved, cur) == ["out"] and config_differences(saved, cur, ignore=("out",)) == []
    saved["reward"]["credit"]["beta"] = 0.3
    assert config_differences(saved, cur, ignore=("out",)) == ["reward"]
    assert config_differences({"bogus": 1}, cur) != []  # unreadable today: differs, never silently equal


def test_config_differences_leave_out_options_that_the_j_estimator_does_not_read():
    """continuation_batch and continuation_budget only matter to the continuation J: a run made
    with the paper's J under another value (an earlier default) is the same run; with the
    continuation J they are compared."""
    from l2t_core.config import TrainConfig, config_differences

    cur = TrainConfig(policy="p", out="/runs/a", method="l2t")
    saved = json.loads(cur.model_dump_json())
    saved["reward"]["fitting"].update(continuation_batch=256, continuation_budget=64)
    assert config_differences(saved, cur) == []
    assert config_differences(saved["reward"], cur.reward) == []  # a RewardConfig alone, too
    saved["reward"]["fitting"]["mc_samples"] = 9  # not estimator-only: compared
    assert config_differences(saved, cur) == ["reward"]
    cont = TrainConfig(policy="p", out="/runs/a", method="l2t",
                       reward={"fitting": {"estimator": "continuation", "continuation_budget": 64}},
                       rollout={"max_new_tokens": 64})
    saved = json.loads(cont.model_dump_json())
    assert config_differences(saved, cont) == []
    saved["reward"]["fitting"]["continuation_batch"] = 256
    assert config_differences(saved, cont) == ["reward"]
    saved["reward"]["fitting"]["estimator"] = "answer_logprob"  # a run of the paper's J: not the same run
    assert config_differences(saved, cont) == ["reward"]


def test_offsets_when_the_text_was_decoded_without_a_sampled_special_token(tokenizer):
    """The engines decode a response with skip_special_tokens=True, so a special token sampled
    inside it (a pad, a chat-control token) has no characters in the text: it is zero-width, and the
    tokens after it keep their own offsets (METHOD.md §1: every token in its own episode, b_K at
    </think>). Failed with offsets measured on the text WITH the special token: every later token
    shifted by its length, the last context b_K stopped before the second episode (G_2 = 0)."""
    from l2t_core.episodes import segment, token_episode_ids

    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, tail = enc("<think>ab"), enc("\n\ncd</think>x")
    ids = head + [tokenizer.pad_token_id] + tail
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "<think>ab\n\ncd</think>x"
    clean = response_offsets(tokenizer, text, head + tail)  # the same text without the special token
    got = response_offsets(tokenizer, text, ids)
    at = clean[len(head) - 1][1]
    assert got == clean[: len(head)] + [(at, at)] + clean[len(head):]
    te = token_episode_ids(segment(text), got)
    want = token_episode_ids(segment(text), clean)
    assert te.episode_ids.tolist() == want.episode_ids.tolist()[: len(head)] + [0] + want.episode_ids.tolist()[len(head):]
    assert te.boundaries.tolist() == [0, want.boundaries[1] + 1, want.boundaries[2] + 1]
    # the same on random sequences: special tokens dropped from the text are zero-width wherever they sit
    import random

    rng = random.Random(0)
    special = sorted(set(tokenizer.all_special_ids))
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for _ in range(20):
        base = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
        text = tokenizer.decode(base, skip_special_tokens=True)
        where = [rng.randint(0, len(base)) for _ in range(rng.randint(1, 3))]
        ids, expect, clean, prev = [], [], response_offsets(tokenizer, text, base), 0
        for t in range(len(base) + 1):
            for _ in range(where.count(t)):
                ids.append(rng.choice(special))
                expect.append((prev, prev))
            if t < len(base):
                ids.append(base[t])
                expect.append(clean[t])
                prev = clean[t][1]
        assert response_offsets(tokenizer, text, ids) == expect


def test_random_layers_penalty_takes_each_episodes_own_gradient(model, tokenizer):
    """l2t_random_layers (METHOD.md §3 ablation): blocks that a later attention follows get each
    episode's own gradient (one backward per episode), through the packed J layout and padded
    micro-batches as on a plain forward of each response; attribution='single_backward' keeps the
    one backward, whose per-position credit differs there."""
    from l2t_core.episodes import segment, token_episode_ids
    from l2t_core.prompts import FORCE_ANSWER_SUFFIX, render_answer
    from l2t_core.rewards import compression as comp
    from l2t_core.rewards.fitting import JItem
    from l2t_core.rewards.l2t import episode_pass

    rollouts = _rollouts(tokenizer, [GOOD, REDUNDANT, GOOD + " and more words to pad"])
    teps = [token_episode_ids(segment(r.response_text), response_offsets(tokenizer, r.response_text, r.response_ids))
            for r in rollouts]
    force = tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
    ans = tokenizer(render_answer("14"), add_special_tokens=False)["input_ids"]
    items = [JItem(r.prompt_ids, r.response_ids, te.boundaries.tolist(), ans) for r, te in zip(rollouts, teps)]
    cfg = RewardConfig()
    names = comp.random_layer_targets(model, cfg.compression.random_layer_frac, cfg.compression.seed)
    targets = comp.resolve_targets(model, names)
    assert not comp.attributed_by_position(model, names)
    want = []
    for r, te in zip(rollouts, teps):  # each response alone, plain causal layout
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        score = torch.zeros_like(ids, dtype=torch.bool)
        score[0, len(r.prompt_ids):] = True
        episodes = torch.full_like(ids, -1)
        episodes[score] = torch.as_tensor(te.episode_ids)
        want.append(comp.per_episode_sqnorms(model, ids, torch.ones_like(ids), score, episodes, targets).sqnorms[0])
    lengths, real = [], comp.per_episode_sqnorms

    def recording(model, ids, *args, **kwargs):
        lengths.append(ids.shape[1])
        return real(model, ids, *args, **kwargs)

    plain = episode_pass(model, rollouts, teps, 0, 100_000, j_items=items, force_ids=force)  # no penalty
    for budget in (100_000, 150):
        lengths.clear()
        with mock.patch.object(comp, "per_episode_sqnorms", recording):
            res = episode_pass(model, rollouts, teps, tokenizer.pad_token_id or 0, budget, j_items=items,
                               force_ids=force, targets=targets)
        for got, w in zip(res.sqnorms, want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-12)
        # the K backwards ran over prompt ⊕ response, not the packed layout's J suffixes; J and
        # log π are those of the packed forward
        assert max(lengths) == max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
        for a, b in zip(res.log_j + res.logps, plain.log_j + plain.logps):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    single = episode_pass(model, rollouts, teps, 0, 100_000, j_items=items, force_ids=force, targets=targets,
                          attribution="single_backward")
    assert not torch.allclose(torch.cat(single.sqnorms), torch.cat(res.sqnorms), rtol=0.05)
    with pytest.raises(ValueError, match="attribution"):
        episode_pass(model, rollouts, teps, 0, 100_000, targets=targets, attribution="exact")
    # the method's raw penalties are P_k of these ‖G_k‖² (Thm 4.2), under either setting
    for attribution, sq in (("per_episode", res.sqnorms), ("single_backward", single.sqnorms)):
        c = RewardConfig(compression={"attribution": attribution})
        out = compute_rewards(model, tokenizer, rollouts, "l2t_random_layers", c, verifier=NumericVerifier())
        for r, s in zip(out.responses, sq):
            torch.testing.assert_close(r.penalties.double(), comp.penalty(s, c.compression.adapt_lr,
                                                                          c.compression.damping), rtol=1e-4, atol=0)
