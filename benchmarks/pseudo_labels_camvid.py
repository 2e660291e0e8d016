"""How good are a network's pseudo-labels on semi_camvid.py's unlabelled images? (issue 18)

Run by hand, after semi_camvid.py:

    python benchmarks/pseudo_labels_camvid.py RUN [RUN ...] --unlabelled WORK/camvid-unlabelled-321

The unlabelled images of the benchmark are CamVid training images whose masks were set aside, so
their pseudo-labels can be scored. For each run folder (a finished or unfinished training with a
last.pt) it takes the teacher of a semi-supervised run (the student with --network student) or the
model of a supervised run, labels every unlabelled image as the training does (softmax, argmax,
pixels whose probability reaches --threshold), and prints per true class: the share of its pixels
given a pseudo-label, the share of those that are right, and the class most often given instead;
then the precision of each pseudo-label class. The whole image is resized to the input size (the
training labels random crops of it), so the figures describe the network, not exact batches.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "datasets" / "camvid"


def network(run: Path, which: str) -> tuple[torch.nn.Module, int, str]:
    """(model in eval mode, epoch, which network) from RUN/last.pt."""
    from segcore.models import create_model, get_template

    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    classes = len(json.loads((run / "model.json").read_text())["labels"])
    model = create_model(get_template(saved["template"]), classes)
    if which == "student" or "ema" not in saved:
        model.load_state_dict(saved["model"])
        which = "student" if "ema" in saved else "model"
    else:
        model.load_state_dict(saved["ema"]["model"])
    return model.eval(), saved["epoch"], which


@torch.no_grad()
def score(model, images: list[Path], masks: Path, classes: int, thresholds: list[float], size: int) -> tuple:
    """({threshold: confusion over the pixels labelled at it [true, pseudo]}, pixels per true class)."""
    from segcore.data.transforms import eval_preprocess

    confusion = {t: np.zeros((classes, classes), np.int64) for t in thresholds}
    pixels = np.zeros(classes, np.int64)
    for path in images:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        truth = cv2.imread(str(masks / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        x = torch.from_numpy(eval_preprocess(image, (size, size)))[None]
        prob = model(x, size=image.shape[:2]).float().softmax(1)[0]
        conf, label = prob.max(0)
        valid = truth < classes
        pixels += np.bincount(truth[valid].ravel(), minlength=classes)[:classes]
        pair = truth.astype(np.int64) * classes + label.numpy()
        for t in thresholds:
            keep = (conf >= t).numpy() & valid
            confusion[t] += np.bincount(pair[keep], minlength=classes * classes).reshape(classes, classes)
    return confusion, pixels


def report(confusion: np.ndarray, names: list[str], pixels: np.ndarray) -> None:
    print(f"  {'true class':<12} {'share labelled':>14} {'right':>7}  most often given instead")
    for c, name in enumerate(names):
        row = confusion[c]
        wrong = row.copy()
        wrong[c] = 0
        instead = f"{names[int(wrong.argmax())]} ({wrong.max() / max(1, row.sum()):.2f})" if wrong.any() else "-"
        share = row.sum() / max(1, pixels[c])
        right = row[c] / max(1, row.sum())
        print(f"  {name:<12} {share:>14.2f} {right:>7.2f}  {instead}")
    precision = np.diag(confusion) / np.maximum(1, confusion.sum(0))
    print(
        "  precision of each pseudo-label: " + ", ".join(f"{n} {p:.2f}" for n, p in zip(names, precision, strict=True))
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="training output folders (with last.pt)")
    ap.add_argument("--unlabelled", type=Path, required=True, help="semi_camvid.py's WORK/camvid-unlabelled-321")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("SEGCORE_CAMVID", str(DEFAULT_DATA))))
    ap.add_argument(
        "--threshold",
        type=lambda text: [float(t) for t in text.split(",")],
        default=[0.95],
        help="the --pseudo-threshold of the runs; several, comma-separated, to compare (default 0.95)",
    )
    ap.add_argument("--network", choices=("teacher", "student"), default="teacher")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    args = ap.parse_args()
    images = sorted(args.unlabelled.iterdir())[: args.limit or None]
    masks = args.data / "annotations" / "train"
    for run in args.runs:
        model, epoch, which = network(run, args.network)
        meta = json.loads((run / "model.json").read_text())
        names, size = meta["labels"], meta["input_size"][0]
        confusions, pixels = score(model, images, masks, len(names), args.threshold, size)
        for threshold, confusion in confusions.items():
            right = np.trace(confusion) / max(1, confusion.sum())
            print(f"{run} ({which}, epoch {epoch}): {len(images)} images, {confusion.sum() / pixels.sum():.2f} of "
                  f"the pixels labelled at >= {threshold}, {right:.3f} of those right")  # fmt: skip
            report(confusion, names, pixels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
