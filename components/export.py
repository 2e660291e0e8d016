"""Pipeline step 4: the trained bundle -> OpenVINO IR (FP32 or FP16) as a Model artifact."""

from kfp.dsl import Input, Model, Output

from components.common import DEFAULT_IMAGE, make_component


def export(
    model: Input[Model],
    ir: Output[Model],
    precision: str = "FP32",
    input_size: str = "",
    tracking: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "segcore",
    mlflow_parent_run_id: str = "",
):
    """OpenVINO IR (model.xml/.bin) taking uint8 RGB images of any size; input_size "" = the training size."""
    from components import common
    from segcore.steps import export_step
    from segcore.tracking import parent_status

    options = common.tracking(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id, "export")
    with parent_status(options):
        report = export_step(model.path, ir.path, precision, common.size(input_size), tracking=options)
    keys = ("precision", "template", "input_size", "labels", "latency_ms")
    ir.metadata.update({"framework": "openvino", "format": "openvino-ir", **{k: report[k] for k in keys}})
    ir.metadata["ir_mb"] = round(report["ir_bytes"] / 1e6, 3)


def component(image: str = DEFAULT_IMAGE):
    return make_component(export, image)


export_op = component()
