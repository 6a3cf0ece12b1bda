"""The RL fine-tuning loop (METHOD.md §4–§5, §9): one :class:`Trainer` per :class:`TrainConfig`.

Each step:

1. takes the step's prompts (a seeded permutation per epoch, so step ``s`` always sees the same
   prompts, which is what makes a resumed run equal an uninterrupted one);
2. samples G rollouts per prompt through the rollout engine (``hf`` or ``vllm``);
3. segments, verifies and scores them with :func:`~l2t_core.rewards.l2t.compute_rewards` under the
   run's method (which also yields log π_old per token);
4. computes log π_ref with the frozen reference policy;
5. takes ``mini_batches`` clipped policy-gradient steps with the k3 KL (:func:`~l2t_core.losses.
   policy_loss`), accumulating gradients over micro-batches of at most ``micro_batch_tokens``
   tokens, so a batch of 256 fits in small memory;
6. logs metrics (with each phase's time and peak memory, :mod:`~l2t_core.memory`) and rollouts,
   and checkpoints atomically every ``checkpoint_every`` steps.

Under DeepSpeed each rank takes its share of the step's prompts; losses are scaled by the global
token (or sequence) count so the averaged gradient equals the full batch's. Sums and maxima over
ranks run on the rank's GPU under NCCL and on the CPU under gloo (:func:`collective_device`); a run
resumes only on the number of ranks it was saved with.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .checkpoint import RunStorage, checkpoint_name
from .config import TrainConfig, config_differences, setting_differences
from .engines import make_train_engine
from .engines.gather import check_head_chunking, is_partitioned, lockstep_batches
from .engines.ranks import all_reduce_list, initialized_group, on_rank_0
from .logprobs import logprob_temperature, response_mask, token_logprobs
from .losses import policy_loss
from .metrics import MetricsWriter, read_table
from .memory import PeakMemory
from .models import (activation_checkpointing, check_activation_checkpointing, is_checkpointing, load_policy,
                     ranks_model_source, resolve_device)
from .prefix_sharing import continuation_logprobs
from .verify_pool import VerifierPool
from .prompts import FORCE_ANSWER_SUFFIX, encode_prompt
from .rewards.compression import LowRankBasis, SVDProxy
from .rewards.fitting import microbatches
from .rewards.l2t import RewardBatch, Rollout, compute_rewards, has_penalty, longest_sampled_sequence, penalty_targets
from .rollout import SamplingParams, make_rollout_engine
from .run_lease import RunLease
from .sharded_checkpoint import host_local_copy, save_sharded
from .timing import device_clock
from .urls import redact_url
from .training_data import TrainingDataError, TrainProblem, load_training_problems, verifier_for

log = logging.getLogger("l2t.trainer")


class ResumeError(ValueError):
    """``out`` holds a run this launch cannot continue (another configuration, another number of
    ranks); raised before any compute, and ``l2t train`` prints it as one line."""

CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.pt"
# settings a run may resume under changed: where it lives and how often it is saved (a resumed run
# ends as an uninterrupted one whatever its checkpoint steps)
RESUME_FREE = ("out", "checkpoint_every", "keep_checkpoints", "dist_timeout_minutes", "verify_workers")
TIMING_COLUMNS = ("step_time_s", "rollout_time_s", "reward_time_s", "ref_time_s", "update_time_s")
# peak memory of each phase (l2t_core.memory; the highest over the ranks): like the timings, a
# property of the machine, not of the run
MEMORY_COLUMNS = ("rollout_peak_gib", "reward_peak_gib", "ref_peak_gib", "update_peak_gib")
MEASURED_COLUMNS = TIMING_COLUMNS + MEMORY_COLUMNS


def run_dependent(column: str) -> bool:
    """Whether a metrics column differs between two runs of one configuration whatever they
    compute: the run's id, each phase's time and peak memory, the reward's own phase timings
    (``reward_*_s``). Comparing a resumed run with an uninterrupted one leaves these out."""
    return column == "run_id" or column in MEASURED_COLUMNS or (column.startswith("reward_") and column.endswith("_s"))


def merge_rank_rows(gathered: Sequence[tuple[list[dict], list[dict]]]) -> tuple[list[dict], list[dict]]:
    """One step's rollout and episode rows of every rank, in rank order, with step-wide ids: each
    rank numbers its rollouts and groups from 0, so rank r's are shifted by the counts of ranks
    < r (``rank`` keeps where a row came from). Episode rows follow their rollout's new id."""
    rrows, erows = [], []
    r_off = g_off = 0
    for rank_rollouts, rank_episodes in gathered:
        rrows += [{**r, "rollout": r["rollout"] + r_off, "group": r["group"] + g_off} for r in rank_rollouts]
        erows += [{**e, "rollout": e["rollout"] + r_off} for e in rank_episodes]
        r_off += len(rank_rollouts)
        g_off += max((r["group"] for r in rank_rollouts), default=-1) + 1
    return rrows, erows


