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
    from segcore.commands.demo_data import parse_size
    from segcore.export import export_bundle

    args = common.tracking_args(tracking, mlflow_tracking_uri, mlflow_experiment, mlflow_parent_run_id, "export")
    size = parse_size(input_size) if input_size else None
    with common.step_run(args, "export", bundle=model.path) as tracker:
        report = export_bundle(model.path, ir.path, precision, size)
        tracker.log_params({"precision": precision, "input_size": "x".join(map(str, report["input_size"]))})
        tracker.log_metrics({"ir_mb": report["ir_bytes"] / 1e6})
        tracker.log_artifacts(ir.path, "ir")
    ir.metadata.update(
        {
            "framework": "openvino",
            "format": "openvino-ir",
            "precision": precision,
            "template": report["template"],
            "input_size": report["input_size"],
            "labels": report["labels"],
            "ir_mb": round(report["ir_bytes"] / 1e6, 3),
        }
    )


def component(image: str = DEFAULT_IMAGE):
    return make_component(export, image)


export_op = component()
