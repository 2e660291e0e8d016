"""`segcore convert`: check a user dataset and write the canonical dataset."""

from __future__ import annotations

import argparse
import json
import sys

from segcore.data.sources import SUPPORTED_FORMATS

EPILOG = """\
layouts:
  one root with images/{train,val}/ and annotations/{train,val}/ (same file names);
  separate folders: --train-data-root IMAGES --train-ann-files MASKS [--val-data-root
  IMAGES --val-ann-files MASKS]; or a dataset Datumaro reads: ade20k2017, ade20k2020,
  cityscapes, voc, common_semantic_segmentation, camvid (detected automatically).
  A dataset_meta.json beside the data gives label names, colours and ignore_index.
  Without one, mask values are class ids (255 = ignore), except masks holding only 0 and 255:
  those are binary (0 = background, 255 = foreground). A Datumaro dataset without split folders
  is training data. Mask conventions and refusals: docs/data.md.

Any path may be s3://bucket/prefix (endpoint: --s3-endpoint or AWS_ENDPOINT_URL; credentials from
the environment or AWS config).

examples:
  segcore convert --train-data-root data/camvid --output data/camvid-seg
  segcore convert --train-data-root s3://raw/camvid --output s3://datasets/camvid-seg
  segcore convert --train-data-root imgs/ --train-ann-files masks/ --output out/ --val-ratio 0.1
"""


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The data flags shared by convert, train and optimize (the reference CLI's names)."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--train-data-root", required=required, metavar="PATH", help="training images folder, or the dataset root"
    )
    g.add_argument("--val-data-root", metavar="PATH", help="validation images folder or dataset root")
    g.add_argument("--train-ann-files", metavar="PATH", help="training masks folder (plain layout)")
    g.add_argument("--val-ann-files", metavar="PATH", help="validation masks folder (plain layout)")
    g.add_argument(
        "--format", default="auto", choices=("auto", *SUPPORTED_FORMATS), help="dataset format (default: detect)"
    )
    g.add_argument(
        "--val-ratio",
        type=float,
        default=0.2,
        help="share of train moved to val when no validation split is given (default 0.2)",
    )
    g.add_argument("--split-seed", type=int, default=42, help="seed of that split (default 42)")


def data_source(args: argparse.Namespace):
    """The shared data flags as the steps' ``DataSource``."""
    from segcore.steps import DataSource

    return DataSource(
        train_root=args.train_data_root,
        val_root=args.val_data_root,
        train_ann=args.train_ann_files,
        val_ann=args.val_ann_files,
        fmt=args.format,
        val_ratio=args.val_ratio,
        split_seed=args.split_seed,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.commands.options import add_tracking_arguments
    from segcore.storage import add_storage_arguments

    p = sub.add_parser(
        "convert",
        help="check a dataset and write segcore's canonical dataset",
        description="Detect the dataset format, check every image and mask (decodable, same size, "
        "known labels, paired), and write images + uint8 index masks + manifest.json to --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(p)
    p.add_argument(
        "--output", required=True, metavar="DIR", help="new folder (or s3://bucket/prefix) for the canonical dataset"
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="drop bad items (listed in OUTPUT/report.json) instead of stopping"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (after success)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: 2 x CPUs, max 8)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    add_tracking_arguments(p)
    add_storage_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.cli import quiet
    from segcore.commands.options import tracking_options
    from segcore.steps import convert_step

    storage.configure_from_args(args)
    manifest = convert_step(
        data_source(args),
        args.output,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not quiet() and sys.stderr.isatty(),
        tracking=tracking_options(args),
    )
    keys = ("format", "labels", "ignore_index", "splits", "label_source", "warnings", "output")
    if args.json:
        print(json.dumps({k: manifest[k] for k in keys}))
    else:
        s = manifest["splits"]
        print(
            f"{manifest['format']}: {len(manifest['labels'])} labels, {s['train']} train / {s['val']} val "
            f"items, ignore index {manifest['ignore_index']}, {manifest['skipped']} skipped, "
            f"{manifest['seconds']:.1f}s -> {manifest['output']}"
        )
    return 0
