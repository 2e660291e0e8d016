"""Training throughput and peak memory of `segcore train` on real data, side by side in one run:
fp32 against bf16 autocast, channels-last against contiguous memory order, glibc's mmap threshold
(``SEGCORE_MMAP_THRESHOLD_MB``, --mmap-thresholds), one process with 2 threads against 2
data-parallel processes with 1 thread each (torchrun, gloo), and, when given its virtualenv, OTX 2.6
on the same crops and batch. Every memory order and threshold is timed for one process;
data-parallel rows use the first of --memory-formats and of --mmap-thresholds only.

Run by hand on an otherwise idle machine (about 25 minutes with OTX):

    ../shared/peer-otx/setup.sh /tmp/otx-venv /tmp/otx-camvid        # once, for the OTX rows
    python benchmarks/scaling.py --otx-venv /tmp/otx-venv --otx-data /tmp/otx-camvid

Each segcore row is a real `segcore train` (data loading with 2 workers per process, the
augmentation and loss of --recipe, by default the default recipe; no MLflow) on the first
--train-images CamVid training images at 512x512, global batch 8 (8 x 1 process or 4 x 2
processes), 2 epochs; the row's figures are epoch 2's `img_per_s` (all ranks together, data loading
included) and the largest `peak_rss_mb` (the ranks' peak resident memory, summed). OTX's row is
../shared/peer-otx/throughput.sh: 42 iterations of batch 8 at its 512x512 random-resized crops,
fp32, img/s over iterations 3..42, peak RSS from GNU time (its largest process). Results are
appended to benchmarks/results/scaling.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from precision import cpu  # noqa: E402

OTX_RECIPES = {"Lite-HRNet-18": "litehrnet_18", "Lite-HRNet-s-mod2": "litehrnet_s", "Lite-HRNet-x-mod3": "litehrnet_x"}


def subset(camvid: Path, work: Path, train_images: int, val_images: int) -> Path:
    """A canonical dataset of the first N training and M validation images of CamVid."""
    target = work / f"camvid-{train_images}-{val_images}"
    if (target / "manifest.json").is_file():
        return target
    raw = work / f"raw-{train_images}-{val_images}"
    shutil.rmtree(raw, ignore_errors=True)
    for split, count in (("train", train_images), ("val", val_images)):
        names = sorted(p.name for p in (camvid / "images" / split).iterdir())[:count]
        for kind in ("images", "annotations"):
            (raw / kind / split).mkdir(parents=True)
            for name in names:
                (raw / kind / split / name).symlink_to(camvid / kind / split / name)
    shutil.copy(camvid / "dataset_meta.json", raw / "dataset_meta.json")
    subprocess.run([sys.executable, "-m", "segcore.cli", "convert", "--train-data-root", str(raw),
                    "--output", str(target)], check=True, env={**os.environ, "SEGCORE_TRACKING": "off"})  # fmt: skip
    return target


def segcore_row(
    dataset: Path, work: Path, template: str, precision: str, procs: int, order: str, mmap: str, args
) -> dict:
    threads = max(1, args.cores // procs)
    out = work / "runs" / f"{template}-{precision}-{order}-{procs}x{threads}-{int(time.time())}"
    cmd = [sys.executable, "-m", "segcore.cli", "train", template, "--train-data-root", str(dataset),
           "--output", str(out), "--epochs", str(args.epochs), "--batch-size", str(args.global_batch // procs),
           "--input-size", args.input_size, "--precision", precision, "--device", "cpu",
           "--num-workers", str(args.num_workers), "--recipe", args.recipe, "--memory-format", order]  # fmt: skip
    if procs > 1:
        cmd += ["--nproc-per-node", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SEGCORE_TRACKING": "off", "CI": "true",
           "SEGCORE_MMAP_THRESHOLD_MB": "" if mmap == "default" else mmap}  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "engine": "segcore", "template": template, "recipe": args.recipe, "precision": precision,
        "memory_format": order, "mmap_threshold_mb": mmap, "layout": f"{procs}x{threads}",
        "img_per_s": round(records[-1]["img_per_s"], 3), "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def otx_row(template: str, args) -> dict | None:
    recipe = OTX_RECIPES.get(template)
    if not (args.otx_venv and recipe):
        return None
    script = Path(args.peer) / "throughput.sh"
    work = Path(args.work) / "otx"
    started = time.perf_counter()
    done = subprocess.run(["bash", str(script), args.otx_venv, args.otx_data, str(work), recipe],
                          check=True, capture_output=True, text=True)  # fmt: skip
    # "OTX 2.6 litehrnet_18: 1.84 img/s over 40 iterations, peak RSS 7.0 GB"
    line = done.stdout.strip().splitlines()[-1]
    words = line.split()
    return {"engine": "OTX 2.6", "template": template, "precision": "fp32", "layout": "1x2",
            "img_per_s": float(words[words.index("img/s") - 1]), "peak_rss_mb": round(float(words[-2]) * 1024),
            "wall_s": round(time.perf_counter() - started, 1), "otx_line": line}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "datasets" / "camvid"))
    ap.add_argument("--templates", default="Lite-HRNet-18,Lite-HRNet-s-mod2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--memory-formats", default="channels_last,contiguous", help="segcore train --memory-format values")
    ap.add_argument(
        "--mmap-thresholds",
        default="default",
        help="SEGCORE_MMAP_THRESHOLD_MB values (MiB; default or 0: glibc's own rule)",
    )
    ap.add_argument("--procs", default="1,2", help="data-parallel processes per row (threads: cores / procs)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--input-size", default="512x512")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--recipe", default="default", help="segcore train --recipe (before 2026-12-03: reference)")
    ap.add_argument("--work", default="/tmp/segcore-scaling")
    ap.add_argument("--otx-venv", help="OTX 2.6 virtualenv from ../shared/peer-otx/setup.sh (no OTX rows without)")
    ap.add_argument("--otx-data", help="the CamVid layout setup.sh wrote")
    ap.add_argument("--peer", default=str(HERE.parent.parent / "shared" / "peer-otx"))
    ap.add_argument("--results", default=str(HERE / "results" / "scaling.jsonl"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = subset(Path(args.data), work, args.train_images, 4)
    machine = cpu()
    rows = []
    for template in args.templates.split(","):
        for precision in args.precisions.split(","):
            orders, mmaps = args.memory_formats.split(","), args.mmap_thresholds.split(",")
            for procs in (int(p) for p in args.procs.split(",")):
                for order in orders if procs == 1 else orders[:1]:
                    for mmap in mmaps if procs == 1 else mmaps[:1]:
                        rows.append(segcore_row(dataset, work, template, precision, procs, order, mmap, args))
                        print(json.dumps(rows[-1]), flush=True)
        row = otx_row(template, args)
        if row:
            rows.append(row)
            print(json.dumps(row), flush=True)
    stamp = {"date": datetime.date.today().isoformat(), "machine": machine, "command": " ".join(sys.argv)}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")
    print(f"\n{machine}; {args.input_size}, global batch {args.global_batch}")
    print(f"{'engine':<9} {'template':<19} {'precision':<9} {'memory':<13} {'mmap MB':>7} {'procs x threads':<15} "
          f"{'img/s':>6} {'peak RSS MB':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['engine']:<9} {r['template']:<19} {r['precision']:<9} {r.get('memory_format', ''):<13} "
              f"{r.get('mmap_threshold_mb', ''):>7} {r['layout']:<15} {r['img_per_s']:>6.2f} "
              f"{r['peak_rss_mb']:>11}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
