"""Loading policies and tokenizers, and building the tiny local ones the tests and demo use.

Real users load Hugging Face checkpoints with :func:`load_policy` (``from_pretrained`` on a hub id
or a local directory). Tests and the CPU demo build a tiny Qwen2-architecture model and a
byte-level BPE tokenizer here, save them with ``save_pretrained`` and load them back through the
same :func:`load_policy` path, so no hub access is ever needed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable

import torch

from .hub import could_be_hub_id, hub_snapshot

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


@contextlib.contextmanager
def transformers_bars_off():
    """Inside, transformers draws no progress bars (its "Loading weights" and "Writing model shards"
    bars of every load and save), for jobs that show their own progress; restored on exit."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def eval_mode(model):
    """Inside, ``model`` is in eval mode (no dropout); its training mode is restored on exit, also
    after an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on ``corpus`` (any text; every byte stays encodable).

    Byte-level BPE gives real multi-character tokens, real offset mappings and tokens that can
    straddle episode boundaries, like the production tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of the bytes used by byte-level pre-tokenisation (GPT-2's
    mapping), in byte order, so that token id b is byte b."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def reasoning_tags(max_episodes: int = 30) -> list[str]:
    """``<think>``, ``</think>`` and the ``<episode_k>``/``</episode_k>`` tags, k = 1..max_episodes."""
    return ["<think>", "</think>"] + [f"<episode_{k}>" for k in range(1, max_episodes + 1)] + [
        f"</episode_{k}>" for k in range(1, max_episodes + 1)
    ]


def build_char_tokenizer(max_episodes: int = 30, *, force_phrase: bool = True):
    """A character-level tokenizer: one token per byte (so one per ASCII character, and any text
    stays encodable), plus the reasoning tags of :func:`reasoning_tags` as single tokens.

    Token id b (< 256) is byte b; then come the special tokens ``<|endoftext|>`` (eos) and
    ``<|pad|>`` (pad), then the tags, then (``force_phrase``) the force-answer instruction
    :data:`~l2t_core.prompts.FORCE_ANSWER_INSTRUCTION` as ONE token. Like a subword tokenizer's
    merges would, that keeps the suffix f of METHOD.md §2 short (14 tokens with a ``\boxed{d}``
    answer instead of 89 character tokens), so the K+1 copies of f ⊕ a that the packed J pass lays
    after a response cost about what they cost with a real model's tokenizer, not 4x the response;
    the text of f is unchanged. The added tokens are ordinary (non-special), so
    ``decode(..., skip_special_tokens=True)`` keeps them. Encoding is unique (no merges), so
    re-tokenising decoded text gives back the same ids, and offsets are character offsets.
    """
    from .prompts import FORCE_ANSWER_INSTRUCTION

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if max_episodes < 1:
        raise ValueError(f"build_char_tokenizer: max_episodes must be >= 1, got {max_episodes}")
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in reasoning_tags(max_episodes)])
    if force_phrase:
        tok.add_tokens([AddedToken(FORCE_ANSWER_INSTRUCTION, special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_qwen2(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 160,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A randomly initialised Qwen2ForCausalLM of a few hundred thousand parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = attn_implementation
    return model.float().eval()


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA where available, else the CPU; a CUDA device without one is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return torch.device(name)


class ModelLoadError(FileNotFoundError):
    """:func:`load_policy` found no model where it was told to look (no directory, no config or
    weights in it, or nothing on the hub or in its cache); the message says which."""


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Fail fast, loading nothing, when ``name_or_path`` cannot hold a model: a path that does not
    exist and cannot be a hub id (``org/name``), or a local directory without ``config.json`` or
    weights (:class:`ModelLoadError`, naming what is missing). A hub id passes: only loading can
    tell whether the hub has it."""
    path = Path(name_or_path)
    name = str(name_or_path)
    if not path.exists():
        if not could_be_hub_id(name):
            raise ModelLoadError(f"load_policy: {name} does not exist, and it cannot be a hub id (those read "
                                 "'org/name'); check the path, or train/save the model there first")
        return
    if not (path / "config.json").exists():
        raise ModelLoadError(f"load_policy: {path} has no config.json; is it a saved model directory?")
    if not weight_files(path):
        raise ModelLoadError(f"load_policy: {path} has a config.json but no weights (*.safetensors or *.bin); "
                             "save the model with save_pretrained or point at the complete checkpoint")


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a saved model directory: its ``*.safetensors``, else its ``*.bin``."""
    d = Path(directory)
    return sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))


def weight_files_sha256(directory: str | os.PathLike) -> dict[str, str]:
    """The SHA-256 of each of a saved model directory's weight files (:func:`weight_files`), by
    file name: what tells one version of a model at a path from another."""
    from .sft import file_sha256

    return {f.name: file_sha256(f) for f in weight_files(directory)}


def weights_fingerprint(name_or_path: str | os.PathLike, files: dict[str, str] | None = None) -> str:
    """One string that names a model's weights by content: the SHA-256 of its weight files'
    names and hashes (``files``, :func:`weight_files_sha256` of a local directory, read here when
    not given), or ``hub:<id>`` for a hub id (its files are the hub's)."""
    import hashlib
    import json

    if files is None:
        if not Path(name_or_path).is_dir():
            return f"hub:{name_or_path}"
        files = weight_files_sha256(name_or_path)
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def model_source(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """What ``from_pretrained`` loads for ``name_or_path`` at ``revision``: ``name_or_path``
    itself without a revision; with one, the local copy of that revision of the hub model
    (:func:`hub_snapshot`), which every rank, the vLLM engine and a resumed run then read alike.
    A revision of a local directory, or of a name that cannot be a hub id, is an error."""
    name = str(name_or_path)
    if revision is None:
        return name
    if Path(name).exists() or not could_be_hub_id(name):
        raise ValueError(f"a revision ({revision!r}) names a commit, branch or tag of a hub model, but {name!r} is "
                         f"{'a local path' if Path(name).exists() else 'no hub id'}; drop the revision, or name the "
                         "hub model ('org/name')")
    return str(hub_snapshot(name, revision))


def ranks_model_source(name_or_path: str | os.PathLike, revision: str | None, main: bool) -> str:
    """:func:`model_source` on every rank of a launch, of ONE commit. A branch or tag can move
    while the ranks start, so each resolving it would load whatever it was then: here rank 0
    (``main``) resolves ``revision`` and downloads that commit, and the other ranks then load the
    same commit (a cache they share holds it already; their own caches download it by commit).
    Plain :func:`model_source` on one process, without a revision, or for a revision that is a
    commit already. A collective where a process group exists: every rank calls it."""
    from .engines.ranks import all_gather_objects, initialized_group, on_every_rank, on_rank_0
    from .hub import COMMIT

    if revision is None or COMMIT.fullmatch(revision) or initialized_group() is None:
        return model_source(name_or_path, revision)
    first = on_rank_0(main, lambda: model_source(name_or_path, revision),
                      f"find {str(name_or_path)!r} at revision {revision!r}")
    commit = all_gather_objects(Path(first).name if main else None)[0]  # the snapshot's name is its commit
    # a rank that cannot get that commit (its own cache, offline) stops every rank, not only itself
    return on_every_rank(lambda: first if main else model_source(name_or_path, commit),
                         f"find {str(name_or_path)!r} at commit {commit} (revision {revision!r})")


def load_policy(name_or_path: str | os.PathLike, *, revision: str | None = None, dtype: torch.dtype | None = None,
                device: str = "cpu"):
    """Load (model, tokenizer) with ``from_pretrained``; a hub id or a local directory, and for a
    hub id a ``revision`` (:func:`model_source`).

    Fails before any compute (:class:`ModelLoadError`, :func:`check_model_source`) with a message
    naming what is missing: no such directory, no config or weights in it, or a hub id that neither
    the hub nor its local cache has.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = model_source(name_or_path, revision)
    check_model_source(name_or_path)
    name = str(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        if Path(name).exists():
            raise
        raise ModelLoadError(f"load_policy: {name} is no local directory, and it could not be loaded from the hub or "
                             f"its local cache: {exc} Offline, give a saved model directory or a hub id already in "
                             "the cache (HF_HUB_OFFLINE=1)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool = True):
    """Inside, the decoder layers of ``model`` keep no activations for the backward pass and
    recompute them during it (transformers' gradient checkpointing, non-reentrant): activation
    memory drops from one set per layer to one layer's, for about one extra forward pass of compute.

    The trainer wraps only its policy update in this (``TrainConfig.gradient_checkpointing``): the
    reward pass reads the penalty's target layer through forward hooks and its backward ends inside
    the last block, where a recomputation would only add work (and could run those hooks again).
    Transformers applies it only in training mode and where autograd records.
    """
    if not enabled:
        yield model
        return
    check_activation_checkpointing(model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield model
    finally:
        (model.activation_checkpointing_disable if hasattr(model, "activation_checkpointing_disable")
         else model.gradient_checkpointing_disable)()


def is_checkpointing(model) -> bool:
    """Whether any module of ``model`` recomputes its activations (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def check_activation_checkpointing(model) -> None:
    """Fail before any compute if ``model`` cannot recompute its activations."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it (transformers' "
                         "supports_gradient_checkpointing is False); set gradient_checkpointing: false")


def decoder_and_head(model):
    """(decoder stack, output head) of a causal LM: the hidden-state model and its lm_head."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if head is None or decoder is None:
        raise TypeError(
            f"{type(model).__name__} exposes no decoder/output head; L2T needs a causal LM such as Qwen2"
        )
    return decoder, head
