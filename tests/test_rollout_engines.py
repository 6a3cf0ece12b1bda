"""Rollout engines: the hf engine on CPU (ordering, seeding, left padding, chunking, errors), and the
vLLM engine where vLLM and a GPU exist (skipped cleanly here)."""

from __future__ import annotations

import sys

import pytest
import torch

from l2t_core.rollout import SamplingParams, make_rollout_engine
from l2t_core.rollout.hf import HFRolloutEngine


def _greedy_manual(model, prompt, steps, eos):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_hf_engine_order_seed_padding_and_chunks(model, tokenizer):
    eng = HFRolloutEngine(model, tokenizer, max_batch_sequences=64)
    prompts = [tokenizer("Compute (3 + 4) * 2.")["input_ids"], tokenizer("Let x = 5.")["input_ids"]]
    state = torch.get_rng_state()
    a = eng.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7))
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    b = eng.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7))
    c = eng.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=8))
    assert [len(g) for g in a] == [3, 3]
    assert [[x.response_ids for x in g] for g in a] == [[x.response_ids for x in g] for g in b]
    assert [[x.response_ids for x in g] for g in a] != [[x.response_ids for x in g] for g in c]
    for g, p in zip(a, prompts):
        for x in g:
            assert x.prompt_ids == p and tokenizer.eos_token_id not in x.response_ids
            assert len(x.response_ids) <= 12 and (x.finished or len(x.response_ids) == 12)
    # greedy with left padding equals a manual argmax loop on each prompt alone
    greedy = eng.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=10))
    for g, p in zip(greedy, prompts):
        assert g[0].response_ids == _greedy_manual(model, p, 10, tokenizer.eos_token_id)
    # chunking (one prompt per generate call) changes nothing for greedy decoding
    small = HFRolloutEngine(model, tokenizer, max_batch_sequences=1)
    assert [g[0].response_ids for g in small.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=10))] \
        == [g[0].response_ids for g in greedy]


def test_hf_engine_rejects_bad_prompts(model, tokenizer):
    eng = HFRolloutEngine(model, tokenizer, max_prompt_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        eng.generate([], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        eng.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="over the limit of 4"):
        eng.generate([[1, 2, 3, 4, 5]], SamplingParams())
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_rollout_engine("sglang", model, tokenizer)


def test_vllm_engine_names_the_extra_when_vllm_is_absent(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"\.\[gpu\]"):
        make_rollout_engine("vllm", model, tokenizer, model_path="unused")


@pytest.mark.slow
def test_vllm_engine_matches_hf_and_syncs_weights(tiny_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (the gpu extra)")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA device")
    from l2t_core.models import load_policy

    model, tok = load_policy(tiny_dir, device="cuda")
    vl = make_rollout_engine("vllm", model, tok, model_path=str(tiny_dir), dtype="float32",
                             gpu_memory_utilization=0.3, enforce_eager=True)
    hf = HFRolloutEngine(model, tok)
    prompts = [tok("Compute (3 + 4) * 2.")["input_ids"], tok("Let x = 5.")["input_ids"]]
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=8)
    assert [g[0].response_ids for g in vl.generate(prompts, greedy)] == [g[0].response_ids for g in hf.generate(prompts, greedy)]
    sampled = vl.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=3))
    assert [len(g) for g in sampled] == [4, 4]
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # a very different policy
    vl.sync_weights(model)
    assert [g[0].response_ids for g in vl.generate(prompts, greedy)] == [g[0].response_ids for g in hf.generate(prompts, greedy)]
