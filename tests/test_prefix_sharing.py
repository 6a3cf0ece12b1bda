"""Prompt sharing (l2t_core.prefix_sharing): each distinct prompt of a micro-batch runs once, and
every result equals the unshared forward's up to float rounding."""

import random

import pytest
import torch

from l2t_core.logprobs import response_mask, token_logprobs, pad_right
from l2t_core.models import activation_checkpointing, decoder_and_head
from l2t_core.prefix_sharing import continuation_logprobs, decoder_hidden, row_layout
from l2t_core.rewards.fitting import JItem, pack_item, packed_attention_mask, packed_inputs, plain_pack
from l2t_core.rewards.l2t import Rollout, compute_rewards
from l2t_core.config import RewardConfig


def _groups(rng, vocab, sizes=(3, 1, 4), prompt_lens=(9, 5, 13)):
    """Rows in groups that share a prompt: (prompt, response, boundaries, answer) per row."""
    rows = []
    for g, (size, n_p) in enumerate(zip(sizes, prompt_lens)):
        prompt = [rng.randrange(1, vocab) for _ in range(n_p)]
        for _ in range(size):
            resp = [rng.randrange(1, vocab) for _ in range(rng.randrange(4, 20))]
            cuts = sorted(rng.sample(range(1, len(resp) + 1), 2))
            rows.append((prompt, resp, [0] + cuts, [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 4))]))
    return rows


def _packs(rows, force=(7, 8, 9)):
    return [pack_item(JItem(p, r, b, a), list(force)) for p, r, b, a in rows]


def test_unshared_layout_is_the_packed_layout():
    rows = _groups(random.Random(0), 50)
    packs = _packs(rows) + [plain_pack([1, 2, 3], [4, 5])]
    lay = row_layout(packs, [len(r[0]) for r in rows] + [3], 0, torch.float32, share=False)
    ids, pos, length = packed_inputs(packs, 0)
    assert not lay.shared and lay.start.tolist() == [0] * len(packs)
    assert torch.equal(lay.input_ids, ids) and torch.equal(lay.position_ids, pos)
    assert torch.equal(lay.attention_mask, packed_attention_mask(packs, length, torch.float32))


def test_shared_layout_runs_each_prompt_once_and_keeps_the_last_prompt_token_with_the_row():
    rows = _groups(random.Random(1), 50)
    lay = row_layout(_packs(rows), [len(r[0]) for r in rows], 0, torch.float32)
    assert lay.shared and lay.prefix_ids.shape == (3, 12)  # three distinct prompts, the longest 13 tokens
    assert lay.prefix_of_row.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert lay.start.tolist() == [8, 8, 8, 4, 12, 12, 12, 12]
    assert lay.input_ids[0, 0].item() == rows[0][0][-1]  # column 0: the prompt's last token
    assert lay.attention_mask.shape[-1] == 12 + lay.input_ids.shape[1]
    # row 3's prefix is 4 tokens long: slots 4..11 of the cache are padding it never sees
    visible = lay.attention_mask[3, 0] == 0
    assert visible[:, 4:12].sum() == 0 and visible[0, :4].all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_hidden_states_equal_the_unshared_forward(tiny_dir, attn):
    from l2t_core.models import load_policy

    m, _ = load_policy(tiny_dir)
    m.config._attn_implementation = attn
    decoder, _ = decoder_and_head(m)
    rows = _groups(random.Random(2), m.config.vocab_size)
    rows.append(([5], [6, 7, 8], [0, 3], [9]))  # a one-token prompt: nothing to share
    packs = _packs(rows)
    n_p = [len(r[0]) for r in rows]
    with torch.no_grad():
        full = decoder_hidden(decoder, row_layout(packs, n_p, 0, torch.float32, share=False))
        lay = row_layout(packs, n_p, 0, torch.float32)
        shared = decoder_hidden(decoder, lay)
    assert lay.start.tolist()[-1] == 0
    for r, (p, s) in enumerate(zip(packs, lay.start.tolist())):
        n = len(p.input_ids)
        torch.testing.assert_close(shared[r, : n - s], full[r, s:n], atol=2e-5, rtol=0)


