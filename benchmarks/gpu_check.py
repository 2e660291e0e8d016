"""The GPU check: train Lite-HRNet-s-mod2 on CUDA with --precision auto on the CamVid data under
../shared, then evaluate the bundle on the CPU (the bundle must not depend on where it was
trained), and print img/s and Dice.

Run by hand on a machine with a GPU (one command, a few minutes):

    python benchmarks/gpu_check.py                      # 2 epochs at 512x512, batch 8, on cuda
    python benchmarks/gpu_check.py --device cpu --epochs 1 --input-size 128x128   # a dry run

Prints one JSON line: device, precision, GPU name, epochs, training img/s, the training's best
validation Dice, and the Dice `segcore eval --device cpu` gives the same bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--input-size", default="512x512")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--work", help="folder for the dataset and the bundle (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from segcore.cli import main as segcore

    work = Path(args.work or tempfile.mkdtemp(prefix="segcore-gpu-check-"))
    out = work / "run"
    train = ["train", "Lite-HRNet-s-mod2", "--train-data-root", args.data, "--output", str(out),
             "--epochs", str(args.epochs), "--input-size", args.input_size, "--batch-size", str(args.batch_size),
             "--num-workers", str(args.num_workers), "--device", args.device, "--precision", args.precision,
             "--no-tracking"]  # fmt: skip
    if segcore(train) != 0:
        return 1
    meta = json.loads((out / "model.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = segcore(["eval", str(out), "--test-data-root", str(out / "dataset"), "--device", "cpu", "--json",
                        "--no-tracking"])  # fmt: skip
    if code != 0:
        return 1
    result = {
        "device": meta["train_device"],
        "precision": meta["train_precision"],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "epochs": meta["epochs_run"],
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "train_img_per_s": [round(r["img_per_s"], 2) for r in records],
        "best_val_mdice": round(meta["best_val_mdice"], 4),
        "cpu_eval_mdice": round(json.loads(printed.getvalue())["mdice"], 4),
        "work": str(work),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
