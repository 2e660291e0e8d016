"""`segcore train`: train a Lite-HRNet template (the default recipe, or the reference's with --recipe)."""

from __future__ import annotations

import argparse
import json
import sys

from segcore.commands.convert import add_data_arguments, data_source
from segcore.commands.options import epochs
from segcore.sizes import parse_size

EPILOG = """\
The data flags take a raw dataset (any layout 'segcore convert' reads; it is converted into
OUTPUT/dataset first) or a canonical dataset written by 'segcore convert'. Data paths, --output and
--load-weights may be s3://bucket/prefix (downloads are cached; the output is uploaded after every
epoch, so --resume continues from S3).
Defaults come from the template: input 512x512, batch 8, Adam lr 1e-3, 300 epochs with early
stopping, the recipe that learned most per epoch on CamVid (--recipe reference: OTX 1.x's). A
killed run continues with the same command plus --resume.
Data-parallel training: run the same command under torchrun (one node or many; Kubeflow Trainer's
torch-distributed runtime does this with PET_* variables), or add --nproc-per-node N to have segcore
start torchrun on this machine. --batch-size is per process: N processes at batch B train what one
process at batch N x B trains (synchronised batch norm, global-batch loss, sharded validation);
rank 0 writes the output, logs and uploads. --resume works with any number of processes.
Runs are tracked in MLflow (default sqlite:///mlflow.db here; see 'mlflow ui'): parameters, per-epoch
metrics, plots, overlays, the model, registered as segcore-<experiment>-<template> with alias 'best'.

examples:
  segcore train Lite-HRNet-18 --train-data-root data/camvid --output runs/camvid-18 --epochs 20
  segcore train Lite-HRNet-s-mod2 --train-data-root s3://data/camvid --output s3://runs/camvid-s \\
      --tracking-uri http://mlflow:5000 --experiment camvid
  segcore train Lite-HRNet-18 --train-data-root data/camvid --output runs/ddp --batch-size 4 --nproc-per-node 2
  segcore train Lite-HRNet-s-mod2 --train-data-root data/labelled --unlabeled-data-root data/photos --output runs/semi
  torchrun --nnodes 2 --nproc-per-node 4 ... $(which segcore) train Lite-HRNet-18 --batch-size 2 ...
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcore.commands.options import add_tracking_arguments
    from segcore.storage import add_storage_arguments

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
    _add_recipe_arguments(p)
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="stop before an epoch would exceed MIN minutes")
    p.add_argument(
        "--device",
        metavar="DEV",
        help="auto (default: the first CUDA device if torch sees one, else cpu), cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="forward-pass autocast (loss, softmax and metrics stay fp32); auto (default): bf16 on a CUDA "
        "device with bf16 or a CPU with AVX512-BF16/AMX, fp16 on older GPUs, else fp32",
    )
    p.add_argument(
        "--memory-format",
        choices=("auto", "channels_last", "contiguous"),
        help="order of weights and activations in memory while training; auto (default): channels_last on a "
        "CPU (1.0-1.3x faster there, by template and precision), contiguous on CUDA; the trained model is "
        "the same either way",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="start N data-parallel processes on this machine through torchrun (CPU: gloo, cores shared out "
        "between them; CUDA: NCCL, one GPU each); not under torchrun itself",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        metavar="SEC",
        help="data-parallel training: a rank that waits longer than SEC for the others (one died) fails (default 1800)",
    )
    _add_semi_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt after a crash or kill")
    p.add_argument(
        "--load-weights",
        metavar="PATH",
        help="initial weights, local or s3://: backbone weights (.pth), or a trained bundle of the same template "
        "(class-incremental: its classes are matched to the data's by name, new classes are added)",
    )
    p.add_argument(
        "--allow-dropped-classes",
        action="store_true",
        help="with a bundle in --load-weights: let the model forget classes the new data does not have "
        "(default: refused)",
    )
    p.add_argument("--json", action="store_true", help="print the bundle metadata as JSON at the end")
    add_tracking_arguments(p)
    add_storage_arguments(p)
    p.set_defaults(func=run)


def _add_semi_arguments(p: argparse.ArgumentParser) -> None:
    """Semi-supervised training: the unlabelled images and the unsupervised loss."""
    p.add_argument(
        "--unlabeled-data-root",
        metavar="DIR",
        help="a folder of unlabelled images (any nesting; local or s3://): switches on semi-supervised training "
        "(Mean Teacher: the student also learns from the teacher's pseudo-labels on these images; images that are "
        "also labelled training images are skipped; experimental: on CamVid with 46 masks it has not beaten "
        "supervised training yet, see docs/benchmarks.md)",
    )
    p.add_argument("--unlabeled-weight", type=float, metavar="W", help="weight of the unsupervised loss (default 0.1)")
    p.add_argument(
        "--unlabeled-rampup",
        type=epochs,
        metavar="EPOCHS",
        help="raise the unsupervised weight over EPOCHS epochs (Mean Teacher's sigmoid ramp-up; default 0: at once)",
    )
    p.add_argument(
        "--pseudo-threshold",
        type=float,
        metavar="P",
        help="keep only the pseudo-labelled pixels whose teacher confidence (largest softmax probability) is at "
        "least P, e.g. 0.95 (FixMatch's rule), instead of OTX's rule (default: leave out the 20%% of each "
        "image's pixels with the highest entropy, falling to 0%% over 100 epochs)",
    )
    p.add_argument(
        "--unlabeled-loss",
        choices=("ce", "ce_dice", "ce_balanced"),  # segcore.semi.LOSSES (tested to match)
        help="the student's loss on the pseudo-labels: ce (cross-entropy, OTX's; the default), ce_dice "
        "(cross-entropy + soft Dice, the default labelled loss, which weights every class equally) or ce_balanced "
        "(cross-entropy averaged within each pseudo-label class, then over the classes: a confident teacher labels "
        "mostly sky and road, which would otherwise make most of the loss)",
    )
    p.add_argument(
        "--teacher-decay",
        type=float,
        metavar="D",
        help="the teacher's exponential moving average: teacher = D x teacher + (1 - D) x student after every "
        "step (default 0.99: an average over about 100 steps)",
    )
    p.add_argument(
        "--unlabeled-mix",
        choices=("none", "cutmix"),
        help="none (the default) or cutmix: each strongly augmented unlabelled view takes a rectangle of half its "
        "area, and its pseudo-labels the same rectangle, from the next unlabelled image of the batch (French et "
        "al., 2020)",
    )
    p.add_argument(
        "--unlabeled-batch-size",
        type=int,
        metavar="N",
        help="unlabelled images per step and process, beside --batch-size labelled ones (default 5)",
    )


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """What a user may change of the template's recipe."""
    p.add_argument("--epochs", type=int, help="maximum epochs (template default 300)")
    p.add_argument("--batch-size", type=int, help="images per step and process (template default 8)")
    p.add_argument("--input-size", type=parse_size, metavar="HxW", help="crop / network input size (default 512x512)")
    p.add_argument("--lr", type=float, help="base learning rate (template default 1e-3)")
    p.add_argument("--seed", type=int, help="random seed (template default 42)")
    p.add_argument(
        "--early-stop-patience",
        type=epochs,
        metavar="N",
        help="stop after N epochs without a better validation Dice (template default 8; 0: train every epoch)",
    )
    p.add_argument(
        "--plateau-patience",
        type=epochs,
        metavar="N",
        help="after warm-up, cut the learning rate tenfold once N + 1 epochs in a row bring no better validation "
        "Dice (template default 4). On a small training set an epoch is a few steps and the validation Dice "
        "jumps between epochs, so a patience in epochs cuts early; raise N there (docs/training.md)",
    )
    p.add_argument(
        "--recipe",
        choices=("default", "reference"),  # segcore.models.templates.RECIPES (tested to match)
        help="default: what learned most per epoch on CamVid (OTX 2.6's crops, schedule and init, "
        "cross-entropy + soft Dice, no clipping); reference: OTX 1.x's documented recipe (rescale + crop, "
        "rotation, image mixing, max-pooling loss, clipping at 40, warm-up 80). See docs/training.md",
    )


