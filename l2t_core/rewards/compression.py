"""Parameter-compression penalty P_k (METHOD.md §3; Eq. 3, second term; Thm 4.2).

θ is one weight matrix W, by default the MLP down-projection of the LAST transformer block. With
y = W·a, that layer is position-wise and sits after the last attention, so
∂ log π(z_t)/∂y_s = 0 for s ≠ t, and ONE backward pass of Σ_t log π(z_t), cut off below the layer,
yields every per-token signal δ_t = ∂ log π(z_t)/∂y_t exactly (:func:`per_token_signals`).

Low-rank proxy: W ≈ U Σ Vᵀ, top r directions. The episode score in the proxy space is
``g_k = Σ_{t∈k} (Uᵀ δ_t)(Vᵀ a_t)ᵀ`` (an r×r matrix), formed for all episodes at once by segment
sums of the projected T×r matrices (:func:`low_rank_episode_scores`). With Δθ̃_k = η g_k and the
Fisher F_k = g_k g_kᵀ + λI, the penalty is ``P_k = η² (‖g_k‖⁴ + λ ‖g_k‖²)`` (:func:`penalty`),
normalised so the batch's average response pays a total of 1 (:func:`normalise_penalties`).

:func:`exact_episode_penalties` is the all-parameter reference (tests and benchmarks only), and
``random_layers`` mode is the §5.3(iii) ablation: full, un-projected down-projection gradients on
a random 30 % of the blocks, each episode's own (:func:`per_episode_sqnorms`).

For a target in an earlier block, later attention mixes positions, so one backward pass cannot
tell the episodes' gradients apart (δ_t holds every later token's signal through position t):
:func:`per_episode_sqnorms` then runs one backward per episode, batched, and sums each episode's
gradient over every position (``CompressionConfig.attribution``, default ``per_episode``). The
default target needs only the one backward (:func:`attributed_by_position`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..engines.gather import gathered, lockstep_count
from ..logprobs import scored_logprobs
from ..models import decoder_and_head
from ..prefix_sharing import cache_kwarg
from ..timing import device_clock


# ----------------------------------------------------------------------------- targets
class TargetError(ValueError):
    """θ cannot be chosen as asked (METHOD.md §3): a target name the model lacks, a module that is not
    an nn.Linear, one outside the transformer blocks, or a model without the default's layout. The
    message names the target and what to name instead; ``l2t train`` prints it in one line."""


def _blocks(model) -> torch.nn.ModuleList:
    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise TargetError(f"{type(model).__name__}: no transformer blocks found under the decoder's .layers")
    return layers


def _last_block(model) -> torch.nn.Module:
    return _blocks(model)[-1]


def default_target(model) -> str:
    """Name of the last transformer block's MLP down-projection (METHOD.md §3 default θ)."""
    target = getattr(getattr(_last_block(model), "mlp", None), "down_proj", None)
    if not isinstance(target, torch.nn.Linear):
        raise TargetError(
            f"{type(model).__name__}: the last block has no mlp.down_proj Linear; "
            "name the compression targets explicitly (CompressionConfig.targets)"
        )
    return _name_of(model, target)


def random_layer_targets(model, frac: float = 0.3, seed: int = 0) -> list[str]:
    """Down-projections of a random ``frac`` of the blocks (at least one), for the §5.3(iii) ablation."""
    layers = list(_blocks(model))
    n = max(1, math.ceil(frac * len(layers)))
    chosen = sorted(random.Random(seed).sample(range(len(layers)), n))
    return [_name_of(model, layers[i].mlp.down_proj) for i in chosen]


