"""The segcore Kubeflow pipeline: one DAG for a cluster and for a dry run on a laptop.

    convert -> [pretrain ->] train -> validate (FP32) -> export -> quantize -> validate (INT8)

- convert: raw data -> Dataset; starts the MLflow parent run (its id goes to every other step)
- pretrain: unlabelled images -> pretrained backbone (Model), self-supervised; it works only when
  ``pretrain_data_uri`` is given (and otherwise hands on an empty Model that train ignores)
- train: Dataset -> Model (bundle) + Metrics; retried, and a retry resumes from the checkpoints
  kept under ``checkpoint_uri`` (S3); optional GPU (``train_accelerator``, off by default)
- validate (FP32): bundle + Dataset -> Metrics, ClassificationMetrics, HTML; ``min_dice`` gates export
- export: bundle -> FP32 IR (Model)
- quantize: FP32 IR (PTQ) or bundle (QAT) + Dataset -> INT8 IR (Model) + Metrics
- validate (INT8): INT8 IR + Dataset -> the same reports, plus ``dice_drop`` (FP32's mean Dice minus
  INT8's); finishes the MLflow parent run

Every step runs the same image (``image``, fixed when the pipeline is compiled), requests CPU and
memory, is cached by kfp on its inputs and gets credentials only from Kubernetes secrets
(``use_secret_as_env``, optional, so a cluster without them still runs): S3 from ``s3_secret``,
MLflow from ``mlflow_secret``. No credential is a pipeline parameter or appears in the YAML.

Caching and MLflow: the parent run's id is an output of convert, so a rerun whose conversion kfp
takes from its cache (same data URIs and MLflow settings) hands the earlier parent run on: the
steps that do run again log their runs under it, next to the earlier ones, and steps taken from
the cache log nothing. A new parent run comes with a new conversion (other data, another
``mlflow_run_name``, or ``segcore pipeline submit --no-cache``). Caching keys on parameters, not on
the bytes behind a URI: data changed in place needs a new URI or ``--no-cache``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from components.common import DEFAULT_IMAGE, MLFLOW_SECRET_KEYS, S3_SECRET_KEYS

PIPELINE_NAME = "segcore-segmentation"
PIPELINE_DESCRIPTION = (
    "Semantic segmentation with Lite-HRNet: convert the data, train, validate (Dice), export to "
    "OpenVINO IR, quantize to INT8 with NNCF and validate the INT8 model; tracked in MLflow."
)
# Per-step requests: (CPU, memory). Training sets the pace; quantization holds two models and data.
RESOURCES = {
    "convert": ("1", "2Gi"),
    "train": ("4", "8Gi"),
    "pretrain": ("4", "8Gi"),
    "launch": ("1", "2Gi"),  # a distributed train step: creates the TrainJob, waits, moves files
    "validate": ("2", "4Gi"),
    "export": ("1", "4Gi"),
    "quantize": ("2", "8Gi"),
}
TASKS = ("convert", "pretrain", "train", "validate", "export", "quantize", "validate-2")


class PipelineOutputs(NamedTuple):
    fp32_mean_dice: float
    int8_mean_dice: float
    mlflow_parent_run_id: str


@dataclass(frozen=True)
class Options:
    """What is fixed when the pipeline is compiled (everything else is a run parameter)."""

    image: str = DEFAULT_IMAGE
    train_accelerator: str | None = None  # e.g. "nvidia.com/gpu" (needs the CUDA image); per node
    train_accelerator_count: int = 1
    train_retries: int = 2
    s3_secret: str = "segcore-s3"
    mlflow_secret: str = "segcore-mlflow"
    # Distributed training (nodes x procs > 1): a Kubeflow Trainer v2.3 TrainJob (components.trainjob)
    train_nodes: int = 1
    train_procs_per_node: int = 1
    trainer_runtime: str = "torch-distributed"
    train_node_cpu: str = ""  # per node, e.g. "8"
    train_node_memory: str = ""  # per node, e.g. "32Gi"
    keep_train_job: bool = False
    train_job_timeout_min: float = 7 * 24 * 60
    train_launcher: str = "trainjob"  # "local": the TrainJob's command run on this machine (run --local)

    def __post_init__(self):
        if self.train_nodes < 1 or self.train_procs_per_node < 1:
            from segcore.errors import SegcoreError

            raise SegcoreError("--train-nodes and --train-procs-per-node must be at least 1")

    @property
    def distributed(self) -> bool:
        return self.train_nodes * self.train_procs_per_node > 1


def build(options: Options = Options()):  # noqa: B008 - a frozen dataclass
    """The pipeline (a kfp GraphComponent) with every step in ``options.image``."""
    from kfp import dsl

    ops = _components(options.image)

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
    def segcore_pipeline(
        train_data_uri: str,
        template: str = "Lite-HRNet-18-mod2",
        val_data_uri: str = "",
        train_ann_uri: str = "",
        val_ann_uri: str = "",
        data_format: str = "auto",
        val_ratio: float = 0.2,
        epochs: int = 0,
        batch_size: int = 0,
        input_size: str = "",
        lr: float = 0.0,
        early_stop_patience: int = -1,
        plateau_patience: int = -1,
        num_workers: int = 2,
        min_dice: float = 0.0,
        export_precision: str = "FP32",
        quantization_mode: str = "ptq",
        max_dice_drop: float = 0.0,
        subset_size: int = 300,
        qat_epochs: int = 2,
        checkpoint_uri: str = "",
        unlabeled_data_uri: str = "",
        load_weights_uri: str = "",
        allow_dropped_classes: bool = False,
        pretrain_data_uri: str = "",
        pretrain_epochs: int = 0,
        s3_endpoint: str = "",
        tracking: bool = True,
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "segcore",
        mlflow_run_name: str = "",
    ) -> PipelineOutputs:
        """convert -> [pretrain ->] train -> validate (FP32) -> export -> quantize -> validate (INT8).

        Args:
            train_data_uri: training data (or the whole dataset): s3://bucket/prefix or a path the pods see.
            template: Lite-HRNet template ID or name (segcore templates).
            val_data_uri: validation images or dataset root ("" = split off training data).
            train_ann_uri: training masks folder (plain layout with separate folders).
            val_ann_uri: validation masks folder.
            data_format: dataset format ("auto" detects it).
            val_ratio: share of training items used for validation when no validation data is given.
            epochs: maximum epochs (0 = the template's 300, with early stopping).
            batch_size: images per step (0 = the template's 8).
            input_size: network input HxW, e.g. 512x512 ("" = the template's).
            lr: learning rate (0 = the template's).
            early_stop_patience: stop after N epochs without a better validation Dice (0 = never; -1 = template's 8).
            plateau_patience: cut the LR after N + 1 epochs without a better val Dice (-1 = the template's 4; see docs).
            num_workers: data loading processes of training and QAT.
            min_dice: the FP32 model's validation mean Dice must reach this for export to run (0 = no gate).
            export_precision: FP32 or FP16 weights in the exported IR.
            quantization_mode: ptq (post-training, of the IR) or qat (quantization-aware training).
            max_dice_drop: PTQ with accuracy control: largest allowed Dice drop (0 = plain PTQ).
            subset_size: calibration images for quantization.
            qat_epochs: QAT fine-tuning epochs.
            checkpoint_uri: s3:// prefix for training checkpoints; a retried training resumes from there.
            unlabeled_data_uri: unlabelled images (s3:// or a pod path): semi-supervised training ("" = supervised).
            load_weights_uri: initial weights: backbone weights (.pth) or a trained bundle of the same template,
                whose classes are matched to the data's by name (class-incremental) ("" = from scratch).
            allow_dropped_classes: with a bundle in load_weights_uri, let the model forget classes the data lacks.
            pretrain_data_uri: a folder of unlabelled images (s3:// or a path the pods see): pretrain the backbone on
                them (self-supervised, DetCon) and train from it ("" = no pretraining; not with load_weights_uri).
            pretrain_epochs: pretraining epochs (0 = 10).
            s3_endpoint: S3-compatible endpoint URL, e.g. http://minio:9000 ("" = AWS_ENDPOINT_URL / AWS).
            tracking: log every step to MLflow.
            mlflow_tracking_uri: MLflow server ("" = MLFLOW_TRACKING_URI from the MLflow secret).
            mlflow_experiment: MLflow experiment of the runs.
            mlflow_run_name: name of the MLflow parent run ("" = "segcore pipeline").
        """
        return _dag(ops, options, dict(locals()))

    return segcore_pipeline


def _components(image: str) -> dict:
    """Each step's kfp component, by step name, all in ``image``."""
    from components import convert, export, pretrain, quantize, train, validate

    steps = (convert, pretrain, train, validate, export, quantize)
    return {m.__name__.rsplit(".", 1)[1]: m.component(image) for m in steps}


def _configure(task, options: Options, step: str, name: str):
    """Display name, resource requests and the S3 / MLflow secrets as environment."""
    from kfp import kubernetes

    cpu, memory = RESOURCES[step]
    task.set_display_name(name).set_cpu_request(cpu).set_memory_request(memory)
    kubernetes.use_secret_as_env(task, options.s3_secret, {k: k for k in S3_SECRET_KEYS}, optional=True)
    kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in MLFLOW_SECRET_KEYS}, optional=True)
    return task


def _dag(ops: dict, options: Options, p: dict) -> PipelineOutputs:
    """The tasks of one pipeline run, wired from the run parameters ``p`` (kfp channels)."""
    from kfp import kubernetes

    mlflow = {k: p[k] for k in ("tracking", "mlflow_tracking_uri", "mlflow_experiment")}
    data_keys = ("train_data_uri", "val_data_uri", "train_ann_uri", "val_ann_uri", "data_format", "val_ratio")
    data = _configure(
        ops["convert"](**{k: p[k] for k in (*data_keys, "s3_endpoint", "mlflow_run_name")}, **mlflow),
        options, "convert", "convert",
    )  # fmt: skip
    mlflow["mlflow_parent_run_id"] = data.outputs["mlflow_parent_run_id"]
    dataset = data.outputs["dataset"]
    keys = ("template", "pretrain_data_uri", "pretrain_epochs", "num_workers", "checkpoint_uri", "s3_endpoint")
    pretrained = _configure(ops["pretrain"](**{k: p[k] for k in keys}, **mlflow), options, "pretrain", "pretrain")
    kubernetes.empty_dir_mount(pretrained, "dshm", "/dev/shm", medium="Memory")  # data loader workers
    pretrained.set_retry(options.train_retries, backoff_duration="60s", backoff_factor=2.0)
    trained = _train_task(ops, options, p, dataset, mlflow, pretrained.outputs["pretrained"])
    model = trained.outputs["model"]
    checked = _configure(
        ops["validate"](model=model, dataset=dataset, label="fp32", min_dice=p["min_dice"], **mlflow),
        options, "validate", "validate FP32",
    )  # fmt: skip
    exported = _configure(
        ops["export"](model=model, precision=p["export_precision"], **mlflow), options, "export", "export"
    ).after(checked)
    quantized = _quantize_task(ops, options, p, exported.outputs["ir"], model, dataset, mlflow)
    checked_int8 = _configure(
        ops["validate"](model=quantized.outputs["int8_ir"], dataset=dataset, label="int8", finish_pipeline_run=True,
                        reference_dice=checked.outputs["mean_dice"], **mlflow),
        options, "validate", "validate INT8",
    )  # fmt: skip
    return PipelineOutputs(
        checked.outputs["mean_dice"], checked_int8.outputs["mean_dice"], data.outputs["mlflow_parent_run_id"]
    )


def _train_task(ops: dict, options: Options, p: dict, dataset, mlflow: dict, pretrained):
    from kfp import kubernetes

    keys = ("template", "epochs", "batch_size", "input_size", "lr", "early_stop_patience", "plateau_patience",
            "num_workers", "checkpoint_uri", "unlabeled_data_uri", "load_weights_uri", "allow_dropped_classes",
            "s3_endpoint")  # fmt: skip
    if options.distributed:  # this pod only launches a TrainJob and waits: the nodes get the resources
        task = ops["train"](dataset=dataset, load_weights=pretrained, **{k: p[k] for k in keys}, **mlflow,
                            **_distribution(options))  # fmt: skip
        trained = _configure(task, options, "launch", "train (TrainJob)")
    else:
        trained = _configure(
            ops["train"](dataset=dataset, load_weights=pretrained, **{k: p[k] for k in keys}, **mlflow),
            options,
            "train",
            "train",
        )
        kubernetes.empty_dir_mount(trained, "dshm", "/dev/shm", medium="Memory")  # data loader workers
        if options.train_accelerator:
            trained.set_accelerator_type(options.train_accelerator)
            trained.set_accelerator_limit(options.train_accelerator_count)
    trained.set_retry(options.train_retries, backoff_duration="60s", backoff_factor=2.0)
    return trained


def _distribution(options: Options) -> dict:
    """The train component's distributed-training arguments (constants in the compiled YAML)."""
    return dict(
        train_nodes=options.train_nodes,
        train_procs_per_node=options.train_procs_per_node,
        trainer_runtime=options.trainer_runtime,
        train_node_cpu=options.train_node_cpu,
        train_node_memory=options.train_node_memory,
        train_gpu_type=options.train_accelerator or "",
        train_gpu_count=options.train_accelerator_count if options.train_accelerator else 0,
        train_launcher=options.train_launcher,
        keep_train_job=options.keep_train_job,
        train_job_timeout_min=float(options.train_job_timeout_min),
        image=options.image,
        s3_secret=options.s3_secret,
        mlflow_secret=options.mlflow_secret,
    )


def _quantize_task(ops: dict, options: Options, p: dict, ir, model, dataset, mlflow: dict):
    from kfp import kubernetes

    task = ops["quantize"](
        template=p["template"], ir=ir, model=model, dataset=dataset, mode=p["quantization_mode"],
        max_dice_drop=p["max_dice_drop"], subset_size=p["subset_size"], qat_epochs=p["qat_epochs"],
        num_workers=p["num_workers"], **mlflow,
    )  # fmt: skip
    quantized = _configure(task, options, "quantize", "quantize INT8")
    kubernetes.empty_dir_mount(quantized, "dshm", "/dev/shm", medium="Memory")  # QAT's data loader
    return quantized


def compile_pipeline(path: str | Path, options: Options = Options()) -> Path:  # noqa: B008
    """Write the pipeline as IR YAML (what the Kubeflow UI and ``kfp.Client`` take)."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.yaml")
    compiler.Compiler().compile(build(options), str(tmp))
    tmp.replace(path)
    return path
