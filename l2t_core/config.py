"""Typed configuration for the L2T reward math, with the paper's defaults.

Every field cites the METHOD.md section that defines it. Models forbid unknown fields, so a
misspelt option fails loudly with the field's name instead of being silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Iterable, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .hub import check_revision_source
from .tasks import TaskName
from .urls import credentials_message, redact_url, redact_urls_in, url_credentials


class _Strict(BaseModel):
    # no NaN or ±inf anywhere: a non-finite learning rate or coefficient fails here, with its field
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def config_differences(saved: dict, current: BaseModel, ignore: Iterable[str] = ()) -> list[str]:
    """Top-level fields in which a config saved as JSON differs from ``current``.

    The saved config is first read through ``current``'s model, so a field added after it was saved
    takes its default (new options default to the earlier behaviour) and an old run still matches.
    ``ignore`` lists fields that do not change the result (a run's own location, thread counts).

    URLs are compared redacted (:func:`~l2t_core.urls.redact_url`): credentials are not part of a
    run's identity, so a config saved (before they were refused) with ``ftp://user:pw@host/run``
    matches today's ``ftp://host/run`` with the credentials in the environment.
    """
    saved, mine = _comparable(saved, current)
    return sorted(k for k in (set(saved) | set(mine)) - set(ignore) if saved.get(k) != mine.get(k))


def setting_differences(saved: dict, current: BaseModel, ignore: Iterable[str] = ()) -> list[str]:
    """The settings behind :func:`config_differences`, one per differing leaf, as the user would
    ``--set`` them: ``"optim.lr: 3e-05 in the saved run, 0.0001 now"`` (URLs redacted)."""
    saved, mine = _comparable(saved, current)
    out: list[str] = []

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path}: {json.dumps(a)} in the saved run, {json.dumps(b)} now")

    for k in sorted((set(saved) | set(mine)) - set(ignore)):
        walk(saved.get(k), mine.get(k), k)
    return out


def _comparable(saved: dict, current: BaseModel) -> tuple[dict, dict]:
    """A saved config and ``current`` as JSON dicts that compare field by field: the saved one read
    through ``current``'s model (new fields take their defaults), URLs redacted, inert options out."""
    saved = redact_urls_in(saved)
    try:
        saved = json.loads(type(current).model_validate(saved).model_dump_json())
    except ValidationError:
        pass  # unreadable today: compare the raw values, which then differ where it matters
    mine = redact_urls_in(json.loads(current.model_dump_json()))
    return _without_inert(saved), _without_inert(mine)


def _without_inert(cfg: dict) -> dict:
    """``cfg`` (a dumped TrainConfig or RewardConfig) without the fitting options that its J
    estimator does not read (:attr:`FittingConfig.ESTIMATOR_ONLY`), so that a change of their
    default does not make an earlier run look different."""
    reward = cfg.get("reward", cfg)
    fit = reward.get("fitting") if isinstance(reward, dict) else None
    if not isinstance(fit, dict):
        return cfg
    only = FittingConfig.ESTIMATOR_ONLY
    kept = {k: v for k, v in fit.items() if k not in only or only[k] == fit.get("estimator")}
    reward = {**reward, "fitting": kept}
    return {**cfg, "reward": reward} if "reward" in cfg else reward


def parse_setting_value(text: str):
    """The value of a ``key=value`` setting: JSON when it parses (``2``, ``true``, ``"additive"``,
    ``[1, 2]``), else the text itself (``additive``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_settings(base: dict, settings: Iterable[str], what: str = "setting",
                   example: str = "credit.beta=0.3") -> dict:
    """``a.b.c=value`` strings applied to a copy of the nested dict ``base`` (values through
    :func:`parse_setting_value`); the result is for a config model to validate. Raises ValueError
    naming ``what`` and the setting (with ``example``, a well-formed one) when one is not
    ``key=value`` or walks into a value."""
    out = json.loads(json.dumps(base))
    for item in settings:
        if "=" not in item:
            raise ValueError(f"{what} expects key=value (e.g. {example}), got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"{what} {item!r}: the key {key.strip()!r} has an empty part")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{what} {key}: {p!r} is not a section")
        node[parts[-1]] = parse_setting_value(value)
    return out


class SegmentationConfig(_Strict):
    """METHOD.md §1."""

    max_episodes: int = Field(30, ge=1, description="Merge the tail past this many episodes into the last one.")
    numbering: Literal["strict", "ignore"] = Field(
        "strict",
        description=(
            "strict (METHOD.md §1): misnumbered episode tags make the response malformed (blank-line fallback). "
            "ignore (this project's option): blocks that open and close in turn are used in order whatever their "
            "numbers; small models lose count of long traces (measured on 142 held-out walk problems: 44 % of the "
            "tiny SFT model's samples at T 0.7 are misnumbered, 82 % on level 6, so under strict they get one "
            "episode and no per-episode signal; with ignore 141 of 142 segment as tagged)."
        ),
    )


class FittingConfig(_Strict):
    """METHOD.md §2: the fitting information gain G_k = J(s_k ⊕ z_k) − J(s_k)."""

    estimator: Literal["answer_logprob", "monte_carlo", "continuation"] = Field("answer_logprob", description=(
        "How J(s) is estimated: answer_logprob (the paper's, teacher-forced answer after the force-answer "
        "suffix), monte_carlo (forced answers sampled, MRT), or continuation (not the paper's: the share of the "
        "policy's own sampled continuations of s, without forcing, that reach the verified answer within "
        "continuation_budget tokens; calibrated to what the policy does after s, at m generations per boundary)."))
    mc_samples: int = Field(4, ge=1, description="m, the samples per prefix (monte_carlo, continuation).")
    mc_max_new_tokens: int = Field(32, ge=1, description="Length cap of one forced answer (monte_carlo).")
    mc_temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (monte_carlo, continuation).")
    continuation_budget: int = Field(512, ge=1, description=(
        "continuation: the response budget in tokens (prefix + continuation), as the rollouts' max_new_tokens; "
        "a continuation is cut where the budget ends."))
    continuation_batch: int = Field(32, ge=1, description=(
        "continuation: contexts per batch where the rollout engine batches by call (hf; vLLM schedules its own), "
        "shortest first; small batches of about one prefix length end together (bench/continuation_j.py)."))
    max_tokens_per_batch: int = Field(
        32768, ge=1, description=(
            "Packed tokens per forward pass of the answer_logprob estimator; for the sampled estimators "
            "(monte_carlo, continuation) computed without the trainer's rollout engine, the KV-cache positions "
            "per generate call of the hf engine they build (the trainer's engine has rollout.max_batch_tokens)."))

    # options read by one estimator only: a run made with another is the same run whatever they are
    # (config_differences leaves them out; continuation_batch's default was 256 until 2026-12-05)
    ESTIMATOR_ONLY: ClassVar[dict[str, str]] = {"continuation_budget": "continuation",
                                                "continuation_batch": "continuation"}


class CompressionConfig(_Strict):
    """METHOD.md §3: the parameter-compression penalty P_k."""

    mode: Literal["low_rank", "full_layer"] = Field(
        "low_rank",
        description=(
            "low_rank: the paper's rank-r SVD proxy (default). full_layer (this project's option, not the "
            "paper's): the un-projected ‖G_k‖² of the whole target layer from per-episode Gram blocks, "
            "no SVD; on the penalty benchmark it tracks the all-parameter penalty far better than r = 5 %. "
            "The §5.3(iii) random-layers ablation is the method l2t_random_layers."
        ),
    )
    targets: tuple[str, ...] | None = Field(
        None,
        description=(
            "Named nn.Linear modules forming θ; a name with * ? [ is an fnmatch pattern. None: the MLP "
            "down-projection of the last block (paper). Options of this project, which track the all-parameter "
            "penalty far better on a trained model (bench.penalty_fidelity, rank_frac 0.05): 'last_block', every "
            "Linear of the last block that no attention follows (MLP gate/up/down, attention o_proj), still ONE "
            "backward, Spearman 0.90-0.92 against 0.73-0.75, 1.2-1.4x the default's time; "
            "'model.layers.*.mlp.down_proj' (every block's) 0.96-0.97, at the cost of one backward per episode "
            "(see attribution)."
        ),
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
    penalty_norm: Literal["batch_response_mean", "group_response_mean", "none"] = Field(
        "batch_response_mean",
        description="batch_response_mean: P̂_k = P_k ÷ the batch's mean per-response Σ_k P_k (METHOD.md §3); "
                    "group_response_mean (this project's option): the same mean taken over the response's own "
                    "group, so a group of long or surprising responses is not penalised more than the batch's "
                    "easy ones (§10: normalise the penalty per group); none: P_k unchanged.")
    penalty_clip: float | None = Field(
        None, gt=0.0,
        description="None: P̂_k as normalised (paper). c (this project's option, §10 \"clipping the penalty per "
                    "group\"): P̂_k ← min(P̂_k, c · the mean P̂ over every episode of the response's group). P_k grows "
                    "as ‖g_k‖⁴, so a few surprising episodes carry most of a response's penalty and its sum "
                    "ranks responses by those outliers rather than by how much they say; the clip bounds "
                    "what one episode can cost.")
    random_layer_frac: float = Field(0.3, gt=0.0, le=1.0, description="Share of blocks for the method l2t_random_layers.")

    @field_validator("targets")
    @classmethod
    def _targets_name_something(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and (not v or any(not n.strip() for n in v)):
            raise ValueError("an empty list (or an empty name) names no layer: leave targets unset (null) for the "
                             "paper's θ, the last block's down-projection, or set reward.credit.beta: 0 to turn "
                             "the penalty off")
        return v

    attribution: Literal["per_episode", "single_backward"] = Field(
        "per_episode",
        description=(
            "How episodes' gradients are told apart where a target is not in the last block after its attention "
            "(the method l2t_random_layers, targets in earlier blocks); the default target is exact either way and "
            "takes one backward. per_episode: one backward per episode, batched, each episode's gradient summed "
            "over every position, prompt included (METHOD.md §3, exact). single_backward (this project's option): "
            "the one backward of the default target, each position's signal credited to the episode of the token "
            "it enters at, which also carries every later token's signal through that position (an "
            "approximation; K times cheaper)."
        ),
    )
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
    credit: Literal["paper", "additive", "broadcast"] = Field(
        "paper",
        description=(
            "paper: A_{i,t} = A_i·T_i·|r_t|/Σ|r| with A_i from the response score (METHOD.md §4). "
            "additive (this project's option, not the paper's): A_{i,t} = A_i^outcome + process_coef · "
            "z_g(r_k^prg), the outcome's GRPO advantage plus the episode's process reward z-scored over "
            "all episodes of the group; signed, so correct steps of a wrong response are not pushed down. "
            "broadcast (this project's option): A_{i,t} = A_i, the response score's advantage on every token as "
            "GRPO does; the process reward then acts through the response score alone."
        ),
    )
    process_coef: float = Field(0.5, ge=0.0, description="Weight of the process term in credit='additive'.")
    additive_outcome: Literal["outcome", "length_penalty"] = Field(
        "outcome",
        description=(
            "The scalar whose group advantage is the outcome term A_i^outcome of credit='additive'. outcome: the "
            "verified outcome r_i^out. length_penalty (this project's option, not the paper's): the length "
            "baseline's reward 1[correct] · (1 − α_lp · σ(z_len)) (METHOD.md §6, baselines.length_penalty_alpha), "
            "so the response pays for its length as under the method length_penalty while the z-scored process "
            "term still credits each episode: the compression penalty alone does not tell redundant episodes "
            "from useful ones on the synthetic task (bench.penalty_fidelity, `redundancy`)."
        ),
    )
    process_scope: Literal["all", "correct"] = Field(
        "all",
        description=(
            "all: the response score S_i of every response carries the process reward (paper). correct (this "
            "project's option, not the paper's): the process score only ranks a group's CORRECT responses, "
            "S_i = 1 + correct_bonus · u_i with u_i ∈ [−1, 1] the min–max rank of the paper score among them, "
            "and a wrong response scores its outcome 0, as the length penalty treats lengths (METHOD.md §6, §10)."
        ),
    )
    penalty_on: Literal["all", "no_gain"] = Field(
        "all",
        description=(
            "all: every episode pays β·P̂_k (METHOD.md §4). no_gain (this project's option, not the paper's): "
            "only episodes whose fitting gain G_k ≤ 0 pay it, r_k = G_k − β·P̂_k·1[G_k ≤ 0]: an episode that moves "
            "J toward the answer (a check that repairs a wrong step) is not charged for the parameters it engages, "
            "one that does not (a restatement, a repeat) still is."
        ),
    )
    correct_bonus: float = Field(0.5, ge=0.0, lt=1.0,
                                 description="Half-width of the process bonus under process_scope='correct'.")
    correct_floor: bool = Field(
        False,
        description=(
            "This project's option, not the paper's; any method: a correct response's group advantage is floored "
            "at 0 (A_i <- max(A_i, 0)), so shaping among correct responses (length, process score) pushes the "
            "better ones up and never the worse correct ones down on every token, their correct steps included."
        ),
    )

    @model_validator(mode="after")
    def _scope_needs_paper_credit(self):
        if self.additive_outcome != "outcome" and self.credit != "additive":
            raise ValueError(f"credit.additive_outcome={self.additive_outcome!r} sets the outcome term of "
                             f"credit='additive' and does nothing under credit={self.credit!r}; set "
                             "credit.credit='additive' or leave additive_outcome at 'outcome'")
        if self.process_scope == "correct" and self.credit == "additive":
            raise ValueError("credit.process_scope='correct' ranks the paper response score S_i and needs "
                             "credit.credit='paper' or 'broadcast'; with credit='additive' the score is already "
                             "the outcome alone")
        return self


class LossConfig(_Strict):
    """METHOD.md §5: clipped surrogate with a k3 KL to the frozen reference."""

    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_high: float = Field(0.2, ge=0.0)
    kl_coef: float = Field(0.001, ge=0.0)
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    logprob_temperature: Literal["sampling", "one"] = Field(
        "sampling",
        description="sampling: log π in the ratio, the KL and the surprise weights is that of the distribution the "
                    "rollouts were drawn from, logits ÷ the rollout temperature (as TRL's and verl's GRPO do); one: "
                    "the model's plain log π at temperature 1. J and the penalty always use temperature 1.")
    train_eos: bool = Field(False, description=(
        "Also train the end-of-sequence token that closes each finished response (as TRL's and verl's GRPO "
        "do): the policy gradient then moves the decision to stop, with the advantage of the response's last "
        "token. Off by default: the project's results so far train the response tokens only."))


class BaselineConfig(_Strict):
    """METHOD.md §6."""

    length_penalty_alpha: float = Field(0.1, ge=0.0)
    mrt_alpha: float = Field(1.0, ge=0.0)


class CopyingConfig(_Strict):
    """This project's option, not the paper's: the copy share c_k of each episode in the process
    reward, r_k^prg = G_k − β·P̂_k − γ·c_k (:mod:`l2t_core.rewards.copying`; the L2T family only)."""

    coef: float = Field(0.0, ge=0.0, description=(
        "γ, the weight of the copy share c_k (the share of the episode's token n-grams already in the prompt "
        "or the response before it). 0 (default): the paper's process reward. Neither the compression penalty "
        "nor the fitting gain tells a restatement or a repeated step from a useful episode on the synthetic "
        "task (AUC 0.48-0.59); c_k does (0.80-0.82; checks of easy steps only 0.63-0.69)."))
    ngram: int = Field(2, ge=1, description=(
        "n of the n-grams compared (an episode shorter than n is one n-gram of its tokens). 2 separates best "
        "on the synthetic task's samples (AUC 0.82 against 0.78 for 1 and 0.79 for 3)."))


class OracleConfig(_Strict):
    """A diagnostic control, not a method: the synthetic task's own redundancy label ℓ_k of each
    episode in the process reward, r_k^prg = G_k − β·P̂_k − γ·c_k − λ·ℓ_k
    (:mod:`l2t_core.rewards.oracle`; the L2T family only, and only on the task that gives the labels)."""

    coef: float = Field(0.0, ge=0.0, description=(
        "λ, the charge of an episode the task's classifier calls redundant (a restatement, a repeated step, "
        "a check of an easy step). 0 (default): off. No real task has these labels: it measures what a process "
        "reward that knew exactly which episodes are redundant would buy, the ceiling of per-episode credit."))
    hard_check_bonus: float = Field(0.0, ge=0.0, description=(
        "b: a check of a hard step (the useful check) gets the label -b, so it is paid lambda*b; 0 (default): "
        "labelled like a step."))
    task: TaskName = Field("walk", description=(
        "The synthetic task whose episode classifier gives the labels; a run must train on it (data.source)."))


class RewardConfig(_Strict):
    """Everything the reward path needs, one object, serialisable next to a checkpoint."""

    segmentation: SegmentationConfig = SegmentationConfig()
    fitting: FittingConfig = FittingConfig()
    compression: CompressionConfig = CompressionConfig()
    credit: CreditConfig = CreditConfig()
    copying: CopyingConfig = CopyingConfig()
    oracle: OracleConfig = OracleConfig()
    loss: LossConfig = LossConfig()
    baselines: BaselineConfig = BaselineConfig()


# --------------------------------------------------------------------------------------------
# Training (one TrainConfig per run, saved next to every checkpoint)
# --------------------------------------------------------------------------------------------

MethodName = Literal["grpo", "length_penalty", "mrt", "l2t", "l2t_no_penalty", "l2t_random_layers"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
# the methods with L2T's episode reward (fitting gain, penalty, episode credit, surprise weights)
L2T_FAMILY: tuple[str, ...] = ("l2t", "l2t_no_penalty", "l2t_random_layers")


class OptimConfig(_Strict):
    """METHOD.md §9: AdamW, lr 1e-6, cosine with 10% warm-up, weight decay 0.01."""

    lr: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm; 0 disables clipping.")


class RolloutConfig(_Strict):
    """How rollouts are sampled (METHOD.md §9: 8 per prompt, 4,096/16,384 prompt/completion tokens)."""

    engine: Literal["hf", "vllm"] = "hf"
    group_size: int = Field(8, ge=2, description=(
        "G, rollouts per prompt; at least 2: every method's advantage is relative to its group, and a group "
        "of one has advantage 0 (METHOD.md §4), so it would train on nothing."))
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(16384, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_batch_sequences: int = Field(256, ge=1, description="hf engine: sequences per generate call.")
    max_batch_tokens: int | None = Field(None, ge=1, description=(
        "hf engine: the most KV-cache positions one generate call holds, sequences x (longest prompt + "
        "max_new_tokens); a batch of prompts (shortest first) ends before it would pass them. None: "
        "max_batch_sequences alone. Bounds generation memory at long lengths (256 sequences of the paper's "
        "4,096 + 16,384 tokens would be 5.2M positions) and keeps a long context from padding short ones."))
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description=(
        "Share of the GPU's whole memory vLLM takes for its weights and KV cache. vLLM runs on the trainer's "
        "GPU, and refuses to start (or to wake up) unless that share is free, so it must leave room for the "
        "policy, the reference, the optimizer state and the update's activations. With "
        "vllm_enable_sleep_mode vLLM gives its memory back between rollouts and a larger share works "
        "(0.8 for DeepScaleR-1.5B on 8 x 80 GB, infra/train/deepscaler_1.5b.yaml)."))
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    # vLLM frees its KV cache and parks its weights on CPU while the trainer updates (same GPU)
    vllm_enable_sleep_mode: bool = False
    vllm_sleep_level: Literal[1, 2] = Field(1, description=(
        "With vllm_enable_sleep_mode: 1 parks vLLM's weights in CPU memory while it sleeps (a whole copy per "
        "rank); 2 drops them and copies them again from the trainer on waking (no CPU copy, no copy back; the "
        "trainer replaces them after every update anyway)."))

    def model_post_init(self, __context) -> None:
        if self.vllm_sleep_level == 2 and not self.vllm_enable_sleep_mode:
            raise ValueError("rollout.vllm_sleep_level 2 needs rollout.vllm_enable_sleep_mode: true "
                             "(without sleep mode vLLM never sleeps)")


class DataConfig(_Strict):
    """Training prompts: a synthetic task (``walk``, ``arithmetic``; see ``l2t_core/tasks``) or a
    math JSONL file in the data dir."""

    source: str = Field(
        "walk", description="'walk', 'arithmetic' (synthetic tasks) or a file name such as 'aime_1983_2023.jsonl'.")
    train_size: int = Field(2000, ge=1, description="Problems generated (synthetic tasks) or read at most (files).")
    min_steps: int = Field(1, ge=1, description="synthetic tasks: fewest steps (moves, terms) per problem.")
    max_steps: int = Field(4, ge=1, description="synthetic tasks: most steps (moves, terms) per problem.")
    seed: int = 0


class _RefusedURL:
    """Stands in for a URL with credentials while a config validates: pydantic shows a field's input
    in its error text and keeps it in ``errors()``, so the refused URL must not be that input."""

    def __init__(self, url: str, what: str):
        self.shown = redact_url(url)
        self.message = credentials_message(url, what)

    def __repr__(self) -> str:
        return repr(self.shown)


# the fields of TrainConfig that hold a location (a path, an fsspec URL or a hub id)
URL_FIELDS = ("policy", "out", "deepspeed_config")


class TrainConfig(_Strict):
    """One RL fine-tuning run. Serialised as ``train_config.json`` in every checkpoint.

    Its locations (``policy``, ``out``, ``deepspeed_config``) are saved and shown with the run, so
    a URL with credentials in it (``ftp://user:password@host/run``, ``https://token@host/...``,
    ``?X-Amz-Signature=...``) is refused, naming the field and the redacted URL; credentials come
    from the environment or fsspec ``storage_options`` instead (see :mod:`l2t_core.urls`).
    """

    method: MethodName = "l2t"
    policy: str = Field(..., min_length=1, description="Initial policy: a local HF directory or a hub id.")
    policy_revision: str | None = Field(None, min_length=1, description=(
        "For a hub id in policy: the branch, tag or commit to load (None: main as it is at load time). "
        "Every rank and the vLLM engine load that revision's files (l2t_core.hub.hub_snapshot); the run "
        "records the commit it is, and a resume refuses another (a moved branch)."))
    out: str = Field("runs/train", min_length=1, description="Run directory: a local path or any fsspec URL.")
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(32, ge=1, description="Prompts per step; batch = prompts × group_size.")
    micro_batch_tokens: int = Field(8192, ge=1, description="Tokens per forward/backward (grad accumulation).")
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps per rollout batch (PPO-style); 1 = one on-policy update per step."
    )
    head_chunk_tokens: int | None = Field(None, ge=1, description=(
        "The output head sees at most this many tokens at a time (the reward pass, the reference and the "
        "update), each chunk recomputed in a backward, so the [tokens, vocab] logits are never held at once "
        "(16,384 tokens × a 151,936-token vocabulary are 10 GB in fp32). None: a micro-batch's tokens at once. "
        "Not with DeepSpeed ZeRO-3 (refused: its partitioned head is not gathered in the recomputation)."))
    share_prompts: bool = Field(True, description=(
        "The reward pass, the reference log-probs and the update run each distinct prompt of a micro-batch once "
        "and expand its KV cache to the rollouts that share it (l2t_core.prefix_sharing), instead of once per "
        "rollout: G rollouts per prompt save the prompt's tokens G − 1 times. Results equal the unshared "
        "forward's up to float rounding. Off by itself where it cannot apply: the update under "
        "gradient_checkpointing, per-episode penalty backwards, DeepSpeed ZeRO-3 across ranks."))
    verify_workers: int = Field(0, ge=0, description=(
        "Worker processes that verify the rollouts' answers (math-verify) while the reward's policy pass runs "
        "(l2t_core.verify_pool): spawned once, reused every step, the same verdicts. 0: in the trainer's process, "
        "before the pass. Worth it where verification takes a share of the step and cores are free (a GPU node); "
        "a worker that dies or stalls is replaced and its rollouts verified again in new workers; a rollout that "
        "kills two workers that could verify scores 0 with status 'error' (l2t_core.verify_pool)."))
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute the decoder's activations during the policy update's backward instead of keeping them "
        "(transformers' gradient checkpointing): one layer's activations in memory instead of every layer's, "
        "for about a third more update compute; needed for the paper's 16,384-token responses on one GPU."))
    engine: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON (see infra/deepspeed/).")
    dist_timeout_minutes: float = Field(60.0, gt=0, description=(
        "engine=deepspeed: how long a rank waits in a collective for the others before the launch fails "
        "(DeepSpeed's default is 10 minutes; rank 0 publishing a checkpoint of a large model, or one rank's "
        "long generation, can take longer)."))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_rollouts: bool = True
    seed: int = 0
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()

    @model_validator(mode="before")
    @classmethod
    def _hide_url_credentials(cls, data):
        """A location with credentials becomes a _RefusedURL, which _no_url_credentials refuses."""
        if isinstance(data, dict):
            refused = {k: _RefusedURL(v, f"TrainConfig.{k}") for k in URL_FIELDS
                       if isinstance(v := data.get(k), str) and url_credentials(v)}
            if refused:
                data = {**data, **refused}
        return data

    @field_validator(*URL_FIELDS, mode="before")
    @classmethod
    def _no_url_credentials(cls, value):
        if isinstance(value, _RefusedURL):
            raise ValueError(value.message)
        return value

    def model_post_init(self, __context) -> None:
        check_revision_source(self.policy, self.policy_revision, "policy")
        if self.data.min_steps > self.data.max_steps:
            raise ValueError(
                f"data.min_steps ({self.data.min_steps}) is greater than data.max_steps ({self.data.max_steps})"
            )
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ValueError("engine='deepspeed' needs deepspeed_config (e.g. infra/deepspeed/zero2.json)")
        # the process reward's extra terms: only the l2t family has a process reward to charge them in
        for key, coef, does in (("reward.copying.coef", self.reward.copying.coef, "weighs the copy share"),
                                ("reward.oracle.coef", self.reward.oracle.coef, "charges the oracle label")):
            if coef > 0 and self.method not in L2T_FAMILY:
                raise ValueError(
                    f"{key} ({coef}) {does} in L2T's process reward, which method {self.method!r} does not have; "
                    f"use a method of the l2t family ({', '.join(L2T_FAMILY)}) or leave {key} at 0")
        o = self.reward.oracle
        if o.coef > 0 and self.data.source != o.task:
            raise ValueError(
                f"reward.oracle.coef ({o.coef}) labels episodes with the {o.task!r} task's classifier, but the run "
                f"trains on data.source {self.data.source!r}; the oracle exists only for the synthetic tasks: set "
                f"reward.oracle.task to the task trained on ({', '.join(get_args(TaskName))}) or leave "
                "reward.oracle.coef at 0")
        f = self.reward.fitting
        if f.estimator == "continuation" and f.continuation_budget > self.rollout.max_new_tokens:
            raise ValueError(
                f"reward.fitting.continuation_budget ({f.continuation_budget}) exceeds rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens}): a continuation would get more tokens than the policy's own "
                "responses; set it to rollout.max_new_tokens")
        if self.rollout.engine == "vllm":  # before any compute: vLLM would sample these at 0.01
            from .rollout.base import check_vllm_temperature

            check_vllm_temperature(self.rollout.temperature, "rollout.temperature")
            if f.estimator in ("monte_carlo", "continuation"):  # J's samples come from the rollout engine
                check_vllm_temperature(f.mc_temperature, "reward.fitting.mc_temperature")
