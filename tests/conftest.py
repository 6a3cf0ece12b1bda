"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny Qwen2 models, built here, saved with
``save_pretrained`` and loaded back through the production ``load_policy`` path."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch

import _exclusive
from l2t_core.models import build_tiny_qwen2, build_tokenizer, load_policy

CORPUS = [
    "<think>\n<episode_1>We add 3 and 4 to get 7.</episode_1>\n<episode_2>Then 7 * 2 = 14.</episode_2>\n"
    "</think>\n\nThe answer is \\boxed{14}",
    "Compute (3 + 4) * 2. Break down your reasoning into logically coherent segments.",
    "Please output the final answer directly based on the above steps: \\boxed{42}",
    "Let x = 5. Check: 5 - 2 = 3. So the result is 3.\n\nRe-check the sum once more.",
] * 10

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# Tiny models run fastest on one thread; on a shared 2-core machine two OpenMP threads spin-wait
# behind other processes and small kernels stall (tests that need more set it themselves).
torch.set_num_threads(1)


_LOCK_DIR = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist's controller, for each worker it starts: the run's lock directory for tests
    marked `exclusive` (tests/_exclusive.py), made with the first worker, goes in its workerinput."""
    config = node.config
    if _LOCK_DIR not in config.stash:
        config.stash[_LOCK_DIR] = _exclusive.make_lock_dir()
    node.workerinput[_exclusive.WORKERINPUT_KEY] = config.stash[_LOCK_DIR]


def pytest_unconfigure(config):
    if _LOCK_DIR in config.stash:
        _exclusive.remove_lock_dir(config.stash[_LOCK_DIR])


def pytest_collection_modifyitems(config, items):
    """Test files in the order make test's workers take them (``--dist loadfile
    --no-loadscope-reorder`` hands out files in collection order): the files with the most slow
    tests first, so that neither worker is left with a long file at the end while the other idles
    (longest first); the files with exclusive tests last, where waiting for their turn (for the
    other worker's test in progress to end) costs least. Within a file the order is kept."""
    files: dict = {}
    for pos, item in enumerate(items):
        f = files.setdefault(item.path, {"pos": pos, "slow": 0, "exclusive": False})
        f["slow"] += item.get_closest_marker("slow") is not None
        f["exclusive"] |= item.get_closest_marker("exclusive") is not None
    items.sort(key=lambda item: (files[item.path]["exclusive"], -files[item.path]["slow"], files[item.path]["pos"]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    lock_dir = getattr(item.config, "workerinput", {}).get(_exclusive.WORKERINPUT_KEY)  # None: not a worker
    with _exclusive.turn(item.get_closest_marker("exclusive") is not None, lock_dir):  # setup, call and teardown
        yield


@pytest.fixture(scope="session", autouse=True)
def _data_dir_env():
    if "L2T_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
        os.environ["L2T_DATA_DIR"] = str(SHARED_DATA)
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 + tokenizer saved in HF format (8 layers; down_proj 64x160)."""
    d = tmp_path_factory.mktemp("tiny_qwen2")
    tok = build_tokenizer(CORPUS, vocab_size=320)
    model = build_tiny_qwen2(len(tok), hidden_size=64, num_layers=8, intermediate_size=160, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    torch.manual_seed(0)
    return load_policy(tiny_dir)


@pytest.fixture(scope="session")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="session")
def micro_model():
    """A very small model (a few thousand parameters) for brute-force Fisher computations."""
    return build_tiny_qwen2(40, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=12, seed=1)


@contextlib.contextmanager
def moto_s3(monkeypatch, bucket: str, env: dict[str, str]):
    """A local S3-compatible server (moto's server mode on 127.0.0.1, a free port) with ``bucket``
    created and the environment (``env`` plus region and AWS_ENDPOINT_URL) pointing at it.
    Yields (boto3 client, endpoint URL). Skips where moto is not installed."""
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {**env, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        import boto3
        import fsspec

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        fsspec.filesystem("s3").clear_instance_cache()  # no cached client with another endpoint
        yield client, endpoint
    finally:
        server.stop()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face hub cache of this test's own (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``,
    in this process and the processes it starts): ``publish(repo_id, model_dir, commit, refs)``
    puts the files of a saved model in it as ``huggingface_hub`` keeps a download
    (``models--org--name/snapshots/<commit>/``) and points the branches or tags ``refs`` at that
    commit (``refs/<ref>``), as a user's cache is filled before going offline. The code under test
    reads it through the real ``huggingface_hub``/``transformers`` offline mode; no hub is reached."""
    import shutil

    from huggingface_hub import constants

    root = tmp_path / "hf_hub_cache"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def publish(repo_id: str, model_dir: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(commit)
        return snapshot

    return publish
