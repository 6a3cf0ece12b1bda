"""The RL trainer: resume equals an uninterrupted run, atomic checkpoints on local and object
storage, gradient accumulation, metrics tables, and clear errors before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from l2t_core.checkpoint import LATEST, RunStorage
from l2t_core.cli import apply_overrides, build_config, main as cli_main
from l2t_core.config import TrainConfig
from l2t_core.engines import lr_lambda
from l2t_core.metrics import read_table
from l2t_core.rewards.compression import TargetError
from l2t_core.trainer import Trainer, run_dependent, step_prompt_indices


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("toy_data")
    with open(d / "toy.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": f"t{i}", "problem": f"Compute {i} + 1.", "answer": str(i + 1)}) + "\n")
    (d / "empty.jsonl").write_text("\n")
    monkeypatch_module.setenv("L2T_DATA_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def make_cfg(policy, out, **kw) -> TrainConfig:
    base = dict(
        policy=str(policy), out=str(out), steps=4, prompts_per_step=2, checkpoint_every=2, method="l2t",
        data={"source": "toy.jsonl"}, optim={"lr": 1e-3},
        rollout={"group_size": 4, "max_new_tokens": 16, "max_prompt_tokens": 512},
        micro_batch_tokens=300, mini_batches=2,
    )
    base.update(kw)
    return TrainConfig.model_validate(base)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if run_dependent(c)]).reset_index(drop=True)


def run_recording_grads(tr: Trainer, grads: dict, name: str) -> None:
    """Run ``tr``, keeping the accumulated gradients of its (last) optimizer step in ``grads[name]``."""
    tr.setup()
    original = tr.engine.step

    def recording_step():
        grads[name] = {n: p.grad.detach().clone() for n, p in tr.engine.module.named_parameters()}
        return original()

    tr.engine.step = recording_step
    tr.run()


def test_lr_schedule_warmup_then_cosine():
    vals = [lr_lambda(s, 10, 0.2, "cosine") for s in range(10)]
    assert vals[0] == pytest.approx(0.5) and vals[1] == pytest.approx(1.0)
    assert vals[2] == pytest.approx(1.0) and vals[-1] < 0.05
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))
    assert lr_lambda(7, 10, 0.0, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(0, 10, 0.0, "linear")


def test_step_prompts_are_a_pure_function_of_the_step():
    a = [step_prompt_indices(10, 3, s, seed=1) for s in range(1, 5)]
    b = [step_prompt_indices(10, 3, s, seed=1) for s in range(1, 5)]
    assert a == b
    first_epoch = [i for s in range(1, 4) for i in step_prompt_indices(10, 3, s, 1)] + step_prompt_indices(10, 3, 4, 1)[:1]
    assert sorted(first_epoch) == list(range(10))  # each problem once per epoch
    assert step_prompt_indices(10, 3, 1, seed=2) != a[0]


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_metrics_and_weights(tiny_dir, toy_data, tmp_path):
    torch.set_num_threads(1)
    full = Trainer(make_cfg(tiny_dir, tmp_path / "full"), show_progress=False).run()
    crashed = Trainer(make_cfg(tiny_dir, tmp_path / "resumed"), show_progress=False).run(stop_after=3)
    assert crashed.final_step == 3
    store = RunStorage(str(tmp_path / "resumed"))
    assert store.latest_checkpoint()[0] == 2  # step 3 was never checkpointed
    seen = []  # on_step streams each newly trained step (here 3 and 4), in order, as it finishes
    resumed = Trainer(make_cfg(tiny_dir, tmp_path / "resumed"), show_progress=False).run(on_step=seen.append)
    assert resumed.final_step == 4 and [r["step"] for r in seen] == [3, 4]
    assert seen[-1]["accuracy"] == resumed.steps.set_index("step").loc[4, "accuracy"]
    pd.testing.assert_frame_equal(comparable(full.steps), comparable(resumed.steps), rtol=1e-6)
    assert list(resumed.steps["step"]) == [1, 2, 3, 4]  # step 3 recomputed, stored once
    for table in ("rollouts", "episode_rewards"):
        a, b = read_table(RunStorage(str(tmp_path / "full")), table), read_table(store, table)
        pd.testing.assert_frame_equal(a.drop(columns="run_id"), b.drop(columns="run_id"), rtol=1e-6)
    again = Trainer(make_cfg(tiny_dir, tmp_path / "resumed"), show_progress=False).run()  # already finished
    assert again.final_step == 4 and again.checkpoint == resumed.checkpoint is not None
    assert list(again.steps["step"]) == [1, 2, 3, 4]
    wa = (tmp_path / "full/checkpoints/step-000004/model.safetensors").read_bytes()
    wb = (tmp_path / "resumed/checkpoints/step-000004/model.safetensors").read_bytes()
    assert wa == wb
    # metrics tables are consistent with each other
    roll = read_table(store, "rollouts")
    eps = read_table(store, "episode_rewards")
    assert len(roll) == 4 * 2 * 4
    assert len(eps) == int(roll["num_episodes"].sum())
    assert np.isfinite(eps[["fitting_gain", "penalty_hat", "episode_reward"]].to_numpy()).all()
    saved = json.loads((tmp_path / "resumed/checkpoints/step-000004/train_config.json").read_text())
    assert TrainConfig.model_validate(saved) == make_cfg(tiny_dir, tmp_path / "resumed")
    # each phase's peak memory is recorded (the process's resident high-water mark on this CPU)
    from l2t_core.memory import PeakMemory
    from l2t_core.trainer import MEMORY_COLUMNS

    if PeakMemory("cpu").cpu_ok:
        peaks = full.steps[list(MEMORY_COLUMNS)]
        assert (peaks.notna().all().all() and (peaks > 0.05).all().all()), peaks


@pytest.mark.slow
def test_resume_refuses_a_different_config(tiny_dir, toy_data, tmp_path):
    Trainer(make_cfg(tiny_dir, tmp_path / "r", steps=2), show_progress=False).run()
    with pytest.raises(ValueError, match="different configuration.*method"):
        Trainer(make_cfg(tiny_dir, tmp_path / "r", steps=2, method="grpo"), show_progress=False).run()
    # how often it is saved is not part of a run: a finished (or interrupted) run resumes under another cadence
    again = Trainer(make_cfg(tiny_dir, tmp_path / "r", steps=2, checkpoint_every=1, keep_checkpoints=3),
                    show_progress=False).run()
    assert again.final_step == 2 and list(again.steps["step"]) == [1, 2]


def test_cli_refuses_to_resume_another_config_in_one_line_naming_the_setting(tiny_dir, toy_data, tmp_path):
    """A second ``l2t train`` into the same --out with one setting changed is refused before any
    compute in one line (no traceback) that names the setting as --set spells it and both values."""
    argv = ["train", "--policy", str(tiny_dir), "--out", str(tmp_path / "r"), "--steps", "1", "-q",
            "--set", "data.source=toy.jsonl", "--set", "prompts_per_step=2", "--set", "rollout.group_size=2",
            "--set", "rollout.max_new_tokens=8"]
    assert cli_main([*argv, "--set", "optim.lr=0.001"]) == 0
    with pytest.raises(SystemExit, match=r"^l2t train: .* holds a run with a different configuration \(fields: "
                                         r"optim; optim\.lr: 0\.001 in the saved run, 0\.002 now\); resume with"):
        cli_main([*argv, "--set", "optim.lr=0.002"])


def test_data_source_is_a_task_a_path_where_it_is_or_a_name_in_the_data_directory(toy_data, tmp_path, monkeypatch):
    """``data.source``: a path that says where it is (``./``, ``/``) is read there; any other name in
    the data directory first, even where the working directory has a file of that name, then where
    it is; a source that is neither says so, naming the synthetic tasks and where it looked; an
    unpaired surrogate escape is refused naming the line."""
    from l2t_core.config import DataConfig
    from l2t_core.training_data import TrainingDataError, load_training_problems

    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"id": "m0", "problem": "Compute 2 + 2.", "answer": "4"}) + "\n")
    (tmp_path / "toy.jsonl").write_text(json.dumps({"id": "x", "problem": "shadow", "answer": "0"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert [p.id for p in load_training_problems(DataConfig(source="./mine.jsonl"))] == ["m0"]
    assert [p.id for p in load_training_problems(DataConfig(source=str(mine)))] == ["m0"]
    assert [p.id for p in load_training_problems(DataConfig(source="mine.jsonl"))] == ["m0"]  # not in the data dir
    assert len(load_training_problems(DataConfig(source="toy.jsonl", train_size=4))) == 4  # the data directory's
    (toy_data / "sub").mkdir(exist_ok=True)  # a relative path: under the data directory, as always
    (toy_data / "sub" / "more.jsonl").write_text(mine.read_text())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.jsonl").write_text((tmp_path / "toy.jsonl").read_text())
    assert [p.id for p in load_training_problems(DataConfig(source="sub/more.jsonl"))] == ["m0"]
    with pytest.raises(TrainingDataError, match=r"data.source 'arithmetc' is neither a synthetic task \(.*arithmetic.*\) "
                                                r"nor a file: data file 'arithmetc' not found in the data directory"):
        load_training_problems(DataConfig(source="arithmetc"))
    with pytest.raises(TrainingDataError, match=r"data.source './nope.jsonl' is neither .* nor a file: no file at nope.jsonl$"):
        load_training_problems(DataConfig(source="./nope.jsonl"))
    with pytest.raises(TrainingDataError, match=r"'sub/nope.jsonl' is neither .* no file at .*toy_data.*/sub/nope.jsonl "
                                                r"\(the data directory, L2T_DATA_DIR\) nor at sub/nope.jsonl"):
        load_training_problems(DataConfig(source="sub/nope.jsonl"))
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"id": "h", "problem": "half a pair \ud83d", "answer": "1"}) + "\n")
    with pytest.raises(TrainingDataError, match=r"half.jsonl, line 1, field 'problem': holds a .* not part of a surrogate pair"):
        load_training_problems(DataConfig(source=str(half)))


def test_prompts_that_ranks_cannot_share_evenly_fail_before_the_model_loads(tmp_path, monkeypatch):
    """Each rank samples prompts_per_step / world prompts; an uneven share gave the ranks different
    numbers of mini-batches (optimizer steps and their collectives) and a rank without prompts
    failed alone while the others waited. Refused in setup, before the policy is loaded."""
    import types

    import l2t_core.trainer as trainer_mod
    from l2t_core.trainer import check_prompt_sharding

    check_prompt_sharding(6, 3)
    check_prompt_sharding(5, 1)
    for ppl, world in ((5, 2), (2, 4), (7, 3)):
        with pytest.raises(ValueError, match=rf"prompts_per_step={ppl} cannot be shared evenly by {world} ranks.*multiple of {world}"):
            check_prompt_sharding(ppl, world)
    fake = types.SimpleNamespace(get_rank=lambda: 1, get_world_size=lambda: 2)
    monkeypatch.setattr(trainer_mod, "initialized_group", lambda: fake)
    monkeypatch.setattr(trainer_mod, "load_policy", lambda *a, **k: pytest.fail("the policy was loaded"))
    monkeypatch.setattr(trainer_mod, "load_training_problems", lambda *a, **k: pytest.fail("the data was loaded"))
    cfg = TrainConfig.model_validate(dict(policy=str(tmp_path), out=str(tmp_path / "run"), prompts_per_step=3))
    with pytest.raises(ValueError, match="prompts_per_step=3 cannot be shared evenly by 2 ranks"):
        Trainer(cfg, show_progress=False).setup()


def test_resume_reads_checkpoint_names_from_headers_and_weights_to_the_cpu(tmp_path, monkeypatch):
    """A ZeRO-3 resume checks the HF files by name only: the names come from the safetensors
    headers, no tensor loaded (it used to load the whole model onto every rank's GPU); the other
    resumes load the weights to the CPU."""
    import safetensors.torch
    from safetensors.torch import save_file

    from l2t_core.trainer import load_safetensors_cpu, safetensors_names

    a, b = tmp_path / "model-1.safetensors", tmp_path / "model-2.safetensors"
    save_file({"x.weight": torch.ones(2, 3), "y.bias": torch.zeros(3)}, str(a))
    save_file({"z.weight": torch.full((4,), 2.0)}, str(b))
    weights = load_safetensors_cpu([a, b])
    assert {k: v.device.type for k, v in weights.items()} == {"x.weight": "cpu", "y.bias": "cpu", "z.weight": "cpu"}
    assert torch.equal(weights["z.weight"], torch.full((4,), 2.0))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("a tensor was loaded"))
    assert safetensors_names([a, b]) == {"x.weight", "y.bias", "z.weight"}


def test_distributed_save_moves_the_staged_shards_and_removes_stale_staging(tmp_path):
    """The ranks' engine shards go into the checkpoint by rename (the same file, not a copy of
    gigabytes while the other ranks wait in a barrier); staging directories a crashed save left are
    removed, and only they."""
    import os

    from l2t_core.sharded_checkpoint import move_contents, remove_staging_dirs

    ck = tmp_path / "checkpoints"
    assert remove_staging_dirs(ck) == []  # no checkpoints directory yet
    for name in (".staging-000003", ".staging-000004", ".tmp-step-000001-ab", "step-000002"):
        (ck / name / "engine").mkdir(parents=True)
        (ck / name / "engine" / "shard.pt").write_text(name)
    assert remove_staging_dirs(ck) == [".staging-000003", ".staging-000004"]
    assert sorted(p.name for p in ck.iterdir()) == [".tmp-step-000001-ab", "step-000002"]

    src, dest = tmp_path / "staged", tmp_path / "dest"
    (src / "engine").mkdir(parents=True)
    (src / "engine" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"x" * 100)
    (src / "latest").write_text("engine")
    dest.mkdir()
    inode = os.stat(src / "engine" / "zero_pp_rank_0_optim_states.pt").st_ino
    move_contents(src, dest)
    assert list(src.iterdir()) == [] and sorted(p.name for p in dest.iterdir()) == ["engine", "latest"]
    assert os.stat(dest / "engine" / "zero_pp_rank_0_optim_states.pt").st_ino == inode  # renamed, not copied
    (src / "latest").write_text("again")
    with pytest.raises(FileExistsError, match="latest exists"):
        move_contents(src, dest)


def test_resume_refuses_another_number_of_ranks(tiny_dir, toy_data, tmp_path):
    """A run saved by 2 ranks (each sampled its own prompts with its own seeds, and DeepSpeed keeps
    one optimizer partition per rank) is not resumed by 1, before its engine state is read."""
    from l2t_core.trainer import STATE_FILE

    Trainer(make_cfg(tiny_dir, tmp_path / "r", steps=2), show_progress=False).run()
    ck = tmp_path / "r" / "checkpoints" / (tmp_path / "r" / "checkpoints" / LATEST).read_text().strip()
    state = torch.load(ck / STATE_FILE, weights_only=False)
    assert state["world"] == 1
    torch.save({**state, "world": 2}, ck / STATE_FILE)
    (ck / "engine_state.pt").rename(ck / "engine_state.moved")  # it must not be read
    with pytest.raises(ValueError, match=r"saved by a run on 2 rank\(s\) and this launch has 1.*new --out"):
        Trainer(make_cfg(tiny_dir, tmp_path / "r", steps=2), show_progress=False).run()


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tiny_dir, toy_data, tmp_path):
    """Many small micro-batches give the gradient of one big batch (token_mean and seq_mean)."""
    torch.set_num_threads(1)
    for agg in ("token_mean", "seq_mean"):
        grads = {}
        for name, mbt in (("small", 40), ("big", 100_000)):
            tr = Trainer(make_cfg(tiny_dir, tmp_path / f"{agg}-{name}", steps=1, micro_batch_tokens=mbt,
                                  mini_batches=1, method="l2t", reward={"loss": {"aggregation": agg}}),
                         show_progress=False)
            run_recording_grads(tr, grads, name)
        for n, g in grads["big"].items():
            torch.testing.assert_close(grads["small"][n], g, rtol=1e-4, atol=1e-7, msg=f"{agg}: {n}")
        assert max(float(g.abs().max()) for g in grads["big"].values()) > 1e-4  # a real, non-zero gradient


def test_gradient_checkpointing_recomputes_in_the_update_with_the_same_gradient(tiny_dir, toy_data, tmp_path,
                                                                               monkeypatch):
    """``gradient_checkpointing: true`` gives the update the same gradient, its decoder layers run a
    second time in the backward (so it is really on), and only there: afterwards it is off again."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    from l2t_core.models import is_checkpointing

    torch.set_num_threads(1)
    grads, calls = {}, {}
    mlp_forward = Qwen2MLP.forward
    for name, on in (("plain", False), ("checkpointed", True)):
        calls[name] = 0

        # every MLP forward (rollout, reward, reference, update, recomputation); module hooks would
        # not see the recomputation, which transformers runs on forward, not __call__
        def counted(self, x, name=name):
            calls[name] += 1
            return mlp_forward(self, x)

        monkeypatch.setattr(Qwen2MLP, "forward", counted)
        # unshared prompts on both sides (the checkpointed update cannot share them): the same forwards
        tr = Trainer(make_cfg(tiny_dir, tmp_path / name, steps=1, mini_batches=1, gradient_checkpointing=on,
                              share_prompts=False), show_progress=False)
        run_recording_grads(tr, grads, name)
        assert not is_checkpointing(tr.engine.unwrapped())
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][n], g, rtol=1e-5, atol=1e-8, msg=n)
    assert max(float(g.abs().max()) for g in grads["plain"].values()) > 1e-6
    # the same rollouts, reward pass and update forwards, plus one recomputation per layer and micro-batch
    assert calls["checkpointed"] > calls["plain"] > 0


