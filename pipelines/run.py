"""Running the pipeline: a dry run of the whole DAG on this machine through ``kfp.local`` (every
step a subprocess of this Python, no container), or a run on a Kubeflow cluster via ``kfp.Client``."""

import logging
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.defaults import DEMO_DATA, LOCAL_DEFAULTS
from pipelines.segmentation import PIPELINE_NAME, TASKS, Options, build, compile_pipeline
from segcore.errors import SegcoreError

log = logging.getLogger(__name__)

DEMO_FOLDER = "demo-data"


class PipelineFailed(SegcoreError):
    """A step of a local run failed (its own error is in the log above)."""

    exit_code = 1


@dataclass
class LocalRun:
    run_dir: Path
    outputs: dict
    seconds: float
    tracking_uri: str | None
    experiment: str | None
    tasks: dict[str, str] = field(default_factory=dict)  # task -> status


def demo_data(pipeline_root: Path) -> Path:
    """A small generated dataset (plain layout) under the pipeline root, made once and reused while
    DEMO_DATA stays the same (demo.json records what it was made with)."""
    import json
    import shutil

    from segcore.data.synthetic import generate

    target = pipeline_root / DEMO_FOLDER
    recipe = json.dumps(DEMO_DATA)
    if (target / "images").is_dir() and (target / "demo.json").is_file():
        if (target / "demo.json").read_text() == recipe:
            return target
    tmp = pipeline_root / f".{DEMO_FOLDER}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, "plain", **DEMO_DATA, seed=0)
    (tmp / "demo.json").write_text(recipe)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("generated demo data in %s", target)
    return target


def tracking_target(params: dict) -> tuple[str | None, str | None]:
    """The MLflow URI and experiment the steps will log to (None, None when tracking is off)."""
    from segcore.tracking import TrackingOptions, settings_from

    options = TrackingOptions(
        no_tracking=not params.get("tracking", True),
        tracking_uri=params.get("mlflow_tracking_uri") or None,
        experiment=params.get("mlflow_experiment") or None,
    )
    settings = settings_from(options)
    if settings is None:
        return None, None
    return settings.uri, settings.experiment_name


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db (steps and the printed command agree)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def run_local(params: dict, pipeline_root: str | Path, options: Options | None = None) -> LocalRun:
    """Run the DAG with ``params`` (pipeline parameters; LOCAL_DEFAULTS fill what is missing) and
    demo data when no ``train_data_uri`` is given. Raises SegcoreError when a step fails.

    ``options``: with train nodes x processes > 1 the train step runs the TrainJob it would create
    on a cluster here (its command once per node, ``PET_*`` set, torchrun on 127.0.0.1); its
    checkpoints go to ``<pipeline_root>/checkpoints`` unless ``checkpoint_uri`` is given."""
    from dataclasses import replace

    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    params = {**LOCAL_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    if not params.get("train_data_uri"):
        params["train_data_uri"] = str(demo_data(root))
    for name in ("train_data_uri", "val_data_uri", "train_ann_uri", "val_ann_uri"):
        value = params.get(name)
        if value and "://" not in value:
            if not Path(value).exists():
                raise SegcoreError("does not exist", value)
            params[name] = str(Path(value).resolve())  # the steps may run in another folder
    uri, experiment = tracking_target(params)
    if uri:
        params["mlflow_tracking_uri"] = _absolute_sqlite(uri)
        params["mlflow_experiment"] = experiment
    params.setdefault("mlflow_run_name", "segcore pipeline (local)")

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
    )
    options = replace(options or Options(), train_launcher="local")
    if options.distributed and not params.get("checkpoint_uri"):
        params["checkpoint_uri"] = str(root / "checkpoints")
    pipeline = build(options)
    before = {p.name for p in root.iterdir()}
    started = time.perf_counter()
    error = None
    with warnings.catch_warnings():
        # the image name has no "python" in it: kfp.local warns, but the steps run in this Python
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # requests, retries, display names: for the cluster, no-ops here
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            task = pipeline(**params)
        except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE ..."
            error = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
    seconds = time.perf_counter() - started
    new = sorted(p for p in root.iterdir() if p.name not in before and p.name.startswith(PIPELINE_NAME))
    run_dir = new[-1] if new else root
    tasks = {name: task_status(run_dir / name) for name in TASKS}
    if error:
        raise PipelineFailed(f"the local pipeline run failed after {seconds:.0f}s: {error} (task outputs: {run_dir})")
    return LocalRun(run_dir, dict(task.outputs), seconds, uri and params["mlflow_tracking_uri"], experiment, tasks)


def task_status(task_dir: Path) -> str:
    """SUCCEEDED when the task wrote its executor output, else NOT RUN / FAILED."""
    if (task_dir / "executor_output.json").is_file():
        return "SUCCEEDED"
    return "FAILED" if task_dir.exists() else "NOT RUN"


# ---------------------------------------------------------------------------------- cluster


def _check_host(host: str, timeout: float = 10.0) -> None:
    """Any HTTP answer from the KFP API (even 401/403/302 of an auth proxy) is fine; none is a
    one-line SegcoreError."""
    import requests

    if not host.startswith(("http://", "https://")):
        raise SegcoreError(f"--host must be an http(s):// URL of the Kubeflow Pipelines API, got '{host}'")
    try:
        requests.get(f"{host.rstrip('/')}/apis/v2beta1/healthz", timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise SegcoreError(
            f"Kubeflow Pipelines at {host} is unreachable ({type(exc).__name__}): check --host "
            "(e.g. kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80 and --host http://localhost:8080)"
        ) from None


def submit(
    host: str,
    params: dict,
    options: Options = Options(),  # noqa: B008 - a frozen dataclass
    *,
    namespace: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    enable_caching: bool | None = None,
    existing_token: str | None = None,
) -> dict:
    """Compile the pipeline and start a run of it on the cluster at ``host``; returns the run's id,
    name and URL. Only the parameters given are sent (the others keep the pipeline's defaults)."""
    import kfp

    _check_host(host)
    params = {k: v for k, v in params.items() if v is not None}
    if not params.get("train_data_uri"):
        raise SegcoreError("--train-data-root is required on a cluster (an s3:// URI the pods can read)")
    for name in ("train_data_uri", "val_data_uri", "train_ann_uri", "val_ann_uri"):
        value = params.get(name)
        if value and "://" not in value:
            log.warning("%s=%s is not a URI: the pipeline's pods must see that path", name, value)
    run_name = run_name or f"{PIPELINE_NAME} {time.strftime('%Y-%m-%d %H-%M-%S')}"
    with tempfile.TemporaryDirectory(prefix="segcore-pipeline-") as tmp:
        package = compile_pipeline(Path(tmp) / f"{PIPELINE_NAME}.yaml", options)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # kfp.Client's "works with KFP v2 only"
                client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token)
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=params,
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
                enable_caching=enable_caching,
            )
        except Exception as exc:  # noqa: BLE001 - the API client's errors become one line
            raise SegcoreError(f"Kubeflow Pipelines at {host} refused the run: {_api_error(exc)}") from None
    run_id = result.run_id
    return {
        "run_id": run_id,
        "run_name": run_name,
        "url": f"{host.rstrip('/')}/#/runs/details/{run_id}",
        "namespace": namespace,
        "experiment": experiment or "Default",
    }


def _api_error(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    body = getattr(exc, "body", None)
    if status:
        text = f"HTTP {status} {reason or ''}".strip()
        if body:
            text += f": {' '.join(str(body).split())[:300]}"
        return text
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
