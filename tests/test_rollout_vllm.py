"""The ``vllm`` rollout engine.

* Without vLLM: constructing the engine names the ``gpu`` extra, and a missing CUDA device is a
  clear error.
* With vLLM and a GPU (skipped elsewhere): a tiny Qwen2 is sampled by real vLLM and checked
  against the ``hf`` engine, before and after ``sync_weights``, with and without sleep mode (both levels).
* Sleep levels through a stand-in for ``vllm.LLM`` that models them (what the engine asks of vLLM, in order).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from l2t_core.rollout import SamplingParams, make_rollout_engine

EOS = 1


class StubTokenizer:
    eos_token_id = EOS
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


# ---------------------------------------------------------------------------------------------
# No vLLM, no GPU
# ---------------------------------------------------------------------------------------------


def test_missing_vllm_names_the_gpu_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    from l2t_core.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ImportError, match=r'pip install -e "\.\[gpu\]"'):
        VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="unused")
    with pytest.raises(ImportError, match=r"gpu extra"):
        make_rollout_engine("vllm", torch.nn.Linear(2, 2), StubTokenizer(), model_path="unused")


def test_missing_cuda_is_a_clear_error(monkeypatch):
    fake = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device.*rollout.engine='hf'"):
        make_rollout_engine("vllm", torch.nn.Linear(2, 2), StubTokenizer(), model_path="unused")


def test_launch_kwargs_join_a_multi_rank_launch_one_engine_per_rank():
    from l2t_core.rollout.vllm import launch_kwargs

    assert launch_kwargs(1, 7, world=1, rank=0) == {"seed": 7}
    assert launch_kwargs(2, 7, world=1, rank=0) == {"seed": 7}  # one process: vLLM's own TP workers
    assert launch_kwargs(1, 7, world=8, rank=3) == {"seed": 10, "distributed_executor_backend": "external_launcher"}
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=2 in a 8-rank launch"):
        launch_kwargs(2, 7, world=8, rank=3)


def _stand_in_vllm(monkeypatch, llm_cls, world: tuple[int, int]):
    """``import vllm`` gives a module whose ``LLM`` is ``llm_cls`` (vLLM cannot be installed here),
    CUDA looks available, and the trainer's process group has ``world`` = (size, rank); returns the
    engine module."""
    import l2t_core.rollout.vllm as engine_mod

    fake = types.ModuleType("vllm")
    fake.LLM = llm_cls
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine_mod, "_process_group", lambda: world)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # the engine sets it: restored after
    return engine_mod


def test_engine_passes_the_launch_kwargs_to_vllm(monkeypatch):
    """What the engine hands ``vllm.LLM`` under a multi-rank launch (a recording stand-in for
    vLLM, which cannot be installed here; the real engine is tested below where it exists)."""
    import l2t_core.rollout.vllm as engine_mod

    seen = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def collective_rpc(self, method, args=()):
            seen.setdefault("rpc", []).append((method, len(args[0])))


        def reset_prefix_cache(self):
            seen["reset"] = True

    _stand_in_vllm(monkeypatch, RecordingLLM, world=(4, 2))
    eng = engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m", seed=5)
    assert seen["seed"] == 7 and seen["distributed_executor_backend"] == "external_launcher"
    # vLLM's generation defaults come from a directory that holds only the tokenizer's EOS: no
    # sampling defaults and no extra stop ids from the checkpoint's generation_config.json
    gen = json.loads((Path(seen["generation_config"]) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOS and not set(gen) - {"eos_token_id", "transformers_version"}
    assert seen["worker_extension_cls"] == engine_mod.EXTENSION and seen["rpc"] == [("l2t_load_weights", 2)]
    with pytest.raises(ValueError, match="4-rank launch"):
        engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m", tensor_parallel_size=2)
    eng.close()
    assert not Path(seen["generation_config"]).exists()


@pytest.mark.parametrize("tied,compiled", [(False, False), (True, False), (True, True)])
def test_a_tied_output_head_is_left_to_vllm_in_every_chunk_of_the_copy(monkeypatch, tied, compiled):
    """vLLM ties a tied model's head to its embedding itself, and from 0.29 its weight loader
    refuses a load_weights call that names the tied head without the embedding (a chunk of the
    copy can hold it alone): the copy leaves it out; an untied head is copied like any tensor."""
    import l2t_core.rollout.vllm as engine_mod
    from l2t_core.models import build_tiny_qwen2

    seen = {}

    class RecordingLLM:
        def __init__(self, **kwargs):
            pass

        def collective_rpc(self, method, args=()):
            seen.setdefault("chunks", []).append([n for n, _ in args[0]])

        def reset_prefix_cache(self):
            return True

    _stand_in_vllm(monkeypatch, RecordingLLM, world=(1, 0))
    model = build_tiny_qwen2(64, hidden_size=32, num_layers=2, intermediate_size=64)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = [n for n in model.state_dict() if not (tied and n == "lm_head.weight")]
    if compiled:  # a torch.compile'd policy: its names carry _orig_mod., which the copy drops
        model = torch.compile(model)
    eng = engine_mod.VLLMRolloutEngine(model, StubTokenizer(), model_path="m", sync_chunk_tensors=4)
    names = [n for chunk in seen["chunks"] for n in chunk]
    assert all(len(chunk) <= 4 for chunk in seen["chunks"]) and len(seen["chunks"]) > 2
    assert engine_mod.tied_output_head(model) == ("lm_head.weight" if tied else None)
    assert names == expected and "model.embed_tokens.weight" in names
    eng.close()


def test_completions_end_at_eos_whatever_the_finish_reason(monkeypatch):
    """vLLM keeps the stop token and, before 0.12, reports an EOS sampled as the last allowed token
    as ``"length"``: such a sample is finished and the EOS dropped, as the ``hf`` engine does."""
    engine_mod = _stand_in_vllm(monkeypatch, SleepyLLM, world=(1, 0))
    eng = engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m")
    out = lambda ids, reason: SimpleNamespace(token_ids=ids, finish_reason=reason)
    for ids, reason, want_ids, want_finished in [
        ([4, 5, EOS], "length", [4, 5], True),  # EOS as the last allowed token (vLLM < 0.12)
        ([4, 5, EOS], "stop", [4, 5], True),
        ([4, 5, 6], "length", [4, 5, 6], False),
        ([EOS], "stop", [], True),
    ]:
        c = eng._completion([9], out(ids, reason))
        assert (c.response_ids, c.finished) == (want_ids, want_finished)
    eng.close()


def test_near_zero_temperature_is_greedy_in_both_engines(monkeypatch):
    """vLLM refuses ``n > 1`` below its sampling epsilon (1e-5); both engines decode greedily there."""
    engine_mod = _stand_in_vllm(monkeypatch, SleepyLLM, world=(1, 0))
    eng = engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m")
    sp = SamplingParams(n=3, temperature=1e-6, max_new_tokens=4)
    assert sp.greedy and not SamplingParams(n=3, temperature=1e-5).greedy
    group = eng.generate([[5, 6]], sp)[0]
    assert eng.llm.n == [1] and len(group) == 3 and len({tuple(c.response_ids) for c in group}) == 1
    assert eng.llm.temperature == [0.0]  # vLLM would raise 1e-6 to 0.01 and sample, unseeded
    eng.close()


def test_temperatures_vllm_would_raise_to_its_floor_are_refused(monkeypatch):
    """vLLM samples any temperature in (0, 0.01) at 0.01: from 1e-5 (greedy below) up to 0.01 the
    engine refuses, where the trainer would score samples under another temperature than they
    were drawn at; 0.01 itself samples as asked."""
    engine_mod = _stand_in_vllm(monkeypatch, SleepyLLM, world=(1, 0))
    eng = engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m")
    for t in (1e-5, 0.005, 0.0099):
        with pytest.raises(ValueError, match=r"vLLM raises temperatures in \(0, 0.01\) to 0.01.*use 0 \(greedy\) or >= 0.01"):
            eng.generate([[5, 6]], SamplingParams(n=2, temperature=t, max_new_tokens=4))
    eng.generate([[5, 6]], SamplingParams(n=2, temperature=0.01, max_new_tokens=4))
    assert eng.llm.temperature == [0.01] and eng.llm.n == [2]
    eng.close()


def test_a_separate_engine_core_process_is_refused(monkeypatch):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=1 vLLM's engine core is another process, which the
    weight copy cannot reach with tensors: refused before vLLM starts, naming the variable."""
    engine_mod = _stand_in_vllm(monkeypatch, SleepyLLM, world=(1, 0))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1 .*unset it or set it to 0"):
        engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m")