@pytest.mark.parametrize("method", ["l2t", "grpo"])
def test_shared_prompts_give_the_update_the_same_gradient_from_fewer_prompt_tokens(tiny_dir, toy_data, tmp_path,
                                                                                   method):
    """``share_prompts`` (the default) runs each prompt once per micro-batch in the reward pass, the
    reference and the update; the step's metrics and gradient equal the unshared step's up to float
    rounding, with fewer tokens through the decoder."""
    torch.set_num_threads(1)
    grads, tokens, rows = {}, {}, {}
    for share in (True, False):
        # micro-batches that hold whole groups (a group split over micro-batches shares less)
        tr = Trainer(make_cfg(tiny_dir, tmp_path / str(share), steps=1, mini_batches=1, method=method,
                              share_prompts=share, micro_batch_tokens=100_000, reward={"loss": {"kl_coef": 0.05}}),
                     show_progress=False)
        tokens[share] = 0

        def count(mod, args, out, share=share):
            tokens[share] += args[0].numel()

        tr.setup()
        hook = tr.engine.unwrapped().get_input_embeddings().register_forward_hook(count)
        step = tr.engine.step

        def recording_step(share=share, step=step):
            grads[share] = {n: p.grad.detach().clone() for n, p in tr.engine.module.named_parameters()}
            return step()

        tr.engine.step = recording_step
        tr.run()
        hook.remove()
        rows[share] = read_table(tr.storage, "train_steps").iloc[0]
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-3, atol=1e-6, msg=n)
    assert max(float(g.abs().max()) for g in grads[False].values()) > 1e-6
    for k in ("loss", "kl", "score_mean", "episode_reward_mean", "mean_tokens"):
        assert rows[True][k] == pytest.approx(rows[False][k], rel=1e-4, abs=1e-6), k
    assert tokens[True] < tokens[False]


