"""Hub models at a revision (l2t_core.hub): the commit a branch is, the local copy of a commit,
and configs that load a revision, read through huggingface_hub's offline cache (``hub_cache``)."""

from __future__ import annotations

import shutil

import pytest
import torch

from l2t_core.config import TrainConfig
from l2t_core.hub import hub_commit, hub_snapshot
from l2t_core.models import ModelLoadError, load_policy, model_source
from l2t_core.sft import SFTConfig

REPO = "l2t-test/tiny"
A, B = "a" * 40, "b" * 40


def other_weights(tiny_dir, tmp_path):
    """``tiny_dir`` with its parameters scaled: another commit of the same model."""
    model, tok = load_policy(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    out = tmp_path / "other"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def first_weight(model) -> torch.Tensor:
    return next(model.parameters()).detach().clone()


def test_a_branch_resolves_to_its_commit_and_a_commit_keeps_its_files_when_the_branch_moves(tiny_dir, tmp_path,
                                                                                           hub_cache):
    hub_cache(REPO, tiny_dir, A, refs=("main", "v1"))
    assert hub_commit(REPO) == hub_commit(REPO, "main") == hub_commit(REPO, "v1") == A
    snap = hub_snapshot(REPO, "main")
    assert snap.name == A and (snap / "config.json").is_file()
    first = first_weight(load_policy(REPO, revision="main")[0])
    assert torch.equal(first, first_weight(load_policy(tiny_dir)[0]))

    hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)  # main moves upstream; v1 stays
    assert hub_commit(REPO) == B and hub_commit(REPO, "v1") == A
    assert model_source(REPO, A) == str(snap)
    assert torch.equal(first_weight(load_policy(REPO, revision=A)[0]), first)
    assert torch.equal(first_weight(load_policy(REPO, revision="main")[0]), first * 0.5)


def test_a_model_saved_with_pytorch_weights_only_is_found_too(tiny_dir, tmp_path, hub_cache):
    model, tok = load_policy(tiny_dir)
    legacy = tmp_path / "legacy"
    model.config.save_pretrained(legacy)  # saved as before safetensors (save_pretrained writes those now)
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    tok.save_pretrained(legacy)
    assert not list(legacy.glob("*.safetensors")) and list(legacy.glob("*.bin"))
    hub_cache(REPO, legacy, A)
    snap = hub_snapshot(REPO)
    assert snap.name == A and list(snap.glob("*.bin"))
    assert torch.equal(first_weight(load_policy(REPO, revision="main")[0]), first_weight(model))


def test_an_unknown_revision_or_model_fails_naming_it_and_the_offline_cache(tiny_dir, hub_cache):
    hub_cache(REPO, tiny_dir, A)
    for call, revision in ((lambda: hub_commit(REPO, "v9"), "v9"), (lambda: hub_snapshot(REPO, B), B),
                           (lambda: hub_commit("l2t-test/none"), "main")):
        with pytest.raises(ModelLoadError) as err:
            call()
        assert f"at revision {revision!r}" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)


def test_a_revision_is_refused_for_a_local_path_and_carried_for_a_hub_id(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="policy_revision .* is a local path or URL"):
        TrainConfig(policy=str(tiny_dir), policy_revision="main")
    with pytest.raises(ValueError, match="model_revision .* is a local path or URL"):
        SFTConfig(model="s3://bucket/model", model_revision="main", data="t.jsonl", out=str(tmp_path / "o"))
    # a relative path that exists could also read as 'org/name': refused where it is loaded
    shutil.copytree(tiny_dir, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    TrainConfig(policy="org/name", policy_revision="main")
    with pytest.raises(ValueError, match="'org/name' is a local path"):
        model_source("org/name", "main")
    cfg = TrainConfig(policy=REPO, policy_revision=A)
    assert TrainConfig.model_validate_json(cfg.model_dump_json()).policy_revision == A
    assert model_source(str(tiny_dir)) == str(tiny_dir)  # no revision: the name as it is


def test_an_sft_fine_tunes_the_revision_it_names(tiny_dir, tmp_path, hub_cache):
    """``l2t sft`` of a hub model at ``model_revision``: it starts from that commit, not from the
    branch the hub has moved on (a learning rate too small to move a weight keeps it visible)."""
    from test_sft import _rows, _write

    from l2t_core.sft import run_sft

    hub_cache(REPO, tiny_dir, A, refs=("v1",))
    hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)
    cfg = SFTConfig(model=REPO, model_revision="v1", data=str(_write(tmp_path / "t.jsonl", _rows(4))),
                    out=str(tmp_path / "sft"), steps=1, batch_size=2, lr=1e-30, warmup_frac=0.0, device="cpu")
    out = run_sft(cfg, show_progress=False)
    assert torch.allclose(first_weight(load_policy(out)[0]), first_weight(load_policy(tiny_dir)[0]))


