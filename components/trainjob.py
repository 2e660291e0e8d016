"""Distributed training for the pipeline's train step: a Kubeflow Trainer TrainJob.

With more than one process (``train_nodes`` x ``train_procs_per_node`` > 1) the train step does not
train in its own pod. It creates a TrainJob (``trainer.kubeflow.org/v1alpha1``, written for
**Kubeflow Trainer v2.3**) that runs this image in every node with the runtime's torchrun (the stock
``torch-distributed`` ClusterTrainingRuntime sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which torchrun reads), waits for
it while streaming node 0's log, and collects the bundle the job wrote to the checkpoint prefix.

- The job trains ``segcore train ... --resume --output <checkpoint prefix>`` from a copy of the
  canonical dataset under ``<checkpoint_uri>/datasets/<content hash>``: pods share no disk, so the
  data, the checkpoints and the bundle live in the object store.
- Its name is derived from the checkpoint prefix (dataset, template, settings): a retried step finds
  its own job (HTTP 409 on create) and attaches to it; a failed or finished job of that name is
  deleted and created again, which resumes from the checkpoints. Two trainings of one prefix never
  run side by side.
- Credentials reach the nodes as ``valueFrom.secretKeyRef`` of the pipeline's own secrets
  (``segcore-s3``, ``segcore-mlflow`` by default), never as values.
- The create is sent with ``fieldValidation=Strict``: an API server whose TrainJob schema lacks a
  field we use (another Trainer version) rejects the whole job with a clear error; nothing is
  half-created. No API at all (Trainer not installed) and no permission are clear errors too.
- Client: the Kubernetes API through the ``kubernetes`` package (already a dependency of kfp, so
  the image needs nothing new). The ``kubeflow`` SDK's TrainerClient would add a dependency, wraps
  commands in its own shell script, and does not let us create with strict field validation.

``launch_local`` runs the rendered job on this machine instead: the job's own command once per
"node", with the ``PET_*`` variables the runtime would set (two torchrun processes on 127.0.0.1 for
two nodes): ``segcore pipeline run --local --train-procs-per-node M`` takes that path.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from segcore.errors import SegcoreError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
TRAINER_VERSION = "v2.3"
DEFAULT_RUNTIME = "torch-distributed"
COMMAND = ["python3", "-m", "torch.distributed.run"]  # torchrun of the image's Python
# Node 0's pod: Trainer v2 runs a JobSet named after the TrainJob whose replicated job "node" is one
# indexed Job, "<name>-node-0", with one pod per node (completion index = node rank).
NODE0_SELECTOR = "batch.kubernetes.io/job-name={name}-node-0,batch.kubernetes.io/job-completion-index=0"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class Distribution:
    """How a distributed train step runs (fixed when the pipeline is compiled)."""

    nodes: int = 1
    procs_per_node: int = 1
    runtime: str = DEFAULT_RUNTIME
    cpu: str = ""  # per node, e.g. "8" ("" = no request)
    memory: str = ""  # per node, e.g. "32Gi"
    gpu_type: str = ""  # e.g. "nvidia.com/gpu"
    gpu_count: int = 0  # per node
    keep_job: bool = False
    timeout_min: float = 7 * 24 * 60
    poll_s: float = 10.0

    @property
    def processes(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    def check(self) -> None:
        if self.nodes < 1 or self.procs_per_node < 1:
            raise SegcoreError(
                f"train nodes ({self.nodes}) and processes per node ({self.procs_per_node}) must be >= 1"
            )
        if self.gpu_type and self.gpu_count < 1:
            raise SegcoreError(f"{self.gpu_type}: give at least 1 GPU per node")

    def resources(self) -> dict:
        """``resourcesPerNode``: requests = limits for CPU and memory, GPUs as limits."""
        requests = {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory)) if v}
        limits = dict(requests)
        if self.gpu_type:
            limits[self.gpu_type] = self.gpu_count
        out = {}
        if requests:
            out["requests"] = requests
        if limits:
            out["limits"] = limits
        return out


def job_name(prefix: str) -> str:
    """A TrainJob name (RFC 1035 label, at most 63 characters) determined by the checkpoint prefix."""
    return f"segcore-train-{hashlib.sha256(prefix.encode()).hexdigest()[:16]}"


def secret_env(secrets: dict[str, tuple[str, ...]]) -> list[dict]:
    """Environment variables from Kubernetes secrets (each key optional), as references only."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for secret, keys in secrets.items()
        for key in keys
    ]


