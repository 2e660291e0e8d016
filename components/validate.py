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
    num_overlays: int = 4,
    finish_pipeline_run: bool = False,
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
) -> NamedTuple("Outputs", [("mean_dice", float), ("mean_iou", float)]):
    """Dice and IoU (mean and per class) on the dataset's val split, each image at its own size.

    label names the model in metric names ("fp32", "int8"); min_dice > 0 fails the step below it
    (a quality gate before export); finish_pipeline_run: this is the last step (it marks the
    MLflow parent run finished)."""
    from collections import namedtuple
    from pathlib import Path

    from components import common
    from segcore.data.convert import load_manifest
    from segcore.data.dataset import read_mask, read_rgb
    from segcore.inference import load_predictor, score
    from segcore.tracking import log_segmentation_report

    args = common.tracking_args(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id, "validate")
    args.run_name = f"validate {label}"
    bundle = model.path if Path(model.path, "tracking.json").is_file() else None
    with common.step_run(args, "validate", bundle=bundle, tags={"segcore.model": label}) as tracker:
        predictor = load_predictor(model.path)
        manifest = load_manifest(dataset.path)
        if manifest["labels"] != predictor.labels:
            raise ValueError(f"dataset labels {manifest['labels']} differ from the model's {predictor.labels}")
        scores = score(predictor, dataset.path, "val")
        items = manifest["items"]["val"]
        images = [read_rgb(Path(dataset.path, item["image"])) for item in items[:8]]
        latency = common.measure_latency(predictor.predict, images)
        panels = []
        for item, image in zip(items[:num_overlays], images, strict=False):
            truth = read_mask(Path(dataset.path, item["mask"]))
            panel = common.overlay_panel(
                image, truth, predictor.predict(image), predictor.meta["colors"], manifest["ignore_index"]
            )
            panels.append((item["id"], common.png_base64(panel)))

        per_class = {name: s["dice"] for name, s in scores["per_class"].items()}
        summary = {
            "mean_dice": scores["mdice"],
            "mean_iou": scores["miou"],
            "latency_ms": round(latency, 3),
            "num_images": scores["num_images"],
        }
        metrics.log_metric("mean_dice", float(scores["mdice"]))
        metrics.log_metric("mean_iou", float(scores["miou"]))
        metrics.log_metric("latency_ms", round(float(latency), 3))
        metrics.log_metric("num_images", int(scores["num_images"]))
        for name, dice in per_class.items():
            if dice is not None:
                metrics.log_metric(f"dice_{name}", float(dice))
        confusion_matrix.log_confusion_matrix(
            list(predictor.labels), [[int(v) for v in row] for row in scores["confusion_matrix"]]
        )
        title = f"{label.upper()} model: mean Dice {scores['mdice']:.4f} on {scores['num_images']} val images"
        info = {
            "model": label,
            "template": predictor.meta.get("template"),
            "precision": predictor.meta.get("precision", "FP32"),
            **summary,
        }
        Path(report.path).parent.mkdir(parents=True, exist_ok=True)
        Path(report.path).write_text(common.html_report(title, scores, info, panels, predictor.meta["colors"]))

        tracker.log_params({"model": label, "model_path": model.uri, "min_dice": min_dice})
        tracker.log_metrics(
            {
                "val_dice": scores["mdice"],
                "val_miou": scores["miou"],
                "latency_ms": latency,
                **{f"val_dice/{k}": v for k, v in per_class.items()},
            }
        )
        tracker.log_artifact(report.path, "report")
        log_segmentation_report(tracker, predictor, dataset.path, "val", scores=scores, prefix=label)
        common.update_parent(args, metrics={f"{label}_val_dice": scores["mdice"], f"{label}_latency_ms": latency})
        if scores["mdice"] < min_dice:
            raise ValueError(f"mean Dice {scores['mdice']:.4f} is below the required {min_dice:.4f}")
    if finish_pipeline_run:
        common.update_parent(args, status="FINISHED")
    return namedtuple("Outputs", ["mean_dice", "mean_iou"])(float(scores["mdice"]), float(scores["miou"]))


def component(image: str = DEFAULT_IMAGE):
    return make_component(validate, image)


validate_op = component()