# top-level file lists of public hub repos, as the hub lists them (abridged to their kinds of file)
REPOS = {
    "Qwen/Qwen2.5-Math-1.5B": [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json",
                               "merges.txt", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                               "vocab.json"],
    "meta-llama/Llama-3.1-8B-Instruct": ["LICENSE", "README.md", "config.json", "generation_config.json",
                                         "model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors",
                                         "model.safetensors.index.json", "original/consolidated.00.pth",
                                         "original/params.json", "original/tokenizer.model",
                                         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"],
    "mistralai/Mistral-7B-Instruct-v0.3": ["config.json", "consolidated.safetensors", "generation_config.json",
                                           "model-00001-of-00003.safetensors", "model.safetensors.index.json",
                                           "params.json", "special_tokens_map.json", "tokenizer.json",
                                           "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json"],
    "openai-community/gpt2": ["64-8bits.tflite", "config.json", "flax_model.msgpack", "generation_config.json",
                              "merges.txt", "model.safetensors", "onnx/decoder_model.onnx", "onnx/config.json",
                              "pytorch_model.bin", "rust_model.ot", "tf_model.h5", "tokenizer.json",
                              "tokenizer_config.json", "vocab.json"],
    "legacy/bin-only": ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                        "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.model",
                        "tokenizer_config.json", "training_args.bin"],
}


def test_what_is_downloaded_of_a_hub_model_is_what_from_pretrained_reads():
    """hub_snapshot's patterns, applied by huggingface_hub's own filter to real repos' file lists:
    config, tokenizer and the safetensors weights, else the PyTorch weights; no second copy of the
    weights (original/, consolidated.*, other frameworks), no training_args.bin."""
    from huggingface_hub.utils import filter_repo_objects

    from l2t_core.hub import HUB_MODEL_FILES, NOT_DOWNLOADED, PYTORCH_WEIGHTS, SAFETENSORS_WEIGHTS

    def picked(files, weights):
        return sorted(filter_repo_objects(files, allow_patterns=[*HUB_MODEL_FILES, *weights],
                                          ignore_patterns=list(NOT_DOWNLOADED)))

    qwen, llama, mistral, gpt2, legacy = REPOS.values()
    assert picked(qwen, SAFETENSORS_WEIGHTS) == ["config.json", "generation_config.json", "merges.txt",
                                                 "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                                 "vocab.json"]
    assert picked(llama, SAFETENSORS_WEIGHTS) == [
        "config.json", "generation_config.json", "model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert "consolidated.safetensors" not in picked(mistral, SAFETENSORS_WEIGHTS)
    assert {"tokenizer.model", "tokenizer.model.v3", "model-00001-of-00003.safetensors"} <= set(
        picked(mistral, SAFETENSORS_WEIGHTS))
    assert [f for f in picked(gpt2, SAFETENSORS_WEIGHTS) if "model" in f] == ["model.safetensors"]
    # no safetensors: the second download takes the PyTorch shards (the metadata came with the first)
    assert [f for f in picked(legacy, SAFETENSORS_WEIGHTS) if f.endswith(".bin")] == []
    assert sorted(filter_repo_objects(legacy, allow_patterns=list(PYTORCH_WEIGHTS),
                                      ignore_patterns=list(NOT_DOWNLOADED))) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_a_run_resumes_only_from_the_commit_it_started_from(tiny_dir, tmp_path, hub_cache, monkeypatch):
    """A run of a hub policy at a branch records the commit it loaded; resumed after the branch
    moved (its reference policy would be another model) it is refused, naming the commit to resume
    with, which then resumes it."""
    import json

    from test_trainer import make_cfg

    from l2t_core.trainer import ResumeError, Trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / "toy.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "problem": f"Compute {i} + 1.",
                                                        "answer": str(i + 1)}) + "\n" for i in range(4)))
    monkeypatch.setenv("L2T_DATA_DIR", str(data))
    hub_cache(REPO, tiny_dir, A)
    out = tmp_path / "run"

    def run(revision):
        cfg = make_cfg(REPO, out, steps=1, checkpoint_every=1, mini_batches=1, policy_revision=revision,
                       rollout={"group_size": 2, "max_new_tokens": 8, "max_prompt_tokens": 512})
        return Trainer(cfg, show_progress=False).run()

    assert run("main").final_step == 1
    hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)  # main moves upstream
    with pytest.raises(ResumeError, match=f"started from commit {A} of {REPO}, and this launch loads commit {B} "
                                          f".*Resume with --policy-revision {A}"):
        run("main")
    assert run(A).final_step == 1  # the same run, finished: resumed from its commit