def test_continuation_logprobs_and_their_gradients_equal_the_unshared_ones(tiny_dir):
    from l2t_core.models import load_policy

    m, _ = load_policy(tiny_dir)
    rng = random.Random(3)
    rows = _groups(rng, m.config.vocab_size)
    prompts, conts = [r[0] for r in rows], [r[1] for r in rows]
    conts[1] = []  # an empty continuation scores nothing
    weights = [torch.randn(len(c)) for c in conts]

    def run(share):
        m.zero_grad()
        lps = continuation_logprobs(m, prompts, conts, 0, temperature=0.7, share=share)
        sum(float(0) + (lp * w).sum() for lp, w in zip(lps, weights)).backward()
        return [lp.detach() for lp in lps], {n: p.grad.clone() for n, p in m.named_parameters()}

    lp_s, g_s = run(True)
    lp_u, g_u = run(False)
    # the unshared path is the plain right-padded forward
    seqs = [p + c for p, c in zip(prompts, conts)]
    ids, att = pad_right(seqs, 0)
    mask = response_mask([len(p) for p in prompts], [len(c) for c in conts], ids.shape[1])
    with torch.no_grad():
        plain = token_logprobs(m, ids, att, mask, 0.7)
    for j, (a, b) in enumerate(zip(lp_s, lp_u)):
        assert a.shape == (len(conts[j]),)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
        assert torch.equal(b, plain[j][mask[j]])  # unshared: the computation before sharing, bit for bit
    for n in g_u:  # the prompt's positions get their gradient through the expanded cache
        torch.testing.assert_close(g_s[n], g_u[n], atol=5e-5, rtol=1e-4, msg=n)
    assert g_u["model.embed_tokens.weight"][prompts[0][0]].abs().sum() > 0


def test_sharing_refuses_activation_checkpointing_under_grad(tiny_dir):
    from l2t_core.models import load_policy

    m, _ = load_policy(tiny_dir)
    m.train()
    with activation_checkpointing(m), pytest.raises(ValueError, match="activation checkpointing"):
        continuation_logprobs(m, [[1, 2, 3]], [[4, 5]], 0, share=True)
    with activation_checkpointing(m):  # unshared it runs
        lp = continuation_logprobs(m, [[1, 2, 3]], [[4, 5]], 0, share=False)
    assert lp[0].shape == (2,)
    assert continuation_logprobs(m, [], [], 0) == []


def test_prompts_forwarded_once_per_micro_batch(model):
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    try:
        rows = _groups(random.Random(4), model.config.vocab_size, sizes=(4, 4), prompt_lens=(30, 30))
        with torch.no_grad():
            continuation_logprobs(model, [r[0] for r in rows], [r[1] for r in rows], 0)
    finally:
        hook.remove()
    # two distinct 29-token prefixes, then 8 rows from the prompts' last token on
    assert seen[0] == (2, 29) and seen[1][0] == 8 and seen[1][1] == 1 + max(len(r[1]) for r in rows)


def test_layout_refuses_a_prompt_outside_its_pack():
    with pytest.raises(ValueError, match="row 0 has a prompt of 0 tokens"):
        row_layout([plain_pack([1, 2], [3])], [0], 0, torch.float32)
    with pytest.raises(ValueError, match="2 packs but 1 prompt lengths"):
        row_layout([plain_pack([1], [3]), plain_pack([1], [3])], [1], 0, torch.float32)


