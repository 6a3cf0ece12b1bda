"""Dagster run configuration of the assets, each mapping onto one of l2t_core's pydantic configs.

The defaults are the embedded default: l2t_core's default synthetic task, the character tokenizer
and a tiny Qwen2, small enough that the whole lineage materializes on a CPU in minutes. Every
``to_core`` builds the l2t_core config, which validates the values (a bad one fails with the
field's name before any compute).
"""

from __future__ import annotations

import json
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from l2t_core.config import DataConfig, MethodName, RewardConfig, TrainConfig, apply_settings
from l2t_core.warmstart import WarmStartConfig


class BaseModelConfig(dg.Config):
    """SFT warm start of the embedded default (``l2t_core.warmstart.WarmStartConfig``; the task
    and its levels come from the ``training_data`` resource); ignored for registry models of kind
    ``pretrained``."""

    seed: int = 0
    train_size: int = Field(4000, description="SFT examples (synthetic problems).")
    sft_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    eval_loss_size: int = Field(100, description="Held-out SFT examples for the SFT evaluation loss.")
    eval_per_level: int = Field(5, description="Problems per level of the warm start's own greedy check.")
    eval_max_new_tokens: int = 200
    threads: Optional[int] = Field(1, description="torch threads during the warm start (None: unchanged).")

    def to_core(self, task: str, min_steps: int, max_steps: int) -> WarmStartConfig:
        """The warm start's config; its task and levels follow the training data."""
        return WarmStartConfig(task=task, min_steps=min_steps, max_steps=max_steps, **self.model_dump())


DEVICE_DEFAULT = "auto"
DEVICE_HELP = ("Where the base model is loaded: 'auto' (CUDA where the run worker has a GPU, else the CPU), 'cpu' or "
               "'cuda' (an error where there is none).")


