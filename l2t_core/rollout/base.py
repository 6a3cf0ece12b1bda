"""The rollout-engine interface: G sampled completions per prompt, and weight sync after updates.

Two engines implement it: :class:`~l2t_core.rollout.hf.HFRolloutEngine` (transformers
``generate``, batched with a KV cache; the CPU default) and
:class:`~l2t_core.rollout.vllm.VLLMRolloutEngine` (vLLM offline ``LLM``; GPU, optional extra).
The trainer only ever talks to :class:`RolloutEngine`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import torch


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily, in every engine: vLLM treats them so (its sampling
epsilon) and refuses ``n > 1`` for them, and dividing logits by them overflows."""

VLLM_MIN_TEMPERATURE = 0.01
"""The lowest temperature vLLM samples at: it raises any temperature in (0, 0.01) to 0.01
(``vllm.SamplingParams``), so the ``vllm`` engine refuses the range [:data:`GREEDY_BELOW`, 0.01)
rather than sample from another distribution than the one the trainer scores."""


def check_vllm_temperature(temperature: float, what: str) -> None:
    """Refuse a sampling temperature the ``vllm`` engine would silently change (:data:`VLLM_MIN_TEMPERATURE`)."""
    if GREEDY_BELOW <= temperature < VLLM_MIN_TEMPERATURE:
        raise ValueError(f"{what}={temperature:g} with the vllm engine: vLLM raises temperatures in (0, "
                         f"{VLLM_MIN_TEMPERATURE:g}) to {VLLM_MIN_TEMPERATURE:g}, so it would sample from another "
                         f"distribution than the one the trainer scores; use 0 (greedy) or >= "
                         f"{VLLM_MIN_TEMPERATURE:g}, or the hf engine")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled. A temperature below :data:`GREEDY_BELOW` (0 included) means
    greedy decoding (:attr:`greedy`)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """Decode greedily: the temperature is below :data:`GREEDY_BELOW`."""
        return self.temperature < GREEDY_BELOW

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled response. ``response_ids`` exclude the end-of-sequence token; ``finished`` says
    whether the model stopped by itself (EOS) rather than at ``max_new_tokens``."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool


class RolloutEngine(abc.ABC):
    """Samples ``params.n`` completions for every prompt (given as token ids)."""

    name: str = "base"

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 limit_prompts: bool = True, max_batch_sequences: int | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        """``result[i]`` holds the ``params.n`` completions of ``prompts[i]``, in a fixed order.
        ``limit_prompts=False`` lifts the engine's prompt length limit (for contexts that are a
        prompt plus part of its response, :meth:`continue_from`). ``max_batch_sequences`` caps the
        sequences of one batch for this call, for engines that batch by call (``hf``; None: the
        engine's own setting); engines that schedule their own batches (vLLM) ignore it.
        ``max_new_tokens``: one limit per prompt, each from 1 to ``params.max_new_tokens``, in place
        of ``params.max_new_tokens`` (:func:`token_limits`); a completion cut at its limit is not
        ``finished``."""

    def lockstep(self) -> bool:
        """Whether a :meth:`generate` call is a collective, which every rank must make with the
        others, in the same order, even with no prompts of its own (then it returns ``[]``): true
        where sampling runs forwards of a ZeRO-3 partitioned module or gathers its weights."""
        return False

    @abc.abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (called after each update)."""

    def continue_from(self, contexts: Sequence[Sequence[int]], params: SamplingParams, *,
                      max_batch_sequences: int | None = None,
                      max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        """:meth:`generate` from ``contexts`` that are a prompt plus part of its response (the
        sampled estimators of J, :func:`~l2t_core.rewards.fitting.monte_carlo_j`): the same
        sampling, without the prompt length limit, which is meant for prompts; ``max_new_tokens``
        per context (the response budget a prefix leaves) stops each continuation where it would
        be cut anyway."""
        return self.generate(contexts, params, limit_prompts=False, max_batch_sequences=max_batch_sequences,
                             max_new_tokens=max_new_tokens)

    def close(self) -> None:  # pragma: no cover - engines with resources override it
        """Release engine resources (GPU memory, worker processes)."""


def token_limits(limits: Sequence[int] | None, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[int]:
    """Each prompt's limit on new tokens: ``limits`` checked (one per prompt, 1..``params.max_new_tokens``)
    or ``params.max_new_tokens`` for all."""
    if limits is None:
        return [params.max_new_tokens] * len(prompts)
    limits = [int(x) for x in limits]
    if len(limits) != len(prompts):
        raise ValueError(f"rollout: {len(limits)} max_new_tokens limits for {len(prompts)} prompts")
    bad = [(i, x) for i, x in enumerate(limits) if not 1 <= x <= params.max_new_tokens]
    if bad:
        i, x = bad[0]
        raise ValueError(f"rollout: max_new_tokens[{i}] = {x} is outside 1..{params.max_new_tokens} "
                         "(SamplingParams.max_new_tokens)")
    return limits


def check_prompts(prompts: Sequence[Sequence[int]], max_prompt_tokens: int | None = None, *,
                  allow_empty: bool = False) -> None:
    """Fail before any compute on an empty batch, an empty prompt or one over the length limit.
    ``allow_empty``: an empty batch is a call to take part in (an engine in lockstep, where a rank
    with no prompts still runs the others' forwards: :meth:`RolloutEngine.lockstep`)."""
    if len(prompts) == 0 and not allow_empty:
        raise ValueError("rollout: no prompts to generate from")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"rollout: prompt {i} has no tokens")
        if max_prompt_tokens is not None and len(p) > max_prompt_tokens:
            raise ValueError(
                f"rollout: prompt {i} has {len(p)} tokens, over the limit of {max_prompt_tokens}; "
                "shorten it or raise rollout.max_prompt_tokens"
            )
