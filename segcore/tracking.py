"""MLflow tracking for segcore commands (kept at the edge: segcore's core never imports mlflow).

One small API for every step (train here; eval, export, optimize and the Kubeflow components
call the same)::

    add_tracking_arguments(parser)                 # --tracking-uri --experiment --run-name
                                                   # --parent-run-id --no-tracking
    with tracking_run(args, "eval", run_name="eval camvid", bundle=model_dir) as tracker:
        tracker.log_params({...})
        tracker.log_metrics({"test_dice": 0.61, "latency_ms": 12.5}, step=None)
        tracker.log_artifacts(folder, "ir")        # also log_artifact, log_figure, log_image, log_dict
        tracker.log_model_bundle(bundle_dir)       # pyfunc "model" + the bundle files
        tracker.register_model(model_name(tracker.experiment_name, "Lite-HRNet-18"), score=0.61)

Where runs go:
- tracking URI: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  working directory; experiment: ``--experiment``, else ``MLFLOW_EXPERIMENT_NAME`` /
  ``MLFLOW_EXPERIMENT_ID``, else "segcore".
- the run: ``MLFLOW_RUN_ID`` (as Kubeflow's MLflow integration injects it) is used as is; else the
  run recorded in ``--output``/tracking.json when a training resumes; else a new run, nested under
  ``--parent-run-id`` / ``SEGCORE_PARENT_RUN_ID`` (one parent per pipeline run, a child per step,
  tag ``mlflow.parentRunId``), or, for a step given a trained bundle (``bundle=``), under that
  bundle's training run.
- off with ``--no-tracking`` or ``SEGCORE_TRACKING=off``: ``tracking_run`` yields a tracker whose
  methods do nothing.

Failures: an unreachable server at the start is a SegcoreError before any work. Later, every call
goes through a queue that a background thread sends in order: when the server fails, it warns
once, retries with exponential backoff (up to ``SEGCORE_TRACKING_RETRY_MAX`` s, default 10) and
keeps the queue, so what is logged during an outage arrives when the server is back; the work
never waits for MLflow and never fails because of it. At the end the queue is flushed for up to
``SEGCORE_TRACKING_FLUSH_TIMEOUT`` seconds (default 300), then what is left is reported and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from segcore import __version__
from segcore.errors import SegcoreError

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "segcore"
ENV_SWITCH = "SEGCORE_TRACKING"
ENV_PARENT = "SEGCORE_PARENT_RUN_ID"
RUN_FILE = "tracking.json"  # written into an output folder: which run it was logged to
BEST_ALIAS = "best"
MODEL_ARTIFACT = "model"
BUNDLE_ARTIFACT = "bundle"
BUNDLE_FILES = ("model.json", "best.pt", "metrics.jsonl")
_OFF = {"0", "off", "false", "no", "disabled"}
# MLflow error codes worth retrying; any other MlflowException is the server rejecting the request.
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "IO_ERROR",
    "UNKNOWN",
    "ABORTED",
}
_MAX_ATTEMPTS_WHEN_UP = 5
_MAX_BATCH_METRICS = 1000
_MAX_BATCH_PARAMS = 100
_MAX_PARAM_LENGTH = 6000


# ---------------------------------------------------------------------------------- settings


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tracking (MLflow)")
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        help=f"MLflow tracking server or store (default: MLFLOW_TRACKING_URI, else {DEFAULT_URI})",
    )
    g.add_argument(
        "--experiment",
        metavar="NAME",
        help=f"MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID, else '{DEFAULT_EXPERIMENT}')",
    )
    g.add_argument("--run-name", metavar="NAME", help="MLflow run name (default: the step and template)")
    g.add_argument(
        "--parent-run-id",
        metavar="ID",
        help=f"log as a nested run of this MLflow run, e.g. the pipeline run's (default: {ENV_PARENT})",
    )
    g.add_argument("--no-tracking", action="store_true", help=f"log nothing to MLflow (also: {ENV_SWITCH}=off)")


def redact(uri: str) -> str:
    """A URI without user:password@ (for messages, params and tracking.json)."""
    return re.sub(r"(//)[^/@]*@", r"\1", uri)


@dataclass(frozen=True)
class Settings:
    uri: str
    experiment_name: str | None
    experiment_id: str | None
    injected_run_id: str | None
    parent_run_id: str | None
    run_name: str | None


def settings_from(args: argparse.Namespace | None) -> Settings | None:
    """The tracking settings of a command's arguments and the environment; None when tracking is off."""
    get = (lambda name: getattr(args, name, None)) if args is not None else (lambda name: None)
    if get("no_tracking") or os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return None
    name = get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
    exp_id = None if name else (os.environ.get("MLFLOW_EXPERIMENT_ID") or None)
    return Settings(
        uri=get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI,
        experiment_name=name or (None if exp_id else DEFAULT_EXPERIMENT),
        experiment_id=exp_id,
        injected_run_id=os.environ.get("MLFLOW_RUN_ID") or None,
        parent_run_id=get("parent_run_id") or os.environ.get(ENV_PARENT) or None,
        run_name=get("run_name"),
    )


