"""Semi-supervised against supervised training on CamVid with 1/8 of the labels (issue 18).

Run by hand:

    python benchmarks/semi_camvid.py --epochs 40

Keeps the masks of 46 of the 367 training images (drawn with --seed, listed in the results), uses
the other 321 as unlabelled images, and trains the same template for the same epochs twice:
supervised on the 46, and semi-supervised (``--unlabeled-data-root``) on the 46 + 321. Both
validate on the full val split (101 images). With --together the two trainings run at the same
time with one thread each (their curves do not depend on it; their wall times do). Results are
appended to WORK/semi.jsonl and printed.

One run per arm cannot show a gain smaller than the spread between training seeds, so repeat the pair
with --train-args "--seed S". Each arm can train alone (--only supervised|semi, with a --work folder of
its own per job so that jobs can run side by side), pairs are collected without training by giving
both --reuse-supervised and --reuse-semi, and --summarise prints the mean, spread and paired gain over
the collected semi.jsonl files.
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

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"
sys.path.insert(0, str(HERE))
from ablate_recipe import machine  # noqa: E402


def split(data: Path, work: Path, labelled: int, seed: int) -> tuple[Path, Path, list[str]]:
    """A plain-layout copy (symlinks) with ``labelled`` training masks, and a folder of the rest."""
    images = sorted((data / "images" / "train").iterdir())
    keep = sorted(np.random.default_rng(seed).choice(len(images), labelled, replace=False).tolist())
    sub, photos = work / f"camvid-{labelled}", work / f"camvid-unlabelled-{len(images) - labelled}"
    for folder in (sub, photos):
        shutil.rmtree(folder, ignore_errors=True)
    (sub / "images" / "train").mkdir(parents=True)
    (sub / "annotations" / "train").mkdir(parents=True)
    photos.mkdir(parents=True)
    masks = {p.stem: p for p in (data / "annotations" / "train").iterdir()}
    for i, image in enumerate(images):
        if i in keep:
            (sub / "images" / "train" / image.name).symlink_to(image.resolve())
            mask = masks[image.stem]
            (sub / "annotations" / "train" / mask.name).symlink_to(mask.resolve())
        else:
            (photos / image.name).symlink_to(image.resolve())
    for kind in ("images", "annotations"):
        (sub / kind / "val").symlink_to((data / kind / "val").resolve())
    shutil.copy(data / "dataset_meta.json", sub / "dataset_meta.json")
    return sub, photos, [images[i].stem for i in keep]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA)))
    ap.add_argument("--template", default="Lite-HRNet-s-mod2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--labelled", type=int, default=46)
    ap.add_argument("--seed", type=int, default=0, help="draws the labelled images")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--recipe", default="default", help="segcore train --recipe (the results of 2026-12-02: reference)")
    ap.add_argument("--together", action="store_true", help="run both trainings at once, one thread each")
    ap.add_argument(
        "--reuse-supervised",
        metavar="DIR",
        help="a finished supervised run of the same split and epochs (its output folder): only the semi run trains",
    )
    ap.add_argument("--reuse-semi", metavar="DIR", help="a finished semi-supervised run: only collect the results")
    ap.add_argument("--semi-args", default="", help="extra segcore train flags for the semi-supervised run")
    ap.add_argument(
        "--train-args",
        default="",
        help='extra segcore train flags for both runs, e.g. "--early-stop-patience 0" (both train every epoch)',
    )
    ap.add_argument(
        "--only",
        choices=("supervised", "semi"),
        help="train this run alone and print its folder; pair two such runs later with --reuse-supervised/--reuse-semi",
    )
    ap.add_argument(
        "--summarise",
        nargs="+",
        metavar="JSONL",
        help="no training: the mean and spread over the pairs in these semi.jsonl files (one line per training seed)",
    )
    ap.add_argument("--work", default=str(HERE / "results"), help="folder for data and runs (git-ignored)")
    args = ap.parse_args()
    if args.only and getattr(args, f"reuse_{args.only}"):
        ap.error(f"--only {args.only} trains that run: do not also give --reuse-{args.only}")
    if args.summarise:
        return summarise([json.loads(line) for f in args.summarise for line in Path(f).read_text().splitlines()])

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sub, photos, ids = split(Path(args.data), work, args.labelled, args.seed)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = [sys.executable, "-m", "segcore.cli", "train", args.template, "--train-data-root", str(sub),
            "--epochs", str(args.epochs), "--precision", args.precision, "--recipe", args.recipe, "--num-workers", "1",
            "--no-tracking", *shlex.split(args.train_args)]  # fmt: skip
    runs = {
        "supervised": [],
        "semi": ["--unlabeled-data-root", str(photos), *shlex.split(args.semi_args)],
    }
    reuse = {"supervised": args.reuse_supervised, "semi": args.reuse_semi}
    for name, folder in reuse.items():
        if folder or (args.only and name != args.only):
            del runs[name]
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if args.together else {}))
    procs, outs, started, walls = {}, {}, {}, {}
    for name, extra in runs.items():
        outs[name] = work / "semi" / f"{args.template}-{name}-{stamp}"
        (work / "semi").mkdir(parents=True, exist_ok=True)
        log = open(work / "semi" / f"{name}-{stamp}.log", "w")
        started[name] = time.perf_counter()
        procs[name] = subprocess.Popen([*base, "--output", str(outs[name]), *extra], env=env, stdout=log, stderr=log)
        if not args.together:
            procs[name].wait()
            walls[name] = time.perf_counter() - started[name]
    for name, proc in procs.items():
        proc.wait()
        walls.setdefault(name, time.perf_counter() - started[name])
        if proc.returncode:
            print(f"{name} failed (see {work / 'semi'}/{name}-{stamp}.log)", file=sys.stderr)
            return 1
    if args.only:
        print(f"{args.only}: {outs[args.only]} ({walls[args.only] / 60:.1f} min)")
        return 0
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "template": args.template,
        "epochs": args.epochs,
        "labelled_ids": ids,
        "unlabelled_images": len(list(photos.iterdir())),
        "command": shlex.join(["python", "benchmarks/semi_camvid.py", *sys.argv[1:]]),
    }
    for name, folder in reuse.items():
        if not folder:
            continue
        outs[name] = Path(folder)
        reused = json.loads((outs[name] / "model.json").read_text())
        if reused["training_config"]["epochs"] != args.epochs:  # the same budget (early stopping may end sooner)
            print(f"{folder}: trained for up to {reused['training_config']['epochs']} epochs, not {args.epochs}",
                  file=sys.stderr)  # fmt: skip
            return 1
        walls[name] = reused["train_seconds"]
    outs = {name: outs[name] for name in ("supervised", "semi")}
    for name, out in outs.items():
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        meta = json.loads((out / "model.json").read_text())
        best = next(r for r in records if r["epoch"] == meta["best_epoch"])
        result[name] = {
            "val_mdice": [round(r["val_mdice"], 4) for r in records],
            "best_val_mdice": round(meta["best_val_mdice"], 4),
            "best_epoch": meta["best_epoch"],
            "epochs_run": meta["epochs_run"],
            "best_weights_from": meta.get("best_weights_from"),
            "seed": meta["training_config"]["seed"],
            "per_class_at_best": {k: None if v is None else round(v, 3) for k, v in best["val_dice"].items()},
            "wall_min": round(walls[name] / 60, 1),
            "train_min": round(meta["train_seconds"] / 60, 1),
        }
        if "val_mdice_by_source" in records[0]:
            for source in records[0]["val_mdice_by_source"]:
                result[name][f"val_mdice_{source}"] = [round(r["val_mdice_by_source"][source], 4) for r in records]
            result[name]["pseudo_pixel_share"] = [round(r.get("pseudo_pixel_share", 0.0), 3) for r in records]
    with open(work / "semi.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    sup, semi = result["supervised"], result["semi"]
    print(f"supervised: best {sup['best_val_mdice']:.4f} (epoch {sup['best_epoch']}), {sup['wall_min']} min")
    print(f"semi:       best {semi['best_val_mdice']:.4f} (epoch {semi['best_epoch']}, {semi['best_weights_from']}), "
          f"{semi['wall_min']} min")  # fmt: skip
    print_gain(sup, semi)
    return 0


def summarise(records: list[dict]) -> int:
    """Each arm's best mean Dice over the records (training seeds), the paired gains and the per-class means."""
    if not records:
        print("no records", file=sys.stderr)
        return 1
    arms = ("supervised", "semi")
    best = {arm: np.array([r[arm]["best_val_mdice"] for r in records]) for arm in arms}
    for r in records:
        sup, semi = r["supervised"], r["semi"]
        print(f"seed {sup.get('seed')}/{semi.get('seed')}: supervised {sup['best_val_mdice']:.4f}  "
              f"semi {semi['best_val_mdice']:.4f}  gain {semi['best_val_mdice'] - sup['best_val_mdice']:+.4f}  "
              f"training {sup['train_min']} / {semi['train_min']} min")  # fmt: skip
    n = len(records)
    gains = best["semi"] - best["supervised"]

    def spread(values: np.ndarray) -> float:
        return float(values.std(ddof=1)) if n > 1 else float("nan")

    for arm, v in best.items():
        print(f"{arm:<10} mean {v.mean():.4f}  sd {spread(v):.4f}  min {v.min():.4f}  max {v.max():.4f}")
    for arm in arms:  # the curves averaged over the seeds (every run trains all epochs with patience 0)
        curves = [r[arm]["val_mdice"] for r in records]
        length = min(map(len, curves))
        mean_curve = np.mean([c[:length] for c in curves], axis=0)
        marks = "  ".join(f"{e}: {mean_curve[e - 1]:.3f}" for e in range(5, length + 1, 5))
        print(f"{arm:<10} mean curve by epoch  {marks}")
    sem = spread(gains) / np.sqrt(n)
    print(f"gain       mean {gains.mean():+.4f}  sd {spread(gains):.4f}  standard error {sem:.4f}"
          f"  semi ahead in {int((gains > 0).sum())} of {n}")  # fmt: skip
    classes = list(records[0]["supervised"]["per_class_at_best"])
    mean = {}
    for arm in arms:
        per_class = {c: [r[arm]["per_class_at_best"][c] for r in records] for c in classes}
        mean[arm] = {
            "best_val_mdice": float(best[arm].mean()),
            "per_class_at_best": {c: None if None in v else float(np.mean(v)) for c, v in per_class.items()},
        }
    print_gain(mean["supervised"], mean["semi"])
    return 0


def print_gain(base: dict, other: dict) -> None:
    """The best mean Dice's difference and the per-class Dice at both runs' best epochs."""
    print(f"gain: {other['best_val_mdice'] - base['best_val_mdice']:+.4f}")
    for cls, value in base["per_class_at_best"].items():
        then = other["per_class_at_best"][cls]
        if value is not None and then is not None:
            print(f"  {cls:<12} {value:.3f} -> {then:.3f} ({then - value:+.3f})")


if __name__ == "__main__":
    sys.exit(main())