def _rank_loads(rank: int, world: int, init: str, caches: list[str], revision: str, out: str) -> None:
    """One rank of a two-process gloo group whose hub cache is ``caches[rank]`` (a host's own):
    writes the local copy ``ranks_model_source`` gave it, or what it raised, to out/rank<r>.json."""
    import json
    import os
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist
    from huggingface_hub import constants

    from l2t_core.models import ranks_model_source

    os.environ["HF_HUB_CACHE"] = constants.HF_HUB_CACHE = caches[rank]
    constants.HF_HUB_OFFLINE = True
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        seen = {"source": ranks_model_source(REPO, revision, rank == 0)}
    except BaseException as exc:  # noqa: BLE001 - what each rank raised is the point
        seen = {"error": f"{type(exc).__name__}: {exc}"}
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


def test_the_ranks_of_a_launch_load_the_commit_rank_0_found_a_branch_to_be(tiny_dir, tmp_path, hub_cache):
    """A branch that moves while the ranks of a launch start: rank 1's host already sees the new
    commit, and still loads the one rank 0 resolved, so every rank trains the same weights. A
    revision rank 0 cannot find stops both ranks, and so does a commit another rank cannot get (its
    host's cache lacks it, offline)."""
    import json

    import torch.multiprocessing as mp

    hub_cache(REPO, tiny_dir, A)
    rank0_cache = tmp_path / "rank0_cache"
    shutil.copytree(tmp_path / "hf_hub_cache", rank0_cache)  # rank 0's host: main is A
    hub_cache(REPO, other_weights(tiny_dir, tmp_path), B)  # rank 1's host: main has moved to B
    caches = [str(rank0_cache), str(tmp_path / "hf_hub_cache")]
    assert hub_commit(REPO) == B  # what rank 1 would load resolving main itself
    without_a = tmp_path / "rank1_without_a"  # a host that saw only the new commit
    shutil.copytree(tmp_path / "hf_hub_cache", without_a)
    shutil.rmtree(without_a / f"models--{REPO.replace('/', '--')}" / "snapshots" / A)

    for revision, case, hosts in (("main", "moved", caches), ("no-such-branch", "missing", caches),
                                  ("main", "not_on_rank_1", [caches[0], str(without_a)])):
        out = tmp_path / case
        out.mkdir()
        mp.spawn(_rank_loads, args=(2, f"file://{out}/pg", hosts, revision, str(out)), nprocs=2, join=True)
        seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        if case == "moved":
            assert [s["source"] for s in seen] == [str(rank0_cache / f"models--{REPO.replace('/', '--')}/snapshots/{A}"),
                                                   str(tmp_path / f"hf_hub_cache/models--{REPO.replace('/', '--')}"
                                                                  f"/snapshots/{A}")]
        elif case == "not_on_rank_1":
            assert seen[1]["error"].startswith("ModelLoadError") and A in seen[1]["error"]
            assert seen[0]["error"].startswith(f"RuntimeError: rank 1 failed to find {REPO!r} at commit {A} "
                                               "(revision 'main') (ModelLoadError: ")
        else:
            assert seen[0]["error"].startswith("ModelLoadError") and "no-such-branch" in seen[0]["error"]
            assert seen[1]["error"] == (f"RuntimeError: rank 0 failed to find {REPO!r} at revision 'no-such-branch' "
                                        "(its log says why); this rank stops too")