def model_name(experiment_name: str | None, template_name: str) -> str:
    """The registered model name of a template in an experiment: segcore-<experiment>-<template>."""
    raw = f"segcore-{experiment_name or DEFAULT_EXPERIMENT}-{template_name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")


def metric_key(name: str) -> str:
    """A metric/param key MLflow accepts (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]+", "_", name)


def read_run_file(folder: str | Path) -> dict | None:
    path = Path(folder) / RUN_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable, ignored", path)
        return None


# ---------------------------------------------------------------------------------- the tracker


def _never_raises(method):
    """Tracking must never stop the work: a failing call becomes a warning."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("tracking: %s failed, skipped: %s", method.__name__, " ".join(str(exc).split())[:300])
            return None

    return wrapper


class _Op:
    __slots__ = ("what", "fn")

    def __init__(self, what: str, fn: Callable[[], object]):
        self.what, self.fn = what, fn


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server or the network failing. Anything else (the server rejecting a
    request, a bug) is reported and skipped, so one bad call cannot block the queue."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, OSError):  # connection errors, requests' and urllib3's exceptions
        return True
    try:
        from botocore.exceptions import BotoCoreError  # artifacts sent straight to S3
    except ImportError:
        return False
    return isinstance(exc, BotoCoreError)


class Tracker:
    """Logs to one MLflow run through an ordered queue sent by a background thread.

    Every method returns at once; nothing it does raises because of MLflow. A tracker made with
    ``Tracker.disabled()`` (tracking off) accepts the same calls and does nothing."""

    def __init__(self, client=None, run_id=None, experiment_id=None, experiment_name=None, uri=None, owns_run=False):
        self.client = client
        self.run_id: str | None = run_id
        self.experiment_id: str | None = experiment_id
        self.experiment_name: str | None = experiment_name
        self.tracking_uri: str | None = redact(uri) if uri else None
        self.owns_run = owns_run
        self.resumed = False  # continuing an earlier run: parameters it has are not sent again
        self.registered: dict | None = None  # set once a register_model call has gone through
        self.dropped: list[str] = []
        self._queue: deque[_Op] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._wake = threading.Event()  # set by close(): stop waiting out a backoff
        self._outage_since: float | None = None
        self._spool: Path | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        if client is not None:
            self._spool = Path(tempfile.mkdtemp(prefix="segcore-mlflow-"))
            self._thread = threading.Thread(target=self._work, name="segcore-mlflow", daemon=True)
            self._thread.start()

    @classmethod
    def disabled(cls) -> Tracker:
        return cls()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def run_url(self) -> str | None:
        if not self.enabled or not self.tracking_uri or not self.tracking_uri.startswith("http"):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    # ------------------------------------------------------------------ queue

    def _submit(self, what: str, fn: Callable[[], object]) -> None:
        if not self.enabled:
            return
        with self._cv:
            self._queue.append(_Op(what, fn))
            self._cv.notify_all()

    def _work(self) -> None:
        retry_max = float(os.environ.get("SEGCORE_TRACKING_RETRY_MAX", "10"))
        delay = 0.5
        current, attempts = None, 0
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                op = self._queue[0]
                self._busy = True
            if op is not current:
                current, attempts = op, 0
            attempts += 1
            try:
                op.fn()
            except Exception as exc:  # noqa: BLE001 - tracking must never stop the work
                reason = " ".join(str(exc).split())[:300]
                # An outage is retried for as long as it lasts; a call that keeps failing while the
                # server answers (a server-side fault) is given up after a few tries.
                if _is_transient(exc) and (attempts < _MAX_ATTEMPTS_WHEN_UP or not self._server_answers()):
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning(
                            "MLflow at %s failed (%s): the work goes on; %d tracking calls queued, retrying "
                            "with backoff",
                            self.tracking_uri,
                            reason,
                            len(self._queue),
                        )
                    else:
                        log.debug("MLflow still failing (%s); retry in %.1fs", reason, delay)
                    with self._cv:
                        self._busy = False
                        self._cv.notify_all()
                    self._wake.wait(timeout=delay)
                    delay = min(delay * 2, retry_max)
                    continue
                log.warning("MLflow at %s did not take %s, skipped: %s", self.tracking_uri, op.what, reason)
                self.dropped.append(op.what)
            else:
                if self._outage_since is not None:
                    log.warning(
                        "MLflow at %s is back after %.0fs: sending the queued tracking calls",
                        self.tracking_uri,
                        time.monotonic() - self._outage_since,
                    )
                    self._outage_since = None
                delay = 0.5
            with self._cv:
                if self._queue and self._queue[0] is op:
                    self._queue.popleft()
                self._busy = False
                self._cv.notify_all()

    def _server_answers(self) -> bool:
        if not self.tracking_uri or not self.tracking_uri.startswith(("http://", "https://")):
            return True  # a local store: no outage to wait for
        import requests

        try:
            requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5)
            return True
        except requests.RequestException:
            return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has been sent (or ``timeout`` s); True when the queue is empty."""
        if not self.enabled:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left if left is not None else 1.0)
        return True

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Mark the run ``status`` (runs this tracker created or resumed), flush, stop the thread."""
        if not self.enabled:
            return
        if self.owns_run:
            self._submit(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status))
        timeout = float(os.environ.get("SEGCORE_TRACKING_FLUSH_TIMEOUT", "300")) if timeout is None else timeout
        done = self.flush(timeout)
        with self._cv:
            left = [op.what for op in self._queue]
            self._stop = True
            self._cv.notify_all()
        self._wake.set()
        if not done:
            log.warning(
                "MLflow at %s did not take %d tracking calls within %.0fs; dropped: %s",
                self.tracking_uri,
                len(left),
                timeout,
                ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""),
            )
            self.dropped.extend(left)  # the spool stays: an upload may still be reading it
        elif self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        if self.run_url:
            log.info("MLflow run: %s", self.run_url)

    # ------------------------------------------------------------------ logging

    def _spool_path(self, name: str) -> Path:
        self._counter += 1
        path = self._spool / f"{self._counter:05d}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @_never_raises
    def set_tags(self, tags: Mapping[str, object]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:_MAX_PARAM_LENGTH]) for k, v in tags.items()]
        self._submit("tags", lambda: self.client.log_batch(self.run_id, tags=items))

    @_never_raises
    def log_params(self, params: Mapping[str, object]) -> None:
        """Parameters (values become strings; None values are left out)."""
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(metric_key(str(k)), str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), _MAX_BATCH_PARAMS):
            chunk = items[i : i + _MAX_BATCH_PARAMS]
            self._submit(f"{len(chunk)} params", lambda chunk=chunk: self._send_params(chunk))

    def _send_params(self, params: list) -> None:
        if self.resumed:  # MLflow refuses to change a parameter: send only the new ones
            existing = self.client.get_run(self.run_id).data.params
            changed = sorted(p.key for p in params if p.key in existing and existing[p.key] != p.value)
            if changed:
                log.warning("resumed run keeps its earlier values of %s", ", ".join(changed))
            params = [p for p in params if p.key not in existing]
        if params:
            self.client.log_batch(self.run_id, params=params)

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Numbers at ``step`` (an epoch) with the time of this call; None and NaN are left out."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(metric_key(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        for i in range(0, len(items), _MAX_BATCH_METRICS):
            chunk = items[i : i + _MAX_BATCH_METRICS]
            what = f"{len(chunk)} metrics" + (f" of step {step}" if step is not None else "")
            self._submit(what, lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    @_never_raises
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, copied now (the caller may delete it) and uploaded in order."""
        if not self.enabled:
            return
        path = Path(path)
        copy = self._spool_path(path.name)
        shutil.copy2(path, copy)
        self._submit(
            f"artifact {artifact_path or ''}/{path.name}",
            lambda: self.client.log_artifact(self.run_id, str(copy), artifact_path),
        )

    @_never_raises
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None, files=None) -> None:
        """A folder (or only the ``files`` named, relative to it), copied now and uploaded in order."""
        if not self.enabled:
            return
        local_dir = Path(local_dir)
        copy = self._spool_path(local_dir.name or "dir")
        if files is None:
            shutil.copytree(local_dir, copy)
        else:
            copy.mkdir(parents=True)
            for name in files:
                if (local_dir / name).is_file():
                    (copy / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(local_dir / name, copy / name)
        self._submit(
            f"artifacts {artifact_path or local_dir.name}/",
            lambda: self.client.log_artifacts(self.run_id, str(copy), artifact_path),
        )

    def _send_file(self, path: Path, artifact_file: str) -> None:
        folder = artifact_file.rpartition("/")[0] or None
        self._submit(f"file {artifact_file}", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    @_never_raises
    def log_figure(self, figure, artifact_file: str, close: bool = True) -> None:
        """A matplotlib figure as PNG (``artifact_file`` like "plots/dice.png")."""
        if not self.enabled:
            return
        path = self._spool_path(artifact_file.rpartition("/")[2])
        figure.savefig(path, dpi=100)
        if close:
            import matplotlib.pyplot as plt

            plt.close(figure)
        self._send_file(path, artifact_file)

    @_never_raises
    def log_image(self, image, artifact_file: str) -> None:
        """An RGB or grey uint8 array as PNG."""
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        path = self._spool_path(artifact_file.rpartition("/")[2])
        Image.fromarray(np.asarray(image)).save(path)
        self._send_file(path, artifact_file)

    @_never_raises
    def log_dict(self, data, artifact_file: str) -> None:
        """JSON-serialisable data as a .json artifact."""
        if not self.enabled:
            return
        path = self._spool_path(artifact_file.rpartition("/")[2])
        path.write_text(json.dumps(data, indent=1, default=str))
        self._send_file(path, artifact_file)

    @_never_raises
    def log_model_bundle(
        self, bundle: str | Path, artifact_path: str = MODEL_ARTIFACT, input_example=None, bundle_path=BUNDLE_ARTIFACT
    ) -> bool:
        """Log a segcore model bundle twice over: its files under ``bundle/`` (what ``segcore eval``
        and ``predict`` take) and an MLflow pyfunc under ``model/`` (``mlflow.pyfunc.load_model``,
        ``mlflow models serve``; see ``segcore.mlflow_model``). ``input_example``: one uint8 RGB
        image (H x W x 3). False (with a warning) when the model could not be packaged."""
        if not self.enabled:
            return False
        bundle = Path(bundle)
        self.log_artifacts(bundle, bundle_path, files=BUNDLE_FILES)
        try:
            folder = self._save_pyfunc(bundle, input_example)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the work
            log.warning("could not package %s as an MLflow model, logged the bundle files only: %s", bundle, exc)
            return False
        self._submit(
            f"model {artifact_path}/", lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        )
        return True

    def _save_pyfunc(self, bundle: Path, input_example) -> Path:
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        meta = json.loads((bundle / "model.json").read_text())
        files = self._spool_path("bundle")
        files.mkdir()
        for name in ("model.json", meta.get("weights", "best.pt")):
            shutil.copy2(bundle / name, files / name)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        )
        example = None if input_example is None else np.asarray(input_example, dtype=np.uint8)[None]
        folder = self._spool_path("model")
        mlflow.pyfunc.save_model(
            str(folder),
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={"bundle": str(files)},
            signature=signature,
            input_example=example,
            pip_requirements=[f"segcore=={__version__}", f"torch=={torch.__version__.split('+')[0]}", "mlflow"],
            metadata={
                "segcore_version": __version__,
                "template": meta.get("template"),
                "labels": meta.get("labels"),
                "input_size": meta.get("input_size"),
            },
        )
        return folder

    @_never_raises
    def register_model(
        self,
        name: str,
        *,
        score: float,
        score_name: str = "val_dice",
        artifact_path: str = MODEL_ARTIFACT,
        alias: str = BEST_ALIAS,
        tags: Mapping[str, object] | None = None,
    ) -> None:
        """Register ``artifact_path`` of this run as a new version of ``name``; point ``alias`` at it
        when ``score`` beats the current holder's (version tag ``score_name``). The result lands in
        ``self.registered`` once sent (after ``flush()``)."""
        if not self.enabled:
            return

        def op() -> None:
            from mlflow.exceptions import MlflowException

            client = self.client
            try:
                client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                try:
                    client.create_registered_model(name, description="segcore models; alias 'best': best val Dice")
                except MlflowException as exc2:
                    if exc2.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            source = f"{client.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
            version_tags = {score_name: f"{score:.6f}", **{k: str(v) for k, v in (tags or {}).items()}}
            version = client.create_model_version(
                name, source, run_id=self.run_id, tags=version_tags, await_creation_for=0
            )
            holder, holder_score = None, -math.inf
            try:
                holder = client.get_model_version_by_alias(name, alias)
                holder_score = float(holder.tags.get(score_name, "-inf"))
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                    raise
            moved = holder is None or score > holder_score
            if moved:
                client.set_registered_model_alias(name, alias, version.version)
            where = "it" if moved else f"version {holder.version} ({score_name} {holder_score:.4f})"
            log.info(
                "registered %s version %s (%s %.4f); alias '%s' -> %s",
                name,
                version.version,
                score_name,
                score,
                alias,
                where,
            )
            self.registered = {"name": name, "version": version.version, "alias": alias if moved else None}

        self._submit(f"model version of {name}", op)

    @_never_raises
    def write_run_file(self, folder: str | Path) -> None:
        """Record this run in ``folder``/tracking.json, so a resumed training continues the run and a
        later step given this folder (``bundle=``) joins its family."""
        if not self.enabled:
            return
        data = {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "experiment_name": self.experiment_name,
            "run_id": self.run_id,
        }
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, folder / RUN_FILE)


# ---------------------------------------------------------------------------------- starting a run


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


def check_tracking(args: argparse.Namespace | None) -> None:
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


def _experiment(client, settings: Settings) -> tuple[str, str]:
    if settings.experiment_id:
        exp = client.get_experiment(settings.experiment_id)
        return exp.experiment_id, exp.name
    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(settings.experiment_name), settings.experiment_name
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
    args: argparse.Namespace | None,
    step: str,
    run_name: str | None = None,
    *,
    bundle: str | Path | None = None,
    resume_from: str | Path | None = None,
    tags: Mapping[str, object] | None = None,
) -> Iterator[Tracker]:
    """The tracker of one step (a no-op one when tracking is off). The run ends FINISHED when the
    block succeeds, FAILED on an exception, KILLED on Ctrl-C, after the queue is flushed.

    ``bundle``: a model bundle this step works on (its tracking.json links the runs);
    ``resume_from``: an output folder whose tracking.json names a run to continue."""
    settings = settings_from(args)
    if settings is None:
        yield Tracker.disabled()
        return
    tracker = start_run(settings, step, run_name, bundle=bundle, resume_from=resume_from, tags=tags)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)


# ---------------------------------------------------------------------------------- reports


def log_segmentation_report(
    tracker: Tracker,
    predictor,
    dataset_root: str | Path,
    split: str = "val",
    *,
    scores: dict | None = None,
    prefix: str = "val",
    num_overlays: int = 4,
) -> dict | None:
    """Confusion-matrix and per-class Dice plots (plots/<prefix>_*.png) and image | ground truth |
    prediction panels of the first ``num_overlays`` items (overlays/<prefix>_<id>.png) of a split of
    a canonical dataset. ``predictor``: anything with ``predict(rgb_uint8_image) -> index mask``
    (``TorchPredictor``, ``OpenVINOPredictor``). Without ``scores`` (a dict with
    ``confusion_matrix`` and ``per_class``) the split is scored here, each image at its own size.
    Returns the scores; None when tracking is off (nothing is computed then)."""
    if not tracker.enabled:
        return None
    import matplotlib.pyplot as plt

    from segcore import plots
    from segcore.data.convert import load_manifest
    from segcore.data.dataset import SegmentationDataset
    from segcore.metrics import ConfusionMatrix

    manifest = load_manifest(dataset_root)
    labels, colors, ignore = manifest["labels"], manifest["colors"], manifest["ignore_index"]
    items = SegmentationDataset(dataset_root, split)
    count = len(items) if scores is None else min(num_overlays, len(items))
    cm = ConfusionMatrix(len(labels), ignore)
    try:
        for index in range(count):
            image, truth = items.load(index)
            prediction = predictor.predict(image)
            cm.update(prediction, truth)
            if index < num_overlays:
                item_id = items.items[index]["id"].replace("/", "_")
                fig = plots.overlay_panel(image, truth, prediction, labels, colors, ignore, title=item_id)
                tracker.log_figure(fig, f"overlays/{prefix}_{item_id}.png")
        if scores is None:
            scores = cm.scores(labels)
            scores["num_images"] = len(items)
            scores["confusion_matrix"] = cm.matrix.tolist()
        tracker.log_figure(
            plots.confusion_matrix_figure(scores["confusion_matrix"], labels, f"{prefix} confusion matrix"),
            f"plots/{prefix}_confusion_matrix.png",
        )
        tracker.log_figure(
            plots.per_class_dice_figure(scores["per_class"], f"{prefix} Dice per class"),
            f"plots/{prefix}_per_class_dice.png",
        )
    except Exception as exc:  # noqa: BLE001 - a report must never fail the step
        log.warning("could not draw the %s report: %s", prefix, exc)
        plt.close("all")
    return scores
