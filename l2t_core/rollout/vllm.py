"""The ``vllm`` rollout engine: vLLM's offline ``LLM`` on a GPU (the ``gpu`` extra).

Targets vLLM 0.27-0.32 (the ``gpu`` extra's range: the releases built on torch 2.13, the torch
this project is tested with; later ones pin torch 2.14) through its public API only:

* ``vllm.LLM(model=model_path, worker_extension_cls=..., generation_config=DIR, ...)`` loads
  the policy once from its HF directory (or hub id). ``DIR`` is a temporary directory whose
  ``generation_config.json`` holds only the tokenizer's EOS id: vLLM would otherwise take the
  checkpoint's sampling defaults (``generation_config="auto"``) or, even with
  ``generation_config="vllm"``, its extra EOS ids (Qwen2.5-Instruct lists two) as stop tokens.
  So generation stops only at the tokenizer's EOS and samples with exactly the parameters asked
  for, as in the ``hf`` engine; each request also sets ``ignore_eos`` with that EOS as its one
  stop token, so the EOS of the tokenizer vLLM loads from ``model_path`` (or
  ``skip_tokenizer_init``) never matters. vLLM keeps the stop token in ``token_ids`` (and before 0.12
  reports an EOS sampled as the last allowed token as ``finish_reason == "length"``), so a
  completion is finished when it ends in EOS, which is dropped.
* ``LLM.generate`` gets ``TokensPrompt(prompt_token_ids=...)`` inputs and one
  ``vllm.SamplingParams`` per prompt. Prompt ``i`` is seeded with
  ``(seed % 2**31) * 2**20 + i * n`` and vLLM seeds its ``k``-th sample with that ``+ k``, so every
  sample has its own seed and a call is reproducible from ``SamplingParams.seed`` (bit for bit only
  where vLLM's kernels are: a repeated prompt reads its KV from the prefix cache through other
  kernels, so in bf16 a near-tie can rarely flip; ``VLLM_BATCH_INVARIANT=1`` or
  ``enable_prefix_caching=False`` in ``llm_kwargs`` where that matters). vLLM refuses
  ``n > 1`` with greedy decoding (a temperature below 1e-5, :attr:`SamplingParams.greedy`), so
  greedy asks for one sample at temperature 0 and repeats it ``n`` times. vLLM raises any other
  temperature below 0.01 to 0.01, so those are refused (:func:`~l2t_core.rollout.base.check_vllm_temperature`).
  vLLM does not detokenize; text is ``tokenizer.decode(ids, skip_special_tokens=True)``.
* :meth:`VLLMRolloutEngine.sync_weights` copies the trainer's tensors into the running engine
  with ``LLM.collective_rpc``. This calls a method of a worker extension
  (:class:`WeightSyncExtension`, installed with ``worker_extension_cls``) on every worker. That
  method passes the tensors to the model's own ``load_weights``, the loader vLLM uses for
  checkpoints, which handles the fused QKV and gate/up projections and tensor-parallel shards.
  Nothing is written to disk. The engine core runs in the trainer's process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here; ``=1`` is refused: vLLM then sends the
  arguments to its engine-core process as msgpack, which turns tensors into plain lists). With one
  GPU the tensors are passed by reference; with tensor parallelism they reach the other GPUs'
  workers as CPU copies, in chunks. A tied output head (``tie_word_embeddings``) is not sent:
  vLLM ties it to the embedding itself, and from 0.29 refuses a chunk that names it without the
  embedding (:func:`synced_tensors`).
  Afterwards the prefix cache is reset, because cached KV blocks belong to the old weights.
* In a multi-rank launch (``deepspeed``/``torchrun``, the process group already joined) every
  rank runs its own engine on its own GPU and samples its own share of the prompts: vLLM joins
  the trainer's process group through ``distributed_executor_backend="external_launcher"``
  instead of starting one of its own, and each rank's engine gets its own seed
  (:func:`launch_kwargs`). Tensor parallelism across ranks is refused there: its partners would
  have to sample the same prompts, and the trainer gives each rank different ones.
* With ``enable_sleep_mode`` the engine sleeps after each ``generate``, so the trainer gets the GPU
  memory back: ``LLM.sleep(level=sleep_level)``. Level 1 (the default) frees the KV cache and
  parks the weights in CPU memory (a whole copy per rank: 15 GB for a 7B model in bf16); level 2
  frees both and keeps no copy, since the weights are about to be replaced anyway: on waking, the
  engine copies them again from the module it last synced from (``sync_weights`` after an update,
  or that module as it is now when a ``generate`` comes first, e.g. the continuation J's samples
  in the reward pass). It wakes the weights alone for a weight copy and the KV cache after it
  (``LLM.wake_up(tags=...)``), and before each wake-up returns the memory that torch's caching
  allocator still holds from the update (``torch.cuda.empty_cache``): vLLM maps its memory back
  from the driver, which cannot hand out blocks torch keeps cached.

Weights partitioned by DeepSpeed ZeRO-3 are gathered one submodule at a time
(:func:`~l2t_core.engines.gather.full_named_tensors`). Not handled: quantized (e.g. fp8) engines
and FSDP-sharded modules. The GPU tests are in
``tests/test_rollout_vllm.py``; on a machine without vLLM or CUDA they are skipped.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from ..engines.gather import full_named_tensors, in_lockstep
from .base import Completion, RolloutEngine, SamplingParams, check_prompts, check_vllm_temperature, token_limits

EXTENSION = "l2t_core.rollout.vllm.WeightSyncExtension"
_TAGS = ("weights", "kv_cache")


class WeightSyncExtension:
    """Mixed into each vLLM worker class (``worker_extension_cls``); ``self`` is the worker."""

    def l2t_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.get_model()  # the model itself, not a CUDA-graph wrapper
        device = next(model.parameters()).device
        model.load_weights(weights=[(n, t.to(device)) for n, t in named_tensors])
        return len(named_tensors)


def _hf_name(name: str) -> str:
    """A state-dict name as the HF model names it: without a ``torch.compile`` wrapper's prefix."""
    return name.replace("_orig_mod.", "")


