"""Class-incremental training on CamVid against training from scratch: how much is forgotten (issue 19).

Run by hand:

    python benchmarks/incremental_camvid.py --epochs-old 6 --epochs-new 6

Stage 1 trains the template on 8 of the 11 classes: a copy of the data (WORK/camvid-without-...,
remapped mask PNGs, symlinked images) where the --new-classes are the ignore index 255 in the train
and val masks and the other classes are renumbered 0..7 (names and colours kept). Stage 2 adds the
new classes: ``segcore train --load-weights STAGE1`` on the full 11-class data (its classifier rows
are matched by class name, the new ones start fresh) for --epochs-new epochs, with --new-lr when
given. The scratch run trains all 11 classes for --epochs-old + --epochs-new epochs. All validate
on the full val split (101 images). Reported: the old classes' Dice at stage 1's best epoch
("before") and at stage 2's best epoch ("after"), the new classes' Dice after, the scratch run's
Dice of both, per class and as means over the classes that have a value, and every run's curve.
With --together, stage 1 and the scratch run train at the same time with one thread each (stage 2
starts when stage 1 ends). Results are appended to WORK/incremental.jsonl and printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"
sys.path.insert(0, str(HERE))
from ablate_recipe import machine  # noqa: E402

IGNORE = 255
SPLITS = ("train", "val")


def _pairs(data: Path, split: str, limit: int | None) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a split, by file stem, sorted; the first ``limit`` with --limit."""
    masks = {p.stem: p for p in (data / "annotations" / split).iterdir()}
    images = sorted(p for p in (data / "images" / split).iterdir() if p.stem in masks)
    return [(image, masks[image.stem]) for image in images[:limit]]


def without(data: Path, work: Path, new: list[str], limit: int | None) -> tuple[Path, list[str], list[str]]:
    """A plain-layout copy of ``data`` without the classes ``new``: their pixels become the ignore
    index, the other classes are renumbered 0..K-1 in their order (names and colours kept)."""
    meta = json.loads((data / "dataset_meta.json").read_text())
    labels = [meta["label_map"][str(i)] for i in range(len(meta["label_map"]))]
    unknown = [name for name in new if name not in labels]
    if unknown:
        raise SystemExit(f"--new-classes: no class {', '.join(unknown)} in {data} ({', '.join(labels)})")
    old = [name for name in labels if name not in new]
    table = np.full(256, IGNORE, dtype=np.uint8)  # unknown values -> ignored as well
    for i, name in enumerate(old):
        table[labels.index(name)] = i
    sub = work / f"camvid-without-{'-'.join(new)}{f'-limit{limit}' if limit else ''}"
    shutil.rmtree(sub, ignore_errors=True)
    for split in SPLITS:
        (sub / "images" / split).mkdir(parents=True)
        (sub / "annotations" / split).mkdir(parents=True)
        for image, mask in _pairs(data, split, limit):
            (sub / "images" / split / image.name).symlink_to(image.resolve())
            with Image.open(mask) as img:
                values = np.asarray(img)
            if values.ndim != 2:
                raise SystemExit(f"{mask}: not an index mask (mode {img.mode})")
            Image.fromarray(table[values]).save(sub / "annotations" / split / f"{mask.stem}.png")
    colors = meta.get("segmentation_colors")
    sub_meta = {
        "label_map": {str(i): name for i, name in enumerate(old)},
        **({"segmentation_colors": [colors[labels.index(name)] for name in old]} if colors else {}),
        "ignore_index": IGNORE,
    }
    (sub / "dataset_meta.json").write_text(json.dumps(sub_meta, indent=2) + "\n")
    return sub, labels, old


