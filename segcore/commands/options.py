"""Command-line options shared by several commands (argparse only; the work is elsewhere)."""

from __future__ import annotations

import argparse

from segcore.tracking import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    ENV_PARENT,
    ENV_SWITCH,
    ENV_SYSTEM_METRICS,
    TrackingOptions,
)


def epochs(text: str) -> int:
    """An argparse type: a number of epochs, 0 or more (patience, ramp-up)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: give 0 or more epochs")
    return value


DEVICE_HELP = "where a PyTorch bundle runs: cpu (default), auto, cuda, cuda:N (an IR runs on OpenVINO's CPU)"


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tracking (MLflow)")
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        help=f"MLflow tracking server or store (default: MLFLOW_TRACKING_URI, else {DEFAULT_URI})",
    )
    g.add_argument(
        "--experiment",
        metavar="NAME",
        help=f"MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID, else '{DEFAULT_EXPERIMENT}')",
    )
    g.add_argument("--run-name", metavar="NAME", help="MLflow run name (default: the step and template)")
    g.add_argument(
        "--parent-run-id",
        metavar="ID",
        help=f"log as a nested run of this MLflow run, e.g. the pipeline run's (default: {ENV_PARENT})",
    )
    g.add_argument("--no-tracking", action="store_true", help=f"log nothing to MLflow (also: {ENV_SWITCH}=off)")
    g.add_argument(
        "--no-system-metrics",
        action="store_true",
        help=f"do not sample CPU, memory, disk, network and GPU use into a training's run "
        f"(also: {ENV_SYSTEM_METRICS}=off)",
    )


def tracking_options(args: argparse.Namespace) -> TrackingOptions:
    return TrackingOptions(
        no_tracking=bool(getattr(args, "no_tracking", False)),
        tracking_uri=getattr(args, "tracking_uri", None),
        experiment=getattr(args, "experiment", None),
        run_name=getattr(args, "run_name", None),
        parent_run_id=getattr(args, "parent_run_id", None),
        no_system_metrics=bool(getattr(args, "no_system_metrics", False)),
    )