def tied_output_head(model: torch.nn.Module) -> str | None:
    """The state-dict name of ``model``'s output head's weight where it is tied to the input
    embedding (``config.tie_word_embeddings``, the Qwen2.5 models up to 3B), else None."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if head is not None and module is head:  # named as the copy names it (no torch.compile prefix)
            return _hf_name(f"{name}.weight" if name else "weight")
    return None


def synced_tensors(model: torch.nn.Module):
    """(name, tensor) of what the engine copies into vLLM: every state-dict entry of ``model``,
    whole (:func:`~l2t_core.engines.gather.full_named_tensors`, also under ZeRO-3), by its HF name
    (a ``torch.compile`` wrapper's prefix dropped); not a tied output head: vLLM ties it to the
    embedding itself, and from 0.29 its weight loader refuses a call that names the tied head
    without the embedding (one chunk of the copy can hold the head alone)."""
    tied = tied_output_head(model)
    for name, t in full_named_tensors(model):
        if _hf_name(name) != tied:
            yield _hf_name(name), t


def launch_kwargs(tensor_parallel_size: int, seed: int, world: int, rank: int) -> dict:
    """The ``vllm.LLM`` arguments that depend on how the trainer was launched: in one process,
    vLLM's defaults and ``seed``; in a ``world``-rank launch, vLLM inside the trainer's process
    group (``external_launcher``) with one engine per rank, seeded ``seed + rank``."""
    if world <= 1:
        return {"seed": seed}
    if tensor_parallel_size != 1:
        raise ValueError(
            f"rollout.vllm_tensor_parallel_size={tensor_parallel_size} in a {world}-rank launch: each rank samples "
            "its own prompts with its own engine, so vLLM's tensor parallelism (which needs its partner ranks to "
            "sample the same prompts) is not supported there; use 1, or shard the trainer with ZeRO-3 instead")
    return {"seed": seed + rank, "distributed_executor_backend": "external_launcher"}


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the trainer's torch.distributed process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise ImportError(
            "the 'vllm' rollout engine needs vLLM (0.27-0.32): install the gpu extra with "
            "pip install -e \".[gpu]\" on a machine with an NVIDIA GPU, or set rollout.engine='hf'"
        ) from exc
    if not torch.cuda.is_available():
        raise RuntimeError("the 'vllm' rollout engine needs a CUDA device and none is visible; "
                           "set rollout.engine='hf' to sample on this machine")
    return vllm, TokensPrompt


class VLLMRolloutEngine(RolloutEngine):
    name = "vllm"

    def __init__(self, model, tokenizer, *, model_path: str | None = None, gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, dtype: str = "bfloat16",
                 seed: int = 0, max_prompt_tokens: int | None = None, enforce_eager: bool = False,
                 enable_sleep_mode: bool = False, sleep_level: int = 1, sync_chunk_tensors: int = 64,
                 **llm_kwargs):
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMRolloutEngine: sleep_level must be 1 (weights parked on CPU) or 2 (weights "
                             f"dropped and copied again from the trainer), got {sleep_level!r}")
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError(
                "VLLMRolloutEngine: VLLM_ENABLE_V1_MULTIPROCESSING="
                f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']} puts vLLM's engine core in a process of its own, "
                "where the weight copy after each update cannot reach it (vLLM sends the call's arguments as "
                "msgpack, which turns tensors into lists); unset it or set it to 0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._vllm, self._tokens_prompt = _import_vllm()
        if tokenizer.eos_token_id is None:
            raise ValueError("VLLMRolloutEngine: the tokenizer has no eos token; generation could never stop")
        model_path = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not model_path:
            raise ValueError("VLLMRolloutEngine needs model_path: the HF directory or hub id vLLM loads from")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.max_prompt_tokens = max_prompt_tokens
        self.sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._source: torch.nn.Module = model  # the module the engine's weights were last copied from
        self._weights_dropped = False  # a level-2 sleep discarded them: copy them again before sampling
        self.sync_chunk_tensors = max(1, int(sync_chunk_tensors))
        self._by_reference = tensor_parallel_size == 1  # the worker runs in this process
        self._asleep: set[str] = set()
        launch = launch_kwargs(tensor_parallel_size, seed, *_process_group())
        self._generation_dir = tempfile.TemporaryDirectory(prefix="l2t_vllm_generation_")
        GenerationConfig(eos_token_id=self.eos).save_pretrained(self._generation_dir.name)
        if torch.cuda.is_available():  # vLLM sizes itself from the free memory: give back the trainer's cache
            torch.cuda.empty_cache()
        self.llm = self._vllm.LLM(
            model=str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, enforce_eager=enforce_eager,
            enable_sleep_mode=enable_sleep_mode, worker_extension_cls=EXTENSION,
            generation_config=self._generation_dir.name, **{**launch, **llm_kwargs},
        )
        self.sync_weights(model)  # sample from the trainer's weights, even if they differ from the disk's

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 limit_prompts: bool = True, max_batch_sequences: int | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        # max_batch_sequences is not used: vLLM schedules its own batches (continuous batching)
        check_prompts(prompts, self.max_prompt_tokens if limit_prompts else None, allow_empty=self.lockstep())
        limits = token_limits(max_new_tokens, prompts, params)
        greedy = params.greedy
        if not greedy:
            check_vllm_temperature(params.temperature, "SamplingParams.temperature")
        n = 1 if greedy else params.n
        sampling = [
            self._vllm.SamplingParams(
                n=n, temperature=0.0 if greedy else params.temperature, top_p=params.top_p, max_tokens=limits[i],
                seed=None if greedy else ((params.seed % 2**31) << 20) + i * n,
                stop_token_ids=[self.eos], ignore_eos=True, detokenize=False)
            for i in range(len(prompts))
        ]
        self._wake("weights")
        if self._weights_dropped:  # under ZeRO-3 a collective (it gathers): the trainer's ranks all
            self._load_weights(self._source)  # sample at the same points of a step, so all come here
        self._wake("kv_cache")
        outs = self.llm.generate([self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts], sampling,
                                 use_tqdm=False) if prompts else []
        self.sleep()
        if len(outs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        result = []
        for p, req in zip(prompts, outs):  # LLM.generate keeps the input order; checked below
            if list(req.prompt_token_ids) != list(p):
                raise RuntimeError("vLLM returned its outputs out of order")
            group = [self._completion(p, c) for c in sorted(req.outputs, key=lambda c: c.index)]
            if greedy:
                group = [Completion(list(p), list(group[0].response_ids), group[0].text, group[0].finished)
                         for _ in range(params.n)]
            result.append(group)
        return result

    def _completion(self, prompt: Sequence[int], out) -> Completion:
        """Finished when the sample ends in EOS (dropped), whatever ``finish_reason`` says: before
        vLLM 0.12 an EOS sampled as the last allowed token is reported as ``"length"``."""
        ids = list(out.token_ids)
        finished = bool(ids) and ids[-1] == self.eos
        if finished:
            ids.pop()
        else:
            finished = out.finish_reason == "stop"
        return Completion(list(prompt), ids, self.tokenizer.decode(ids, skip_special_tokens=True), finished)

    def lockstep(self) -> bool:
        """A level-2 sleep drops the weights, and :meth:`generate` copies them again from the
        trainer's module: under ZeRO-3 with several ranks that copy gathers (a collective)."""
        return self.sleep_mode and self.sleep_level == 2 and in_lockstep(self._source.parameters())

    def sync_weights(self, model: torch.nn.Module) -> None:
        self._wake("weights")
        self._load_weights(model)
        self._source = model
        if "kv_cache" not in self._asleep and self.llm.reset_prefix_cache() is False:  # asleep: dropped already
            raise RuntimeError("vLLM did not reset its prefix cache after the weight copy (requests still running?): "
                               "cached KV blocks of the old weights would be reused")

    @torch.no_grad()
    def _load_weights(self, model: torch.nn.Module) -> None:
        chunk: list[tuple[str, torch.Tensor]] = []
        for name, t in synced_tensors(model):  # whole tensors, also under ZeRO-3
            chunk.append((name, t if self._by_reference else t.to("cpu")))  # already detached
            if len(chunk) == self.sync_chunk_tensors:
                self.llm.collective_rpc("l2t_load_weights", args=(chunk,))
                chunk = []
        if chunk:
            self.llm.collective_rpc("l2t_load_weights", args=(chunk,))
        self._weights_dropped = False

    def sleep(self) -> None:
        """Free the KV cache and park the weights on CPU (level 1) or drop them (level 2); only
        with ``enable_sleep_mode``."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = set(_TAGS)
            self._weights_dropped = self.sleep_level == 2

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self._asleep]  # waking a tag that is awake would map it twice
        if todo:
            torch.cuda.empty_cache()  # the update's cached blocks, so vLLM can map its memory back
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()
            torch.cuda.empty_cache()
        if getattr(self, "_generation_dir", None) is not None:
            self._generation_dir.cleanup()
            self._generation_dir = None
