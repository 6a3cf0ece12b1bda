"""Typed configuration for the L2T reward math, with the paper's defaults.

Every field cites the METHOD.md section that defines it. Models forbid unknown fields, so a
misspelt option fails loudly with the field's name instead of being silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SegmentationConfig(_Strict):
    """METHOD.md §1."""

    max_episodes: int = Field(30, ge=1, description="Merge the tail past this many episodes into the last one.")


class FittingConfig(_Strict):
    """METHOD.md §2: the fitting information gain G_k = J(s_k ⊕ z_k) − J(s_k)."""

    estimator: Literal["answer_logprob", "monte_carlo"] = "answer_logprob"
    mc_samples: int = Field(4, ge=1, description="m, the forced answers sampled per prefix (monte_carlo).")
    mc_max_new_tokens: int = Field(32, ge=1, description="Length cap of one forced answer (monte_carlo).")
    mc_temperature: float = Field(1.0, gt=0.0)
    max_tokens_per_batch: int = Field(
        32768, ge=1, description="Packed tokens per forward pass of the answer_logprob estimator."
    )


class CompressionConfig(_Strict):
    """METHOD.md §3: the parameter-compression penalty P_k."""

    mode: Literal["low_rank", "random_layers"] = Field(
        "low_rank", description="low_rank: the SVD proxy (default). random_layers: the §5.3(iii) ablation."
    )
    targets: tuple[str, ...] | None = Field(
        None,
        description="Named nn.Linear modules forming θ. None: the MLP down-projection of the last block.",
    )
    rank_frac: float = Field(0.05, gt=0.0, le=1.0, description="r = ceil(rank_frac · min(d_out, d_in)).")
    rank: int | None = Field(
        None, ge=1, description="Explicit r; overrides rank_frac. r ≥ max(d_out, d_in) keeps the full space."
    )
    svd: Literal["exact", "randomized"] = "exact"
    svd_oversample: int = Field(8, ge=0, description="Extra directions for the randomized SVD.")
    svd_refresh_steps: int = Field(1, ge=1)
    adapt_lr: float = Field(1.0, gt=0.0, description="η in Δθ̃_k = η · g_k.")
    damping: float = Field(1e-5, ge=0.0, description="λ in F_k = g_k g_kᵀ + λ I.")
    penalty_norm: Literal["batch_response_mean", "none"] = "batch_response_mean"
    random_layer_frac: float = Field(0.3, gt=0.0, le=1.0, description="Share of blocks in random_layers mode.")
    seed: int = 0


class CreditConfig(_Strict):
    """METHOD.md §4: episode reward, token credit and group advantage."""

    alpha: float = Field(0.8, ge=0.0, description="α, weight of the process reward.")
    beta: float = Field(0.6, ge=0.0, description="β, weight of the compression penalty.")
    token_weights: Literal["surprise", "uniform"] = Field(
        "surprise", description="surprise: w_t ∝ −log π_old(z_t) inside an episode (paper); uniform: 1/|k|."
    )
    surprise_floor: float = Field(1e-6, gt=0.0)
    score_agg: Literal["trimmed_mean", "sum"] = "trimmed_mean"
    trim_frac: float = Field(0.05, ge=0.0, lt=1.0, description="Total share trimmed, half at each tail.")
    std_eps: float = Field(1e-6, gt=0.0)


class LossConfig(_Strict):
    """METHOD.md §5: clipped surrogate with a k3 KL to the frozen reference."""

    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_high: float = Field(0.2, ge=0.0)
    kl_coef: float = Field(0.001, ge=0.0)
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"


class BaselineConfig(_Strict):
    """METHOD.md §6."""

    length_penalty_alpha: float = Field(0.1, ge=0.0)
    mrt_alpha: float = Field(1.0, ge=0.0)


class RewardConfig(_Strict):
    """Everything the reward path needs, one object, serialisable next to a checkpoint."""

    segmentation: SegmentationConfig = SegmentationConfig()
    fitting: FittingConfig = FittingConfig()
    compression: CompressionConfig = CompressionConfig()
    credit: CreditConfig = CreditConfig()
    loss: LossConfig = LossConfig()
    baselines: BaselineConfig = BaselineConfig()
