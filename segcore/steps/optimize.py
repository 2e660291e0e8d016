"""The optimize step: INT8 with NNCF (PTQ of an IR, QAT of a bundle), Dice and sizes before and
after recorded in MLflow."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.steps.data import DataSource
from segcore.tracking import TrackingOptions


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str | None = None  # None: ptq for an IR, qat for a bundle
    max_dice_drop: float | None = None
    subset_size: int = 300
    preset: str = "mixed"
    range_estimator: str = "quantile"
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int | None = None
    input_size: tuple[int, int] | None = None
    num_workers: int = 2
    scope: str = "full"  # full: the whole network in INT8; head: the backbone stays float (OTX 2.6)


def optimize_step(
    model: str,
    template: str,
    source: DataSource,
    output: str,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    progress: bool = False,
    tracking: TrackingOptions | None = None,
) -> dict:
    """Quantize ``model`` (IR or bundle, local or s3://) to ``output``/model.xml + report.json;
    return the report (``ir`` as given for s3://)."""
    from segcore import storage
    from segcore.data.convert import load_manifest
    from segcore.export import IR_NAME, check_new_output
    from segcore.optimize import optimize
    from segcore.tracking import check_tracking, tracking_run

    if options.subset_size < 1:
        raise SegcoreError("--subset-size must be at least 1")
    if not storage.is_s3(output):
        check_new_output(Path(output))
    check_tracking(tracking)
    local_model = storage.local_model(model)
    local = source.localized()
    family = local_model.parent if local_model.suffix.lower() == ".xml" else local_model
    # NNCF and OpenVINO draw progress on stdout; keep stdout for the result (--json).
    with (
        tempfile.TemporaryDirectory(prefix="segcore-optimize-data-") as tmp,
        contextlib.redirect_stdout(sys.stderr),
        storage.local_output(output) as local_out,
        tracking_run(
            tracking,
            "optimize",
            run_name=f"optimize {options.mode or 'auto'}",
            bundle=family,
            tags={"segcore.quantization": options.mode or "auto"},
        ) as tracker,
    ):
        dataset = local.canonical(Path(tmp) / "dataset")
        settings = {k: v for k, v in asdict(options).items() if k != "mode"}
        report = optimize(local_model, template, dataset, local_out, mode=options.mode, progress=progress, **settings)
        report["source"] = model
        tracker.log_params(optimize_params(model, source, report, options))
        tracker.log_dataset(load_manifest(dataset), source.train_root, "train")  # calibration data
        tracker.log_metrics(optimize_metrics(report))
        tracker.log_artifact(local_out / "report.json")
        tracker.log_artifacts(local_out, "int8_ir")
        tracker.write_run_file(local_out)
        if storage.is_s3(output):
            report["ir"] = f"{output.rstrip('/')}/{IR_NAME}"
    return report


def optimize_params(model: str, source: DataSource, report: dict, options: QuantizeOptions) -> dict:
    from segcore.tracking import redact

    keys = ("template", "mode", "scope", "preset", "range_estimator", "calibration_images", "max_dice_drop")
    return {
        "model": redact(model),
        **{k: report[k] for k in keys},
        "subset_size": options.subset_size,
        "train_data": redact(source.train_root),
    }


def optimize_metrics(report: dict) -> dict:
    """The optimize step's MLflow metrics."""
    return {
        "val_dice_fp32": report["val_mdice_fp32"],
        "val_dice_int8": report["val_mdice_int8"],
        "dice_drop": report["dice_drop"],
        "fp32_ir_mb": report["fp32_ir_bytes"] / 1e6,
        "int8_ir_mb": report["int8_ir_bytes"] / 1e6,
        "latency_ms_fp32": report["latency_ms_fp32"],
        "latency_ms_int8": report["latency_ms_int8"],
        "quantized_layers": report["quantized_layers"],
    }
