"""`segcore pipeline`: compile the Kubeflow pipeline, dry-run it locally, or submit it to a cluster.

The pipeline itself lives in ``pipelines/`` and its steps in ``components/`` (imported only when a
pipeline command runs: segcore's other commands never load kfp)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from segcore.commands.options import epochs
from segcore.sizes import parse_size

EPILOG = """\
The DAG: convert -> [pretrain ->] train -> validate (FP32) -> export -> quantize -> validate (INT8). Every step
runs segcore in the image given to compile/submit, logs a nested MLflow run under the pipeline's
parent run, and writes typed artifacts (Dataset, Model, Metrics, ClassificationMetrics, HTML).

examples:
  segcore pipeline run --local                      # demo data, 2 epochs at 64x64, PTQ; ~2 min on 2 cores
  segcore pipeline run --local --train-data-root data/camvid --template Lite-HRNet-18 --epochs 5
  segcore pipeline compile --output pipeline.yaml --image registry.example.com/segcore:0.1.0
  segcore pipeline submit --host http://localhost:8080 --image registry.example.com/segcore:0.1.0 \\
      --train-data-root s3://data/camvid --checkpoint-uri s3://runs/checkpoints \\
      --tracking-uri http://mlflow.mlflow:5000 --experiment camvid
  segcore pipeline submit ... --checkpoint-uri s3://runs/checkpoints --image registry.example.com/segcore:0.1.0-cu128 \
      --train-nodes 2 --train-procs-per-node 4 --train-gpu nvidia.com/gpu --train-gpu-count 4   # a TrainJob
  segcore pipeline run --local --train-nodes 2      # that TrainJob's command, run here as 2 "nodes"
