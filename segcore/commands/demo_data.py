"""`segcore demo-data`: write a small synthetic dataset to try segcore without downloading data."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.sizes import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.data.synthetic import LAYOUTS
    from segcore.storage import add_storage_arguments

    p = sub.add_parser(
        "demo-data",
        help="write a small synthetic segmentation dataset (any supported layout)",
        description="Generate images with coloured shapes and exact masks, in one of the layouts "
        "segcore reads, so every command can be tried without downloading data.",
    )
    p.add_argument(
        "--output", required=True, metavar="DIR", help="folder (or s3://bucket/prefix) to write; must not exist"
    )
    p.add_argument("--layout", default="plain", choices=LAYOUTS, help="dataset layout (default plain)")
    p.add_argument("--num-train", type=int, default=32, help="training items (default 32)")
    p.add_argument("--num-val", type=int, default=8, help="validation items (default 8)")
    p.add_argument("--size", type=parse_size, default=(96, 128), metavar="HxW", help="image size (default 96x128)")
    p.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_storage_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcore import storage

    if args.classes < 2 or args.num_train < 1 or args.num_val < 0:
        raise SegcoreError("need --classes >= 2, --num-train >= 1 and --num-val >= 0")
    storage.configure_from_args(args)
    with storage.local_output(args.output, overwrite=args.overwrite) as out:
        flags = _write(args, out).replace(str(out), args.output)
    print(f"wrote {args.layout} demo dataset ({args.num_train} train / {args.num_val} val) to {args.output}")
    print(f"next: segcore convert {flags} --output DIR")
    return 0


def _write(args: argparse.Namespace, out: Path) -> str:
    """Generate into ``out`` (via a temporary folder renamed when complete); the convert flags."""
    from segcore.data.synthetic import generate

    if out.exists():
        if not args.overwrite:
            raise SegcoreError("output already exists; give a new folder or --overwrite", out)
        shutil.rmtree(out)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        gen = generate(
            tmp,
            args.layout,
            num_train=args.num_train,
            num_val=args.num_val,
            size=args.size,
            num_classes=args.classes,
            seed=args.seed,
        )
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return " ".join(gen.cli_args()).replace(str(tmp), str(out))
