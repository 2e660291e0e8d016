"""The plots and overlays a scoring step logs: confusion matrix, per-class Dice, prediction panels."""

from __future__ import annotations

import logging
from pathlib import Path

from segcore.tracking.tracker import Tracker

log = logging.getLogger("segcore.tracking")


def log_segmentation_report(
    tracker: Tracker,
    predictor,
    dataset_root: str | Path,
    split: str = "val",
    *,
    scores: dict | None = None,
    prefix: str = "val",
    num_overlays: int = 4,
) -> dict | None:
    """Confusion-matrix and per-class Dice plots (plots/<prefix>_*.png) and image | ground truth |
    prediction panels of the first ``num_overlays`` items (overlays/<prefix>_<id>.png) of a split of
    a canonical dataset. ``predictor``: anything with ``predict(rgb_uint8_image) -> index mask``
    (``TorchPredictor``, ``OpenVINOPredictor``). Without ``scores`` (a dict with
    ``confusion_matrix`` and ``per_class``) the split is scored here, each image at its own size.
    Returns the scores; None when tracking is off (nothing is computed then)."""
    if not tracker.enabled:
        return None
    import matplotlib.pyplot as plt

    from segcore import plots
    from segcore.data.convert import load_manifest
    from segcore.data.dataset import SegmentationDataset
    from segcore.scoring import score_split

    manifest = load_manifest(dataset_root)
    labels, colors, ignore = manifest["labels"], manifest["colors"], manifest["ignore_index"]
    items = SegmentationDataset(dataset_root, split)
    try:
        if scores is None:
            scores = score_split(predictor, dataset_root, split)
        for index in range(min(num_overlays, len(items))):
            image, truth = items.load(index)
            prediction = predictor.predict(image)
            item_id = items.items[index]["id"].replace("/", "_")
            fig = plots.overlay_panel(image, truth, prediction, labels, colors, ignore, title=item_id)
            tracker.log_figure(fig, f"overlays/{prefix}_{item_id}.png")
        tracker.log_figure(
            plots.confusion_matrix_figure(scores["confusion_matrix"], labels, f"{prefix} confusion matrix"),
            f"plots/{prefix}_confusion_matrix.png",
        )
        tracker.log_figure(
            plots.per_class_dice_figure(scores["per_class"], f"{prefix} Dice per class"),
            f"plots/{prefix}_per_class_dice.png",
        )
    except Exception as exc:  # noqa: BLE001 - a report must never fail the step
        log.warning("could not draw the %s report: %s", prefix, exc)
        plt.close("all")
    return scores
