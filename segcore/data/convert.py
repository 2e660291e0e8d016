"""Validate a user dataset and write segcore's canonical dataset.

Canonical layout (what every later step reads)::

    OUT/manifest.json               format, labels, colours, ignore index, splits, items, hashes,
                                    pixel counts per class per split
    OUT/images/<split>/<id>.<ext>   the original image bytes, checked to decode completely
    OUT/masks/<split>/<id>.png      uint8 index masks (label ids; ignored pixels = ignore index)
    OUT/report.json                 what was checked, what was skipped (--skip-invalid) and why

The folder is written under a temporary name next to OUT and renamed when complete, so a crash or
an error never leaves something that looks finished.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segcore import __version__
from segcore.data.meta import META_FILE, LabelSpec, default_colors
from segcore.data.sources import RawItem, Source, open_dataset
from segcore.errors import DataError, SegcoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPORT = "report.json"
SPLITS = ("train", "val")
MANIFEST_VERSION = 1


@dataclass
class _Written:
    split: str
    item_id: str
    image: str  # relative to the output folder
    mask: str
    height: int
    width: int
    digest: str  # sha256 of image bytes + mask pixels
    counts: np.ndarray  # pixels per value 0..255


def _safe_name(item_id: str) -> str:
    return item_id.replace("\\", "/").strip("/").replace("/", "__")


def _process(item: RawItem, spec: LabelSpec | None, out: Path) -> _Written:
    """Check one item (decode image fully, decode mask, compare sizes and values) and write it."""
    if item.image_path is None:
        raise DataError("mask has no image with the same name", item.mask_path)
    if item.load_mask is None:
        raise DataError("image has no mask with the same name", item.image_path)
    suffix = item.image_path.suffix.lower()
    try:
        data = item.image_path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: truncated files fail here
            stored = img.size
            orientation = _exif_orientation(img)
            if orientation != 1:
                # Viewers and annotation tools show the image rotated as its EXIF says, and
                # OpenCV reads it so: keep that orientation, in a file without the tag.
                upright = ImageOps.exif_transpose(img)
                buffer = io.BytesIO()
                upright.save(buffer, format="PNG", compress_level=1)
                data, suffix = buffer.getvalue(), ".png"
                stored_name = f"{stored[0]}x{stored[1]}"
            width, height = upright.size if orientation != 1 else stored
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"unreadable or truncated image ({reason})", item.image_path) from None
    mask = item.load_mask()
    if mask.shape != (height, width):
        if orientation != 1 and mask.shape == (stored[1], stored[0]):
            raise DataError(
                f"mask is {mask.shape[1]}x{mask.shape[0]}, the stored size of its image {item.image_path.name}, "
                f"but the image's EXIF orientation ({orientation}) shows it as {width}x{height}; save the mask "
                f"as the image is shown, or remove the image's orientation tag (stored {stored_name})",
                item.mask_path,
            )
        raise DataError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {item.image_path.name} is {width}x{height}",
            item.mask_path,
        )
    counts = np.bincount(mask.ravel(), minlength=256)
    if spec is not None:
        bad = [v for v in np.flatnonzero(counts) if v >= spec.num_classes and v != spec.ignore_index]
        if bad:
            raise DataError(
                f"mask value {bad[0]} is neither a label (0..{spec.num_classes - 1}) "
                f"nor the ignore index {spec.ignore_index}",
                item.mask_path,
            )
    name = _safe_name(item.item_id)
    image_rel = f"images/{item.split}/{name}{suffix}"
    mask_rel = f"masks/{item.split}/{name}.png"
    (out / image_rel).write_bytes(data)
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(out / mask_rel, compress_level=1)
    digest = hashlib.sha256(data)
    digest.update(np.ascontiguousarray(mask).tobytes())
    return _Written(item.split, item.item_id, image_rel, mask_rel, height, width, digest.hexdigest(), counts)


def _exif_orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except (TypeError, ValueError, SyntaxError, OSError):
        return 1
    return value if 1 <= value <= 8 else 1


def split_train_val(items: list[RawItem], val_ratio: float, seed: int) -> list[RawItem]:
    """Move a deterministic fraction of the training items to 'val' (sorted ids, seeded shuffle)."""
    if not 0.0 < val_ratio < 1.0:
        raise SegcoreError(f"--val-ratio must be between 0 and 1, got {val_ratio}")
    train = sorted((i for i in items if i.split == "train"), key=lambda i: i.item_id)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(train) * val_ratio)) if len(train) > 1 else 0
    for index in order[:n_val]:
        train[index].split = "val"
    return items


def convert(
    train_root: str | Path,
    output: str | Path,
    *,
    val_root: str | Path | None = None,
    train_ann: str | Path | None = None,
    val_ann: str | Path | None = None,
    fmt: str = "auto",
    val_ratio: float = 0.2,
    seed: int = 42,
    skip_invalid: bool = False,
    overwrite: bool = False,
    as_split: str | None = None,
    default_spec: LabelSpec | None = None,
    workers: int | None = None,
    progress: Callable[[int], object] | bool = False,
) -> dict:
    """Convert a dataset to the canonical layout at ``output``; return the manifest.

    ``as_split`` puts every item into that split (test data for evaluation); the other split
    stays empty. ``default_spec`` names the labels when the data itself does not (a model's labels
    for its test data).
    """
    started = time.perf_counter()
    output = Path(output)
    if output.exists() and not overwrite:
        raise SegcoreError("output already exists; give a new folder or --overwrite", output)
    source = open_dataset(
        Path(train_root),
        Path(val_root) if val_root else None,
        Path(train_ann) if train_ann else None,
        Path(val_ann) if val_ann else None,
        fmt,
    )
    from_model = source.spec is None and default_spec is not None
    if from_model:
        source.spec = default_spec
    for note in source.notes:
        log.info("%s", note)
    split_info = _assign_splits(source, Path(train_root), as_split, val_ratio, seed)
    required = (as_split,) if as_split else SPLITS
    _check_not_empty(source, Path(train_root), required)

    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "masks" / split).mkdir(parents=True)
        written, invalid = _run(source, tmp, skip_invalid, workers, progress)
        spec, label_source = _decide_labels(source, written, tmp, Path(train_root), from_model)
        manifest = _manifest(source, spec, label_source, written, split_info, Path(train_root))
        _check_not_empty_after_skip(manifest, Path(train_root), required)
        warnings = [] if as_split else check_trainable(manifest, Path(train_root))
        manifest["warnings"] = warnings
        elapsed = time.perf_counter() - started
        report = {
            "checked": len(source.items),
            "written": len(written),
            "skipped": invalid,
            "seconds": round(elapsed, 3),
            "notes": source.notes,
            "warnings": warnings,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["output"] = str(output)
    manifest["seconds"] = round(elapsed, 3)
    manifest["skipped"] = len(invalid)
    return manifest


def _assign_splits(source: Source, root: Path, as_split: str | None, val_ratio: float, seed: int) -> dict | None:
    """Everything into ``as_split``, or val split off train when none is given (how, or None)."""
    if as_split is not None:
        for item in source.items:
            item.split = as_split
        source.val_location = None
        return None
    if any(i.split == "val" for i in source.items) or source.val_location is not None:
        return None
    _check_enough_to_split(source, root)
    split_train_val(source.items, val_ratio, seed)
    log.info("no validation split given: took %.0f%% of train as val (seed %d)", val_ratio * 100, seed)
    return {"from": "train", "val_ratio": val_ratio, "seed": seed}


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished folder into place; an older output is removed only after that."""
    output.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
    os.rename(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_enough_to_split(source: Source, train_root: Path) -> None:
    """Without a validation split, val is taken from train: that needs two labelled items."""
    labelled = sum(1 for i in source.items if i.split == "train" and i.image_path and i.load_mask)
    if labelled == 1:  # none at all: the empty-split and pairing checks say what is wrong
        raise DataError(
            "too few labelled items to split into train and val: 1 image+mask pair found, at least 2 are "
            "needed (10 or more advised); add items, "
            "or give a validation split (images/val + annotations/val beside images/train, or "
            "--val-data-root with --val-ann-files)",
            train_root,
        )


def _check_not_empty(source: Source, train_root: Path, splits: tuple[str, ...]) -> None:
    for split in splits:
        if not any(i.split == split for i in source.items):
            where = source.val_location if split == "val" and source.val_location else train_root
            hint = ""
            if source.unused_subsets:
                found = ", ".join(f"'{k}' ({v} items)" for k, v in sorted(source.unused_subsets.items()))
                hint = f" (subsets found: {found}; segcore reads train, val and default)"
            raise DataError(f"the {split} split is empty: no images or masks found{hint}", where)


def _check_not_empty_after_skip(manifest: dict, train_root: Path, splits: tuple[str, ...]) -> None:
    for split in splits:
        if manifest["splits"][split] == 0:
            raise DataError(f"the {split} split is empty after skipping invalid items", train_root)


def _run(source: Source, tmp: Path, skip_invalid: bool, workers: int | None, progress) -> tuple[list, list]:
    from tqdm import tqdm

    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    written: list[_Written] = []
    invalid: list[dict] = []

    def task(item: RawItem):
        try:
            return _process(item, source.spec, tmp)
        except DataError as exc:
            if not skip_invalid:
                raise
            return exc, item

    bar = tqdm(total=len(source.items), unit="item", desc="convert", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            # Datumaro's decoders read context variables set in this thread: run each task in a copy.
            jobs = [(item, contextvars.copy_context()) for item in source.items]
            for result in pool.map(lambda job: job[1].run(task, job[0]), jobs):
                bar.update(1)
                if isinstance(result, _Written):
                    written.append(result)
                else:
                    exc, item = result
                    invalid.append({"split": item.split, "id": item.item_id, "file": exc.path, "problem": str(exc)})
                    log.warning("skipped %s", exc)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
    return written, invalid


# Without dataset_meta.json, mask values are class ids 0..K-1. Refuse what cannot be that: values
# far apart (grey levels chosen per class) or too many (a greyscale image, an anti-aliased mask).
MAX_INFERRED_CLASSES = 100
BINARY_LABELS = ("background", "foreground")


def _value_totals(written: list[_Written]) -> np.ndarray:
    total = np.zeros(256, dtype=np.int64)
    for w in written:
        total += w.counts
    return total


def _decide_labels(source: Source, written: list[_Written], tmp: Path, root: Path, from_model: bool):
    """The label set and how it was found: declared by the data, the model's (evaluation), read
    from the mask values, or binary 0/255 masks (then rewritten in ``tmp`` as 0/1)."""
    totals = _value_totals(written)
    seen = {int(v) for v in np.flatnonzero(totals)}
    spec = source.spec
    binary = seen == {0, 255} and (spec is None or (from_model and spec.num_classes == 2))
    if binary:
        _binary_to_index(written, tmp)
        labels = spec.labels if spec is not None else BINARY_LABELS
        log.info(
            "masks hold only the values 0 and 255 and no %s declares them: read as binary masks, "
            "0 = %s, 255 = %s (label 1); a %s with ignore_index 255 says otherwise",
            META_FILE,
            labels[0],
            labels[1],
            META_FILE,
        )
        colors = spec.colors if spec is not None else ((0, 0, 0), (255, 255, 255))
        return LabelSpec(tuple(labels), tuple(colors), 255), "binary 0/255"
    if spec is not None:
        return spec, "model" if from_model else "declared"
    values = sorted(seen - {255})
    n = (values[-1] + 1) if values else 1
    unused = n - len(values)
    if n > MAX_INFERRED_CLASSES or unused > max(2, len(values)):
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise DataError(
            f"mask values ({shown}; {len(values)} distinct) are not class ids 0..K-1 and no {META_FILE} "
            "names them: a greyscale or anti-aliased image, or classes coded as grey levels; save index "
            f"masks with ids 0..K-1 (255 = ignore), or write {META_FILE} with the labels",
            root,
        )
    log.info("no %s found: labels named class_0..class_%d from the mask values", META_FILE, n - 1)
    return LabelSpec(tuple(f"class_{i}" for i in range(n)), tuple(default_colors(n)), 255), "mask values"


def _binary_to_index(written: list[_Written], tmp: Path) -> None:
    """Rewrite 0/255 masks as 0/1 (and their counts and digests)."""
    for w in written:
        mask = (np.asarray(Image.open(tmp / w.mask)) == 255).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(tmp / w.mask, compress_level=1)
        digest = hashlib.sha256((tmp / w.image).read_bytes())
        digest.update(np.ascontiguousarray(mask).tobytes())
        w.digest = digest.hexdigest()
        w.counts = w.counts.copy()
        w.counts[1], w.counts[255] = w.counts[255], 0


def _manifest(
    source: Source, spec: LabelSpec, label_source: str, written: list[_Written], split_info: dict | None, root: Path
) -> dict:
    totals = {s: np.zeros(256, dtype=np.int64) for s in SPLITS}
    for w in written:
        totals[w.split] += w.counts
    n = spec.num_classes
    digest = hashlib.sha256(json.dumps([spec.labels, spec.ignore_index]).encode())
    for w in sorted(written, key=lambda w: (w.split, w.item_id)):
        digest.update(f"{w.split}/{w.item_id}:{w.digest}\n".encode())
    items = {s: [] for s in SPLITS}
    for w in sorted(written, key=lambda w: w.item_id):
        items[w.split].append({"id": w.item_id, "image": w.image, "mask": w.mask, "height": w.height, "width": w.width})
    return {
        "manifest_version": MANIFEST_VERSION,
        "segcore_version": __version__,
        "format": source.format,
        "source": str(root.resolve()),
        "labels": list(spec.labels),
        "colors": [list(c) for c in spec.colors],
        "ignore_index": spec.ignore_index,
        "label_source": label_source,
        "splits": {s: len(items[s]) for s in SPLITS},
        "val_split": split_info,
        "content_hash": digest.hexdigest(),
        "class_pixels": {s: [int(v) for v in totals[s][:n]] for s in SPLITS},
        "ignored_pixels": {s: int(totals[s][spec.ignore_index]) for s in SPLITS},
        "items": items,
    }


def check_trainable(manifest: dict, root: Path) -> list[str]:
    """Refuse a dataset a model cannot learn from; return warnings about what it can learn."""
    labels, ignore = manifest["labels"], manifest["ignore_index"]
    pixels = manifest["class_pixels"]
    binary_hint = (
        " (masks whose only value is 255 read as all-ignored; if 255 marks your object, the background must be 0)"
        if manifest["label_source"] != "declared"
        else ""
    )
    for split in SPLITS:
        if sum(pixels[split]) == 0:
            raise DataError(
                f"no labelled pixel in the {split} split: every mask pixel is the ignore index {ignore}{binary_hint}",
                root,
            )
    present = [name for name, count in zip(labels, pixels["train"], strict=True) if count > 0]
    if len(present) == 1:
        raise DataError(
            f"only one class ('{present[0]}') has labelled pixels in the training split; a segmentation model "
            "needs at least two (e.g. background and object): label the rest of each image, or check that "
            f"{META_FILE}'s ignore_index does not hide a class",
            root,
        )
    warnings = []
    val_only = [name for name, t, v in zip(labels, pixels["train"], pixels["val"], strict=True) if v > 0 and t == 0]
    if val_only:
        warnings.append(
            f"class{'es' if len(val_only) > 1 else ''} {', '.join(val_only)} ha{'ve' if len(val_only) > 1 else 's'} "
            "labelled pixels in val but none in train: the model cannot learn "
            f"{'them' if len(val_only) > 1 else 'it'} and its val Dice will be 0"
        )
    for text in warnings:
        log.warning("%s", text)
    return warnings


def load_manifest(folder: str | Path) -> dict:
    """Read a canonical dataset's manifest, with a clear error if ``folder`` is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"not a segcore dataset (no {MANIFEST}); run 'segcore convert' first", folder)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable manifest ({exc})", path) from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise DataError(f"manifest version {manifest.get('manifest_version')} is not supported", path)
    return manifest
