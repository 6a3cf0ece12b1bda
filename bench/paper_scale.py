"""A paper-scale plan: GPU hours and memory per model size for METHOD.md §9's settings. Prints JSON.

Method (every assumption is a flag and is echoed in the output):

1. Per-token cost model of one L2T step, in FLOPs per token for a model of N parameters (the usual
   dense-transformer count; attention over the context adds 4·layers·hidden·context per token):
   generation 2N; the reward pass (one packed forward for J and log π_old, the penalty's backward
   touches one layer) 2N over the response plus the (K+1) force-answer suffixes; reference
   log-probs 2N; the policy update 6N (forward + backward), 8N with activation checkpointing.
2. The model is checked against the tiny model measured on this CPU (``bench.reward_overhead``):
   the measured time ratios of the forward-only and forward+backward phases next to the ratios the
   FLOP model predicts for the same token counts (``tiny_model_check``). Generation is left out of
   the check: decoding is bound by memory traffic, not FLOPs, and a CPU says nothing about a GPU's.
3. Published model sizes (DeepSeek-R1-Distill-Qwen 1.5B and 7B / DeepScaleR-1.5B: Qwen2 shapes) and
   the paper's data (919 AIME 1983-2023 problems; 4,000 NuminaMath problems; 8 rollouts; 1 epoch)
   give FLOPs per epoch; GPU hours follow from an H100's dense bf16 peak times an assumed model
   FLOPs utilisation per phase (``--mfu-*``). Memory per GPU: bf16 weights, fp32 master weights and
   AdamW moments (16 bytes per parameter) sharded by ZeRO-2 or ZeRO-3 over the GPUs, the frozen
   reference in bf16, and the vLLM KV cache at memory utilisation 0.8.

These are estimates from a cost model, not measurements on GPUs (none was used for this plan).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense)
H100_MEMORY = 80e9  # bytes


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int


# Qwen2 shapes of the paper's base models (published configs)
MODELS = (
    ModelShape("DeepSeek-R1-Distill-Qwen-1.5B / DeepScaleR-1.5B-Preview", 1.78e9, 28, 1536, 2, 128),
    ModelShape("DeepSeek-R1-Distill-Qwen-7B", 7.62e9, 28, 3584, 4, 128),
)
DATASETS = {"AIME 1983-2023 (DeepScaleR)": 919, "NuminaMath subset (R1-Distill)": 4000}


def flops_per_rollout(n: float, layers: int, hidden: int, prompt: int, response: int, episodes: int,
                      suffix: int, checkpointing: bool = True) -> dict:
    """FLOPs of each phase for one rollout (METHOD.md §2-§5 on the step of l2t_core.trainer)."""
    ctx = prompt + response
    mean_ctx = prompt + response / 2

    def attn(tokens: int, context: float) -> float:
        return 4.0 * layers * hidden * context * tokens

    gen = 2 * n * response + attn(response, mean_ctx)
    reward = 2 * n * (ctx + (episodes + 1) * suffix) + attn(ctx, ctx / 2) + attn((episodes + 1) * suffix, ctx)
    ref = 2 * n * ctx + attn(ctx, ctx / 2)
    update = (8 if checkpointing else 6) * n * ctx + 3 * attn(ctx, ctx / 2)
    return {"generation": gen, "reward": reward, "reference": ref, "update": update}


def memory_per_gpu(shape: ModelShape, gpus: int, zero: int, kv_util: float = 0.8) -> dict:
    """Bytes per GPU: training state under ZeRO-2/3, the bf16 reference, and the KV cache room."""
    n = shape.params
    weights = 2 * n if zero == 2 else 2 * n / gpus  # ZeRO-3 shards the bf16 weights too
    grads_and_optim = (2 + 4 + 8) * n / gpus  # bf16 grads, fp32 master, Adam m and v, sharded
    reference = 2 * n
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2  # K and V, bf16
    vllm_weights = 2 * n
    kv_room = max(0.0, kv_util * H100_MEMORY - vllm_weights)
    return {"train_state_gb": (weights + grads_and_optim) / 1e9, "reference_gb": reference / 1e9,
            "kv_bytes_per_token": kv_per_token, "vllm_kv_room_gb": kv_room / 1e9,
            "kv_tokens_per_gpu": kv_room / kv_per_token,
            "max_len_sequences_per_gpu": kv_room / kv_per_token / 20480}


def tiny_model_check(measured: dict, suffix: int = 12) -> dict:
    """Measured phase-time ratios of the tiny CPU model next to the FLOP model's ratios."""
    n, layers, hidden = measured["parameters"], measured["layers"], measured["hidden"]
    resp, prompt = measured["mean_tokens"], 40
    f = flops_per_rollout(n, layers, hidden, prompt, int(resp), int(measured["episodes_per_response"]), suffix,
                          checkpointing=False)
    fwd_measured = measured["ref_s"]
    return {
        "reward_forward_over_reference": {"measured": measured["reward_fitting_s"] / fwd_measured,
                                          "flop_model": f["reward"] / f["reference"]},
        "update_over_reference": {"measured": measured["update_s"] / fwd_measured,
                                  "flop_model": f["update"] / f["reference"]},
        "generation_over_reference": {"measured": measured["rollout_s"] / fwd_measured,
                                      "flop_model": f["generation"] / f["reference"],
                                      "note": "decoding is memory-bound; not used for the plan"},
    }


