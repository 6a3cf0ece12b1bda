"""The UI path for real: ``dagster-webserver`` on the repository's ``workspace.yaml`` in a
subprocess; through its GraphQL API a materialization of ``datasets`` is launched (the webserver's
run launcher runs it in a subprocess), followed to SUCCESS, and its metadata read back.

Everything the run writes goes to temporary directories (DAGSTER_HOME, the DuckDB file, run
storage, models). The instance is ``dagster_home/dagster.yaml`` with one change: runs start at
once (``DefaultRunCoordinator``) because no ``dagster-daemon`` drains a queue here (``dagster dev``
runs one).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
import requests
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 150
RUN_TIMEOUT_S = 180

WORKSPACE = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name jobs { name } } }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

LAUNCH = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status assetSelection { path } }
    ... on Error { message }
  }
}
"""

RUN_ERRORS = """
query RunLogs($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message level } } }
  }
}
"""

MATERIALIZATION = """
query Latest($assetKey: AssetKeyInput!) {
  assetOrError(assetKey: $assetKey) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          __typename
          label
          ... on IntMetadataEntry { intValue }
          ... on MarkdownMetadataEntry { mdStr }
        }
      }
    }
  }
}
"""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    artifacts: Path
    entry: dict | None = None  # the code location's workspace entry, once loaded

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def graphql(self, query: str, **variables) -> dict:
        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60)
        assert r.status_code == 200, f"GraphQL HTTP {r.status_code}: {r.text[:2000]}"
        body = r.json()
        assert not body.get("errors"), f"GraphQL errors: {body['errors']}"
        return body["data"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the webserver and what it started (its code server, run processes): its own process group."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_until_loaded(server: Server) -> dict:
    """Wait for the HTTP server, then for the code location; returns its workspace entry."""
    deadline = time.monotonic() + START_TIMEOUT_S
    entry = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/server_info", timeout=5).status_code == 200:
                ws = server.graphql(WORKSPACE)["workspaceOrError"]
                assert ws["__typename"] == "Workspace", ws
                (entry,) = ws["locationEntries"]
                if entry["loadStatus"] == "LOADED":
                    loc = entry["locationOrLoadError"]
                    assert loc["__typename"] == "RepositoryLocation", f"code location failed to load: {loc}"
                    return entry
        except requests.ConnectionError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"dagster-webserver not ready after {START_TIMEOUT_S}s (last entry {entry}):\n"
                       f"{server.log_tail()}")


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    artifacts = tmp_path_factory.mktemp("l2t_artifacts")
    instance = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())
    instance["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    env = {**os.environ, "DAGSTER_HOME": str(home), "L2T_DUCKDB_PATH": str(artifacts / "l2t.duckdb"),
           "L2T_STORAGE_URL": str(artifacts / "storage"), "L2T_MODELS_DIR": str(artifacts / "models"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    for var in ("L2T_LAUNCHER", "L2T_MODEL_REGISTRY", "DAGSTER_WEBSERVER_PORT", "DAGSTER_WEBSERVER_HOST"):
        env.pop(var, None)
    port = _free_port()
    log = home / "webserver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
             "-w", str(ROOT / "workspace.yaml")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, artifacts)
    try:
        server.entry = _wait_until_loaded(server)
        yield server
    finally:
        _stop(proc)


def test_materialize_datasets_through_graphql(webserver):
    entry = webserver.entry
    (repo,) = entry["locationOrLoadError"]["repositories"]
    jobs = {j["name"] for j in repo["jobs"]}
    assert {"__ASSET_JOB", "baseline_job", "training_job", "evaluation_job"} <= jobs, jobs

    launched = webserver.graphql(LAUNCH, executionParams={
        "selector": {"repositoryLocationName": entry["name"], "repositoryName": repo["name"],
                     "jobName": "__ASSET_JOB", "assetSelection": [{"path": ["datasets"]}]},
        "runConfigData": {},  # DatasetsConfig and the resources run on their defaults
    })["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline, status = time.monotonic() + RUN_TIMEOUT_S, None
    while time.monotonic() < deadline:
        run = webserver.graphql(RUN, runId=run_id)["runOrError"]
        assert run["__typename"] == "Run", run
        status = run["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(1.0)
    if status != "SUCCESS":
        events = webserver.graphql(RUN_ERRORS, runId=run_id)["logsForRun"].get("events", [])
        errors = [e["message"] for e in events if e.get("level") in ("ERROR", "CRITICAL")]
        pytest.fail(f"run {run_id} ended {status} (timeout {RUN_TIMEOUT_S}s); errors: {errors}\n"
                    f"{webserver.log_tail()}")
    assert run["assetSelection"] == [{"path": ["datasets"]}]

    asset = webserver.graphql(MATERIALIZATION, assetKey={"path": ["datasets"]})["assetOrError"]
    assert asset["__typename"] == "Asset", asset
    (mat,) = asset["assetMaterializations"]
    assert mat["runId"] == run_id
    meta = {e["label"]: e for e in mat["metadataEntries"]}
    assert meta["rows"]["__typename"] == "IntMetadataEntry", meta.keys()
    md = meta["datasets"]["mdStr"]
    assert "walk_train" in md and "train" in md and "walk_heldout" in md and "heldout" in md, md
    # the metadata is what landed in the warehouse of this run, in the temporary directory
    with duckdb.connect(str(webserver.artifacts / "l2t.duckdb"), read_only=True) as con:
        stored = con.execute("SELECT count(*) FROM problems WHERE asset_key = 'datasets'").fetchone()[0]
        splits = dict(con.execute("SELECT split, count(*) FROM problems GROUP BY 1").fetchall())
    assert meta["rows"]["intValue"] == stored > 0
    assert splits["train"] == 2000 and splits["heldout"] > 0  # TrainingData.train_size, the held-out split
    # the output went to the I/O manager's shared storage (<L2T_STORAGE_URL>/assets), not to the
    # run's DAGSTER_HOME, where a run in another pod could not load it
    assert (webserver.artifacts / "storage" / "assets" / "datasets").is_file()
    assert not (webserver.log.parent / "storage" / "datasets").exists()  # the DAGSTER_HOME
