"""Our SFT loop (``l2t sft``, :func:`l2t_core.sft.sft`) vs TRL's ``SFTTrainer`` on the same tiny
model, the same examples and the same CPU. Prints one JSON object.

* ``step_throughput_ratio`` = our training examples per second ÷ TRL's, over the measured steps.

What is counted (the same on both sides): the wall time of each optimizer step (collation,
forward, backward, gradient clipping, AdamW, the schedule), the first ``--warmup`` steps of a run
excluded. Ours: between consecutive calls of ``sft``'s ``on_checkpoint`` hook, called after every
step but the last (``checkpoint_every=1``; the hook only reads the clock, and ``sft`` builds the
state it passes, a few list copies, which ours pays and TRL does not), so ours times one step
fewer; TRL: between consecutive calls of a callback's ``on_step_end`` (``on_step_begin`` would
leave out the loading and collation of the batch, which TRL does before it). TRL runs first. Both sides see every example once (one epoch of ``--steps`` × ``--batch``), so
each step's examples are a batch of the same data; tokens per second are reported as examples per
second times each side's own mean tokens per example (TRL tokenises prompt + completion together,
ours each apart, as the policy generates them).

Settings held equal: the model (a tiny random-init Qwen2 saved once, loaded by both with
``from_pretrained`` in float32), the examples (prompt = the §8 instruction prompt of a synthetic
problem, completion = an episode-tagged response of 1–6 episodes, so lengths vary), the loss on
the completion and its end-of-sequence token only, mean over the batch's completion tokens, batch
size with no accumulation, AdamW (``adamw_torch``) with the same lr, no weight decay, a constant
schedule, gradient-norm clip 1.0, float32, no gradient checkpointing, the same torch thread count,
no evaluation, logging or saving. TRL runs with ``use_cpu=True``, ``report_to="none"``,
``packing=False``, ``max_length=None`` and its own defaults otherwise (its collator pads each
batch to its longest example; it also computes per-token entropy and accuracy for its logs). Ours
batches examples of similar length together (``length_grouped_batches``), which is part of what
is measured.

The default is one thread because this machine's 2 cores are shared (see ``bench.trainer_vs_trl``).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from ._common import THREADS_NOTE, build_workspace, log, run_and_emit, torch_threads

TARGET = 1.0


def _trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs: the §8 prompt of a synthetic problem and an episode-tagged
    response of 1–6 episodes."""
    from l2t_core.prompts import build_prompt
    from l2t_core.tasks.common import render_trace

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        steps = [f"Add {a} and {b + k}: {a + b + k}." for k in range(1 + i % 6)]
        out.append((build_prompt(f"Add {a} and {b}, then multiply the sum by 2."),
                    render_trace(steps, str(2 * (a + b)))))
    return out


def _ours(model_dir, pairs, *, steps: int, batch: int, lr: float, warmup: int, seed: int) -> dict:
    from l2t_core.models import load_policy
    from l2t_core.sft import encode_pairs, sft

    model, tok = load_policy(model_dir)
    stamps: list[float] = []
    sft(model, tok, pairs, steps=steps, batch_size=batch, lr=lr, warmup_frac=0.0, min_lr_frac=1.0, seed=seed,
        checkpoint_every=1, on_checkpoint=lambda state, engine: stamps.append(time.perf_counter()), show_progress=False)
    # stamps[i] is the end of step i + 1 (none after the last step): steps warmup+1 .. steps-1 are timed
    measured = stamps[warmup - 1:] if warmup else stamps
    seconds = measured[-1] - measured[0]
    n = len(measured) - 1
    tokens = sum(len(ids) for ids, _ in encode_pairs(tok, pairs)) / len(pairs)
    return {"measured_steps": n, "seconds": seconds, "examples_per_s": n * batch / seconds,
            "tokens_per_example": tokens, "tokens_per_s": n * batch / seconds * tokens}


def _trl(model_dir, pairs, out_dir, *, steps: int, batch: int, lr: float, warmup: int, seed: int,
         group_by_length: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    times: list[float] = []

    class Clock(TrainerCallback):  # step k's time: from the end of step k - 1 to its own end, so
        def on_train_begin(self, args, state, control, **kw):  # loading and collating its batch count,
            self.t = time.perf_counter()  # as they do in ours (TRL does both before on_step_begin)

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    cfg = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                    num_train_epochs=1, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", use_cpu=True,
                    report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", bf16=False,
                    gradient_checkpointing=False, packing=False, max_length=None, completion_only_loss=True,
                    dataloader_num_workers=0, seed=seed, disable_tqdm=True,
                    train_sampling_strategy="group_by_length" if group_by_length else "random")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) / len(pairs)
    trainer.train()
    measured = times[warmup:]
    seconds = sum(measured)
    return {"measured_steps": len(measured), "seconds": seconds, "examples_per_s": len(measured) * batch / seconds,
            "tokens_per_example": tokens, "tokens_per_s": len(measured) * batch / seconds * tokens}


def run(*, steps: int, batch: int, lr: float, hidden: int, layers: int, warmup: int, threads: int, seed: int,
        trl_group_by_length: bool = False) -> dict:
    version = _trl_version()
    if version is None:
        return {"error": "trl is not installed; install the benchmark extra: pip install -e '.[bench]'"}
    with tempfile.TemporaryDirectory(prefix="l2t-bench-sft-") as tmp, torch_threads(threads) as n_threads:
        ws = build_workspace(tmp, hidden=hidden, layers=layers, seed=seed)
        pairs = examples(steps * batch, seed)
        log(f"tiny Qwen2 ({ws.parameters / 1e6:.2f}M parameters), {len(pairs)} examples, {steps} steps of {batch}, "
            f"{n_threads} thread(s)", "sft_vs_trl")
        trl_out = _trl(ws.model_dir, pairs, f"{tmp}/trl", steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed,
                       group_by_length=trl_group_by_length)
        ours = _ours(ws.model_dir, pairs, steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed)
    ratio = ours["examples_per_s"] / trl_out["examples_per_s"]
    return {"step_throughput_ratio": ratio, "target": TARGET, "target_met": ratio >= TARGET, "ours": ours,
            "trl": trl_out, "trl_version": version, "threads": n_threads, "threads_note": THREADS_NOTE,
            "trl_group_by_length": trl_group_by_length, "parameters": ws.parameters, "steps": steps, "batch": batch, "warmup_steps": warmup, "lr": lr,
            "definition": "training examples per second of optimizer-step wall time over the measured steps "
                          "(one epoch, each example once); tokens_per_s = that x each side's mean tokens per "
                          "example"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of the epoch, warm-up included")
    ap.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both trainers (default 1, see above)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-group-by-length", action="store_true",
                    help="TRL batches examples of similar length too (train_sampling_strategy group_by_length)")
    args = ap.parse_args(argv)
    kw = dict(steps=args.steps, warmup=args.warmup, batch=args.batch, hidden=args.hidden, layers=args.layers,
              trl_group_by_length=args.trl_group_by_length)
    if args.quick:
        kw.update(steps=5, warmup=1, batch=4, hidden=64, layers=2)
    if kw["steps"] < kw["warmup"] + 3:
        ap.error(f"--steps must leave at least 3 steps after --warmup {kw['warmup']}")
    return run_and_emit(run, quick=args.quick, lr=args.lr, threads=args.threads, seed=args.seed, **kw)


if __name__ == "__main__":
    main()
