"""Distributed training on the cluster: the Kubeflow Trainer v2.3 TrainJob the train step renders
(validated strictly against the vendored CRD schema), the launcher against a fake Kubernetes API
server on 127.0.0.1 (complete, failed, never finishing, a retry that finds its job), a local
"two-node" run of exactly the job's command, and the compiled distributed pipeline."""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from test_pipeline import FAKE_SECRETS, IMAGE, structure

from components.common import MLFLOW_SECRET_KEYS, S3_SECRET_KEYS
from components.trainjob import Distribution, TrainJobLauncher, job_name, kubernetes_clients, render, train_args
from segcore.errors import SegcoreError
from segcore.steps import TrainOptions
from segcore.tracking import TrackingOptions

REFERENCE = Path(__file__).parent / "reference" / "kubeflow-trainer-v2.3.0"
GOLDEN = Path(__file__).parent / "golden" / "pipeline_structure_distributed.json"
SECRETS = {"segcore-s3": S3_SECRET_KEYS, "segcore-mlflow": MLFLOW_SECRET_KEYS}
PREFIX = "s3://bucket/checkpoints/train-0123456789abcdef"


def _job(dist: Distribution = Distribution(nodes=2, procs_per_node=4, cpu="8", memory="32Gi",  # noqa: B008
                                           gpu_type="nvidia.com/gpu", gpu_count=4)) -> dict:  # fmt: skip
    tracking = TrackingOptions(tracking_uri="http://mlflow:5000", experiment="camvid", parent_run_id="abc123")
    options = TrainOptions(epochs=20, input_size=(512, 512), num_workers=2)
    args = train_args("Lite-HRNet-18", "s3://bucket/checkpoints/datasets/feed", PREFIX, options, dist, tracking,
                      "http://minio:9000")  # fmt: skip
    return render(job_name(PREFIX), "team-a", IMAGE, args, dist, SECRETS)


# ------------------------------------------------------------------------------------ the schema


