"""The tracker: one MLflow run's logging API. Every method returns at once and never raises
because of MLflow; calls go through a ``SendQueue``. ``Tracker.disabled()`` (tracking off)
accepts the same calls and does nothing."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from segcore.tracking.datasets import dataset_input
from segcore.tracking.queue import SendQueue
from segcore.tracking.settings import (
    _MAX_BATCH_METRICS,
    _MAX_BATCH_PARAMS,
    _MAX_PARAM_LENGTH,
    BUNDLE_ARTIFACT,
    MODEL_ARTIFACT,
    RUN_FILE,
    metric_key,
    redact,
    ui_url,
)

log = logging.getLogger("segcore.tracking")


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


class Tracker:
    """Logs to one MLflow run through an ordered queue sent by a background thread."""

    def __init__(self, client=None, run_id=None, experiment_id=None, experiment_name=None, uri=None, owns_run=False):
        self.client = client
        self.run_id: str | None = run_id
        self.experiment_id: str | None = experiment_id
        self.experiment_name: str | None = experiment_name
        self.tracking_uri: str | None = redact(uri) if uri else None
        self.owns_run = owns_run
        self.resumed = False  # continuing an earlier run: parameters it has are not sent again
        self.registered: dict | None = None  # set once a register_model call has gone through
        self._queue = SendQueue(self.tracking_uri) if client is not None else None
        self._spool = Path(tempfile.mkdtemp(prefix="segcore-mlflow-")) if client is not None else None
        self._counter = 0

    @classmethod
    def disabled(cls) -> Tracker:
        return cls()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def dropped(self) -> list[str]:
        return self._queue.dropped if self._queue is not None else []

    @property
    def run_url(self) -> str | None:
        if not self.enabled or not self.tracking_uri or not self.tracking_uri.startswith("http"):
            return None
        return ui_url(self.tracking_uri, self.experiment_id, self.run_id)

    def _submit(self, what: str, fn: Callable[[], object]) -> None:
        if self._queue is not None:
            self._queue.submit(what, fn)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has been sent (or ``timeout`` s); True when the queue is empty."""
        return self._queue.flush(timeout) if self._queue is not None else True

    def pending(self) -> int:
        return self._queue.pending() if self._queue is not None else 0

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Mark the run ``status`` (runs this tracker created or resumed), flush, stop the thread."""
        if not self.enabled:
            return
        if self.owns_run:
            self._submit(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status))
        timeout = float(os.environ.get("SEGCORE_TRACKING_FLUSH_TIMEOUT", "300")) if timeout is None else timeout
        left = self._queue.stop(timeout)
        if left:
            log.warning(
                "MLflow at %s did not take %d tracking calls within %.0fs; dropped: %s",
                self.tracking_uri,
                len(left),
                timeout,
                ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""),
            )
            self._queue.dropped.extend(left)  # the spool stays: an upload may still be reading it
        elif self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        if self.run_url:
            log.info("MLflow run: %s", self.run_url)

    # ------------------------------------------------------------------ logging

    def spool_path(self, name: str) -> Path:
        self._counter += 1
        path = self._spool / f"{self._counter:05d}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @_never_raises
    def log_dataset(self, manifest: dict, source: str, context: str) -> None:
        """The run's data as an MLflow dataset input (``datasets.dataset_input``)."""
        entry = dataset_input(manifest, source, context) if self.enabled else None
        self._submit("dataset input", lambda: self.client.log_inputs(self.run_id, datasets=[entry]))

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
        if self.enabled:
            path = Path(path)
            self._log_written(f"{artifact_path or ''}/{path.name}".lstrip("/"), lambda out: shutil.copy2(path, out))

    @_never_raises
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None, files=None) -> None:
        """A folder (or only the ``files`` named, relative to it), copied now and uploaded in order."""
        if not self.enabled:
            return
        local_dir = Path(local_dir)
        copy = self.spool_path(local_dir.name or "dir")
        if files is None:
            shutil.copytree(local_dir, copy)
        else:
            _copy_files(local_dir, files, copy)
        self._submit(
            f"artifacts {artifact_path or local_dir.name}/",
            lambda: self.client.log_artifacts(self.run_id, str(copy), artifact_path),
        )

    @_never_raises
    def log_figure(self, figure, artifact_file: str, close: bool = True) -> None:
        """A matplotlib figure as PNG (``artifact_file`` like "plots/dice.png")."""
        if self.enabled:
            self._log_written(artifact_file, lambda out: figure.savefig(out, dpi=100))
        if close:
            import matplotlib.pyplot as plt

            plt.close(figure)

    @_never_raises
    def log_image(self, image, artifact_file: str) -> None:
        """An RGB or grey uint8 array as PNG."""
        import numpy as np
        from PIL import Image

        if self.enabled:
            self._log_written(artifact_file, lambda out: Image.fromarray(np.asarray(image)).save(out))

    @_never_raises
    def log_dict(self, data, artifact_file: str) -> None:
        """JSON-serialisable data as a .json artifact."""
        if self.enabled:
            self._log_written(artifact_file, lambda out: out.write_text(json.dumps(data, indent=1, default=str)))

    def _log_written(self, artifact_file: str, write: Callable[[Path], object]) -> None:
        """``write`` a spool file now; upload it as ``artifact_file`` in order."""
        path = self.spool_path(artifact_file.rpartition("/")[2])
        write(path)
        folder = artifact_file.rpartition("/")[0] or None
        self._submit(f"file {artifact_file}", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    @_never_raises
    def log_model_bundle(
        self, bundle: str | Path, artifact_path: str = MODEL_ARTIFACT, input_example=None, bundle_path=BUNDLE_ARTIFACT
    ) -> bool:
        """The bundle's files under ``bundle/`` and an MLflow pyfunc under ``model/`` (see
        ``segcore.tracking.registry.log_model_bundle``)."""
        from segcore.tracking import registry

        return registry.log_model_bundle(self, bundle, artifact_path, input_example, bundle_path)

    @_never_raises
    def register_model(self, name: str, *, score: float, **options) -> None:
        """A new version of ``name``, aliased 'best' when ``score`` beats the holder's (see
        ``segcore.tracking.registry.register_model``)."""
        from segcore.tracking import registry

        registry.register_model(self, name, score=score, **options)

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


def _copy_files(folder: Path, names, target: Path) -> None:
    target.mkdir(parents=True)
    for name in names:
        if (folder / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target / name)
