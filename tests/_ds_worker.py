"""Worker for tests/test_deepspeed.py: one optimizer step of the clipped policy loss on a fixed batch.

``python tests/_ds_worker.py OUT CASE...`` runs its cases in order, in one process (one launch);
a case is ``MODE`` or ``MODE:STAGE`` (the ZeRO stage, 2 by default).

``reference`` runs the whole batch in one process with TorchEngine; under ``torchrun
--nproc_per_node 2 tests/_ds_worker.py OUT deepspeed:STAGE`` each rank takes its share of the batch,
in two micro-batches, with DeepSpeedEngine (gloo on CPU). A reference writes its updated weights to
OUT/<mode>-rank0.pt, a DeepSpeed case to OUT/<mode>-<stage>-rank<r>.pt.

``uneven`` (and ``uneven-reference``, its one-process TorchEngine counterpart) trains on sequences
0-2 only: rank 0 has two micro-batches ([0], [2]) and rank 1 one ([1]), which it follows with the
trainer's padding, :func:`l2t_core.trainer.zero_loss`, as the trainer does when ranks have
different numbers of micro-batches. Under ZeRO-3 every parameter is partitioned.

``lockstep`` (ZeRO-3, every parameter partitioned) gives rank 0 three sequences and rank 1 one, in
micro-batches of one, and runs the no-gradient passes whose forwards gather the weights: the
response log-probs, the packed J, hf generation (one prompt per call, rank 1 fewer tokens) and the
Monte Carlo J with no contexts at all on rank 1. Without lockstep the ranks wait for each other
forever. Each writes ``{name: (partitioned result, the unpartitioned model's)}`` to
OUT/lockstep-rank<r>.pt.

``bf16`` is ``deepspeed`` in bf16 with fp32 gradient accumulation (ZeRO-1 there: DeepSpeed's
BF16_Optimizer, which records the gradient norm only inside its step)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from l2t_core.config import OptimConfig
from l2t_core.logprobs import pad_right, response_mask, token_logprobs
from l2t_core.losses import policy_loss
from l2t_core.models import build_tiny_qwen2

VOCAB = 50
OPT = OptimConfig(lr=1e-2, warmup_frac=0.0, schedule="constant", weight_decay=0.01, grad_clip=1.0)


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    seqs, plens, rlens, advs = [], [], [], []
    for i in range(4):
        p, r = 3 + i, 5 + 2 * i
        seqs.append(torch.randint(0, VOCAB, (p + r,), generator=g).tolist())
        plens.append(p)
        rlens.append(r)
        advs.append(float(torch.randn((), generator=g)))
    return seqs, plens, rlens, advs


def micro_loss(model, idx, batch, total_tokens, world):
    seqs, plens, rlens, advs = batch
    ids, att = pad_right([seqs[i] for i in idx], 0)
    mask = response_mask([plens[i] for i in idx], [rlens[i] for i in idx], ids.shape[1])
    logp = token_logprobs(model, ids, att, mask)
    adv = torch.zeros_like(logp)
    for j, i in enumerate(idx):
        adv[j][mask[j]] = advs[i]
    out = policy_loss(logp, logp.detach(), logp.detach() - 0.1 * mask, adv, mask, kl_coef=0.01)
    share = float(mask.sum()) / total_tokens
    return out.loss * share * world


class _IdTokenizer:
    """What the hf engine and the Monte Carlo J need of a tokenizer: ids as text, an eos."""

    eos_token_id = 1
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def lockstep(out: str) -> None:
    import copy
    import json

    from l2t_core.engines.deepspeed_engine import DeepSpeedEngine
    from l2t_core.rewards.fitting import JItem, answer_logprobs_packed, monte_carlo_j
    from l2t_core.rewards.l2t import Rollout, response_logprobs
    from l2t_core.rollout.base import SamplingParams
    from l2t_core.rollout.hf import HFRolloutEngine

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_tiny_qwen2(VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=3)
    plain = copy.deepcopy(model).eval()
    cfg = json.loads((Path(__file__).resolve().parents[1] / "infra" / "deepspeed" / "zero2.json").read_text())
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    eng = DeepSpeedEngine(model, OPT, 10, config_path=cfg)
    eng.module.eval()
    rank = eng.rank
    seqs, plens, _, _ = fixed_batch()
    mine = [0, 1, 2] if rank == 0 else [3]
    rollouts = [Rollout(seqs[i][: plens[i]], seqs[i][plens[i]:], "", "", 0) for i in mine]
    items = [JItem(r.prompt_ids, r.response_ids, [0, 2, len(r.response_ids)], [5, 6]) for r in rollouts]
    prompts = [r.prompt_ids for r in rollouts]
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6 if rank == 0 else 2, seed=1)
    contexts = [list(r.prompt_ids) + list(r.response_ids[:2]) for r in rollouts[:2]] if rank == 0 else []

    def verify(text, ref):
        return text.split(" ")[0] == ref

    passes = {
        "response_logprobs": lambda m: [x.tolist() for x in response_logprobs(m, rollouts, 0, max_tokens=1)],
        "answer_logprobs_packed": lambda m: [x.tolist() for x in answer_logprobs_packed(m, items, [7, 8], 1)],
        "hf_generate": lambda m: [[c.response_ids for c in g] for g in HFRolloutEngine(
            m, _IdTokenizer(), max_batch_sequences=2).generate(prompts, greedy)],
        "monte_carlo_j": lambda m: monte_carlo_j(m, _IdTokenizer(), contexts, ["3"] * len(contexts), verify,
                                                 samples=2, max_new_tokens=3, temperature=0.0, seed=1).tolist(),
    }
    results = {}
    for name, run in passes.items():
        results[name] = (run(eng.module), run(plain))
        print(f"rank {rank}: {name} done", flush=True)
    torch.save(results, Path(out) / f"lockstep-rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()


def main(out: str, mode: str, stage: int = 2) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_tiny_qwen2(VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, seed=3)
    model.train()
    batch = fixed_batch()
    uneven = mode.startswith("uneven")
    total = float(sum(batch[2][:3] if uneven else batch[2]))
    if mode in ("reference", "uneven-reference"):
        from l2t_core.engines.torch_engine import TorchEngine

        eng, rank, world = TorchEngine(model, OPT, 10), 0, 1
        shares = [[0], [1], [2]] if uneven else [[0, 1, 2, 3]]
    else:
        from l2t_core.engines.deepspeed_engine import DeepSpeedEngine

        import json

        cfg = json.loads((Path(__file__).resolve().parents[1] / "infra" / "deepspeed" / "zero2.json").read_text())
        cfg["zero_optimization"]["stage"] = stage
        if stage == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if mode == "bf16":  # bf16 on the CPU too, fp32 gradients: DeepSpeed's BF16_Optimizer under ZeRO-1
            cfg["bf16"] = {"enabled": True}
        eng = DeepSpeedEngine(model, OPT, 10, config_path=cfg)
        rank, world = eng.rank, eng.world_size
        if uneven:
            shares = [[0], [2]] if rank == 0 else [[1], []]  # [] is padding
        else:
            shares = [[i] for i in list(range(4))[rank::world]]  # one sequence per micro-batch: two backward calls
    for n, idx in enumerate(shares):
        if idx:
            loss = micro_loss(eng.module, idx, batch, total, world)
        else:
            from l2t_core.trainer import zero_loss

            loss = zero_loss(eng.module, torch.device("cpu"))
        eng.backward(loss, last=n == len(shares) - 1)
    stats = eng.step()
    from l2t_core.engines.gather import full_state_dict

    state = full_state_dict(eng.unwrapped())  # whole weights, also under ZeRO-3
    optimizer = type(getattr(eng, "ds", eng).optimizer).__name__
    name = mode if mode.endswith("reference") else f"{mode}-{stage}"
    torch.save({"state": state, "stats": stats, "optimizer": optimizer}, Path(out) / f"{name}-rank{rank}.pt")
    if mode == "deepspeed" and stage != 3:  # engine state round-trip
        ck = Path(out) / f"ckpt-{stage}"
        eng.save_state(ck)
        eng.load_state(ck)
        import torch.distributed as dist

        dist.barrier()


if __name__ == "__main__":
    for case in sys.argv[2:]:  # one launch runs several cases: each launch costs seconds of imports
        mode, _, stage = case.partition(":")
        if mode == "lockstep":
            lockstep(sys.argv[1])
        else:
            main(sys.argv[1], mode, int(stage or 2))
        print(f"case {case} done", flush=True)
    os._exit(0)