def test_verification_workers_give_the_same_step_and_stop_with_the_run(tiny_dir, toy_data, tmp_path):
    """``verify_workers`` verifies in worker processes beside the reward's policy pass: the same
    outcomes and metrics as in-process, the workers stopped when the run ends; a run may resume
    with another number of workers."""
    torch.set_num_threads(1)
    cfg = dict(steps=2, checkpoint_every=1)
    plain = Trainer(make_cfg(tiny_dir, tmp_path / "plain", verify_workers=0, **cfg), show_progress=False)
    expected = comparable(plain.run().steps)
    assert plain.verify_pool is None
    pooled = Trainer(make_cfg(tiny_dir, tmp_path / "pooled", verify_workers=2, **cfg), show_progress=False)
    pooled.setup()
    submitted = []
    submit = pooled.verify_pool.submit
    pooled.verify_pool.submit = lambda responses, refs: submitted.append(len(responses)) or submit(responses, refs)
    pooled.run(stop_after=1)
    assert submitted == [8]  # the step's rollouts went through the workers
    assert pooled.verify_pool._executor is None  # the workers were stopped with the run
    # resumed in-process for its second step: the same run as the in-process one throughout
    resumed = Trainer(make_cfg(tiny_dir, tmp_path / "pooled", verify_workers=0, **cfg), show_progress=False).run()
    pd.testing.assert_frame_equal(comparable(resumed.steps), expected, check_exact=False, rtol=1e-6)
    assert resumed.final_step == 2


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 50])
def test_chunked_head_gives_the_same_logprobs_and_gradients_and_recomputes_each_chunk(chunk):
    from l2t_core.logprobs import scored_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    calls = []
    head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))

    def run(chunk_tokens):
        head.zero_grad()
        hidden.grad = None
        lp = scored_logprobs(head, hidden, targets, temperature=0.7, chunk_tokens=chunk_tokens)
        (lp * torch.arange(1.0, 11.0)).sum().backward()
        return lp.detach(), hidden.grad.clone(), head.weight.grad.clone()

    want = run(None)
    calls.clear()
    got = run(chunk)
    for a, b in zip(got, want):  # the weight's gradient sums the chunks in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    n_chunks = -(-10 // chunk)
    sizes = [min(chunk, 10 - i * chunk) for i in range(n_chunks)]
    # chunked, every chunk runs again in the backward (in any order); whole, the head runs once
    if chunk < 10:
        assert calls[:n_chunks] == sizes and sorted(calls[n_chunks:]) == sorted(sizes)
    else:
        assert calls == [10]
    calls.clear()
    with torch.no_grad():
        scored_logprobs(head, hidden, targets, chunk_tokens=chunk)
    assert len(calls) == n_chunks  # nothing to recompute without autograd
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        scored_logprobs(head, hidden, targets, chunk_tokens=0)


