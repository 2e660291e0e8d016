"""Self-supervised pretraining then fine-tuning, against training from scratch, on CamVid with 46
labelled images (issue 19).

Run by hand:

    python benchmarks/pretrain_camvid.py --epochs 40

Pretrains the template's backbone (``segcore pretrain``, DetCon) on all 367 CamVid training images
without their masks, then fine-tunes it (``segcore train --load-weights``) on the 46 labelled images
that ``semi_camvid.py`` draws with the same --seed, and compares with a training from scratch on the
same 46 for the same epochs (or reuses one: ``--reuse-scratch``, e.g. the supervised run of
``semi_camvid.py``, which is exactly that training). Both validate on the full val split (101 images).
Results are appended to WORK/pretrain.jsonl and printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"
sys.path.insert(0, str(HERE))
from ablate_recipe import machine  # noqa: E402
from semi_camvid import print_gain, split  # noqa: E402


def _run(cmd: list[str], log: Path, env: dict) -> float:
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, env=env, stdout=f, stderr=f)
    if code:
        raise SystemExit(f"failed ({code}): {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - started


def _summary(out: Path, wall: float) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "model.json").read_text())
    best = next(r for r in records if r["epoch"] == meta["best_epoch"])
    return {
        "output": str(out),
        "val_mdice": [round(r["val_mdice"], 4) for r in records],
        "best_val_mdice": round(meta["best_val_mdice"], 4),
        "best_epoch": meta["best_epoch"],
        "epochs_run": meta["epochs_run"],
        "per_class_at_best": {k: None if v is None else round(v, 3) for k, v in best["val_dice"].items()},
        "wall_min": round(wall / 60, 1),
        "train_min": round(meta["train_seconds"] / 60, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--template", default="Lite-HRNet-s-mod2")
    ap.add_argument("--epochs", type=int, default=40, help="fine-tuning and scratch epochs")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-args", default="", help="extra segcore pretrain flags")
    ap.add_argument("--labelled", type=int, default=46)
    ap.add_argument("--seed", type=int, default=0, help="draws the labelled images (as semi_camvid.py)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--train-args", default="", help="extra segcore train flags of the fine-tuning and scratch runs")
    ap.add_argument("--reuse-pretrain", metavar="DIR", help="a finished segcore pretrain output")
    ap.add_argument("--reuse-scratch", metavar="DIR", help="a finished training on the same 46 images and epochs")
    ap.add_argument("--work", default=str(HERE / "results"), help="folder for data and runs (git-ignored)")
    args = ap.parse_args()

    work = Path(args.work)
    runs = work / "pretrain"
    runs.mkdir(parents=True, exist_ok=True)
    sub, _, ids = split(Path(args.data), runs, args.labelled, args.seed)  # its own copy: semi_camvid may be running
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    env = dict(os.environ)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "template": args.template,
        "epochs": args.epochs,
        "labelled_ids": ids,
        "command": shlex.join(["python", "benchmarks/pretrain_camvid.py", *sys.argv[1:]]),
    }

    pre = Path(args.reuse_pretrain) if args.reuse_pretrain else runs / f"{args.template}-pretrained-{stamp}"
    if not args.reuse_pretrain:
        cmd = [sys.executable, "-m", "segcore.cli", "pretrain", args.template, "--data-root",
               str(Path(args.data) / "images" / "train"), "--output", str(pre), "--epochs", str(args.pretrain_epochs),
               "--num-workers", "1", "--precision", args.precision, "--no-tracking",
               *shlex.split(args.pretrain_args)]  # fmt: skip
        _run(cmd, runs / f"pretrain-{stamp}.log", env)
    meta = json.loads((pre / "pretrain.json").read_text())
    curve = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    result["pretrain"] = {
        "output": str(pre),
        "images": meta["images"],
        "epochs": meta["epochs_run"],
        "loss": [round(r["loss"], 4) for r in curve],
        "match_accuracy": [round(r["match_accuracy"], 3) for r in curve],
        "minutes": round(meta["pretrain_seconds"] / 60, 1),
        "config": meta["config"],
    }

    base = [sys.executable, "-m", "segcore.cli", "train", args.template, "--train-data-root", str(sub),
            "--epochs", str(args.epochs), "--precision", args.precision, "--recipe", args.recipe,
            "--num-workers", "1", "--no-tracking", *shlex.split(args.train_args)]  # fmt: skip
    fine = runs / f"{args.template}-finetuned-{stamp}"
    wall = _run([*base, "--output", str(fine), "--load-weights", str(pre)], runs / f"finetune-{stamp}.log", env)
    result["finetuned"] = _summary(fine, wall)
    if args.reuse_scratch:
        scratch = Path(args.reuse_scratch)
        reused = json.loads((scratch / "model.json").read_text())
        if reused["training_config"]["epochs"] != args.epochs:
            print(f"{scratch}: trained for up to {reused['training_config']['epochs']} epochs, not {args.epochs}",
                  file=sys.stderr)  # fmt: skip
            return 1
        result["scratch"] = _summary(scratch, reused["train_seconds"])
    else:
        scratch = runs / f"{args.template}-scratch-{stamp}"
        result["scratch"] = _summary(
            scratch, _run([*base, "--output", str(scratch)], runs / f"scratch-{stamp}.log", env)
        )
    with open(work / "pretrain.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    a, b = result["scratch"], result["finetuned"]
    print(f"pretraining: {result['pretrain']['minutes']} min, loss {result['pretrain']['loss']}")
    print(f"scratch:    best {a['best_val_mdice']:.4f} (epoch {a['best_epoch']}), {a['wall_min']} min")
    print(f"pretrained: best {b['best_val_mdice']:.4f} (epoch {b['best_epoch']}), {b['wall_min']} min")
    print_gain(a, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
