"""Models in MLflow: a segcore bundle logged as its files plus an MLflow pyfunc, and registered
versions with the alias 'best' on the best validation Dice."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from segcore import __version__
from segcore.tracking.settings import BEST_ALIAS, BUNDLE_ARTIFACT, BUNDLE_FILES, MODEL_ARTIFACT

log = logging.getLogger("segcore.tracking")


def log_model_bundle(
    tracker, bundle: str | Path, artifact_path: str = MODEL_ARTIFACT, input_example=None, bundle_path=BUNDLE_ARTIFACT
) -> bool:
    """Log a segcore model bundle twice over: its files under ``bundle/`` (what ``segcore eval``
    and ``predict`` take) and an MLflow pyfunc under ``model/`` (``mlflow.pyfunc.load_model``,
    ``mlflow models serve``; see ``segcore.mlflow_model``). ``input_example``: one uint8 RGB
    image (H x W x 3). False (with a warning) when the model could not be packaged."""
    if not tracker.enabled:
        return False
    bundle = Path(bundle)
    tracker.log_artifacts(bundle, bundle_path, files=BUNDLE_FILES)
    try:
        folder = _save_pyfunc(tracker, bundle, input_example)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop the work
        log.warning("could not package %s as an MLflow model, logged the bundle files only: %s", bundle, exc)
        return False
    tracker._submit(
        f"model {artifact_path}/", lambda: tracker.client.log_artifacts(tracker.run_id, str(folder), artifact_path)
    )
    return True


def _save_pyfunc(tracker, bundle: Path, input_example) -> Path:
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    meta = json.loads((bundle / "model.json").read_text())
    files = tracker.spool_path("bundle")
    files.mkdir()
    for name in ("model.json", meta.get("weights", "best.pt")):
        shutil.copy2(bundle / name, files / name)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )
    example = None if input_example is None else np.asarray(input_example, dtype=np.uint8)[None]
    folder = tracker.spool_path("model")
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(Path(__file__).parents[1] / "mlflow_model.py"),
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


def register_model(
    tracker,
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
    ``tracker.registered`` once sent (after ``flush()``)."""
    if not tracker.enabled:
        return

    def op() -> None:
        from mlflow.exceptions import MlflowException

        client = tracker.client
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
        source = f"{client.get_run(tracker.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version_tags = {score_name: f"{score:.6f}", **{k: str(v) for k, v in (tags or {}).items()}}
        version = client.create_model_version(
            name, source, run_id=tracker.run_id, tags=version_tags, await_creation_for=0
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
        tracker.registered = {"name": name, "version": version.version, "alias": alias if moved else None}

    tracker._submit(f"model version of {name}", op)
