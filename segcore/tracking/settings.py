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