class RolloutSamplingConfig(dg.Config):
    """How ``segmented_rollouts`` samples the base policy on the training prompts."""

    prompts: int = Field(8, ge=1, description="Training prompts sampled (the first ones of the training split).")
    group_size: int = Field(4, ge=2, description="Responses per prompt (G); at least 2, the advantages are "
                            "relative to the group.")
    temperature: float = Field(1.0, ge=0.0)
    max_new_tokens: int = Field(200, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(DEVICE_DEFAULT, description=DEVICE_HELP)


REWARD_SETTINGS_HELP = (
    "Any other l2t_core RewardConfig setting as dotted key=value, applied over the fields above, as "
    "`l2t train --set reward.KEY=VALUE` takes them (values read as JSON when they parse): e.g. "
    "'copying.coef=2', 'credit.credit=additive', 'fitting.estimator=continuation'. A misspelt key or a bad value "
    "fails with its name before any compute.")


class RewardSettings(dg.Config):
    """The reward path of ``episode_rewards`` (``l2t_core.config.RewardConfig``; METHOD.md §1-§4)."""

    method: MethodName = Field("l2t", description="grpo | length_penalty | mrt | l2t | l2t_no_penalty | "
                                                  "l2t_random_layers")
    alpha: float = 0.8
    beta: float = 0.6
    rank_frac: float = 0.05
    max_episodes: int = 30
    settings: list[str] = Field(default_factory=list, description=REWARD_SETTINGS_HELP)
    device: Literal["auto", "cpu", "cuda"] = Field(DEVICE_DEFAULT, description=DEVICE_HELP)

    def to_core(self) -> RewardConfig:
        base = {"segmentation": {"max_episodes": self.max_episodes}, "compression": {"rank_frac": self.rank_frac},
                "credit": {"alpha": self.alpha, "beta": self.beta}}
        return RewardConfig.model_validate(apply_settings(base, self.settings, "RewardSettings.settings"))


class TrainRunConfig(dg.Config):
    """One RL fine-tuning run of ``checkpoints`` (``l2t_core.config.TrainConfig``); the policy,
    method, run directory and training data come from the partition and the resources."""

    steps: int = Field(4, ge=1)
    prompts_per_step: int = Field(4, ge=1)
    group_size: int = Field(4, ge=2, description="Rollouts per prompt (G); at least 2, the advantages are "
                            "relative to the group.")
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = 1.0
    lr: float = 3e-5
    kl_coef: float = 0.001
    alpha: float = 0.8
    beta: float = 0.6
    micro_batch_tokens: int = 8192
    seed: int = 0
    reward_settings: list[str] = Field(default_factory=list, description=REWARD_SETTINGS_HELP)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the run trains: 'auto' (CUDA when the training process has a GPU, "
                                            "else the CPU), 'cpu' or 'cuda'. A launcher may place it (a GPU pod: cuda).")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (and at the last step): what a "
                                  "relaunched run resumes from. Changing it keeps the run (same directory).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in the run directory.")
    settings: list[str] = Field(default_factory=list, description=(
        "Any other l2t_core TrainConfig setting as dotted key=value, applied last, as `l2t train --set KEY=VALUE` "
        "takes them (values read as JSON when they parse): e.g. 'rollout.engine=vllm', "
        "'gradient_checkpointing=true', 'optim.weight_decay=0.01', 'mini_batches=4'. The policy, method, run "
        "directory and training data come from the partition and the resources and cannot be set here."))

    def to_core(self, *, policy: str, method: str, out: str, data: DataConfig,
                policy_revision: str | None = None) -> TrainConfig:
        base = TrainConfig(
            method=method, policy=policy, policy_revision=policy_revision, out=out, steps=self.steps,
            prompts_per_step=self.prompts_per_step,
            micro_batch_tokens=self.micro_batch_tokens, device=self.device,
            checkpoint_every=min(self.checkpoint_every, self.steps), keep_checkpoints=self.keep_checkpoints,
            seed=self.seed, data=data, optim={"lr": self.lr},
            rollout={"group_size": self.group_size, "temperature": self.temperature,
                     "max_new_tokens": self.max_new_tokens},
            reward=apply_settings({"credit": {"alpha": self.alpha, "beta": self.beta}, "loss": {"kl_coef": self.kl_coef}},
                                  self.reward_settings, "TrainRunConfig.reward_settings"),
        )
        if not self.settings:
            return base
        for item in self.settings:
            key = item.split("=", 1)[0].strip()
            if key.split(".")[0] in PARTITION_FIELDS:
                raise ValueError(f"TrainRunConfig.settings {item!r}: {key!r} comes from the partition or the resources "
                                 f"(the base model's path and hub revision, the method, the run directory, "
                                 f"training_data); set it there")
            if key.split(".")[0] == "reward":
                raise ValueError(f"TrainRunConfig.settings {item!r}: reward options go in reward_settings, without "
                                 f"'reward.' ({key.removeprefix('reward.')}=...)")
            if key in TYPED_FIELDS:
                raise ValueError(f"TrainRunConfig.settings {item!r}: {key!r} is TrainRunConfig.{TYPED_FIELDS[key]}; "
                                 "set that field (two values for one setting would leave one unused)")
        merged = apply_settings(json.loads(base.model_dump_json()), self.settings, "TrainRunConfig.settings",
                                "rollout.engine=vllm")
        return TrainConfig.model_validate(merged)


# what TrainRunConfig.settings may not set: the checkpoints asset's partition and resources say it
PARTITION_FIELDS = ("policy", "policy_revision", "method", "out", "data")
# TrainConfig settings that TrainRunConfig has fields for (settings would override them unseen)
TYPED_FIELDS = {"steps": "steps", "prompts_per_step": "prompts_per_step", "micro_batch_tokens": "micro_batch_tokens",
                "device": "device", "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints",
                "seed": "seed", "optim.lr": "lr", "rollout.group_size": "group_size",
                "rollout.temperature": "temperature", "rollout.max_new_tokens": "max_new_tokens"}


class DatasetsConfig(dg.Config):
    """Benchmark JSONL files (in ``$L2T_DATA_DIR``) normalized next to the training prompts."""

    benchmarks: list[str] = Field(default_factory=list, description="File names such as 'math500.jsonl'.")
    max_rows_per_benchmark: Optional[int] = Field(None, ge=1)


class QualityGateConfig(dg.Config):
    """The checkpoint quality gate: held-out accuracy may fall at most this much below the base's."""

    max_accuracy_drop: float = Field(0.05, description="Allowed drop in accuracy (absolute, 0..1).")
