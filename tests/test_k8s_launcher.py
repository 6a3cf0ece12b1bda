"""The Kubernetes variant (the ``k8s`` extra): the training pod K8sTrainingLauncher builds for one
and for eight GPUs, accepted by dagster-k8s's own pod builder; the config written next to the run
and read back by ``l2t train --config URL``; the L2T_LAUNCHER switch; the production
``infra/dagster/dagster.yaml`` against Dagster's instance schema; the Helm values and the image."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

dagster_k8s = pytest.importorskip("dagster_k8s")

import dagster as dg  # noqa: E402
import yaml  # noqa: E402
from dagster_k8s.pipes import PipesK8sClient, build_pod_body  # noqa: E402
from kubernetes.client import ApiClient  # noqa: E402

from l2t_core.cli import build_config  # noqa: E402
from l2t_core.config import TrainConfig  # noqa: E402
from l2t_pipeline.definitions import ASSETS, default_resources, training_launcher  # noqa: E402
from l2t_pipeline.k8s import RANK0_PIPES_SH, K8sTrainingLauncher, config_url, write_train_config  # noqa: E402
from l2t_pipeline.resources import TrainingLauncher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE = "registry.example.com/l2t-gpu:0.1.0"
RUN_ID = "3f2a9c4e-1b7d-4c1e-9a55-0d8e6f1a2b3c"
SECRET_VALUES = {"AWS_ACCESS_KEY_ID": "AKIAL2TTESTKEY000001", "AWS_SECRET_ACCESS_KEY": "l2t-very-secret-value-42"}


def train_cfg(out: str, **over) -> TrainConfig:
    """The kind of config the checkpoints asset builds (device='cpu', torch engine)."""
    return TrainConfig(policy="/mnt/l2t/models/tiny-sft", method="l2t", out=out, steps=4, prompts_per_step=4,
                       device="cpu", checkpoint_every=4, keep_checkpoints=1, **over)


def pod(launcher: K8sTrainingLauncher, config: str, partition: str = "tiny-sft|l2t"):
    """The V1Pod that PipesK8sClient.run would create (dagster-k8s's builder validates every key)."""
    return build_pod_body(pod_name="dagster-3f2a9c4e-checkpoints-0123456789", image=None, command=None,
                          env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
                          base_pod_meta=launcher.pod_meta(partition, config),
                          base_pod_spec=launcher.pod_spec(config))


def pod_json(p) -> str:
    return json.dumps(ApiClient().sanitize_for_serialization(p))


def l2t_train(config: str) -> list[str]:
    return ["python", "-m", "l2t_core.cli", "train", "--config", config]


# ------------------------------------------------------------------------------ one GPU


def test_one_gpu_pod(monkeypatch):
    for k, v in SECRET_VALUES.items():  # present in the launching process, never copied into the pod
        monkeypatch.setenv(k, v)
    launcher = K8sTrainingLauncher(image=IMAGE, gpus=1, namespace="l2t", env_secrets=["l2t-s3-credentials"],
                                   env={"AWS_ENDPOINT_URL": "http://minio.l2t:9000"}, service_account="l2t-train",
                                   node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                   shared_volume_claim="l2t-shared")
    cfg = launcher.placed_config(train_cfg("s3://l2t-runs/pipeline/runs/tiny-sft/l2t/0123abcd"))
    assert (cfg.device, cfg.engine, cfg.deepspeed_config) == ("cuda", "torch", None)
    launcher.check(cfg)
    url = config_url(cfg.out, RUN_ID)
    assert url == f"s3://l2t-runs/pipeline/runs/tiny-sft/l2t/0123abcd/launch/train-{RUN_ID}.yaml"

    spec = launcher.pod_spec(url)
    c = spec["containers"][0]
    assert c["args"] == l2t_train(url) and "command" not in c  # the image's tini entrypoint stays PID 1
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"},
                              "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"}}
    assert c["envFrom"] == [{"secretRef": {"name": "l2t-s3-credentials"}}]
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["serviceAccountName"] == "l2t-train" and spec["automountServiceAccountToken"] is False

    p = pod(launcher, url)
    ctr = p.spec.containers[0]
    assert p.spec.restart_policy == "Never" and ctr.image == IMAGE and ctr.args == l2t_train(url)
    assert ctr.resources.limits["nvidia.com/gpu"] == "1"
    assert [e.secret_ref.name for e in ctr.env_from] == ["l2t-s3-credentials"]
    env = {e.name: e.value for e in ctr.env}
    assert env["DAGSTER_PIPES_CONTEXT"] == "ctx" and env["AWS_ENDPOINT_URL"] == "http://minio.l2t:9000"
    assert p.metadata.annotations == {"l2t/config-url": url, "l2t/partition": "tiny-sft|l2t"}
    assert p.metadata.labels["app.kubernetes.io/component"] == "training"
    assert {m.mount_path for m in ctr.volume_mounts} == {"/dev/shm", "/mnt/l2t"}
    # no credential reaches the pod spec: not the values, not even a variable named like one
    text = pod_json(p)
    assert not any(v in text for v in SECRET_VALUES.values())
    assert not [e.name for e in ctr.env if re.search(r"SECRET|PASSWORD|TOKEN$|ACCESS_KEY", e.name)]


