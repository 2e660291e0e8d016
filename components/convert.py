"""Pipeline step 1: raw data (local path or s3://, any format segcore reads) -> canonical Dataset.

It also starts the pipeline's MLflow parent run and hands its id to the other steps."""

from typing import NamedTuple

from kfp.dsl import Dataset, Output

from components.common import DEFAULT_IMAGE, make_component


def convert(
    train_data_uri: str,
    dataset: Output[Dataset],
    val_data_uri: str = "",
    train_ann_uri: str = "",
    val_ann_uri: str = "",
    data_format: str = "auto",
    val_ratio: float = 0.2,
    s3_endpoint: str = "",
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_run_name: str = "",
) -> NamedTuple("Outputs", [("mlflow_parent_run_id", str)]):
    """Check every image and mask and write the canonical dataset (images, index masks, manifest.json)."""
    from collections import namedtuple

    from components import common
    from segcore.tracking import redact

    params = {
        "train_data_uri": train_data_uri,
        "val_data_uri": val_data_uri,
        "train_ann_uri": train_ann_uri,
        "val_ann_uri": val_ann_uri,
        "data_format": data_format,
        "val_ratio": val_ratio,
    }
    params = {k: redact(str(v)) for k, v in params.items() if v != ""}
    pipeline_args = common.tracking_args(tracking, mlflow_tracking_uri, mlflow_experiment)
    parent = common.start_parent_run(pipeline_args, mlflow_run_name or "segcore pipeline", params)
    args = common.tracking_args(tracking, mlflow_tracking_uri, mlflow_experiment, parent, "convert")
    argv = ["convert", "--train-data-root", train_data_uri, "--output", dataset.path, "--overwrite"]
    argv += common.flags(
        {
            "--val-data-root": val_data_uri,
            "--train-ann-files": train_ann_uri,
            "--val-ann-files": val_ann_uri,
            "--format": data_format,
            "--val-ratio": val_ratio,
            "--s3-endpoint": s3_endpoint,
        }
    )
    with common.step_run(args, "convert") as tracker:
        common.run_cli(argv)
        manifest = common.read_json(f"{dataset.path}/manifest.json")
        tracker.log_params({**params, "dataset_hash": manifest["content_hash"], "format": manifest["format"]})
        tracker.log_metrics(
            {
                "train_items": manifest["splits"]["train"],
                "val_items": manifest["splits"]["val"],
                "num_classes": len(manifest["labels"]),
            }
        )
        tracker.log_dict({k: v for k, v in manifest.items() if k != "items"}, "dataset/manifest_summary.json")
    dataset.metadata.update(
        {
            "format": manifest["format"],
            "labels": manifest["labels"],
            "ignore_index": manifest["ignore_index"],
            "splits": manifest["splits"],
            "content_hash": manifest["content_hash"],
        }
    )
    return namedtuple("Outputs", ["mlflow_parent_run_id"])(parent)


def component(image: str = DEFAULT_IMAGE):
    return make_component(convert, image)


convert_op = component()