def run(args: argparse.Namespace) -> int:
    from segcore import parallel, storage
    from segcore.cli import quiet
    from segcore.commands.options import tracking_options
    from segcore.steps import TrainOptions, train_step

    if args.nproc_per_node is not None:
        return launch_torchrun(args)
    storage.configure_from_args(args)
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        input_size=args.input_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.num_workers,
        time_budget_min=args.time_budget,
        device=args.device,
        precision=args.precision,
        memory_format=args.memory_format,
        semi=_semi_overrides(args),
        recipe=args.recipe,
        early_stop_patience=args.early_stop_patience,
        plateau_patience=args.plateau_patience,
    )
    meta = train_step(
        args.template,
        data_source(args),
        args.output,
        options,
        resume=args.resume,
        load_weights=args.load_weights,
        progress=not quiet() and sys.stderr.isatty(),
        tracking=tracking_options(args),
        dist_timeout_s=args.dist_timeout,
        unlabeled=args.unlabeled_data_root,
        allow_dropped_classes=args.allow_dropped_classes,
    )
    if not parallel.env_world().main:
        return 0  # rank 0 reports
    if args.json:
        print(json.dumps(meta))
    else:
        print(
            f"{meta['template_name']}: best val mean Dice {meta['best_val_mdice']:.4f} at epoch "
            f"{meta['best_epoch']} of {meta['epochs_run']} ({meta['train_seconds'] / 60:.1f} min) -> {args.output}"
        )
    return 0