def test_credentials_in_env_refused_and_bad_values_named():
    cfg = train_cfg("s3://l2t-runs/x")
    leaky = K8sTrainingLauncher(image=IMAGE, env={"AWS_SECRET_ACCESS_KEY": "x", "HF_TOKEN": "y", "HF_HOME": "/c"})
    with pytest.raises(ValueError, match=r"AWS_SECRET_ACCESS_KEY, HF_TOKEN.*env_secrets"):
        leaky.check(leaky.placed_config(cfg))
    with pytest.raises(ValueError, match=r"memory_request '64 GB' is not a Kubernetes quantity"):
        K8sTrainingLauncher(image=IMAGE, memory_request="64 GB").check(cfg)
    with pytest.raises(ValueError, match=r"env_secrets: 'S3_Creds' is not a Secret name"):
        K8sTrainingLauncher(image=IMAGE, env_secrets=["S3_Creds"]).check(cfg)
    with pytest.raises(ValueError, match=r"effect 'NoSchedul'"):
        K8sTrainingLauncher(image=IMAGE, tolerations=[{"key": "gpu", "effect": "NoSchedul"}]).check(cfg)
    # a local run directory or base model the pod cannot see
    with pytest.raises(ValueError, match=r"L2T_K8S_SHARED_PVC"):
        K8sTrainingLauncher(image=IMAGE).check(train_cfg("/mnt/l2t/storage/runs/x"))
    with pytest.raises(ValueError, match=r"base policy '/home/me/model'"):
        K8sTrainingLauncher(image=IMAGE).check(train_cfg("s3://b/x").model_copy(update={"policy": "/home/me/model"}))
    K8sTrainingLauncher(image=IMAGE).check(train_cfg("s3://b/x").model_copy(update={"policy": "Qwen/Qwen2.5-1.5B"}))


# ------------------------------------------------------------------------------ eight GPUs


def test_eight_gpu_pod_torchrun_and_deepspeed():
    launcher = K8sTrainingLauncher(image=IMAGE, gpus=8, cpu_request="64", memory_request="512Gi",
                                   memory_limit="900Gi", env_secrets=["l2t-s3-credentials", "l2t-hf-token"],
                                   shared_volume_claim="l2t-shared", image_pull_secrets=["regcred"])
    cfg = launcher.placed_config(train_cfg("/mnt/l2t/storage/runs/tiny-sft/l2t/0123abcd"))
    assert (cfg.device, cfg.engine, cfg.deepspeed_config) == ("cuda", "deepspeed", "infra/deepspeed/zero2.json")
    assert (ROOT / cfg.deepspeed_config).is_file()  # the image copies infra/deepspeed into its /app
    launcher.check(cfg)
    url = config_url(cfg.out, RUN_ID)
    p = pod(launcher, url)
    ctr = p.spec.containers[0]
    assert ctr.resources.limits == {"memory": "900Gi", "nvidia.com/gpu": "8"}
    assert ctr.resources.requests == {"cpu": "64", "memory": "512Gi"}
    assert [e.secret_ref.name for e in ctr.env_from] == ["l2t-s3-credentials", "l2t-hf-token"]
    vols = {v.name: v for v in p.spec.volumes}
    assert vols["dshm"].empty_dir.medium == "Memory" and vols["l2t-shared"].persistent_volume_claim.claim_name == "l2t-shared"
    assert [s.name for s in p.spec.image_pull_secrets] == ["regcred"]
    rank0 = ["-c", RANK0_PIPES_SH, "l2t-rank", *l2t_train(url)]

    # the arguments mean what we want to the real launchers: one process per GPU, each the l2t command
    from torch.distributed.run import get_args_parser

    assert ctr.args[0] == "torchrun"
    args = get_args_parser().parse_args(ctr.args[1:])
    assert (args.nproc_per_node, args.nnodes, args.standalone, args.no_python) == ("8", "1", True, True)
    assert (args.training_script, args.training_script_args) == ("/bin/sh", rank0)

    runner = pytest.importorskip("deepspeed.launcher.runner")
    ds = launcher.model_copy(update={"distributed_launcher": "deepspeed"}).command(url)
    assert ds[0] == "deepspeed"
    dargs = runner.parse_args(ds[1:])
    assert (dargs.num_gpus, dargs.no_python, dargs.user_script, dargs.user_args) == (8, True, "/bin/sh", rank0)
    assert dargs.no_local_rank  # else each rank would run /bin/sh --local_rank=N -c ... (the next test runs them)


