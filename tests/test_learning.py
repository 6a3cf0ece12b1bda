"""Does the trainer learn? Checks of the update's direction and size, and of a short real run.

The other trainer tests check each formula against a reference and the trainer against itself
(accumulation, resume); none of them would fail if the whole update pointed the wrong way, if the
log-probabilities were scored one token off the advantages, if a loss scale were dropped, or if
the optimizer never stepped. These tests would:

* ``test_one_update_moves_log_probs_the_way_the_rewards_say`` (fast): one real
  ``Trainer.train_step`` (method grpo) on a fixed group of four responses, two right and two
  wrong as the run's own verifier and advantages judge them; only sampling is replaced, by a
  rollout engine that returns the fixed responses. The summed log-prob of each right response
  must go up and that of each wrong one down, by a clear margin, and every move must reverse
  when the reference answer (hence the reward) is swapped. ``sgd``: AdamW made plain SGD through
  its own config fields (β1 = 0, ε far above every gradient, no clipping or decay), and the
  parameter change must also equal −(lr/ε)·∇L of the loss written out here independently
  (full-logits forward, hand-computed GRPO advantages, token mean); this is what catches a
  wrong loss scale or a one-token shift, which AdamW's sign-like first step hides. ``adamw``:
  the default AdamW at a large learning rate.
* ``test_grpo_run_raises_training_accuracy`` (slow): a real ``Trainer.run()`` with method grpo
  on prompts that all have the answer 7, sampled by the random-init tiny model; its training
  accuracy must rise from the first steps to the last.

Checked by mutating a copy of the code: a flipped loss sign, logits not shifted against their
targets, the response mask one token early, advantages taken from the wrong rows, rotated across
responses or shifted by a token, the micro-batch loss scale dropped, a per-sequence instead of
per-token denominator, the optimizer step removed or its gradient zeroed first, the group
advantage's sign flipped, a non-detached log π_old, a detached surrogate: each fails the ``sgd``
case (all but the mask, the token shift and the denominator fail ``adamw`` too); the sign, the
optimizer (removed or zeroed), the wrong rows and the advantage sign also fail the slow run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import CORPUS

from l2t_core.config import TrainConfig
from l2t_core.models import build_tiny_qwen2, build_tokenizer
from l2t_core.prompts import build_prompt
from l2t_core.rewards.fitting import microbatches
from l2t_core.rollout import Completion, RolloutEngine
from l2t_core.trainer import Trainer

RESPONSES = (  # (text, right when the reference is 7, right when it is 14)
    ("\\boxed{7}", True, False),
    ("The answer is \\boxed{7}", True, False),
    ("\\boxed{14}", False, True),
    ("The answer is \\boxed{14}", False, True),
)


class FixedResponses(RolloutEngine):
    """A rollout engine that answers every prompt with the same fixed responses (token ids)."""

    name = "fixed"

    def __init__(self, responses: list[tuple[list[int], str]]):
        self.responses = responses
        self.synced = 0

    def generate(self, prompts, params):
        assert params.n == len(self.responses)
        return [[Completion(list(p), list(ids), text, True) for ids, text in self.responses]
                for p in prompts]

    def sync_weights(self, model) -> None:
        self.synced += 1


@pytest.fixture
def sum_data(tmp_path, monkeypatch) -> Path:
    """Two one-problem JSONL files with the same prompt: answer 7 and answer 14."""
    d = tmp_path / "data"
    d.mkdir()
    for answer in ("7", "14"):
        row = {"id": f"sum{answer}", "problem": "Compute 3 + 4.", "answer": answer}
        (d / f"answer{answer}.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("L2T_DATA_DIR", str(d))
    return d


def fixed_trainer(policy: Path, out: Path, answer: str, optim: dict) -> Trainer:
    cfg = TrainConfig.model_validate(dict(
        policy=str(policy), out=str(out), steps=1, prompts_per_step=1, method="grpo", seed=0,
        data={"source": f"answer{answer}.jsonl"}, optim=optim,
        rollout={"group_size": len(RESPONSES), "max_new_tokens": 16, "max_prompt_tokens": 512},
        # with the ~300-token prompt of the shared tiny tokenizer: two micro-batches of unequal
        # token counts, one of them padded, so the loss scale of gradient accumulation matters
        micro_batch_tokens=960, mini_batches=1,
    ))
    tr = Trainer(cfg, show_progress=False)
    tr.setup()
    tok = tr.tokenizer
    fixed = []
    for text, *_ in RESPONSES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        fixed.append((ids, tok.decode(ids, skip_special_tokens=True)))
    tr.rollout = FixedResponses(fixed)
    return tr


def summed_logprobs(model, prompt: list[int], responses: list[list[int]]) -> torch.Tensor:
    """Σ_t log π(z_t | prompt, z_<t) per response: one unpadded full-logits forward each (written
    here independently of the trainer's scoring path)."""
    out = []
    for ids in responses:
        x = torch.tensor([list(prompt) + list(ids)])
        logits = model(input_ids=x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
        out.append(lp[len(prompt) - 1:].sum())
    return torch.stack(out)


def one_step(tr: Trainer):
    """(summed log-probs before, after, the step's metrics row, parameters before and after)."""
    model = tr.engine.unwrapped()
    prompt = tr.prompt_ids[0]
    responses = [ids for ids, _ in tr.rollout.responses]
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = summed_logprobs(model, prompt, responses)
    row = tr.train_step(1)
    with torch.no_grad():
        after = summed_logprobs(model, prompt, responses)
    after_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return before, after, row, before_params, after_params


def reference_update(model, prompt, responses, outcomes, lr, eps) -> dict[str, torch.Tensor]:
    """The first AdamW step with β1 = 0 and no clipping or decay, −lr·g/(|g| + ε), for the GRPO
    loss written out: A_i = (r_i − mean r)/(std r + 1e-6) (population std), ratio 1 (on-policy),
    L = −Σ_i A_i Σ_t log π(z_it) / Σ_i T_i (token mean; the k3 KL's gradient is 0 at π = π_ref)."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    r = torch.tensor(outcomes, dtype=torch.float64)
    adv = ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).float()
    n_tok = sum(len(x) for x in responses)
    loss = -(adv * summed_logprobs(model, prompt, responses)).sum() / n_tok
    loss.backward()
    return {n: -lr * p.grad / (p.grad.abs() + eps) for n, p in model.named_parameters()}


# AdamW's first step with β1 = 0 is −lr·g/(|g| + ε): with ε = 1e4 far above every gradient entry
# (|g| ≤ 0.25 here) it is SGD with step lr/ε = 0.01, so the update's size follows the loss's scale
SGD = dict(lr=100.0, eps=1e4, betas=(0.0, 0.999), grad_clip=0.0, weight_decay=0.0,
           schedule="constant", warmup_frac=0.0)
ADAMW = dict(lr=1e-3)  # the default AdamW (β 0.9/0.999, ε 1e-8, clip 1, decay 0.01) at a large rate


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_update_moves_log_probs_the_way_the_rewards_say(tiny_dir, sum_data, tmp_path,
                                                            optimizer):
    optim = SGD if optimizer == "sgd" else ADAMW
    # measured Δ (tiny_dir): sgd +0.20 +0.12 −0.56 −0.64 (reference 7), −0.19 −0.10 +0.77 +0.87
    # (reference 14); adamw +0.59 +0.40 −0.95 −1.14 and −0.31 −0.31 +1.50 +1.51
    margin = 0.05 if optimizer == "sgd" else 0.15
    deltas = {}
    for answer in ("7", "14"):
        tr = fixed_trainer(tiny_dir, tmp_path / answer, answer, optim)
        responses = [ids for ids, _ in tr.rollout.responses]
        lengths = [len(tr.prompt_ids[0]) + len(ids) for ids in responses]
        assert len(microbatches(lengths, tr.cfg.micro_batch_tokens)) > 1  # accumulation happens
        right = [r7 if answer == "7" else r14 for _, r7, r14 in RESPONSES]
        start = copy.deepcopy(tr.engine.unwrapped())
        before, after, row, p0, p1 = one_step(tr)

        # the run's own verifier and GRPO advantages saw what this test means by right and wrong
        recorded = tr.metrics.buffers["rollouts"]
        assert [r["outcome"] for r in recorded] == [float(x) for x in right]
        signs = [1.0 if x else -1.0 for x in right]
        assert [r["advantage"] for r in recorded] == pytest.approx(signs, abs=1e-5)
        assert row["accuracy"] == 0.5 and row["lr"] == pytest.approx(optim["lr"])
        assert tr.rollout.synced == 1  # the sampler was given the new weights

        if optimizer == "sgd":  # the step is exactly −(lr/ε)·∇L of the loss written out by hand
            expected = reference_update(start, tr.prompt_ids[0], responses, right, optim["lr"],
                                        optim["eps"])
            assert max(float(e.abs().max()) for e in expected.values()) > 1e-3
            for n in p0:
                torch.testing.assert_close(
                    p1[n] - p0[n], expected[n], rtol=1e-3, atol=1e-6,
                    msg=lambda m, n=n: f"the update of {n} is not −(lr/ε)·∇L: {m}")

        delta = after - before
        deltas[answer] = delta
        ok = torch.tensor(right)
        moved = f"reference {answer}: summed log-probs moved by {delta.tolist()}"
        assert (delta[ok] > margin).all(), moved
        assert (delta[~ok] < -margin).all(), moved
    # the same inputs with the rewards swapped move every response the other way
    assert (deltas["7"] * deltas["14"] < 0).all(), {k: v.tolist() for k, v in deltas.items()}


def seven_problems() -> list[dict]:
    """16 prompts whose answer is always 7."""
    add = [{"id": f"add{a}", "problem": f"Compute {a} + {7 - a}.", "answer": "7"} for a in range(8)]
    sub = [{"id": f"sub{a}", "problem": f"What is {7 + a} - {a}?", "answer": "7"} for a in range(8)]
    return add + sub


@pytest.fixture(scope="module")
def seven_run_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(policy directory, data directory): a random-init 2-layer Qwen2 with a byte-level BPE
    tokenizer whose merges also cover the prompt template (96-token prompts instead of ~300, which
    halves the run's time), and a JSONL file of the 16 problems."""
    root = tmp_path_factory.mktemp("seven")
    rows = seven_problems()
    tok = build_tokenizer(CORPUS + [build_prompt(r["problem"]) for r in rows[:8]], vocab_size=512)
    model = build_tiny_qwen2(len(tok), hidden_size=64, num_layers=2, intermediate_size=160, seed=0)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    (root / "data").mkdir()
    (root / "data" / "seven.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "policy", root / "data"


@pytest.mark.slow
def test_grpo_run_raises_training_accuracy(seven_run_inputs, tmp_path, monkeypatch):
    """A real GRPO run learns to answer 7. Sampled at temperature 1 from the random-init model,
    about 2 % of the 8-token responses end on the number 7 (math-verify reads the last number when
    there is no box), so the 64 rollouts of each step hold an occasional right answer to reinforce.

    Measured with this configuration (training accuracy, mean of the first 4 / last 4 of 24 steps;
    one thread, 12-30 s per run on a shared 2-core machine): seeds 0-9 all rise from ≤ 0.04 to
    ≥ 0.93 (seed 0: 0.031 → 1.000, seed 1: 0.004 → 0.938, seed 2: 0.027 → 1.000); the slowest,
    seed 1, first passes 0.3 at step 18, so the margin of 0.5 leaves room for a slower start."""
    policy, data = seven_run_inputs
    monkeypatch.setenv("L2T_DATA_DIR", str(data))
    torch.set_num_threads(1)
    steps, k = 24, 4
    cfg = TrainConfig.model_validate(dict(
        policy=str(policy), out=str(tmp_path / "run"), method="grpo", seed=0, steps=steps,
        prompts_per_step=4, checkpoint_every=steps, data={"source": "seven.jsonl"},
        optim={"lr": 1e-2, "schedule": "constant"},
        rollout={"group_size": 16, "max_new_tokens": 8, "max_prompt_tokens": 512},
    ))
    result = Trainer(cfg, show_progress=False).run()
    acc = result.steps.sort_values("step")["accuracy"].to_numpy()
    assert len(acc) == steps
    first, last = acc[:k].mean(), acc[-k:].mean()
    assert last - first > 0.5, f"training accuracy did not rise: {acc.round(3).tolist()}"