def test_head_chunks_in_the_trainer_give_the_same_gradient(tiny_dir, toy_data, tmp_path):
    torch.set_num_threads(1)
    grads = {}
    for name, chunk in (("whole", None), ("chunked", 5)):
        tr = Trainer(make_cfg(tiny_dir, tmp_path / name, steps=1, mini_batches=1, head_chunk_tokens=chunk),
                     show_progress=False)
        run_recording_grads(tr, grads, name)
    for n, g in grads["whole"].items():  # the same sums in another order: float rounding apart
        torch.testing.assert_close(grads["chunked"][n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert max(float(g.abs().max()) for g in grads["whole"].values()) > 1e-6


def test_activation_checkpointing_is_undone_on_error_and_refused_where_unsupported(model):
    from l2t_core.models import activation_checkpointing, is_checkpointing

    model.train()
    with pytest.raises(RuntimeError, match="boom"), activation_checkpointing(model):
        assert is_checkpointing(model)
        raise RuntimeError("boom")
    assert not is_checkpointing(model)
    with activation_checkpointing(model, enabled=False):
        assert not is_checkpointing(model)
    model.eval()
    with pytest.raises(ValueError, match="does not support it"), activation_checkpointing(torch.nn.Linear(2, 2)):
        pass


@pytest.mark.slow
def test_one_update_per_batch_skips_logp_old_with_the_same_gradient(tiny_dir, toy_data, tmp_path, monkeypatch):
    """GRPO with one update per batch uses the detached current log-probs as log π_old: same
    gradient as a separate log π_old pass, one forward pass fewer."""
    import l2t_core.trainer as trainer_mod

    torch.set_num_threads(1)
    real = trainer_mod.compute_rewards
    grads, seen = {}, {}
    for name, force in (("skip", False), ("forward", True)):
        def compute(*a, force=force, name=name, **kw):
            if force:
                kw["need_logp_old"] = True
            out = real(*a, **kw)
            seen[name] = [r.logp_old is None for r in out.responses]
            return out

        monkeypatch.setattr(trainer_mod, "compute_rewards", compute)
        tr = Trainer(make_cfg(tiny_dir, tmp_path / name, steps=1, mini_batches=1, method="grpo"), show_progress=False)
        run_recording_grads(tr, grads, name)
    assert all(seen["skip"]) and not any(seen["forward"])
    for n, g in grads["forward"].items():
        torch.testing.assert_close(grads["skip"][n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert max(float(g.abs().max()) for g in grads["forward"].values()) > 1e-6


@pytest.mark.slow
def test_object_store_run_directory(tiny_dir, toy_data):
    """The non-local (object store) code path, through fsspec's in-memory filesystem."""
    res = Trainer(make_cfg(tiny_dir, "memory://l2t-test/run", steps=2, method="grpo"), show_progress=False).run()
    store = RunStorage("memory://l2t-test/run")
    step, url = store.latest_checkpoint()
    assert step == 2 and url.endswith("step-000002")
    assert store.exists("checkpoints/step-000002/COMPLETE") and store.exists("checkpoints/step-000002/model.safetensors")
    assert len(res.steps) == 2


def test_interrupted_checkpoint_write_never_becomes_latest(tmp_path):
    store = RunStorage(str(tmp_path / "run"))
    store.write_checkpoint(1, lambda d: (d / "w.bin").write_bytes(b"one"))

    def broken(d: Path):
        (d / "w.bin").write_bytes(b"half")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        store.write_checkpoint(2, broken)
    assert store.latest_checkpoint()[0] == 1
    assert not (tmp_path / "run/checkpoints/step-000002").exists()
    # a directory without COMPLETE (a crash during an object-store upload) is never trusted
    (tmp_path / "run/checkpoints/step-000003").mkdir()
    (tmp_path / f"run/checkpoints/{LATEST}").write_text("step-000003\n")
    assert store.latest_checkpoint()[0] == 1
    # a stale staging directory is cleaned up by the next write, and pruning keeps the newest
    (tmp_path / "run/checkpoints/.tmp-step-000004-dead").mkdir()
    store.write_checkpoint(4, lambda d: (d / "w.bin").write_bytes(b"four"), keep=1)
    assert store.latest_checkpoint()[0] == 4
    assert not (tmp_path / "run/checkpoints/.tmp-step-000004-dead").exists()
    assert store.complete_steps() == [4]


def test_bad_inputs_fail_before_compute(tiny_dir, toy_data, tmp_path):
    with pytest.raises(ValueError, match="method"):
        make_cfg(tiny_dir, tmp_path / "x", method="ppo")
    with pytest.raises(ValueError, match="beta"):
        make_cfg(tiny_dir, tmp_path / "x", reward={"credit": {"beta": -0.5}})
    with pytest.raises(ValueError, match="deepspeed_config"):
        make_cfg(tiny_dir, tmp_path / "x", engine="deepspeed")
    for empty in ([], [" "]):  # names no layer: not silently the default θ
        with pytest.raises(ValueError, match="names no layer: leave targets unset"):
            make_cfg(tiny_dir, tmp_path / "x", reward={"compression": {"targets": empty}})
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="not writable"):
        Trainer(make_cfg(tiny_dir, blocker / "run"), show_progress=False).setup()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(tiny_dir) / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        Trainer(make_cfg(no_weights, tmp_path / "y"), show_progress=False).setup()
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Trainer(make_cfg(tiny_dir, tmp_path / "z", rollout={"max_prompt_tokens": 3}), show_progress=False).setup()
    with pytest.raises(ValueError, match="no rows"):
        Trainer(make_cfg(tiny_dir, tmp_path / "e", data={"source": "empty.jsonl"}), show_progress=False).setup()
    with pytest.raises(ValueError, match=r"'missing.jsonl' is neither a synthetic task \(walk, arithmetic\) nor a file: .*L2T_DATA_DIR"):
        Trainer(make_cfg(tiny_dir, tmp_path / "m", data={"source": "missing.jsonl"}), show_progress=False).setup()
    # a compression target the policy lacks, or one outside its blocks, fails at setup, not at the first reward
    with pytest.raises(TargetError, match="not a module of the model"):
        Trainer(make_cfg(tiny_dir, tmp_path / "t", reward={"compression": {"targets": ["model.layers.0.mlp.nope"]}}),
                show_progress=False).setup()
    with pytest.raises(TargetError, match=r"\['lm_head'\] are outside the transformer blocks"):
        Trainer(make_cfg(tiny_dir, tmp_path / "h", reward={"compression": {"targets": ["lm_head"]}}),
                show_progress=False).setup()


def test_cli_refuses_bad_training_data_in_one_line(tiny_dir, toy_data, tmp_path):
    """An empty data file, a prompt over rollout.max_prompt_tokens or a compression target the
    penalty cannot take is the user's input, not a bug: ``l2t train`` names it in one line (SystemExit), as it does a missing model, not with a
    traceback."""
    base = ["train", "--policy", str(tiny_dir), "--steps", "1", "-q"]
    with pytest.raises(SystemExit, match=r"^l2t train: data\.source 'empty\.jsonl': .*empty\.jsonl: the file has no rows"):
        cli_main([*base, "--out", str(tmp_path / "e"), "--set", "data.source=empty.jsonl"])
    with pytest.raises(SystemExit, match=r"^l2t train: training problem 't0': prompt has \d+ tokens, over "
                                         r"rollout\.max_prompt_tokens=3; raise the limit or filter the data$"):
        cli_main([*base, "--out", str(tmp_path / "z"), "--set", "data.source=toy.jsonl",
                  "--set", "rollout.max_prompt_tokens=3"])
    with pytest.raises(SystemExit, match=r"^l2t train: compression targets \['lm_head'\] are outside the transformer "
                                         r"blocks \(model\.layers\.\*\).*e\.g\. 'last_block'"):
        cli_main([*base, "--out", str(tmp_path / "h"), "--set", "data.source=toy.jsonl",
                  "--set", 'reward.compression.targets=["lm_head"]'])
    for run in ("e", "z", "h"):  # refused: no run directory left
        assert not (tmp_path / run).exists()


def test_print_config_shows_every_default_and_reads_back(tmp_path, capsys):
    """``--print-config`` prints the whole resolved configuration, paper defaults included, as YAML
    that ``--config`` reads back to the same config, and starts nothing."""
    import yaml

    assert cli_main(["train", "--policy", "some/model", "--out", str(tmp_path / "never"), "--steps", "3",
                     "--set", "reward.credit.beta=0.3", "--print-config"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["reward"]["credit"]["beta"] == 0.3 and data["steps"] == 3
    assert data["optim"]["lr"] == 1e-6 and data["rollout"]["max_new_tokens"] == 16384  # METHOD.md §9 defaults
    assert not (tmp_path / "never").exists()
    (tmp_path / "printed.yaml").write_text(text)
    assert cli_main(["train", "--config", str(tmp_path / "printed.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    assert TrainConfig.model_validate(data).reward.credit.beta == 0.3
    assert cli_main(["miniature", "--out", str(tmp_path / "m"), "--seeds", "4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seeds"] == [4] and not (tmp_path / "m").exists()
    assert cli_main(["warmstart", "--out", str(tmp_path / "w"), "--print-config"]) == 0
    assert "sft_steps" in yaml.safe_load(capsys.readouterr().out) and not (tmp_path / "w").exists()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "warmstart.json").write_text("{}")  # a finished warm start is never overwritten
    with pytest.raises(SystemExit, match=r"l2t warmstart --out .*/w: it holds a warm start already"):
        cli_main(["warmstart", "--out", str(tmp_path / "w")])
    assert (tmp_path / "w" / "warmstart.json").read_text() == "{}"


def test_cli_config_layers_and_errors(tmp_path, capsys):
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=\"x\"", "d=[1,2]"]) == {"a": {"b": 2, "c": "x"}, "d": [1, 2]}
    with pytest.raises(SystemExit, match=r"l2t credit --set: overrides apply to a miniature config, and no --config"):
        cli_main(["credit", "--model", str(tmp_path / "nowhere"), "--set", "lr=0.1"])  # never silently ignored
    # a key given twice is refused (YAML and JSON keep the last silently); a YAML merge key may be overridden
    from l2t_core.cli import load_config_file

    (tmp_path / "twice.yaml").write_text("steps: 1\nreward:\n  credit: {beta: 0.1}\nsteps: 2\n")
    with pytest.raises(SystemExit, match=r"not valid YAML: the key 'steps' is given twice in one mapping"):
        load_config_file(str(tmp_path / "twice.yaml"))
    (tmp_path / "twice.json").write_text('{"optim": {"lr": 1, "lr": 2}}')
    with pytest.raises(SystemExit, match=r"twice.json': the key 'lr' is given twice in one object"):
        load_config_file(str(tmp_path / "twice.json"))
    (tmp_path / "merged.yaml").write_text("base: &b {steps: 1, seed: 2}\nrun:\n  <<: *b\n  steps: 3\n")
    assert load_config_file(str(tmp_path / "merged.yaml"))["run"] == {"steps": 3, "seed": 2}
    (tmp_path / "latin1.yaml").write_bytes("policy: café\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"latin1.yaml' is not UTF-8 text \(byte 11"):
        load_config_file(str(tmp_path / "latin1.yaml"))
    with pytest.raises(SystemExit, match=r"--set expects key=value \(e.g. reward.credit.beta=0.3\), got 'steps'"):
        apply_overrides({}, ["steps"])
    with pytest.raises(SystemExit, match="--set a.b.c: 'b' is not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("policy: some/model\nmethod: grpo\nreward:\n  credit:\n    alpha: 0.5\n")

    class Args:
        config = str(cfg_file)
        set = ["reward.credit.beta=0.3"]
        steps = 7
        method = None

    cfg = build_config(TrainConfig, Args, {"steps": "steps", "method": "method"})
    assert (cfg.method, cfg.steps, cfg.reward.credit.alpha, cfg.reward.credit.beta) == ("grpo", 7, 0.5, 0.3)
    with pytest.raises(SystemExit, match=r"reward\.credit\.beta: Input should be greater than or equal to 0"):
        cli_main(["train", "--policy", "x", "--set", "reward.credit.beta=-1"])
    with pytest.raises(SystemExit, match="unknown_field"):
        cli_main(["train", "--policy", "x", "--set", "unknown_field=1"])
    # a config file that does not parse: where, not a traceback
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "grpo",\n "steps": }')
    with pytest.raises(SystemExit, match=r"bad\.json' is not valid JSON: Expecting value at line 2, column 11"):
        cli_main(["train", "--config", str(bad)])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: grpo\nreward: [unclosed\n")
    with pytest.raises(SystemExit, match=r"bad\.yaml' is not valid YAML"):
        cli_main(["train", "--config", str(bad_yaml)])


def test_a_model_path_that_holds_no_model_fails_before_any_compute(tmp_path, tiny_dir):
    """load_policy names what is missing (ModelLoadError, a FileNotFoundError); every command
    that loads a model turns it into one line."""
    from l2t_core.models import ModelLoadError, load_policy

    for path, what in ((tmp_path / "nothing", "does not exist, and it cannot be a hub id"),
                       ("./runs/nothing", "does not exist"), ("a/b/c", "does not exist"),
                       (tmp_path, "has no config.json")):
        with pytest.raises(ModelLoadError, match=what):
            load_policy(path)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(tiny_dir) / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_policy(no_weights)
    for argv in (["credit", "--model", str(tmp_path / "nothing")], ["guess-trust", "--model", str(no_weights)],
                 ["train", "--policy", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit, match=f"^l2t {argv[0]}: load_policy: "):
            cli_main(argv)
    assert not any((tmp_path / "run").rglob("*"))  # refused before anything was written to the run
    # l2t eval checks the model before it reads (or downloads) any benchmark
    with pytest.raises(SystemExit, match="^l2t eval: load_policy: .* does not exist"):
        cli_main(["eval", "--model", str(tmp_path / "nothing"), "--benchmarks", "omni_math_rule",
                  "--out", str(tmp_path / "ev")])


def test_counts_on_the_command_line_are_positive_and_groups_have_two(tmp_path, capsys):
    for argv in (["credit", "--model", "m", "--problems", "0"], ["guess-trust", "--model", "m", "--threads", "-1"],
                 ["reads", "--model", "a=m", "--n", "x"]):
        with pytest.raises(SystemExit):
            cli_main(argv)
        err = capsys.readouterr().err
        assert "must be >= 1, got" in err or "expected a whole number >= 1, got 'x'" in err
    with pytest.raises(SystemExit, match=r"rollout\.group_size: Input should be greater than or equal to 2"):
        cli_main(["train", "--policy", "x", "--set", "rollout.group_size=1"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="^l2t miniature: .*File exists"):
        cli_main(["miniature", "-q", "--out", str(blocker), "--set", "steps=1"])


def test_eval_says_which_benchmark_it_cannot_load(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("L2T_DATA_DIR", str(tmp_path))  # empty, and this set has no hub copy
    with pytest.raises(SystemExit, match="^l2t eval --benchmarks: .*no public Hugging Face hub copy"):
        cli_main(["eval", "--model", str(tiny_dir), "--benchmarks", "omni_math_rule", "--out", str(tmp_path / "ev")])


@pytest.mark.slow
def test_cli_quiet_silences_transformers_progress_bars_here_and_in_workers(tiny_dir, monkeypatch, capfd):
    """``-q`` means no progress bars, transformers' "Loading weights" bar included: switched off in
    this process (transformers is imported already) and, through the environment, in the worker
    processes a command starts (``l2t miniature``'s runs)."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    load = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1])")
    try:
        noisy = subprocess.run([sys.executable, "-c", load, str(tiny_dir)], capture_output=True, text=True,
                               env=os.environ.copy(), check=True)
        assert "Loading weights" in noisy.stderr  # the bar this option must silence
        with pytest.raises(SystemExit, match="unknown_field"):
            cli_main(["train", "-q", "--policy", "x", "--set", "unknown_field=1"])
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert not hf_logging.is_progress_bar_enabled()
        capfd.readouterr()
        AutoModelForCausalLM.from_pretrained(tiny_dir)
        assert "Loading weights" not in capfd.readouterr().err
        quiet = subprocess.run([sys.executable, "-c", load, str(tiny_dir)], capture_output=True, text=True,
                               env=os.environ.copy(), check=True)
        assert "Loading weights" not in quiet.stderr
    finally:
        hf_logging.enable_progress_bar()


def test_logprobs_at_a_temperature_are_those_of_the_sampling_distribution(model, tokenizer):
    from l2t_core.logprobs import logprob_temperature, token_logprobs

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=g)
    att = torch.ones_like(ids)
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, 4:] = True
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        for tau in (1.0, 0.7, 1.6):
            want = torch.log_softmax(logits[:, :-1] / tau, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            got = token_logprobs(model, ids, att, score, tau)
            torch.testing.assert_close(got[:, 1:][score[:, 1:]], want[score[:, 1:]], rtol=1e-5, atol=1e-5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            token_logprobs(model, ids, att, score, bad)
    assert logprob_temperature("sampling", 0.7) == 0.7 and logprob_temperature("one", 0.7) == 1.0
    assert logprob_temperature("sampling", 0.0) == 1.0  # greedy rollouts: the plain log π


def test_reward_pass_logprobs_follow_the_temperature_and_j_and_penalty_do_not(model, tokenizer):
    """episode_pass: log π_old at the sampling temperature equals a plain pass at it; J and the
    penalty's episode scores are the model's at temperature 1 whatever the temperature."""
    from l2t_core.episodes import segment, token_episode_ids
    from l2t_core.rewards import compression as comp
    from l2t_core.rewards.fitting import JItem
    from l2t_core.rewards.l2t import Rollout, episode_pass, response_logprobs, response_offsets

    text = "<think>\n<episode_1>a b</episode_1>\n<episode_2>c d e</episode_2>\n</think>\n\n\\boxed{3}"
    resp = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Compute 1 + 2.", add_special_tokens=False)["input_ids"]
    te = token_episode_ids(segment(text), response_offsets(tokenizer, text, resp))
    rollouts = [Rollout(prompt, resp, text, "3", 0)]
    items = [JItem(prompt, resp, te.boundaries.tolist(), tokenizer("3", add_special_tokens=False)["input_ids"])]
    force = tokenizer(" Answer:", add_special_tokens=False)["input_ids"]
    targets = comp.resolve_targets(model, None)
    proxy = comp.SVDProxy(rank_frac=0.25)
    proxy.refresh(targets, 0)
    runs = {tau: episode_pass(model, rollouts, [te], tokenizer.pad_token_id or 0, 1 << 16, j_items=items,
                              force_ids=force, targets=targets, proxy=proxy, temperature=tau) for tau in (1.0, 0.7)}
    for tau, res in runs.items():
        torch.testing.assert_close(res.logps[0], response_logprobs(model, rollouts, 0, 1 << 16, tau)[0],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(runs[0.7].logps[0], runs[1.0].logps[0])
    torch.testing.assert_close(runs[0.7].log_j[0], runs[1.0].log_j[0])
    torch.testing.assert_close(runs[0.7].sqnorms[0], runs[1.0].sqnorms[0])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l2t", "l2t_no_penalty"])  # π_old from the penalty's pass / a plain one
def test_loss_ratio_is_one_on_the_first_update_at_the_sampling_temperature(tiny_dir, toy_data, tmp_path, method):
    """π_old from the reward pass and π_θ in the loss are the same distribution (the rollouts' one,
    logits ÷ 0.7), so the first update's ratio is 1 on every token: a temperature applied on one side
    only would show here."""
    torch.set_num_threads(1)
    cfg = make_cfg(tiny_dir, tmp_path / method, steps=1, mini_batches=1, method=method,
                   rollout={"group_size": 4, "max_new_tokens": 16, "max_prompt_tokens": 512, "temperature": 0.7})
    tr = Trainer(cfg, show_progress=False)
    # metrics of an earlier session that died before its first checkpoint (other steps, another run_id)
    stale = pd.DataFrame([{"run_id": "dead", "step": 2, "accuracy": 0.0}])
    RunStorage(str(tmp_path / method)).write_bytes("metrics/train_steps/part-000002-000050.parquet",
                                                   stale.to_parquet(index=False))
    steps = tr.run().steps
    assert read_table(RunStorage(str(tmp_path / method)), "train_steps")["step"].tolist() == [1]  # not kept
    rollouts = read_table(RunStorage(str(tmp_path / method)), "rollouts")
    # every rollout says whether it ended with EOS; the step reports the share that did
    assert rollouts["finished"].dtype == bool and len(rollouts) == 8
    assert steps["finished_share"].iloc[0] == pytest.approx(rollouts["finished"].mean())
    for status in ("timeout", "error"):  # verdicts that judge nothing, for monitoring
        assert steps[f"verify_{status}_share"].iloc[0] == pytest.approx((rollouts["verdict"] == status).mean())
    assert tr.lp_temperature == 0.7
    assert steps["ratio_mean"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert steps["clip_frac"].iloc[0] == 0.0


# the penalty's pass (l2t) or a plain forward (grpo) gives log π_old; one update per batch or two
@pytest.mark.parametrize("method,mini_batches", [("l2t", 1), ("l2t", 2), ("grpo", 1)])
def test_train_eos_trains_the_stop_token_of_finished_responses(tiny_dir, toy_data, tmp_path, monkeypatch,
                                                                method, mini_batches):
    """``loss.train_eos``: a finished response's EOS is one more trained token, with log π(EOS |
    prompt ⊕ response) at the sampling temperature, the advantage of the response's last token, and
    (from the reward pass) a log π_old equal to the policy's before the update: ratio 1 on the first
    update. Off, nothing changes. (The tiny random model rarely samples EOS: half the rollouts are
    marked finished, as if they had ended with it.)"""
    import dataclasses

    import l2t_core.trainer as trainer_mod

    torch.set_num_threads(1)
    seen, real = {}, trainer_mod.policy_loss
    for train_eos in (False, True):
        cfg = make_cfg(tiny_dir, tmp_path / f"eos{train_eos}", steps=1, mini_batches=mini_batches, method=method,
                       rollout={"group_size": 4, "max_new_tokens": 16, "max_prompt_tokens": 512, "temperature": 0.7},
                       reward={"loss": {"train_eos": train_eos}})
        tr = Trainer(cfg, show_progress=False)
        tr.setup()
        rollouts, _, _ = tr._rollouts(1)
        rollouts = [dataclasses.replace(r, finished=n % 2 == 0) for n, r in enumerate(rollouts)]
        model, eos = tr.engine.unwrapped(), tr.tokenizer.eos_token_id
        logps = tr._logps(model, rollouts)
        for r, lp in zip(rollouts, logps):
            assert len(lp) == len(r.response_ids) + (train_eos and r.finished and len(r.response_ids) > 0)
        rewards = tr._rewards(rollouts, 1, need_logp_old=True)
        for r, lp, x in zip(rollouts, logps, rewards.responses):
            if train_eos and r.finished:  # brute force: the last position of prompt ⊕ response, EOS, at τ 0.7
                with torch.no_grad():
                    ids = torch.tensor([list(r.prompt_ids) + list(r.response_ids)])
                    want = torch.log_softmax(model(ids).logits[0, -1].float() / 0.7, -1)[eos]
                assert lp[-1].item() == pytest.approx(want.item(), abs=1e-5)
                assert x.eos_logp_old == pytest.approx(want.item(), abs=1e-5)
            else:
                assert x.eos_logp_old is None
        masks = []

        def capture(logp, old, ref, advs, mask, **kw):
            masks.append(mask)
            return real(logp, old, ref, advs, mask, **kw)

        monkeypatch.setattr(trainer_mod, "policy_loss", capture)
        stats = tr._update(rollouts, rewards, tr._reference_logprobs(rollouts))
        seen[train_eos] = sum(float(m.sum()) for m in masks)  # the tokens the loss trained
        if mini_batches == 1:
            assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # π_old of every token, EOS included
    n_eos = sum(1 for n, r in enumerate(rollouts) if n % 2 == 0 and len(r.response_ids) > 0)
    assert n_eos > 0 and seen[True] == seen[False] + n_eos


def test_rank_rows_get_step_wide_rollout_and_group_ids():
    """Under DeepSpeed every rank numbers its rollouts and groups from 0; gathered rows must stay
    unique per (step, rollout) (the rollouts table's key) and keep each episode with its rollout."""
    from l2t_core.trainer import merge_rank_rows

    def rank_rows(rank, groups, per_group):
        rr = [{"rank": rank, "rollout": n, "group": n // per_group, "tag": f"r{rank}n{n}"}
              for n in range(groups * per_group)]
        ee = [{"rank": rank, "rollout": n, "episode": k, "tag": f"r{rank}n{n}"} for n in range(len(rr)) for k in (1, 2)]
        return rr, ee

    rrows, erows = merge_rank_rows([rank_rows(0, 2, 3), rank_rows(1, 1, 3), rank_rows(2, 0, 3), rank_rows(3, 2, 3)])
    assert [r["rollout"] for r in rrows] == list(range(15))
    assert [r["group"] for r in rrows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    by_id = {r["rollout"]: r["tag"] for r in rrows}
    assert all(by_id[e["rollout"]] == e["tag"] for e in erows) and len(erows) == 30
    assert [r["rank"] for r in rrows] == [0] * 6 + [1] * 3 + [3] * 6
    assert merge_rank_rows([rank_rows(0, 2, 3)]) == rank_rows(0, 2, 3)  # one rank: unchanged


def test_logged_episode_tokens_are_each_episodes_own_tokens(model, tokenizer):
    """metrics/episode_rewards' num_tokens is the episode's own token count: the last episode owns
    the answer after </think> too (METHOD.md §1), so the counts sum to the response's tokens.
    Failed with the differences of J's context boundaries, which end the last one at </think>."""
    from types import SimpleNamespace

    from l2t_core.rewards.l2t import Rollout, compute_rewards
    from l2t_core.verify import NumericVerifier

    text = ("<think>\n<episode_1>We add 3 and 4 to get 7.</episode_1>\n<episode_2>Then 7 * 2 = 14.</episode_2>\n"
            "</think>\n\nThe answer is \\boxed{14}")
    prompt = tokenizer("Compute (3 + 4) * 2.")["input_ids"]
    rollouts = [Rollout(prompt, tokenizer(text, add_special_tokens=False)["input_ids"], text, "14", 0),
                Rollout(prompt, tokenizer("7 * 2", add_special_tokens=False)["input_ids"], "7 * 2", "14", 0)]
    rewards = compute_rewards(model, tokenizer, rollouts, "l2t", verifier=NumericVerifier())
    tables = {}
    # a stand-in trainer holding only what _record reads (a whole Trainer would sample and train)
    stand_in = SimpleNamespace(run_id="r", rank=0, world=1, cfg=SimpleNamespace(log_rollouts=False, method="l2t"),
                               metrics=SimpleNamespace(add=lambda name, rows: tables.setdefault(name, rows)))
    probs = [SimpleNamespace(id=str(i), level=1) for i in range(2)]
    Trainer._record(stand_in, 1, rollouts, probs, rewards)
    eps = pd.DataFrame(tables["episode_rewards"])
    for n, (r, x) in enumerate(zip(rollouts, rewards.responses)):
        got = eps[eps["rollout"] == n].sort_values("episode")["num_tokens"].tolist()
        assert got == np.bincount(x.tokens.episode_ids, minlength=x.tokens.num_episodes).tolist()
        assert sum(got) == len(r.response_ids)
    assert rewards.responses[0].tokens.boundaries[-1] < len(rollouts[0].response_ids)  # the answer is after b_K
    assert eps["copy_share"].isna().all()  # reward.copying off: not computed, logged as null
    assert eps["oracle_label"].isna().all()  # reward.oracle off: likewise
    from l2t_core.config import RewardConfig

    charged = compute_rewards(model, tokenizer, rollouts, "l2t",
                              RewardConfig(copying={"coef": 1.0}, oracle={"coef": 1.0}), verifier=NumericVerifier())
    tables.clear()
    Trainer._record(stand_in, 1, rollouts, probs, charged)
    eps = pd.DataFrame(tables["episode_rewards"])
    assert eps["copy_share"].tolist() == [c for x in charged.responses for c in x.copies.tolist()]
    assert eps["oracle_label"].tolist() == [c for x in charged.responses for c in x.labels.tolist()]


def test_rollout_token_budget_reaches_the_hf_engine(tiny_dir, tmp_path, toy_data):
    tr = Trainer(make_cfg(tiny_dir, tmp_path / "r", rollout={"group_size": 2, "max_new_tokens": 8,
                                                             "max_batch_tokens": 4096}), show_progress=False)
    tr.setup()
    assert tr.rollout.max_batch_tokens == 4096
