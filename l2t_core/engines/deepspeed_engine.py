"""The DeepSpeed training engine (ZeRO-2/3; the ``distributed`` extra).

Configs live in ``infra/deepspeed/`` (``zero2.json``, ``zero3_offload.json``); under bf16 they
accumulate and reduce gradients in fp32 (``data_types.grad_accum_dtype``, ``communication_data_type``:
DeepSpeed's default is the model's dtype, and bf16 sums of many micro-batches lose the small ones;
DeepSpeed accepts that mix with ZeRO 1-3, not without ZeRO). This engine owns the
parts the trainer's config decides, so one TrainConfig means the same thing on every engine:

* the optimizer is ``torch.optim.AdamW`` with ``OptimConfig``'s lr, betas, eps and weight decay,
  passed to ``deepspeed.initialize`` as the client optimizer (ZeRO partitions its state);
* the schedule is the same warm-up + cosine :func:`~l2t_core.engines.base.lr_lambda` (or the
  caller's ``lr_schedule``: ``l2t sft``'s), a client ``LambdaLR`` that DeepSpeed steps with the optimizer;
* ``gradient_clipping`` is ``OptimConfig.grad_clip``; ``bf16: "auto"`` becomes enabled only on a
  GPU that supports it (CPU runs are fp32).

Gradient accumulation: the trainer calls :meth:`backward` once per micro-batch with a loss that is
already its share of the batch loss, then :meth:`step` once. DeepSpeed's own accumulation is
therefore switched off (``gradient_accumulation_steps = 1`` and ``scale_wrt_gas=False``) and the
accumulation window is set explicitly with ``set_gradient_accumulation_boundary``: False for every
micro-batch but the last (``backward(loss, last=True)``), so gradients accumulate and the optimizer
steps once. (Without it each backward is a boundary and only the last micro-batch survives; the
test caught that.) DeepSpeed *averages* gradients over ranks, so each rank scales its loss by the world
size (the trainer does: ``share / global_denominator · world``); the averaged gradient then equals
the full batch's. ``tests/test_deepspeed.py`` checks exactly that against :class:`TorchEngine`.

Launch (N GPUs on one node; ``--hostfile`` for many)::

    deepspeed --num_gpus N --module l2t_core.cli train --config run.yaml \\
        --set engine=deepspeed --set deepspeed_config=infra/deepspeed/zero2.json
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from .base import TrainEngine, schedule_of

TAG = "engine"


def _require_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(
            "engine='deepspeed' needs DeepSpeed: install the distributed extra "
            "(DS_BUILD_OPS=0 pip install -e \".[distributed]\")"
        ) from exc
    return deepspeed


def load_ds_config(config_path: str | dict, optim_cfg, on_gpu: bool) -> dict:
    if isinstance(config_path, dict):
        cfg = json.loads(json.dumps(config_path))
    else:
        p = Path(config_path)
        if not p.is_file():
            raise FileNotFoundError(f"DeepSpeed config {config_path!r} not found (see infra/deepspeed/)")
        cfg = json.loads(p.read_text())
    cfg["gradient_accumulation_steps"] = 1
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    cfg.pop("train_batch_size", None)
    cfg["gradient_clipping"] = float(optim_cfg.grad_clip)
    cfg.pop("optimizer", None)  # the optimizer and schedule come from OptimConfig (client objects)
    cfg.pop("scheduler", None)
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    if bf16 == "auto":
        bf16 = on_gpu and torch.cuda.is_bf16_supported()
    # immediate_grad_update: DeepSpeed's BF16_Optimizer (bf16 with fp32 gradients without ZeRO-2/3)
    # otherwise adds each parameter's bf16 .grad into its fp32 gradient at the end of every backward
    # without clearing it, so with the accumulation window set here (several backward calls, one
    # step) the first micro-batches counted again and again (measured: norm 5.18 for 2.25)
    cfg["bf16"] = {"enabled": bool(bf16), "immediate_grad_update": True} if bf16 else {"enabled": False}
    if not on_gpu:
        cfg.pop("fp16", None)
        zero = cfg.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                zero[key]["pin_memory"] = False
    return cfg


def _skip_cpu_inference_kernel() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce kernel.

    DeepSpeed builds that C++ kernel (``deepspeed_shm_comm``, with a compiler, about 50 s on two
    cores) the first time a process group is made on a CPU machine, though only
    ``inference_all_reduce`` (tensor-parallel inference) uses it; training's collectives go through
    gloo either way. It is marked unavailable here, as DeepSpeed marks it on platforms without it,
    so that the first multi-rank CPU launch of a fresh machine does not wait for the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_minutes: float | None = None) -> tuple[int, int]:
    """Join the process group of a ``torchrun``/``deepspeed`` launch (nccl on GPU, gloo on CPU) and,
    on GPU, make this rank's ``LOCAL_RANK`` device the current one; returns (rank, world size).
    Call it before anything reads the rank or puts a model on a device: the trainer does, first.
    ``timeout_minutes``: how long a collective waits for every rank (None: DeepSpeed's default,
    ``DEEPSPEED_TIMEOUT`` or 10 minutes); it applies only where this call creates the group."""
    deepspeed = _require_deepspeed()
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    if on_gpu and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not on_gpu:
        _skip_cpu_inference_kernel()
    if not (dist.is_available() and dist.is_initialized()):
        kw = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **kw)
    return dist.get_rank(), dist.get_world_size()


class DeepSpeedEngine(TrainEngine):
    def __init__(self, model: torch.nn.Module, optim_cfg, total_steps: int, *, config_path: str | dict,
                 lr_schedule: Callable[[int], float] | None = None):
        deepspeed = _require_deepspeed()
        import torch.distributed as dist

        on_gpu = torch.cuda.is_available()
        init_distributed()
        self.cfg = optim_cfg
        ds_cfg = load_ds_config(config_path, optim_cfg, on_gpu)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                      weight_decay=optim_cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule or schedule_of(optim_cfg, total_steps))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
        self._ds_cfg = ds_cfg
        self.module = self.ds.module
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # ZeRO's optimizers and DeepSpeed's bf16/fp16 wrappers record the gradient norm of each
        # step; without ZeRO (stage 0, fp32) DeepSpeed steps the client optimizer as it is and
        # keeps no norm (``get_global_grad_norm`` is None), so this engine measures it itself. Which
        # of the two is known only after a step (BF16_Optimizer creates its norm inside step()):
        # the first step measures, and later ones only where DeepSpeed reported none
        self._measure_norm = True

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        # DeepSpeed's own forward() opens every micro-batch with this call, and ZeRO-3 counts its
        # micro-steps there (the first backward of a step copies its gradient partitions, the later
        # ones add to them). The trainer runs the module itself (decoder and head apart), so the
        # call is made here; without it ZeRO-3 kept only the last micro-batch's gradient.
        clear = getattr(self.ds.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        # documented override: every micro-batch but the last is inside an accumulation window
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> dict[str, float]:
        lr = float(self.ds.get_lr()[0])
        measured = None
        if self._measure_norm:
            # the last backward was the accumulation boundary: every rank holds the rank-averaged
            # gradient, which DeepSpeed clips inside step(); the norm before clipping is reported,
            # as TorchEngine and ZeRO report it
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            measured = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        self._measure_norm = norm is None
        if norm is None:
            norm = measured
        self.ds.zero_grad()
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}

    def save_state(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeedEngine: no engine state under {directory}/{TAG}")

    def unwrapped(self) -> torch.nn.Module:
        return self.ds.module

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """Under ZeRO-3 the reference is partitioned like the policy (a DeepSpeed engine with no
        optimizer, ZeRO-3's parameter partitioning only), so no rank holds a whole copy of it;
        otherwise it takes the policy's dtype (bf16 where DeepSpeed trains in bf16) and device, so
        the KL compares the two at the same precision and the copy costs half the memory. The
        trainer hands it over on the CPU, so it reaches the device only in that dtype, or partitioned."""
        if self.ds.zero_optimization_stage() == 3:
            deepspeed = _require_deepspeed()
            cfg = {k: v for k, v in self._ds_cfg.items() if k in ("bf16", "fp16", "train_micro_batch_size_per_gpu")}
            zero = {k: v for k, v in self._ds_cfg["zero_optimization"].items()
                    if k.startswith("stage3_param") or k in ("stage", "offload_param")}
            ref, *_ = deepspeed.initialize(model=reference, config={**cfg, "zero_optimization": zero,
                                                                   "gradient_accumulation_steps": 1})
            self._reference_engine = ref  # owns the hooks that gather the reference's partitions
            ref.module.eval()
            return ref.module
        param = next(self.ds.module.parameters())
        return reference.to(dtype=param.dtype).to(param.device)  # cast on the CPU, then moved
