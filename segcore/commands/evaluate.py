"""`segcore eval` and `segcore predict`: apply a trained model."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.commands.options import DEVICE_HELP, add_tracking_arguments
    from segcore.storage import add_storage_arguments

    p = sub.add_parser(
        "eval",
        help="score a model on labelled data (Dice and IoU, mean and per class)",
        description="Predict every image of the test data, resize the prediction to the mask's own "
        "size and score over all pixels of the split (ignore index excluded).",
    )
    p.add_argument("model", help="model bundle folder (the training --output) or OpenVINO IR (.xml or its folder)")
    p.add_argument(
        "--test-data-root", required=True, metavar="PATH", help="images folder, dataset root or canonical dataset"
    )
    p.add_argument("--test-ann-files", metavar="PATH", help="masks folder (plain layout)")
    p.add_argument("--format", default="auto", help="dataset format (default: detect)")
    p.add_argument("--split", default="val", help="split of a canonical dataset to score (default val)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", metavar="DEV", help=DEVICE_HELP)
    add_tracking_arguments(p)
    add_storage_arguments(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser(
        "predict",
        help="write index masks (and overlays) for images",
        description="Write one uint8 index-mask PNG per input image, same stem, original size.",
    )
    p.add_argument("model", help="model bundle folder (the training --output) or OpenVINO IR (.xml or its folder)")
    p.add_argument("--input", required=True, metavar="FILE_OR_DIR", help="an image or a folder of images")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the masks")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays (<stem>_overlay.png)")
    p.add_argument("--device", metavar="DEV", help=DEVICE_HELP)
    add_storage_arguments(p)
    p.set_defaults(func=run_predict)


def run_eval(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.cli import quiet
    from segcore.commands.options import tracking_options
    from segcore.steps import evaluate_step

    storage.configure_from_args(args)
    scores = evaluate_step(
        args.model,
        args.test_data_root,
        test_ann=args.test_ann_files,
        fmt=args.format,
        split=args.split,
        progress=not quiet() and sys.stderr.isatty(),
        tracking=tracking_options(args),
        device=args.device,
    )
    result = {k: scores[k] for k in ("mdice", "miou", "per_class", "num_images", "latency_ms")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['num_images']} images: mean Dice {result['mdice']:.4f}, mean IoU {result['miou']:.4f}")
    for name, s in result["per_class"].items():
        dice = "   n/a" if s["dice"] is None else f"{s['dice']:.4f}"
        iou = "   n/a" if s["iou"] is None else f"{s['iou']:.4f}"
        print(f"  {name:<24} Dice {dice}  IoU {iou}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.steps import predict_step

    storage.configure_from_args(args)
    count = predict_step(args.model, args.input, args.output, overlays=args.overlay, device=args.device)
    print(f"wrote {count} masks to {args.output}")
    return 0