def subset(data: Path, work: Path, limit: int | None) -> Path:
    """The full data, or with --limit a copy (symlinks) of its first ``limit`` train and val pairs."""
    if not limit:
        return data
    sub = work / f"camvid-limit{limit}"
    shutil.rmtree(sub, ignore_errors=True)
    for split in SPLITS:
        (sub / "images" / split).mkdir(parents=True)
        (sub / "annotations" / split).mkdir(parents=True)
        for image, mask in _pairs(data, split, limit):
            (sub / "images" / split / image.name).symlink_to(image.resolve())
            (sub / "annotations" / split / mask.name).symlink_to(mask.resolve())
    shutil.copy(data / "dataset_meta.json", sub / "dataset_meta.json")
    return sub


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--template", default="Lite-HRNet-s-mod2")
    ap.add_argument("--new-classes", default="Car,Pedestrian,Bicyclist", help="the classes stage 2 adds (comma list)")
    ap.add_argument("--epochs-old", type=int, default=6, help="stage 1 (the old classes)")
    ap.add_argument("--epochs-new", type=int, default=6, help="stage 2 (all classes, from stage 1's bundle)")
    ap.add_argument("--new-lr", type=float, help="segcore train --lr of stage 2 (default: the template's)")
    ap.add_argument("--input-size", metavar="HxW", help="segcore train --input-size of every run")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--recipe", default="default", help="segcore train --recipe")
    ap.add_argument("--together", action="store_true", help="run stage 1 and the scratch run at once, one thread each")
    ap.add_argument(
        "--reuse-old",
        metavar="DIR",
        help="a finished stage-1 run of the same classes and --epochs-old (its output folder): not trained again",
    )
    ap.add_argument(
        "--reuse-scratch", metavar="DIR", help="a finished scratch run of --epochs-old + --epochs-new epochs"
    )
    ap.add_argument("--work", default=str(HERE / "results"), help="folder for data and runs (git-ignored)")
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # smoke tests: the first N train and N val images
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    new = [name.strip() for name in args.new_classes.split(",") if name.strip()]
    old_data, labels, old = without(Path(args.data), work, new, args.limit)
    full_data = subset(Path(args.data), work, args.limit)
    epochs = {"old": args.epochs_old, "new": args.epochs_new, "scratch": args.epochs_old + args.epochs_new}
    reuse = {"old": args.reuse_old, "scratch": args.reuse_scratch}
    for name, folder in reuse.items():
        if not folder:
            continue
        reused = json.loads((Path(folder) / "model.json").read_text())
        if reused["training_config"]["epochs"] != epochs[name]:  # the same budget (early stopping may end sooner)
            print(f"{folder}: trained for up to {reused['training_config']['epochs']} epochs, not {epochs[name]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        want = old if name == "old" else labels
        if reused["labels"] != want:
            print(f"{folder}: trained on {', '.join(reused['labels'])}, not {', '.join(want)}", file=sys.stderr)
            return 1

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (work / "incremental").mkdir(parents=True, exist_ok=True)
    outs = {name: Path(folder) for name, folder in reuse.items() if folder}
    for name in ("old", "new", "scratch"):
        outs.setdefault(name, work / "incremental" / f"{args.template}-{name}-{stamp}")
    common = ["--precision", args.precision, "--recipe", args.recipe, "--num-workers", "1", "--no-tracking",
              *(["--input-size", args.input_size] if args.input_size else [])]  # fmt: skip
    new_lr = ["--lr", str(args.new_lr)] if args.new_lr is not None else []
    commands = {
        "old": ["--train-data-root", str(old_data)],
        "new": ["--train-data-root", str(full_data), "--load-weights", str(outs["old"]), *new_lr],
        "scratch": ["--train-data-root", str(full_data)],
    }
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if args.together else {}))
    procs, started, walls = {}, {}, {}

    def log_of(name: str) -> Path:
        return work / "incremental" / f"{name}-{stamp}.log"

    def start(name: str) -> None:
        cmd = [sys.executable, "-m", "segcore.cli", "train", args.template, *commands[name],
               "--output", str(outs[name]), "--epochs", str(epochs[name]), *common]  # fmt: skip
        log = open(log_of(name), "w")
        started[name] = time.perf_counter()
        procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)

    def finish(name: str) -> bool:
        procs[name].wait()
        walls[name] = time.perf_counter() - started[name]
        if procs[name].returncode:
            print(f"{name} failed (see {log_of(name)})", file=sys.stderr)
        return not procs[name].returncode

    # order: stage 1, stage 2, scratch; with --together the scratch run starts beside stage 1
    if args.together and not args.reuse_scratch:
        start("scratch")
    ok = True
    if not args.reuse_old:
        start("old")
        ok = finish("old")
    if ok:
        start("new")
        ok = finish("new")
    if not args.reuse_scratch:
        if "scratch" not in procs and ok:
            start("scratch")
        if "scratch" in procs:
            scratch_ok = finish("scratch")
            if not ok and scratch_ok:
                print(f"the scratch run finished: --reuse-scratch {outs['scratch']}", file=sys.stderr)
            ok = ok and scratch_ok
    if not ok:
        return 1

    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "template": args.template,
        "old_classes": old,
        "new_classes": new,
        "epochs_old": args.epochs_old,
        "epochs_new": args.epochs_new,
        "new_lr": args.new_lr,
        "input_size": args.input_size,
        "precision": args.precision,
        "recipe": args.recipe,
        "together": args.together,
        **({"limit": args.limit} if args.limit else {}),
        "command": shlex.join(["python", "benchmarks/incremental_camvid.py", *sys.argv[1:]]),
    }
    at_best = {}
    for name in ("old", "new", "scratch"):
        out = outs[name]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        meta = json.loads((out / "model.json").read_text())
        best = next(r for r in records if r["epoch"] == meta["best_epoch"])
        at_best[name] = best["val_dice"]
        result[name] = {
            "output": str(out),
            "reused": bool(reuse.get(name)),
            "labels": meta["labels"],
            "val_mdice": [round(r["val_mdice"], 4) for r in records],
            "best_val_mdice": round(meta["best_val_mdice"], 4),
            "best_epoch": meta["best_epoch"],
            "epochs_run": meta["epochs_run"],
            "best_weights_from": meta.get("best_weights_from"),
            "per_class_at_best": {k: None if v is None else round(v, 3) for k, v in best["val_dice"].items()},
            "wall_min": round((walls[name] if name in walls else meta["train_seconds"]) / 60, 1),
            "train_min": round(meta["train_seconds"] / 60, 1),
            **({"started_from": meta["started_from"]} if meta.get("started_from") else {}),
        }

    def dice(name: str, classes: list[str]) -> dict[str, float | None]:
        return {c: None if at_best[name].get(c) is None else round(at_best[name][c], 3) for c in classes}

    table = {
        "old_before": dice("old", old),
        "old_after": dice("new", old),
        "new_after": dice("new", new),
        "old_scratch": dice("scratch", old),
        "new_scratch": dice("scratch", new),
    }
    result["dice"] = {key: {"mean": _mean(list(values.values())), "per_class": values} for key, values in table.items()}
    with open(work / "incremental.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")

    for name, title in (("old", "stage 1"), ("new", "stage 2"), ("scratch", "scratch")):
        run = result[name]
        print(f"{title:<8} best {run['best_val_mdice']:.4f} (epoch {run['best_epoch']} of {run['epochs_run']}), "
              f"{run['wall_min']} min{' (reused)' if run['reused'] else ''}")  # fmt: skip
    if "started_from" in result["new"]:
        started_from = result["new"]["started_from"]
        print(f"stage 2 kept {', '.join(started_from['kept'])}; added {', '.join(started_from['added'])}")
    d = result["dice"]
    print(f"{'class':<12} {'before':>6} {'after':>6} {'scratch':>7}")
    for cls in old:
        print(f"  {cls:<10} {_fmt(table['old_before'][cls]):>6} {_fmt(table['old_after'][cls]):>6} "
              f"{_fmt(table['old_scratch'][cls]):>7}")  # fmt: skip
    print(f"  {'old mean':<10} {_fmt(d['old_before']['mean']):>6} {_fmt(d['old_after']['mean']):>6} "
          f"{_fmt(d['old_scratch']['mean']):>7}")  # fmt: skip
    for cls in new:
        print(f"  {cls:<10} {'':>6} {_fmt(table['new_after'][cls]):>6} {_fmt(table['new_scratch'][cls]):>7}")
    print(f"  {'new mean':<10} {'':>6} {_fmt(d['new_after']['mean']):>6} {_fmt(d['new_scratch']['mean']):>7}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