def _semi_overrides(args: argparse.Namespace) -> dict | None:
    from segcore.errors import SegcoreError

    semi = {}
    if args.unlabeled_weight is not None:
        if args.unlabeled_weight <= 0:
            raise SegcoreError(f"--unlabeled-weight {args.unlabeled_weight}: give a positive weight")
        semi["unlabeled_weight"] = args.unlabeled_weight
    if args.unlabeled_rampup is not None:
        semi["unlabeled_rampup_epochs"] = args.unlabeled_rampup
    if args.pseudo_threshold is not None:
        if not 0 < args.pseudo_threshold < 1:
            raise SegcoreError(f"--pseudo-threshold {args.pseudo_threshold}: give a probability between 0 and 1")
        semi["pseudo_threshold"] = args.pseudo_threshold
    if args.unlabeled_loss is not None:
        semi["unlabeled_loss"] = args.unlabeled_loss
    if args.teacher_decay is not None:
        if not 0 <= args.teacher_decay < 1:
            raise SegcoreError(f"--teacher-decay {args.teacher_decay}: give a value from 0 up to (not including) 1")
        semi["teacher_decay"] = args.teacher_decay
    if args.unlabeled_mix is not None:
        semi["unlabeled_mix"] = args.unlabeled_mix
    if args.unlabeled_batch_size is not None:
        if args.unlabeled_batch_size < 1:
            raise SegcoreError(f"--unlabeled-batch-size {args.unlabeled_batch_size}: give at least 1")
        semi["unlabeled_batch_size"] = args.unlabeled_batch_size
    if semi and not args.unlabeled_data_root:
        raise SegcoreError(
            "--unlabeled-weight, --unlabeled-rampup, --pseudo-threshold, --unlabeled-loss, --teacher-decay, "
            "--unlabeled-mix and --unlabeled-batch-size need --unlabeled-data-root"
        )
    return semi or None


def launch_torchrun(args: argparse.Namespace) -> int:
    """``segcore train ... --nproc-per-node N``: the same command, without that flag, as N
    processes of one node under torchrun (``python -m torch.distributed.run --standalone``)."""
    import os
    import subprocess

    from segcore.errors import SegcoreError
    from segcore.parallel import env_world

    n = args.nproc_per_node
    if n < 1:
        raise SegcoreError(f"--nproc-per-node {n}: give at least 1")
    if env_world().distributed:
        raise SegcoreError("--nproc-per-node: already running under torchrun; drop the flag")
    argv = _without_nproc(args.argv)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # torchrun would give each process 1 thread; share the cores out
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "segcore.cli", *argv]  # fmt: skip
    return subprocess.call(cmd, env=env)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out