def plan(*, prompt: int, response: int, episodes: int, suffix: int, rollouts: int, gpus: int,
         mfu_generation: float, mfu_forward: float, mfu_update: float) -> list[dict]:
    rows = []
    mfu = {"generation": mfu_generation, "reward": mfu_forward, "reference": mfu_forward, "update": mfu_update}
    for shape in MODELS:
        f = flops_per_rollout(shape.params, shape.layers, shape.hidden, prompt, response, episodes, suffix)
        hours_per_rollout = {k: v / (H100_BF16_DENSE * mfu[k]) / 3600 for k, v in f.items()}
        per_data = {}
        for data, problems in DATASETS.items():
            total = problems * rollouts
            per_data[data] = {"rollouts": total,
                              "gpu_hours": {k: v * total for k, v in hours_per_rollout.items()},
                              "gpu_hours_total": sum(hours_per_rollout.values()) * total}
        rows.append({
            "model": asdict(shape),
            "tflops_per_rollout": {k: v / 1e12 for k, v in f.items()},
            "reward_share_of_gpu_time": hours_per_rollout["reward"] / sum(hours_per_rollout.values()),
            "per_epoch": per_data,
            "memory_zero2": memory_per_gpu(shape, gpus, 2),
            "memory_zero3": memory_per_gpu(shape, gpus, 3),
        })
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", help="a bench.reward_overhead JSON file (else it is measured now, ~1 min)")
    ap.add_argument("--prompt-tokens", type=int, default=200, help="mean prompt length (assumption)")
    ap.add_argument("--response-tokens", type=int, default=6000,
                    help="mean response length (assumption; the paper's limit is 16,384)")
    ap.add_argument("--episodes", type=int, default=20, help="mean episodes per response (assumption)")
    ap.add_argument("--suffix-tokens", type=int, default=12, help="force-answer suffix + answer tokens")
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt (METHOD.md §9)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node for the ZeRO sharding")
    ap.add_argument("--mfu-generation", type=float, default=0.05, help="assumed MFU of vLLM decoding (memory-bound)")
    ap.add_argument("--mfu-forward", type=float, default=0.40, help="assumed MFU of scoring forward passes")
    ap.add_argument("--mfu-update", type=float, default=0.35, help="assumed MFU of the DeepSpeed update")
    a = ap.parse_args(argv)
    if a.measured:
        with open(a.measured) as fh:
            measured = json.load(fh)
    else:
        from .reward_overhead import run

        print("[bench.paper_scale] measuring the tiny model (bench.reward_overhead, 2 steps)", file=sys.stderr)
        measured = run(steps=2)
    out = {
        "method": "FLOP cost model checked on the tiny CPU model; GPU hours = FLOPs / (H100 dense bf16 peak x MFU)",
        "assumptions": {k: v for k, v in vars(a).items() if k != "measured"} | {
            "gpu": "H100 SXM 80 GB, 989 TFLOP/s dense bf16", "epochs": 1, "activation_checkpointing": True},
        "tiny_model_check": tiny_model_check(measured, a.suffix_tokens),
        "tiny_model_measured": {k: measured[k] for k in ("parameters", "mean_tokens", "rollout_s", "reward_fitting_s",
                                                         "ref_s", "update_s", "threads", "device")},
        "plan": plan(prompt=a.prompt_tokens, response=a.response_tokens, episodes=a.episodes,
                     suffix=a.suffix_tokens, rollouts=a.rollouts, gpus=a.gpus, mfu_generation=a.mfu_generation,
                     mfu_forward=a.mfu_forward, mfu_update=a.mfu_update),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
