"""The ``vllm`` rollout engine: vLLM's offline ``LLM`` on a GPU (the ``gpu`` extra).

Targets vLLM >= 0.10 (the V1 engine) through its documented public API only:

* ``vllm.LLM(model=..., worker_extension_cls=...)`` builds the engine from the policy's HF
  directory (or hub id); ``LLM.generate`` takes ``TokensPrompt(prompt_token_ids=...)`` inputs and
  one ``vllm.SamplingParams(n=G, temperature, top_p, max_tokens, seed)`` per prompt, so every
  prompt's G samples are reproducible from ``SamplingParams.seed`` whatever the batch around it.
* Weight sync after each trainer update (:meth:`VLLMRolloutEngine.sync_weights`) goes through
  ``LLM.collective_rpc``, which calls a method of a *worker extension* on every worker; the
  extension (:class:`WeightSyncExtension`) hands the trainer's tensors to the model's own
  ``load_weights`` (the loader vLLM uses for checkpoints, which also handles fused QKV and
  gate/up projections and tensor-parallel sharding). Nothing is written to disk.
  With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set here unless the user set it) the engine core
  lives in the trainer's process and the tensors are passed by reference, not serialised.
* ``enable_sleep_mode`` lets the engine release its KV cache (``LLM.sleep(level=1)``) while the
  trainer runs on the same GPU, and take it back (``LLM.wake_up()``) before the next rollout.

Its integration test (``tests/test_rollout_vllm.py``) runs only where vLLM and a CUDA device are
present; here it is skipped.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

from .base import Completion, RolloutEngine, SamplingParams, check_prompts

EXTENSION_PATH = "l2t_core.rollout.vllm.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); ``self`` is the worker."""

    def l2t_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        device = next(self.model_runner.model.parameters()).device
        self.model_runner.model.load_weights(weights=((n, t.to(device)) for n, t in named_tensors))
        return len(named_tensors)


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the 'vllm' rollout engine needs vLLM: install the gpu extra (pip install -e \".[gpu]\") on a "
            "machine with an NVIDIA GPU, or use rollout.engine='hf'"
        ) from exc
    if not torch.cuda.is_available():
        raise RuntimeError("the 'vllm' rollout engine needs a CUDA device; use rollout.engine='hf' on CPU")
    return vllm


class VLLMRolloutEngine(RolloutEngine):
    name = "vllm"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_path: str,
        gpu_memory_utilization: float = 0.8,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_prompt_tokens: int | None = None,
        enforce_eager: bool = False,
        enable_sleep_mode: bool = False,
        sync_chunk_tensors: int = 64,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _require_vllm()
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.sleep_mode = enable_sleep_mode
        self.sync_chunk_tensors = max(1, sync_chunk_tensors)
        self.llm = vllm.LLM(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, enforce_eager=enforce_eager, enable_sleep_mode=enable_sleep_mode,
            worker_extension_cls=EXTENSION_PATH,
        )
        self._asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        import vllm
        from vllm.inputs import TokensPrompt

        check_prompts(prompts, self.max_prompt_tokens)
        self.wake_up()
        eos = self.tokenizer.eos_token_id
        sampling = [
            vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                max_tokens=params.max_new_tokens, seed=params.seed + i, skip_special_tokens=True)
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, use_tqdm=False)
        result: list[list[Completion]] = []
        for p, req in zip(prompts, outs):  # vLLM returns outputs in input order
            group = []
            for c in sorted(req.outputs, key=lambda o: o.index):
                ids = list(c.token_ids)
                if ids and ids[-1] == eos:
                    ids = ids[:-1]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(list(p), ids, text, finished=c.finish_reason == "stop"))
            result.append(group)
        return result

    def _named_chunks(self, model: torch.nn.Module) -> Iterable[list[tuple[str, torch.Tensor]]]:
        chunk: list[tuple[str, torch.Tensor]] = []
        for name, t in model.state_dict().items():
            chunk.append((name, t.detach()))
            if len(chunk) >= self.sync_chunk_tensors:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        self.wake_up()
        for chunk in self._named_chunks(model):
            self.llm.collective_rpc("l2t_load_weights", args=(chunk,))
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights

    def sleep(self) -> None:
        """Free the KV cache while the trainer uses the GPU (needs ``enable_sleep_mode``)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        del self.llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
