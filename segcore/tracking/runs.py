"""Starting a run: connect, choose or create the run (a resumed one, an injected one, or a new run
nested under its parent or its model's training run), and the pipeline's parent run."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from segcore import __version__
from segcore.errors import SegcoreError
from segcore.tracking.settings import (
    DEFAULT_EXPERIMENT,
    ENV_SWITCH,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    Settings,
    read_run_file,
    redact,
    settings_from,
)
from segcore.tracking.tracker import Tracker

log = logging.getLogger("segcore.tracking")


def _check_reachable(uri: str) -> None:
    """For an HTTP tracking URI: any HTTP answer is fine (auth is MLflow's business); no answer is a
    SegcoreError naming the URI and the fixes."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    last = None
    for attempt in range(2):  # one retry rides out a blip
        if attempt:
            time.sleep(1.0)
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10)
            return
        except requests.RequestException as exc:
            last = exc
    reason = type(last).__name__
    raise SegcoreError(
        f"MLflow tracking server {redact(uri)} is unreachable ({reason}): start it, fix --tracking-uri / "
        f"MLFLOW_TRACKING_URI, or pass --no-tracking ({ENV_SWITCH}=off)"
    )


def check_tracking(args) -> None:
    """Fail fast (SegcoreError) when tracking is on and the server does not answer; call it before
    long downloads or work. ``tracking_run`` checks again."""
    settings = settings_from(args)
    if settings is not None:
        _check_reachable(settings.uri)


def _mlflow_defaults(uri: str) -> None:
    """MLflow's own HTTP retries last minutes by default (7 retries, backoff factor 2); segcore's queue
    does the long retrying, so each call gives up sooner. MLflow's prints to stdout (run URLs) and
    progress bars stay off: stdout is for a command's result. The user's environment wins."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def _ready_sqlite_store(uri: str) -> None:
    """Create (or upgrade) a SQLite store's tables with a lock file beside it held: MLflow creates
    them when a process first connects, and two processes doing that at once fail (alembic's
    "Online migration expected to match one row", or sqlalchemy's CircularDependencyError), as two
    trainings started together in a fresh folder did. Other stores are left to their servers."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.name or path.name == ":memory:":
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, MLflow's own behaviour
        return
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does for the store itself
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the model registry's


def _experiment(client, settings: Settings) -> tuple[str, str]:
    if settings.experiment_id:
        exp = client.get_experiment(settings.experiment_id)
        return exp.experiment_id, exp.name
    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}  # the UI opens such an experiment on its runs
            return client.create_experiment(settings.experiment_name, tags=tags), settings.experiment_name
        except MlflowException as exc:  # created meanwhile by a parallel step
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(settings.experiment_name)
    if exp.lifecycle_stage == "deleted":
        raise SegcoreError(
            f"MLflow experiment '{exp.name}' is deleted: restore it in the UI or choose another --experiment"
        )
    return exp.experiment_id, exp.name


