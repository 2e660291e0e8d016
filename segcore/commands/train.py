"""`segcore train`: train a Lite-HRNet template with the reference recipe."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from segcore.commands.convert import DATA_PATHS, add_data_arguments, data_kwargs, localize_data
from segcore.commands.demo_data import parse_size
from segcore.errors import SegcoreError

log = logging.getLogger(__name__)

EPILOG = """\
The data flags take a raw dataset (any layout 'segcore convert' reads; it is converted into
OUTPUT/dataset first) or a canonical dataset written by 'segcore convert'. Data paths, --output and
--load-weights may be s3://bucket/prefix (downloads are cached; the output is uploaded after every
epoch, so --resume continues from S3).
Defaults come from the template: input 512x512, batch 8, Adam lr 1e-3, 300 epochs with early
stopping. A killed run continues with the same command plus --resume.
Runs are tracked in MLflow (default sqlite:///mlflow.db here; see 'mlflow ui'): parameters, per-epoch
metrics, plots, overlays, the model, registered as segcore-<experiment>-<template> with alias 'best'.

examples:
  segcore train Lite-HRNet-18 --train-data-root data/camvid --output runs/camvid-18 --epochs 20
  segcore train Lite-HRNet-s-mod2 --train-data-root s3://data/camvid --output s3://runs/camvid-s \\
      --tracking-uri http://mlflow:5000 --experiment camvid
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.storage import add_storage_arguments
    from segcore.tracking import add_tracking_arguments

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
    p.add_argument(
        "--output", required=True, metavar="DIR", help="training output folder (the model bundle) or s3://bucket/prefix"
    )
    p.add_argument("--epochs", type=int, help="maximum epochs (template default 300)")
    p.add_argument("--batch-size", type=int, help="images per step (template default 8)")
    p.add_argument("--input-size", type=parse_size, metavar="HxW", help="crop / network input size (default 512x512)")
    p.add_argument("--lr", type=float, help="base learning rate (template default 1e-3)")
    p.add_argument("--seed", type=int, help="random seed (template default 42)")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop before an epoch would exceed MIN minutes")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt after a crash or kill")
    p.add_argument("--load-weights", metavar="FILE", help="initial backbone weights (.pth, local or s3://)")
    p.add_argument("--json", action="store_true", help="print the bundle metadata as JSON at the end")
    add_tracking_arguments(p)
    add_storage_arguments(p)
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


def _prepare_or_clean(args: argparse.Namespace, output: Path) -> Path:
    """``prepare_dataset``; when the data is refused, the output folder this call created goes
    away with it, so nothing is left behind that looks like a started training."""
    import shutil

    created = not output.exists()
    try:
        return prepare_dataset(args, output)
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise


def _check_output(args: argparse.Namespace) -> None:
    """The same refusals for a local folder and an S3 prefix, before any download or training."""
    from segcore import storage
    from segcore.errors import SegcoreError
    from segcore.training import BUNDLE_META, LAST

    if args.resume:
        if storage.is_s3(args.output):
            storage.check_bucket(args.output)
        return
    if storage.is_s3(args.output):
        uri = storage.check_bucket(args.output)
        finished, unfinished = storage.exists(uri.child(BUNDLE_META)), storage.exists(uri.child(LAST))
    else:
        finished, unfinished = (Path(args.output) / BUNDLE_META).exists(), (Path(args.output) / LAST).exists()
    if finished:
        raise SegcoreError("holds a finished training; choose a new --output", args.output)
    if unfinished:
        raise SegcoreError(
            "holds an unfinished training; pass --resume to continue it or choose a new --output", args.output
        )


def train_params(template, config, manifest: dict, args: argparse.Namespace) -> dict:
    """What MLflow records about a training: template, every hyper-parameter, data and versions."""
    from dataclasses import asdict

    from segcore import __version__
    from segcore.tracking import redact

    params = {"template": template.id, "template_name": template.name}
    for key, value in asdict(config).items():
        if key == "augment":
            params.update({f"augment.{k}": v for k, v in value.items()})
        elif key == "input_size":
            params[key] = f"{value[0]}x{value[1]}"
        else:
            params[key] = value
    params.update(
        dataset_hash=manifest["content_hash"],
        labels=",".join(manifest["labels"]),
        num_classes=len(manifest["labels"]),
        ignore_index=manifest["ignore_index"],
        train_items=manifest["splits"]["train"],
        val_items=manifest["splits"]["val"],
        segcore_version=__version__,
        load_weights=redact(args.load_weights) if args.load_weights else None,
        output=redact(args.output),
        **{name: redact(getattr(args, name)) for name in DATA_PATHS if getattr(args, name, None)},
    )
    return params