def _strict(schema: dict) -> dict:
    """The CRD's OpenAPI schema as JSON Schema that refuses unknown fields (what the API server's
    strict field validation does) and knows Kubernetes' int-or-string."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.pop("x-kubernetes-int-or-string", False):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_schema():
    crd = yaml.safe_load((REFERENCE / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def test_the_rendered_trainjob_validates_strictly_against_the_v2_3_crd(crd_schema):
    import jsonschema

    job = _job()
    jsonschema.validate(job, crd_schema)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    name = job["metadata"]["name"]  # the CRD's CEL rules, which only the API server evaluates
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    runtime = yaml.safe_load((REFERENCE / "torch_distributed.yaml").read_text())
    assert job["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"], "kind": runtime["kind"],
                                         "apiGroup": "trainer.kubeflow.org"}  # fmt: skip
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 4}
    command = trainer["command"] + trainer["args"]
    assert command[:6] == ["python3", "-m", "torch.distributed.run", "-m", "segcore.cli", "train"]
    assert command[command.index("--batch-size") + 1] == "1"  # the recipe's global batch 8 over 2 x 4
    assert {"--resume", "--no-tracking"} & set(command) == {"--resume"}
    assert command[command.index("--device") + 1] == "cuda"

    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["podTemplateOverrides"] = []  # v2.1's field: not in v2.3's schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)


def test_credentials_are_secret_references_never_values(monkeypatch):
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    job = _job()
    text = json.dumps(job)
    assert not any(value in text for value in FAKE_SECRETS.values())
    env = job["spec"]["trainer"]["env"]
    assert all(set(e) == {"name", "valueFrom"} and e["valueFrom"]["secretKeyRef"]["optional"] for e in env)
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env} == {"segcore-s3", "segcore-mlflow"}
    assert {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= {e["name"] for e in env}


def test_a_batch_that_cannot_be_shared_out_is_refused():
    with pytest.raises(SegcoreError, match="multiple of the process count"):
        train_args("Lite-HRNet-18", "s3://b/d", PREFIX, TrainOptions(batch_size=6), Distribution(2, 4), None, "")


# ------------------------------------------------------------------------------ fake API server


class FakeKubernetes(http.server.ThreadingHTTPServer):
    """Just enough of the Kubernetes API: TrainJobs (create/get/delete) and node 0's pod and log.
    ``statuses`` is what successive GETs of a job return (the last one repeats)."""

    def __init__(self, statuses: list[dict | None], log_lines: list[str], has_api: bool = True, schema_error=""):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses, self.log_lines, self.has_api = statuses, log_lines, has_api
        self.schema_error = schema_error  # what a strict create on another Trainer version answers
        self.jobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.gets = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeKubernetes
    JOBS = re.compile(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
    PODS = re.compile(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?$")

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})  # fmt: skip

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append((method, url.path, query))
        if m := self.JOBS.match(url.path):
            if not self.server.has_api:
                return self._status(404, "NotFound", "the server could not find the requested resource")
            return self._jobs(method, m.group(2))
        if (m := self.PODS.match(url.path)) and method == "GET":
            return self._pods(m.group(2), query)
        self._status(404, "NotFound", url.path)

    def _jobs(self, method: str, name: str | None) -> None:
        jobs = self.server.jobs
        if method == "POST":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.server.schema_error:
                return self._status(400, "BadRequest", self.server.schema_error)
            if body["metadata"]["name"] in jobs:
                return self._status(409, "AlreadyExists", f'trainjobs "{body["metadata"]["name"]}" already exists')
            jobs[body["metadata"]["name"]] = body
            return self._send(201, body)
        if name not in jobs:
            return self._status(404, "NotFound", f'trainjobs "{name}" not found')
        if method == "DELETE":
            del jobs[name]
            return self._send(200, {"kind": "Status", "status": "Success"})
        statuses = self.server.statuses
        status = statuses[min(self.server.gets, len(statuses) - 1)]
        self.server.gets += 1
        self._send(200, {**jobs[name], **({"status": status} if status else {})})

    def _pods(self, pod: str | None, query: dict) -> None:
        if pod is None:
            name = query["labelSelector"].split("=", 1)[1].split("-node-0", 1)[0]
            items = [{"metadata": {"name": f"{name}-node-0-0-abcde", "namespace": "team-a"},
                      "status": {"phase": "Running"}}]  # fmt: skip
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        self._send(200, "".join(line + "\n" for line in self.server.log_lines), "text/plain")

    def do_GET(self):  # noqa: N802
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def do_DELETE(self):  # noqa: N802
        self._route("DELETE")


def _condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message,
                            "lastTransitionTime": "2026-12-02T10:00:00Z"}]}  # fmt: skip


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Start a fake API server and point a kubeconfig (namespace team-a) at it."""
    servers = []

    def start(statuses, log_lines=("INFO segcore.training: epoch 1: loss 1.2",), has_api=True, schema_error=""):
        server = FakeKubernetes(list(statuses), list(log_lines), has_api, schema_error)
        servers.append(server)
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                  "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
                  "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                            "namespace": "team-a"}}]}  # fmt: skip
        path = tmp_path / f"kubeconfig-{len(servers)}"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        custom, core, namespace = kubernetes_clients()
        assert namespace == "team-a"
        return server, TrainJobLauncher(custom, core, namespace, poll_s=0.05)

    yield start
    for server in servers:
        server.shutdown()


def _job_in(namespace: str = "team-a") -> dict:
    job = _job()
    job["metadata"]["namespace"] = namespace
    return job


def test_a_job_going_created_running_complete(cluster, capsys):
    server, launcher = cluster([None, _condition("Created", "JobsCreationSucceeded"), None, _condition("Complete")])
    job = _job_in()
    launcher.run(job, timeout_s=30)
    creates = [(path, q) for method, path, q in server.requests if method == "POST"]
    assert len(creates) == 1 and creates[0][1].get("fieldValidation") == "Strict"
    assert job["metadata"]["name"] not in server.jobs, "a finished job is deleted"
    assert "[node 0] INFO segcore.training: epoch 1: loss 1.2" in capsys.readouterr().err
    selectors = {q.get("labelSelector") for m, p, q in server.requests if p.endswith("/pods")}
    assert selectors == {f"batch.kubernetes.io/job-name={job['metadata']['name']}-node-0,"
                         "batch.kubernetes.io/job-completion-index=0"}  # fmt: skip


