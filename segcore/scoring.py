"""Scoring, written once: Dice and IoU (mean and per class) over all pixels of a split, and the
latency of a predictor. Training validation, ``segcore eval``, the pipeline's validation,
quantization and the MLflow reports all score through here."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from segcore.errors import SegcoreError
from segcore.metrics import ConfusionMatrix


def scores_of(
    pairs: Iterable[tuple],
    labels: Sequence[str] | None,
    ignore_index: int,
    num_classes: int = 0,
    combine: Callable[[np.ndarray, int], tuple[np.ndarray, int]] | None = None,
) -> dict:
    """Dice/IoU of (prediction, truth) index-mask pairs, summed over all their pixels:
    ``mdice``, ``miou``, ``per_class`` {name: {dice, iou}}, ``num_images``, ``confusion_matrix``.
    ``combine(matrix, count)`` may replace the confusion matrix and image count before scoring
    (data-parallel validation sums them over the ranks)."""
    tally = Tally(labels, ignore_index, num_classes)
    for prediction, truth in pairs:
        tally.add(prediction, truth)
    return tally.scores(combine)


class Tally:
    """The running confusion matrix and image count behind ``scores_of``, for callers that score
    several predictors on one pass over the data (one tally each)."""

    def __init__(self, labels: Sequence[str] | None, ignore_index: int, num_classes: int = 0):
        self.labels = list(labels) if labels is not None else None
        self.cm = ConfusionMatrix(len(self.labels) if self.labels is not None else num_classes, ignore_index)
        self.count = 0

    def add(self, prediction, truth) -> None:
        self.cm.update(prediction, truth)
        self.count += 1

    def scores(self, combine: Callable[[np.ndarray, int], tuple[np.ndarray, int]] | None = None) -> dict:
        matrix, count = self.cm.matrix, self.count
        if combine is not None:
            matrix, count = combine(matrix, count)
        cm = ConfusionMatrix(self.cm.num_classes, self.cm.ignore_index)
        cm.matrix = matrix
        scores = cm.scores(self.labels)
        scores["num_images"] = count
        scores["confusion_matrix"] = matrix.tolist()
        return scores


def split_items(dataset_root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split of a canonical dataset; an empty split is an error."""
    from segcore.data.convert import load_manifest

    root = Path(dataset_root)
    items = load_manifest(root)["items"].get(split, [])
    if not items:
        raise SegcoreError(f"split '{split}' is empty", root)
    return [(root / it["image"], root / it["mask"]) for it in items]


def score_items(
    predict: Callable[[np.ndarray], np.ndarray],
    items: Sequence[tuple[Path, Path]],
    labels: Sequence[str],
    ignore_index: int,
    progress: bool = False,
) -> dict:
    """Scores of ``predict(rgb_image) -> index mask``, each image at its own size."""
    from tqdm import tqdm

    from segcore.data.dataset import read_mask, read_rgb

    bar = tqdm(items, desc="eval", disable=not progress, leave=False)
    return scores_of(((predict(read_rgb(image)), read_mask(mask)) for image, mask in bar), labels, ignore_index)


def score_split(predictor, dataset_root: str | Path, split: str, progress: bool = False) -> dict:
    """Scores of ``predictor.predict`` on a split of a canonical dataset."""
    from segcore.data.convert import load_manifest

    ignore = load_manifest(dataset_root)["ignore_index"]
    return score_items(predictor.predict, split_items(dataset_root, split), predictor.labels, ignore, progress)


def latency_samples(predict: Callable[[np.ndarray], object], images: Sequence[np.ndarray], repeats: int = 3) -> list:
    """Milliseconds of each ``predict(image)`` call, ``repeats`` passes over ``images`` (no warm-up)."""
    times = []
    for _ in range(repeats):
        for image in images:
            started = time.perf_counter()
            predict(image)
            times.append((time.perf_counter() - started) * 1000)
    return times


def measure_latency(predict: Callable[[np.ndarray], object], images: Sequence[np.ndarray], repeats: int = 3) -> float:
    """Median milliseconds of one ``predict(image)`` on real images, pre- and post-processing
    included (after one warm-up call): what a user of ``segcore predict`` waits per image. Every
    latency segcore reports (export, optimize, eval, the pipeline, benchmarks/bench_deploy.py) is
    this figure."""
    if not images:
        return 0.0
    predict(images[0])
    return statistics.median(latency_samples(predict, images, repeats))
