"""Figures for people: confusion matrix, per-class Dice, and image | ground truth | prediction panels.

matplotlib with the Agg backend (no display needed); every function returns a Figure that the
caller saves or logs and then closes (``plt.close(fig)``).
"""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_figure(matrix, labels: list[str], title: str = "confusion matrix"):
    """Rows: ground truth, columns: prediction, each row normalised to 1 (pixel shares)."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(labels)
    side = min(3 + 0.55 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{title} (row-normalised, {int(m.sum()):,} pixels)")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if share[i, j] >= 0.005:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def per_class_dice_figure(per_class: dict, title: str = "Dice per class"):
    """Horizontal bars of each class's Dice; classes absent from prediction and ground truth say n/a."""
    plt = _pyplot()
    names = list(per_class)
    values = [per_class[k]["dice"] for k in names]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(names)))
    y = np.arange(len(names))
    ax.barh(y, [v or 0.0 for v in values], color="tab:blue")
    for i, v in enumerate(values):
        ax.text((v or 0.0) + 0.01, i, "n/a" if v is None else f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("Dice")
    present = [v for v in values if v is not None]
    mean = f"mean {np.mean(present):.3f}" if present else "no classes present"
    ax.set_title(f"{title} ({mean})")
    fig.tight_layout()
    return fig


def overlay_panel(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    labels: list[str],
    colors: list,
    ignore_index: int = 255,
    title: str = "",
):
    """image | ground truth | prediction side by side, masks blended over the image, with a legend
    of the classes that appear; ignored ground-truth pixels are shown in grey."""
    from matplotlib.patches import Patch

    from segcore.inference import overlay

    plt = _pyplot()
    gt_view = overlay(image, np.where(truth == ignore_index, 0, truth).astype(np.uint8), colors)
    gt_view[truth == ignore_index] = (128, 128, 128)
    pred_view = overlay(image, prediction.astype(np.uint8), colors)
    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(12, 12 * h / (3 * w) + 1.0))
    for ax, view, name in zip(axes, (image, gt_view, pred_view), ("image", "ground truth", "prediction"), strict=True):
        ax.imshow(view)
        ax.set_title(name)
        ax.axis("off")
    shown = sorted({int(v) for v in np.unique(truth) if v != ignore_index} | {int(v) for v in np.unique(prediction)})
    handles = [Patch(color=np.asarray(colors[i]) / 255.0, label=labels[i]) for i in shown if i < len(labels)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    return fig