@dataclass
class RunResult:
    out: str
    final_step: int
    checkpoint: str | None
    steps: pd.DataFrame


def _all_sum_list(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64 all-reduce); unchanged on one process."""
    return all_reduce_list(values, torch.float64)


def _all_sum(x: float) -> float:
    return _all_sum_list([x])[0]


def _all_max(x: int) -> int:
    return int(all_reduce_list([x], torch.long, "max")[0])


def _all_max_list(values: list[float]) -> list[float]:
    return all_reduce_list(values, torch.float64, "max")


def _with_eos(values: torch.Tensor, eos_value: float | None, trained: int) -> torch.Tensor:
    """Per-token ``values`` of a response's tokens, with ``eos_value`` appended when the loss also
    trains its EOS token (``trained`` = response tokens + 1)."""
    if trained == len(values):
        return values
    if trained != len(values) + 1 or eos_value is None:
        raise RuntimeError(f"the loss trains {trained} tokens of a response with {len(values)} per-token values and "
                           f"{'no' if eos_value is None else 'one'} EOS value")
    return torch.cat([values, torch.tensor([eos_value], dtype=values.dtype)])


def check_prompt_sharding(prompts_per_step: int, world: int) -> None:
    """Refuse a step that the ranks cannot share evenly, before any compute: each rank samples
    ``prompts_per_step / world`` prompts, and every rank must make the same collectives (ZeRO's
    reductions in each backward, the optimizer steps of ``mini_batches``); a rank with fewer
    rollouts would take fewer mini-batches and the others would wait for it forever."""
    if world > 1 and (prompts_per_step < world or prompts_per_step % world):
        raise ValueError(
            f"prompts_per_step={prompts_per_step} cannot be shared evenly by {world} ranks: each rank samples "
            f"its own share of a step's prompts and the ranks must run the same steps; set prompts_per_step to a "
            f"multiple of {world} (e.g. {max(world, prompts_per_step // world * world)}) or launch a number of "
            f"ranks that divides it")


def zero_loss(model, device: torch.device, token_id: int = 0, temperature: float = 1.0,
              head_chunk_tokens: int | None = None) -> torch.Tensor:
    """A loss of exactly 0 from a real forward of a two-token sequence through the log-prob path
    (decoder and head, as :func:`~l2t_core.logprobs.token_logprobs`), for a rank with no micro-batch
    left while the others still have one. Its backward fires every parameter's gradient hook in the
    order a real backward does: ZeRO-2 fills its reduction buckets in that order (a loss built from
    the parameters alone, ``sum(p.sum()) * 0``, fired them in registration order and put the other
    ranks' gradients on the wrong parameters), and ZeRO-3 gathers the partitioned weights only
    inside a forward."""
    ids = torch.tensor([[token_id, token_id]], dtype=torch.long, device=device)
    mask = response_mask([1], [1], 2, device)
    lp = token_logprobs(model, ids, torch.ones_like(ids), mask, temperature, head_chunk_tokens)
    return lp.sum() * 0.0


def safetensors_names(files: Sequence[Path]) -> set[str]:
    """The tensor names of a checkpoint's safetensors files, read from their headers alone (no
    tensor is loaded): what a ZeRO-3 resume checks the model against, where the weights themselves
    come back from the engine's partitions."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names.update(h.keys())
    return names