def test_a_failed_job_fails_the_step_with_its_reason_and_last_log_lines(cluster, caplog):
    lines = ["INFO epoch 1", "RuntimeError: CUDA out of memory"]
    server, launcher = cluster([None, _condition("Failed", "TrainingFailed", "node-0 exited with code 1")], lines)
    with pytest.raises(SegcoreError, match="failed: TrainingFailed: node-0 exited with code 1"):
        launcher.run(_job_in(), timeout_s=30)
    assert "CUDA out of memory" in caplog.text
    assert not server.jobs


def test_a_job_that_never_finishes_times_out_and_says_so(cluster):
    server, launcher = cluster([None])
    with pytest.raises(SegcoreError, match="did not finish within .* min .*a retry resumes from the checkpoints"):
        launcher.run(_job_in(), timeout_s=0.3)
    assert not server.jobs


def test_a_retry_attaches_to_its_running_job_instead_of_starting_another(cluster):
    server, launcher = cluster([None, None, _condition("Complete")])
    job = _job_in()
    first = copy.deepcopy(job)
    first["metadata"]["labels"]["attempt"] = "1"
    server.jobs[job["metadata"]["name"]] = first  # the first attempt's job, running
    launcher.run(job, timeout_s=30, keep=True)
    creates = [p for m, p, q in server.requests if m == "POST"]
    assert len(creates) == 1  # answered 409
    assert server.jobs[job["metadata"]["name"]]["metadata"]["labels"]["attempt"] == "1", "not replaced"
    assert not [p for m, p, q in server.requests if m == "DELETE"]


def test_a_retry_restarts_its_failed_job_which_resumes_from_the_checkpoints(cluster):
    server, launcher = cluster([_condition("Failed", "BackoffLimitExceeded"), None, _condition("Complete")])
    job = _job_in()
    server.jobs[job["metadata"]["name"]] = copy.deepcopy(job)
    launcher.run(job, timeout_s=30)
    methods = [m for m, p, q in server.requests if "/trainjobs" in p]
    assert methods[:4] == ["POST", "GET", "DELETE", "POST"]
    assert "--resume" in job["spec"]["trainer"]["args"]


def test_a_cluster_without_trainer_is_a_clear_error_and_creates_nothing(cluster):
    server, launcher = cluster([None], has_api=False)
    with pytest.raises(
        SegcoreError, match="no trainer.kubeflow.org/v1alpha1 TrainJob API; install Kubeflow Trainer v2.3"
    ):
        launcher.run(_job_in(), timeout_s=5)
    assert not server.jobs


def test_a_trainer_of_another_version_rejects_the_job_whole_with_a_clear_error(cluster):
    server, launcher = cluster([None], schema_error='TrainJob in version "v1alpha1" cannot be handled as a TrainJob: '
                               'strict decoding error: unknown field "spec.trainer.numProcPerNode"')  # fmt: skip
    with pytest.raises(SegcoreError, match="rendered for Kubeflow Trainer v2.3|Trainer v2.3, is that"):
        launcher.run(_job_in(), timeout_s=5)
    assert not server.jobs


def test_a_distributed_step_needs_a_checkpoint_uri(tmp_path, capsys):
    from components.trainjob import train_distributed
    from segcore.cli import main

    with pytest.raises(SegcoreError, match="needs checkpoint_uri"):
        train_distributed("Lite-HRNet-s-mod2", str(tmp_path), str(tmp_path / "m"), TrainOptions(), "", {},
                          Distribution(nodes=2), image=IMAGE, secrets=SECRETS)  # fmt: skip
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--train-data-root", "s3://b/d",
                 "--train-nodes", "2"]) == 2  # fmt: skip
    assert "needs --checkpoint-uri" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a local two-node run


