"""The convert step: a user's dataset (any layout, local or s3://) -> a canonical dataset, recorded
in MLflow (the data source, the content hash, items per split)."""

from __future__ import annotations

from segcore.steps.data import DataSource
from segcore.tracking import TrackingOptions


def convert_step(
    source: DataSource,
    output: str,
    *,
    skip_invalid: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = False,
    tracking: TrackingOptions | None = None,
) -> dict:
    """Check every item and write the canonical dataset to ``output`` (folder or s3:// prefix);
    return the manifest (``output`` as given)."""
    from segcore import storage
    from segcore.data.convert import convert
    from segcore.tracking import tracking_run

    with (
        storage.local_output(output, overwrite=overwrite) as local_out,
        tracking_run(tracking, "convert", run_name="convert") as tracker,
    ):
        local = source.localized()
        manifest = convert(
            local.train_root,
            local_out,
            **local.convert_kwargs(),
            skip_invalid=skip_invalid,
            overwrite=overwrite,
            workers=workers,
            progress=progress,
        )
        log_dataset(tracker, source, manifest)
    manifest["output"] = storage.display(output, manifest["output"])
    return manifest


def log_dataset(tracker, source: DataSource, manifest: dict) -> None:
    """The convert step's MLflow record."""
    params = {**source.params(), "format": manifest["format"], "dataset_hash": manifest["content_hash"]}
    tracker.log_params(params)
    tracker.log_metrics(
        {
            "train_items": manifest["splits"]["train"],
            "val_items": manifest["splits"]["val"],
            "num_classes": len(manifest["labels"]),
        }
    )
    tracker.log_dict({k: v for k, v in manifest.items() if k != "items"}, "dataset/manifest_summary.json")
