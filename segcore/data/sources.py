"""Finding and opening user datasets: the plain image/mask-folder layout and, through Datumaro,
ADE20K, Cityscapes, Pascal VOC, Common Semantic Segmentation and CamVid.

A reader turns a dataset into ``RawItem``s: an image path plus a callable that decodes the item's
mask into canonical label ids (uint8; ignored pixels = the ignore index). Nothing is decoded here
except where Datumaro's importers do it themselves; validation and writing happen in
``segcore.data.convert``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segcore.data.meta import (
    DEFAULT_IGNORE_INDEX,
    META_FILE,
    LabelSpec,
    default_colors,
    find_meta_file,
    read_meta_file,
)
from segcore.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PLAIN = "plain"
# Datumaro format names we accept, mapped to the Datumaro importers that read their class masks.
DATUMARO_FORMATS: dict[str, tuple[str, ...]] = {
    "ade20k2017": ("ade20k2017",),
    "ade20k2020": ("ade20k2020",),
    "cityscapes": ("cityscapes",),
    "voc": ("voc_segmentation",),
    "common_semantic_segmentation": (
        "common_semantic_segmentation_with_subset_dirs",
        "common_semantic_segmentation",
    ),
    "camvid": ("camvid",),
}
SUPPORTED_FORMATS = (PLAIN, *DATUMARO_FORMATS)
# Formats whose mask pixel values are Datumaro label ids (ADE20K stores its own class indices).
_IDENTITY_FORMATS = {"cityscapes", "voc", "common_semantic_segmentation", "camvid"}
# Labels some formats declare for unlabelled pixels (VOC: "ignored"; CamVid: "Void").
_IGNORE_LABEL_NAMES = {"ignored", "ignore", "void", "unlabelled", "unlabeled"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
# Datumaro puts the items of a dataset without split folders into the subset "default": that is
# the dataset itself, so it is training data (split into train/val by --val-ratio when no val).
_DEFAULT_SUBSET = "default"
# Files and folders that archivers and operating systems leave beside the data (macOS resource
# forks "._x.png" look like images but are not).
_JUNK_DIRS = {"__MACOSX"}

# Datumaro's image cache is shared and not meant for concurrent use: decode its masks one at a time.
_DATUMARO_LOCK = threading.Lock()


@dataclass
class RawItem:
    split: str
    item_id: str
    image_path: Path | None
    mask_path: Path | None
    load_mask: Callable[[], np.ndarray] | None


@dataclass
class Source:
    """A dataset as found on disk, before validation."""

    format: str
    spec: LabelSpec | None  # None: no label names given; labels are inferred from mask values
    items: list[RawItem]
    notes: list[str] = field(default_factory=list)
    # Where the user declared a validation split (even an empty one); None: split from train.
    val_location: Path | None = None
    unused_subsets: dict[str, int] = field(default_factory=dict)  # Datumaro subsets segcore does not read


# --------------------------------------------------------------------------------------------
# Plain layout: image folder + mask folder with the same file stems


def _is_junk(path: Path, folder: Path) -> bool:
    """Hidden files and folders (".DS_Store", macOS "._x.png" forks, ".ipynb_checkpoints") and
    archive leftovers ("__MACOSX") under ``folder``."""
    parts = path.relative_to(folder).parts
    return any(part.startswith(".") or part in _JUNK_DIRS for part in parts)


def _list_images(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    junk = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if _is_junk(path, folder):
            junk += 1
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise DataError(f"two files share the name '{stem}' ({found[stem].name}, {path.name})", path)
        found[stem] = path
    if junk:
        log.info("%s: ignored %d hidden or archive-leftover files (.*, __MACOSX)", folder, junk)
    return found


def read_plain_split(image_dir: Path, mask_dir: Path, split: str, spec: LabelSpec | None) -> list[RawItem]:
    """Pair images and masks by file stem (relative path without extension)."""
    if not image_dir.is_dir():
        raise DataError("image folder does not exist", image_dir)
    if not mask_dir.is_dir():
        raise DataError("mask folder does not exist", mask_dir)
    images, masks = _list_images(image_dir), _list_images(mask_dir)
    items = []
    for stem in sorted(set(images) | set(masks)):
        mask_path = masks.get(stem)
        loader = partial(load_plain_mask, mask_path, spec) if mask_path else None
        items.append(RawItem(split, stem, images.get(stem), mask_path, loader))
    return items


def load_plain_mask(path: Path, spec: LabelSpec | None) -> np.ndarray:
    """Decode an index mask (L, P, 1-bit or I) or a colour mask (RGB, mapped through the palette).

    JPEG masks are refused: lossy compression turns the edges between classes into values that
    are no class at all."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, kind = img.mode, img.format
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"unreadable or truncated mask ({_short(exc)})", path) from None
    if kind == "JPEG":
        raise DataError(
            "mask is a JPEG: lossy compression changes the class values along every edge; save masks as PNG", path
        )
    if mode == "1":  # 1-bit masks: 0 background, 1 foreground
        return array.astype(np.uint8)
    if mode in ("L", "P"):
        return array.astype(np.uint8, copy=False)
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        if array.max(initial=0) > 255:
            raise DataError(f"mask value {int(array.max())} does not fit the 0..255 label range", path)
        return array.astype(np.uint8)
    if mode in ("RGB", "RGBA", "LA"):
        rgb = array[..., :3] if mode != "LA" else np.repeat(array[..., :1], 3, axis=-1)
        return colour_to_index(rgb, spec, path)
    raise DataError(f"unsupported mask mode {mode}; use a uint8 index mask or an RGB colour mask", path)