def epoch_metrics(record: dict) -> dict:
    """A metrics.jsonl record as MLflow metrics: val_dice is the mean Dice, val_dice/<class> per class."""
    metrics = {
        "train_loss": record["train_loss"],
        "val_dice": record["val_mdice"],
        "val_miou": record["val_miou"],
        "lr": record["lr"],
        "img_per_s": record["img_per_s"],
        "epoch_seconds": record["epoch_seconds"],
    }
    metrics.update({f"val_dice/{name}": dice for name, dice in record["val_dice"].items()})
    return metrics


def _input_example(dataset: Path):
    """A small validation image (longest side 64 px) for the MLflow model's input example."""
    import cv2

    from segcore.data.dataset import SegmentationDataset

    image, _ = SegmentationDataset(dataset, "val").load(0)
    scale = 64 / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))))
    return image


def log_training_result(tracker, output: Path, dataset: Path, meta: dict) -> None:
    """End of a tracked training: final scores, plots and overlays of the best model, the model
    (bundle + pyfunc), and a registered version with alias 'best' if it beats the current holder."""
    from segcore.inference import TorchPredictor
    from segcore.tracking import log_segmentation_report, model_name

    final = {
        "best_val_dice": meta["best_val_mdice"],
        "best_epoch": meta["best_epoch"],
        "epochs_run": meta["epochs_run"],
        "train_seconds": meta["train_seconds"],
    }
    scores = log_segmentation_report(tracker, TorchPredictor(output), dataset, "val")
    if scores:
        final.update({f"best_val_dice/{k}": v["dice"] for k, v in scores["per_class"].items()})
        final["best_val_miou"] = scores["miou"]
    tracker.log_metrics(final)
    if tracker.log_model_bundle(output, input_example=_input_example(dataset)):
        tracker.register_model(
            model_name(tracker.experiment_name, meta["template_name"]),
            score=meta["best_val_mdice"],
            tags={"template": meta["template"], "dataset_hash": meta["dataset_hash"]},
        )


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from segcore import storage
    from segcore.cli import quiet
    from segcore.data.convert import load_manifest
    from segcore.models import get_template
    from segcore.tracking import check_tracking, tracking_run
    from segcore.training import TrainConfig, train

    storage.configure_from_args(args)
    template = get_template(args.template)
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
    # Everything that can be refused is refused before anything is downloaded or trained.
    _check_output(args)
    check_tracking(args)
    local = localize_data(args)
    load_weights = str(storage.local_input(args.load_weights)) if args.load_weights else None
    remote = storage.parse_s3_uri(args.output) if storage.is_s3(args.output) else None

    def upload(final: bool = False) -> None:
        if remote is None:
            return
        try:
            storage.sync_up(output, remote)
        except SegcoreError as exc:
            if final:
                raise
            log.warning("checkpoint upload failed, training goes on (retried after the next epoch): %s", exc)

    with contextlib.ExitStack() as stack:
        output = stack.enter_context(storage.local_output(args.output, resume=args.resume, exist_ok=True))
        tracker = stack.enter_context(
            tracking_run(
                args,
                "train",
                run_name=f"train {template.name}",
                resume_from=output if args.resume else None,
                tags={"segcore.template": template.name},
            )
        )
        dataset = _prepare_or_clean(local, output)
        manifest = load_manifest(dataset)
        tracker.write_run_file(output)
        tracker.log_params(train_params(template, config, manifest, args))

        def on_epoch(record: dict) -> None:
            tracker.log_metrics(epoch_metrics(record), step=record["epoch"])
            upload()

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
            load_weights=load_weights,
            progress=not quiet() and sys.stderr.isatty(),
            on_epoch=on_epoch,
        )
        if tracker.enabled:
            try:
                log_training_result(tracker, output, dataset, meta)
            except Exception as exc:  # noqa: BLE001 - the training succeeded; tracking must not fail it
                log.warning("could not log the training result to MLflow: %s", exc)
        upload(final=True)  # before the tracking queue is flushed: the bundle first
    if args.json:
        print(json.dumps(meta))
    else:
        print(
            f"{meta['template_name']}: best val mean Dice {meta['best_val_mdice']:.4f} at epoch "
            f"{meta['best_epoch']} of {meta['epochs_run']} ({meta['train_seconds'] / 60:.1f} min) -> {args.output}"
        )
    return 0