class SleepyLLM:
    """``vllm.LLM`` as this engine uses it, with its sleep levels modelled (vLLM cannot be installed
    here; the real one runs in the GPU tests below): level 1 keeps a CPU copy of the weights, level 2
    keeps nothing, so what wakes up is garbage (NaN) until weights are loaded. ``generate`` samples
    one token that is a function of the weights, and refuses sleeping or garbage memory."""

    def __init__(self, **kwargs):
        self.kwargs, self.weights, self.asleep, self.events = kwargs, {}, set(), []

    def collective_rpc(self, method, args=()):
        assert method == "l2t_load_weights" and "weights" not in self.asleep, "weights loaded into sleeping memory"
        self.events.append("load")
        self.weights.update({n: t.detach().clone() for n, t in args[0]})

    def reset_prefix_cache(self):
        assert "kv_cache" not in self.asleep

    def sleep(self, level):
        self.events.append(f"sleep{level}")
        self.level, self.asleep = level, {"weights", "kv_cache"}
        self.backup = {n: t.clone() for n, t in self.weights.items()} if level == 1 else None
        self.weights = {n: torch.full_like(t, float("nan")) for n, t in self.weights.items()}

    def wake_up(self, tags):
        assert tags and all(t in self.asleep for t in tags), f"woke {tags} while asleep: {self.asleep}"
        self.events.append("wake:" + ",".join(tags))
        self.asleep.difference_update(tags)
        if "weights" in tags and self.level == 1:
            self.weights = {n: t.clone() for n, t in self.backup.items()}

    def generate(self, prompts, sampling, use_tqdm=False):
        assert not self.asleep, f"generate while {self.asleep} sleep"
        total = float(sum(t.double().sum() for t in self.weights.values()))
        assert total == total, "generate read weights that were dropped and never loaded again"
        token = 2 + int(abs(total) * 1e3) % 50
        self.events.append("generate")
        self.max_tokens = [sp.max_tokens for sp in sampling]
        self.n = [sp.n for sp in sampling]
        self.temperature = [sp.temperature for sp in sampling]
        self.stops = [(sp.stop_token_ids, sp.ignore_eos) for sp in sampling]
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                outputs=[SimpleNamespace(index=k, token_ids=[token], finish_reason="length")
                                         for k in range(sp.n)]) for p, sp in zip(prompts, sampling)]


