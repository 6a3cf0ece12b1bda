"""The same code on a CUDA device (skipped where there is none, as on CI).

Every other test runs on the CPU, where the reward math is checked against brute-force references.
Here the CUDA results are checked against those CPU results: packed J, the penalty's per-token
signals and episode scores (low-rank, full-layer, each episode's own gradient below the last block,
the last block's four position-wise matrices, exact all-parameter; the reward pass with a penalty
below the last block), a resumed L2T run that ends
where an uninterrupted one does (SVD bases refreshed across the checkpoint, so they must come back
on the device), the randomized SVD leaving the global CUDA generator alone, the memory options
(activation checkpointing, chunked output head) changing nothing but memory, ``l2t sft``'s
accumulated gradient and whole job, and both trainer benchmarks in their quick form. Run it on a GPU machine with ``pytest tests/test_cuda.py``.

Tolerances are looser than the CPU tests' (1e-4 relative): CUDA kernels sum in other orders, and
index_add/scatter backward passes are not bit-reproducible on a GPU.
"""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from l2t_core.rewards import compression as comp
from l2t_core.rewards.fitting import answer_logprobs_naive, answer_logprobs_packed
from test_compression import _batch
from test_trainer import comparable, make_cfg, monkeypatch_module, toy_data  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """The tiny test model twice: on the CPU and on the GPU, same weights (fp32)."""
    from l2t_core.models import load_policy

    cpu, _ = load_policy(tiny_dir)
    gpu, _ = load_policy(tiny_dir, device="cuda")
    assert next(gpu.parameters()).is_cuda
    return cpu, gpu


def test_packed_j_on_cuda_equals_the_cpu(pair):
    from test_fitting import _item

    cpu, gpu = pair
    rng = random.Random(5)
    items = [_item(rng, cpu.config.vocab_size, k) for k in (1, 3, 12, 5)]
    force = [rng.randrange(cpu.config.vocab_size) for _ in range(9)]
    ref = answer_logprobs_naive(cpu, items, force)
    for budget in (100_000, 150):
        got = answer_logprobs_packed(gpu, items, force, max_tokens_per_batch=budget)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=0)


def test_penalty_signals_and_scores_on_cuda_equal_the_cpu(pair):
    cpu, gpu = pair
    ids, att, score = _batch(cpu.config.vocab_size, [12, 10], seed=1)
    seg = torch.tensor([0] * 5 + [1] * 7 + [2] * 3 + [3] * 7)
    out = {}
    for dev, m in (("cpu", cpu), ("cuda", gpu)):
        targets = comp.resolve_targets(m, None)
        name = next(iter(targets))
        sig = comp.per_token_signals(m, ids.to(dev), att.to(dev), score.to(dev), targets)
        proxy = comp.SVDProxy(rank_frac=0.05)
        proxy.refresh(targets, 0)
        sq_lr = comp.episode_sqnorms(sig, seg.to(dev), 4, proxy).cpu()
        sq_full = comp.full_episode_sqnorms(sig.inputs[name], sig.deltas[name], seg.to(dev), 4).cpu()
        out[dev] = (sig.deltas[name].cpu(), sig.inputs[name].cpu(), sig.logprobs.cpu(), sq_lr, sq_full)
    for a, b in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_per_episode_penalty_on_cuda_equals_the_cpu(pair):
    """Each episode's own gradient below the last block (batched backwards through CUDA's attention
    kernels, under vmap), in the proxy and un-projected, against the CPU's (which the CPU tests
    check against one autograd backward per episode)."""
    from test_compression import _episodes_of

    cpu, gpu = pair
    names = ["model.layers.0.mlp.down_proj", "model.layers.4.mlp.down_proj"]
    ids, att, score = _batch(cpu.config.vocab_size, [11, 7], seed=5)
    episodes = _episodes_of(score, [[4, 3, 4], [2, 5]])
    out = {}
    for dev, m in (("cpu", cpu), ("cuda", gpu)):
        targets = comp.resolve_targets(m, names)
        proxy = comp.SVDProxy(rank_frac=0.05)
        proxy.refresh(targets, 0)
        args = (m, ids.to(dev), att.to(dev), score.to(dev), episodes.to(dev), targets)
        out[dev] = [comp.per_episode_sqnorms(*args, proxy=p).sqnorms.cpu() for p in (None, proxy)]
    for a, b in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_reward_pass_with_per_episode_penalty_on_cuda_equals_the_cpu(pair):
    """The trainer's reward pass with a penalty below the last block: J and log π from the packed
    forward, each episode's gradient from a second, plain forward's batched backwards ([B, L]
    padding mask, CUDA's causal attention), padded micro-batches included; and the last block's
    four position-wise matrices from one backward."""
    import numpy as np

    from l2t_core.episodes import TokenEpisodes
    from l2t_core.rewards.l2t import Rollout, episode_pass
    from test_fitting import _item

    cpu, gpu = pair
    rng = random.Random(11)
    vocab = cpu.config.vocab_size
    items, rollouts, teps = [], [], []
    for n, k in enumerate((3, 5, 2, 4)):
        it = _item(rng, vocab, k)
        bounds = list(it.boundaries[:-1]) + [len(it.response_ids)]  # every token in an episode
        it = type(it)(it.prompt_ids, it.response_ids, bounds, it.answer_ids)
        ep = np.zeros(len(it.response_ids), dtype=np.int64)
        for e in range(k):
            ep[bounds[e]: bounds[e + 1]] = e
        items.append(it)
        rollouts.append(Rollout(list(it.prompt_ids), list(it.response_ids), "", "", n))
        teps.append(TokenEpisodes(ep, np.asarray(bounds)))
    force = [rng.randrange(vocab) for _ in range(9)]
    for names in (["model.layers.1.mlp.down_proj", "model.layers.4.mlp.down_proj"], [comp.LAST_BLOCK]):
        out = {}
        for dev, m in (("cpu", cpu), ("cuda", gpu)):
            targets = comp.resolve_targets(m, names)
            out[dev] = [episode_pass(m, rollouts, teps, 0, budget, j_items=items, force_ids=force, targets=targets)
                        for budget in (100_000, 150)]
        for got, want in zip(out["cuda"], out["cpu"]):
            for a, b in zip(got.sqnorms, want.sqnorms):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-9)
            for a, b in zip(got.log_j + got.logps, want.log_j + want.logps):
                torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-4)


