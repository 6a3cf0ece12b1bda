"""Models on the Hugging Face hub: what can name one (:func:`could_be_hub_id`), which commit a
revision of one is (:func:`hub_commit`), and its files at a revision in the local hub cache
(:func:`hub_snapshot`). A commit names a model's files exactly: the pipeline pins a registry's
hub model to the commit it found, and a run names it in ``TrainConfig.policy_revision``, so a
branch that moves upstream never changes what a run trained from or was compared with.

Downloads go through ``huggingface_hub`` into its cache (``HF_HOME``); offline
(``HF_HUB_OFFLINE=1``) the cache answers.
"""

from __future__ import annotations

import re
from pathlib import Path

# a full commit hash: a revision that names one fixed set of files
COMMIT = re.compile(r"[0-9a-f]{40}")


def could_be_hub_id(name: str) -> bool:
    """Whether ``name`` can name a model on the hub (``org/name`` or a bare ``name``) rather than
    only a local path (absolute, ``./``, ``~``, deeper than one ``/``, or with backslashes)."""
    return not (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name)


# what from_pretrained reads of a hub model besides its weights: config, generation config and
# tokenizer files (top level only: no onnx/, original/, ... copies)
HUB_MODEL_FILES = ("*.json", "*.txt", "*.model", "*.model.v*", "*.tiktoken", "*.jinja")
# its weights: the safetensors shards, else (a model saved before safetensors) the PyTorch ones;
# not a second, consolidated copy of them (Mistral's consolidated.safetensors) nor training_args.bin
SAFETENSORS_WEIGHTS = ("*.safetensors",)
PYTORCH_WEIGHTS = ("pytorch_model*.bin",)
NOT_DOWNLOADED = ("*/*", "consolidated*")


def _hub_error(repo_id: str, revision: str | None, exc: Exception):
    """The :class:`~l2t_core.models.ModelLoadError` of a hub call that failed with ``exc``."""
    from .models import ModelLoadError

    return ModelLoadError(
        f"hub model {repo_id!r} at revision {revision or 'main'!r}: {type(exc).__name__}: {exc} Check the id and "
        "the revision (a branch, tag or 40-digit commit); a gated or private model needs HF_TOKEN; offline "
        "(HF_HUB_OFFLINE=1) the model must be in the hub cache (HF_HOME) at that revision")


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit that ``revision`` (a branch, tag or commit; None: the default branch) of hub
    model ``repo_id`` is now: the hub's answer online, the hub cache's offline or when the hub
    cannot be reached. Fetches the model's ``config.json`` only (``hf_hub_download``); a commit
    names the model's files exactly, so a branch that moves later is seen as another model."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as exc:  # noqa: BLE001 - every failure of the hub client (not found, no such revision,
        # gated, offline and not cached, an invalid name, a proxy, a transfer) becomes one error that says what to check
        raise _hub_error(repo_id, revision, exc) from exc
    return Path(config).parent.name  # the cache keeps a commit's files in snapshots/<commit>/


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local directory of hub model ``repo_id`` at ``revision`` (a branch, tag or commit;
    None: the default branch), downloaded into the hub cache (``HF_HOME``) where it is not there
    yet: config, generation config and tokenizer files and the weights (``*.safetensors``, else
    ``pytorch_model*.bin``), top level only (:data:`HUB_MODEL_FILES`, :data:`NOT_DOWNLOADED`).
    The directory's name is the commit (:func:`hub_commit`). Offline (``HF_HUB_OFFLINE=1``), the
    cache's copy. Fails with :class:`~l2t_core.models.ModelLoadError` naming the model, the
    revision and why."""
    from huggingface_hub import snapshot_download

    from .models import check_model_source, weight_files

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=[*HUB_MODEL_FILES, *SAFETENSORS_WEIGHTS],
                                          ignore_patterns=list(NOT_DOWNLOADED)))
        if not weight_files(snapshot):  # a model saved before safetensors: its PyTorch weights
            snapshot = Path(snapshot_download(repo_id, revision=snapshot.name, allow_patterns=list(PYTORCH_WEIGHTS),
                                              ignore_patterns=list(NOT_DOWNLOADED)))
    except Exception as exc:  # noqa: BLE001 - as in hub_commit
        raise _hub_error(repo_id, revision, exc) from exc
    check_model_source(snapshot)
    return snapshot


def check_revision_source(name: str, revision: str | None, field: str) -> None:
    """A config's ``<field>_revision`` applies to a hub id only: fail, naming both fields, where
    ``name`` cannot be one (an absolute or ``./`` path, a URL). A relative path that could be a
    hub id passes here; :func:`~l2t_core.models.model_source` refuses it where it exists."""
    if revision is not None and ("://" in name or not could_be_hub_id(name)):
        raise ValueError(f"{field}_revision ({revision!r}) names a commit, branch or tag of a hub model, but {field} "
                         f"({name!r}) is a local path or URL; unset {field}_revision or set {field} to a hub id "
                         "('org/name')")