@pytest.fixture
def sleepy_vllm(monkeypatch):
    """The engine module with ``vllm`` replaced by :class:`SleepyLLM`; records empty_cache calls."""
    engine_mod = _stand_in_vllm(monkeypatch, SleepyLLM, world=(1, 0))
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    return engine_mod, emptied


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_levels_sample_from_the_synced_weights_and_free_torch_cache_first(sleepy_vllm, level):
    """What a training step does (sample, sleep, sample again for the reward, sync after the update,
    sample): every sample comes from the trainer's weights at either level; level 2 copies them
    again after each sleep; torch's cache is emptied before every wake-up."""
    engine_mod, emptied = sleepy_vllm
    model = torch.nn.Linear(3, 2)
    eng = engine_mod.VLLMRolloutEngine(model, StubTokenizer(), model_path="m", enable_sleep_mode=True,
                                       sleep_level=level)
    llm = eng.llm
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=0)
    first = eng.generate([[5, 6]], sp)[0][0].response_ids
    assert eng._asleep == {"weights", "kv_cache"} and llm.events[-1] == f"sleep{level}"
    assert llm.stops == [([EOS], True)]  # only the trainer's EOS stops it, not the EOS vLLM's tokenizer has
    assert eng.generate([[5, 6]], sp)[0][0].response_ids == first  # the reward pass's samples: same weights
    with torch.no_grad():  # an update, then the trainer's sync
        model.weight.add_(0.37)
    eng.sync_weights(model)
    assert llm.events[-2:] == ["wake:weights", "load"]  # the KV cache stays asleep during the copy
    assert eng.generate([[5, 6]], sp)[0][0].response_ids != first
    assert llm.events[-3:] == ["wake:kv_cache", "generate", f"sleep{level}"]
    loads_after_sleep = sum(1 for a, b in zip(llm.events, llm.events[1:]) if a == "wake:weights" and b == "load")
    assert loads_after_sleep == (1 if level == 1 else 2)  # level 2 also reloads before the reward's samples
    assert len(emptied) == 1 + sum(e.startswith("wake") for e in llm.events)  # once before vllm.LLM, then per wake-up
    # the continuation J's contexts each ask for the budget they have left
    eng.continue_from([[5, 6], [5, 6, 7]], sp, max_new_tokens=[4, 1])
    assert llm.max_tokens == [4, 1]
    eng.generate([[5, 6]], sp)
    assert llm.max_tokens == [sp.max_new_tokens]
    eng.llm = None


