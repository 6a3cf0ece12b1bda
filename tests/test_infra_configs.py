"""The run configurations shipped in ``infra/train/`` stay valid: each parses through the command
line's layering as a ``TrainConfig`` for every method, names files that exist, and keeps the
budget its comments promise (batch, epoch, sequence length)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from l2t_core.cli import build_config
from l2t_core.config import METHOD_NAMES, TrainConfig
from l2t_core.data import data_dir
from l2t_core.engines.deepspeed_engine import load_ds_config
from l2t_core.training_data import load_training_problems

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "infra" / "train").glob("*.yaml"))


def cli_config(path: Path, method: str | None = None, sets: list[str] | None = None) -> TrainConfig:
    args = SimpleNamespace(config=str(path), set=sets or [], method=method, policy=None, out=None, steps=None)
    return build_config(TrainConfig, args, {"policy": "policy", "method": "method", "out": "out", "steps": "steps"})


def test_there_are_shipped_configs():
    assert CONFIGS, "infra/train/ holds no run configuration"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_shipped_config_is_valid_for_every_method(path, method):
    cfg = cli_config(path, method=method)
    assert cfg.method == method
    assert cfg.rollout.group_size * cfg.prompts_per_step == 256  # METHOD.md §9: batch 256
    assert cfg.prompts_per_step % 8 == 0  # every rank of an 8-GPU launch gets the same number of prompts
    # one full-length sequence fits a micro-batch, and the generation budget is the paper's
    assert cfg.micro_batch_tokens >= cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens) == (4096, 16384)
    assert cfg.optim.lr == 1e-6 and cfg.reward.credit.alpha == 0.8 and cfg.reward.credit.beta == 0.6
    assert cfg.gradient_checkpointing and cfg.head_chunk_tokens


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_files_exist_and_its_data_is_one_epoch(path):
    cfg = cli_config(path)
    if cfg.deepspeed_config:
        ds = load_ds_config(str(ROOT / cfg.deepspeed_config), cfg.optim, on_gpu=False)
        assert ds["gradient_clipping"] == cfg.optim.grad_clip
    if not (data_dir() / cfg.data.source).is_file():
        pytest.skip(f"{cfg.data.source} is not in the data directory {data_dir()}")
    problems = load_training_problems(cfg.data)
    assert len(problems) == cfg.data.train_size  # the whole file, as the comments say
    assert cfg.steps * cfg.prompts_per_step >= len(problems) > (cfg.steps - 1) * cfg.prompts_per_step


SFT_CONFIGS = sorted((ROOT / "infra" / "sft").glob("*.yaml"))


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=[p.name for p in SFT_CONFIGS])
def test_shipped_sft_config_is_valid_and_spans_the_epochs_it_promises(path, tmp_path):
    """Each file in infra/sft/ parses as an SFTConfig through the command line, its steps cover the
    two epochs of the held-in traces its comments promise, and `l2t traces` makes its data from
    the named data-directory file with the row count the comments give."""
    import re

    from l2t_core.data import data_file, read_math_file
    from l2t_core.sft import SFTConfig
    from l2t_core.traces import traces

    args = SimpleNamespace(config=str(path), set=[], model=None, data=None, out=None, steps=None)
    cfg = build_config(SFTConfig, args, {"model": "model", "data": "data", "out": "out", "steps": "steps"})
    text = path.read_text()
    rows = int(re.search(r"# (\d[\d,]*) traces, all tagged", text).group(1).replace(",", ""))
    assert cfg.steps == -(-2 * (rows - cfg.eval_size) // cfg.batch_size)  # two epochs, rounded up
    assert cfg.batch_size % cfg.micro_batch_size == 0 and cfg.checkpoint_every and cfg.gradient_checkpointing
    source = re.search(r"l2t traces (\S+) --out (\S+)", text)
    assert source.group(2) == cfg.data
    try:
        made, outcomes = traces(read_math_file(data_file(source.group(1))))
    except FileNotFoundError:
        pytest.skip(f"{source.group(1)} is not in the data directory {data_dir()}")
    assert len(made) == rows and outcomes == {"ok": rows}


def test_overrides_on_the_command_line_win_over_the_file():
    cfg = cli_config(CONFIGS[0], method="grpo", sets=["policy=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                                                       "data.train_size=4000", "steps=125"])
    assert (cfg.method, cfg.policy, cfg.data.train_size, cfg.steps) == (
        "grpo", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 4000, 125)


def test_the_7b_variant_in_the_header_validates():
    cfg = cli_config(CONFIGS[0], sets=["deepspeed_config=infra/deepspeed/zero3_offload.json", "head_chunk_tokens=null"])
    assert cfg.deepspeed_config.endswith("zero3_offload.json") and cfg.head_chunk_tokens is None
    assert (ROOT / cfg.deepspeed_config).is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "infra" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_accumulate_and_reduce_gradients_in_fp32(path):
    """Under bf16 DeepSpeed accumulates the micro-batches' gradients in the model's dtype and
    reduces them over the ranks in it unless told otherwise (bf16 keeps 8 bits of mantissa: a sum of
    many micro-batches loses the small ones). Every shipped config asks for fp32, and DeepSpeed's
    own parser reads it so, with bf16 on as on a GPU."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the distributed extra)")
    from deepspeed.runtime.config import DeepSpeedConfig

    from l2t_core.config import OptimConfig

    ds = load_ds_config(str(path), OptimConfig(), on_gpu=False)
    ds["bf16"] = {"enabled": True}
    parsed = DeepSpeedConfig(ds)
    assert parsed.bfloat16_config.enabled and parsed.zero_optimization_stage in (2, 3)
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