def colour_to_index(rgb: np.ndarray, spec: LabelSpec | None, path: Path) -> np.ndarray:
    """Map an RGB mask to label ids through the dataset's palette; unknown colours are errors."""
    flat = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    values, inverse = np.unique(flat, return_inverse=True)
    if spec is None:
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return rgb[..., 0].astype(np.uint8)  # a grey index mask saved as RGB
        raise DataError(f"colour mask but no palette: add {META_FILE} with 'segmentation_colors' beside the data", path)
    lookup = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(spec.colors)}
    if spec.ignore_color is not None:
        r, g, b = spec.ignore_color
        lookup[(r << 16) | (g << 8) | b] = spec.ignore_index
    out = np.empty(len(values), dtype=np.uint8)
    for k, v in enumerate(values.tolist()):
        if v not in lookup:
            colour = (v >> 16, (v >> 8) & 255, v & 255)
            y, x = np.argwhere(flat == v)[0]
            raise DataError(f"colour {colour} at pixel (x={x}, y={y}) is not in the palette", path)
        out[k] = lookup[v]
    return out[inverse].reshape(flat.shape)


def open_plain(
    train_root: Path,
    val_root: Path | None,
    train_ann: Path | None,
    val_ann: Path | None,
) -> Source:
    """Either separate image/mask folders, or one root with images/{train,val} + annotations/{...}."""
    if train_ann is not None:
        if (val_root is None) != (val_ann is None):
            missing = "--val-ann-files" if val_ann is None else "--val-data-root"
            raise DataError(f"{missing} is needed too when the validation split has separate folders")
        meta = find_meta_file(train_ann, train_root)
        spec = read_meta_file(meta) if meta else None
        items = read_plain_split(train_root, train_ann, "train", spec)
        if val_root is not None and val_ann is not None:
            items += read_plain_split(val_root, val_ann, "val", spec)
        return Source(PLAIN, spec, items, val_location=val_root)
    meta = find_meta_file(train_root)
    spec = read_meta_file(meta) if meta else None
    if val_root is not None:
        raise DataError("with a single root holding images/ and annotations/, leave --val-data-root out")
    items = read_plain_split(train_root / "images" / "train", train_root / "annotations" / "train", "train", spec)
    val_dir = train_root / "images" / "val"
    if val_dir.is_dir():
        items += read_plain_split(val_dir, train_root / "annotations" / "val", "val", spec)
    return Source(PLAIN, spec, items, val_location=val_dir if val_dir.is_dir() else None)