def test_sleep_level_is_checked(sleepy_vllm):
    engine_mod, _ = sleepy_vllm
    with pytest.raises(ValueError, match="sleep_level must be 1 .* or 2"):
        engine_mod.VLLMRolloutEngine(torch.nn.Linear(2, 2), StubTokenizer(), model_path="m", sleep_level=3)
    from l2t_core.config import RolloutConfig

    with pytest.raises(ValueError, match="vllm_sleep_level 2 needs rollout.vllm_enable_sleep_mode"):
        RolloutConfig(engine="vllm", vllm_sleep_level=2)
    assert RolloutConfig(engine="vllm", vllm_enable_sleep_mode=True, vllm_sleep_level=2).vllm_sleep_level == 2


# ---------------------------------------------------------------------------------------------
# Real vLLM on a GPU
# ---------------------------------------------------------------------------------------------

CORPUS = [
    "<think>\n<episode_1>We add 3 and 4 to get 7.</episode_1>\n</think>\n\nThe answer is \\boxed{14}",
    "Compute (3 + 4) * 2. Break down your reasoning into logically coherent segments.",
    "Let x = 5. Check: 5 - 2 = 3. So the result is 3.\n\nRe-check the sum once more.",
] * 10
TEXTS = ["Let x = 5.", "Compute (3 + 4) * 2.",
         "Break down your reasoning into logically coherent segments. The answer is"]


def _tiny(seed):
    from l2t_core.models import build_tiny_qwen2

    # head_dim 64: a size every vLLM attention backend takes
    return build_tiny_qwen2(320, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                            seed=seed)


# (sleep mode, level, tied embeddings: the copy leaves the head to vLLM, in chunks of 4 tensors)
_ENGINES = {"awake": (False, 1, False), "sleep_mode": (True, 1, False), "sleep_level2": (True, 2, False),
            "tied": (False, 1, True)}
_SLEEP_MODE_ENGINES: list[str] = []  # the sleep-mode engines this process has built


@pytest.fixture(scope="module", params=list(_ENGINES.values()), ids=list(_ENGINES))
def gpu(request, tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (the gpu extra: pip install -e '.[gpu]')")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA device and torch.cuda.is_available() is False")
    name = next(k for k, v in _ENGINES.items() if v == request.param)
    if request.param[0] and _SLEEP_MODE_ENGINES:
        # vLLM's sleep-mode memory pool outlives its engine: a second one in the same process fails
        # ("Sleep mode can only be used for one instance per process"); bench/gpu.sh runs each alone
        pytest.skip(f"this process already built a sleep-mode vLLM engine ({_SLEEP_MODE_ENGINES[0]}); vLLM allows "
                    f"one per process: run pytest tests/test_rollout_vllm.py -k {name} on its own")
    from l2t_core.models import build_tokenizer, load_policy
    from l2t_core.rollout.hf import HFRolloutEngine
    from l2t_core.rollout.vllm import VLLMRolloutEngine

    d = tmp_path_factory.mktemp("tiny_qwen2_vllm")
    tok = build_tokenizer(CORPUS, vocab_size=320)
    assert len(tok) <= 320
    tiny = _tiny(0)
    if request.param[2]:  # as the Qwen2.5 models up to 3B are
        tiny.config.tie_word_embeddings = True
        tiny.tie_weights()
    tiny.save_pretrained(d)
    tok.save_pretrained(d)
    model, tok = load_policy(d, device="cuda")  # float32: the comparison with hf is token for token
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == request.param[2]
    if request.param[0]:
        _SLEEP_MODE_ENGINES.append(name)
    engine = VLLMRolloutEngine(model, tok, model_path=str(d), dtype="float32", gpu_memory_utilization=0.2,
                               max_model_len=256, enforce_eager=True, enable_sleep_mode=request.param[0],
                               sleep_level=request.param[1], sync_chunk_tensors=4 if request.param[2] else 64)
    yield SimpleNamespace(model=model, tok=tok, vllm=engine, hf=HFRolloutEngine(model, tok),
                          prompts=[tok(t)["input_ids"] for t in TEXTS])
    engine.close()


