"""The Kubernetes variant of the training launcher: one pod per training run through Dagster Pipes
(``dagster_k8s.PipesK8sClient``), with the same ``launch(context, cfg)`` contract as
:class:`l2t_pipeline.resources.TrainingLauncher`. Needs the ``k8s`` extra; selected with
``L2T_LAUNCHER=k8s`` (see ``l2t_pipeline/README.md`` and ``infra/README.md``).

What happens in :meth:`K8sTrainingLauncher.launch`:

1. the run's :class:`~l2t_core.config.TrainConfig` is *placed* on the pod's hardware
   (:meth:`~K8sTrainingLauncher.placed_config`: ``device='cuda'`` when the pod has GPUs, the
   DeepSpeed engine when it has several) and written as YAML next to the run, on the run's own
   storage (``<cfg.out>/launch/train-<dagster run id>.yaml``, any fsspec URL);
2. a pod starts ``python -m l2t_core.cli train --config <that URL>`` (one GPU or CPU) or
   ``torchrun``/``deepspeed`` with one process per GPU (:meth:`~K8sTrainingLauncher.command`);
   only rank 0 keeps the Pipes environment, so only rank 0 reports to Dagster;
3. ``PipesK8sClient`` injects the Pipes context, reads the messages from the pod's logs, waits for
   the pod and returns the invocation (``get_materialize_result()`` as with the local launcher).
   The pod is a dependent of the run worker's pod where that runs in the same namespace
   (:meth:`~K8sTrainingLauncher.owner_reference`): Kubernetes deletes it with the run worker's.

Credentials never appear in the pod spec: S3 keys, tokens and the like come from Kubernetes Secrets
(``env_secrets``, mounted with ``envFrom``); :meth:`~K8sTrainingLauncher.check` refuses a plain
``env`` value whose name looks like a credential.

The pure parts (:meth:`~K8sTrainingLauncher.command`, :meth:`~K8sTrainingLauncher.pod_spec`,
:meth:`~K8sTrainingLauncher.pod_meta`, :func:`write_train_config`) need no cluster and are what
``tests/test_k8s_launcher.py`` checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from typing import Literal, Mapping, Optional

import dagster as dg
import yaml
from pydantic import Field

from l2t_core.checkpoint import RunStorage
from l2t_core.config import TrainConfig
from l2t_core.hub import could_be_hub_id
from l2t_core.tasks import TASKS
from l2t_core.urls import redact_url

# only rank 0 of a multi-process launch talks to Dagster Pipes: the other ranks lose the variables
# that PipesK8sClient injects (l2t_core.pipes then runs them standalone); "$@" is the l2t command
RANK0_PIPES_SH = '[ "${RANK:-0}" = "0" ] || unset DAGSTER_PIPES_CONTEXT DAGSTER_PIPES_MESSAGES; exec "$@"'

# environment variable names that are credentials: they must come from a Secret (env_secrets)
_CREDENTIAL_NAME = re.compile(
    r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.IGNORECASE)
# DNS-1123 subdomain: the names of Secrets, claims and service accounts
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

DEFAULT_DEEPSPEED_CONFIG = "infra/deepspeed/zero2.json"  # relative to the image's working directory
CONTAINER_NAME = "l2t-train"
SCRATCH_MOUNT = "/scratch"  # scratch_size's emptyDir, the pod's TMPDIR
Job = Literal["train", "sft"]  # what a pod runs: `l2t train` or `l2t sft`
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# where a pod's service account token mounts its namespace
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _is_local(url: str) -> bool:
    """True for a local path or a ``file://`` URL (seen by the pod only through a mounted volume)."""
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return posixpath.normpath(url[len("file://"):] if url.startswith("file://") else url)


def config_url(run_url: str, run_id: str) -> str:
    """Where the launch config of Dagster run ``run_id`` lives: next to the run, on its storage."""
    return f"{run_url.rstrip('/')}/launch/train-{run_id}.yaml"


