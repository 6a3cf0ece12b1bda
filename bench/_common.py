"""Shared pieces of the benchmarks: the trainer benchmarks' workspace (``bench.reward_overhead``,
``bench.trainer_vs_trl``) and the runner of the benchmarks on a trained policy
(``bench.penalty_fidelity``, ``bench.continuation_j``).

Everything is built locally, nothing comes from a hub: a synthetic math JSONL in a temporary data
directory, a byte-level BPE tokenizer trained on text shaped like the prompts and responses, and a
tiny random-init Qwen2 saved with ``save_pretrained`` so both trainers load it the production way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

DATA_FILE = "bench.jsonl"


@dataclass(frozen=True)
class Workspace:
    root: Path
    data_dir: Path  # holds DATA_FILE; point L2T_DATA_DIR here
    model_dir: Path  # save_pretrained model + tokenizer
    parameters: int
    hidden: int
    layers: int
    vocab: int


def problems(n: int) -> list[dict]:
    """``n`` synthetic rows ``{id, problem, answer}`` with small integer answers."""
    return [{"id": f"p{i}", "problem": f"Add {i} and {i + 3}, then multiply the sum by 2.",
             "answer": str(2 * (2 * i + 3))} for i in range(n)]


def build_workspace(root: str | os.PathLike, *, n_problems: int = 64, hidden: int = 128, layers: int = 4,
                    vocab: int = 400, seed: int = 0, intermediate: int | None = None, heads: int = 4,
                    kv_heads: int = 2) -> Workspace:
    """Write the data file and the tiny model + tokenizer under ``root``."""
    from l2t_core.models import build_tiny_qwen2, build_tokenizer
    from l2t_core.prompts import build_prompt

    root = Path(root)
    rows = problems(n_problems)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [build_prompt(r["problem"]) for r in rows[:8]] + [
        f"<think>\n<episode_1>{r['problem']}</episode_1>\n<episode_2>So the sum is {r['answer']}.</episode_2>\n"
        f"</think>\n\n\\boxed{{{r['answer']}}}" for r in rows]
    tok = build_tokenizer(corpus * 4, vocab_size=vocab)
    model = build_tiny_qwen2(len(tok), hidden_size=hidden, num_layers=layers, intermediate_size=intermediate or hidden * 3,
                             num_heads=heads, num_kv_heads=kv_heads, seed=seed)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return Workspace(root, data_dir, model_dir, sum(p.numel() for p in model.parameters()), hidden, layers, len(tok))


@contextlib.contextmanager
def data_dir_env(path: str | os.PathLike) -> Iterator[None]:
    """Point ``L2T_DATA_DIR`` at ``path`` for the duration of the block, then restore it."""
    old = os.environ.get("L2T_DATA_DIR")
    os.environ["L2T_DATA_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("L2T_DATA_DIR", None)
        else:
            os.environ["L2T_DATA_DIR"] = old


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads (None: leave as is), then restore."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


THREADS_NOTE = ("one thread by default: on a shared 2-core machine, 2 OpenMP threads spin-wait behind other "
                "processes and small kernels slow down by up to ~100x")


def log(msg: str, tag: str = "bench") -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def emit(out: dict) -> dict:
    """Print ``out`` as ONE JSON object on stdout and return it."""
    json.dump(out, sys.stdout, indent=1, default=str)
    print()
    sys.stdout.flush()
    return out


@contextlib.contextmanager
def tiny_policy() -> Iterator[Path]:
    """A tiny random-init Qwen2 with the character tokenizer, saved the production way (the
    ``--quick`` smoke runs of the benchmarks on a trained policy)."""
    import tempfile

    from l2t_core.models import build_char_tokenizer, build_tiny_qwen2

    with tempfile.TemporaryDirectory(prefix="l2t-bench-policy-") as tmp:
        tok = build_char_tokenizer()
        model = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=2, intermediate_size=64, seed=0)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        yield Path(tmp)


def policy_rollouts(model, tok, *, problems: int, group: int, temperature: float, max_new_tokens: int,
                    levels: tuple[int, int], seed: int):
    """``group`` sampled rollouts of each of ``problems`` held-out walk problems (levels ``levels``)
    through the trainer's ``hf`` engine: (rollouts as the reward path takes them, the sampling's
    seconds, the engine, which the sampled J estimators reuse)."""
    import time

    from l2t_core.rewards.l2t import Rollout
    from l2t_core.rollout import SamplingParams
    from l2t_core.rollout.hf import HFRolloutEngine
    from l2t_core.tasks import walk

    probs = walk.dataset(problems, levels[0], levels[1], seed=seed + 11, split="heldout")
    engine = HFRolloutEngine(model, tok)
    prompts = [tok(walk.build_task_prompt(p), add_special_tokens=False)["input_ids"] for p in probs]
    t0 = time.perf_counter()
    groups = engine.generate(prompts, SamplingParams(n=group, temperature=temperature, top_p=1.0,
                                                     max_new_tokens=max_new_tokens, seed=seed))
    rollout_s = time.perf_counter() - t0
    rollouts = [Rollout(list(c.prompt_ids), list(c.response_ids), c.text, p.answer, gid, c.finished)
                for gid, (p, g) in enumerate(zip(probs, groups)) for c in g]
    return rollouts, rollout_s, engine


def policy_facts(model, policy) -> dict:
    """What every benchmark on a trained policy reports about where it ran."""
    return {"policy": str(policy), "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(), "device": "cpu"}


def run_and_emit(run: Callable[..., dict], *, quick: bool, **kw) -> dict:
    """``run(**kw)`` with libraries' stdout chatter (DeepSpeed's accelerator banner, TRL and
    transformers notices) sent to stderr; adds ``quick`` and ``seconds`` and prints the result as
    one JSON object on stdout."""
    import time

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        out = run(**kw)
    out["quick"] = quick
    out["seconds"] = time.perf_counter() - t0
    return emit(out)


def run_on_policy(name: str, run: Callable[..., dict], policy: str, *, quick: bool, quick_kw: dict, **kw) -> dict:
    """``run(policy, **kw)`` on a trained checkpoint of the synthetic task (``quick``: on
    :func:`tiny_policy` with ``quick_kw`` over ``kw``), its logging kept off stdout; adds ``quick``
    and ``seconds`` and prints the result as one JSON object."""
    import time

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        if quick:
            with tiny_policy() as path:
                out = run(str(path), **{**kw, **quick_kw})
        else:
            if not Path(policy).exists():  # a checkpoint of the synthetic task: always local
                raise SystemExit(f"bench.{name}: no checkpoint at {policy}; make one with "
                                 f"`l2t warmstart --out {policy}` or pass --policy DIR")
            out = run(policy, **kw)
    out["quick"] = quick
    out["seconds"] = time.perf_counter() - t0
    return emit(out)


def policy_parser(doc: str | None):
    """The argument parser of a benchmark on a trained policy, with its ``--policy`` argument."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/warmstart",
                    help="trained checkpoint of the synthetic task (make one: l2t warmstart --out runs/warmstart)")
    return ap