@pytest.mark.parametrize("method,temperature", [("l2t", 1.0), ("l2t", 0.7), ("l2t_no_penalty", 1.0)])
def test_reward_pass_with_shared_prompts_equals_the_unshared_one(model, tokenizer, method, temperature):
    texts = ["<think>\nStep one.\n\nStep two: 14.\n</think>\n\\boxed{14}",
             "<think>\nOnly one step, 13.\n</think>\n\\boxed{13}",
             "<think>\nA.\n\nB.\n\nC, so 14.\n</think>\n\\boxed{14}",
             "no think tags at all"]
    prompt_a = tokenizer("What is 7 + 7? Think step by step.", add_special_tokens=False)["input_ids"]
    prompt_b = tokenizer("Add seven and seven.", add_special_tokens=False)["input_ids"]
    rollouts = [Rollout(prompt_a if i < 3 else prompt_b, tokenizer(t, add_special_tokens=False)["input_ids"], t,
                        "14", int(i >= 3), finished=True)
                for i, t in enumerate(texts + texts[:2])]
    kw = dict(temperature=temperature, eos_id=tokenizer.eos_token_id)
    a = compute_rewards(model, tokenizer, rollouts, method, RewardConfig(), share_prompts=True, **kw)
    b = compute_rewards(model, tokenizer, rollouts, method, RewardConfig(), share_prompts=False, **kw)
    for x, y in zip(a.responses, b.responses):
        torch.testing.assert_close(x.log_j, y.log_j, atol=1e-4, rtol=0)
        torch.testing.assert_close(x.logp_old, y.logp_old, atol=1e-4, rtol=0)
        torch.testing.assert_close(x.penalties, y.penalties, atol=1e-6, rtol=1e-3)
        assert x.eos_logp_old == pytest.approx(y.eos_logp_old, abs=1e-4)
        torch.testing.assert_close(x.token_advantage, y.token_advantage, atol=1e-4, rtol=1e-3)


def test_sharing_falls_back_where_it_would_be_wrong_or_useless(tiny_dir):
    """A sliding-window model masks by its own rule after a cache (shared log-probs measured 0.04-0.07
    off): sharing is off and the result is the plain forward's, bit for bit. Rows that share no
    prompt get the plain layout (no second forward)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from l2t_core.models import build_tiny_qwen2
    from l2t_core.prefix_sharing import sharing_supported

    assert sharing_supported(build_tiny_qwen2(320, hidden_size=32, num_layers=2, intermediate_size=64, seed=0))
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, use_sliding_window=True,
                                     sliding_window=16, max_window_layers=0, attn_implementation="sdpa"))
    assert "sliding_attention" in m.config.layer_types and not sharing_supported(m)
    rows = _groups(random.Random(5), 320)
    prompts, conts = [r[0] for r in rows], [r[1] for r in rows]
    with torch.no_grad():
        shared = continuation_logprobs(m, prompts, conts, 0, share=True)
        plain = continuation_logprobs(m, prompts, conts, 0, share=False)
    assert all(torch.equal(a, b) for a, b in zip(shared, plain))
    distinct = _groups(random.Random(6), 50, sizes=(1, 1, 1))
    lay = row_layout(_packs(distinct), [len(r[0]) for r in distinct], 0, torch.float32)
    assert not lay.shared and lay.start.tolist() == [0, 0, 0]


def test_the_multi_rank_update_does_not_share(tiny_dir, tmp_path, monkeypatch):
    """In a multi-rank update a shared prefix would change the order of the gradient hooks, which
    ZeRO-2's buckets follow: the update shares on one rank only; the no-grad passes share anyway."""
    import l2t_core.trainer as trainer_module
    from l2t_core.config import TrainConfig

    cfg = TrainConfig(policy=str(tiny_dir), out=str(tmp_path / "run"), method="grpo", data={"source": "gsm8k"})
    tr = trainer_module.Trainer(cfg, show_progress=False)
    tr.cfg, tr.world, tr.pad_id, tr.lp_temperature = cfg, 2, 0, 1.0
    tr.tokenizer = type("Tok", (), {"eos_token_id": 1})()
    seen = []
    monkeypatch.setattr(trainer_module, "continuation_logprobs", lambda *a, share, **k: seen.append(share))
    rs = [Rollout([5, 6, 7], [8, 9], "", "1", 0)] * 2
    from l2t_core.models import load_policy

    model, _ = load_policy(tiny_dir)
    with torch.enable_grad():
        tr._logps(model, rs)
    with torch.no_grad():
        tr._logps(model, rs)
    tr.world = 1
    with torch.enable_grad():
        tr._logps(model, rs)
    assert seen == [False, True, True]