def _name_of(model, module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise KeyError("module not found in model")


ALL_DOWN_PROJ = "model.layers.*.mlp.down_proj"  # every block's MLP down-projection (Qwen2/Llama naming)
LAST_BLOCK = "last_block"  # every nn.Linear of the last block that no attention follows (last_block_targets)


def last_block_targets(model) -> list[str]:
    """Names of every nn.Linear of the last block that no attention follows: its MLP's projections
    (gate, up, down) and its attention's output projection. Like the paper's θ (the down-projection
    alone) they are position-wise after the last attention, so ONE backward gives each episode's
    gradient exactly (:func:`attributed_by_position`); together they hold ~3× its parameters and
    rank episodes much closer to the all-parameter penalty (``bench.penalty_fidelity``). The
    target name :data:`LAST_BLOCK` in ``CompressionConfig.targets`` stands for this set."""
    block = _last_block(model)
    last = _name_of(model, block)
    names = [n for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)
             and attributed_by_position(model, [f"{last}.{n}"])]
    if not names:
        raise TargetError(f"{type(model).__name__}: the last block has no nn.Linear under .mlp or at "
                          "self_attn.o_proj; name the compression targets explicitly (CompressionConfig.targets)")
    return [f"{last}.{n}" for n in names]


def resolve_targets(model, names: Sequence[str] | None) -> dict[str, torch.nn.Linear]:
    """Map target names to their nn.Linear modules, in model order; None means the default target.

    A name with a glob character (``*``, ``?``, ``[``) is an ``fnmatch`` pattern over module names,
    e.g. :data:`ALL_DOWN_PROJ` (``model.layers.*.mlp.down_proj``: every block's down-projection);
    it must match at least one nn.Linear, and matches that are not nn.Linear are skipped.
    :data:`LAST_BLOCK` (``last_block``) stands for :func:`last_block_targets`, whatever the model's
    depth. Every target must lie inside the transformer blocks (``model.layers.*`` for Qwen2): the
    output head, which the reward pass applies to the scored positions only, is refused. Every refusal
    is a :class:`TargetError`.
    """
    names = list(names) if names else [default_target(model)]
    if LAST_BLOCK in names:
        names = [n for n in names if n != LAST_BLOCK] + last_block_targets(model)
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for n in names:
        if any(c in n for c in "*?["):
            hits = [m for m, mod in modules.items() if fnmatch.fnmatchcase(m, n) and isinstance(mod, torch.nn.Linear)]
            if not hits:
                raise TargetError(f"compression target pattern {n!r} matches no nn.Linear of the model; "
                                  f"for example {default_target(model)!r} is one")
            chosen.update(hits)
            continue
        mod = modules.get(n)
        if mod is None:
            close = [m for m in modules if m.endswith(n.split(".")[-1])][:5]
            raise TargetError(f"compression target {n!r} is not a module of the model; similar names: {close}")
        if not isinstance(mod, torch.nn.Linear):
            raise TargetError(f"compression target {n!r} is a {type(mod).__name__}, not an nn.Linear")
        chosen.add(n)
    blocks = _name_of(model, _blocks(model))
    outside = sorted(n for n in chosen if not n.startswith(f"{blocks}."))
    if outside:
        raise TargetError(f"compression targets {outside} are outside the transformer blocks ({blocks}.*): the "
                          "penalty's per-token signals are read inside the decoder's forward, and the output head "
                          f"sees only the scored positions; name Linears of the blocks, e.g. {LAST_BLOCK!r} or "
                          f"'{blocks}.*.mlp.down_proj'")
    return {m: modules[m] for m in modules if m in chosen}


# ----------------------------------------------------------------------------- low-rank basis
def proxy_rank(d_out: int, d_in: int, rank_frac: float = 0.05, rank: int | None = None) -> int:
    """r = ceil(rank_frac · min(d_out, d_in)) unless ``rank`` is given (METHOD.md §3)."""
    if rank is not None:
        return int(rank)
    return max(1, math.ceil(rank_frac * min(d_out, d_in)))


@dataclass(frozen=True)
class LowRankBasis:
    """Top singular directions of one weight W [d_out, d_in]: U [d_out, r_out], V [d_in, r_in].

    r_out = min(r, d_out) and r_in = min(r, d_in); with r ≥ max(d_out, d_in) both are complete
    orthonormal bases and the proxy norm equals the un-projected norm exactly.
    """

    U: torch.Tensor
    V: torch.Tensor


