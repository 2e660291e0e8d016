"""`segcore optimize`: INT8 with NNCF (post-training quantization or quantization-aware training)."""

from __future__ import annotations

import argparse
import json
import sys

from segcore.commands.convert import add_data_arguments, data_source
from segcore.sizes import parse_size

EPILOG = """\
MODEL decides the method unless --mode says otherwise:
  an IR (segcore export output)   -> post-training quantization (nncf.quantize) on --subset-size
                                     training images; with --max-dice-drop, accuracy-controlled
                                     quantization against validation Dice;
  a model bundle (training output) -> quantization-aware training: fake-quantizers, a few epochs
                                     of the training recipe at a low LR, then INT8 export.
Both write OUTPUT/model.xml (INT8 IR) and OUTPUT/report.json (Dice before/after, sizes).

examples:
  segcore optimize Lite-HRNet-18 --load-weights runs/18-ir/model.xml --train-data-root data/camvid --output runs/18-int8
  segcore optimize Lite-HRNet-18 --load-weights runs/18 --train-data-root data/camvid --output runs/18-qat --epochs 3
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.commands.options import add_tracking_arguments
    from segcore.storage import add_storage_arguments

    p = sub.add_parser(
        "optimize",
        help="quantize a model to INT8 with NNCF (PTQ of an IR, or QAT of a bundle)",
        description="Quantize the TEMPLATE model given by --load-weights to an INT8 OpenVINO IR.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("template", help="template ID or name the model was trained from, e.g. Lite-HRNet-18")
    p.add_argument(
        "--load-weights", required=True, metavar="MODEL", help="IR (.xml or its folder) or model bundle folder"
    )
    add_data_arguments(p)
    p.add_argument("--output", required=True, metavar="DIR", help="new folder for the INT8 IR and report")
    p.add_argument("--mode", choices=("ptq", "qat"), help="default: ptq for an IR, qat for a bundle")
    p.add_argument(
        "--max-dice-drop", type=float, metavar="D", help="PTQ: keep layers in FP32 until the Dice drop is at most D"
    )
    p.add_argument("--subset-size", type=int, default=300, help="calibration images (default 300)")
    p.add_argument("--preset", choices=("mixed", "performance"), default="mixed", help="NNCF preset (default mixed)")
    p.add_argument(
        "--range-estimator",
        choices=("quantile", "quantile_minmax", "histogram", "minmax"),  # segcore.optimize.RANGE_ESTIMATORS
        default="quantile",
        help="activation ranges: per-image quantiles averaged over the images (default), the same quantiles' "
        "extremes over the images (OTX 1.x), NNCF's histogram, or plain min/max (fastest to calibrate, least accurate)",
    )
    p.add_argument(
        "--scope",
        choices=("full", "head"),
        default="full",
        help="full (default): quantize the whole network; head: keep the backbone in floating point, as OTX 2.6 "
        "does for Lite-HRNet (safer for Dice, little faster than FP32)",
    )
    p.add_argument("--epochs", type=int, default=2, help="QAT fine-tuning epochs (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, help="QAT batch size (default: the model's training batch size)")
    p.add_argument("--num-workers", type=int, default=2, help="QAT data loading processes (default 2)")
    p.add_argument(
        "--input-size", type=parse_size, metavar="HxW", help="network input size inside the IR (bundle sources)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_tracking_arguments(p)
    add_storage_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.cli import quiet
    from segcore.commands.options import tracking_options
    from segcore.steps import QuantizeOptions, optimize_step

    storage.configure_from_args(args)
    options = QuantizeOptions(
        mode=args.mode,
        max_dice_drop=args.max_dice_drop,
        subset_size=args.subset_size,
        preset=args.preset,
        range_estimator=args.range_estimator,
        scope=args.scope,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        input_size=args.input_size,
        num_workers=args.num_workers,
    )
    progress = not quiet() and sys.stderr.isatty()
    source = data_source(args)
    report = optimize_step(
        args.load_weights,
        args.template,
        source,
        args.output,
        options,
        progress=progress,
        tracking=tracking_options(args),
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['mode'].upper()}: val mean Dice {report['val_mdice_fp32']:.4f} (FP32) -> "
            f"{report['val_mdice_int8']:.4f} (INT8), {report['fp32_ir_bytes'] / 1e6:.2f} MB -> "
            f"{report['int8_ir_bytes'] / 1e6:.2f} MB -> {report['ir']}"
        )
    return 0