def load_safetensors_cpu(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files, on the CPU (the caller copies them into its
    parameters; loading them onto the GPU first would hold the model twice there, next to vLLM's)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f), device="cpu"))
    return weights


def step_prompt_indices(num_problems: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of optimizer step ``step`` (1-based): consecutive slices of a seeded
    permutation per epoch; a pure function of its arguments."""
    if num_problems <= 0:
        raise ValueError("no training problems")
    start = (step - 1) * prompts_per_step
    out = []
    for pos in range(start, start + prompts_per_step):
        epoch, idx = divmod(pos, num_problems)
        perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
        out.append(int(perm[idx]))
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, *, storage_options: dict | None = None, show_progress: bool = True):
        self.cfg = cfg
        self.show_progress = show_progress
        self.storage = RunStorage(cfg.out, storage_options)
        self.lease = RunLease(self.storage)  # rank 0 holds the run directory while run() trains in it
        self._setup_done = False

    # ------------------------------------------------------------------ setup (all checks before compute)
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.engine == "deepspeed":  # join the launch's process group before reading rank and world
            from .engines.deepspeed_engine import init_distributed

            init_distributed(cfg.dist_timeout_minutes)
        dist = initialized_group()
        self.rank = dist.get_rank() if dist else 0
        self.world = dist.get_world_size() if dist else 1
        check_prompt_sharding(cfg.prompts_per_step, self.world)
        on_rank_0(self.rank == 0, self.storage.check_writable, f"write into the run directory {redact_url(cfg.out)}")
        # a run directory that holds a run is held before the model loads (a relaunch beside a
        # trainer that is still running would otherwise load it beside it, on the same GPU); a
        # fresh one is held by run(), so that a launch refused below leaves nothing behind
        on_rank_0(self.rank == 0, lambda: self.storage.exists(CONFIG_FILE) and self.lease.acquire(),
                  f"hold the run directory {redact_url(cfg.out)}")
        try:
            self._load(cfg)
        except BaseException:
            self.close()  # the verification workers started so far, and the lease where this rank holds one
            raise

    def _load(self, cfg: TrainConfig) -> None:
        """:meth:`setup` once the run directory is known to be writable: data, models, engines."""
        self.problems: list[TrainProblem] = load_training_problems(cfg.data)
        self.verifier = verifier_for(cfg.data)
        self.verify_pool = VerifierPool(self.verifier, cfg.verify_workers) if cfg.verify_workers else None
        self.device = resolve_device(cfg.device)
        # under DeepSpeed the policy (fp32 as loaded) and its reference copy stay on the CPU: the
        # engine moves the policy to this rank's device in its training dtype (ZeRO-3: partitions it),
        # prepare_reference the reference; two whole fp32 copies per GPU were 56 GB at 7B
        load_device = "cpu" if cfg.engine == "deepspeed" else str(self.device)
        # a hub revision read from its local copy, by every rank (of the commit rank 0 found it to
        # be), the vLLM engine and each resume alike
        source = ranks_model_source(cfg.policy, cfg.policy_revision, self.rank == 0)
        # the commit a revision is now (the copy's name): a resume refuses another (_resume)
        self.policy_commit = Path(source).name if cfg.policy_revision is not None else None
        policy, self.tokenizer = load_policy(source, device=load_device)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {cfg.policy!r} has no eos token")
        if has_penalty(cfg.method, cfg.reward):  # a compression target the model lacks fails before any rollout
            penalty_targets(policy, cfg.method, cfg.reward.compression)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # log π of the loss (ratio, KL, surprise weights): of the distribution the rollouts are drawn from
        self.lp_temperature = logprob_temperature(cfg.reward.loss.logprob_temperature, cfg.rollout.temperature)
        # prompts tokenized and length-checked once, before any compute
        self.prompt_ids: list[list[int]] = []
        for p in self.problems:
            ids = encode_prompt(self.tokenizer, p.prompt)
            if not ids:
                raise TrainingDataError(f"training problem {p.id!r}: the prompt tokenized to nothing")
            if len(ids) > cfg.rollout.max_prompt_tokens:
                raise TrainingDataError(
                    f"training problem {p.id!r}: prompt has {len(ids)} tokens, over rollout.max_prompt_tokens="
                    f"{cfg.rollout.max_prompt_tokens}; raise the limit or filter the data"
                )
            self.prompt_ids.append(ids)
        self.reference = None
        if cfg.reward.loss.kl_coef > 0:
            self.reference = copy.deepcopy(policy).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            check_activation_checkpointing(policy)
        policy.train()
        total_updates = cfg.steps * cfg.mini_batches
        kw = {"config_path": cfg.deepspeed_config} if cfg.engine == "deepspeed" else {}
        self.engine = make_train_engine(cfg.engine, policy, cfg.optim, total_updates, **kw)
        check_head_chunking(self.engine.unwrapped(), cfg.head_chunk_tokens)
        if self.reference is not None:  # partitioned like the policy, or in its training dtype
            self.reference = self.engine.prepare_reference(self.reference)
        rkw = dict(max_prompt_tokens=cfg.rollout.max_prompt_tokens)
        if cfg.rollout.engine == "hf":
            rkw["max_batch_sequences"] = cfg.rollout.max_batch_sequences
            rkw["max_batch_tokens"] = cfg.rollout.max_batch_tokens
        else:
            rkw.update(model_path=source, gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                       tensor_parallel_size=cfg.rollout.vllm_tensor_parallel_size, seed=cfg.seed,
                       max_model_len=longest_sampled_sequence(
                           cfg.method, cfg.reward, cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens,
                           len(self.tokenizer(FORCE_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"])),
                       enable_sleep_mode=cfg.rollout.vllm_enable_sleep_mode,
                       sleep_level=cfg.rollout.vllm_sleep_level)
        self.rollout = make_rollout_engine(cfg.rollout.engine, self.engine.unwrapped(), self.tokenizer, **rkw)
        c = cfg.reward.compression
        self.proxy = SVDProxy(c.rank_frac, c.rank, c.svd, c.svd_oversample, c.svd_refresh_steps, c.seed)
        self.metrics = MetricsWriter(self.storage)
        self.memory = PeakMemory(self.device)
        self.step = 0
        self.run_id = uuid.uuid4().hex[:12]
        self._setup_done = True

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "run_id": self.run_id,
            "world": self.world,  # ranks the run was launched with: they shard prompts and seeds
            "policy_commit": self.policy_commit,  # the hub commit of policy_revision it started from
            "proxy": {"bases": self.proxy.bases, "last_refresh": self.proxy._last_refresh},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
        }

    def _write_main_files(self, d: Path, state_dict: dict | None = None) -> None:
        """What rank 0 puts in every checkpoint: HF model + tokenizer, the config, trainer state.
        ``state_dict``: the model's whole weights when ZeRO-3 partitions them (gathered by every rank)."""
        self.engine.unwrapped().save_pretrained(d, state_dict=state_dict)
        self.tokenizer.save_pretrained(d)
        (d / CONFIG_FILE).write_text(self.cfg.model_dump_json(indent=2))
        torch.save(self._trainer_state(), d / STATE_FILE)

    def _save(self) -> str | None:
        def fill(d: Path) -> None:
            self._write_main_files(d)
            self.engine.save_state(d)

        return self.storage.write_checkpoint(self.step, fill, keep=self.cfg.keep_checkpoints)

    def _save_distributed(self) -> str | None:
        """Multi-rank checkpoint: every rank its engine shard, rank 0 the model and the rest
        (:func:`~l2t_core.sharded_checkpoint.save_sharded`; a shared filesystem or an object store)."""
        return save_sharded(self.storage, self.step, rank=self.rank, engine=self.engine,
                            write_main=self._write_main_files, keep=self.cfg.keep_checkpoints)

    def checkpoint(self, first_step: int) -> str | None:
        """Flush metrics of steps ``first_step..self.step``, then publish the checkpoint."""
        self._phase(self.step, "checkpoint")
        on_rank_0(self.rank == 0, lambda: (self.lease.check(), self.metrics.flush(first_step, self.step)),
                  f"write the metrics of step {self.step}")
        return self._save_distributed() if self.world > 1 else self._save()

    def _resume(self) -> int:
        latest = self.storage.latest_checkpoint()
        if latest is None:
            return 0
        step, url = latest
        # the small files first, read where they lie: a refused resume downloads no weights
        where = f"checkpoints/{checkpoint_name(step)}"
        # the run is where it is: a moved run directory still resumes; how often it is saved may change
        saved_cfg = json.loads(self.storage.read_bytes(f"{where}/{CONFIG_FILE}"))
        ignore = (*RESUME_FREE, "policy_revision")  # compared by the commit it is, below
        diff = config_differences(saved_cfg, self.cfg, ignore=ignore)
        if diff:
            settings = setting_differences(saved_cfg, self.cfg, ignore=ignore)
            raise ResumeError(
                f"{redact_url(self.cfg.out)} holds a run with a different configuration (fields: {', '.join(diff)}"
                f"{'; ' + '; '.join(settings) if settings else ''}); "
                "resume with the same configuration or choose a new --out"
            )
        state = torch.load(io.BytesIO(self.storage.read_bytes(f"{where}/{STATE_FILE}")), map_location="cpu",
                           weights_only=False)
        saved_world = state.get("world", self.world)  # checkpoints before this field: not checked
        if saved_world != self.world:
            raise ResumeError(
                f"{redact_url(url)} was saved by a run on {saved_world} rank(s) and this launch has {self.world}: "
                "each rank samples its own share of the prompts with its own seeds (and DeepSpeed saved its "
                f"optimizer state in {saved_world} partitions), so the run would not continue as it was; launch "
                f"it on {saved_world} rank(s) again, or start a new run from this checkpoint's weights "
                f"(policy={redact_url(url)}) with a new --out")
        saved_commit = state.get("policy_commit")
        if saved_commit != self.policy_commit:  # the reference policy would be another model than the run's

            def loaded(commit: str | None) -> str:
                return f"commit {commit} of {self.cfg.policy}" if commit else f"{self.cfg.policy} without a revision"

            raise ResumeError(
                f"{redact_url(self.cfg.out)} holds a run that started from {loaded(saved_commit)}, and this launch "
                f"loads {loaded(self.policy_commit)} (policy_revision={self.cfg.policy_revision!r}): its reference "
                f"policy would be another model. Resume with "
                + (f"--policy-revision {saved_commit} (a commit never moves)" if saved_commit else
                   "no policy_revision") + ", or choose a new --out")
        with host_local_copy(self.storage, url) as d:
            model = self.engine.unwrapped()
            files = sorted(d.glob("*.safetensors"))
            if is_partitioned(model.parameters()):
                # ZeRO-3: the engine state below restores the partitions; the HF files are checked by name
                names, saved = set(model.state_dict()), safetensors_names(files)
                missing, unexpected = sorted(names - saved), sorted(saved - names)
            else:
                # read to the CPU and copied into the parameters: never a second whole model on the GPU
                missing, unexpected = model.load_state_dict(load_safetensors_cpu(files), strict=False)
            missing = [m for m in missing if not (m.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint {redact_url(url)} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
            self.engine.load_state(d)
        self.run_id = state["run_id"]
        # the bases were loaded to the CPU: back to the device of the weights they project
        self.proxy.bases = {n: LowRankBasis(b.U.to(self.device), b.V.to(self.device))
                            for n, b in state["proxy"]["bases"].items()}
        self.proxy._last_refresh = state["proxy"]["last_refresh"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.rollout.sync_weights(self.engine.unwrapped())
        # one rank deletes the metrics of steps after the checkpoint
        on_rank_0(self.rank == 0, lambda: self.metrics.drop_after(step), "drop the metrics after the checkpoint")
        log.info("resumed run %s from %s (step %d)", self.run_id, redact_url(url), step)
        return step

    # ------------------------------------------------------------------ one step
    def _rollouts(self, step: int) -> tuple[list[Rollout], list[TrainProblem], float]:
        cfg = self.cfg
        idx = step_prompt_indices(len(self.problems), cfg.prompts_per_step, step, cfg.seed)
        idx = idx[self.rank:: self.world]  # an equal share on every rank (check_prompt_sharding)
        t0 = device_clock(self.device)
        params = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens,
                                seed=(cfg.seed * 1_000_003 + step * 7919 + self.rank) % (2**31))
        groups = self.rollout.generate([self.prompt_ids[i] for i in idx], params)
        rollouts, probs = [], []
        for g, (i, comps) in enumerate(zip(idx, groups)):
            for c in comps:
                rollouts.append(Rollout(c.prompt_ids, c.response_ids, c.text, self.problems[i].answer, g,
                                        c.finished))
                probs.append(self.problems[i])
        return rollouts, probs, device_clock(self.device) - t0

    @torch.no_grad()
    def _reference_logprobs(self, rollouts: Sequence[Rollout]) -> list[torch.Tensor] | None:
        if self.reference is None:
            return None
        out: list[torch.Tensor | None] = [None] * len(rollouts)
        lengths = [len(r.prompt_ids) + len(self._trained_ids(r)) for r in rollouts]
        # a partitioned reference (ZeRO-3) gathers its weights in every forward: all ranks run as many forwards
        for mb, keep in lockstep_batches(microbatches(lengths, self.cfg.micro_batch_tokens),
                                         self.reference.parameters()):
            lp = self._logps(self.reference, [rollouts[i] for i in mb])
            for j, i in enumerate(mb if keep else []):
                out[i] = lp[j]
        return out  # type: ignore[return-value]

    def _trained_ids(self, r: Rollout) -> list[int]:
        """The tokens the loss trains of rollout ``r``: its response, and with ``loss.train_eos``
        the EOS that closed it when it finished (an empty response has no token to take the
        advantage from, and stays untrained)."""
        eos = self.cfg.reward.loss.train_eos and r.finished and len(r.response_ids) > 0
        return list(r.response_ids) + ([self.tokenizer.eos_token_id] if eos else [])

    def _rewards(self, rollouts: Sequence[Rollout], step: int, need_logp_old: bool | None = None) -> RewardBatch:
        """The reward pass of ``step`` (log π_old only where the update needs it: several updates per batch)."""
        return compute_rewards(self.engine.unwrapped(), self.tokenizer, rollouts, self.cfg.method, self.cfg.reward,
                               verifier=self.verifier, proxy=self.proxy, step=step,
                               # J's samples: rank 0 as a one-process run, the other ranks on streams of their own
                               sample_seed=step if self.rank == 0 else (step * 1_000_003 + self.rank) % (2**31),
                               need_logp_old=self.cfg.mini_batches > 1 if need_logp_old is None else need_logp_old,
                               temperature=self.lp_temperature, all_sum=_all_sum_list if self.world > 1 else None,
                               sampler=self.rollout, head_chunk_tokens=self.cfg.head_chunk_tokens,
                               eos_id=self.tokenizer.eos_token_id if self.cfg.reward.loss.train_eos else None,
                               share_prompts=self.cfg.share_prompts, verify_pool=self.verify_pool)

    def _logps(self, model, rs: Sequence[Rollout]) -> list[torch.Tensor]:
        trained = [self._trained_ids(r) for r in rs]
        # the rollouts of a prompt run it once (l2t_core.prefix_sharing; it turns itself off under
        # ZeRO-3's lockstep and on attention it cannot mask), except where a layer would recompute its
        # forward against the extended cache, and in a multi-rank update: a shared prefix changes the order in which the
        # parameters' gradients arrive, and ZeRO-2 fills its reduction buckets in that order, so a rank
        # that shares beside one that does not (a padding micro-batch) would mix up gradients
        update = torch.is_grad_enabled()
        share = self.cfg.share_prompts and not (update and (is_checkpointing(model) or self.world > 1))
        return continuation_logprobs(model, [r.prompt_ids for r in rs], trained, self.pad_id,
                                     temperature=self.lp_temperature, chunk_tokens=self.cfg.head_chunk_tokens,
                                     share=share)

    def _update(self, rollouts: Sequence[Rollout], rewards: RewardBatch, ref: list[torch.Tensor] | None) -> dict:
        """``mini_batches`` optimizer steps over the batch, each accumulated over micro-batches."""
        cfg, lc = self.cfg, self.cfg.reward.loss
        model = self.engine.module
        order = list(range(len(rollouts)))
        n_mb = min(cfg.mini_batches, len(order))
        minis = [order[k::n_mb] for k in range(n_mb)]
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}
        opt_stats = {"grad_norm": 0.0, "lr": 0.0}
        tok_total = 0.0
        for mini in minis:
            n_tok = [len(self._trained_ids(rollouts[i])) for i in mini]
            if cfg.reward.loss.aggregation == "token_mean":
                denom = _all_sum(float(sum(n_tok)))
            else:
                denom = _all_sum(float(sum(1 for t in n_tok if t > 0)))
            lengths = [len(rollouts[i].prompt_ids) + n_tok[j] for j, i in enumerate(mini)]
            mbs = [[mini[j] for j in mb if n_tok[j] > 0] for mb in microbatches(lengths, cfg.micro_batch_tokens)]
            mbs = [mb for mb in mbs if mb]
            # every rank makes the same number of backward calls (ZeRO reduces in each of them)
            mbs += [[]] * (_all_max(len(mbs)) - len(mbs)) if self.world > 1 else ([] if mbs else [[]])
            for n_mb_i, keep in enumerate(mbs):
                last = n_mb_i == len(mbs) - 1
                rs = [rollouts[i] for i in keep]
                if not rs:  # no micro-batch left on this rank: a real forward's zero loss keeps ranks in step
                    self.engine.backward(zero_loss(model, self.device, self.pad_id, self.lp_temperature,
                                                   cfg.head_chunk_tokens), last=last)
                    continue
                logp_list = self._logps(model, rs)
                width = max(len(x) for x in logp_list)

                def stack(vals):
                    t = torch.zeros(len(vals), width, dtype=torch.float32, device=self.device)
                    for j, v in enumerate(vals):
                        t[j, : len(v)] = v.to(self.device, torch.float32)
                    return t

                logp = torch.nn.utils.rnn.pad_sequence(logp_list, batch_first=True)
                mask = stack([torch.ones(len(x)) for x in logp_list])
                # one update per batch: π_old is the current policy (ratio 1, the PG gradient)
                res = [rewards.responses[i] for i in keep]
                old = stack([_with_eos(x.logp_old, x.eos_logp_old, len(lp)) if x.logp_old is not None else lp.detach()
                             for x, lp in zip(res, logp_list)])
                # a trained EOS token takes the advantage of the response's last token
                advs = stack([_with_eos(x.token_advantage, float(x.token_advantage[-1]) if len(x.token_advantage)
                                        else None, len(lp)) for x, lp in zip(res, logp_list)])
                refl = stack([ref[i] for i in keep]) if ref is not None else None
                out = policy_loss(logp, old, refl, advs, mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
                                  kl_coef=lc.kl_coef, aggregation=lc.aggregation)
                share = (mask.sum() if lc.aggregation == "token_mean" else torch.tensor(float(len(rs)))).item()
                scale = share / max(denom, 1.0) * self.world  # engines average gradients over ranks
                self.engine.backward(out.loss * scale, last=last)
                w = mask.sum().item()
                tok_total += w
                for k in sums:
                    sums[k] += float(getattr(out, k).detach()) * w
            st = self.engine.step()
            opt_stats = {k: opt_stats[k] + st[k] / len(minis) for k in opt_stats}
        self.rollout.sync_weights(self.engine.unwrapped())
        # the step's loss statistics over every rank's tokens, not rank 0's share only
        tok_total = _all_sum(tok_total)
        stats = {k: _all_sum(v) / max(tok_total, 1.0) for k, v in sums.items()}
        stats.update(opt_stats)
        return stats

    def _phase(self, step: int, phase: str) -> None:
        """One INFO line as each phase of a step starts (``step 3/10: update``): where a run was
        when it stopped, and how long each phase takes, read from the log alone."""
        log.info("step %d/%d: %s", step, self.cfg.steps, phase)

    def train_step(self, step: int) -> dict:
        t_step = device_clock(self.device)  # each phase's clock waits for its GPU work (l2t_core.timing)
        peaks: list[float | None] = []  # each phase's peak memory, in MEMORY_COLUMNS order
        mem = self.memory
        self._phase(step, "rollout")
        mem.reset()
        rollouts, probs, t_roll = self._rollouts(step)
        peaks.append(mem.peak_gib())
        self._phase(step, "reward")
        mem.reset()
        t0 = device_clock(self.device)
        rewards = self._rewards(rollouts, step)
        t_reward = device_clock(self.device) - t0
        peaks.append(mem.peak_gib())
        mem.reset()
        t0 = device_clock(self.device)
        if self.reference is not None:
            self._phase(step, "reference")
        ref = self._reference_logprobs(rollouts)
        t_ref = device_clock(self.device) - t0
        peaks.append(mem.peak_gib() if self.reference is not None else None)
        self._phase(step, "update")
        mem.reset()
        t0 = device_clock(self.device)
        # the update's backward passes recompute the decoder's activations when asked; the reward
        # pass above does not (its backward ends inside the last block: see activation_checkpointing)
        with activation_checkpointing(self.engine.unwrapped(), self.cfg.gradient_checkpointing):
            upd = self._update(rollouts, rewards, ref)
        t_update = device_clock(self.device) - t0
        peaks.append(mem.peak_gib())
        if self.world > 1:  # the highest over the ranks (every rank joins; None travels as -1)
            peaks = [None if v < 0 else v for v in _all_max_list([-1.0 if p is None else p for p in peaks])]
        row = self._record(step, rollouts, probs, rewards)
        row.update(upd)
        row.update(step_time_s=device_clock(self.device) - t_step, rollout_time_s=t_roll, reward_time_s=t_reward,
                   ref_time_s=t_ref, update_time_s=t_update)
        row.update(zip(MEMORY_COLUMNS, peaks))
        row.update({f"reward_{k}": v for k, v in rewards.timings.items()})
        return row

    def _record(self, step: int, rollouts, probs, rewards: RewardBatch) -> dict:
        """Rollout and episode rows for the metrics tables; returns the step's summary row."""
        rrows, erows = [], []
        for n, (r, p, x) in enumerate(zip(rollouts, probs, rewards.responses)):
            rrows.append({
                "run_id": self.run_id, "step": step, "rank": self.rank, "rollout": n, "problem_id": p.id,
                "level": p.level, "group": r.group_id, "response": r.response_text if self.cfg.log_rollouts else None,
                "reference": r.reference, "num_tokens": len(r.response_ids), "outcome": x.outcome,
                "verdict": x.verdict_status, "segmentation": x.segmentation.status,
                "num_episodes": x.segmentation.num_episodes, "score": x.score, "advantage": x.advantage,
                "finished": r.finished,
            })
            # each episode's own tokens; the last one's include the answer after </think> (METHOD.md §1), which
            # the boundaries (where the contexts of J end) leave out
            lens = x.tokens.token_counts()
            for k in range(x.segmentation.num_episodes):
                erows.append({
                    "run_id": self.run_id, "step": step, "rank": self.rank, "rollout": n, "episode": k + 1,
                    "num_tokens": int(lens[k]), "fitting_gain": float(x.gains[k]), "penalty": float(x.penalties[k]),
                    "penalty_hat": float(x.penalties_hat[k]), "process_reward": float(x.process[k]),
                    "episode_reward": float(x.episode_reward[k]),
                    # c_k where reward.copying.coef > 0 charged it, else null
                    "copy_share": None if x.copies is None else float(x.copies[k]),
                    # ℓ_k where reward.oracle.coef > 0 charged it (the diagnostic control), else null
                    "oracle_label": None if x.labels is None else float(x.labels[k]),
                })
        dist = initialized_group()
        if dist is not None:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, (rrows, erows))
            rrows, erows = merge_rank_rows(gathered)
        if self.rank == 0:
            self.metrics.add("rollouts", rrows)
            self.metrics.add("episode_rewards", erows)
        rdf, edf = pd.DataFrame(rrows), pd.DataFrame(erows)
        row = {
            "run_id": self.run_id, "step": step, "method": self.cfg.method,
            "accuracy": float(rdf["outcome"].mean()), "mean_tokens": float(rdf["num_tokens"].mean()),
            "episodes_per_response": float(rdf["num_episodes"].mean()),
            "tagged_share": float((rdf["segmentation"] == "tagged").mean()),
            # the share that ended with EOS; the rest were cut at rollout.max_new_tokens
            "finished_share": float(rdf["finished"].mean()),
            # verdicts that are no judgement of the answer: a check past the verifier's deadline, and an
            # error (the verifier's, or a response that ended its verification worker; l2t_core.verify_pool)
            "verify_timeout_share": float((rdf["verdict"] == "timeout").mean()),
            "verify_error_share": float((rdf["verdict"] == "error").mean()),
            "score_mean": float(rdf["score"].mean()), "score_std": float(rdf["score"].std(ddof=0)),
        }
        for col in ("fitting_gain", "penalty_hat", "process_reward", "episode_reward"):
            row[f"{col}_mean"] = float(edf[col].mean()) if len(edf) else 0.0
        return row

    # ------------------------------------------------------------------ the loop
    def run(self, *, stop_after: int | None = None, on_step: Callable[[dict], None] | None = None) -> RunResult:
        """Train to ``cfg.steps`` (resuming from the run directory's latest checkpoint if any).
        ``stop_after`` ends this session after that many steps (tests use it to simulate a crash).
        ``on_step`` is called on rank 0 with each step's metrics row as soon as the step is done
        (e.g. to stream progress to Dagster through Pipes)."""
        if not self._setup_done:
            self.setup()
        try:
            # one trainer at a time in the run directory (l2t_core.run_lease), from before anything
            # is written into it (the resume below prunes checkpoints and drops metrics) to the end
            on_rank_0(self.rank == 0, self.lease.acquire, f"hold the run directory {redact_url(self.cfg.out)}")
            return self._run(stop_after, on_step)
        finally:
            self.close()

    def _run(self, stop_after: int | None, on_step: Callable[[dict], None] | None) -> RunResult:
        """:meth:`run` once the trainer holds the run directory."""
        cfg = self.cfg
        start = self._resume()
        if start == 0:
            config = cfg.model_dump_json(indent=2).encode()

            def begin() -> None:
                # metrics a session wrote before it died without a complete checkpoint (other parts
                # than this session's would stay beside its own, under another run_id)
                self.metrics.drop_after(0)
                self.storage.write_bytes(CONFIG_FILE, config)

            on_rank_0(self.rank == 0, begin, f"clear stale metrics and write {CONFIG_FILE}")
        # a resumed run reports the checkpoint it resumed from until it writes a newer one, so an
        # already finished run returns its final step and checkpoint
        self.step = start
        latest = self.storage.latest_checkpoint() if start else None
        last_ckpt = latest[1] if latest else None
        first_unsaved = start + 1
        done = 0
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, disable=not (self.show_progress and self.rank == 0), transient=False) as bar:
            task = bar.add_task(f"{cfg.method}", total=cfg.steps, completed=start, info="")
            for step in range(start + 1, cfg.steps + 1):
                self.step = step
                row = self.train_step(step)
                on_rank_0(self.rank == 0, lambda: self._record_step(row, on_step), f"record step {step}")
                info = (f"acc {row['accuracy']:.2f} tok {row['mean_tokens']:.1f} kl {row['kl']:.4f} "
                        f"{row['step_time_s']:.1f}s")
                bar.update(task, advance=1, info=info)
                log.info("step %d/%d %s: %s", step, cfg.steps, cfg.method, info)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    last_ckpt = self.checkpoint(first_unsaved)
                    first_unsaved = step + 1
                done += 1
                if stop_after is not None and done >= stop_after:
                    break
        steps = read_table(self.storage, "train_steps") if self.rank == 0 else pd.DataFrame()
        return RunResult(cfg.out, self.step, last_ckpt, steps)


    def _record_step(self, row: dict, on_step) -> None:
        """Rank 0: the step's metrics row, and the caller's ``on_step`` with it."""
        self.lease.check()
        self.metrics.add("train_steps", [row])
        if on_step is not None:
            on_step(row)

    def close(self) -> None:
        """Stop the verification workers (``verify_workers``) and let go of the run directory;
        :meth:`run` does on its way out, and a trainer used again starts new ones."""
        if getattr(self, "verify_pool", None) is not None:
            self.verify_pool.close()
        self.lease.release()


def train(cfg: TrainConfig, **kwargs) -> RunResult:
    """Run (or resume) ``cfg`` to completion."""
    return Trainer(cfg, **{k: v for k, v in kwargs.items() if k in ("storage_options", "show_progress")}).run(
        stop_after=kwargs.get("stop_after"))