def test_a_local_two_node_run_of_the_jobs_command_trains_a_bundle_the_validate_step_accepts(tmp_path):
    from kfp import dsl

    from components.trainjob import train_distributed
    from components.validate import validate_op
    from segcore.data.convert import convert
    from segcore.data.synthetic import generate

    generate(tmp_path / "raw", "plain", num_train=8, num_val=3, size=(32, 32), seed=6)
    convert(tmp_path / "raw", tmp_path / "dataset")
    options = TrainOptions(epochs=2, batch_size=4, input_size=(32, 32), num_workers=0)
    model_dir = tmp_path / "model"
    env = {"SEGCORE_TRACKING": "off", "CI": "true", "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        meta, prefix = train_distributed(
            "Lite-HRNet-s-mod2", str(tmp_path / "dataset"), str(model_dir), options, str(tmp_path / "checkpoints"),
            {"epochs": 2}, Distribution(nodes=2, procs_per_node=1), image=IMAGE, secrets=SECRETS, local=True,
        )  # fmt: skip
    assert meta["train_processes"] == 2 and meta["epochs_run"] == 2
    assert meta["training_config"]["batch_size"] == 2  # the global batch 4 over 2 nodes
    assert Path(prefix, "model.json").is_file() and Path(prefix).parent == tmp_path / "checkpoints"

    def artifact(cls, path):
        return cls(name=Path(path).name, uri=str(path), metadata={})

    out = tmp_path / "validate"
    result = validate_op.python_func(
        model=artifact(dsl.Model, model_dir), dataset=artifact(dsl.Dataset, tmp_path / "dataset"),
        metrics=artifact(dsl.Metrics, out / "metrics"),
        confusion_matrix=artifact(dsl.ClassificationMetrics, out / "cm"),
        report=artifact(dsl.HTML, out / "report"), label="fp32", num_overlays=1, tracking=False,
    )  # fmt: skip
    assert result.mean_dice == pytest.approx(meta["best_val_mdice"], abs=1e-6)


# ------------------------------------------------------------------------------ compiled pipeline


def test_compiled_distributed_pipeline_golden_structure_and_no_credentials(tmp_path, monkeypatch):
    """After an intended change: SEGCORE_UPDATE_GOLDEN=1 pytest -k golden."""
    from segcore.cli import main

    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--output", str(path), "--image", IMAGE, "--train-nodes", "2",
                 "--train-procs-per-node", "4", "--train-gpu", "nvidia.com/gpu", "--train-gpu-count", "4",
                 "--train-node-cpu", "16", "--train-node-memory", "64Gi"]) == 0  # fmt: skip
    text = path.read_text()
    assert not any(value in text for value in FAKE_SECRETS.values())
    spec, platform = yaml.safe_load_all(text)
    train = spec["root"]["dag"]["tasks"]["train"]
    constants = {k: v["runtimeValue"]["constant"] for k, v in train["inputs"]["parameters"].items()
                 if "runtimeValue" in v}  # fmt: skip
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    got = {
        **structure(spec),
        "train_constants": constants,
        "train_resources": container.get("resources", {}),
        "train_secrets": sorted(
            s["secretName"]
            for s in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["secretAsEnv"]
        ),
    }
    if os.environ.get("SEGCORE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(GOLDEN.read_text())
    assert constants["train_nodes"] == 2 and constants["train_procs_per_node"] == 4
    assert constants["train_gpu_type"] == "nvidia.com/gpu" and constants["image"] == IMAGE
    assert "accelerator" not in container.get("resources", {}), "the GPUs go to the TrainJob's nodes"


def test_every_node_trains_semi_supervised_on_the_unlabelled_images():
    options = TrainOptions(num_workers=2)
    args = train_args("Lite-HRNet-18", "s3://b/d", PREFIX, options, Distribution(2, 4), None, "", "s3://b/photos")
    assert args[args.index("--unlabeled-data-root") + 1] == "s3://b/photos"
    assert "--unlabeled-data-root" not in train_args("Lite-HRNet-18", "s3://b/d", PREFIX, options, Distribution(2, 4),
                                                     None, "")  # fmt: skip


def test_every_node_starts_from_the_same_bundle():
    options = TrainOptions(num_workers=2)
    args = train_args("Lite-HRNet-18", "s3://b/d", PREFIX, options, Distribution(2, 4), None, "", "",
                      "s3://b/old-bundle", True)  # fmt: skip
    assert args[args.index("--load-weights") + 1] == "s3://b/old-bundle" and "--allow-dropped-classes" in args


def test_every_node_gets_the_patiences_that_were_given():
    given = TrainOptions(num_workers=2, early_stop_patience=0, plateau_patience=40)
    args = train_args("Lite-HRNet-18", "s3://b/d", PREFIX, given, Distribution(2, 4), None, "")
    assert args[args.index("--early-stop-patience") + 1] == "0" and args[args.index("--plateau-patience") + 1] == "40"
    default = train_args("Lite-HRNet-18", "s3://b/d", PREFIX, TrainOptions(num_workers=2), Distribution(2, 4), None, "")
    assert "--early-stop-patience" not in default and "--plateau-patience" not in default
