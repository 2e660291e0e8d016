"""`segcore pretrain`: self-supervised pretraining of a template's backbone on unlabelled images."""

from __future__ import annotations

import argparse
import json
import sys

from segcore.sizes import parse_size

EPILOG = """\
The method is DetCon (BYOL-style online and target networks, contrastive loss per unsupervised
image segment), OTX 1.x's choice. Experimental: on CamVid with 46 masks the pretrained backbone
started far faster but ended below training from random weights (docs/benchmarks.md). --data-root and
--output may be s3://bucket/prefix (the output is uploaded after every epoch, so --resume continues
from S3). The output's backbone is what 'segcore train --load-weights OUTPUT' starts from.
The run is tracked in MLflow like a training (parameters, per-epoch loss and match accuracy).

examples:
  segcore pretrain Lite-HRNet-s-mod2 --data-root data/photos --output runs/pretrained
  segcore train Lite-HRNet-s-mod2 --train-data-root data/labelled --load-weights runs/pretrained --output runs/fine
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.commands.options import add_tracking_arguments
    from segcore.storage import add_storage_arguments

    p = sub.add_parser(
        "pretrain",
        help="pretrain a template's backbone on unlabelled images (self-supervised)",
        description="Pretrain TEMPLATE's backbone on the images under --data-root (no masks needed) and write "
        "weights that 'segcore train --load-weights' takes to --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("template", help="template ID or name, e.g. Lite-HRNet-s-mod2")
    p.add_argument(
        "--data-root", required=True, metavar="DIR", help="a folder of images (any nesting), or s3://bucket/prefix"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output folder or s3://bucket/prefix")
    p.add_argument("--epochs", type=int, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, help="images per step, two views each (default 16)")
    p.add_argument("--input-size", type=parse_size, metavar="HxW", help="size of each view (default 224x224)")
    p.add_argument("--lr", type=float, help="Adam learning rate, 1 epoch warm-up then cosine decay (default 1e-3)")
    p.add_argument("--seed", type=int, help="random seed (default 42)")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="forward-pass autocast, as in 'segcore train' (default auto)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt after a crash or kill")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON at the end")
    add_tracking_arguments(p)
    add_storage_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcore import storage
    from segcore.cli import quiet
    from segcore.commands.options import tracking_options
    from segcore.steps.pretrain import PretrainOptions, pretrain_step

    storage.configure_from_args(args)
    options = PretrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        input_size=args.input_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
    )
    meta = pretrain_step(
        args.template,
        args.data_root,
        args.output,
        options,
        resume=args.resume,
        progress=not quiet() and sys.stderr.isatty(),
        tracking=tracking_options(args),
    )
    if args.json:
        print(json.dumps(meta))
    else:
        print(
            f"{meta['template_name']}: pretrained on {meta['images']} images for {meta['epochs_run']} epochs "
            f"({meta['pretrain_seconds'] / 60:.1f} min, final loss {meta['final_loss']:.3f}) -> {args.output}"
        )
    return 0