def test_exact_reference_on_cuda_equals_the_cpu(pair):
    cpu, gpu = pair
    ids, _, score = _batch(cpu.config.vocab_size, [14], seed=2)
    tok_ep = torch.full_like(ids[0], -1)
    tok_ep[4:18] = torch.tensor([0] * 4 + [1] * 6 + [2] * 4)
    p_cpu, sq_cpu = comp.exact_episode_penalties(cpu, ids[0], score[0], tok_ep, 3)
    p_gpu, sq_gpu = comp.exact_episode_penalties(gpu, ids[0].cuda(), score[0].cuda(), tok_ep.cuda(), 3)
    torch.testing.assert_close(sq_gpu.cpu(), sq_cpu, rtol=1e-4, atol=0)
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=2e-4, atol=0)


def test_randomized_svd_leaves_the_cuda_generator_alone(pair):
    _, gpu = pair
    w = next(iter(comp.resolve_targets(gpu, None).values())).weight
    torch.cuda.manual_seed(123)
    expected = torch.rand(4, device=CUDA)
    torch.cuda.manual_seed(123)
    a = comp.low_rank_basis(w, 4, "randomized", seed=7)
    after = torch.rand(4, device=CUDA)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    b = comp.low_rank_basis(w, 4, "randomized", seed=7)  # seeded: the same basis again
    torch.testing.assert_close(a.U, b.U, rtol=0, atol=0)


@pytest.mark.slow
def test_resumed_l2t_run_on_cuda_ends_where_an_uninterrupted_one_does(tiny_dir, toy_data, tmp_path):
    from safetensors.torch import load_file

    from l2t_core.trainer import Trainer

    def cfg(out):  # bases refreshed every 3 steps: step 3's come from the step-2 checkpoint
        return make_cfg(tiny_dir, out, device="cuda", reward={"compression": {"svd_refresh_steps": 3}})

    tr = Trainer(cfg(tmp_path / "full"), show_progress=False)
    full = tr.run()
    assert tr.device.type == "cuda" and next(tr.engine.unwrapped().parameters()).is_cuda
    crashed = Trainer(cfg(tmp_path / "resumed"), show_progress=False).run(stop_after=3)
    assert crashed.final_step == 3
    resumed = Trainer(cfg(tmp_path / "resumed"), show_progress=False).run()
    assert resumed.final_step == 4
    pd.testing.assert_frame_equal(comparable(full.steps), comparable(resumed.steps), rtol=1e-4)
    wa = load_file(str(tmp_path / "full/checkpoints/step-000004/model.safetensors"))
    wb = load_file(str(tmp_path / "resumed/checkpoints/step-000004/model.safetensors"))
    # not bit-equal as on the CPU: atomics in CUDA backward passes (embedding, index_add) sum in a
    # run-dependent order; an H200 run measured 3.2e-6 at most after 4 steps at lr 1e-3
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5)
    saved = json.loads((tmp_path / "resumed/checkpoints/step-000004/train_config.json").read_text())
    assert saved["device"] == "cuda"
    assert (full.steps["step_time_s"] > 0).all() and (full.steps["reward_time_s"] > 0).all()


