"""Whole parameters of a model whose parameters DeepSpeed ZeRO-3 partitions across ranks.

Under ZeRO-3 each rank holds a slice of every parameter; ``param.data`` is an empty placeholder
between forward passes. Whatever reads weights outside a forward pass must gather them first:
the compression penalty's SVD of the target layer (:class:`~l2t_core.rewards.compression.SVDProxy`),
the Hugging Face checkpoint the trainer writes, and the weights it copies into the vLLM engine.
Gathering is a collective, so every rank makes the same calls in the same order. Without ZeRO-3
(one process, ZeRO-1/2, or a parameter DeepSpeed keeps whole) these helpers read the tensors as
they are, with no DeepSpeed import.

The process group itself (reductions, gathers, agreement on failures): :mod:`l2t_core.engines.ranks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .ranks import collective_device, multi_rank_group


def is_partitioned(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether any of ``params`` is a ZeRO-3 partitioned parameter (DeepSpeed marks them ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in params)


def in_lockstep(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every rank must run each forward of the module owning ``params`` together with the
    others: ZeRO-3 gathers a partitioned module's parameters in every forward (a collective), so a
    rank running one forward more than the others waits for them forever."""
    return multi_rank_group() is not None and is_partitioned(params)


def lockstep_count(n: int, params: Iterable[torch.nn.Parameter]) -> int:
    """How many forwards (micro-batches, generate calls) this rank must run where it has ``n`` of
    its own: the most of any rank when the module is :func:`in_lockstep` (the extra ones are
    dummies whose results are dropped), else ``n``. A collective in that case: every rank calls it."""
    if not in_lockstep(params):
        return n
    dist = multi_rank_group()
    t = torch.tensor([n], dtype=torch.long, device=collective_device(dist))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def lockstep_batches(batches: list[list[int]], params: Iterable[torch.nn.Parameter]) -> list[tuple[list[int], bool]]:
    """``(batch, keep)`` for every micro-batch of ``batches`` (keep True), followed by as many
    dummies as the busiest rank has micro-batches more (:func:`lockstep_count`; keep False: run the
    forward, drop its results). A dummy is the first item of this rank's first micro-batch, so it
    takes the same code path as a real one at the cost of one sequence."""
    out = [(b, True) for b in batches]
    pad = lockstep_count(len(batches), params) - len(batches)
    if pad and not batches:
        raise ValueError("a rank has no sequences while the others run forwards of a ZeRO-3 partitioned model; "
                         "every rank needs at least one (shard prompts evenly: prompts_per_step a multiple of "
                         "the number of ranks)")
    return out + [(batches[0][:1], False)] * pad


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside, ``params`` hold their whole values on every rank (read-only: changes are not written
    back to the partitions); a no-op for parameters that are not partitioned."""
    params = list(params)
    if not is_partitioned(params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def full_named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of ``module.state_dict()``, whole, gathering one submodule's
    parameters at a time (so no rank ever holds the whole model twice). A partitioned parameter is
    yielded as a copy, valid after its gather ends; the others as the detached tensor itself.
    Under ZeRO-3 every rank must consume the whole iterator, in step with the others."""
    keys = set(module.state_dict().keys())  # persistent entries only, tied weights under each name
    for prefix, sub in module.named_modules(remove_duplicate=False):
        own = list(sub.named_parameters(recurse=False))
        copy = is_partitioned(p for _, p in own)
        with gathered(p for _, p in own):
            for name, t in own + list(sub.named_buffers(recurse=False)):
                full = f"{prefix}.{name}" if prefix else name
                if full in keys:
                    keys.discard(full)
                    yield full, (t.detach().clone() if copy else t.detach())


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """``module``'s whole state dict on the CPU (``keep``), or None after taking part in the
    gathers (``keep=False``: the other ranks under ZeRO-3, which must call it too)."""
    out = {}
    for name, t in full_named_tensors(module):
        if keep:
            out[name] = t.to("cpu", copy=True)
    return out if keep else None


def check_head_chunking(model: torch.nn.Module, head_chunk_tokens: int | None) -> None:
    """Refuse ``head_chunk_tokens`` where ZeRO-3 partitions the output head: the checkpointed head
    chunks are recomputed inside the backward, where DeepSpeed does not gather the head's weight
    (measured on two CPU ranks: torch's checkpoint finds an empty weight in the recomputation)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head_chunk_tokens and head is not None and is_partitioned(head.parameters()):
        raise ValueError(
            "head_chunk_tokens is not supported when DeepSpeed ZeRO-3 partitions the output head (its chunks are "
            "recomputed in the backward, where the head's weight is not gathered); unset head_chunk_tokens, or "
            "train with ZeRO-2 (infra/deepspeed/zero2.json)")


def weights_to_save(module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The ``state_dict`` to hand ``save_pretrained`` for ``module``: under ZeRO-3 its whole weights,
    gathered by every rank (a collective: every rank calls it) and kept where ``keep`` (the rank
    that writes); None where the weights are not partitioned (``save_pretrained`` reads the module)."""
    return full_state_dict(module, keep=keep) if is_partitioned(module.parameters()) else None
