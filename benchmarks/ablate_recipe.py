"""Recipe ablation on CamVid at equal work: validation mean Dice after every epoch, per variant.

Run by hand (each variant is a full training of --epochs epochs; they run one after the other):

    python benchmarks/ablate_recipe.py --template Lite-HRNet-s-mod2 --epochs 8 --input-size 512x512 \\
        --variants seed,ce,no_rot_mix,rrc,otx

Each variant is the reference recipe (OTX 1.x's, segcore's defaults before this ablation: the
variant `seed`) with a few settings changed (see VARIANTS); `default` is today's defaults (the
ablation's outcome, `otx_dice_exact`), and the `default_*` variants change those. `--resume
RUN_DIR` continues one variant's interrupted run. Curves are appended to WORK/ablation.jsonl (one
line per variant, with the command and the machine) and printed as a table at the end. Dice is
segcore's protocol (masks at their own resolution).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"

# name -> (TrainConfig overrides, AugmentConfig overrides), on top of the reference recipe (OTX 1.x's,
# segcore's defaults before this ablation: RECIPES["reference"]); "default" is today's defaults.
OTX_AUG = {"crop_mode": "random_resized_crop", "rotate_p": 0.0, "mix_p": 0.0, "photometric_p": 0.5}
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),  # today's defaults (the outcome of this ablation: otx_dice_exact)
    # the reference's augmentations put back, one at a time, into today's defaults ("default_*"
    # variants start from the defaults, not from the reference)
    "default_rot": ({}, {"rotate_p": 0.5}),
    "default_mix": ({}, {"mix_p": 0.5}),
    "default_mp": ({"loss": "max_pooling"}, {}),
    "seed": ({}, {}),  # the reference recipe, segcore's defaults until issue 20
    "ce": ({"loss": "cross_entropy"}, {}),
    "no_rot": ({}, {"rotate_p": 0.0}),
    "no_mix": ({}, {"mix_p": 0.0}),
    "no_rot_mix": ({}, {"rotate_p": 0.0, "mix_p": 0.0}),
    "rrc": ({}, {"crop_mode": "random_resized_crop"}),
    "otx_aug": ({}, OTX_AUG),  # OTX 2.6's augmentations, max-pooling loss kept
    "otx": ({"loss": "cross_entropy", "warmup_iters": 100, "plateau_patience": 4}, OTX_AUG),
    "otx_mp": ({"warmup_iters": 100, "plateau_patience": 4}, OTX_AUG),
    "otx_kaiming": ({"loss": "cross_entropy", "warmup_iters": 100, "plateau_patience": 4, "init": "kaiming"}, OTX_AUG),
    "otx_dice": ({"loss": "ce_dice", "warmup_iters": 100, "plateau_patience": 4}, OTX_AUG),
    "otx_dice_kaiming": ({"loss": "ce_dice", "warmup_iters": 100, "plateau_patience": 4, "init": "kaiming"}, OTX_AUG),
    "otx_ema": ({"loss": "cross_entropy", "warmup_iters": 100, "plateau_patience": 4, "ema_decay": 0.99}, OTX_AUG),
    "otx_dice_lr2": ({"loss": "ce_dice", "warmup_iters": 100, "plateau_patience": 4, "lr": 2e-3}, OTX_AUG),
    "otx_dice_ema": ({"loss": "ce_dice", "warmup_iters": 100, "plateau_patience": 4, "ema_decay": 0.99}, OTX_AUG),
    # OTX 2.6's remaining differences on segcore's engine: its init, its warm-up from lr/100, no clipping
    "otx_exact": (
        {
            "loss": "cross_entropy",
            "warmup_iters": 100,
            "plateau_patience": 4,
            "init": "otx",
            "warmup_start_factor": 0.01,
            "grad_clip_norm": 0.0,
        },
        OTX_AUG,
    ),  # fmt: skip
    "otx_dice_exact": (
        {
            "loss": "ce_dice",
            "warmup_iters": 100,
            "plateau_patience": 4,
            "init": "otx",
            "warmup_start_factor": 0.01,
            "grad_clip_norm": 0.0,
        },
        OTX_AUG,
    ),  # fmt: skip
}


def machine() -> str:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        have = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in have)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, {flags}"


def run_one(args: argparse.Namespace, name: str, dataset: Path, out: Path) -> None:
    """Train one variant in this process (called through a subprocess per variant)."""
    import logging

    from segcore.training import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides, augment = VARIANTS[name]
    h, w = (int(v) for v in args.input_size.split("x"))
    config = TrainConfig.from_template(
        args.template,
        recipe="default" if name.startswith("default") else "reference",
        epochs=args.epochs,
        batch_size=args.batch_size,
        input_size=(h, w),
        num_workers=args.num_workers,
        seed=args.seed,
        precision=args.precision,
        probe_ema_decays=tuple(float(d) for d in args.probe_ema.split(",") if d.strip()),
        augment=augment,
        **overrides,
    )
    train(config, dataset, out, resume=args.resume is not None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", default="Lite-HRNet-s-mod2")
    ap.add_argument("--data", default=os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--input-size", default="512x512")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--precision", default="fp32", help="fp32 (default, comparable across machines), bf16, auto")
    ap.add_argument("--probe-ema", default="", help="comma-separated EMA decays also scored every epoch")
    ap.add_argument("--variants", default="seed,ce,no_rot_mix,otx", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--work", default=str(HERE / "results"), help="folder for datasets and runs (git-ignored)")
    ap.add_argument(
        "--resume", metavar="RUN_DIR", help="continue one variant's interrupted run in RUN_DIR (from its last.pt)"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    work = Path(args.work)
    dataset = work / "camvid-canonical"
    if args.one:
        run_one(args, args.one, dataset, Path(args.out))
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.resume and len(names) != 1:
        ap.error("--resume continues one run: give exactly one variant")
    work.mkdir(parents=True, exist_ok=True)
    if not (dataset / "manifest.json").is_file():
        segcore = [sys.executable, "-m", "segcore.cli"]
        subprocess.run([*segcore, "convert", "--train-data-root", args.data, "--output", str(dataset)], check=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    for name in names:
        out = (
            Path(args.resume)
            if args.resume
            else work / "ablation" / f"{args.template}-{args.input_size}-{name}-{stamp}"
        )
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name, "--out", str(out)]
        print(f"== {name}: {VARIANTS[name]}", flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        row = {
            "date": dt.date.today().isoformat(),
            "machine": machine(),
            "template": args.template,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "variant": name,
            "changes": VARIANTS[name],
            "val_mdice": [round(e["val_mdice"], 4) for e in epochs],
            "train_loss": [round(e["train_loss"], 4) for e in epochs],
            **(
                {
                    "val_mdice_ema": {
                        d: [round(e["val_mdice_ema"][d], 4) for e in epochs] for d in epochs[0]["val_mdice_ema"]
                    }
                }
                if "val_mdice_ema" in epochs[0]
                else {}
            ),
            "img_per_s": round(sum(e["img_per_s"] for e in epochs) / len(epochs), 2),
            "final_per_class": {k: None if v is None else round(v, 3) for k, v in epochs[-1]["val_dice"].items()},
            "wall_min": round((time.perf_counter() - started) / 60, 1),
            "command": shlex.join(["python", "benchmarks/ablate_recipe.py", *sys.argv[1:]]),
        }
        rows.append(row)
        with open(work / "ablation.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    print(f"\n{'variant':<20} " + " ".join(f"e{i + 1:<5}" for i in range(args.epochs)))
    for row in rows:
        print(f"{row['variant']:<20} " + " ".join(f"{v:.3f} " for v in row["val_mdice"]))
        for decay, curve in row.get("val_mdice_ema", {}).items():
            print(f"{'  ema ' + decay:<20} " + " ".join(f"{v:.3f} " for v in curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