def is_plain_root(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "annotations").is_dir()


# --------------------------------------------------------------------------------------------
# Datumaro formats


@contextlib.contextmanager
def _datumaro_quiet() -> Iterator[None]:
    """Datumaro logs per-item warnings on the root logger; keep them out of our output."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _environment():
    from datumaro.components.environment import Environment

    return Environment()


def detect_format(root: Path) -> str:
    """Our format name for ``root``: the plain layout, or what Datumaro's detector recognises."""
    if is_plain_root(root):
        return PLAIN
    with _datumaro_quiet():
        detected = set(_environment().detect_dataset(str(root)))
    for name, importers in DATUMARO_FORMATS.items():
        if detected.intersection(importers):
            return name
    found = f" (Datumaro sees: {', '.join(sorted(detected))})" if detected else ""
    raise DataError(
        f"unrecognised dataset format{found}; supported: {', '.join(SUPPORTED_FORMATS)} "
        "(plain = images/{train,val} + annotations/{train,val}, or separate image and mask "
        "folders given with --train-ann-files/--val-ann-files)",
        root,
    )


def open_datumaro(root: Path, fmt: str, split: str | None = None) -> Source:
    """Read ``root`` with Datumaro; ``split`` forces every item into that split."""
    import datumaro as dm

    importers = DATUMARO_FORMATS[fmt]
    with _datumaro_quiet():
        detected = set(_environment().detect_dataset(str(root)))
        importer = next((i for i in importers if i in detected), importers[0])
        try:
            dataset = dm.Dataset.import_from(str(root), importer)
        except Exception as exc:  # Datumaro wraps reader errors in many types
            cause = exc.__cause__ or exc
            raise DataError(f"Datumaro could not read it as {fmt}: {_short(cause)}", root) from None

    with _datumaro_quiet():  # Datumaro loads items lazily: keep its warnings quiet here too
        return _collect(dataset, root, fmt, split)


def _collect(dataset, root: Path, fmt: str, split: str | None) -> Source:
    from datumaro.components.annotation import AnnotationType, ExtractedMask

    categories = dataset.categories()
    dm_labels = [c.name for c in categories.get(AnnotationType.label, [])]
    colormap = dict(categories[AnnotationType.mask].colormap) if AnnotationType.mask in categories else {}
    user_label_file = (root / META_FILE).is_file() or (root / "label_colors.txt").is_file()
    dropped = {i for i, name in enumerate(dm_labels) if name.lower() in _IGNORE_LABEL_NAMES}
    if fmt == "cityscapes" and not user_label_file and dm_labels and dm_labels[-1] == "background":
        # Datumaro appends a "background" label to the default 19 train-id classes; no pixel
        # of a labelTrainIds mask uses it.
        dropped.add(len(dm_labels) - 1)
    kept = [i for i in range(len(dm_labels)) if i not in dropped]
    new_id = {old: new for new, old in enumerate(kept)}
    labels = tuple(dm_labels[i] for i in kept)
    fallback = default_colors(len(dm_labels))
    colors = tuple(tuple(int(v) for v in colormap.get(i, fallback[i])) for i in kept)
    if len(set(colors)) != len(colors):
        colors = tuple(default_colors(len(kept)))
    ignore_index = DEFAULT_IGNORE_INDEX
    if (root / META_FILE).is_file():
        ignore_index = read_meta_file(root / META_FILE).ignore_index
    spec = LabelSpec(labels, colors, ignore_index)

    items: list[RawItem] = []
    notes: list[str] = []
    unused: dict[str, int] = {}
    as_train = 0
    for item in dataset:
        subset = item.subset or _DEFAULT_SUBSET
        target = split or _SPLIT_ALIASES.get(subset.lower())
        if target is None and subset == _DEFAULT_SUBSET:
            target = "train"
            as_train += 1
        if target is None:
            unused[item.subset] = unused.get(item.subset, 0) + 1
            continue
        media_path = getattr(item.media, "path", None) if item.media is not None else None
        image_path = Path(media_path) if media_path and Path(media_path).is_file() else None
        masks = [a for a in item.annotations if isinstance(a, ExtractedMask) and a.z_order == 0]
        loader = mask_path = None
        if masks:
            index_mask = masks[0].index_mask
            mask_path = Path(getattr(index_mask, "_path", None) or media_path or root)
            if fmt in _IDENTITY_FORMATS:
                table = {old: new_id.get(old, ignore_index) for old in range(len(dm_labels))}
                table[ignore_index] = ignore_index
            else:  # ADE20K: the mask stores ADE class indices; 0 is unlabelled
                table = {int(a.index): new_id.get(a.label, ignore_index) for a in masks}
                table.setdefault(0, ignore_index)
            expected = f"a label (0..{len(dm_labels) - 1}) or the ignore index {ignore_index}"
            strict = fmt in _IDENTITY_FORMATS
            loader = partial(_load_datumaro_mask, index_mask, table, mask_path, expected if strict else None)
        items.append(RawItem(target, item.id, image_path, mask_path, loader))
        if image_path is None and loader is None:
            items.pop()  # neither image nor mask: nothing to pair
    if as_train:
        notes.append(f"{as_train} items without a split folder (Datumaro subset 'default') used as training data")
    if unused:
        notes.append("not used: " + ", ".join(f"subset '{k}' ({v} items)" for k, v in sorted(unused.items())))
    return Source(fmt, spec, items, notes, unused_subsets=unused)