def render(
    name: str,
    namespace: str,
    image: str,
    args: list[str],
    dist: Distribution,
    secrets: dict[str, tuple[str, ...]],
    labels: dict[str, str] | None = None,
) -> dict:
    """The TrainJob (Kubeflow Trainer v2.3) that runs ``COMMAND + args`` in every node."""
    trainer = {
        "image": image,
        "command": list(COMMAND),
        "args": list(args),
        "numNodes": dist.nodes,
        "numProcPerNode": dist.procs_per_node,
        "env": secret_env(secrets),
    }
    resources = dist.resources()
    if resources:
        trainer["resourcesPerNode"] = resources
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "segcore", "app.kubernetes.io/component": "train", **(labels or {})},
        },
        "spec": {
            "runtimeRef": {"name": dist.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": trainer,
        },
    }


# ------------------------------------------------------------------------------- on this machine


def launch_local(job: dict, timeout_s: float | None = None) -> None:
    """Run ``job`` here: its command once per node with the runtime's ``PET_*`` variables (the
    nodes on 127.0.0.1, gloo on the CPU). ``python3`` in the command is this interpreter."""
    import socket

    trainer = job["spec"]["trainer"]
    command = [sys.executable if part == "python3" else part for part in trainer["command"]] + trainer["args"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {
        "PET_NNODES": str(trainer["numNodes"]),
        "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": port,
    }
    log.info("running TrainJob %s here: %d node(s) x %d process(es)", job["metadata"]["name"],
             trainer["numNodes"], trainer["numProcPerNode"])  # fmt: skip
    nodes = [
        subprocess.Popen(command, env={**os.environ, **base, "PET_NODE_RANK": str(rank)})
        for rank in range(trainer["numNodes"])
    ]
    try:
        codes = [node.wait(timeout=timeout_s) for node in nodes]
    except subprocess.TimeoutExpired:
        raise SegcoreError(f"the local TrainJob did not finish within {timeout_s:.0f}s") from None
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    if any(codes):
        raise SegcoreError(f"the local TrainJob failed: node exit codes {codes}")


# ------------------------------------------------------------------------------------ on a cluster


def kubernetes_clients():
    """(CustomObjectsApi, CoreV1Api, namespace) from the pod's service account, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            namespace = f.read().strip()
    except config.ConfigException:
        path = os.environ.get("KUBECONFIG") or None  # read now: the client reads it once, at its import
        try:
            config.load_kube_config(config_file=path)
        except (config.ConfigException, OSError) as exc:
            raise SegcoreError(
                f"no Kubernetes API to create the TrainJob on (not in a pod, no kubeconfig): {exc}"
            ) from None
        _, context = config.list_kube_config_contexts(config_file=path)
        namespace = context.get("context", {}).get("namespace", "default")
    return client.CustomObjectsApi(), client.CoreV1Api(), namespace


@dataclass
class TrainJobLauncher:
    """Create (or attach to) a TrainJob, stream node 0's log, wait for Complete or Failed."""

    custom: object  # kubernetes.client.CustomObjectsApi
    core: object  # kubernetes.client.CoreV1Api
    namespace: str
    poll_s: float = 10.0
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))

    def run(self, job: dict, timeout_s: float, keep: bool = False) -> None:
        name = job["metadata"]["name"]
        self._create_or_attach(job)
        follower = threading.Thread(target=self._follow_logs, args=(name,), daemon=True)
        self._done = threading.Event()
        follower.start()
        try:
            self._wait(name, timeout_s, keep)
        finally:
            self._done.set()
            follower.join(timeout=5)

    def _create_or_attach(self, job: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        name = job["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, job, field_validation="Strict"
            )
            log.info("created TrainJob %s/%s (Kubeflow Trainer %s)", self.namespace, name, TRAINER_VERSION)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise SegcoreError(self._explain(exc, name)) from None
        existing = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        state, _ = job_state(existing)
        if state == "running":
            log.info("TrainJob %s exists and is running (a retried step): attaching to it", name)
            return
        # Failed, or finished but its bundle was not collected: start it again; it resumes from the checkpoints.
        log.info("TrainJob %s exists (%s): deleting it and starting again, from its checkpoints", name, state)
        self._delete(name)
        for _ in range(60):
            try:
                self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, job, field_validation="Strict"
                )
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise SegcoreError(self._explain(exc, name)) from None
                time.sleep(min(self.poll_s, 2.0))  # the old one is still being deleted
        raise SegcoreError(f"TrainJob {name}: the previous job of that name was not deleted in time")

    def _explain(self, exc, name: str) -> str:
        body = " ".join(str(getattr(exc, "body", "") or exc.reason).split())[:500]
        if exc.status == 404:
            return (f"TrainJob {name}: the cluster has no {GROUP}/{VERSION} TrainJob API; install Kubeflow Trainer "
                    f"{TRAINER_VERSION} with its {DEFAULT_RUNTIME} runtime ({body})")  # fmt: skip
        if exc.status in (401, 403):
            return (f"TrainJob {name}: the pipeline's service account may not create trainjobs in "
                    f"{self.namespace}; give it the Role in docs/pipeline.md ({body})")  # fmt: skip
        if exc.status in (400, 422):
            return (f"TrainJob {name} was rejected; segcore renders TrainJobs for Kubeflow Trainer "
                    f"{TRAINER_VERSION}, is that the cluster's version? ({body})")  # fmt: skip
        return f"TrainJob {name}: Kubernetes API error {exc.status}: {body}"

    def _wait(self, name: str, timeout_s: float, keep: bool) -> None:
        started = time.monotonic()
        last = None
        while True:
            job = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            state, reason = job_state(job)
            if state != last:
                log.info("TrainJob %s: %s%s", name, state, f" ({reason})" if reason else "")
                last = state
            if state == "complete":
                self._done.set()
                if not keep:
                    self._delete(name)
                return
            if state == "failed":
                self._done.set()
                time.sleep(min(self.poll_s, 2.0))  # let the log follower finish
                if self.tail:
                    log.error("last lines of node 0:\n%s", "\n".join(self.tail))
                if not keep:
                    self._delete(name)
                raise SegcoreError(f"TrainJob {name} failed: {reason or 'no reason given'}")
            if time.monotonic() - started > timeout_s:
                if not keep:
                    self._delete(name)
                raise SegcoreError(
                    f"TrainJob {name} did not finish within {timeout_s / 60:.1f} min (still {state}); "
                    + ("kept" if keep else "deleted; a retry resumes from the checkpoints")
                )
            time.sleep(self.poll_s)

    def _delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
            )
            log.info("deleted TrainJob %s", name)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete TrainJob %s: %s", name, exc.reason)

    def _follow_logs(self, name: str) -> None:
        """Node 0's log into ours (and the tail kept for a failure message), pod after pod."""
        seen: set[str] = set()
        while not self._done.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector=NODE0_SELECTOR.format(name=name))
                for pod in pods.items:
                    pod_name = pod.metadata.name
                    if pod_name in seen or (pod.status and pod.status.phase == "Pending"):
                        continue
                    seen.add(pod_name)
                    stream = self.core.read_namespaced_pod_log(
                        pod_name, self.namespace, follow=True, _preload_content=False
                    )
                    for raw in stream.stream():
                        for line in raw.decode("utf-8", "replace").splitlines():
                            self.tail.append(line)
                            print(f"[node 0] {line}", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the job's status decides
                log.debug("node 0 log: %s", exc)
            self._done.wait(min(self.poll_s, 5.0))


def job_state(job: dict) -> tuple[str, str]:
    """('complete' | 'failed' | 'running', reason) from a TrainJob's status conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        reason = ": ".join(p for p in (condition.get("reason"), condition.get("message")) if p)
        if condition.get("type") == "Complete":
            return "complete", reason
        if condition.get("type") == "Failed":
            return "failed", reason
    return "running", ""


# ------------------------------------------------------------------------------------ the step


def train_args(
    template: str,
    data_uri: str,
    prefix: str,
    options,
    dist: Distribution,
    tracking,
    s3_endpoint: str,
    unlabeled: str = "",
    load_weights: str = "",
    allow_dropped_classes: bool = False,
):
    """``segcore train`` arguments of every node (after ``python3 -m torch.distributed.run``).

    ``options.batch_size`` is the global batch (the recipe's 8 by default), shared out over the
    processes: each trains ``batch_size / processes`` images per step."""
    from segcore.models import get_template

    batch = options.batch_size or get_template(template).training.batch_size
    if batch % dist.processes:
        raise SegcoreError(
            f"batch size {batch} cannot be shared out over {dist.nodes} node(s) x {dist.procs_per_node} "
            "process(es); give a batch_size that is a multiple of the process count"
        )
    args = ["-m", "segcore.cli", "train", template, "--train-data-root", data_uri, "--output", prefix, "--resume",
            "--batch-size", str(batch // dist.processes), "--num-workers", str(options.num_workers)]  # fmt: skip
    if options.epochs:
        args += ["--epochs", str(options.epochs)]
    if options.input_size:
        args += ["--input-size", "x".join(map(str, options.input_size))]
    if options.lr:
        args += ["--lr", repr(options.lr)]
    for flag in ("early_stop_patience", "plateau_patience"):
        if getattr(options, flag) is not None:
            args += [f"--{flag.replace('_', '-')}", str(getattr(options, flag))]
    if unlabeled:
        args += ["--unlabeled-data-root", unlabeled]
    if load_weights:
        args += ["--load-weights", load_weights] + (["--allow-dropped-classes"] if allow_dropped_classes else [])
    if dist.gpu_type:
        args += ["--device", "cuda"]  # a node without CUDA fails at once instead of training on its CPU
    if s3_endpoint:
        args += ["--s3-endpoint", s3_endpoint]
    if tracking is None or tracking.no_tracking:
        return [*args, "--no-tracking"]
    if tracking.tracking_uri and "@" not in tracking.tracking_uri.split("//", 1)[-1].split("/", 1)[0]:
        args += ["--tracking-uri", tracking.tracking_uri]  # (else MLFLOW_TRACKING_URI from the secret)
    if tracking.experiment:
        args += ["--experiment", tracking.experiment]
    if tracking.parent_run_id:
        args += ["--parent-run-id", tracking.parent_run_id]
    return args


def train_distributed(
    template: str,
    dataset: str,
    model_dir: str,
    options,
    checkpoint_uri: str,
    key: dict,
    dist: Distribution,
    *,
    image: str,
    secrets: dict[str, tuple[str, ...]],
    tracking=None,
    s3_endpoint: str = "",
    local: bool = False,
    unlabeled: str = "",
    load_weights: str = "",
    allow_dropped_classes: bool = False,
) -> tuple[dict, str]:
    """The train step with ``dist.processes`` > 1: a TrainJob on the cluster (``local``: the same job
    run here), then the bundle from the checkpoint prefix into ``model_dir``. Returns (bundle
    metadata, checkpoint prefix), as ``segcore.steps.train_resumable`` does."""
    from segcore import storage
    from segcore.data.convert import load_manifest
    from segcore.steps.train import checkpoint_prefix, collect_bundle, finished_at

    dist.check()
    if not checkpoint_uri:
        raise SegcoreError("a distributed train step needs checkpoint_uri (an s3:// prefix): its pods share no disk")
    if not local and not storage.is_s3(checkpoint_uri):
        raise SegcoreError(f"checkpoint_uri {checkpoint_uri!r}: a TrainJob's nodes need an s3:// prefix")
    manifest = load_manifest(dataset)
    prefix = checkpoint_prefix(checkpoint_uri, manifest["content_hash"], template, key)
    if finished_at(prefix):
        log.info("%s holds this training, finished: reusing it", prefix)
        return collect_bundle(prefix, model_dir), prefix
    data_uri = str(dataset) if local else _shared_dataset(dataset, checkpoint_uri, manifest["content_hash"])
    args = train_args(
        template, data_uri, prefix, options, dist, tracking, s3_endpoint, unlabeled, load_weights,
        allow_dropped_classes,
    )  # fmt: skip
    if local:
        launch_local(render(job_name(prefix), "local", image, args, dist, secrets), dist.timeout_min * 60)
    else:
        custom, core, namespace = kubernetes_clients()
        job = render(job_name(prefix), namespace, image, args, dist, secrets)
        TrainJobLauncher(custom, core, namespace, dist.poll_s).run(job, dist.timeout_min * 60, dist.keep_job)
    if not finished_at(prefix):
        raise SegcoreError("the TrainJob finished but left no bundle (model.json)", prefix)
    return collect_bundle(prefix, model_dir), prefix


def _shared_dataset(dataset: str, checkpoint_uri: str, content_hash: str) -> str:
    """The canonical dataset where every node can read it: ``<checkpoint_uri>/datasets/<hash>``."""
    from pathlib import Path

    from segcore import storage

    uri = f"{checkpoint_uri.rstrip('/')}/datasets/{content_hash[:32]}"
    if not storage.exists(f"{uri}/manifest.json"):
        log.info("uploading the dataset for the TrainJob's nodes to %s", uri)
        storage.sync_up(Path(dataset), storage.parse_s3_uri(uri))
    return uri