def low_rank_basis(
    weight: torch.Tensor, r: int, method: str = "exact", oversample: int = 8, seed: int = 0
) -> LowRankBasis:
    """Truncated SVD of ``weight`` (exact, or randomized via ``torch.svd_lowrank``)."""
    w = weight.detach().float()
    d_out, d_in = w.shape
    r_out, r_in = min(r, d_out), min(r, d_in)
    full = r >= min(d_out, d_in)
    if method == "randomized" and not full:
        # a private RNG stream: the global CPU and CUDA generators are left as they were
        with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            torch.manual_seed(seed)
            U, _, V = torch.svd_lowrank(w, q=min(r + oversample, min(d_out, d_in)), niter=4)
        return LowRankBasis(U[:, :r_out].contiguous(), V[:, :r_in].contiguous())
    if method not in ("exact", "randomized"):
        raise ValueError(f"low_rank_basis: svd method must be 'exact' or 'randomized', got {method!r}")
    U, _, Vh = torch.linalg.svd(w, full_matrices=r > min(d_out, d_in))
    return LowRankBasis(U[:, :r_out].contiguous(), Vh.T[:, :r_in].contiguous())


class SVDProxy:
    """Low-rank bases for every target, refreshed every ``refresh_steps`` optimizer steps."""

    def __init__(self, rank_frac=0.05, rank=None, method="exact", oversample=8, refresh_steps=1, seed=0):
        self.rank_frac, self.rank, self.method = rank_frac, rank, method
        self.oversample, self.refresh_steps, self.seed = oversample, refresh_steps, seed
        self.bases: dict[str, LowRankBasis] = {}
        self._last_refresh: int | None = None

    def refresh(self, modules: dict[str, torch.nn.Linear], step: int = 0, force: bool = False) -> bool:
        due = self._last_refresh is None or step - self._last_refresh >= self.refresh_steps
        if not (due or force or set(modules) != set(self.bases)):
            return False
        for name, mod in modules.items():
            with gathered([mod.weight]):  # whole on every rank under ZeRO-3 (the same SVD everywhere)
                d_out, d_in = mod.weight.shape
                r = proxy_rank(d_out, d_in, self.rank_frac, self.rank)
                self.bases[name] = low_rank_basis(mod.weight, r, self.method, self.oversample, self.seed + step)
        self._last_refresh = step
        return True


# ----------------------------------------------------------------------------- per-token signals
@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Temporarily stop every parameter from requiring grad, so a backward pass builds no graph
    below the first hooked layer (the "truncated" backward of METHOD.md §3)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class TokenSignals:
    """Per scored token (flattened in (row, position) order): the layer input a_t, the signal
    δ_t = ∂ log π(z_t)/∂y_t for every target, and log π(z_t) itself."""

    inputs: dict[str, torch.Tensor]  # name -> [N, d_in]
    deltas: dict[str, torch.Tensor]  # name -> [N, d_out]
    logprobs: torch.Tensor  # [N]
    rows: torch.Tensor  # [N] batch row of each token
    hidden: torch.Tensor | None = None  # [B, L, H] final hidden states (detached), when asked for
    backward_s: float = 0.0  # seconds spent in the truncated backward pass


def _check_layout(caller: str, input_ids, attention_mask, score_mask, cache=None) -> None:
    n_past = cache.get_seq_length() if cache is not None else 0
    length = input_ids.shape[1]
    if input_ids.shape != score_mask.shape or attention_mask.shape[0] != input_ids.shape[0] or (
        attention_mask.dim() == 2 and (attention_mask.shape != input_ids.shape or cache is not None)
    ) or (attention_mask.dim() == 4 and attention_mask.shape[-2:] != (length, n_past + length)) or (
        attention_mask.dim() not in (2, 4)
    ):
        raise ValueError(
            f"{caller}: input_ids {tuple(input_ids.shape)}, attention_mask "
            f"{tuple(attention_mask.shape)} and score_mask {tuple(score_mask.shape)} must agree: "
            "masks [B, L] or an additive attention mask [B, 1, L, L] ([B, 1, L, P + L] after a "
            f"cache of P positions; this cache holds {n_past})"
        )
    if score_mask[:, 0].any():
        raise ValueError(f"{caller}: the first position cannot be scored (it has no context)")


