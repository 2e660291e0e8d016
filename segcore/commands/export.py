"""`segcore export`: a trained bundle -> OpenVINO IR."""

from __future__ import annotations

import argparse
import json

from segcore.sizes import parse_size

EPILOG = """\
The IR takes one uint8 RGB image (1 x H x W x 3, any H and W) and returns class probabilities at the
image's own size: resizing and normalisation are inside the graph, and rt_info 'model_info' holds
the labels and settings OpenVINO's Model API reads. argmax over axis 1 gives the mask.

example:
  segcore export runs/camvid-18 --output runs/camvid-18-ir
  segcore predict runs/camvid-18-ir/model.xml --input photos/ --output masks/
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.commands.options import add_tracking_arguments
    from segcore.storage import add_storage_arguments

    p = sub.add_parser(
        "export",
        help="export a trained model to OpenVINO IR (FP32 or FP16)",
        description="Write OUTPUT/model.xml + model.bin (and export.json) from a model bundle.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model bundle folder (the training --output), local or s3://")
    p.add_argument("--output", required=True, metavar="DIR", help="new folder (or s3://bucket/prefix) for the IR")
    p.add_argument("--precision", default="FP32", choices=("FP32", "FP16"), help="weight precision (default FP32)")
    p.add_argument(
        "--input-size",
        type=parse_size,
        metavar="HxW",
        help="network input size inside the IR (default: the size the model was trained at)",
    )
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    add_tracking_arguments(p)
    add_storage_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.commands.options import tracking_options
    from segcore.steps import export_step

    storage.configure_from_args(args)
    report = export_step(args.model, args.output, args.precision, args.input_size, tracking=tracking_options(args))
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['template']} -> {report['ir']} ({report['precision']}, network input "
            f"{report['input_size'][0]}x{report['input_size'][1]}, {report['ir_bytes'] / 1e6:.2f} MB, "
            f"{report['latency_ms']:.1f} ms per image here)"
        )
    return 0