def _load_datumaro_mask(index_mask, table: dict[int, int], path: Path, expected: str | None) -> np.ndarray:
    """Decode through Datumaro and map raw values through ``table``.

    ``expected`` (identity formats) describes valid values: any other value is an error; without
    it (ADE20K) values missing from the table are unlabelled pixels.
    """
    try:
        with _DATUMARO_LOCK, _datumaro_quiet():
            raw = np.asarray(index_mask())
    except KeyError as exc:  # Datumaro: colour missing from the palette
        raise DataError(f"mask colour not in the palette ({_short(exc)})", path) from None
    except Exception as exc:
        raise DataError(f"unreadable or truncated mask ({_short(exc)})", path) from None
    if raw.ndim != 2:
        raise DataError(f"mask has shape {raw.shape}; expected a single-channel index mask", path)
    values, inverse = np.unique(raw, return_inverse=True)
    out = np.empty(len(values), dtype=np.uint8)
    for k, v in enumerate(values.tolist()):
        if v in table:
            out[k] = table[v]
        elif expected is not None:
            raise DataError(f"mask value {v} is not {expected}", path)
        else:
            out[k] = table[0]
    return out[inverse].reshape(raw.shape)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------


def open_dataset(
    train_root: Path,
    val_root: Path | None = None,
    train_ann: Path | None = None,
    val_ann: Path | None = None,
    fmt: str = "auto",
) -> Source:
    """Find the format (unless given) and list the dataset's items."""
    for flag, path in (
        ("--train-data-root", train_root),
        ("--val-data-root", val_root),
        ("--train-ann-files", train_ann),
        ("--val-ann-files", val_ann),
    ):
        if path is not None and not path.exists():
            raise DataError(f"does not exist (given as {flag})", path)
    if fmt not in ("auto", *SUPPORTED_FORMATS):
        raise DataError(f"unknown format '{fmt}'; supported: auto, {', '.join(SUPPORTED_FORMATS)}")
    if train_ann is not None or (fmt == "auto" and is_plain_root(train_root)) or fmt == PLAIN:
        return open_plain(train_root, val_root, train_ann, val_ann)
    if fmt == "auto":
        fmt = detect_format(train_root)
    if val_root is None:
        return open_datumaro(train_root, fmt)
    source = open_datumaro(train_root, fmt, split="train")
    val = open_datumaro(val_root, fmt, split="val")
    if val.spec != source.spec:
        raise DataError("validation data declares other labels than the training data", val_root)
    source.items += val.items
    source.notes += val.notes
    source.val_location = val_root
    return source
