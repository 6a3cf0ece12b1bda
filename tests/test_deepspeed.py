"""DeepSpeed ZeRO-2 on CPU with gloo: two ranks, two micro-batches each, one optimizer step.
Both ranks must hold identical weights, equal to one TorchEngine step on the whole batch.
Then the whole Trainer on two ranks (tests/_ds_trainer_worker.py): sharding, metrics, checkpoints;
and under ZeRO-3 with partitioned weights, against ZeRO-2 and through a resume."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the distributed extra)")

WORKER = Path(__file__).with_name("_ds_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path) -> list[str]:
    """torchrun with 2 local ranks, its logs in the test's directory (by default it leaves a
    ``torchelastic_*`` directory in the system temp dir on every launch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "--log-dir", str(tmp_path / "torchrun")]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def test_init_distributed_gives_the_process_group_the_configured_timeout(monkeypatch):
    """TrainConfig.dist_timeout_minutes reaches the process group (DeepSpeed's default is 10
    minutes, shorter than rank 0 publishing a large model's checkpoint); None keeps DeepSpeed's."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    from l2t_core.engines import deepspeed_engine

    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert deepspeed_engine.init_distributed(90) == (0, 1)
    assert deepspeed_engine.init_distributed() == (0, 1)
    assert calls == [{"dist_backend": "gloo", "timeout": timedelta(minutes=90)}, {"dist_backend": "gloo"}]


CASES = ["deepspeed:2", "deepspeed:0", "uneven:2", "uneven:3", "bf16:1", "lockstep"]


@pytest.fixture(scope="module")
def worker_cases(tmp_path_factory):
    """Every case of tests/_ds_worker.py: the two one-process references in one process, and
    ``CASES`` in one launch of two gloo ranks (each launch costs seconds of imports); the
    directory of their results, the launch (its return code and output) and the torch extensions it
    compiled."""
    out = tmp_path_factory.mktemp("ds_worker")
    subprocess.run([sys.executable, str(WORKER), str(out), "reference", "uneven-reference"], check=True,
                   env=_env(), timeout=180, cwd=ROOT)
    # DeepSpeed's CPU backend would compile its inference-only shared-memory kernel here (~50 s)
    extensions = out / "torch_extensions"
    launch = _run_or_fail_on_hang(_torchrun(out) + [str(WORKER), str(out), *CASES], out / "launch.log", timeout=480,
                                  env=dict(_env(), TORCH_EXTENSIONS_DIR=str(extensions)))
    compiled = sorted(p.name for p in extensions.iterdir()) if extensions.exists() else []
    return out, launch, compiled


def _case(worker_cases, mode: str, stage: int | None = None) -> tuple[dict, ...]:
    """The results of a worker case: (reference, rank 0, rank 1), or (rank 0, rank 1) of
    ``lockstep``. A case whose results are missing fails with the end of the launch's output; one
    that wrote them is judged on them, whatever a later case of the launch did."""
    out, launch, _ = worker_cases
    if mode == "lockstep":
        names = ["lockstep-rank0", "lockstep-rank1"]
    else:
        reference = "reference" if mode in ("deepspeed", "bf16") else f"{mode}-reference"
        names = [f"{reference}-rank0", f"{mode}-{stage}-rank0", f"{mode}-{stage}-rank1"]
    missing = [n for n in names if not (out / f"{n}.pt").exists()]
    assert not missing, f"the launch (exit {launch.returncode}) wrote no {missing}:\n{launch.stdout[-3000:]}"
    return tuple(torch.load(out / f"{n}.pt", weights_only=False) for n in names)


@pytest.mark.slow
def test_cpu_launch_compiles_no_torch_extension(worker_cases):
    """DeepSpeed builds its shared-memory all-reduce kernel (inference only) on the first CPU process
    group of a machine, about 50 s; :func:`l2t_core.engines.deepspeed_engine.init_distributed`
    marks it unavailable, so a launch compiles nothing."""
    out, launch, compiled = worker_cases
    assert launch.returncode == 0, launch.stdout[-3000:]
    assert compiled == [] and "deepspeed_shm_comm" not in launch.stdout, compiled


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 0])
def test_two_ranks_agree_and_equal_single_process(worker_cases, stage):
    """Stage 0 (no ZeRO) steps the client optimizer itself and keeps no gradient norm in
    DeepSpeed; the engine measures it, so it must equal the whole batch's there too."""
    ref, r0, r1 = _case(worker_cases, "deepspeed", stage)
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), f"ranks disagree on {name}"
        # Adam's first step is ~lr·sign(g) (lr 1e-2), so float noise in near-zero gradient entries
        # moves a weight by up to ~1e-4; a wrong accumulation or scaling moves them by ~1e-2
        torch.testing.assert_close(w, ref["state"][name], rtol=0, atol=1e-4, msg=name)
    # the accumulated, rank-averaged gradient equals the whole batch's (before the optimizer)
    assert r0["stats"]["grad_norm"] == pytest.approx(ref["stats"]["grad_norm"], rel=1e-5)
    assert r0["stats"]["lr"] == pytest.approx(ref["stats"]["lr"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_rank_with_fewer_micro_batches_pads_without_moving_gradients(worker_cases, stage):
    """Rank 0 has two micro-batches and rank 1 one, which it follows with the trainer's padding
    (``zero_loss``). The weights must equal one TorchEngine step on the three sequences: a padding
    loss built from the parameters alone fired ZeRO-2's gradient hooks out of a backward's order
    (12 of 27 tensors moved by about 2·lr) and failed under ZeRO-3, where the weights are empty
    outside a forward."""
    ref, r0, r1 = _case(worker_cases, "uneven", stage)
    assert sorted(r0["state"]) == sorted(ref["state"])
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(w, ref["state"][name], rtol=0, atol=1e-4, msg=name)
    assert r0["stats"]["grad_norm"] == pytest.approx(ref["stats"]["grad_norm"], rel=1e-5)


def _toy_data_and_zero3(tmp_path: Path, **zero) -> Path:
    """``tmp_path/data/toy.jsonl`` (ten one-step sums) and ``tmp_path/ds_zero3.json``: the shipped
    ZeRO-3 config with every parameter partitioned (persistence threshold 0) and ``zero`` added;
    returns the data directory."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "toy.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"id": f"t{i}", "problem": f"Compute {i} + 1.", "answer": str(i + 1)}) + "\n")
    zero3 = json.loads((ROOT / "infra" / "deepspeed" / "zero3_offload.json").read_text())
    zero3["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0, **zero}
    (tmp_path / "ds_zero3.json").write_text(json.dumps(zero3))
    return data


def _run_or_fail_on_hang(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launch with its output in ``log``; one still running after ``timeout`` seconds (ranks
    waiting for each other in a collective) fails the test. torchrun gets SIGTERM, which it passes
    on to its ranks (they run in sessions of their own); SIGKILL if it has not ended 60 s later."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env or _env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"the ranks hung (still running after {timeout} s):\n{log.read_text()[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


@pytest.mark.slow
def test_zero3_ranks_with_different_forward_counts_stay_in_step(worker_cases):
    """ZeRO-3 gathers the partitioned weights in every forward, so a rank running fewer forwards
    than another left it waiting forever: rank 0 has three sequences and rank 1 one (micro-batches of
    one; hf generation one prompt a call, rank 1 stopping sooner; rank 1 without any Monte Carlo
    context). Each pass must finish and equal the unpartitioned model's."""
    for rank, results in enumerate(_case(worker_cases, "lockstep")):
        assert sorted(results) == ["answer_logprobs_packed", "hf_generate", "monte_carlo_j", "response_logprobs"]
        for name in ("response_logprobs", "answer_logprobs_packed"):
            got, want = results[name]
            assert len(got) == (3 if rank == 0 else 1)
            for g, w in zip(got, want):
                assert g == pytest.approx(w, abs=1e-5), (rank, name)
        got, want = results["hf_generate"]
        assert got == want and len(got) == (3 if rank == 0 else 1), rank
        got, want = results["monte_carlo_j"]
        assert got == want and len(got) == (2 if rank == 0 else 0), rank


@pytest.mark.slow
def test_bf16_optimizer_reports_the_gradient_norm_it_clipped(worker_cases):
    """DeepSpeed's BF16_Optimizer (bf16 with fp32 gradients under ZeRO-1) creates its gradient norm
    only inside step(): the engine used to decide at init that DeepSpeed kept none and measured the
    bf16 parameters' .grad (3.75 for 2.24). With two micro-batches per rank it also added the
    first micro-batch's gradient again at the second's end (2.96) until the engine asked for
    ``immediate_grad_update``. The reported norm must be the whole batch's (bf16 forwards: within 5%)."""
    ref, *ranks = _case(worker_cases, "bf16", 1)
    for got in ranks:
        assert got["optimizer"] == "BF16_Optimizer"
        assert got["stats"]["grad_norm"] == pytest.approx(ref["stats"]["grad_norm"], rel=0.05)


TRAINER_WORKER = Path(__file__).with_name("_ds_trainer_worker.py")


def _weights_digest(module) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ds_trainer_worker", TRAINER_WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker.weights_digest(module)


@pytest.mark.slow
def test_trainer_two_ranks_end_to_end(trainer_runs, tmp_path, monkeypatch):
    """The real Trainer under DeepSpeed ZeRO-2 on two gloo ranks, launched as the CLI would be:
    prompt sharding, the gathered and renumbered metrics rows, rank-0 metrics and checkpoints,
    identical weights on both ranks, and the loss scaling across ranks (one process replaying the
    same rollouts as one batch gets the same rewards, gradient norms and weights)."""
    import dataclasses
    import pickle

    import pandas as pd

    from l2t_core.checkpoint import RunStorage
    from l2t_core.config import TrainConfig
    from l2t_core.metrics import read_table
    from l2t_core.models import load_policy
    from l2t_core.trainer import Trainer

    root, configs, reports = trainer_runs
    base, ranks, run_dir, data = configs["e2e"], reports["e2e"], root / "e2e", root / "data"
    assert [(x["rank"], x["world"], x["final_step"]) for x in ranks] == [(0, 2, 2), (1, 2, 2)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks end with different weights"

    store = RunStorage(str(run_dir))
    roll = read_table(store, "rollouts")
    eps = read_table(store, "episode_rewards")
    steps = read_table(store, "train_steps")
    assert list(steps["step"]) == [1, 2]  # one row per step, written by rank 0 only
    assert len(roll) == 2 * 4 * 2
    for step, rs in roll.groupby("step"):
        assert sorted(rs["rollout"]) == list(range(8)), f"step {step}: rollout ids"
        assert rs.groupby("rank").size().to_dict() == {0: 4, 1: 4}  # two prompts × two rollouts each
        assert rs["group"].nunique() == 4 and rs.groupby("group").size().eq(2).all()
        assert rs.groupby("group")["rank"].nunique().eq(1).all()  # a group never spans ranks
        assert rs.groupby("group")["problem_id"].nunique().eq(1).all()
        assert rs["problem_id"].nunique() == 4  # the step's four prompts, split between the ranks
    assert len(eps) == int(roll["num_episodes"].sum()) > 0
    assert set(zip(eps["step"], eps["rollout"])) <= set(zip(roll["step"], roll["rollout"]))
    merged = eps.merge(roll[["step", "rollout", "rank"]], on=["step", "rollout"], suffixes=("", "_rollout"))
    assert len(merged) == len(eps) and (merged["rank"] == merged["rank_rollout"]).all()

    # rank 0 published the final checkpoint, with every rank's engine shard, and pruned step 1
    latest = store.latest_checkpoint()
    assert latest is not None and latest[0] == 2 and store.complete_steps() == [2]
    assert ranks[0]["checkpoint"] == latest[1] and ranks[1]["checkpoint"] is None
    ckpt = Path(latest[1])
    assert sorted(p.name for p in (ckpt / "engine").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list((run_dir / "checkpoints").glob(".staging-*"))
    assert not list(ckpt.rglob("stale.pt"))
    final, _ = load_policy(ckpt)
    assert _weights_digest(final) == ranks[0]["digest"]

    # loss scaling across ranks: one process, torch engine, replaying both ranks' rollouts as one batch
    shares = [pickle.loads((root / "e2e-out" / f"rollouts-rank{r}.pkl").read_bytes()) for r in (0, 1)]

    def replay(step):
        rollouts, probs, off = [], [], 0
        for share in shares:
            rs, ps = share[step]
            rollouts += [dataclasses.replace(r, group_id=r.group_id + off) for r in rs]
            probs += ps
            off += max(r.group_id for r in rs) + 1
        return rollouts, probs, 0.0

    monkeypatch.setenv("L2T_DATA_DIR", str(data))
    ref_cfg = TrainConfig.model_validate({**base, "engine": "torch", "deepspeed_config": None,
                                          "out": str(tmp_path / "replay")})
    tr = Trainer(ref_cfg, show_progress=False)
    tr._rollouts = replay
    ref_steps = tr.run().steps
    ref_store = RunStorage(str(tmp_path / "replay"))
    for table, frame in (("rollouts", roll), ("episode_rewards", eps)):
        a = frame.drop(columns=["run_id", "rank"])
        b = read_table(ref_store, table).drop(columns=["run_id", "rank"])
        # step 1 starts from the same weights: the same rewards; step 2 from weights within float noise
        pd.testing.assert_frame_equal(a[a["step"] == 1], b[b["step"] == 1], rtol=1e-6, obj=table)
        pd.testing.assert_frame_equal(a, b, rtol=1e-2, atol=1e-6, obj=table)
    # the averaged gradient is the whole batch's: a missing or doubled ×world scale halves or
    # doubles grad_norm (Adam would hide it in the weights)
    # the loss statistics are over every rank's tokens (all-summed), not rank 0's share
    for col in ("grad_norm", "lr", "accuracy", "mean_tokens", "score_mean", "kl", "ratio_mean", "pg_loss"):
        assert steps[col].tolist() == pytest.approx(ref_steps[col].tolist(), rel=1e-4, abs=1e-9), col
    ref_state = tr.engine.unwrapped().state_dict()
    for name, w in final.state_dict().items():
        torch.testing.assert_close(w, ref_state[name], rtol=0, atol=1e-4, msg=name)


def _run_two_ranks(cfg_dict: dict, tmp_path: Path, name: str, data: Path, variant: str = "") -> list[dict]:
    return _launch_trainers({name: (cfg_dict, variant)}, tmp_path, data)[name]


def _launch_trainers(runs: dict[str, tuple[dict, str]], tmp_path: Path, data: Path) -> dict[str, list[dict]]:
    """One launch of two ranks running a Trainer per entry of ``runs`` (name: (TrainConfig fields,
    worker variant)), one after the other; each run's two rank reports (tests/_ds_trainer_worker.py),
    its outputs in ``tmp_path/<name>-out``."""
    from l2t_core.config import TrainConfig

    args = []
    for name, (cfg_dict, variant) in runs.items():
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(TrainConfig.model_validate(cfg_dict).model_dump_json())
        out = tmp_path / f"{name}-out"
        out.mkdir(exist_ok=True)
        args += (["+"] if args else []) + [str(cfg), str(out)] + ([variant] if variant else [])
    proc = _run_or_fail_on_hang(_torchrun(tmp_path) + [str(TRAINER_WORKER)] + args,
                                tmp_path / f"launch-{'-'.join(runs)}.log", timeout=max(300, 180 * len(runs)),
                                env=dict(_env(), L2T_DATA_DIR=str(data)))
    assert proc.returncode == 0, proc.stdout[-3000:]
    return {name: [json.loads((tmp_path / f"{name}-out" / f"rank{r}.json").read_text()) for r in (0, 1)]
            for name in runs}


# what every run of the module-wide launch below shares
TOY_RUN = dict(prompts_per_step=4, engine="deepspeed", data={"source": "toy.jsonl"}, optim={"lr": 1e-3},
               rollout={"group_size": 2, "max_new_tokens": 12, "max_prompt_tokens": 512},
               share_prompts=False)  # ZeRO-3 cannot share prompts: ZeRO-2 and one process make the same computation


@pytest.fixture(scope="module")
def trainer_runs(tiny_dir, tmp_path_factory):
    """The two-rank Trainer runs that several tests below read, in one launch (each launch costs
    seconds of imports): ``e2e`` (ZeRO-2, two steps, two optimizer steps each); ``zero2``/``zero3``
    (two checkpointed steps with activation checkpointing, ZeRO-3 with every parameter
    partitioned); ``uneven`` (ZeRO-3, rank 1's responses cut to one token); ``rl_zero2``/``rl_zero3``
    (l2t_random_layers). Returns the directory (``data`` holds the toy set, ``ds_zero3.json`` and
    ``ds_zero3_save.json`` the ZeRO-3 configs), the runs' settings and their rank reports."""
    root = tmp_path_factory.mktemp("trainer_runs")
    data = _toy_data_and_zero3(root)
    zero3 = json.loads((root / "ds_zero3.json").read_text())
    zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    (root / "ds_zero3_save.json").write_text(json.dumps(zero3))
    zero2 = str(ROOT / "infra" / "deepspeed" / "zero2.json")
    for stale in (".staging-000001", ".staging-000009"):  # left by a save that crashed: removed, never reused
        (root / "e2e" / "checkpoints" / stale / "engine").mkdir(parents=True)
        (root / "e2e" / "checkpoints" / stale / "engine" / "stale.pt").write_text("a crashed save's shard")
    base = dict(TOY_RUN, policy=str(tiny_dir))
    checkpointed = dict(base, steps=2, method="l2t", checkpoint_every=1, keep_checkpoints=2, micro_batch_tokens=120,
                        mini_batches=2, gradient_checkpointing=True)
    random_layers = dict(base, steps=1, method="l2t_random_layers", micro_batch_tokens=120)
    configs = {
        # several micro-batches and two optimizer steps per step; the default penalty_norm
        # (batch_response_mean): summed over the ranks, P̂ is the whole step's, so a one-process
        # replay gets the same rewards
        "e2e": (dict(base, steps=2, method="l2t", deepspeed_config=zero2, checkpoint_every=1, keep_checkpoints=1,
                     micro_batch_tokens=120, mini_batches=2), ""),
        "zero2": (dict(checkpointed, deepspeed_config=zero2), ""),
        "zero3": (dict(checkpointed, deepspeed_config=str(root / "ds_zero3_save.json")), ""),
        # two 302-token sequences in a micro-batch, or one of 313
        "uneven": (dict(base, steps=1, method="grpo", deepspeed_config=str(root / "ds_zero3.json"),
                        micro_batch_tokens=604), "uneven"),
        "rl_zero2": (dict(random_layers, deepspeed_config=zero2), ""),
        "rl_zero3": (dict(random_layers, deepspeed_config=str(root / "ds_zero3.json")), ""),
    }
    configs = {k: (dict(c, out=str(root / k)), v) for k, (c, v) in configs.items()}
    return root, {k: c for k, (c, _) in configs.items()}, _launch_trainers(configs, root, data)


@pytest.mark.slow
def test_zero3_partitioned_weights_train_save_and_resume_like_zero2(trainer_runs, tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0): the penalty's SVD, the
    Hugging Face checkpoint and the weight digests gather whole weights; gradients accumulate over
    micro-batches (they used to keep the last one only), with activation checkpointing; the frozen
    reference is partitioned too; the run ends as ZeRO-2's does, and a run resumed from its step-1
    checkpoint ends as the uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    from l2t_core.checkpoint import LATEST, RunStorage
    from l2t_core.metrics import read_table

    root, configs, reports = trainer_runs
    runs = {k: root / k for k in ("zero2", "zero3")}

    def final_weights(run_dir):
        latest = RunStorage(str(run_dir)).latest_checkpoint()
        assert latest is not None and latest[0] == 2
        return load_file(str(Path(latest[1]) / "model.safetensors"))

    w2, w3 = final_weights(runs["zero2"]), final_weights(runs["zero3"])
    assert sorted(w3) == sorted(w2) and all(w3[k].shape == w2[k].shape and w3[k].numel() > 0 for k in w2)
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], rtol=0, atol=1e-4, msg=k)
    assert reports["zero3"][0]["digest"] == reports["zero3"][1]["digest"]
    # the frozen reference is partitioned like the policy under ZeRO-3 (and its KL the same as ZeRO-2's, below)
    assert [r["reference_partitioned"] for r in reports["zero3"]] == [True, True]
    assert [r["reference_partitioned"] for r in reports["zero2"]] == [False, False]
    steps = {k: read_table(RunStorage(str(d)), "train_steps") for k, d in runs.items()}
    for col in ("grad_norm", "loss", "kl", "accuracy"):
        assert steps["zero3"][col].tolist() == pytest.approx(steps["zero2"][col].tolist(), rel=1e-4, abs=1e-7), col
    pen = {k: read_table(RunStorage(str(d)), "episode_rewards")["penalty_hat"] for k, d in runs.items()}
    assert pen["zero3"].tolist() == pytest.approx(pen["zero2"].tolist(), rel=1e-3, abs=1e-6) and pen["zero3"].max() > 0

    # interrupted after step 1 (a copy of the run): LATEST points there again, and the rerun resumes from it
    again = tmp_path / "zero3"
    shutil.copytree(runs["zero3"], again)
    (again / "checkpoints" / LATEST).write_text("step-000001\n")
    shutil.rmtree(again / "checkpoints" / "step-000002")
    resumed = _run_two_ranks({**configs["zero3"], "out": str(again)}, tmp_path, "zero3-resumed", root / "data")
    assert [r["steps_run"] for r in resumed] == [[2], [2]]
    for k, w in final_weights(again).items():
        torch.testing.assert_close(w, w3[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_trainer_two_ranks_checkpoint_to_object_storage_fail_together_and_resume(tiny_dir, tmp_path, monkeypatch,
                                                                                     caplog):
    """A two-rank ZeRO-2 run whose run directory is on an object store (a local S3 server): every
    rank uploads its own engine shard into the checkpoint, rank 0 the model and COMPLETE last. When
    rank 1's upload of step 2 fails (a full disk), both ranks stop at once (rank 0 hears of it,
    instead of waiting in a collective until the process group times out) and step 2 stays
    incomplete; run again, the job resumes from step 1, downloading the checkpoint once for the
    host, and ends with the step-2 weights and metrics the failed session had reached."""
    from transformers import AutoModelForCausalLM

    from _ds_trainer_worker import weights_digest
    from conftest import moto_s3
    from l2t_core.checkpoint import COMPLETE, RunStorage
    from l2t_core.config import TrainConfig
    from l2t_core.metrics import read_table

    data = _toy_data_and_zero3(tmp_path)
    base = dict(policy=str(tiny_dir), steps=2, prompts_per_step=4, method="l2t", engine="deepspeed",
                deepspeed_config=str(ROOT / "infra" / "deepspeed" / "zero2.json"), checkpoint_every=1,
                keep_checkpoints=2, data={"source": "toy.jsonl"}, optim={"lr": 1e-3},
                rollout={"group_size": 2, "max_new_tokens": 12, "max_prompt_tokens": 512}, micro_batch_tokens=120,
                share_prompts=False, dist_timeout_minutes=10)
    with moto_s3(monkeypatch, "l2t-ds", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}):
        url = "s3://l2t-ds/runs/two-ranks"
        cfg = tmp_path / "s3.json"
        cfg.write_text(TrainConfig.model_validate({**base, "out": url}).model_dump_json())
        out = tmp_path / "s3-failed"
        out.mkdir()
        failed = subprocess.run(_torchrun(tmp_path) + [str(TRAINER_WORKER), str(cfg), str(out), "upload-fails"],
                                env=dict(_env(), L2T_DATA_DIR=str(data)), timeout=300, cwd=ROOT,
                                capture_output=True, text=True)
        said = failed.stdout + failed.stderr
        assert failed.returncode != 0
        assert "No space left on device (injected on rank 1)" in said
        assert "rank 1 failed to upload its engine shard of step 2" in said, said[-3000:]  # rank 0 heard of it
        store = RunStorage(url)
        assert store.complete_steps() == [1]
        assert not store.exists(f"checkpoints/step-000002/{COMPLETE}")
        assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.glob(store.path("checkpoints/step-000001/engine/*"))
                      if "optim_states" in p) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                   "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        uninterrupted = read_table(store, "train_steps")  # the failed session got through step 2's update
        assert uninterrupted["step"].tolist() == [1, 2]
        reached = json.loads((out / "rank1-failed.json").read_text())["digest"]

        caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server's request log
        caplog.clear()
        resumed = _run_two_ranks({**base, "out": url}, tmp_path, "s3-resumed", data)
        assert [r["steps_run"] for r in resumed] == [[2], [2]]  # it resumed after step 1
        downloads = [m for m in caplog.messages if "GET /l2t-ds/runs/two-ranks/checkpoints/step-000001/" in m]
        assert sum("model.safetensors" in m for m in downloads) == 1, downloads  # once for the host, not per rank
        assert sum("zero_pp_rank_1_mp_rank_00_optim_states.pt" in m for m in downloads) == 1, downloads
        assert [r["checkpoint"] for r in resumed] == [f"{url}/checkpoints/step-000002", None]
        assert store.complete_steps() == [1, 2]
        with store.local_copy(store.path("checkpoints", "step-000002")) as d:
            assert len(list(d.glob("engine/zero_pp_rank_*_optim_states.pt"))) == 2
            remote = weights_digest(AutoModelForCausalLM.from_pretrained(d))
        steps = read_table(store, "train_steps")
    assert resumed[0]["digest"] == resumed[1]["digest"] == reached == remote
    assert steps["step"].tolist() == [1, 2]  # the failed session's step-2 row was dropped on resume
    for col in ("grad_norm", "loss", "kl", "accuracy"):
        assert steps[col].tolist() == pytest.approx(uninterrupted[col].tolist(), rel=1e-6, abs=1e-9), col


@pytest.mark.slow
def test_zero3_trainer_with_fewer_micro_batches_on_one_rank_equals_one_process(trainer_runs, tmp_path, monkeypatch):
    """The whole Trainer under ZeRO-3 (every parameter partitioned, the reference too) where rank 1's
    responses are one token long: it has fewer micro-batches than rank 0 in the reference pass and
    in the update, so it runs dummy forwards (the reference) and zero-loss backwards (the update).
    The run must finish, and its weights equal one process replaying both ranks' rollouts."""
    import dataclasses
    import pickle

    from safetensors.torch import load_file

    from l2t_core.checkpoint import RunStorage
    from l2t_core.config import TrainConfig
    from l2t_core.rewards.fitting import microbatches
    from l2t_core.trainer import Trainer

    root, configs, reports = trainer_runs
    base, ranks, data = configs["uneven"], reports["uneven"], root / "data"
    assert ranks[0]["digest"] == ranks[1]["digest"]
    shares = [pickle.loads((root / "uneven-out" / f"rollouts-rank{r}.pkl").read_bytes())[1] for r in (0, 1)]
    lengths = [[len(r.prompt_ids) + len(r.response_ids) for r in rs] for rs, _ in shares]
    counts = [len(microbatches(x, base["micro_batch_tokens"])) for x in lengths]
    assert counts[0] > counts[1], f"the ranks must have different numbers of micro-batches: {counts}, {lengths}"

    rollouts, probs, off = [], [], 0
    for rs, ps in shares:
        rollouts += [dataclasses.replace(r, group_id=r.group_id + off) for r in rs]
        probs += ps
        off += max(r.group_id for r in rs) + 1
    monkeypatch.setenv("L2T_DATA_DIR", str(data))
    tr = Trainer(TrainConfig.model_validate({**base, "engine": "torch", "deepspeed_config": None,
                                             "out": str(tmp_path / "replay")}), show_progress=False)
    tr._rollouts = lambda step: (rollouts, probs, 0.0)
    tr.run()
    latest = RunStorage(base["out"]).latest_checkpoint()
    got = load_file(str(Path(latest[1]) / "model.safetensors"))
    want = tr.engine.unwrapped().state_dict()
    for name, w in got.items():
        torch.testing.assert_close(w, want[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow
def test_pipes_launcher_runs_two_ranks_under_torchrun_and_rank_0_reports(tiny_dir, tmp_path, monkeypatch):
    """The pipeline's local launcher with nproc_per_node=2: a Dagster asset launches the training
    entrypoint under torchrun through the launcher's Pipes client; both ranks train, rank 0 alone reports
    the materialization (one, with the run's metadata) and writes the run."""
    import dagster as dg

    from l2t_core.checkpoint import RunStorage
    from l2t_core.config import TrainConfig
    from l2t_core.metrics import read_table
    from l2t_pipeline.resources import TrainingLauncher

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "toy.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"t{i}", "problem": f"Compute {i} + 1.", "answer": str(i + 1)}) + "\n")
    # torchrun (a child of the launch) sees this temp dir: without --log-dir it would leave a
    # torchelastic_* directory there
    child_tmp = tmp_path / "child_tmp"
    child_tmp.mkdir()
    for k, v in (("L2T_DATA_DIR", str(data)), ("DS_ACCELERATOR", "cpu"), ("PYTHONPATH", str(ROOT)),
                 ("TMPDIR", str(child_tmp))):
        monkeypatch.setenv(k, v)
    cfg = TrainConfig.model_validate(dict(  # the torch engine, as TrainRunConfig.to_core makes it
        policy=str(tiny_dir), out=str(tmp_path / "run"), steps=1, prompts_per_step=2, method="grpo", device="cpu",
        data={"source": "toy.jsonl"}, rollout={"group_size": 2, "max_new_tokens": 8, "max_prompt_tokens": 512}))
    launcher = TrainingLauncher(nproc_per_node=2, cwd=str(ROOT))  # torchrun --standalone: a free port of its own
    placed = launcher.placed_config(cfg)  # what the checkpoints asset launches: DeepSpeed with the shipped ZeRO-2
    assert (placed.engine, Path(placed.deepspeed_config), placed.device) == (
        "deepspeed", ROOT / "infra" / "deepspeed" / "zero2.json", "cpu")

    @dg.asset
    def two_rank_run(context):  # a local function: no string annotation for Dagster to resolve
        return launcher.launch(context, placed).get_materialize_result()

    result = dg.materialize([two_rank_run])
    assert result.success
    mats = result.asset_materializations_for_node("two_rank_run")
    assert len(mats) == 1
    meta = mats[0].metadata
    assert meta["final_step"].value == 1 and meta["run_url"].value == str(tmp_path / "run")
    rollouts = read_table(RunStorage(str(tmp_path / "run")), "rollouts")
    assert sorted(rollouts["rank"].unique().tolist()) == [0, 1] and sorted(rollouts["rollout"]) == [0, 1, 2, 3]
    assert RunStorage(str(tmp_path / "run")).latest_checkpoint() is not None
    assert not list(child_tmp.glob("torchelastic_*"))


@pytest.mark.slow
def test_zero3_random_layers_penalty_takes_each_episodes_gradient_like_zero2(trainer_runs):
    """l2t_random_layers under ZeRO-3 (every parameter partitioned): the per-episode backwards
    (batched, through DeepSpeed's gathering hooks) give the penalties ZeRO-2 gives."""
    from l2t_core.checkpoint import RunStorage
    from l2t_core.metrics import read_table

    root, _, _ = trainer_runs
    pen = {k: read_table(RunStorage(str(root / k)), "episode_rewards")["penalty"] for k in ("rl_zero2", "rl_zero3")}
    assert pen["rl_zero3"].tolist() == pytest.approx(pen["rl_zero2"].tolist(), rel=1e-3, abs=1e-12)
    assert pen["rl_zero3"].max() > 0


SFT_WORKER = Path(__file__).with_name("_ds_sft_worker.py")


def _sft_traces(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):  # responses of different lengths, so the ranks' shares of a batch differ in tokens
        steps = "".join(f"<episode_{k + 1}>Add {i} and {k} to get {i + k}.</episode_{k + 1}>\n" for k in range(1 + i % 3))
        rows.append({"id": f"r{i}", "problem": f"Compute {i} + 2.", "answer": str(i + 2),
                     "response": f"<think>\n{steps}</think>\n\nThe answer is \\boxed{{{i + 2}}}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sft_on_two_ranks_equals_one_process_and_resumes_after_a_kill(tiny_dir, tmp_path, stage):
    """`l2t sft` with engine=deepspeed on two gloo ranks: batches of 5 split 3/2 (and 2/1 at an
    epoch's end) in passes of 2, so one rank pads with zero-loss passes; the job ends with one
    process's weights, losses, evaluation losses and gradient norms (a missing or doubled ×world
    scale of the ranks' losses doubles or halves the norm), and both ranks hold the same weights.
    Under ZeRO-3 (every parameter partitioned; the checkpoint's and the final model's weights are
    gathered whole) it is killed in step 4 first, after the step-2 checkpoint that holds both ranks'
    optimizer shards, and run again: it resumes there and ends the same. Under ZeRO-2 rank 0 first
    fails to write the finished model (a full disk): both ranks stop at once (rank 1 does not wait
    for rank 0 until the process group times out), the step-4 checkpoint is kept, and the job run
    again resumes after step 4 and ends the same."""
    from safetensors.torch import load_file

    from l2t_core.sft import SFTConfig, run_sft

    data = _sft_traces(tmp_path / "traces.jsonl", 10)
    ds_config = ROOT / "infra" / "deepspeed" / "zero2.json"
    if stage == 3:
        _toy_data_and_zero3(tmp_path)  # writes the ZeRO-3 config with every parameter partitioned
        ds_config = tmp_path / "ds_zero3.json"
    base = dict(model=str(tiny_dir), data=str(data), steps=5, batch_size=5, micro_batch_size=2, lr=3e-3,
                eval_size=2, eval_every=2, checkpoint_every=2, seed=0)
    one = run_sft(SFTConfig(**base, out=str(tmp_path / "one"), device="cpu"), show_progress=False)

    cfg = SFTConfig(**base, out=str(tmp_path / "two"), engine="deepspeed", deepspeed_config=str(ds_config))
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    launch = _torchrun(tmp_path) + [str(SFT_WORKER), str(tmp_path / "cfg.json"), str(tmp_path)]
    killed = subprocess.run(launch + ["4" if stage == 3 else "final"], env=_env(), timeout=240, cwd=ROOT,
                            capture_output=True, text=True)
    assert killed.returncode != 0 and not (tmp_path / "two").exists()
    if stage == 2:
        assert "No space left on device" in killed.stdout + killed.stderr
        assert "rank 0 failed to write the finished model" in killed.stdout + killed.stderr  # rank 1 heard of it
    shards = sorted(p.name for p in (tmp_path / ".two.partial" / "checkpoint" / "engine").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # both ranks' optimizer partitions
    proc = subprocess.run(launch, env=_env(), timeout=240, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    two = tmp_path / "two"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks end with different weights"
    r1, r2 = (json.loads((d / "sft_report.json").read_text()) for d in (one, two))
    assert (r2["engine"], r2["world"], r2["resumed_after_step"]) == ("deepspeed", 2, 2 if stage == 3 else 4)
    assert r2["loss_curve"] == pytest.approx(r1["loss_curve"], rel=1e-5)
    assert r2["grad_norm_curve"] == pytest.approx(r1["grad_norm_curve"], rel=1e-4)
    assert [s for s, _ in r2["eval_losses"]] == [2, 4, 5]
    assert [v for _, v in r2["eval_losses"]] == pytest.approx([v for _, v in r1["eval_losses"]], rel=1e-5)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    assert not (tmp_path / ".two.partial").exists()
