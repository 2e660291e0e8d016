"""Label set of a dataset: names, colours, ignore index; reading ``dataset_meta.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from segcore.errors import DataError

DEFAULT_IGNORE_INDEX = 255
META_FILE = "dataset_meta.json"


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """PASCAL VOC-style palette for ``n`` labels (index -> RGB)."""
    colors = []
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


@dataclass(frozen=True)
class LabelSpec:
    """Labels in index order, their RGB colours, and the index that marks ignored pixels."""

    labels: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = DEFAULT_IGNORE_INDEX
    ignore_color: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.colors):
            raise ValueError("labels and colors differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def read_meta_file(path: Path) -> LabelSpec:
    """Parse a Datumaro-style ``dataset_meta.json``.

    Accepted keys: ``label_map`` ({"0": "name", ...}) and/or ``labels`` (["name", ...]),
    ``segmentation_colors`` ([[r, g, b], ...] in label order), ``ignore_index`` (default 255) and
    ``ignore_color`` ([r, g, b], the colour of ignored pixels in colour masks).
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read dataset meta file: {exc}", path) from None
    if not isinstance(doc, dict):
        raise DataError("dataset meta file must hold a JSON object", path)
    labels: list[str] = []
    label_map = doc.get("label_map")
    try:
        if isinstance(label_map, dict) and label_map:
            by_index = {int(k): str(v) for k, v in label_map.items()}
            if sorted(by_index) != list(range(len(by_index))):
                raise DataError("label_map keys must be 0..N-1 without gaps", path)
            labels = [by_index[i] for i in range(len(by_index))]
        elif isinstance(doc.get("labels"), list):
            labels = [str(x) for x in doc["labels"]]
    except ValueError:
        raise DataError("label_map keys must be integers", path) from None
    if not labels:
        raise DataError("no labels: expected a 'label_map' or 'labels' entry", path)
    if len(set(labels)) != len(labels):
        raise DataError("label names must be unique", path)
    raw_colors = doc.get("segmentation_colors") or []
    if raw_colors:
        if len(raw_colors) != len(labels):
            raise DataError(
                f"{len(raw_colors)} segmentation_colors for {len(labels)} labels; give one colour per label",
                path,
            )
        colors = [_rgb(c, path) for c in raw_colors]
        if len(set(colors)) != len(colors):
            raise DataError("segmentation_colors must be distinct", path)
    else:
        colors = default_colors(len(labels))
    ignore_index = doc.get("ignore_index", DEFAULT_IGNORE_INDEX)
    if not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
        raise DataError("ignore_index must be an integer in 0..255", path)
    if ignore_index < len(labels):
        raise DataError(f"ignore_index {ignore_index} collides with label '{labels[ignore_index]}'", path)
    ignore_color = _rgb(doc["ignore_color"], path) if doc.get("ignore_color") else None
    return LabelSpec(tuple(labels), tuple(colors), ignore_index, ignore_color)


def _rgb(value, path: Path) -> tuple[int, int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, int) for v in value)):
        raise DataError(f"colour {value!r} is not [r, g, b]", path)
    if not all(0 <= v <= 255 for v in value):
        raise DataError(f"colour {value!r} has a channel outside 0..255", path)
    return (int(value[0]), int(value[1]), int(value[2]))


def find_meta_file(*folders: Path | None) -> Path | None:
    """The first ``dataset_meta.json`` in the given folders, their parents or grandparents
    (so ``root/dataset_meta.json`` serves ``root/images/train`` given as an image folder)."""
    seen: set[Path] = set()
    for folder in folders:
        if folder is None:
            continue
        for candidate in (folder, folder.parent, folder.parent.parent):
            if candidate in seen:
                continue
            seen.add(candidate)
            if (candidate / META_FILE).is_file():
                return candidate / META_FILE
    return None
