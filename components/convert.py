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
    from segcore import storage
    from segcore.steps import DataSource, convert_step
    from segcore.tracking import parent_status, start_parent_run

    storage.configure(s3_endpoint or None)
    source = DataSource(train_data_uri, val_data_uri or None, train_ann_uri or None, val_ann_uri or None,
                        data_format, val_ratio)  # fmt: skip
    options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment)
    parent = start_parent_run(options, mlflow_run_name or "segcore pipeline", source.params())
    options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment, parent, "convert")
    with parent_status(options):
        manifest = convert_step(source, dataset.path, overwrite=True, tracking=options)
    keys = ("format", "labels", "ignore_index", "splits", "label_source", "warnings")
    dataset.metadata.update({k: manifest[k] for k in keys} | {"content_hash": manifest["content_hash"]})
    return namedtuple("Outputs", ["mlflow_parent_run_id"])(parent)


def component(image: str = DEFAULT_IMAGE):
    return make_component(convert, image)


convert_op = component()
