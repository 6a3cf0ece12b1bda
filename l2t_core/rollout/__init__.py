"""Rollout engines behind one interface (:class:`RolloutEngine`): ``hf`` and ``vllm``."""

from .base import Completion, RolloutEngine, SamplingParams, check_prompts

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "check_prompts", "load_engine", "make_rollout_engine"]


def make_rollout_engine(name: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """``hf`` (transformers, any device) or ``vllm`` (needs the ``gpu`` extra and a GPU)."""
    if name == "hf":
        from .hf import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        from .vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; choose 'hf' or 'vllm'")


def load_engine(name: str, model_dir, device: str = "cpu", **vllm_kwargs) -> tuple[RolloutEngine, object]:
    """(engine, tokenizer) sampling the saved model in ``model_dir`` on its own (evaluation, no
    trainer beside it). ``hf`` runs the model on ``device``. ``vllm`` loads its own copy from
    ``model_dir`` (with ``vllm_kwargs``, e.g. ``gpu_memory_utilization``) and has the GPU to
    itself: the transformers copy it syncs from once stays on the CPU."""
    from ..models import load_policy

    vllm = name == "vllm"
    model, tok = load_policy(model_dir, device="cpu" if vllm else device)
    kwargs = {"model_path": str(model_dir), **vllm_kwargs} if vllm else {}
    return make_rollout_engine(name, model, tok, **kwargs), tok
