"""The export step: a trained bundle -> OpenVINO IR, with its size and latency in MLflow."""

from __future__ import annotations

from pathlib import Path

from segcore.tracking import TrackingOptions


def export_step(
    model: str,
    output: str,
    precision: str = "FP32",
    input_size: tuple[int, int] | None = None,
    *,
    tracking: TrackingOptions | None = None,
) -> dict:
    """Write ``output``/model.xml (+ .bin, export.json) from a bundle (local or s3://); return the
    report: template, precision, input_size, labels, ir (as given for s3://), ir_bytes, latency_ms."""
    from segcore import storage
    from segcore.export import IR_NAME, check_new_output, export_bundle
    from segcore.tracking import check_tracking, redact, tracking_run

    if not storage.is_s3(output):
        check_new_output(Path(output))
    check_tracking(tracking)
    bundle = storage.local_model(model)
    with (
        storage.local_output(output) as local_out,
        tracking_run(tracking, "export", run_name=f"export {precision}", bundle=bundle) as tracker,
    ):
        report = export_bundle(bundle, local_out, precision, input_size)
        report["source"] = model
        report["latency_ms"] = _latency(report["ir"], report["input_size"])
        tracker.log_params(
            {"model": redact(model), "precision": precision, "input_size": "x".join(map(str, report["input_size"]))}
        )
        tracker.log_metrics({"ir_mb": report["ir_bytes"] / 1e6, "latency_ms": report["latency_ms"]})
        tracker.log_artifacts(local_out, "ir")
        tracker.write_run_file(local_out)
        if storage.is_s3(output):
            report["ir"] = f"{output.rstrip('/')}/{IR_NAME}"
    return report


def _latency(xml: str, size) -> float:
    """Latency of the IR on a synthetic image of the network's input size (an export has no data)."""
    import numpy as np

    from segcore.inference import OpenVINOPredictor
    from segcore.scoring import measure_latency

    image = np.random.default_rng(0).integers(0, 256, (int(size[0]), int(size[1]), 3), dtype=np.uint8)
    return round(measure_latency(OpenVINOPredictor(xml).predict, [image], repeats=10), 3)
