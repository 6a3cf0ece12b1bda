"""Training engines behind one interface (:class:`TrainEngine`): plain ``torch`` and ``deepspeed``."""

from .base import TrainEngine, lr_lambda

__all__ = ["TrainEngine", "lr_lambda", "make_train_engine"]


def make_train_engine(name: str, model, optim_cfg, total_steps: int, **kwargs) -> TrainEngine:
    """``torch`` (single device, the default) or ``deepspeed`` (ZeRO-2/3; the ``distributed`` extra)."""
    if name == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(model, optim_cfg, total_steps, **kwargs)
    if name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, optim_cfg, total_steps, **kwargs)
    raise ValueError(f"unknown training engine {name!r}; choose 'torch' or 'deepspeed'")
