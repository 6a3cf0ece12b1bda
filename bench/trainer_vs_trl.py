"""Our GRPO training step vs TRL's ``GRPOTrainer`` on the same tiny model, same prompts, same CPU.
Prints one JSON object.

* ``step_throughput_ratio`` = our step throughput ÷ TRL's.
* ``generation_throughput_ratio`` = our rollout engine's generation throughput ÷ TRL's.
Target (issue 3): both >= 1.0.

What is counted (the same definition on both sides):

* **step throughput** = (prompt tokens + generated tokens of every sequence of the step) ÷ wall
  time of the optimizer step, summed over the measured steps. The step is everything from the
  prompts to the end of the optimizer update: generation, reward (the verifier), log π_old where an
  implementation computes it, reference log-probs, forward/backward, clipping and AdamW. Ours:
  :meth:`~l2t_core.trainer.Trainer.train_step` (it also does its metrics bookkeeping); TRL: from a
  callback's ``on_step_begin`` to its ``on_step_end`` (the accumulation window, which holds TRL's
  generation, scoring and loss, plus the optimizer step).
* **generation throughput** = generated tokens ÷ wall time of the call that turns a batch of
  prompts into decoded completions: ours :meth:`RolloutEngine.generate` (token ids in, ids + text
  out), TRL ``GRPOTrainer._generate`` (prompt tokenisation, ``model.generate``, EOS masking,
  decoding). Both sample with transformers ``generate`` under a KV cache, so this mostly measures
  the batching and the code around it. TRL's bare ``_generate_single_turn`` time is reported too.
* **generated tokens** = sampled tokens including the terminating EOS when one was sampled, never
  padding (ours: ``len(response_ids) + finished``; TRL: its EOS-masked ``completion_ids``).

Settings held equal: the model (a tiny random-init Qwen2 saved once, loaded by both with
``from_pretrained`` in float32, SDPA attention), the prompts of every step (TRL's dataset is the
list of prompts our trainer draws at each step, unshuffled), G = ``num_generations``, the maximum
completion length, sampling (temperature 1.0, top-p 1.0, no top-k), one generation batch per
optimizer step, processed in ONE forward/backward (TRL ``per_device_train_batch_size`` = P·G,
no accumulation; ours ``micro_batch_tokens`` large enough for the whole batch), one update per
batch (``num_iterations`` 1 / ``mini_batches`` 1), clipped surrogate ε_low = ε_high = 0.2, k3 KL to
the frozen reference with β = 0.001, token-level aggregation (ours ``token_mean``; TRL ``dapo``,
which divides by the number of completion tokens of the whole generation batch and so equals
``token_mean`` with no accumulation and one process), group-normalised outcome advantages
(TRL ``scale_rewards="group"``), KL without TRL's importance-ratio correction
(``use_bias_correction_kl=False``; the ratio is 1 on-policy anyway), AdamW (``adamw_torch``, not
fused) with the same lr, weight decay 0.01, betas, eps, a constant schedule and grad-norm clip 1.0,
float32 (TRL's ``bf16`` default off), no gradient checkpointing (TRL's default on), the same torch
thread count, the reward from the same verifier (:class:`~l2t_core.verify.MathVerifier`, as our
trainer uses for JSONL data). TRL runs with ``use_cpu=True``, ``report_to="none"``, no vLLM, no
saving. One warm-up step is excluded on each side. The two trainers alternate step by step
(after each TRL optimizer step its callback runs one of ours, outside TRL's timed window), so a
change in machine load hits both alike.

Remaining differences, by design of each trainer: ours computes log π_old with an extra no-grad
forward inside the reward phase (TRL skips it on-policy and uses the detached current log-probs);
TRL computes per-token entropies and full completion logits in its loss pass; TRL counts and trains
the EOS token, ours does not train it. Sampled completions differ (different RNG streams), which
is why throughputs, not times, are compared.

The default is one thread because this machine's 2 cores are shared: with 2 OpenMP threads and
other processes running, small kernels spin-wait and generation slows by up to ~100x, which says
nothing about either trainer. Pass ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import time
import traceback

import torch

from ._common import DATA_FILE, Workspace, build_workspace, data_dir_env, log, run_and_emit, torch_threads

TARGET = 1.0
TAG = "trainer_vs_trl"


def _trl_version() -> str | None:
    try:
        import trl

        return trl.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None


# ---------------------------------------------------------------------------------------- ours
class _Ours:
    """Our trainer, set up once and stepped one optimizer step at a time (interleaved with TRL's)."""

    def __init__(self, ws: Workspace, *, steps: int, prompts: int, group: int, max_new_tokens: int, lr: float,
                 seed: int):
        from l2t_core.config import TrainConfig
        from l2t_core.trainer import Trainer, step_prompt_indices

        micro = prompts * group * (1024 + max_new_tokens)  # the whole batch in one forward/backward
        cfg = TrainConfig(
            policy=str(ws.model_dir), out=str(ws.root / "ours"), method="grpo", steps=steps + 1,
            prompts_per_step=prompts, micro_batch_tokens=micro, mini_batches=1, checkpoint_every=10_000,
            log_rollouts=False, seed=seed, device="cpu", data={"source": DATA_FILE},
            optim={"lr": lr, "weight_decay": 0.01, "warmup_frac": 0.0, "schedule": "constant", "grad_clip": 1.0},
            rollout={"group_size": group, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new_tokens,
                     "max_prompt_tokens": 1024, "max_batch_sequences": prompts * group},
            reward={"loss": {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.001, "aggregation": "token_mean"}},
        )
        self.data_dir = ws.data_dir
        with data_dir_env(self.data_dir):
            self.tr = Trainer(cfg, show_progress=False)
            self.tr.setup()
        self.steps: list[dict] = []
        self.gen: list[dict] = []
        inner = self.tr.rollout.generate

        @functools.wraps(inner)
        def timed_generate(prompt_ids, params):
            t0 = time.perf_counter()
            groups = inner(prompt_ids, params)
            dt = time.perf_counter() - t0
            comps = [c for g in groups for c in g]
            self.gen.append({"s": dt, "prompt_tokens": sum(len(c.prompt_ids) for c in comps),
                             "completion_tokens": sum(len(c.response_ids) + int(c.finished) for c in comps),
                             "sequences": len(comps)})
            return groups

        self.tr.rollout.generate = timed_generate
        # the prompts our trainer draws, step by step: TRL's dataset, in this order, unshuffled
        order = [i for s in range(1, steps + 2) for i in step_prompt_indices(len(self.tr.problems), prompts, s, seed)]
        self.problems = [{"prompt": self.tr.problems[i].prompt, "answer": self.tr.problems[i].answer} for i in order]

    def step(self) -> None:
        s = len(self.steps) + 1
        with data_dir_env(self.data_dir):
            t0 = time.perf_counter()
            row = self.tr.train_step(s)
            dt = time.perf_counter() - t0
        self.steps.append({"s": dt, **{k: row[k] for k in ("rollout_time_s", "reward_time_s", "ref_time_s",
                                                           "update_time_s")}})
        log(f"ours step {s}: {dt:.2f}s (generate {self.gen[-1]['s']:.2f}s, "
            f"{self.gen[-1]['completion_tokens']} generated tokens)", TAG)

    def result(self) -> dict:
        return {"steps": self.steps, "gen": self.gen}


# ---------------------------------------------------------------------------------------- TRL
def _run_trl(ws: Workspace, ours: _Ours | None, problems: list[dict], *, steps: int, prompts: int, group: int,
             max_new_tokens: int, lr: float, seed: int) -> dict:
    """TRL's GRPOTrainer.train(); after each of its optimizer steps (outside TRL's timed window) one
    step of ``ours`` runs, so both see the same machine load."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from l2t_core.verify import MathVerifier

    verifier = MathVerifier()

    def outcome_reward(completions, answer, **_):
        return [verifier.verify(c, a).reward for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.times = None, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            log(f"TRL  step {len(self.times)}: {self.times[-1]:.2f}s", TAG)
            if ours is not None:
                ours.step()

    # TRL turns gradient checkpointing on by default; transformers 5 renamed it activation_checkpointing
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_ckpt = {"activation_checkpointing": False} if "activation_checkpointing" in names else {
        "gradient_checkpointing": False}
    args = GRPOConfig(
        output_dir=str(ws.root / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        **no_ckpt, seed=seed, data_seed=seed, max_steps=steps + 1,
        per_device_train_batch_size=prompts * group, gradient_accumulation_steps=1, num_generations=group,
        max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.001, epsilon=0.2, epsilon_high=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
        use_bias_correction_kl=False, mask_truncated_completions=False, shuffle_dataset=False,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        logging_steps=10_000, save_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, remove_unused_columns=False, model_init_kwargs={"dtype": "float32"},
    )
    if args.gradient_checkpointing or args.bf16 or args.use_vllm:
        raise RuntimeError("TRL config: gradient checkpointing, bf16 and vLLM must all be off for this comparison")
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir))
    timer = StepTimer()
    trainer = GRPOTrainer(model=str(ws.model_dir), reward_funcs=outcome_reward, args=args,
                          train_dataset=Dataset.from_list(problems), processing_class=tok, callbacks=[timer])
    gen_log: list[dict] = []
    single_log: list[float] = []
    inner_generate, inner_single = trainer._generate, trainer._generate_single_turn

    @functools.wraps(inner_generate)
    def timed_generate(prompts_):
        t0 = time.perf_counter()
        out = inner_generate(prompts_)
        dt = time.perf_counter() - t0
        prompt_ids, completion_ids = out[0], out[1]
        gen_log.append({"s": dt, "prompt_tokens": sum(len(p) for p in prompt_ids),
                        "completion_tokens": sum(len(c) for c in completion_ids), "sequences": len(completion_ids)})
        return out

    @functools.wraps(inner_single)
    def timed_single(*a, **k):
        t0 = time.perf_counter()
        out = inner_single(*a, **k)
        single_log.append(time.perf_counter() - t0)
        return out

    trainer._generate, trainer._generate_single_turn = timed_generate, timed_single
    trainer.train()
    if len(timer.times) != steps + 1 or len(gen_log) != steps + 1:
        raise RuntimeError(f"TRL ran {len(timer.times)} steps and {len(gen_log)} generation calls; expected "
                           f"{steps + 1} of each (one generation batch per optimizer step)")
    return {"steps": [{"s": t} for t in timer.times], "gen": gen_log, "generate_single_turn_s": single_log}


# ---------------------------------------------------------------------------------------- summary
def _summary(res: dict) -> dict:
    """Throughputs over the measured steps (step 1 is the warm-up)."""
    steps, gen = res["steps"][1:], res["gen"][1:]
    tokens = sum(g["prompt_tokens"] + g["completion_tokens"] for g in gen)
    gen_tokens = sum(g["completion_tokens"] for g in gen)
    step_s, gen_s = sum(s["s"] for s in steps), sum(g["s"] for g in gen)
    out = {
        "step_tokens_per_s": tokens / step_s,
        "generation_tokens_per_s": gen_tokens / gen_s,
        "step_s_mean": step_s / len(steps),
        "generation_s_mean": gen_s / len(gen),
        "prompt_tokens_per_step": sum(g["prompt_tokens"] for g in gen) / len(gen),
        "generated_tokens_per_step": gen_tokens / len(gen),
        "mean_completion_tokens": gen_tokens / sum(g["sequences"] for g in gen),
        "step_s": [round(s["s"], 3) for s in steps],
    }
    if "rollout_time_s" in steps[0]:
        out["phases_s_mean"] = {k: sum(s[k] for s in steps) / len(steps)
                                for k in ("rollout_time_s", "reward_time_s", "ref_time_s", "update_time_s")}
    if "generate_single_turn_s" in res:
        single = res["generate_single_turn_s"][1:]
        out["model_generate_tokens_per_s"] = gen_tokens / sum(single)
    return out


def run(*, steps: int = 3, prompts: int = 8, group: int = 8, max_new_tokens: int = 192, hidden: int = 128,
        layers: int = 4, lr: float = 1e-6, threads: int | None = 1, seed: int = 0) -> dict:
    """The comparison as a dict (``error`` set, and no ratios, when TRL is missing or fails)."""
    with torch_threads(threads) as n_threads:
        return _run(steps=steps, prompts=prompts, group=group, max_new_tokens=max_new_tokens, hidden=hidden,
                    layers=layers, lr=lr, seed=seed, n_threads=n_threads)


def _run(*, steps: int, prompts: int, group: int, max_new_tokens: int, hidden: int, layers: int, lr: float,
         seed: int, n_threads: int) -> dict:
    setting = {"prompts_per_step": prompts, "group_size": group, "max_completion_tokens": max_new_tokens,
               "steps_measured": steps, "warmup_steps": 1, "hidden": hidden, "layers": layers, "lr": lr,
               "threads": n_threads, "device": "cpu", "trl_version": _trl_version(), "torch_version": torch.__version__}
    import transformers

    setting["transformers_version"] = transformers.__version__
    if setting["trl_version"] is None:
        return {"error": "trl is not installed (it is a benchmark-only dependency: pip install 'l2t[bench]')",
                **setting}
    with tempfile.TemporaryDirectory(prefix="l2t-bench-trl-") as tmp:
        ws = build_workspace(tmp, n_problems=max(64, prompts * (steps + 1)), hidden=hidden, layers=layers, seed=seed)
        setting.update(parameters=ws.parameters, vocab=ws.vocab)
        kw = dict(steps=steps, prompts=prompts, group=group, max_new_tokens=max_new_tokens, lr=lr, seed=seed)
        log(f"GRPO, {prompts} prompts x G={group}, max {max_new_tokens} new tokens, 1 warm-up + {steps} steps each; "
            "TRL and ours alternate step by step", TAG)
        ours = _Ours(ws, **kw)
        try:
            trl_res = _run_trl(ws, ours, ours.problems, **kw)
        except Exception as exc:  # noqa: BLE001 - report, don't crash: the JSON must still come out
            traceback.print_exc(file=sys.stderr)
            out = {"error": f"TRL GRPOTrainer failed: {type(exc).__name__}: {exc}", **setting}
            if len(ours.steps) >= 2:
                out["ours"] = _summary(ours.result())
            return out
        while len(ours.steps) < steps + 1:  # (TRL always runs steps + 1; kept for safety)
            ours.step()
        ours = ours.result()
    o, t = _summary(ours), _summary(trl_res)
    step_ratio = o["step_tokens_per_s"] / t["step_tokens_per_s"]
    gen_ratio = o["generation_tokens_per_s"] / t["generation_tokens_per_s"]
    return {
        "step_throughput_ratio": step_ratio,
        "generation_throughput_ratio": gen_ratio,
        "target": TARGET,
        "targets_met": {"step_throughput_ratio>=1": step_ratio >= TARGET,
                        "generation_throughput_ratio>=1": gen_ratio >= TARGET},
        "ours": o,
        "trl": t,
        "token_definition": "step: (prompt + generated tokens) per second of optimizer-step wall time; "
                            "generation: generated tokens (incl. a sampled EOS, no padding) per second of the "
                            "prompts-to-decoded-completions call",
        "loss": {"ours": "token_mean, clip 0.2/0.2, k3 KL beta 0.001", "trl_loss_type": "dapo",
                 "trl_use_bias_correction_kl": False},
        **setting,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="G = num_generations")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both trainers (default 1, see above)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kw = dict(steps=args.steps, prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens,
              hidden=args.hidden, layers=args.layers)
    if args.quick:
        kw.update(steps=1, prompts=2, group=4, max_new_tokens=32, hidden=64, layers=2)
    return run_and_emit(run, quick=args.quick, lr=args.lr, threads=args.threads, seed=args.seed, **kw)


if __name__ == "__main__":
    main()
