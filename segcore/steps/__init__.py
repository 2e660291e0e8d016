"""segcore's steps, one function each: the work plus its record (MLflow, S3). The ``segcore`` CLI
commands and the Kubeflow components are thin adapters around these, so a step's defaults and
its MLflow parameter and metric names are written once, here."""

from segcore.steps.convert import convert_step
from segcore.steps.data import DataSource
from segcore.steps.evaluate import evaluate_step, predict_step
from segcore.steps.export import export_step
from segcore.steps.optimize import QuantizeOptions, optimize_step
from segcore.steps.train import TrainOptions, train_resumable, train_step

__all__ = [
    "DataSource",
    "QuantizeOptions",
    "TrainOptions",
    "convert_step",
    "evaluate_step",
    "export_step",
    "optimize_step",
    "predict_step",
    "train_resumable",
    "train_step",
]
