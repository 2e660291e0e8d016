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
    from segcore.steps import DataSource, QuantizeOptions, optimize_step
    from segcore.tracking import parent_status

    if mode not in ("ptq", "qat"):
        raise ValueError(f"quantization mode must be 'ptq' or 'qat', not {mode!r}")
    options = QuantizeOptions(mode, max_dice_drop or None, subset_size, epochs=qat_epochs, num_workers=num_workers)
    tracking_options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id)
    source = ir.path if mode == "ptq" else model.path
    with parent_status(tracking_options):
        report = optimize_step(source, template, DataSource(dataset.path), int8_ir.path, options,
                               tracking=tracking_options)  # fmt: skip
    numbers = {"val_dice_fp32": report["val_mdice_fp32"], "val_dice_int8": report["val_mdice_int8"],
               "dice_drop": report["dice_drop"], "fp32_mb": report["fp32_ir_bytes"] / 1e6,
               "int8_mb": report["int8_ir_bytes"] / 1e6, "latency_ms_fp32": report["latency_ms_fp32"],
               "latency_ms_int8": report["latency_ms_int8"],
               "compression": report["fp32_ir_bytes"] / report["int8_ir_bytes"]}  # fmt: skip
    for name, value in numbers.items():
        metrics.log_metric(name, round(float(value), 6))
    int8_ir.metadata.update({"framework": "openvino", "format": "openvino-ir", "precision": "INT8",
                             "quantization": mode, "template": report["template"],
                             "int8_mb": round(report["int8_ir_bytes"] / 1e6, 3)})  # fmt: skip


def component(image: str = DEFAULT_IMAGE):
    return make_component(quantize, image)


quantize_op = component()
