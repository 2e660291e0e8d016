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
from PIL import Image, UnidentifiedImageError

from segcore import __version__
from segcore.data.meta import LabelSpec, default_colors
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
    try:
        data = item.image_path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: truncated files fail here
            width, height = img.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"unreadable or truncated image ({reason})", item.image_path) from None
    mask = item.load_mask()
    if mask.shape != (height, width):
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
    image_rel = f"images/{item.split}/{name}{item.image_path.suffix.lower()}"
    mask_rel = f"masks/{item.split}/{name}.png"
    (out / image_rel).write_bytes(data)
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(out / mask_rel, compress_level=1)
    digest = hashlib.sha256(data)
    digest.update(np.ascontiguousarray(mask).tobytes())
    return _Written(item.split, item.item_id, image_rel, mask_rel, height, width, digest.hexdigest(), counts)


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
    if source.spec is None and default_spec is not None:
        source.spec = default_spec
    for note in source.notes:
        log.info("%s", note)
    split_info = None
    if as_split is not None:
        for item in source.items:
            item.split = as_split
        source.val_location = None
    elif not any(i.split == "val" for i in source.items) and source.val_location is None:
        split_train_val(source.items, val_ratio, seed)
        split_info = {"from": "train", "val_ratio": val_ratio, "seed": seed}
        log.info("no validation split given: took %.0f%% of train as val (seed %d)", val_ratio * 100, seed)
    required = (as_split,) if as_split else SPLITS
    _check_not_empty(source, Path(train_root), required)

    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "masks" / split).mkdir(parents=True)
        written, invalid = _run(source, tmp, skip_invalid, workers, progress)
        manifest = _manifest(source, written, split_info, Path(train_root))
        _check_not_empty_after_skip(manifest, Path(train_root), required)
        elapsed = time.perf_counter() - started
        report = {
            "checked": len(source.items),
            "written": len(written),
            "skipped": invalid,
            "seconds": round(elapsed, 3),
            "notes": source.notes,
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


def _check_not_empty(source: Source, train_root: Path, splits: tuple[str, ...]) -> None:
    for split in splits:
        if not any(i.split == split for i in source.items):
            where = source.val_location if split == "val" and source.val_location else train_root
            raise DataError(f"the {split} split is empty: no images or masks found", where)


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


def _manifest(source: Source, written: list[_Written], split_info: dict | None, root: Path) -> dict:
    spec = source.spec
    totals = {s: np.zeros(256, dtype=np.int64) for s in SPLITS}
    for w in written:
        totals[w.split] += w.counts
    if spec is None:  # no label names anywhere: one label per value seen below the ignore index
        seen = np.flatnonzero(sum(totals.values()))
        seen = [int(v) for v in seen if v != 255]
        n = (max(seen) + 1) if seen else 1
        spec = LabelSpec(tuple(f"class_{i}" for i in range(n)), tuple(default_colors(n)), 255)
        log.info("no %s found: labels named class_0..class_%d", "dataset_meta.json", n - 1)
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
        "splits": {s: len(items[s]) for s in SPLITS},
        "val_split": split_info,
        "content_hash": digest.hexdigest(),
        "class_pixels": {s: [int(v) for v in totals[s][:n]] for s in SPLITS},
        "ignored_pixels": {s: int(totals[s][spec.ignore_index]) for s in SPLITS},
        "items": items,
    }


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