@pytest.mark.parametrize("launcher_name", ["torchrun", "deepspeed"])
def test_the_real_launchers_start_every_rank_with_the_l2t_command_and_pipes_on_rank_0(tmp_path, launcher_name):
    """The pod's arguments run by the real launcher (on this CPU, 2 ranks for 8 GPUs), with a
    recorder in place of `python -m l2t_core.cli train`: every rank starts the command with its
    arguments as given (the deepspeed launcher would otherwise put --local_rank=N before them),
    knows its RANK and LOCAL_RANK, and only rank 0 keeps the Pipes context and messages."""
    if launcher_name == "deepspeed":
        pytest.importorskip("deepspeed.launcher.runner")
    launcher = K8sTrainingLauncher(image=IMAGE, gpus=8, distributed_launcher=launcher_name)
    url = "s3://bucket/runs/x/l2t_train_config.json"
    args = launcher.command(url)
    train = l2t_train(url)
    assert args[-len(train):] == train
    record = ["/bin/sh", "-c", 'echo "$RANK $LOCAL_RANK ${DAGSTER_PIPES_CONTEXT-none} $*" > "$0/rank$RANK"', str(tmp_path),
              *train]
    args = [*args[:-len(train)], *record]
    args[args.index("8")] = "2"  # --nproc_per_node / --num_gpus
    runner = ([sys.executable, "-m", "torch.distributed.run"] if launcher_name == "torchrun"
              else [sys.executable, "-m", "deepspeed.launcher.runner"])
    env = {**os.environ, "DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    # its own process group: a launcher that hangs is killed with the ranks it started
    proc = subprocess.Popen([*runner, *args[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    seen = sorted((tmp_path / f"rank{r}").read_text().split(" ", 3) for r in (0, 1))
    assert seen == [["0", "0", "ctx", " ".join(train) + "\n"], ["1", "1", "none", " ".join(train) + "\n"]]


def test_eight_gpus_need_deepspeed_and_a_run_directory_every_rank_reaches():
    launcher = K8sTrainingLauncher(image=IMAGE, gpus=8, shared_volume_claim="l2t-shared")
    with pytest.raises(ValueError, match=r"8 GPUs needs engine='deepspeed'"):
        launcher.check(train_cfg("/mnt/l2t/storage/runs/x"))  # not placed: still the torch engine
    # object storage: every rank uploads its own shard (l2t_core.sharded_checkpoint)
    launcher.check(launcher.placed_config(train_cfg("s3://l2t-runs/x")))
    with pytest.raises(ValueError, match=r"local path, which the training pod sees only on a shared volume"):
        K8sTrainingLauncher(image=IMAGE, gpus=8).check(
            K8sTrainingLauncher(image=IMAGE, gpus=8).placed_config(train_cfg("/home/me/runs/x")))
    # a config that already names a DeepSpeed setup keeps it
    own = train_cfg("/mnt/l2t/r", engine="deepspeed", deepspeed_config="infra/deepspeed/zero3_offload.json")
    assert launcher.placed_config(own).deepspeed_config == "infra/deepspeed/zero3_offload.json"
    # no GPUs: the config runs as given, on a CPU pod without GPU limit or toleration
    cpu = K8sTrainingLauncher(image=IMAGE, gpus=0)
    spec = cpu.pod_spec("s3://b/c.yaml")
    assert cpu.placed_config(own) == own and "tolerations" not in spec
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]


def test_only_rank_zero_keeps_the_pipes_connection():
    probe = [sys.executable, "-c", "import os; print(os.environ.get('DAGSTER_PIPES_CONTEXT'), "
                                   "os.environ.get('DAGSTER_PIPES_MESSAGES'))"]
    env = {**os.environ, "DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    out = {rank: subprocess.run(["/bin/sh", "-c", RANK0_PIPES_SH, "l2t-rank", *probe], env={**env, "RANK": rank},
                                capture_output=True, text=True, check=True).stdout.split()
           for rank in ("0", "3")}
    assert out == {"0": ["ctx", "msgs"], "3": ["None", "None"]}


# ------------------------------------------------------------------------------ the config on the run's storage


@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_config_written_next_to_the_run_and_read_by_the_cli(tmp_path, scheme):
    out = {"local": str(tmp_path / "runs" / "r1"), "file": f"file://{tmp_path}/runs/r1",
           "memory": f"memory://l2t-test-{os.getpid()}/runs/r1"}[scheme]
    cfg = K8sTrainingLauncher(image=IMAGE).placed_config(train_cfg(out))
    url = write_train_config(cfg, RUN_ID)
    assert url == f"{out}/launch/train-{RUN_ID}.yaml"
    if scheme == "local":
        assert yaml.safe_load(Path(url).read_text())["device"] == "cuda"
    # exactly what the pod runs: l2t train --config <url>, then flags; validated as one TrainConfig
    assert build_config(TrainConfig, Namespace(config=url, set=None), {}) == cfg
    over = build_config(TrainConfig, Namespace(config=url, set=["steps=9"]), {})
    assert over.steps == 9 and over.out == out
    with pytest.raises(SystemExit, match="not found"):
        build_config(TrainConfig, Namespace(config=url.replace(RUN_ID, "missing"), set=None), {})
    with pytest.raises(ValueError, match="file-name-safe"):
        write_train_config(cfg, "../x")


# ------------------------------------------------------------------------------ PipesK8sClient, L2T_LAUNCHER


def test_launch_arguments_match_pipes_k8s_client_run():
    launcher = K8sTrainingLauncher(image=IMAGE, namespace="l2t", pod_wait_timeout_s=3600.0)
    kwargs = launcher.client_run_kwargs("tiny-sft|grpo", "s3://b/launch/train-x.yaml")
    bound = inspect.signature(PipesK8sClient.run).bind(PipesK8sClient(), context=None, **kwargs)
    assert bound.arguments["namespace"] == "l2t" and bound.arguments["pod_wait_timeout"] == 3600.0
    assert bound.arguments["base_pod_spec"]["containers"][0]["image"] == IMAGE
    # the training pod carries the run's id as the run worker's pod does (kubectl get pods -l dagster/run-id=...)
    labelled = launcher.client_run_kwargs("tiny-sft|grpo", "s3://b/c.yaml", run_id=RUN_ID)["base_pod_meta"]["labels"]
    assert labelled["dagster/run-id"] == RUN_ID and "dagster/run-id" not in kwargs["base_pod_meta"]["labels"]
    built = build_pod_body(pod_name="p", image=None, command=None, env_vars={},
                           base_pod_meta=launcher.pod_meta("s", "c", run_id=RUN_ID), base_pod_spec=launcher.pod_spec("c"))
    assert built.metadata.labels["dagster/run-id"] == RUN_ID


def test_launch_writes_the_config_then_calls_the_cluster(tmp_path, monkeypatch):
    """launch() inside a real asset run, up to the Kubernetes API: placement, checks, the config on
    the run's storage, then PipesK8sClient loading the cluster configuration (there is none here:
    the kubeconfig does not exist), which fails the step."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    cfg = train_cfg(str(tmp_path / "storage" / "runs" / "tiny-sft" / "l2t" / "0123abcd")).model_copy(
        update={"policy": str(tmp_path / "models" / "tiny-sft")})

    @dg.asset(required_resource_keys={"launcher"})
    def training(context) -> None:
        context.resources.launcher.launch(context, cfg)

    def run(launcher: K8sTrainingLauncher):
        result = dg.materialize([training], resources={"launcher": launcher}, raise_on_error=False)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        return result.run_id, str(failure.step_failure_data.error)

    ok = K8sTrainingLauncher(image=IMAGE, gpus=1, shared_volume_claim="l2t-shared", shared_mount_path=str(tmp_path))
    run_id, error = run(ok)
    assert "ConfigException" in error and "kube-config" in error.lower(), error
    written = config_url(cfg.out, run_id)
    assert build_config(TrainConfig, Namespace(config=written, set=None), {}) == ok.placed_config(cfg)
    # nothing is written or started when the checks fail
    run_id, error = run(K8sTrainingLauncher(image=IMAGE))
    assert "L2T_K8S_SHARED_PVC" in error and not Path(config_url(cfg.out, run_id)).exists()


def test_a_training_data_file_is_the_same_file_in_the_pod(tmp_path, monkeypatch):
    """A ``data.source`` file (the run worker hashes it into the run's config hash) must be the file
    the pod reads: found in a data directory on the shared volume (its L2T_DATA_DIR goes into the
    pod's environment) or an absolute path under it; otherwise refused before any pod starts."""
    mount = str(tmp_path / "mnt")
    (tmp_path / "mnt" / "data").mkdir(parents=True)
    (tmp_path / "mnt" / "data" / "mine.jsonl").write_text("{}\n")
    launcher = K8sTrainingLauncher(image=IMAGE, shared_volume_claim="l2t-shared", shared_mount_path=mount)
    cfg = TrainConfig(policy=f"{mount}/models/tiny-sft", out=f"{mount}/storage/runs/x", device="cpu",
                      data={"source": "mine.jsonl"})
    monkeypatch.setenv("L2T_DATA_DIR", f"{mount}/data")
    launcher.check(cfg)
    env = {e["name"]: e["value"] for e in launcher.container("c.yaml")["env"]}
    assert env["L2T_DATA_DIR"] == f"{mount}/data"
    launcher.check(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": f"{mount}/data/mine.jsonl"})}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.jsonl").write_text("{}\n")
    monkeypatch.setenv("L2T_DATA_DIR", str(elsewhere))  # a data directory the pod does not have
    with pytest.raises(ValueError, match=r"the training data 'mine.jsonl' is .*elsewhere/mine.jsonl, which the training "
                                         r"pod cannot read as the same file"):
        launcher.check(cfg)
    assert "L2T_DATA_DIR" not in {e["name"] for e in launcher.container("c.yaml")["env"]}
    with pytest.raises(ValueError, match=r"training data 'nope.jsonl': data file 'nope.jsonl' not found"):
        launcher.check(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "nope.jsonl"})}))


