"""Pipeline step 5: INT8 with NNCF -> an INT8 OpenVINO IR (Model) and Metrics (Dice and size
before/after). PTQ quantizes the FP32 IR; QAT fine-tunes the PyTorch bundle with fake-quantizers."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE, make_component


def quantize(
    template: str,
    ir: Input[Model],
    model: Input[Model],
    dataset: Input[Dataset],
    int8_ir: Output[Model],
    metrics: Output[Metrics],
    mode: str = "ptq",
    max_dice_drop: float = 0.0,
    subset_size: int = 300,
    qat_epochs: int = 2,
    num_workers: int = 2,
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
):
    """mode "ptq" (post-training, of the FP32 IR; max_dice_drop > 0: accuracy-controlled) or "qat"
    (quantization-aware training of the bundle for qat_epochs); subset_size calibration images."""
    from components import common
    from segcore.optimize import optimize

    if mode not in ("ptq", "qat"):
        raise ValueError(f"quantization mode must be 'ptq' or 'qat', not {mode!r}")
    args = common.tracking_args(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id, "quantize")
    source = ir.path if mode == "ptq" else model.path
    with common.step_run(args, "quantize", bundle=model.path, tags={"segcore.quantization": mode}) as tracker:
        with common.stdout_to_stderr():
            report = optimize(
                source,
                template,
                dataset.path,
                int8_ir.path,
                mode=mode,
                max_dice_drop=max_dice_drop or None,
                subset_size=subset_size,
                epochs=qat_epochs,
                num_workers=num_workers,
            )
        tracker.log_params(
            {
                "mode": mode,
                "max_dice_drop": max_dice_drop or None,
                "subset_size": subset_size,
                "calibration_images": report["calibration_images"],
                "preset": report["preset"],
            }
        )
        numbers = {
            "val_dice_fp32": report["val_mdice_fp32"],
            "val_dice_int8": report["val_mdice_int8"],
            "dice_drop": report["dice_drop"],
            "fp32_mb": report["fp32_ir_bytes"] / 1e6,
            "int8_mb": report["int8_ir_bytes"] / 1e6,
        }
        numbers.update({k: report[k] for k in ("latency_ms_fp32", "latency_ms_int8") if report.get(k) is not None})
        tracker.log_metrics(numbers)
        tracker.log_artifacts(int8_ir.path, "int8_ir")
    for name, value in numbers.items():
        metrics.log_metric(name, round(float(value), 6))
    metrics.log_metric("compression", round(report["fp32_ir_bytes"] / report["int8_ir_bytes"], 3))
    int8_ir.metadata.update(
        {
            "framework": "openvino",
            "format": "openvino-ir",
            "precision": "INT8",
            "quantization": mode,
            "template": report["template"],
            "int8_mb": round(report["int8_ir_bytes"] / 1e6, 3),
        }
    )


def component(image: str = DEFAULT_IMAGE):
    return make_component(quantize, image)


quantize_op = component()
