"""Pipeline steps 3 and 6: score a model (PyTorch bundle or OpenVINO IR, FP32 or INT8) on the
validation split -> Metrics (mean Dice, mIoU, latency), ClassificationMetrics (confusion matrix)
and an HTML report (per-class Dice, overlays)."""

from typing import NamedTuple

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE, make_component


def validate(
    model: Input[Model],
    dataset: Input[Dataset],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    report: Output[HTML],
    label: str = "fp32",
    min_dice: float = 0.0,
    reference_dice: float = -1.0,
    num_overlays: int = 4,
    finish_pipeline_run: bool = False,
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
) -> NamedTuple("Outputs", [("mean_dice", float), ("mean_iou", float)]):
    """Dice and IoU (mean and per class) on the dataset's val split, each image at its own size.

    label names the model in the run and the parent's metrics ("fp32", "int8"); min_dice > 0 fails
    the step below it (a quality gate); reference_dice >= 0: the mean Dice of the model this one was
    made from (the INT8 step gets the FP32 step's), and the step also reports ``dice_drop`` =
    reference_dice - mean Dice; finish_pipeline_run: this is the last step (it marks the MLflow
    parent run finished)."""
    from collections import namedtuple

    from components import common
    from segcore.steps import evaluate_step
    from segcore.tracking import parent_status, update_parent

    options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id)
    with parent_status(options):
        scores = evaluate_step(
            model.path, dataset.path, split="val", html=report.path, overlays=num_overlays,
            run_name=f"validate {label}", tags={"segcore.model": label}, tracking=options,
        )  # fmt: skip
        parent = {f"{label}_val_dice": scores["mdice"], f"{label}_latency_ms": scores["latency_ms"]}
        if reference_dice >= 0:
            parent[f"{label}_dice_drop"] = reference_dice - scores["mdice"]
        update_parent(options, metrics=parent)
        if scores["mdice"] < min_dice:
            raise ValueError(f"mean Dice {scores['mdice']:.4f} is below the required {min_dice:.4f}")
    summary = {"mean_dice": scores["mdice"], "mean_iou": scores["miou"], "latency_ms": scores["latency_ms"],
               "num_images": scores["num_images"]}  # fmt: skip
    if reference_dice >= 0:
        summary["dice_drop"] = reference_dice - scores["mdice"]
    summary.update({f"dice_{k}": v["dice"] for k, v in scores["per_class"].items() if v["dice"] is not None})
    for name, value in summary.items():
        metrics.log_metric(name, value)
    labels = list(scores["per_class"])
    confusion_matrix.log_confusion_matrix(labels, [[int(v) for v in row] for row in scores["confusion_matrix"]])
    if finish_pipeline_run:
        update_parent(options, status="FINISHED")
    return namedtuple("Outputs", ["mean_dice", "mean_iou"])(float(scores["mdice"]), float(scores["miou"]))


def component(image: str = DEFAULT_IMAGE):
    return make_component(validate, image)


validate_op = component()
