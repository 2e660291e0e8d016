"""Pipeline step 2: train a Lite-HRNet template on the canonical Dataset -> Model (a segcore bundle).

Retries resume: with ``checkpoint_uri`` (an s3:// prefix, or a path on a volume: on a cluster
the pod's own disk does not outlive it) the training writes its checkpoints to
``<checkpoint_uri>/train-<key>`` after every epoch and always runs with ``--resume``, so a retried
attempt continues from the last finished epoch. ``<key>`` hashes the dataset content and the
training settings: the same inputs find the same checkpoints, other inputs never do, and a
finished training found there is reused as it is.
"""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE, make_component


def train(
    template: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    epochs: int = 0,
    batch_size: int = 0,
    input_size: str = "",
    lr: float = 0.0,
    num_workers: int = 2,
    checkpoint_uri: str = "",
    s3_endpoint: str = "",
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
):
    """Train with the template's recipe (0 / "" = the template's default); resumable from checkpoint_uri."""
    import logging
    import shutil
    from pathlib import Path

    from components import common
    from segcore import storage

    log = logging.getLogger("segcore.components")
    manifest = common.read_json(f"{dataset.path}/manifest.json")
    size = common.size_flag(input_size)
    settings = {"epochs": epochs, "batch_size": batch_size, "input_size": size, "lr": lr}
    argv = ["train", template, "--train-data-root", dataset.path, "--resume"]
    argv += common.flags(
        {
            "--epochs": epochs,
            "--batch-size": batch_size,
            "--input-size": size,
            "--lr": lr,
            "--num-workers": str(num_workers),
            "--s3-endpoint": s3_endpoint,
        }
    )
    argv += common.tracking_flags(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id)
    args = common.tracking_args(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id)
    storage.configure(s3_endpoint or None)
    with common.failure_marks_parent(args):
        if checkpoint_uri:  # s3:// (or a path on a volume that outlives the pod)
            output = common.checkpoint_prefix(checkpoint_uri, manifest["content_hash"], template, settings)
            remote = storage.is_s3(output)
            if storage.exists(f"{output}/model.json") if remote else Path(output, "model.json").is_file():
                log.info("%s holds this training, finished: reusing it", output)
            else:
                common.run_cli(argv + ["--output", output])
            if remote:
                storage.download(output, model.path)
            else:
                shutil.copytree(output, model.path, dirs_exist_ok=True)
        else:
            output = model.path
            common.run_cli(argv + ["--output", output])
    meta = common.read_json(f"{model.path}/model.json")
    model.metadata.update(
        {
            "framework": "pytorch",
            "format": "segcore-bundle",
            "template": meta["template"],
            "labels": meta["labels"],
            "input_size": meta["input_size"],
            "best_val_mean_dice": meta["best_val_mdice"],
            "checkpoints": storage.display(output, output),
        }
    )
    metrics.log_metric("best_val_mean_dice", float(meta["best_val_mdice"]))
    metrics.log_metric("best_epoch", int(meta["best_epoch"]))
    metrics.log_metric("epochs_run", int(meta["epochs_run"]))
    metrics.log_metric("train_minutes", round(float(meta["train_seconds"]) / 60, 2))


def component(image: str = DEFAULT_IMAGE):
    return make_component(train, image)


train_op = component()