def test_sft_pod_runs_one_process_on_at_most_one_gpu_and_sees_its_paths(tmp_path, monkeypatch):
    """A registry model of kind 'sft' on the cluster: ``l2t sft`` in a pod with one GPU (whatever
    the training pods get), device cuda, its config written beside the output on the shared
    volume, where the CLI reads it back; paths the pod cannot see are refused before any pod."""
    from l2t_core.sft import SFTConfig

    mount = str(tmp_path)
    launcher = K8sTrainingLauncher(image=IMAGE, gpus=8, shared_volume_claim="l2t-shared", shared_mount_path=mount)
    cfg = SFTConfig(model=f"{mount}/hub/qwen", data=f"{mount}/traces.jsonl", out=f"{mount}/models/s", device="cpu")
    placed = launcher.placed_sft_config(cfg)
    assert placed.device == "cuda" and placed.model_copy(update={"device": "cpu"}) == cfg
    launcher.check_sft(placed)
    config = f"{mount}/models/.launch/sft-{RUN_ID}.yaml"
    p = build_pod_body(pod_name="dagster-3f2a9c4e-base-model-0123456789", image=None, command=None,
                       env_vars={"DAGSTER_PIPES_CONTEXT": "ctx"}, base_pod_meta=launcher.pod_meta("s", config, "sft"),
                       base_pod_spec=launcher.pod_spec(config, "sft"))
    ctr = p.spec.containers[0]
    assert ctr.args == ["python", "-m", "l2t_core.cli", "sft", "--config", config, "-q"]
    assert ctr.resources.limits["nvidia.com/gpu"] == "1" and p.spec.tolerations
    assert p.metadata.labels["app.kubernetes.io/component"] == "sft"
    assert launcher.pod_spec("c.yaml")["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    cpu_only = K8sTrainingLauncher(image=IMAGE, gpus=0, shared_volume_claim="l2t-shared", shared_mount_path=mount)
    assert cpu_only.placed_sft_config(cfg) == cfg and "tolerations" not in cpu_only.pod_spec(config, "sft")
    for field, value in (("out", "/elsewhere/models/s"), ("model", "/elsewhere/qwen"), ("data", "/elsewhere/t.jsonl"),
                         ("data", "traces.jsonl"), ("data", "runs/t.jsonl"), ("model", "./qwen"), ("out", "runs/s")):
        with pytest.raises(ValueError, match=f"the SFT's {field} '{value}' is not an absolute path on the shared"):
            launcher.check_sft(placed.model_copy(update={field: value}))
    for hub_id in ("Qwen/Qwen2.5-Math-1.5B", "gpt2"):
        launcher.check_sft(placed.model_copy(update={"model": hub_id}))
    with pytest.raises(ValueError, match="is not an image reference"):
        K8sTrainingLauncher(image=" ", shared_volume_claim="l2t-shared", shared_mount_path=mount).check_sft(placed)

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))

    @dg.asset(required_resource_keys={"launcher"})
    def sft_base(context) -> None:
        context.resources.launcher.launch_sft(context, cfg)

    result = dg.materialize([sft_base], resources={"launcher": launcher}, raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "kube-config" in str(failure.step_failure_data.error).lower()
    assert not list((tmp_path / "models" / ".launch").iterdir())  # the launch file is removed after the pod

    written = {}
    monkeypatch.setattr(dagster_k8s.PipesK8sClient, "run", lambda self, context, **kw: written.update(
        cfg=build_config(SFTConfig, Namespace(config=kw["base_pod_spec"]["containers"][0]["args"][5], set=None), {})))
    assert dg.materialize([sft_base], resources={"launcher": launcher}).success
    assert written["cfg"] == placed  # what the pod read: the placed config


def test_launcher_switch(monkeypatch):
    assert type(training_launcher({})) is TrainingLauncher
    assert type(training_launcher({"L2T_LAUNCHER": "local"})) is TrainingLauncher
    k8s = training_launcher({"L2T_LAUNCHER": "k8s", "L2T_K8S_IMAGE": IMAGE, "L2T_K8S_GPUS": "8",
                             "L2T_K8S_ENV_SECRETS": "l2t-s3-credentials, l2t-hf-token",
                             "L2T_K8S_SHARED_PVC": "l2t-shared", "L2T_K8S_NAMESPACE": "l2t"})
    assert isinstance(k8s, K8sTrainingLauncher)
    assert (k8s.gpus, k8s.env_secrets, k8s.shared_volume_claim, k8s.namespace) == (
        8, ["l2t-s3-credentials", "l2t-hf-token"], "l2t-shared", "l2t")
    with pytest.raises(ValueError, match="needs L2T_K8S_IMAGE"):
        training_launcher({"L2T_LAUNCHER": "k8s"})
    with pytest.raises(ValueError, match="L2T_K8S_GPUS='two'"):
        training_launcher({"L2T_LAUNCHER": "k8s", "L2T_K8S_IMAGE": IMAGE, "L2T_K8S_GPUS": "two"})
    with pytest.raises(ValueError, match="L2T_LAUNCHER='docker' is not a training launcher"):
        training_launcher({"L2T_LAUNCHER": "docker"})
    # Kubernetes settings without the Kubernetes launcher: training would run in the run worker
    with pytest.raises(ValueError, match="L2T_K8S_GPUS, L2T_K8S_IMAGE set, but L2T_LAUNCHER is 'local'"):
        training_launcher({"L2T_K8S_IMAGE": IMAGE, "L2T_K8S_GPUS": "8", "L2T_K8S_NAMESPACE": " "})
    # the code location loads with the Kubernetes launcher in place of the local one
    monkeypatch.setenv("L2T_DUCKDB_PATH", ":memory:")
    dg.Definitions.validate_loadable(dg.Definitions(assets=ASSETS, resources={**default_resources(), "launcher": k8s}))


# ------------------------------------------------------------------------------ the production instance


def _env_names(node) -> set[str]:
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {node["env"]}
        return set().union(*(_env_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_env_names(v) for v in node)) if node else set()
    return set()


def validate_instance_yaml(path: Path) -> dict:
    """Dagster's own instance validation (top-level schema, storage, concurrency), then each
    configurable class's config against that class's schema; nothing is instantiated, so no
    Postgres, cluster or bucket is needed."""
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes import class_from_code_pointer

    dagster_instance_config(str(path.parent), config_filename=path.name)
    raw = yaml.safe_load(path.read_text())
    for section in ("run_coordinator", "run_launcher", "compute_logs"):
        cls = class_from_code_pointer(raw[section]["module"], raw[section]["class"])
        result = validate_config(cls.config_type(), raw[section].get("config", {}))
        if not result.success:
            raise ValueError(f"{path}: {section} ({raw[section]['class']}): "
                             + "; ".join(e.message for e in result.errors))
    return raw


def test_production_instance_validates(tmp_path):
    from dagster_postgres import DagsterPostgresStorage

    path = INFRA / "dagster" / "dagster.yaml"
    raw = validate_instance_yaml(path)
    assert "postgres" in raw["storage"] and raw["telemetry"] == {"enabled": False}
    assert DagsterPostgresStorage.config_type()  # the storage class of `storage: postgres` is importable
    assert raw["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert raw["run_launcher"]["class"] == "K8sRunLauncher"
    assert raw["concurrency"]["pools"] == {"granularity": "run", "default_limit": 2}
    from l2t_pipeline.assets import checkpoints

    assert checkpoints.op.pool == "l2t_training" and "l2t_training" in path.read_text()
    # credentials only from the environment; every variable it reads is documented for deployers
    pg = raw["storage"]["postgres"]["postgres_db"]
    assert pg["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    readme = (INFRA / "README.md").read_text()
    missing = sorted(n for n in _env_names(raw) if n not in readme)
    assert not missing, f"infra/README.md does not document {missing}"

    # the validation can fail: a misspelt run launcher key and a string where an int belongs
    bad = yaml.safe_load(path.read_text())
    bad["run_launcher"]["config"]["instance_configmap"] = bad["run_launcher"]["config"].pop("instance_config_map")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="instance_config"):
        validate_instance_yaml(tmp_path / "dagster.yaml")
    bad = yaml.safe_load(path.read_text())
    bad["concurrency"]["runs"]["max_concurrent_runs"] = "twenty"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(dg.DagsterInvalidConfigError):
        validate_instance_yaml(tmp_path / "dagster.yaml")


def test_helm_values_match_the_instance_and_configure_the_launcher():
    values = yaml.safe_load((INFRA / "k8s" / "values.yaml").read_text())
    inst = yaml.safe_load((INFRA / "dagster" / "dagster.yaml").read_text())
    assert values["runLauncher"]["type"] == inst["run_launcher"]["class"]
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == inst["run_coordinator"]["class"]
    assert values["computeLogManager"]["type"] == inst["compute_logs"]["class"]
    assert values["telemetry"]["enabled"] is False and values["concurrency"]["enabled"] is True
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    assert (pools["granularity"], pools["defaultLimit"]) == (inst["concurrency"]["pools"]["granularity"],
                                                              inst["concurrency"]["pools"]["default_limit"])
    assert runs["maxConcurrentRuns"] == inst["concurrency"]["runs"]["max_concurrent_runs"]
    assert values["postgresql"]["enabled"] is False and "postgresqlPassword" not in values["postgresql"]
    (dep,) = values["dagster-user-deployments"]["deployments"]
    assert dep["dagsterApiGrpcArgs"] == ["-m", "l2t_pipeline.definitions"]
    # the code location's environment builds a launcher whose pods pass the checks
    env = {k: str(v) for k, v in dep["env"].items()}
    launcher = training_launcher(env)
    assert isinstance(launcher, K8sTrainingLauncher) and launcher.image == f"{dep['image']['repository']}:{dep['image']['tag']}"
    assert {"name": launcher.shared_volume_claim, "persistentVolumeClaim": {"claimName": launcher.shared_volume_claim}} \
        in dep["volumes"]
    assert {"name": launcher.shared_volume_claim, "mountPath": launcher.shared_mount_path} in dep["volumeMounts"]
    assert [{"name": s} for s in launcher.env_secrets] == dep["envSecrets"]
    run_url = "/".join([env["L2T_STORAGE_URL"], "runs", "tiny-sft", "l2t", "0123abcd"])
    launcher.check(launcher.placed_config(train_cfg(run_url).model_copy(
        update={"policy": f"{env['L2T_MODELS_DIR']}/tiny-sft"})))


def test_image_installs_the_extras_and_runs_unprivileged():
    text = (INFRA / "docker" / "Dockerfile.gpu").read_text()
    extras = re.search(r"^ARG EXTRAS=(\S+)$", text, re.M).group(1).split(",")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"pipeline", "distributed", "gpu", "k8s"} and set(extras) <= set(declared)
    assert {"dagster-k8s>=0.29.27,<0.30", "dagster-postgres>=0.29.27,<0.30",
            "dagster-aws>=0.29.27,<0.30"} <= set(declared["k8s"])
    assert re.search(r"^USER 10001$", text, re.M) and 'ENTRYPOINT ["tini", "--"]' in text
    ignore = (INFRA / "docker" / "Dockerfile.gpu.dockerignore").read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert "l2t_core" in sources and "infra/deepspeed" in sources
    for src in sources:  # each exists and passes the ignore file
        assert (ROOT / src).exists() and f"!{src}" in ignore.replace("/**", ""), src


def test_the_training_pod_is_owned_by_the_run_workers_pod(tmp_path):
    """In a run worker pod, the training pod names it as owner (Kubernetes deletes it with the run
    worker's pod); outside a pod, across namespaces, when the run worker cannot read its pod or
    when turned off, it has none, and the two cases that lose the guarantee say so."""
    from types import SimpleNamespace

    ns = tmp_path / "namespace"
    ns.write_text("l2t\n")
    in_pod = {"HOSTNAME": "dagster-run-3f2a9c4e-abcde", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    read = []

    def read_pod(name, namespace):
        read.append((name, namespace))
        return SimpleNamespace(metadata=SimpleNamespace(name=name, uid="6c1b2f3e-0000-4000-8000-00000000abcd"))

    said: list[str] = []
    log = SimpleNamespace(warning=said.append)
    launcher = K8sTrainingLauncher(image=IMAGE)
    owner = launcher.owner_reference(log, in_pod, read_pod, str(ns))
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "dagster-run-3f2a9c4e-abcde",
                     "uid": "6c1b2f3e-0000-4000-8000-00000000abcd"}
    assert read == [("dagster-run-3f2a9c4e-abcde", "l2t")]
    body = build_pod_body(pod_name="dagster-3f2a9c4e-checkpoints-0123456789", image=None, command=None, env_vars={},
                          base_pod_meta=launcher.pod_meta("tiny-sft|l2t", "s3://b/c.yaml", owner=owner),
                          base_pod_spec=launcher.pod_spec("s3://b/c.yaml"))
    (ref,) = body.metadata.owner_references
    assert (ref.kind, ref.name, ref.uid, ref.api_version) == ("Pod", owner["name"], owner["uid"], "v1")
    assert launcher.client_run_kwargs("p", "c", owner=owner)["base_pod_meta"]["ownerReferences"] == [owner]
    assert "ownerReferences" not in launcher.pod_meta("p", "c")

    assert launcher.owner_reference(log, {"HOSTNAME": "laptop"}, read_pod, str(ns)) is None  # not in a pod
    assert launcher.owner_reference(log, in_pod, read_pod, str(tmp_path / "none")) is None  # no service account
    off = K8sTrainingLauncher(image=IMAGE, owned_by_run_worker=False)
    assert off.owner_reference(log, in_pod, read_pod, str(ns)) is None and not said
    other = K8sTrainingLauncher(image=IMAGE, namespace="gpu-jobs")
    assert other.owner_reference(log, in_pod, read_pod, str(ns)) is None
    assert "namespace 'gpu-jobs', the run worker runs in 'l2t'" in said[-1]

    def forbidden(name, namespace):
        raise RuntimeError("(403) Forbidden: pods is forbidden")

    assert launcher.owner_reference(log, in_pod, forbidden, str(ns)) is None
    assert "cannot read the run worker's pod l2t/dagster-run-3f2a9c4e-abcde (RuntimeError: (403)" in said[-1]
    assert len(read) == 1  # no other case read a pod


def test_the_pod_shares_the_run_workers_hub_cache_where_it_is_on_the_shared_volume(tmp_path, monkeypatch):
    """The hub cache of the run worker (HF_HUB_CACHE: where base_model downloaded the commit it
    pinned) goes into the pod's environment when it is on the shared volume, so a pod does not
    download the model again; elsewhere the pod keeps its image's cache; the launcher's env wins."""
    from huggingface_hub import constants

    mount = str(tmp_path / "mnt")
    launcher = K8sTrainingLauncher(image=IMAGE, shared_volume_claim="l2t-shared", shared_mount_path=mount)

    def pod_env(launcher) -> dict:
        return {e["name"]: e["value"] for e in launcher.container("c.yaml")["env"]}

    monkeypatch.setattr(constants, "HF_HUB_CACHE", f"{mount}/hf/hub")
    assert pod_env(launcher)["HF_HUB_CACHE"] == f"{mount}/hf/hub"
    assert pod_env(launcher.model_copy(update={"env": {"HF_HUB_CACHE": "/cache"}}))["HF_HUB_CACHE"] == "/cache"
    own_home = pod_env(launcher.model_copy(update={"env": {"HF_HOME": "/home/hf"}}))  # HF_HUB_CACHE would override it
    assert own_home["HF_HOME"] == "/home/hf" and "HF_HUB_CACHE" not in own_home
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))  # the worker's own disk
    assert "HF_HUB_CACHE" not in pod_env(launcher)


