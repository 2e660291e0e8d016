"""What the component functions share: the factory that makes a kfp component of a function, and
the small conversions their bodies need from kfp parameters to segcore's settings records.

kfp puts only a component function's own source into the compiled YAML, so every body imports what
it needs inside the function (``from components import common``): the image has segcore and
``components`` installed, and so has the local virtualenv. Each body is an adapter: it turns kfp
inputs into the arguments of one ``segcore.steps`` function and its result into kfp outputs.

Tracking: every step is an MLflow run nested under the pipeline's parent run, which the first step
(convert) creates and hands on as ``mlflow_parent_run_id``; the last step (validation of the INT8
model) logs the headline numbers on it and marks it finished, and a failing step marks it failed
(``segcore.tracking.start_parent_run`` / ``update_parent`` / ``parent_status``). A cluster whose
Kubeflow MLflow integration injects ``MLFLOW_RUN_ID`` gets no parent of ours: each step then logs
into the run Kubeflow made for it.
"""

from collections.abc import Callable
from pathlib import Path

# What scripts/build_image.sh tags; `segcore pipeline compile --image` puts another on every step.
DEFAULT_IMAGE = "localhost/segcore:dev"
# Environment variables each secret may provide (every key optional): the steps' pods and a
# distributed training's TrainJob nodes get them from the pipeline's secrets, never as values.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")
MLFLOW_SECRET_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def make_component(func: Callable, image: str = DEFAULT_IMAGE):
    """A kfp v2 lightweight Python component of ``func`` running in ``image``.

    ``install_kfp_package=False``: the image carries the kfp that compiled the pipeline, so a step
    starts without network (no ``pip install kfp`` in the container command)."""
    from kfp import dsl

    return dsl.component(func, base_image=image, install_kfp_package=False)


def tracking(enabled: bool, uri: str, experiment: str, parent_run_id: str = "", run_name: str | None = None):
    """A step's tracking parameters as ``segcore.tracking.TrackingOptions``."""
    from segcore.tracking import TrackingOptions

    return TrackingOptions(
        no_tracking=not enabled,
        tracking_uri=uri or None,
        experiment=experiment or None,
        parent_run_id=parent_run_id or None,
        run_name=run_name,
    )


def size(text: str) -> tuple[int, int] | None:
    """'64' or '64x64' -> (H, W); '' -> None (the default)."""
    if not text:
        return None
    from segcore.sizes import parse_size

    return parse_size(text)


def patience(values: dict[str, int]) -> dict[str, int]:
    """The patience parameters that were given: -1 (the pipeline's default) means the template's."""
    from segcore.errors import SegcoreError

    for name, value in values.items():
        if value < -1:
            raise SegcoreError(f"{name} {value}: give 0 or more epochs, or -1 for the template's")
    return {name: value for name, value in values.items() if value != -1}


def record_training(model, metrics, meta: dict, checkpoints: str) -> None:
    """A training's bundle metadata on its Model output, its scores on its Metrics output."""
    keys = ("template", "labels", "input_size")
    model.metadata.update({"framework": "pytorch", "format": "segcore-bundle", **{k: meta[k] for k in keys}})
    model.metadata.update(best_val_mean_dice=meta["best_val_mdice"], checkpoints=checkpoints)
    metrics.log_metric("best_val_mean_dice", float(meta["best_val_mdice"]))
    metrics.log_metric("best_epoch", int(meta["best_epoch"]))
    metrics.log_metric("epochs_run", int(meta["epochs_run"]))
    metrics.log_metric("train_minutes", round(float(meta["train_seconds"]) / 60, 2))


def read_json(path: str | Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def start_weights(key: dict, model, load_weights_uri: str, allow_dropped: bool, distributed: bool) -> str:
    """The train step's initial weights, added to its checkpoint ``key``: ``load_weights_uri``, or
    the ``model`` input: a pretrain step's Model (backbone weights; an empty one, from a pretrain
    step without images, is ignored) or a train step's bundle (class-incremental). A distributed
    training's nodes do not see this pod's files: they read the Model where its step wrote it
    (under checkpoint_uri)."""
    from segcore.errors import SegcoreError

    if model is None or model.metadata.get("pretrained") is False:
        if load_weights_uri:
            key.update(load_weights=load_weights_uri, allow_dropped_classes=allow_dropped)
        return load_weights_uri
    if load_weights_uri:
        raise SegcoreError("load_weights_uri and a load_weights Model (e.g. a pretraining) both give initial weights")
    uri = model.metadata.get("uri") or model.metadata.get("checkpoints") or ""
    key["load_weights_model"] = [uri, model.metadata.get("final_loss", model.metadata.get("best_val_mean_dice"))]
    key["allow_dropped_classes"] = allow_dropped
    if not distributed:
        return model.path
    if not uri or uri == model.path:
        raise SegcoreError("a distributed training starts from a Model input only through checkpoint_uri")
    return uri
