"""Where tracking goes: the settings record, the environment, and small naming helpers."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("segcore.tracking")

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "segcore"
ENV_SWITCH = "SEGCORE_TRACKING"
ENV_PARENT = "SEGCORE_PARENT_RUN_ID"
ENV_SYSTEM_METRICS = "SEGCORE_SYSTEM_METRICS"
# The experiment tag MLflow 3's UI reads to choose an experiment's first page: runs (model
# training) rather than the GenAI overview of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_FILE = "tracking.json"  # written into an output folder: which run it was logged to
BEST_ALIAS = "best"
MODEL_ARTIFACT = "model"
BUNDLE_ARTIFACT = "bundle"
BUNDLE_FILES = ("model.json", "best.pt", "metrics.jsonl")
_OFF = {"0", "off", "false", "no", "disabled"}
_MAX_BATCH_METRICS = 1000
_MAX_BATCH_PARAMS = 100
_MAX_PARAM_LENGTH = 6000


@dataclass(frozen=True)
class TrackingOptions:
    """What a user chooses about tracking (the CLI flags, or a component's parameters); the
    environment fills in the rest (``settings_from``). Attribute names match the CLI's."""

    no_tracking: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None
    no_system_metrics: bool = False


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
    system_metrics: bool = True  # CPU, memory, disk, network (and GPU) of steps that train


def settings_from(args) -> Settings | None:
    """The tracking settings of ``args`` (``TrackingOptions``, CLI arguments or None) and the
    environment; None when tracking is off."""
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
        system_metrics=not get("no_system_metrics")
        and os.environ.get(ENV_SYSTEM_METRICS, "").strip().lower() not in _OFF,
    )


# MLflow 3.17's UI shows every experiment in one of two views chosen by a global switch, GenAI
# (the default of a new browser: an overview of traces) or Model training (runs, charts); it
# ignores the experimentKind tag. Links segcore prints name the view, so they open on the runs.
UI_VIEW = "workflowType=machine_learning"


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page (at ``base``, e.g. http://127.0.0.1:5000) of an experiment's runs, or of
    one run, in the UI's Model training view."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{page}?{UI_VIEW}"


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
