"""`segcore train`: train a Lite-HRNet template with the reference recipe."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from segcore.commands.convert import add_data_arguments, data_kwargs
from segcore.commands.demo_data import parse_size

log = logging.getLogger(__name__)

EPILOG = """\
The data flags take a raw dataset (any layout 'segcore convert' reads; it is converted into
OUTPUT/dataset first) or a canonical dataset written by 'segcore convert'.
Defaults come from the template: input 512x512, batch 8, Adam lr 1e-3, 300 epochs with early
stopping. A killed run continues with the same command plus --resume.

example:
  segcore train Lite-HRNet-18 --train-data-root data/camvid --output runs/camvid-18 --epochs 20
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a Lite-HRNet template on a dataset",
        description="Train TEMPLATE (ID or name, see 'segcore templates') and write a model bundle, "
        "checkpoints and per-epoch metrics to --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("template", help="template ID or name, e.g. Lite-HRNet-18")
    add_data_arguments(p)
    p.add_argument("--output", required=True, metavar="DIR", help="training output folder (the model bundle)")
    p.add_argument("--epochs", type=int, help="maximum epochs (template default 300)")
    p.add_argument("--batch-size", type=int, help="images per step (template default 8)")
    p.add_argument("--input-size", type=parse_size, metavar="HxW", help="crop / network input size (default 512x512)")
    p.add_argument("--lr", type=float, help="base learning rate (template default 1e-3)")
    p.add_argument("--seed", type=int, help="random seed (template default 42)")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop before an epoch would exceed MIN minutes")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt after a crash or kill")
    p.add_argument("--load-weights", metavar="FILE", help="initial backbone weights (.pth)")
    p.add_argument("--json", action="store_true", help="print the bundle metadata as JSON at the end")
    p.set_defaults(func=run)


def prepare_dataset(args: argparse.Namespace, output: Path) -> Path:
    """A canonical dataset for training: the given one, or the raw data converted into OUTPUT/dataset."""
    from segcore.data.convert import MANIFEST, convert, load_manifest

    root = Path(args.train_data_root)
    if (root / MANIFEST).is_file():
        load_manifest(root)
        return root
    target = output / "dataset"
    if (target / MANIFEST).is_file():
        return target
    convert(root, target, **data_kwargs(args))
    return target


def run(args: argparse.Namespace) -> int:
    import torch

    from segcore.cli import quiet
    from segcore.models import get_template
    from segcore.training import TrainConfig, train

    template = get_template(args.template)
    output = Path(args.output)
    config = TrainConfig.from_template(
        template.id,
        epochs=args.epochs,
        batch_size=args.batch_size,
        input_size=args.input_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        time_budget_min=args.time_budget,
    )
    if (output / "model.json").exists() and not args.resume:
        from segcore.errors import SegcoreError

        raise SegcoreError("holds a finished training; choose a new --output", output)
    dataset = prepare_dataset(args, output)
    log.info(
        "training %s: input %dx%d, batch %d, lr %g, up to %d epochs, %d threads",
        template.name,
        *config.input_size,
        config.batch_size,
        config.lr,
        config.epochs,
        torch.get_num_threads(),
    )
    meta = train(
        config,
        dataset,
        output,
        resume=args.resume,
        load_weights=args.load_weights,
        progress=not quiet() and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(meta))
    else:
        print(
            f"{meta['template_name']}: best val mean Dice {meta['best_val_mdice']:.4f} at epoch "
            f"{meta['best_epoch']} of {meta['epochs_run']} ({meta['train_seconds'] / 60:.1f} min) -> {output}"
        )
    return 0
