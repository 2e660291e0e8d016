"""`segcore eval` and `segcore predict`: apply a trained model."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from segcore.commands.convert import localize_data
from segcore.errors import SegcoreError
from segcore.tracking import redact


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.storage import add_storage_arguments
    from segcore.tracking import add_tracking_arguments

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
    add_storage_arguments(p)
    p.set_defaults(func=run_predict)


def _canonical(args, workdir: Path, predictor) -> tuple[Path, str]:
    """The test data as a canonical dataset; raw data without label names takes the model's."""
    from segcore.data.convert import MANIFEST, convert
    from segcore.data.meta import LabelSpec

    root = Path(args.test_data_root)
    if (root / MANIFEST).is_file():
        return root, args.split
    target = workdir / "test"
    meta = predictor.meta
    spec = LabelSpec(tuple(meta["labels"]), tuple(tuple(c) for c in meta["colors"]), meta["ignore_index"])
    convert(root, target, train_ann=args.test_ann_files, fmt=args.format, as_split="val", default_spec=spec)
    return target, "val"


def run_eval(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.cli import quiet
    from segcore.data.convert import load_manifest
    from segcore.inference import load_predictor, score
    from segcore.tracking import check_tracking, log_segmentation_report, tracking_run

    storage.configure_from_args(args)
    check_tracking(args)
    model = storage.local_model(args.model)
    predictor = load_predictor(model)
    with tempfile.TemporaryDirectory(prefix="segcore-eval-") as tmp:
        args = localize_data(args, ("test_data_root", "test_ann_files"))
        root, split = _canonical(args, Path(tmp), predictor)
        manifest = load_manifest(root)
        if manifest["labels"] != predictor.labels:
            raise SegcoreError(
                f"labels {manifest['labels']} differ from the model's {predictor.labels}", args.test_data_root
            )
        scores = score(predictor, root, split, progress=not quiet() and sys.stderr.isatty())
        family = model.parent if model.suffix.lower() == ".xml" else model
        with tracking_run(args, "eval", run_name=f"eval {family.name}", bundle=family) as tracker:
            tracker.log_params({"model": redact(args.model), "test_data": redact(args.test_data_root), "split": split})
            tracker.log_metrics(
                {
                    "test_dice": scores["mdice"],
                    "test_miou": scores["miou"],
                    "test_images": scores["num_images"],
                    **{f"test_dice/{k}": v["dice"] for k, v in scores["per_class"].items()},
                }
            )
            log_segmentation_report(tracker, predictor, root, split, scores=scores, prefix="test")
    result = {k: scores[k] for k in ("mdice", "miou", "per_class", "num_images")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['num_images']} images: mean Dice {result['mdice']:.4f}, mean IoU {result['miou']:.4f}")
        for name, s in result["per_class"].items():
            dice = "   n/a" if s["dice"] is None else f"{s['dice']:.4f}"
            iou = "   n/a" if s["iou"] is None else f"{s['iou']:.4f}"
            print(f"  {name:<24} Dice {dice}  IoU {iou}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import cv2

    from segcore import storage
    from segcore.data.dataset import read_rgb
    from segcore.data.sources import IMAGE_EXTENSIONS
    from segcore.inference import load_predictor, overlay

    storage.configure_from_args(args)
    predictor = load_predictor(storage.local_model(args.model))
    source = storage.local_input(args.input)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    elif source.is_file():
        files = [source]
    else:
        raise SegcoreError("does not exist", source)
    if not files:
        raise SegcoreError("no images found", source)
    with storage.local_output(args.output, exist_ok=True) as out:
        out.mkdir(parents=True, exist_ok=True)
        for path in files:
            image = read_rgb(path)
            mask = predictor.predict(image)
            _write_png(out / f"{path.stem}.png", mask)
            if args.overlay:
                blend = overlay(image, mask, predictor.meta["colors"])
                _write_png(out / f"{path.stem}_overlay.png", cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))
    print(f"wrote {len(files)} masks to {storage.display(args.output, out)}")
    return 0


def _write_png(path: Path, array) -> None:
    import os

    import cv2

    tmp = path.with_name(f".{path.name}.tmp.png")
    if not cv2.imwrite(str(tmp), array):
        raise SegcoreError("cannot write", path)
    os.replace(tmp, path)