@contextlib.contextmanager
def _hooked_forward(caller, model, input_ids, attention_mask, score_mask, targets, position_ids,
                    head_chunk_tokens, cache=None):
    """The forward both backward variants share: parameters frozen, a zero leaf added to each
    target's output (the backward stops at the lowest target), the layer inputs kept. Yields
    (inputs {name: [B, L, d_in]}, leaves {name: [B, L, d_out]}, log π(z_t) of the scored tokens
    [N] in (row, position) order, final hidden states [B, L, H])."""
    _check_layout(caller, input_ids, attention_mask, score_mask, cache)
    decoder, head = decoder_and_head(model)
    captured_in: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args, output):
            captured_in[name] = args[0].detach()
            leaf = torch.zeros_like(output, requires_grad=True)
            leaves[name] = leaf
            return output + leaf

        return hook

    handles = [mod.register_forward_hook(make_hook(n)) for n, mod in targets.items()]
    pred = score_mask[:, 1:]  # prediction positions p-1 for scored tokens p
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if cache is not None:  # the shared prompts' keys and values (l2t_core.prefix_sharing)
        extra[cache_kwarg(decoder)] = cache
    try:
        with frozen_parameters(model), torch.enable_grad():
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
            ).last_hidden_state
            lp = scored_logprobs(head, hidden[:, :-1][pred], input_ids[:, 1:][pred], 1.0, head_chunk_tokens)
            if not torch.isfinite(lp).all():
                raise FloatingPointError(
                    f"{caller}: non-finite token log-probabilities; the model's logits overflowed"
                )
            for hd in handles:
                hd.remove()
            handles = []
            yield captured_in, leaves, lp, hidden
    finally:
        for hd in handles:
            hd.remove()


def per_token_signals(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    targets: dict[str, torch.nn.Linear],
    *,
    position_ids: torch.Tensor | None = None,
    return_hidden: bool = False,
    head_chunk_tokens: int | None = None,
    cache=None,
) -> TokenSignals:
    """One forward and ONE backward of Σ_t log π(z_t) over the scored tokens (METHOD.md §3).

    ``score_mask[b, p]`` marks the tokens z_t whose log-probability is scored (response tokens);
    token p is predicted at position p−1, so its a_t and δ_t are read at p−1. Parameters are frozen
    and a zero leaf is added to each target's output, so the backward stops at the lowest target.

    ``attention_mask`` is a [B, L] padding mask, or an additive [B, 1, L, L] mask with
    ``position_ids`` (the packed J layout of :mod:`.fitting`, whose response positions see exactly
    the causal prefix, so their signals equal those of a plain forward), [B, 1, L, P + L] after a
    ``cache`` of the rows' shared prompts (:mod:`l2t_core.prefix_sharing`): the signals are read at
    the scored positions only, none of which is cached, so they equal the unshared forward's for
    any target (the cached prompt positions carry no leaf; :func:`per_episode_sqnorms`, which
    needs them, never runs after a cache). ``return_hidden`` keeps
    the final hidden states, so the same forward also serves J. ``head_chunk_tokens``: the output
    head's logits a chunk of tokens at a time (:func:`~l2t_core.logprobs.scored_logprobs`).

    The signals are exact for targets that no attention follows (:func:`attributed_by_position`);
    for any other, δ_t holds every later token's signal through position t, and
    :func:`per_episode_sqnorms` gives the episodes' gradients exactly.
    """
    with _hooked_forward("per_token_signals", model, input_ids, attention_mask, score_mask, targets,
                         position_ids, head_chunk_tokens, cache) as (captured_in, leaves, lp, hidden):
        t0 = device_clock(lp.device)
        grads = torch.autograd.grad(lp.sum(), [leaves[n] for n in targets], allow_unused=True)
        backward_s = device_clock(lp.device) - t0
    pred = score_mask[:, 1:]
    deltas, inputs = {}, {}
    for n, g in zip(targets, grads):
        g = torch.zeros_like(leaves[n]) if g is None else g
        deltas[n] = g[:, :-1][pred].detach().float()
        inputs[n] = captured_in[n][:, :-1][pred].float()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(pred)[pred]
    return TokenSignals(inputs, deltas, lp.detach(), rows, hidden.detach() if return_hidden else None, backward_s)


