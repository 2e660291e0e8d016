"""Train a template on CamVid under a CPU time budget and report validation Dice.

Run by hand (it takes the budget plus a few minutes); results go into docs/benchmarks.md:

    python benchmarks/train_camvid.py --template Lite-HRNet-18 --budget-min 45 --input-size 352x480

The budget counts training and per-epoch validation; training stops before an epoch that would
overrun it. The final score is the best epoch's validation Dice, re-measured by `segcore eval`
at the masks' own 480x360 resolution.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ablate_recipe import machine  # noqa: E402  (the CPU's model and flags)

DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", default="Lite-HRNet-18")
    ap.add_argument("--data", default=os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--budget-min", type=float, default=45.0)
    ap.add_argument("--input-size", default="352x480")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--work", default=str(HERE / "results"), help="folder for datasets and runs (git-ignored)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "camvid-canonical"
    segcore = [sys.executable, "-m", "segcore.cli"]
    if not (dataset / "manifest.json").is_file():
        subprocess.run([*segcore, "convert", "--train-data-root", args.data, "--output", str(dataset)], check=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = work / f"{args.template}-{args.input_size}-{stamp}"
    train_cmd = [
        *segcore, "train", args.template, "--train-data-root", str(dataset), "--output", str(run),
        "--input-size", args.input_size, "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        "--time-budget", str(args.budget_min), "--num-workers", str(args.num_workers),
    ]  # fmt: skip
    print("$", shlex.join(train_cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(train_cmd, check=True)
    wall = time.perf_counter() - started
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    eval_cmd = [*segcore, "eval", str(run), "--test-data-root", str(dataset), "--split", "val", "--json"]
    scores = json.loads(subprocess.run(eval_cmd, check=True, capture_output=True, text=True).stdout)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((run / "model.json").read_text())
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "precision": meta.get("train_precision"),
        "template": meta["template_name"],
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "budget_min": args.budget_min,
        "epochs_run": meta["epochs_run"],
        "best_epoch": meta["best_epoch"],
        "wall_min": round(wall / 60, 1),
        "train_img_per_s": round(sum(e["img_per_s"] for e in epochs) / len(epochs), 2),
        "peak_rss_gb": round(peak_rss_gb, 2),
        "val_mdice": round(scores["mdice"], 4),
        "val_mdice_by_epoch": [round(e["val_mdice"], 4) for e in epochs],
        "val_miou": round(scores["miou"], 4),
        "per_class_dice": {
            k: None if v["dice"] is None else round(v["dice"], 4) for k, v in scores["per_class"].items()
        },
        "command": shlex.join(["python", "benchmarks/train_camvid.py", *sys.argv[1:]]),
        "run": str(run),
    }
    with open(work / "train_camvid.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