def test_memory_options_on_cuda_give_the_same_update(tiny_dir, toy_data, tmp_path):
    """gradient_checkpointing and head_chunk_tokens on the GPU: the same step metrics and weights
    as without them (they change what is kept in memory, not what is computed)."""
    from safetensors.torch import load_file

    from l2t_core.trainer import Trainer

    runs = {}
    for name, extra in (("plain", {}), ("memory", {"gradient_checkpointing": True, "head_chunk_tokens": 5})):
        tr = Trainer(make_cfg(tiny_dir, tmp_path / name, steps=2, device="cuda", **extra), show_progress=False)
        runs[name] = tr.run()
    pd.testing.assert_frame_equal(comparable(runs["plain"].steps), comparable(runs["memory"].steps), rtol=1e-4)
    wa = load_file(str(tmp_path / "plain/checkpoints/step-000002/model.safetensors"))
    wb = load_file(str(tmp_path / "memory/checkpoints/step-000002/model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_sft_on_cuda_takes_the_cpu_gradient_and_writes_a_loadable_policy(pair, tiny_dir, tmp_path):
    """l2t sft on the GPU: a batch's accumulated gradient (micro-batches, moved to the device)
    equals the CPU's, and the whole job (bf16 mixed precision) writes a policy that loads."""
    from l2t_core.models import load_policy
    from l2t_core.sft import SFTConfig, _accumulate_batch, encode_pairs, run_sft

    cpu, gpu = pair
    _, tok = load_policy(tiny_dir)
    batch = encode_pairs(tok, [("Compute 1 + 2.\n", "<think>1 + 2 = 3</think> \\boxed{3}"), ("p\n", "ok"),
                               ("Compute 10 + 22 now.\n", "<think>32</think> \\boxed{32}")])
    grads = []
    for model, size in ((cpu, None), (gpu, 1)):
        model.zero_grad()
        _accumulate_batch(model, batch, tok.pad_token_id, size)
        grads.append([p.grad.detach().cpu().clone() for p in model.parameters()])
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Compute {i} + 1.", "answer": str(i + 1),
                                        "response": f"<think>\n<episode_1>{i} + 1 = {i + 1}</episode_1>\n</think>"
                                                    f"\n\n\\boxed{{{i + 1}}}"}) + "\n" for i in range(8)))
    out = run_sft(SFTConfig(model=str(tiny_dir), data=str(data), out=str(tmp_path / "sft"), steps=20,
                            batch_size=4, micro_batch_size=2, lr=3e-3, device="cuda", precision="bf16"),
                  show_progress=False)
    report = json.loads((out / "sft_report.json").read_text())
    assert report["device"] == "cuda" and report["answers"]["correct"] == 8
    assert report["loss_curve"][-1] < report["loss_curve"][0]
    load_policy(out, device="cuda")


def test_trainer_benchmarks_run_on_cuda():
    from bench import penalty, reward_overhead

    pen = penalty.run(responses=2, episodes=4, response_tokens=40, hidden=32, layers=8, intermediate=64, vocab=128,
                      repeats=1, device="cuda")
    assert pen["device"] == "cuda" and pen["spearman_full_layer"] > 0.9 and pen["packed_j_max_abs_diff"] < 1e-3
    ro = reward_overhead.run(steps=1, prompts=2, group=4, max_new_tokens=48, hidden=64, layers=2, device="cuda")
    assert ro["device"].startswith("cuda") and ro["reward_over_rollout"] > 0 and ro["rollout_s"] > 0


def test_trainer_collectives_run_on_an_nccl_process_group():
    """A GPU launch joins an NCCL process group, which reduces CUDA tensors only: the trainer's
    sums and maxima over ranks (batch normalisation, token counts, peak memory) must use the rank's
    device (gloo, in the CPU tests, takes CPU tensors). One rank, a real NCCL group."""
    import torch.distributed as dist

    from l2t_core.trainer import _all_max, _all_max_list, _all_sum_list

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        assert _all_sum_list([1.5, -2.0]) == [1.5, -2.0]
        assert _all_max(7) == 7 and _all_max_list([0.25, -1.0]) == [0.25, -1.0]
    finally:
        dist.destroy_process_group()