"""

# CLI flag dest -> pipeline parameter
PARAMS = {
    "template": "template",
    "train_data_root": "train_data_uri",
    "val_data_root": "val_data_uri",
    "train_ann_files": "train_ann_uri",
    "val_ann_files": "val_ann_uri",
    "format": "data_format",
    "val_ratio": "val_ratio",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "input_size": "input_size",
    "lr": "lr",
    "early_stop_patience": "early_stop_patience",
    "plateau_patience": "plateau_patience",
    "num_workers": "num_workers",
    "min_dice": "min_dice",
    "precision": "export_precision",
    "quantization_mode": "quantization_mode",
    "max_dice_drop": "max_dice_drop",
    "subset_size": "subset_size",
    "qat_epochs": "qat_epochs",
    "checkpoint_uri": "checkpoint_uri",
    "unlabeled_data_root": "unlabeled_data_uri",
    "load_weights": "load_weights_uri",
    "allow_dropped_classes": "allow_dropped_classes",
    "pretrain_data_root": "pretrain_data_uri",
    "pretrain_epochs": "pretrain_epochs",
    "s3_endpoint": "s3_endpoint",
    "tracking_uri": "mlflow_tracking_uri",
    "mlflow_experiment": "mlflow_experiment",
    "mlflow_run_name": "mlflow_run_name",
}


def _size(text: str) -> str:
    h, w = parse_size(text)
    return f"{h}x{w}"


def _add_params(p: argparse.ArgumentParser, local: bool) -> None:
    """The pipeline's run parameters (unset flags keep the pipeline's defaults)."""
    from pipelines.defaults import LOCAL_DEFAULTS
    from segcore.data.sources import SUPPORTED_FORMATS

    d = "(default: demo data generated under the pipeline root)" if local else "(s3:// URI the pods can read)"
    g = p.add_argument_group("data")
    g.add_argument("--train-data-root", metavar="URI", help=f"training data or dataset root {d}")
    g.add_argument("--val-data-root", metavar="URI", help="validation images or dataset root")
    g.add_argument("--train-ann-files", metavar="URI", help="training masks folder (plain layout)")
    g.add_argument("--val-ann-files", metavar="URI", help="validation masks folder (plain layout)")
    g.add_argument("--format", choices=("auto", *SUPPORTED_FORMATS), help="dataset format (default: detect)")
    g.add_argument("--val-ratio", type=float, help="share of train used for val without val data (default 0.2)")
    g.add_argument(
        "--unlabeled-data-root",
        metavar="URI",
        help="a folder of unlabelled images: semi-supervised training on them beside the labelled data",
    )
    g.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for s3:// URIs")

    def default(local_value: str, cluster_value: str) -> str:
        return f"(local default: {local_value})" if local else f"(default: {cluster_value})"

    g = p.add_argument_group("training")
    g.add_argument(
        "--template",
        help="template ID or name, see 'segcore templates' "
        + default(LOCAL_DEFAULTS["template"], "Lite-HRNet-18-mod2"),
    )
    g.add_argument(
        "--epochs", type=int, help="maximum epochs " + default(str(LOCAL_DEFAULTS["epochs"]), "the template's")
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help="images per step, over all training processes "
        + default(str(LOCAL_DEFAULTS["batch_size"]), "the template's"),
    )
    g.add_argument(
        "--input-size",
        type=_size,
        metavar="HxW",
        help="network input " + default(LOCAL_DEFAULTS["input_size"], "the template's"),
    )
    g.add_argument("--lr", type=float, help="learning rate (default: the template's)")
    g.add_argument(
        "--early-stop-patience",
        type=epochs,
        metavar="N",
        help="stop after N epochs without a better validation Dice (0: never; default: the template's 8)",
    )
    g.add_argument(
        "--plateau-patience",
        type=epochs,
        metavar="N",
        help="cut the learning rate after N + 1 epochs without a better validation Dice (default: the template's "
        "4; raise it for a small training set, see docs/training.md)",
    )
    g.add_argument(
        "--num-workers", type=int, help="data loading processes " + default(str(LOCAL_DEFAULTS["num_workers"]), "2")
    )
    g.add_argument(
        "--checkpoint-uri", metavar="URI", help="s3:// prefix for training checkpoints (a retried training resumes)"
    )
    _add_start_params(g)

    _add_deploy_params(p, default)
    _add_tracking_params(p, local)


def _add_tracking_params(p: argparse.ArgumentParser, local: bool) -> None:
    """Where the runs are logged."""
    g = p.add_argument_group("tracking (MLflow)")
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow server or store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"
        if local
        else "MLflow server as the pods reach it (default: MLFLOW_TRACKING_URI of the MLflow secret)",
    )
    if local:
        g.add_argument(
            "--experiment", dest="mlflow_experiment", metavar="NAME", help="MLflow experiment (default: segcore)"
        )
    else:
        g.add_argument(
            "--mlflow-experiment", metavar="NAME", help="MLflow experiment (default: --experiment or segcore)"
        )
    g.add_argument("--mlflow-run-name", metavar="NAME", help="name of the MLflow parent run")
    g.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")


def _add_options(p: argparse.ArgumentParser) -> None:
    """What is fixed at compile time."""
    from components.common import DEFAULT_IMAGE

    g = p.add_argument_group("compile options")
    g.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image of every step (default {DEFAULT_IMAGE})")
    g.add_argument(
        "--train-gpu",
        metavar="TYPE",
        help="run training on an accelerator, e.g. nvidia.com/gpu (needs the CUDA image, built with "
        "--build-arg TORCH_VARIANT=cu128, given as --image; default: CPU)",
    )
    g.add_argument(
        "--train-gpu-count",
        type=int,
        default=1,
        help="accelerators for training, per node when distributed (default 1)",
    )
    _add_distribution(g, cluster=True)
    g.add_argument("--train-retries", type=int, default=2, help="retries of a failed training (default 2)")
    g.add_argument(
        "--s3-secret", default="segcore-s3", help="Kubernetes secret with AWS_* variables (default: %(default)s)"
    )
    g.add_argument(
        "--mlflow-secret",
        default="segcore-mlflow",
        help="Kubernetes secret with MLFLOW_* variables (default: %(default)s)",
    )


def _add_distribution(g, cluster: bool) -> None:
    """Distributed training flags: a Kubeflow Trainer TrainJob on a cluster, its command here."""
    g.add_argument("--train-nodes", type=int, default=1, metavar="N",
                   help="training nodes; N x M > 1 trains in a Kubeflow Trainer v2.3 TrainJob (default 1)")  # fmt: skip
    g.add_argument("--train-procs-per-node", type=int, default=1, metavar="M",
                   help="training processes per node (GPUs per node, or CPU processes; default 1)")  # fmt: skip
    if not cluster:
        return
    g.add_argument("--trainer-runtime", default="torch-distributed", metavar="NAME",
                   help="ClusterTrainingRuntime of the TrainJob (default %(default)s)")  # fmt: skip
    g.add_argument("--train-node-cpu", default="", metavar="CPU", help="CPU per training node, e.g. 8")
    g.add_argument("--train-node-memory", default="", metavar="MEM", help="memory per training node, e.g. 32Gi")
    g.add_argument("--keep-train-job", action="store_true", help="keep the finished TrainJob (default: deleted)")
    g.add_argument("--train-job-timeout", type=float, default=7 * 24 * 60, metavar="MIN",
                   help="fail the train step when its TrainJob runs longer (default 7 days)")  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="the Kubeflow pipeline: compile it, dry-run it locally, submit it to a cluster",
        description="The Kubeflow pipeline convert -> [pretrain ->] train -> validate -> export -> quantize -> "
        "validate (INT8).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = actions.add_parser("compile", help="write the pipeline as YAML for the Kubeflow UI or kfp.Client")
    c.add_argument("--output", required=True, metavar="FILE", help="pipeline YAML to write (e.g. pipeline.yaml)")
    _add_options(c)
    c.set_defaults(func=run_compile)

    r = actions.add_parser(
        "run",
        help="run the whole DAG on this machine (kfp.local, each step a subprocess)",
        description="Run every step of the pipeline on this machine through kfp.local (no cluster, no "
        "container): with no data given, on generated demo data. Task outputs go under --pipeline-root, "
        "MLflow runs to --tracking-uri.",
    )
    r.add_argument("--local", action="store_true", required=True, help="run on this machine (required)")
    r.add_argument(
        "--pipeline-root", default="pipeline-runs", metavar="DIR", help="task outputs (default ./pipeline-runs)"
    )
    r.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_params(r, local=True)
    _add_distribution(r.add_argument_group("distributed training (the TrainJob's command, run here)"), cluster=False)
    r.set_defaults(func=run_local)

    s = actions.add_parser("submit", help="start a run on a Kubeflow Pipelines cluster")
    s.add_argument("--host", required=True, metavar="URL", help="Kubeflow Pipelines API, e.g. http://localhost:8080")
    s.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow: your profile)")
    s.add_argument("--experiment", help="Kubeflow experiment (default 'Default'); also the MLflow experiment")
    s.add_argument("--run-name", help="name of the Kubeflow run (default: pipeline name and time)")
    s.add_argument("--no-cache", action="store_true", help="run every step even if kfp has cached outputs")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_params(s, local=False)
    _add_options(s)
    s.set_defaults(func=run_submit)


def _add_deploy_params(p: argparse.ArgumentParser, default) -> None:
    from pipelines.defaults import LOCAL_DEFAULTS

    g = p.add_argument_group("validation, export, quantization")
    g.add_argument("--min-dice", type=float, help="FP32 mean Dice needed for export to run (default 0: no gate)")
    g.add_argument("--precision", choices=("FP32", "FP16"), help="exported IR weights (default FP32)")
    g.add_argument("--quantization-mode", choices=("ptq", "qat"), help="default ptq")
    g.add_argument("--max-dice-drop", type=float, metavar="D", help="PTQ with accuracy control (default 0: off)")
    g.add_argument(
        "--subset-size", type=int, help="calibration images " + default(str(LOCAL_DEFAULTS["subset_size"]), "300")
    )
    g.add_argument("--qat-epochs", type=int, help="QAT fine-tuning epochs (default 2)")


def _add_start_params(g) -> None:
    """Where the training starts from: weights, or a bundle to extend by classes."""
    g.add_argument(
        "--load-weights",
        metavar="URI",
        help="initial weights: backbone .pth, or a trained bundle (class-incremental: classes matched by name)",
    )
    g.add_argument(
        "--allow-dropped-classes",
        action="store_true",
        default=None,
        help="with a bundle in --load-weights: let the model forget classes the data lacks",
    )
    g.add_argument(
        "--pretrain-data-root",
        metavar="URI",
        help="a folder of unlabelled images: pretrain the backbone on them (self-supervised) and train from it",
    )
    g.add_argument("--pretrain-epochs", type=int, help="pretraining epochs (default 10)")


def pipeline_params(args: argparse.Namespace) -> dict:
    """The pipeline parameters the flags set (None: not given)."""
    params = {param: getattr(args, dest, None) for dest, param in PARAMS.items()}
    if args.no_tracking:
        params["tracking"] = False
    return params


def options(args: argparse.Namespace):
    from pipelines.segmentation import Options
    from segcore.errors import SegcoreError

    if args.train_gpu_count < 1 or args.train_retries < 0:
        raise SegcoreError("--train-gpu-count must be at least 1 and --train-retries at least 0")
    return Options(
        image=args.image,
        train_accelerator=args.train_gpu,
        train_accelerator_count=args.train_gpu_count,
        train_retries=args.train_retries,
        s3_secret=args.s3_secret,
        mlflow_secret=args.mlflow_secret,
        train_nodes=args.train_nodes,
        train_procs_per_node=args.train_procs_per_node,
        trainer_runtime=args.trainer_runtime,
        train_node_cpu=args.train_node_cpu,
        train_node_memory=args.train_node_memory,
        keep_train_job=args.keep_train_job,
        train_job_timeout_min=args.train_job_timeout,
    )


def _local_options(args: argparse.Namespace):
    from pipelines.segmentation import Options

    return Options(train_nodes=args.train_nodes, train_procs_per_node=args.train_procs_per_node)


def run_compile(args: argparse.Namespace) -> int:
    from pipelines.segmentation import compile_pipeline

    path = compile_pipeline(args.output, options(args))
    print(f"wrote {path} (image {args.image}); upload it in the Kubeflow UI or run 'segcore pipeline submit'")
    return 0


class _StepLog:
    """Step output (kfp.local prints it on stdout) goes to stderr; the last one-line segcore error
    seen is kept for the final message."""

    def __init__(self, stream):
        self.stream, self.last_error, self._line = stream, None, ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if line.strip().startswith("segcore ") and ": error: " in line:
                self.last_error = line.strip()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def run_local(args: argparse.Namespace) -> int:
    from pipelines.run import PipelineFailed
    from pipelines.run import run_local as run

    steps = _StepLog(sys.stderr)
    try:
        with contextlib.redirect_stdout(steps):  # stdout is for the result
            result = run(pipeline_params(args), args.pipeline_root, _local_options(args))
    except PipelineFailed as exc:
        if steps.last_error:
            raise PipelineFailed(f"{exc}; the step said: {steps.last_error}") from None
        raise
    summary = {
        "tasks": result.tasks,
        "seconds": round(result.seconds, 1),
        "fp32_mean_dice": result.outputs.get("fp32_mean_dice"),
        "int8_mean_dice": result.outputs.get("int8_mean_dice"),
        "pipeline_root": str(result.run_dir),
        "reports": {
            "fp32": str(result.run_dir / "validate" / "report"),
            "int8": str(result.run_dir / "validate-2" / "report"),
        },
        "mlflow_tracking_uri": result.tracking_uri,
        "mlflow_experiment": result.experiment,
        "mlflow_parent_run_id": result.outputs.get("mlflow_parent_run_id") or None,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    ok = sum(status == "SUCCEEDED" for status in result.tasks.values())
    print(f"pipeline finished: {ok}/{len(result.tasks)} tasks succeeded in {result.seconds:.0f}s")
    print(f"  FP32 model: val mean Dice {summary['fp32_mean_dice']:.4f}")
    drop = summary["fp32_mean_dice"] - summary["int8_mean_dice"]
    print(f"  INT8 model: val mean Dice {summary['int8_mean_dice']:.4f} (drop {drop:+.4f})")
    print(f"task outputs: {result.run_dir}")
    print(f"  reports: {summary['reports']['fp32']}, {summary['reports']['int8']}")
    if result.tracking_uri:
        print(
            f"MLflow: {result.tracking_uri}, experiment '{result.experiment}', "
            f"parent run {summary['mlflow_parent_run_id']}"
        )
        page = _ui_page(result.tracking_uri, result.experiment)
        if result.tracking_uri.startswith("sqlite:"):
            print(f"  see it: mlflow ui --backend-store-uri {result.tracking_uri}, then open {page}")
        elif page:
            print(f"  see it: {page}")
    else:
        print("MLflow: tracking off")
    return 0


def _ui_page(uri: str, experiment: str) -> str | None:
    """The UI page of the experiment's runs (a local `mlflow ui` for a file store), or None."""
    from mlflow import MlflowClient

    from segcore.tracking import ui_url

    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    try:
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - only a hint
        return None
    return ui_url(base, exp.experiment_id) if exp is not None else None


def run_submit(args: argparse.Namespace) -> int:
    import os

    from pipelines.run import submit
    from segcore.errors import SegcoreError

    params = pipeline_params(args)
    if params["mlflow_experiment"] is None and args.experiment:
        params["mlflow_experiment"] = args.experiment
    compiled = options(args)
    if compiled.distributed and not params.get("checkpoint_uri"):
        raise SegcoreError(
            "--train-nodes x --train-procs-per-node > 1 needs --checkpoint-uri s3://...: the nodes share no disk"
        )
    result = submit(
        args.host,
        params,
        compiled,
        namespace=args.namespace,
        experiment=args.experiment,
        run_name=args.run_name,
        enable_caching=False if args.no_cache else None,
        existing_token=os.environ.get("KF_PIPELINES_TOKEN") or None,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"submitted run '{result['run_name']}' ({result['run_id']}) to {args.host}: {result['url']}")
    return 0