def start_run(
    settings: Settings,
    step: str,
    run_name: str | None = None,
    *,
    bundle: str | Path | None = None,
    resume_from: str | Path | None = None,
    tags: Mapping[str, object] | None = None,
) -> Tracker:
    """Connect, choose or create the run (see the module doc) and return its tracker."""
    _check_reachable(settings.uri)
    _mlflow_defaults(settings.uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = settings.uri
    try:
        _ready_sqlite_store(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_tags = {
            "segcore.step": step,
            "segcore.version": __version__,
            "mlflow.source.name": f"segcore {step}",
            "mlflow.source.type": "LOCAL",
            "mlflow.user": _user(),
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        related = read_run_file(bundle) if bundle is not None else None
        if related and _same_uri(related.get("tracking_uri"), uri) and related.get("run_id"):
            run_tags["segcore.train_run_id"] = related["run_id"]
        previous = read_run_file(resume_from) if resume_from is not None else None

        if settings.injected_run_id:
            run = client.get_run(settings.injected_run_id)
            exp = client.get_experiment(run.info.experiment_id)
            own = {k: v for k, v in run_tags.items() if not k.startswith("mlflow.")}
            client.log_batch(run.info.run_id, tags=_tags(own))
            tracker = Tracker(client, run.info.run_id, exp.experiment_id, exp.name, uri, owns_run=False)
            tracker.resumed = True  # a run made by someone else may hold parameters already
            how = "the injected MLFLOW_RUN_ID"
        elif previous and _same_uri(previous.get("tracking_uri"), uri) and _run_exists(client, previous.get("run_id")):
            run = client.get_run(previous["run_id"])
            exp = client.get_experiment(run.info.experiment_id)
            client.update_run(run.info.run_id, status="RUNNING")
            tracker = Tracker(client, run.info.run_id, exp.experiment_id, exp.name, uri, owns_run=True)
            tracker.resumed = True
            how = "the resumed run"
        else:
            parent = settings.parent_run_id
            if parent is None and related and "segcore.train_run_id" in run_tags:
                parent = related["run_id"]
            if parent:
                parent_run = client.get_run(parent)
                exp_id = parent_run.info.experiment_id
                exp_name = client.get_experiment(exp_id).name
                if settings.experiment_name not in (None, DEFAULT_EXPERIMENT, exp_name):
                    log.warning("nested runs live in their parent's experiment '%s'", exp_name)
                run_tags["mlflow.parentRunId"] = parent
            else:
                exp_id, exp_name = _experiment(client, settings)
            name = settings.run_name or run_name or step
            run = client.create_run(exp_id, run_name=name, tags=run_tags)
            tracker = Tracker(client, run.info.run_id, exp_id, exp_name, uri, owns_run=True)
            how = f"a new run, nested under {parent}" if parent else "a new run"
    except MlflowException as exc:
        message = " ".join(exc.message.split())[:300]
        raise SegcoreError(f"MLflow at {redact(uri)}: {message}") from None
    log.info(
        "tracking to MLflow at %s, experiment '%s', run %s (%s)",
        redact(uri),
        tracker.experiment_name,
        tracker.run_id,
        how,
    )
    return tracker


def _same_uri(recorded: str | None, uri: str) -> bool:
    return bool(recorded) and recorded.rstrip("/") == redact(uri).rstrip("/")


def _run_exists(client, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def _tags(tags: Mapping[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextlib.contextmanager
def tracking_run(
    args,
    step: str,
    run_name: str | None = None,
    *,
    bundle: str | Path | None = None,
    resume_from: str | Path | None = None,
    tags: Mapping[str, object] | None = None,
    system_metrics: bool = False,
) -> Iterator[Tracker]:
    """The tracker of one step (a no-op one when tracking is off). The run ends FINISHED when the
    block succeeds, FAILED on an exception, KILLED on Ctrl-C, after the queue is flushed.

    ``bundle``: a model bundle this step works on (its tracking.json links the runs);
    ``resume_from``: an output folder whose tracking.json names a run to continue;
    ``system_metrics``: log MLflow's system metrics while the block runs (unless the settings
    turn them off)."""
    settings = settings_from(args)
    if settings is None:
        yield Tracker.disabled()
        return
    tracker = start_run(settings, step, run_name, bundle=bundle, resume_from=resume_from, tags=tags)
    monitor = _system_monitor(tracker, settings.uri) if system_metrics and settings.system_metrics else None
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        tracker.close(status)


def _system_monitor(tracker: Tracker, uri: str):
    """MLflow's system-metrics sampler on the run (every 10 s, or
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL; GPU metrics when nvidia-ml-py finds a GPU), started;
    None when it cannot start (the step goes on without it)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, resume_logging=tracker.resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - system metrics are a nicety, never a reason to fail
        log.warning("system metrics are not logged: %s", " ".join(str(exc).split())[:200])
        return None


# ---------------------------------------------------------------------------------- a pipeline's runs
# A pipeline run is one MLflow parent run (made by its first step, left RUNNING) with a nested run per
# step; the last step marks it finished, a failing step marks it failed.

PARENT_STEP = "pipeline"


def _parent_client(options):
    from mlflow.tracking import MlflowClient

    settings = settings_from(options)
    if settings is None or not settings.parent_run_id:
        return None, None
    return MlflowClient(tracking_uri=settings.uri), settings.parent_run_id


def start_parent_run(options, name: str, params: Mapping[str, object]) -> str:
    """Create the pipeline's parent run (left RUNNING); its id, or "" when tracking is off or
    Kubeflow injected a run of its own (``MLFLOW_RUN_ID``)."""
    settings = settings_from(options)
    if settings is None:
        return ""
    if settings.injected_run_id:
        log.info("MLFLOW_RUN_ID is set (Kubeflow's MLflow integration): no segcore parent run")
        return ""
    tracker = start_run(settings, PARENT_STEP, name, tags={"segcore.pipeline": "true"})
    tracker.owns_run = False  # stays RUNNING after this step
    tracker.log_params(params)
    tracker.close()
    log.info("MLflow parent run of this pipeline: %s", tracker.run_id)
    return tracker.run_id


def update_parent(options, *, metrics: Mapping[str, float] | None = None, status: str | None = None) -> None:
    """Log ``metrics`` on the parent run and/or set its status; never fails the step."""
    try:
        client, parent = _parent_client(options)
        if client is None:
            return
        if metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
            client.log_batch(parent, metrics=items)
        if status == "RUNNING":
            if client.get_run(parent).info.status != "RUNNING":
                client.update_run(parent, status="RUNNING")
        elif status:
            client.set_terminated(parent, status)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a step
        log.warning("could not update the MLflow parent run: %s", exc)


@contextlib.contextmanager
def parent_status(options) -> Iterator[None]:
    """A (re)started step marks the parent RUNNING again; a failure inside marks it FAILED."""
    update_parent(options, status="RUNNING")
    try:
        yield
    except BaseException:
        update_parent(options, status="FAILED")
        raise