def _first(groups, k=None):
    return [g[0].response_ids[:k] for g in groups]


def test_vllm_groups_flags_and_seeds(gpu):
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=5)
    groups = gpu.vllm.generate(gpu.prompts, sp)
    assert [len(g) for g in groups] == [4, 4, 4]
    for g, p in zip(groups, gpu.prompts):
        for c in g:
            assert c.prompt_ids == list(p) and gpu.tok.eos_token_id not in c.response_ids
            assert len(c.response_ids) <= 12 and (c.finished or len(c.response_ids) == 12)
            assert c.text == gpu.tok.decode(c.response_ids, skip_special_tokens=True)
    ids = lambda gs: [[c.response_ids for c in g] for g in gs]
    assert ids(gpu.vllm.generate(gpu.prompts, sp)) == ids(groups)
    other = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=6)
    assert ids(gpu.vllm.generate(gpu.prompts, other)) != ids(groups)
    # nearly flat logits: P(eos) is about 1/320 a token, so some of 64 x 64-token samples stop and most do not
    many = [c for g in gpu.vllm.generate(gpu.prompts, SamplingParams(n=64, temperature=1.0, max_new_tokens=64, seed=1))
            for c in g]
    assert any(c.finished for c in many) and not all(c.finished for c in many)
    assert all((len(c.response_ids) < 64) if c.finished else (len(c.response_ids) == 64) for c in many)


def test_vllm_greedy_matches_hf(gpu):
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=8)
    got = gpu.vllm.generate(gpu.prompts, greedy)
    # float32 on both sides; different kernels, so compare the first tokens, where a near-tie is unlikely
    assert _first(got, 4) == _first(gpu.hf.generate(gpu.prompts, greedy), 4)
    assert _first(gpu.vllm.generate(gpu.prompts[::-1], greedy)) == _first(got)[::-1]
    two = gpu.vllm.generate(gpu.prompts, SamplingParams(n=2, temperature=0, max_new_tokens=8))
    assert all(g[0].response_ids == g[1].response_ids for g in two) and _first(two) == _first(got)


def test_vllm_sync_weights_follows_the_trainer(gpu):
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=8)
    before = _first(gpu.vllm.generate(gpu.prompts, greedy))
    original = {k: v.clone() for k, v in gpu.model.state_dict().items()}
    try:
        gpu.model.load_state_dict(_tiny(1).state_dict())  # every tensor changes (fused qkv, gate/up, ...)
        gpu.vllm.sync_weights(gpu.model)
        after = gpu.vllm.generate(gpu.prompts, greedy)
        assert _first(after, 4) == _first(gpu.hf.generate(gpu.prompts, greedy), 4)
        assert _first(after) != before
        gpu.model.load_state_dict(original)
        gpu.vllm.sync_weights(gpu.model)
        assert _first(gpu.vllm.generate(gpu.prompts, greedy)) == before
        with torch.no_grad():  # vLLM holds a copy: changing the trainer's tensors without a sync changes nothing
            gpu.model.lm_head.weight.mul_(-1.0)
        if gpu.vllm.sleep_level == 1:
            assert _first(gpu.vllm.generate(gpu.prompts, greedy)) == before
        else:  # ... except after a level-2 sleep, which kept no copy: it copies the module as it is now
            assert _first(gpu.vllm.generate(gpu.prompts, greedy), 4) == _first(gpu.hf.generate(gpu.prompts, greedy), 4)
    finally:
        gpu.model.load_state_dict(original)
        gpu.vllm.sync_weights(gpu.model)
