"""Rollout engines behind one interface (:class:`RolloutEngine`): ``hf`` and ``vllm``."""

from .base import Completion, RolloutEngine, SamplingParams, check_prompts

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "check_prompts", "make_rollout_engine"]


def make_rollout_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """``hf`` (transformers, any device) or ``vllm`` (needs the ``gpu`` extra and a GPU)."""
    if name == "hf":
        from .hf import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        from .vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; choose 'hf' or 'vllm'")
