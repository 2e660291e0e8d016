"""The evaluate step (``segcore eval``, the pipeline's validation) and the predict step."""

from __future__ import annotations

import tempfile
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.tracking import TrackingOptions

LATENCY_IMAGES = 8


def evaluate_step(
    model: str,
    data: str,
    *,
    test_ann: str | None = None,
    fmt: str = "auto",
    split: str = "val",
    html: str | None = None,
    overlays: int = 4,
    run_name: str | None = None,
    tags: dict | None = None,
    progress: bool = False,
    tracking: TrackingOptions | None = None,
    device: str | None = None,
) -> dict:
    """Score ``model`` (bundle or IR, local or s3://) on labelled ``data`` (a canonical dataset's
    ``split``, or raw data, which takes the model's labels); each image at its own size. Returns
    mdice, miou, per_class, num_images, confusion_matrix and latency_ms; with ``html`` also writes
    an HTML report (summary, per-class scores, ``overlays`` prediction panels) there."""
    from segcore import storage
    from segcore.data.convert import load_manifest
    from segcore.inference import load_predictor
    from segcore.scoring import score_split
    from segcore.tracking import check_tracking, log_segmentation_report, redact, tracking_run

    check_tracking(tracking)
    local_model = storage.local_model(model)
    predictor = load_predictor(local_model, device)
    family = local_model.parent if local_model.suffix.lower() == ".xml" else local_model
    with tempfile.TemporaryDirectory(prefix="segcore-eval-") as tmp:
        root, split = _canonical(data, test_ann, fmt, split, Path(tmp), predictor)
        manifest = load_manifest(root)
        if manifest["labels"] != predictor.labels:
            raise SegcoreError(f"labels {manifest['labels']} differ from the model's {predictor.labels}", data)
        scores = score_split(predictor, root, split, progress=progress)
        scores["latency_ms"] = _latency(predictor, root, split)
        name = run_name or f"eval {family.name}"
        with tracking_run(tracking, "eval", run_name=name, bundle=family, tags=tags) as tracker:
            tracker.log_params({"model": redact(model), "test_data": redact(data), "split": split})
            tracker.log_dataset(manifest, data, split)
            tracker.log_metrics(eval_metrics(scores))
            log_segmentation_report(
                tracker, predictor, root, split, scores=scores, prefix="test", num_overlays=overlays
            )
            if html:
                _write_html(html, name, predictor, root, split, scores, overlays)
                tracker.log_artifact(html, "report")
    return scores


def eval_metrics(scores: dict) -> dict:
    """The evaluate step's MLflow metrics."""
    return {
        "test_dice": scores["mdice"],
        "test_miou": scores["miou"],
        "test_images": scores["num_images"],
        "latency_ms": scores["latency_ms"],
        **{f"test_dice/{k}": v["dice"] for k, v in scores["per_class"].items()},
    }


def _canonical(data: str, test_ann, fmt: str, split: str, workdir: Path, predictor) -> tuple[Path, str]:
    """The test data as a canonical dataset; raw data without label names takes the model's."""
    from segcore import storage
    from segcore.data.convert import MANIFEST, convert
    from segcore.data.meta import LabelSpec

    root = storage.local_input(data)
    if (root / MANIFEST).is_file():
        return root, split
    ann = storage.local_input(test_ann) if test_ann else None
    meta = predictor.meta
    spec = LabelSpec(tuple(meta["labels"]), tuple(tuple(c) for c in meta["colors"]), meta["ignore_index"])
    convert(root, workdir / "test", train_ann=ann, fmt=fmt, as_split="val", default_spec=spec)
    return workdir / "test", "val"


def _latency(predictor, root: Path, split: str) -> float:
    from segcore.data.dataset import read_rgb
    from segcore.scoring import measure_latency, split_items

    images = [read_rgb(image) for image, _ in split_items(root, split)[:LATENCY_IMAGES]]
    return round(measure_latency(predictor.predict, images), 3)


def _write_html(path: str, title: str, predictor, root: Path, split: str, scores: dict, overlays: int = 4) -> None:
    from segcore.data.dataset import read_mask, read_rgb
    from segcore.scoring import split_items
    from segcore.steps.htmlreport import html_report, overlay_panel, png_base64

    manifest_ignore = predictor.meta["ignore_index"]
    panels = []
    for image_path, mask_path in split_items(root, split)[:overlays]:
        image = read_rgb(image_path)
        panel = overlay_panel(
            image, read_mask(mask_path), predictor.predict(image), predictor.meta["colors"], manifest_ignore
        )
        panels.append((image_path.stem, png_base64(panel)))
    summary = {
        "model": title,
        "template": predictor.meta.get("template"),
        "precision": predictor.meta.get("precision", "FP32"),
        "mean_dice": scores["mdice"],
        "mean_iou": scores["miou"],
        "latency_ms": scores["latency_ms"],
        "num_images": scores["num_images"],
    }
    heading = f"{title}: mean Dice {scores['mdice']:.4f} on {scores['num_images']} images"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(html_report(heading, scores, summary, panels, predictor.meta["colors"]))


def predict_step(model: str, images: str, output: str, *, overlays: bool = False, device: str | None = None) -> int:
    """Write one uint8 index-mask PNG per image (same stem, original size) to ``output``, and
    colour overlays with ``overlays``; return the number of images."""
    import cv2

    from segcore import storage
    from segcore.data.dataset import read_rgb
    from segcore.data.sources import IMAGE_EXTENSIONS
    from segcore.inference import load_predictor, overlay

    predictor = load_predictor(storage.local_model(model), device)
    source = storage.local_input(images)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    elif source.is_file():
        files = [source]
    else:
        raise SegcoreError("does not exist", source)
    if not files:
        raise SegcoreError("no images found", source)
    with storage.local_output(output, exist_ok=True) as out:
        out.mkdir(parents=True, exist_ok=True)
        for path in files:
            image = read_rgb(path)
            mask = predictor.predict(image)
            _write_png(out / f"{path.stem}.png", mask)
            if overlays:
                blend = overlay(image, mask, predictor.meta["colors"])
                _write_png(out / f"{path.stem}_overlay.png", cv2.cvtColor(blend, cv2.COLOR_RGB2BGR))
    return len(files)


def _write_png(path: Path, array) -> None:
    import os

    import cv2

    tmp = path.with_name(f".{path.name}.tmp.png")
    if not cv2.imwrite(str(tmp), array):
        raise SegcoreError("cannot write", path)
    os.replace(tmp, path)