def attributed_by_position(model, names: Sequence[str]) -> bool:
    """Whether ONE backward pass gives every target's per-token signal exactly: each target lies
    in the last block after its attention (a Linear of the MLP, or the attention's output
    projection), so nothing mixes positions between it and the logits and ∂ log π(z_t)/∂y_s = 0
    for s ≠ t (METHOD.md §3). For a target in an earlier block a later attention carries y_s into
    every later token's log-probability, and the episodes' gradients need one backward each
    (:func:`per_episode_sqnorms`)."""
    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        return False
    last = _name_of(model, layers[-1])
    return all(n.startswith(f"{last}.mlp.") or n == f"{last}.self_attn.o_proj" for n in names)


@dataclass
class EpisodeSignals:
    """:func:`per_episode_sqnorms`' result: ‖g_k‖² per row and episode, and, as in
    :class:`TokenSignals`, log π(z_t) of the scored tokens from the same forward."""

    sqnorms: torch.Tensor  # [B, K_max] float64, summed over the targets; 0 past a row's episodes
    logprobs: torch.Tensor  # [N]
    hidden: torch.Tensor | None = None  # [B, L, H] final hidden states (detached), when asked for
    backward_s: float = 0.0  # seconds of the backward passes and the reduction


def per_episode_sqnorms(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    episode_ids: torch.Tensor,
    targets: dict[str, torch.nn.Linear],
    *,
    proxy: SVDProxy | None = None,
    position_ids: torch.Tensor | None = None,
    return_hidden: bool = False,
    head_chunk_tokens: int | None = None,
    max_chunk_elements: int = 1 << 26,
) -> EpisodeSignals:
    """‖G_k‖² with G_k = ∇_W Σ_{t∈k} log π(z_t), each episode's own gradient, for any targets
    (METHOD.md §3: "full per-episode gradients"; the random-layers ablation's blocks): one forward,
    then one backward per episode.

    ``episode_ids[b, p]`` is the episode (0-based within row b) of scored token p, −1 elsewhere.
    Slot k of a backward holds the k-th episode of every row at once (rows do not see each other),
    and the slots go through batched backwards (``is_grads_batched``, at most
    ``max_chunk_elements`` signal entries at a time). G_k = Σ_p δ_p^(k) a_pᵀ over EVERY position p
    of the row up to its last scored prediction, the prompt's included: through attention an
    episode's tokens depend on W at every earlier position. In the rank-r proxy of ``proxy`` when
    given (g_k = Uᵀ G_k V), else un-projected. Other arguments as in :func:`per_token_signals`;
    for targets that :func:`attributed_by_position` the result equals its segment sums, at K
    backwards instead of one.
    """
    if episode_ids.shape != input_ids.shape:
        raise ValueError(f"per_episode_sqnorms: episode_ids {tuple(episode_ids.shape)} must have the shape of "
                         f"input_ids {tuple(input_ids.shape)}")
    if ((episode_ids >= 0) != score_mask).any():
        raise ValueError("per_episode_sqnorms: episode_ids must be >= 0 exactly at the scored tokens")
    n_rows, length = input_ids.shape
    with _hooked_forward("per_episode_sqnorms", model, input_ids, attention_mask, score_mask, targets,
                         position_ids, head_chunk_tokens) as (captured_in, leaves, lp, hidden):
        t0 = device_clock(lp.device)
        ep = episode_ids.to(lp.device)[score_mask]  # [N], the order of lp
        k_max = int(ep.max()) + 1 if ep.numel() else 0
        sq = torch.zeros(n_rows, k_max, dtype=torch.float64, device=lp.device)
        # positions that can carry an episode's gradient: up to each row's last prediction position
        pos = torch.arange(length, device=lp.device)
        last = torch.where(score_mask.to(lp.device), pos, -1).amax(dim=1)  # last scored token (-1: none)
        live = (pos[None, :] < last[:, None])[..., None]  # [B, L, 1]
        names = list(targets)
        widest = max(max(leaves[n].shape[-1] * n_rows * length, targets[n].weight.numel()) for n in names)
        chunk = max(1, max_chunk_elements // max(1, widest))
        starts = list(range(0, k_max, chunk))
        # under ZeRO-3 a backward gathers the partitioned weights (a collective): every rank runs as
        # many as the busiest one, the extra ones with no episode and their results dropped
        for call in range(lockstep_count(len(starts), model.parameters())):
            if call >= len(starts):  # a dummy: no episode, results dropped
                torch.autograd.grad(lp, [leaves[n] for n in names], grad_outputs=torch.zeros_like(lp)[None],
                                    is_grads_batched=True, retain_graph=True, allow_unused=True)
                continue
            start = starts[call]
            slots = torch.arange(start, min(k_max, start + chunk), device=lp.device)
            cotangents = (ep[None, :] == slots[:, None]).to(lp.dtype)  # [k, N]: slot k's tokens
            grads = torch.autograd.grad(lp, [leaves[n] for n in names], grad_outputs=cotangents,
                                        is_grads_batched=True, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                d = torch.where(live, g.float(), 0.0)  # [k, B, L, d_out]
                a = torch.where(live, captured_in[n].float(), 0.0)  # [B, L, d_in]
                if proxy is not None:
                    basis = proxy.bases[n]
                    g_k = torch.einsum("kblo,bli->kboi", d @ basis.U.to(d), a @ basis.V.to(a))
                    sq[:, start: start + len(slots)] += g_k.double().pow(2).sum(dim=(2, 3)).T
                else:
                    for b in range(n_rows):
                        g_k = torch.einsum("klo,li->koi", d[:, b], a[b])  # [k, d_out, d_in]
                        sq[b, start: start + len(slots)] += g_k.double().pow(2).sum(dim=(1, 2))
        backward_s = device_clock(lp.device) - t0
    return EpisodeSignals(sq, lp.detach(), hidden.detach() if return_hidden else None, backward_s)


# ----------------------------------------------------------------------------- episode scores
def low_rank_episode_scores(
    inputs: torch.Tensor,
    deltas: torch.Tensor,
    basis: LowRankBasis,
    seg_ids: torch.Tensor,
    num_segments: int,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """g_k = Σ_{t∈k} (Uᵀ δ_t)(Vᵀ a_t)ᵀ for all segments at once: [S, r_out, r_in] (METHOD.md §3).

    Per-token projected outer products are added into their segment with ``index_add_``, in chunks
    of tokens so that at most ``max_chunk_elements`` outer-product entries exist at a time: memory
    is O(S·r_out·r_in + chunk), never O(S·r·N). Tokens with a negative segment id are skipped.
    """
    D = deltas @ basis.U.to(deltas)  # [N, r_out]
    B = inputs @ basis.V.to(inputs)  # [N, r_in]
    r_out, r_in = D.shape[1], B.shape[1]
    out = torch.zeros(num_segments, r_out, r_in, dtype=D.dtype, device=D.device)
    keep = seg_ids >= 0
    D, B, seg = D[keep], B[keep], seg_ids[keep]
    chunk = max(1, max_chunk_elements // max(1, r_out * r_in))
    for start in range(0, D.shape[0], chunk):
        d, b = D[start: start + chunk], B[start: start + chunk]
        out.index_add_(0, seg[start: start + chunk], d.unsqueeze(2) * b.unsqueeze(1))
    return out


def full_episode_sqnorms(
    inputs: torch.Tensor, deltas: torch.Tensor, seg_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """‖Σ_{t∈k} δ_t a_tᵀ‖_F² per segment without forming the d_out×d_in gradient:
    Σ_{t,s∈k} (δ_t·δ_s)(a_t·a_s), one Gram block per segment (random_layers ablation)."""
    out = torch.zeros(num_segments, dtype=torch.float64, device=inputs.device)
    order = torch.argsort(seg_ids, stable=True)
    sid = seg_ids[order]
    keep = sid >= 0
    order, sid = order[keep], sid[keep]
    if order.numel() == 0:
        return out
    uniq, counts = torch.unique_consecutive(sid, return_counts=True)
    for s, idx in zip(uniq.tolist(), torch.split(order, counts.tolist())):
        d, a = deltas[idx].double(), inputs[idx].double()
        if idx.numel() > min(d.shape[1], a.shape[1]):
            out[s] = (d.T @ a).pow(2).sum()
        else:
            out[s] = ((d @ d.T) * (a @ a.T)).sum()
    return out


def episode_sqnorms(signals: TokenSignals, seg_ids: torch.Tensor, num_segments: int,
                    proxy: SVDProxy | None = None) -> torch.Tensor:
    """‖g_k‖² per segment summed over every target of ``signals`` (float64): in the rank-r proxy
    of ``proxy`` (:func:`low_rank_episode_scores`) when given, else un-projected
    (:func:`full_episode_sqnorms`; full_layer mode and the random_layers ablation)."""
    total = torch.zeros(num_segments, dtype=torch.float64, device=seg_ids.device)
    for name, a in signals.inputs.items():
        d = signals.deltas[name]
        if proxy is not None:
            total += low_rank_episode_scores(a, d, proxy.bases[name], seg_ids, num_segments).double().pow(2).sum(dim=(1, 2))
        else:
            total += full_episode_sqnorms(a, d, seg_ids, num_segments)
    return total


def penalty(sqnorm: torch.Tensor, adapt_lr: float = 1.0, damping: float = 1e-5) -> torch.Tensor:
    """P_k = Δθ̃_kᵀ F_k Δθ̃_k with Δθ̃_k = η g_k and F_k = g_k g_kᵀ + λI, i.e.
    η² (‖g_k‖⁴ + λ ‖g_k‖²), from ‖g_k‖² (Thm 4.2, METHOD.md §3)."""
    sq = sqnorm.double()
    return (adapt_lr**2) * (sq * sq + damping * sq)


def _group_means(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """For each element, the mean of ``values`` over the elements with the same group id."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    count = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inv, torch.ones_like(values))
    return (torch.zeros(n_groups, dtype=values.dtype).index_add_(0, inv, values) / count)[inv]


def normalise_penalties(
    penalties: torch.Tensor, response_of: torch.Tensor, num_responses: int, mode: str = "batch_response_mean",
    all_sum: Callable[[list[float]], list[float]] | None = None, group_of_response: torch.Tensor | None = None,
) -> torch.Tensor:
    """P̂_k = P_k / mean over responses of Σ_k P_k (METHOD.md §3, Decision: scale).

    The batch's average response then pays a total penalty of 1. A batch whose penalties are all
    zero stays zero. ``mode='none'`` returns P_k unchanged. ``all_sum`` (a multi-rank step: each
    rank holds a share of the batch) sums [penalty total, responses] over the ranks, so the mean is
    the whole step's and P̂ does not depend on how many ranks share the batch.

    ``mode='group_response_mean'`` (this project's option, §10 "normalise the penalty per group")
    takes the mean over the responses of each response's own group (``group_of_response``, [N]), so
    the average response of EVERY group pays 1; a group whose penalties are all zero stays zero.
    Groups never straddle ranks (each rank takes whole prompts), so this mode needs no ``all_sum``.
    """
    if mode == "none":
        return penalties
    if mode not in ("batch_response_mean", "group_response_mean"):
        raise ValueError(f"penalty_norm must be 'batch_response_mean', 'group_response_mean' or 'none', got {mode!r}")
    if num_responses == 0:
        return penalties
    totals = torch.zeros(num_responses, dtype=penalties.dtype).index_add_(0, response_of, penalties)
    if mode == "group_response_mean":
        if group_of_response is None or group_of_response.numel() != num_responses:
            raise ValueError("penalty_norm='group_response_mean' needs the group id of each of the "
                             f"{num_responses} responses")
        scale = _group_means(totals, group_of_response)
        if not torch.isfinite(scale).all():
            raise FloatingPointError("normalise_penalties: a group's penalty total is not finite")
        per_ep = scale[response_of]
        return torch.where(per_ep > 0, penalties / torch.where(per_ep > 0, per_ep, 1.0), torch.zeros_like(penalties))
    scale = totals.mean()
    if all_sum is not None:
        total, count = all_sum([float(totals.sum()), float(num_responses)])
        scale = torch.tensor(total / count, dtype=penalties.dtype)
    if not torch.isfinite(scale):
        raise FloatingPointError(f"normalise_penalties: the batch penalty total is {scale.item()}")
    return penalties / scale if scale > 0 else torch.zeros_like(penalties)


def clip_penalties(
    penalties_hat: torch.Tensor, response_of: torch.Tensor, group_of_response: torch.Tensor, clip: float
) -> torch.Tensor:
    """P̂_k ← min(P̂_k, c · mean of P̂ over all episodes of the response's group) (this project's
    ``penalty_clip`` option, METHOD.md §10 "clipping the penalty per group"; not the paper's).

    ``penalties_hat`` [E] are the normalised episode penalties, ``response_of`` [E] the response of
    each episode, ``group_of_response`` [N] the group of each response. The clip is monotone (the
    order of episodes within a group is kept, ties aside) and leaves a group whose penalties are all
    zero at zero. Groups never straddle ranks, so no cross-rank reduction is needed.
    """
    if not clip > 0:
        raise ValueError(f"penalty_clip must be > 0 (a multiple of the group's mean episode penalty), got {clip}")
    if penalties_hat.numel() == 0:
        return penalties_hat
    if response_of.numel() != penalties_hat.numel():
        raise ValueError(f"clip_penalties: {penalties_hat.numel()} penalties but {response_of.numel()} response ids")
    mean = _group_means(penalties_hat, group_of_response[response_of])
    if not torch.isfinite(mean).all():
        raise FloatingPointError("clip_penalties: a group's mean episode penalty is not finite")
    return torch.minimum(penalties_hat, clip * mean)


# ----------------------------------------------------------------------------- exact reference
def exact_episode_penalties(
    model,
    input_ids: torch.Tensor,
    score_mask: torch.Tensor,
    token_episode: torch.Tensor,
    num_episodes: int,
    adapt_lr: float = 1.0,
    damping: float = 1e-5,
    params: Sequence[torch.nn.Parameter] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-parameter reference for ONE sequence: per-episode gradients of Σ_{t∈k} log π(z_t) with
    respect to every parameter (one backward per episode), then η²(‖g‖⁴ + λ‖g‖²).

    ``input_ids``/``score_mask`` are [L]; ``token_episode[p]`` is the episode of scored token p.
    Returns (penalties [K], squared gradient norms [K]). For tests and benchmarks only.
    """
    params = list(params) if params is not None else [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids[None], use_cache=False).logits[0, :-1].float()
            lp_all = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[1:, None]).squeeze(-1)
            pred = score_mask[1:]
            ep = token_episode[1:]
            sq = torch.zeros(num_episodes, dtype=torch.float64)
            for k in range(num_episodes):
                sel = pred & (ep == k)
                if not sel.any():
                    continue
                grads = torch.autograd.grad(lp_all[sel].sum(), params, retain_graph=True, allow_unused=True)
                # summed on the device: one host sync per episode, not one per parameter
                sq[k] = float(torch.stack([g.double().pow(2).sum() for g in grads if g is not None]).sum())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return penalty(sq, adapt_lr, damping), sq
