"""MLflow tracking for segcore's steps (kept at the edge: segcore's core never imports mlflow).

One small API for every step::

    with tracking_run(options, "eval", run_name="eval camvid", bundle=model_dir) as tracker:
        tracker.log_params({...})
        tracker.log_metrics({"test_dice": 0.61, "latency_ms": 12.5}, step=None)
        tracker.log_artifacts(folder, "ir")        # also log_artifact, log_figure, log_image, log_dict
        tracker.log_model_bundle(bundle_dir)       # pyfunc "model" + the bundle files
        tracker.register_model(model_name(tracker.experiment_name, "Lite-HRNet-18"), score=0.61)

``options`` is a ``TrackingOptions`` record (or the CLI's arguments, which carry the same names).

Where runs go:
- tracking URI: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  working directory; experiment: ``experiment``, else ``MLFLOW_EXPERIMENT_NAME`` /
  ``MLFLOW_EXPERIMENT_ID``, else "segcore".
- the run: ``MLFLOW_RUN_ID`` (as Kubeflow's MLflow integration injects it) is used as is; else the
  run recorded in the output's tracking.json when a training resumes; else a new run, nested under
  ``parent_run_id`` / ``SEGCORE_PARENT_RUN_ID`` (one parent per pipeline run, a child per step,
  tag ``mlflow.parentRunId``), or, for a step given a trained bundle (``bundle=``), under that
  bundle's training run.
- off with ``no_tracking`` (``--no-tracking``) or ``SEGCORE_TRACKING=off``: ``tracking_run`` yields
  a tracker whose methods do nothing.

Failures: an unreachable server at the start is a SegcoreError before any work. Later, every call
goes through a queue that a background thread sends in order (``queue.SendQueue``): when the
server fails, it warns once, retries with exponential backoff (up to ``SEGCORE_TRACKING_RETRY_MAX``
s, default 10) and keeps the queue; the work never waits for MLflow and never fails because of
it. At the end the queue is flushed for up to ``SEGCORE_TRACKING_FLUSH_TIMEOUT`` seconds (default
300), then what is left is reported and dropped.

Modules: ``settings`` (options, environment, names), ``queue`` (sending), ``tracker`` (the logging
API), ``registry`` (models and registered versions), ``runs`` (starting runs, the pipeline's parent
run), ``report`` (plots and overlays of a scoring).
"""

from segcore.tracking.report import log_segmentation_report
from segcore.tracking.runs import (
    check_tracking,
    parent_status,
    start_parent_run,
    start_run,
    tracking_run,
    update_parent,
)
from segcore.tracking.settings import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    ENV_PARENT,
    ENV_SWITCH,
    ENV_SYSTEM_METRICS,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    RUN_FILE,
    Settings,
    TrackingOptions,
    metric_key,
    model_name,
    read_run_file,
    redact,
    settings_from,
    ui_url,
)
from segcore.tracking.tracker import Tracker

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_URI",
    "ENV_PARENT",
    "ENV_SWITCH",
    "ENV_SYSTEM_METRICS",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "RUN_FILE",
    "Settings",
    "Tracker",
    "TrackingOptions",
    "check_tracking",
    "log_segmentation_report",
    "metric_key",
    "parent_status",
    "start_parent_run",
    "update_parent",
    "model_name",
    "read_run_file",
    "redact",
    "settings_from",
    "start_run",
    "tracking_run",
    "ui_url",
]