def write_train_config(cfg: TrainConfig, run_id: str) -> str:
    """Write ``cfg`` as YAML to :func:`config_url` on the run's storage (any fsspec URL; s3fs takes
    its credentials from the environment) and return that URL, which ``l2t train --config`` reads."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id or ""):
        raise ValueError(f"write_train_config: run id {run_id!r} must be a non-empty file-name-safe string")
    text = yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
    RunStorage(cfg.out).write_bytes(f"launch/train-{run_id}.yaml", text.encode())
    return config_url(cfg.out, run_id)


def _require_k8s():
    try:
        import dagster_k8s
        from kubernetes.utils import parse_quantity
    except ImportError as exc:
        raise ImportError(
            "K8sTrainingLauncher needs dagster-k8s: install the project's 'k8s' extra "
            "(pip install -e \".[pipeline,k8s]\")"
        ) from exc
    return dagster_k8s, parse_quantity


class Toleration(dg.Config):
    """A pod toleration (``spec.tolerations[]``), e.g. of the taint that keeps other pods off GPU nodes."""

    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: Optional[str] = None
    effect: Optional[str] = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute; empty: all.")

    def to_k8s(self) -> dict:
        return {k: v for k, v in {"key": self.key, "operator": self.operator, "value": self.value,
                                  "effect": self.effect}.items() if v is not None}


def _gpu_toleration() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


class K8sTrainingLauncher(dg.ConfigurableResource):
    """Launches ``l2t_core.cli train`` in a Kubernetes pod through ``PipesK8sClient``
    (the ``k8s`` extra); same ``launch(context, cfg)`` as ``TrainingLauncher``."""

    image: str = Field(description="The training image (infra/docker/Dockerfile.gpu), e.g. registry/l2t-gpu:0.1.0.")
    namespace: Optional[str] = Field(None, description="Namespace of the training pods (default: the run "
                                                       "worker's own namespace, else 'default').")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu limit of the pod; above 1 one rank per GPU.")
    distributed_launcher: Literal["torchrun", "deepspeed"] = Field(
        "torchrun", description="How several GPUs are driven: torchrun or the deepspeed launcher.")
    deepspeed_config: str = Field(DEFAULT_DEEPSPEED_CONFIG,
                                  description="DeepSpeed JSON for runs on several GPUs whose config has "
                                              "engine 'torch' (path inside the image or on a mounted volume).")
    cpu_request: str = Field("8", description="CPU request (a Kubernetes quantity).")
    memory_request: str = Field("64Gi", description="Memory request (a Kubernetes quantity).")
    memory_limit: Optional[str] = Field(None, description="Memory limit; default: the request.")
    shm_size: str = Field("16Gi", description="Size of /dev/shm (memory-backed) for NCCL and data loaders.")
    env_secrets: list[str] = Field(default_factory=list,
                                   description="Secrets mounted with envFrom (S3 keys, HF token, ...).")
    env: dict[str, str] = Field(default_factory=dict,
                                description="Plain, non-secret environment (e.g. AWS_ENDPOINT_URL, HF_HOME).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[Toleration] = Field(default_factory=_gpu_toleration,
                                          description="Tolerations; default: the nvidia.com/gpu taint.")
    service_account: Optional[str] = Field(None, description="Service account of the training pod.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry.")
    shared_volume_claim: Optional[str] = Field(
        None, description="ReadWriteMany PVC mounted at shared_mount_path in the training pod, for local run "
                          "directories and base models (the run worker must mount it at the same path).")
    shared_mount_path: str = Field("/mnt/l2t", description="Where shared_volume_claim is mounted.")
    pod_wait_timeout_s: float = Field(
        24 * 3600.0, gt=0, description="PipesK8sClient's pod_wait_timeout: how long to wait for the pod to terminate "
                                       "once its log has ended. It does not bound training (run_deadline_s does).")
    run_deadline_s: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False,
        description="The pod's activeDeadlineSeconds: Kubernetes fails a pod running longer (a hung run; a new "
                    "materialization or a retry resumes from its last checkpoint, with a fresh deadline). None: no "
                    "limit.")
    scratch_size: Optional[str] = Field(
        None, description="Local scratch disk of the pod: an emptyDir of this size at /scratch, TMPDIR pointing "
                          "there, and that much ephemeral-storage requested, where each rank stages its checkpoint "
                          "shard for an object-store upload and a resume downloads one (about one whole "
                          "checkpoint). None: the container's writable layer, unrequested.")
    poll_interval_s: float = Field(10.0, gt=0, description="Seconds between Kubernetes API polls.")
    delete_pod_on_completion: bool = True
    owned_by_run_worker: bool = Field(
        True, description="Make the training pod a dependent of the run worker's pod (ownerReferences) when the "
                          "run worker runs in a pod of the same namespace: Kubernetes then deletes the training pod "
                          "with the run worker's, e.g. a run terminated or a run worker pod deleted, instead of "
                          "leaving it training beside a relaunch (with delete_pod_on_completion off, a finished "
                          "pod and its logs go with it too). Needs 'get' on pods, which PipesK8sClient needs too.")

    # ------------------------------------------------------------------ from the environment
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "K8sTrainingLauncher":
        """The launcher of ``L2T_LAUNCHER=k8s``: ``L2T_K8S_IMAGE`` (required), ``L2T_K8S_NAMESPACE``,
        ``L2T_K8S_GPUS``, ``L2T_K8S_ENV_SECRETS`` (comma-separated Secret names),
        ``L2T_K8S_SERVICE_ACCOUNT``, ``L2T_K8S_SHARED_PVC``, ``L2T_K8S_SHARED_MOUNT``,
        ``L2T_K8S_SCRATCH`` (``scratch_size``), ``L2T_K8S_RUN_DEADLINE_S`` (``run_deadline_s``); everything else
        keeps its default and can be changed per run in the launchpad (resources.launcher.config)."""
        _require_k8s()  # fail when the code location loads, not when the first training run starts
        env = os.environ if environ is None else environ
        image = env.get("L2T_K8S_IMAGE", "").strip()
        if not image:
            raise ValueError("L2T_LAUNCHER=k8s needs L2T_K8S_IMAGE, the training image built from "
                             "infra/docker/Dockerfile.gpu (e.g. L2T_K8S_IMAGE=registry.example.com/l2t-gpu:0.1.0)")
        kwargs: dict = {"image": image}
        gpus = env.get("L2T_K8S_GPUS", "").strip()
        if gpus:
            if not gpus.isdigit():
                raise ValueError(f"L2T_K8S_GPUS={gpus!r} is not a whole number of GPUs per training pod (e.g. 1 or 8)")
            kwargs["gpus"] = int(gpus)
        secrets = [s.strip() for s in env.get("L2T_K8S_ENV_SECRETS", "").split(",") if s.strip()]
        if secrets:
            kwargs["env_secrets"] = secrets
        for var, field in (("L2T_K8S_NAMESPACE", "namespace"), ("L2T_K8S_SERVICE_ACCOUNT", "service_account"),
                           ("L2T_K8S_SHARED_PVC", "shared_volume_claim"), ("L2T_K8S_SHARED_MOUNT", "shared_mount_path"),
                           ("L2T_K8S_SCRATCH", "scratch_size")):
            value = env.get(var, "").strip()
            if value:
                kwargs[field] = value
        deadline = env.get("L2T_K8S_RUN_DEADLINE_S", "").strip()
        if deadline:
            try:
                kwargs["run_deadline_s"] = float(deadline)
            except ValueError:
                raise ValueError(f"L2T_K8S_RUN_DEADLINE_S={deadline!r} is not a number of seconds (e.g. 259200 "
                                 "for three days)") from None
        return cls(**kwargs)

    # ------------------------------------------------------------------ the run's config on the pod
    def placed_config(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` as the pod runs it: on GPUs, ``device='cuda'``; on several GPUs, the DeepSpeed
        engine with ``deepspeed_config`` unless the config already names one (the torch engine
        trains on one device). Without GPUs the config is unchanged."""
        if self.gpus == 0:
            return cfg
        data = json.loads(cfg.model_dump_json())
        data["device"] = "cuda"
        if self.gpus > 1 and cfg.engine == "torch":
            data.update(engine="deepspeed", deepspeed_config=self.deepspeed_config)
        return TrainConfig.model_validate(data)

    def _mounted(self, path: str) -> bool:
        mount = posixpath.normpath(self.shared_mount_path)
        p = _local_path(path)
        return bool(self.shared_volume_claim) and (p == mount or p.startswith(mount.rstrip("/") + "/"))

    def check(self, cfg: TrainConfig) -> None:
        """Fail before any pod starts when the pod could not run ``cfg`` or the spec would be wrong;
        each message names the field and how to fix it."""
        self.check_pod()
        self._check_run(cfg)

    def check_pod(self) -> None:
        """The pod spec's own settings (image, quantities, names, env, tolerations, mount path)."""
        _, parse_quantity = _require_k8s()
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise ValueError(f"K8sTrainingLauncher.image {self.image!r} is not an image reference "
                             "(e.g. registry.example.com/l2t-gpu:0.1.0; set L2T_K8S_IMAGE)")
        for name in ("cpu_request", "memory_request", "memory_limit", "shm_size", "scratch_size"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parse_quantity(value)
            except ValueError:
                raise ValueError(f"K8sTrainingLauncher.{name} {value!r} is not a Kubernetes quantity "
                                 "(e.g. '8', '500m', '64Gi')") from None
        for name in ("env_secrets", "image_pull_secrets"):
            for secret in getattr(self, name):
                if not _DNS_SUBDOMAIN.match(secret):
                    raise ValueError(f"K8sTrainingLauncher.{name}: {secret!r} is not a Secret name "
                                     "(lower-case letters, digits, '-' and '.')")
        for name in ("service_account", "shared_volume_claim"):
            value = getattr(self, name)
            if value is not None and not _DNS_SUBDOMAIN.match(value):
                raise ValueError(f"K8sTrainingLauncher.{name} {value!r} is not a Kubernetes object name")
        leaked = sorted(k for k in self.env if _CREDENTIAL_NAME.search(k))
        if leaked:
            raise ValueError(f"K8sTrainingLauncher.env holds {', '.join(leaked)}, which look like credentials; "
                             "values in env are written into the pod spec. Put them in a Kubernetes Secret "
                             "and list its name in env_secrets (L2T_K8S_ENV_SECRETS), e.g. kubectl create secret "
                             "generic l2t-s3 --from-literal=AWS_ACCESS_KEY_ID=... (see infra/README.md)")
        for t in self.tolerations:
            if t.effect is not None and t.effect not in TAINT_EFFECTS:
                raise ValueError(f"K8sTrainingLauncher.tolerations: effect {t.effect!r} of key {t.key!r} is not one of "
                                 f"{', '.join(TAINT_EFFECTS)} (leave it empty to tolerate every effect)")
            if (t.operator == "Exists") == (t.value is not None):
                raise ValueError(f"K8sTrainingLauncher.tolerations: key {t.key!r} with operator {t.operator!r} "
                                 "needs a value for 'Equal' and none for 'Exists'")
        if not posixpath.isabs(self.shared_mount_path):
            raise ValueError(f"K8sTrainingLauncher.shared_mount_path {self.shared_mount_path!r} must be absolute")

    def _shared_env(self) -> dict[str, str]:
        """The run worker's directories on the shared volume, for the pod: ``L2T_DATA_DIR`` (a data
        file named by ``data.source`` is then the same file in both) and the hub cache
        ``HF_HUB_CACHE`` (a hub model the run worker downloaded, e.g. the commit base_model pinned
        and evaluated, is not downloaded again per pod), unless ``env`` names a hub cache of its own
        (``HF_HOME`` or ``HF_HUB_CACHE``). ``env`` overrides them."""
        from huggingface_hub import constants

        from l2t_core.data import ENV_VAR, data_dir

        here = {ENV_VAR: str(data_dir())}
        if not {"HF_HOME", "HF_HUB_CACHE"} & set(self.env):  # the launcher's own hub cache wins (HF_HUB_CACHE
            here["HF_HUB_CACHE"] = str(constants.HF_HUB_CACHE)  # would override an HF_HOME there)
        return {k: v for k, v in here.items() if self._mounted(v)}

    def _check_run(self, cfg: TrainConfig) -> None:
        if self.gpus > 1 and cfg.engine != "deepspeed":
            raise ValueError(f"a run on {self.gpus} GPUs needs engine='deepspeed' (got {cfg.engine!r}); "
                             "use placed_config() or set engine and deepspeed_config in the TrainConfig")
        if _is_local(cfg.out):
            if not self._mounted(cfg.out):
                raise ValueError(
                    f"the run directory {cfg.out!r} is a local path, which the training pod sees only on a shared "
                    f"volume: set shared_volume_claim (L2T_K8S_SHARED_PVC) to a ReadWriteMany PVC mounted at "
                    f"{self.shared_mount_path!r} in the run worker too, and L2T_STORAGE_URL under that path; "
                    "or use object storage (L2T_STORAGE_URL=s3://bucket/prefix)")
        if posixpath.isabs(cfg.policy) and not self._mounted(cfg.policy):
            raise ValueError(
                f"the base policy {cfg.policy!r} is a local directory the training pod cannot see: keep base models "
                f"on the shared volume (L2T_MODELS_DIR under {self.shared_mount_path!r} with shared_volume_claim "
                "set) or register a hub id in the model registry")
        if cfg.data.source not in TASKS:  # a JSONL file: the pod must read the very file hashed here
            from l2t_core.data import data_dir
            from l2t_core.training_data import source_path

            try:
                path = source_path(cfg.data.source)
            except FileNotFoundError as exc:
                raise ValueError(f"training data {cfg.data.source!r}: {exc}") from None
            found_in_data_dir = path == data_dir() / cfg.data.source
            if not (self._mounted(str(path)) and (found_in_data_dir or posixpath.isabs(cfg.data.source))):
                raise ValueError(
                    f"the training data {cfg.data.source!r} is {path}, which the training pod cannot read as the same "
                    f"file: keep it on the shared volume, in the data directory (L2T_DATA_DIR under "
                    f"{self.shared_mount_path!r}, passed on to the pod) or as an absolute path under it")

    # ------------------------------------------------------------------ the pod
    def job_gpus(self, job: Job = "train") -> int:
        """GPUs of a ``job``'s pod: ``gpus`` for training, at most one for an SFT (one process)."""
        return self.gpus if job == "train" else min(self.gpus, 1)

    def command(self, config: str, job: Job = "train") -> list[str]:
        """The container's arguments: the ``l2t`` entrypoint on ``config`` (a URL or path the pod
        can read); for training, one process per GPU through torchrun or deepspeed when the pod has
        several; ``l2t sft`` runs one process."""
        if job == "sft":
            return ["python", "-m", "l2t_core.cli", "sft", "--config", config, "-q"]
        train = ["python", "-m", "l2t_core.cli", "train", "--config", config]
        if self.gpus <= 1:
            return train
        rank0 = ["/bin/sh", "-c", RANK0_PIPES_SH, "l2t-rank", *train]
        if self.distributed_launcher == "torchrun":
            return ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", str(self.gpus),
                    "--no-python", *rank0]
        # without --no_local_rank the deepspeed launcher puts --local_rank=N right after the program
        # (/bin/sh, which refuses it); each rank reads RANK and LOCAL_RANK from the environment
        return ["deepspeed", "--num_gpus", str(self.gpus), "--no_python", "--no_local_rank", *rank0]

    def container(self, config: str, job: Job = "train") -> dict:
        """The training container (camelCase Kubernetes fields). The command goes into ``args`` so
        the image's entrypoint (tini, which forwards signals to the ranks) stays PID 1."""
        requests = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits = {"memory": self.memory_limit or self.memory_request}
        if self.job_gpus(job):  # extended resources: the request equals the limit
            limits["nvidia.com/gpu"] = str(self.job_gpus(job))
        # PYTHONUNBUFFERED (logs as they are written, also DeepSpeed's on stdout); rank 0's Pipes session
        # makes its own stderr line-buffered (l2t_core.pipes.line_buffered_stderr)
        env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **self._shared_env(), **self.env}
        mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
        if self.scratch_size:
            requests["ephemeral-storage"] = self.scratch_size
            mounts.append({"name": "scratch", "mountPath": SCRATCH_MOUNT})
            env = {"TMPDIR": SCRATCH_MOUNT, **env}
        if self.shared_volume_claim:
            mounts.append({"name": "l2t-shared", "mountPath": self.shared_mount_path})
        c = {
            "name": CONTAINER_NAME,
            "image": self.image,
            "args": self.command(config, job),
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "resources": {"requests": requests, "limits": limits},
            "volumeMounts": mounts,
        }
        if self.env_secrets:
            c["envFrom"] = [{"secretRef": {"name": s}} for s in self.env_secrets]
        return c

    def pod_spec(self, config: str, job: Job = "train") -> dict:
        """``base_pod_spec`` for ``PipesK8sClient.run``: the container, GPU placement, volumes."""
        volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}}]
        if self.scratch_size:
            volumes.append({"name": "scratch", "emptyDir": {"sizeLimit": self.scratch_size}})
        if self.shared_volume_claim:
            volumes.append({"name": "l2t-shared", "persistentVolumeClaim": {"claimName": self.shared_volume_claim}})
        # the training process needs no Kubernetes API access: no service account token in the pod
        spec: dict = {"restartPolicy": "Never", "automountServiceAccountToken": False,
                      "containers": [self.container(config, job)], "volumes": volumes}
        if self.job_gpus(job) and self.tolerations:
            spec["tolerations"] = [t.to_k8s() for t in self.tolerations]
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        if self.image_pull_secrets:
            spec["imagePullSecrets"] = [{"name": s} for s in self.image_pull_secrets]
        if self.run_deadline_s is not None:
            spec["activeDeadlineSeconds"] = max(1, int(self.run_deadline_s))
        return spec

    def pod_meta(self, partition_key: str | None, config: str, job: Job = "train", owner: dict | None = None,
                 run_id: str | None = None) -> dict:
        """``base_pod_meta``: labels to select training (or SFT) pods, and those of one Dagster run
        (``dagster/run-id``, as the run worker's pod has it: ``kubectl get pods -l
        dagster/run-id=<id>``), the partition and config as annotations, and the ``owner``
        (:meth:`owner_reference`) when there is one."""
        annotations = {"l2t/config-url": redact_url(config)}
        if partition_key:
            annotations["l2t/partition"] = str(partition_key)
        component = "training" if job == "train" else "sft"
        labels = {"app.kubernetes.io/name": "l2t", "app.kubernetes.io/component": component}
        if run_id and re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", run_id):  # a label value
            labels["dagster/run-id"] = run_id
        meta = {"labels": labels, "annotations": annotations}
        if owner is not None:
            meta["ownerReferences"] = [owner]
        return meta

    def owner_reference(self, log=None, environ: Mapping[str, str] | None = None, read_pod=None,
                        namespace_file: str = SERVICE_ACCOUNT_NAMESPACE) -> dict | None:
        """The ownerReference that makes the training pod a dependent of the run worker's pod, or
        None: when ``owned_by_run_worker`` is off, the run worker is no pod (``HOSTNAME`` and the
        in-cluster service account's namespace), the training pods go to another namespace (an
        owner must share the namespace), or the run worker cannot read its own pod (said in
        ``log``). ``read_pod(name, namespace)`` reads a pod (default: the in-cluster API)."""
        env = os.environ if environ is None else environ
        name = env.get("HOSTNAME", "")
        if not self.owned_by_run_worker or not name or "KUBERNETES_SERVICE_HOST" not in env:
            return None
        try:
            with open(namespace_file, encoding="utf-8") as fh:
                here = fh.read().strip()
        except OSError:
            return None
        if self.namespace and self.namespace != here:
            if log is not None:
                log.warning(f"the training pod goes to namespace {self.namespace!r}, the run worker runs in {here!r}: "
                            "it cannot own the training pod, which outlives a run worker that is deleted")
            return None
        try:
            if read_pod is None:
                import kubernetes

                kubernetes.config.load_incluster_config()
                read_pod = kubernetes.client.CoreV1Api().read_namespaced_pod
            me = read_pod(name, here)
        except Exception as exc:  # noqa: BLE001 - no owner is a weaker guarantee, not a reason to fail the run
            if log is not None:
                log.warning(f"cannot read the run worker's pod {here}/{name} ({type(exc).__name__}: {exc}): the "
                            "training pod gets no owner and outlives a run worker that is deleted")
            return None
        return {"apiVersion": "v1", "kind": "Pod", "name": me.metadata.name, "uid": me.metadata.uid}

    def client_run_kwargs(self, partition_key: str | None, config: str, job: Job = "train",
                          owner: dict | None = None, run_id: str | None = None) -> dict:
        """Everything ``PipesK8sClient.run`` receives besides ``context``."""
        return {"namespace": self.namespace,
                "base_pod_meta": self.pod_meta(partition_key, config, job, owner, run_id),
                "base_pod_spec": self.pod_spec(config, job), "pod_wait_timeout": self.pod_wait_timeout_s,
                "delete_pod_on_completion": self.delete_pod_on_completion}

    # ------------------------------------------------------------------ launch
    def launch(self, context: dg.AssetExecutionContext, cfg: TrainConfig) -> dg.PipesClientCompletedInvocation:
        """Place ``cfg`` on the pod's hardware, write it next to the run, run the pod and wait."""
        dagster_k8s, _ = _require_k8s()
        placed = self.placed_config(cfg)
        self.check(placed)
        if placed != cfg:
            context.log.info("placed on %d GPU(s): device=%s engine=%s", self.gpus, placed.device, placed.engine)
        url = write_train_config(placed, context.run.run_id)
        context.log.info("training config at %s; pod image %s, %d GPU(s)", redact_url(url), self.image, self.gpus)
        partition = context.partition_key if context.has_partition_key else None
        client = dagster_k8s.PipesK8sClient(poll_interval=self.poll_interval_s)
        return client.run(context=context, **self.client_run_kwargs(partition, url,
                                                                     owner=self.owner_reference(context.log),
                                                                     run_id=context.run.run_id))

    # ------------------------------------------------------------------ SFT
    def placed_sft_config(self, cfg):
        """An ``l2t_core.sft.SFTConfig`` as the pod runs it: on a GPU, ``device='cuda'``."""
        return cfg if self.gpus == 0 else cfg.model_copy(update={"device": "cuda"})

    def check_sft(self, cfg) -> None:
        """Fail before any pod starts when the SFT pod could not read its model or traces or write
        its output: the output and the traces (which the run worker hashes too, to tell when the SFT
        is stale) must be absolute paths on the shared volume, the model there too or a hub id."""
        self.check_pod()
        for field, value in (("out", cfg.out), ("data", cfg.data), ("model", cfg.model)):
            hub_id = field == "model" and could_be_hub_id(value)  # 'org/name', or a bare name such as 'gpt2'
            if not hub_id and not (posixpath.isabs(value) and self._mounted(value)):
                raise ValueError(
                    f"the SFT's {field} {value!r} is not an absolute path on the shared volume, which is all the pod "
                    f"and the run worker both see: set shared_volume_claim (L2T_K8S_SHARED_PVC) to a ReadWriteMany "
                    f"PVC mounted at {self.shared_mount_path!r} in the run worker too, and keep it under that path "
                    "(L2T_MODELS_DIR for the SFT's output)" + ("; or register a hub id ('org/name')"
                                                                if field == "model" else ""))

    def launch_sft(self, context: dg.AssetExecutionContext, cfg) -> dg.PipesClientCompletedInvocation:
        """Run ``l2t sft`` on ``cfg`` in a pod with at most one GPU (SFT runs one process): the
        config is written beside the output on the shared volume (``.launch/sft-<run id>.yaml``)."""
        dagster_k8s, _ = _require_k8s()
        placed = self.placed_sft_config(cfg)
        self.check_sft(placed)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", context.run.run_id or ""):
            raise ValueError(f"launch_sft: run id {context.run.run_id!r} must be a file-name-safe string")
        path = posixpath.join(posixpath.dirname(posixpath.normpath(placed.out)), ".launch",
                              f"sft-{context.run.run_id}.yaml")
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(yaml.safe_dump(json.loads(placed.model_dump_json()), sort_keys=False))
        context.log.info("SFT config at %s; pod image %s, %d GPU", path, self.image, self.job_gpus("sft"))
        partition = context.partition_key if context.has_partition_key else None
        client = dagster_k8s.PipesK8sClient(poll_interval=self.poll_interval_s)
        try:
            return client.run(context=context, **self.client_run_kwargs(partition, path, "sft",
                                                                        self.owner_reference(context.log),
                                                                        context.run.run_id))
        finally:  # the SFT keeps its own config (sft_config.json): the launch file is not needed after
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
