"""Pipeline step 2: train a Lite-HRNet template on the canonical Dataset -> Model (a segcore bundle).

Retries resume: with ``checkpoint_uri`` (an s3:// prefix, or a path on a volume: on a cluster
the pod's own disk does not outlive it) the training writes its checkpoints to
``<checkpoint_uri>/train-<key>`` after every epoch and always resumes, so a retried attempt
continues from the last finished epoch; a finished training found there is reused as it is
(``segcore.steps.train_resumable``).

Distributed: with ``train_nodes`` x ``train_procs_per_node`` > 1 (fixed at compile time) the step
creates a Kubeflow Trainer TrainJob that trains in ``image`` on every node, waits for it and
collects the bundle from ``checkpoint_uri`` (required: pods share no disk); ``train_launcher``
"local" runs that job's command on this machine instead (``components.trainjob``).
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
    early_stop_patience: int = -1,
    plateau_patience: int = -1,
    num_workers: int = 2,
    checkpoint_uri: str = "",
    unlabeled_data_uri: str = "",
    load_weights_uri: str = "",
    allow_dropped_classes: bool = False,
    s3_endpoint: str = "",
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
    train_nodes: int = 1,
    train_procs_per_node: int = 1,
    trainer_runtime: str = "torch-distributed",
    train_node_cpu: str = "",
    train_node_memory: str = "",
    train_gpu_type: str = "",
    train_gpu_count: int = 0,
    train_launcher: str = "trainjob",
    keep_train_job: bool = False,
    train_job_timeout_min: float = 10080.0,
    image: str = "",
    s3_secret: str = "segcore-s3",
    mlflow_secret: str = "segcore-mlflow",
    load_weights: Input[Model] = None,
):
    """Train with the template's recipe (0 / "" = the template's default; the patiences: -1); resumable from
    checkpoint_uri.
    More than one process: a TrainJob on the cluster (train_launcher "local": here) writes the bundle.
    unlabeled_data_uri (a folder of images): semi-supervised training (Mean Teacher). load_weights_uri: backbone
    weights (.pth) or a trained bundle (class-incremental); or load_weights: a pretrain step's or train step's Model."""
    from components import common
    from components.trainjob import Distribution, train_distributed
    from segcore import storage
    from segcore.steps import TrainOptions, train_resumable
    from segcore.tracking import parent_status

    storage.configure(s3_endpoint or None)
    size = common.size(input_size)
    patience = {"early_stop_patience": early_stop_patience, "plateau_patience": plateau_patience}
    patience = common.patience(patience)
    options = TrainOptions(epochs or None, batch_size or None, size, lr or None, num_workers=num_workers, **patience)
    key = {"epochs": epochs, "batch_size": batch_size, "input_size": "x".join(map(str, size or ())), "lr": lr}
    key.update(patience)  # only the ones given: the keys of earlier checkpoints stay as they were
    if unlabeled_data_uri:
        key["unlabeled"] = unlabeled_data_uri
    load_weights_uri = common.start_weights(
        key, load_weights, load_weights_uri, allow_dropped_classes, train_nodes * train_procs_per_node > 1
    )
    tracking_options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id)
    dist = Distribution(
        train_nodes, train_procs_per_node, trainer_runtime, train_node_cpu, train_node_memory, train_gpu_type,
        train_gpu_count, keep_train_job, train_job_timeout_min,
    )  # fmt: skip
    with parent_status(tracking_options):
        if dist.distributed:
            secrets = {s3_secret: common.S3_SECRET_KEYS, mlflow_secret: common.MLFLOW_SECRET_KEYS}
            meta, checkpoints = train_distributed(
                template, dataset.path, model.path, options, checkpoint_uri, {**key, "processes": dist.processes},
                dist, image=image, secrets=secrets, tracking=tracking_options, s3_endpoint=s3_endpoint,
                local=train_launcher == "local", unlabeled=unlabeled_data_uri, load_weights=load_weights_uri,
                allow_dropped_classes=allow_dropped_classes,
            )  # fmt: skip
        else:
            meta, checkpoints = train_resumable(
                template, dataset.path, model.path, options, checkpoint_uri, key, tracking_options,
                unlabeled=unlabeled_data_uri, load_weights=load_weights_uri,
                allow_dropped_classes=allow_dropped_classes,
            )  # fmt: skip
    common.record_training(model, metrics, meta, checkpoints)


def component(image: str = DEFAULT_IMAGE):
    return make_component(train, image)


train_op = component()