def test_a_run_deadline_and_scratch_disk_go_into_the_pod():
    """run_deadline_s becomes activeDeadlineSeconds (Kubernetes fails a hung training pod; the
    Pipes wait alone never would); scratch_size an emptyDir at /scratch that TMPDIR names, with its
    ephemeral-storage requested. A bad quantity or deadline is refused."""
    launcher = K8sTrainingLauncher(image=IMAGE, gpus=2, run_deadline_s=3 * 86400.0, scratch_size="40Gi")
    launcher.check_pod()
    p = pod(launcher, "s3://b/c.yaml")
    assert p.spec.active_deadline_seconds == 259200
    vols = {v.name: v for v in p.spec.volumes}
    assert vols["scratch"].empty_dir.size_limit == "40Gi" and vols["scratch"].empty_dir.medium is None
    ctr = p.spec.containers[0]
    assert {m.name: m.mount_path for m in ctr.volume_mounts}["scratch"] == "/scratch"
    assert ctr.resources.requests["ephemeral-storage"] == "40Gi"
    env = {e.name: e.value for e in ctr.env}
    assert env["TMPDIR"] == "/scratch" and env["PYTHONUNBUFFERED"] == "1"
    plain = pod(K8sTrainingLauncher(image=IMAGE), "s3://b/c.yaml")
    assert plain.spec.active_deadline_seconds is None and "scratch" not in {v.name for v in plain.spec.volumes}
    with pytest.raises(ValueError, match=r"scratch_size '40 GB' is not a Kubernetes quantity"):
        K8sTrainingLauncher(image=IMAGE, scratch_size="40 GB").check_pod()
    from_env = K8sTrainingLauncher.from_env({"L2T_K8S_IMAGE": IMAGE, "L2T_K8S_SCRATCH": "40Gi",
                                             "L2T_K8S_RUN_DEADLINE_S": "259200"})
    assert (from_env.scratch_size, from_env.run_deadline_s) == ("40Gi", 259200.0)
    with pytest.raises(ValueError, match=r"L2T_K8S_RUN_DEADLINE_S='3d' is not a number of seconds"):
        K8sTrainingLauncher.from_env({"L2T_K8S_IMAGE": IMAGE, "L2T_K8S_RUN_DEADLINE_S": "3d"})
    with pytest.raises(ValueError, match=r"run_deadline_s\n.*finite number"):
        K8sTrainingLauncher.from_env({"L2T_K8S_IMAGE": IMAGE, "L2T_K8S_RUN_DEADLINE_S": "inf"})


def test_rank_0s_pipes_messages_leave_stderr_in_one_write_under_pythonunbuffered():
    """The image sets PYTHONUNBUFFERED; the Pipes session makes rank 0's stderr line-buffered, so
    a message and its newline (two calls in dagster_pipes) leave in one write, which another
    rank's line on the pod's shared stderr cannot split."""
    code = ("import sys; from l2t_core.pipes import line_buffered_stderr; a = sys.stderr.write_through; "
            "line_buffered_stderr(); print(a, sys.stderr.write_through, sys.stderr.line_buffering)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "True"]
