"""Peak memory and time of the trainer's three policy passes on one long sequence, with and without
the memory options ``TrainConfig.gradient_checkpointing`` and ``TrainConfig.head_chunk_tokens``.
Prints one JSON object.

The passes, on ONE sequence of ``--prompt`` + ``--response`` tokens (a micro-batch of one
paper-length rollout) through a random-init Qwen2 of the given shape:

* ``update``: log π_θ with autograd, the clipped loss with KL (:func:`l2t_core.losses.policy_loss`)
  and its backward, as ``Trainer._update`` runs them; settings ``plain``, ``checkpointing``
  (activation checkpointing of the decoder), ``chunked_head`` (the output head ``--chunk`` tokens at
  a time, each chunk checkpointed), ``both``.
* ``reference``: log π_ref without autograd (``Trainer._reference_logprobs``): ``plain``,
  ``chunked_head``.
* ``reward``: the reward pass (:func:`l2t_core.rewards.l2t.episode_pass`): packed J at the
  ``--episodes`` + 1 boundaries, log π_old and the low-rank penalty's truncated backward:
  ``plain``, ``chunked_head``.

Each (pass, setting) runs in a fresh process, so its peak is its own, twice: the peak is read
from the first run, the time from the second. Peak = on CUDA ``torch.cuda.max_memory_allocated``
above what the model and the inputs already hold; on the CPU the peak resident set during the pass
above the resident set before it (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``; where that is not allowed, the growth of ``ru_maxrss``), which also
counts the allocator's caching. The outputs of
every setting are compared to ``plain``'s (``max_rel_diff``, max |difference| / max |plain's value|
of each output: the update's per-tensor gradient norms, the first 4,096 gradient entries of each
tensor and the loss; the reference's log-probs; the reward pass's J, log π_old and penalties), since the
options must change memory and time only. A setting that runs out of GPU memory is reported as
``"out_of_memory": true``.

    python -m bench.train_memory                           # CPU default: 4,352 tokens, 32k vocabulary
    python -m bench.train_memory --preset qwen2-1.5b --device cuda   # METHOD.md §9's shape and length
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import emit, log
from l2t_core.memory import GIB, PeakMemory

PASSES = {
    "update": ("plain", "checkpointing", "chunked_head", "both"),
    "reference": ("plain", "chunked_head"),
    "reward": ("plain", "chunked_head"),
}
# DeepSeek-R1-Distill-Qwen-1.5B / DeepScaleR-1.5B-Preview (published Qwen2 config) at the paper's
# 16,384-token completions (METHOD.md §9), in bf16 as DeepSpeed trains it on a GPU
PRESETS = {
    "qwen2-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                       prompt=512, response=16384, episodes=60, dtype="bfloat16"),
}


def _options(setting: str, chunk: int) -> tuple[bool, int | None]:
    """(gradient_checkpointing, head_chunk_tokens) of a setting."""
    return {"plain": (False, None), "checkpointing": (True, None), "chunked_head": (False, chunk),
            "both": (True, chunk)}[setting]


def _inputs(args, device):
    g = torch.Generator().manual_seed(args.seed)
    length = args.prompt + args.response
    ids = torch.randint(0, args.vocab, (1, length), generator=g)
    inner = torch.randperm(args.response - 1, generator=g)[: args.episodes - 1].add(1).sort().values.tolist()
    cuts = [0] + inner + [args.response]
    adv = torch.randn((), generator=g).item()
    return ids.to(device), cuts, adv


def _peak_probe(device):
    """(start, peak) closures: the peak memory above what is held when ``start`` is called,
    measured as the trainer measures each phase (:class:`~l2t_core.memory.PeakMemory`)."""
    mem = PeakMemory(device)
    if mem.cuda or mem.cpu_ok:
        def start():  # the peak restarts from what is held now
            mem.reset()
            return mem.resident_gib() * GIB

        def peak(base):
            return mem.peak_gib() * GIB - base
    else:
        def start():  # the process's peak so far (ru_maxrss is in KiB on Linux); coarser
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def peak(base):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return start, peak


def child(args) -> dict:
    """One (pass, setting) in this process: peak and time, and its outputs saved for comparison."""
    from l2t_core.episodes import TokenEpisodes
    from l2t_core.logprobs import response_mask, token_logprobs
    from l2t_core.losses import policy_loss
    from l2t_core.models import activation_checkpointing, build_tiny_qwen2, resolve_device
    from l2t_core.rewards import compression as comp
    from l2t_core.rewards.fitting import JItem
    from l2t_core.rewards.l2t import Rollout, episode_pass
    from l2t_core.timing import device_clock

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    checkpointing, chunk = _options(args.setting, args.chunk)
    length = args.prompt + args.response
    with device:  # initialised where it runs (a 1.5B model's init on the CPU takes minutes)
        model = build_tiny_qwen2(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                                 num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                                 max_position_embeddings=max(2048, length + 64 * (args.episodes + 1)),
                                 seed=args.seed)
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    ids, cuts, adv = _inputs(args, device)
    att = torch.ones_like(ids)
    mask = response_mask([args.prompt], [args.response], length, device)

    def update():
        model.train()
        model.zero_grad(set_to_none=True)
        with activation_checkpointing(model, checkpointing):
            logp = token_logprobs(model, ids, att, mask, 1.0, chunk)[:, args.prompt:]
            old = logp.detach()
            out = policy_loss(logp, old, old - 0.01, torch.full_like(logp, adv), torch.ones_like(logp),
                              kl_coef=1e-3)
            out.loss.backward()
        # one parameter at a time: an fp32 copy of every bf16 gradient at once (7 GB at 1.5B) would
        # count in the measured peak
        grads = [p.grad for p in model.parameters()]
        return {"grad_norms": torch.stack([g.float().norm().cpu() for g in grads]),
                "grad_entries": torch.cat([g.flatten()[:4096].float().cpu() for g in grads]),
                "loss": out.loss.detach().float().cpu().reshape(1)}

    def reference():
        model.eval()
        with torch.no_grad():
            return {"logp": token_logprobs(model, ids, att, mask, 1.0, chunk)[0, args.prompt:].float().cpu()}

    targets = comp.resolve_targets(model, None)
    proxy = comp.SVDProxy(rank_frac=0.05)
    proxy.refresh(targets, 0)
    prompt_ids, response_ids = ids[0, : args.prompt].tolist(), ids[0, args.prompt:].tolist()
    episode_ids = torch.repeat_interleave(torch.arange(args.episodes), torch.tensor(cuts).diff()).numpy()
    answer = ids[0, -5:].tolist()
    force = ids[0, args.prompt: args.prompt + 12].tolist()

    def reward():
        model.eval()
        res = episode_pass(model, [Rollout(prompt_ids, response_ids, "", "", 0)],
                           [TokenEpisodes(episode_ids, torch.tensor(cuts).numpy())], 0, 1 << 30,
                           j_items=[JItem(prompt_ids, response_ids, cuts, answer)], force_ids=force,
                           targets=targets, proxy=proxy, head_chunk_tokens=chunk)
        return {"log_j": res.log_j[0].float().cpu(), "logp_old": res.logps[0].float().cpu(),
                "sqnorms": res.sqnorms[0].double().cpu()}

    fn = {"update": update, "reference": reference, "reward": reward}[args.which]
    start, peak = _peak_probe(device)
    try:
        base = start()
        outputs = fn()
        peak_bytes = peak(base)
        del outputs
        outputs = None
        t0 = device_clock(device)
        outputs = fn()
        seconds = device_clock(device) - t0
    except torch.OutOfMemoryError as exc:
        return {"out_of_memory": True, "error": str(exc).splitlines()[0]}
    torch.save(outputs, args.save)
    return {"peak_bytes": int(peak_bytes), "peak_gib": peak_bytes / 2**30, "seconds": seconds}


def _rel_diff(a: dict, b: dict) -> float:
    """max over the outputs of max|a - b| / max|b| (an output's scale, so near-zero entries do not
    turn rounding into large ratios)."""
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        if x.numel():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)))
    return worst


def run(args) -> dict:
    cases = [(p, s) for p in args.passes for s in PASSES[p] if s in args.settings]
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab",
                                           "prompt", "response", "episodes", "chunk", "dtype", "device")}
    results: dict[str, dict] = {p: {} for p in args.passes}
    with tempfile.TemporaryDirectory(prefix="l2t-train-memory-") as tmp:
        for which, setting in cases:
            save = Path(tmp) / f"{which}-{setting}.pt"
            log(f"{which} / {setting} ({args.prompt}+{args.response} tokens, vocab {args.vocab})", "train_memory")
            cmd = [sys.executable, "-m", "bench.train_memory", "--child", which, setting, "--save", str(save),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
            cmd += [a for k, v in shape.items() for a in (f"--{k.replace('_', '-')}", str(v))]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                                      timeout=args.case_timeout)
                if proc.returncode != 0:
                    res = {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1]}
                else:
                    res = json.loads(proc.stdout)
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {args.case_timeout} s (--case-timeout)"}
            res["wall_s"] = time.perf_counter() - t0
            if save.exists() and setting != "plain" and (Path(tmp) / f"{which}-plain.pt").exists():
                res["max_rel_diff"] = _rel_diff(torch.load(save), torch.load(Path(tmp) / f"{which}-plain.pt"))
            results[which][setting] = res
            log(f"{which} / {setting}: " + json.dumps(res), "train_memory")  # a cut-off run keeps what it measured
    for which, by in results.items():  # each option's peak as a share of plain's
        base = by.get("plain", {}).get("peak_bytes")
        for setting, res in by.items():
            if base and "peak_bytes" in res:
                res["peak_vs_plain"] = res["peak_bytes"] / base
    return {"shape": shape, "parameters_note": "random init; one sequence per pass", "passes": results,
            "machine": {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)
                        if args.device == "cuda" else platform.processor() or platform.machine()},
            "peak_measure": "torch.cuda.max_memory_allocated above the model and inputs" if args.device == "cuda"
            else ("peak resident set during the pass above the resident set before it (VmHWM reset by "
                  "clear_refs)" if PeakMemory("cpu").cpu_ok else "growth of ru_maxrss (coarser)")}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a published model shape at the paper's lengths")
    ap.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=4096)
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=1024, help="head_chunk_tokens of the chunked settings")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--settings", nargs="+", default=list(PASSES["update"]), choices=list(PASSES["update"]))
    ap.add_argument("--case-timeout", type=float, default=600.0, help="seconds one pass/setting may take")
    ap.add_argument("--child", nargs=2, metavar=("PASS", "SETTING"), help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            setattr(args, k, v)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab = 32, 2, 64, 512
        args.prompt, args.response, args.episodes, args.chunk = 8, 96, 5, 32
    if args.episodes < 1 or args.response < args.episodes:
        ap.error(f"--episodes must be between 1 and --response ({args.response}), got {args.episodes}")
    if args.chunk < 1:
        ap.error(f"--chunk must be >= 1, got {args.chunk}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        args.which, args.setting = args.child
        out = child(args)
        print(json.dumps(out), flush=True)
        return out
    out = emit(run(args))
    failed = failures(out)
    if failed:
        log(f"{len(failed)} case(s) failed: {', '.join(failed)}", "train_memory")
    return out


def failures(result: dict) -> list[str]:
    """The pass/setting cases that failed; running out of memory is a measurement, not a failure."""
    return [f"{which}/{setting}" for which, by in result["passes"].items() for setting, res in by.items()
            if "error" in res and not res.get("out_of_memory")]


if __name__ == "__main__":
    result = main()
    os._exit(1 if result is not None and "passes" in result and failures(result) else 0)
