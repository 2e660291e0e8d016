"""Synthetic segmentation datasets in every layout segcore reads, for tests and the demo.

Each image shows a few filled shapes; each class has its own mean colour plus noise and a
texture, so a small model can learn the task in a couple of epochs. Masks are exact, so a test
can compare what a reader produced with what was generated, pixel for pixel.

Layouts written here are the published on-disk layouts of each format (the ones Datumaro reads);
they are written by hand from the format descriptions, not by Datumaro's exporters, so a test that
reads them back exercises the importer against an independent writer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segcore.data.meta import default_colors

LAYOUTS = (
    "plain",  # one root: images/{train,val} + annotations/{train,val} (+ dataset_meta.json)
    "plain_separate",  # four folders: train images, train masks, val images, val masks
    "common_semantic_segmentation",  # <split>/{dataset_meta.json, images/, masks/}
    "camvid",  # <split>.txt + <split>/ + <split>annot/ + label_colors.txt
    "cityscapes",  # leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/*_labelTrainIds.png
    "voc",  # JPEGImages/, SegmentationClass/ (palette PNG), ImageSets/Segmentation/<split>.txt
    "ade20k2020",  # <training|validation>/<folder>/ADE_*.jpg + _seg.png + .json
)

# The 19 Cityscapes train-id classes, the label set a Cityscapes reader assumes by default.
CITYSCAPES_TRAIN_LABELS = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "trafficlight", "trafficsign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
VOC_LABELS = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
VOC_IGNORE_COLOR = (224, 224, 192)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette as an (n, 3) uint8 array."""
    return np.array(default_colors(n), dtype=np.uint8)


@dataclass
class GeneratedDataset:
    """What was written: enough for a test to check a reader's output exactly."""

    layout: str
    root: Path
    labels: list[str]
    colors: list[tuple[int, int, int]]
    ignore_index: int
    masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split -> id -> mask
    # Arguments for `segcore convert` that point at this dataset.
    args: dict[str, str] = field(default_factory=dict)

    def cli_args(self) -> list[str]:
        out: list[str] = []
        for key, value in self.args.items():
            out += [f"--{key.replace('_', '-')}", str(value)]
        return out


def make_sample(
    rng: np.random.Generator,
    height: int,
    width: int,
    class_ids: list[int],
    palette: np.ndarray,
    ignore_index: int = 255,
    ignore_fraction: float = 0.03,
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image (H, W, 3 uint8) and its index mask (H, W uint8).

    The background is the first class; 2-5 rectangles and ellipses of random classes are painted
    over it; a thin band of ignore pixels runs along one border when ``ignore_fraction`` > 0.
    """
    mask = np.full((height, width), class_ids[0], dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.choice(class_ids))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry = rng.uniform(0.1, 0.35) * height
        rx = rng.uniform(0.1, 0.35) * width
        if rng.random() < 0.5:
            region = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        else:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        mask[region] = cls
    if ignore_fraction > 0:
        band = max(1, int(round(ignore_fraction * height)))
        mask[-band:, :] = ignore_index
    base = palette[np.where(mask == ignore_index, class_ids[0], mask)].astype(np.float32)
    noise = rng.normal(0.0, 12.0, size=(height, width, 3))
    stripes = 10.0 * np.sin((xx + yy * (mask % 3)) / 3.0)[..., None]
    image = np.clip(base * 0.8 + 20 + noise + stripes, 0, 255).astype(np.uint8)
    return image, mask


def _label_names(num_classes: int) -> list[str]:
    names = ["background", "road", "car", "person", "tree", "sky", "building", "sign", "fence", "pole"]
    return [names[i] if i < len(names) else f"class_{i}" for i in range(num_classes)]


def _save_png(array: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img = Image.fromarray(array, mode="P") if array.ndim == 2 else img
        img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    img.save(path)


def _save_image(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(array).save(path, quality=95)
    else:
        Image.fromarray(array).save(path)


def _meta(labels: list[str], colors: list[tuple[int, int, int]], ignore_index: int) -> dict:
    return {
        "label_map": {str(i): name for i, name in enumerate(labels)},
        "segmentation_colors": [list(c) for c in colors],
        "ignore_index": ignore_index,
    }


def generate(
    root: str | Path,
    layout: str = "plain",
    *,
    num_train: int = 8,
    num_val: int = 4,
    size: tuple[int, int] = (48, 64),
    num_classes: int = 4,
    seed: int = 0,
    color_masks: bool = False,
    with_meta: bool = True,
    ignore_index: int = 255,
) -> GeneratedDataset:
    """Write a synthetic dataset under ``root`` in ``layout``; return what was written.

    ``size`` is (height, width). ``color_masks`` writes RGB masks painted with the label colours
    (layouts that allow it: plain, plain_separate, common_semantic_segmentation, camvid).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size

    if layout == "cityscapes":
        labels = list(CITYSCAPES_TRAIN_LABELS)
    elif layout == "voc":
        labels = list(VOC_LABELS)
    else:
        labels = _label_names(num_classes)
    palette = voc_colormap(256)
    colors = [tuple(int(v) for v in palette[i]) for i in range(len(labels))]
    # Classes that appear: the first num_classes of the label set (all of it for small sets).
    used = list(range(min(num_classes, len(labels))))
    ds = GeneratedDataset(layout, root, labels, colors, ignore_index)
    splits = {"train": num_train, "val": num_val}
    for split, count in splits.items():
        ds.masks[split] = {}
        for i in range(count):
            image, mask = make_sample(rng, height, width, used, palette, ignore_index)
            item_id = f"{split}_{i:04d}"
            _WRITERS[layout](ds, split, i, item_id, image, mask, color_masks, with_meta)
    return ds


def _colour_mask(ds: GeneratedDataset, mask: np.ndarray) -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    for i, c in enumerate(ds.colors):
        lut[i] = c
    lut[ds.ignore_index] = (255, 255, 255)
    return lut[mask]


def _write_plain(ds, split, i, item_id, image, mask, color_masks, with_meta, separate=False):
    root = ds.root
    if separate:
        img_dir, ann_dir = root / f"{split}_images", root / f"{split}_masks"
        ds.args.update(
            {
                "train_data_root": str(root / "train_images"),
                "train_ann_files": str(root / "train_masks"),
                "val_data_root": str(root / "val_images"),
                "val_ann_files": str(root / "val_masks"),
            }
        )
        meta_dir = root / "train_masks"
    else:
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        ds.args["train_data_root"] = str(root)
        meta_dir = root
    ext = ".jpg" if i % 2 else ".png"  # both encodings appear
    _save_image(image, img_dir / f"{item_id}{ext}")
    if color_masks:
        colours = _colour_mask(ds, mask)
        _save_png(colours, ann_dir / f"{item_id}.png")
    else:
        _save_png(mask, ann_dir / f"{item_id}.png")
    ds.masks[split][item_id] = mask
    if with_meta or color_masks:
        meta = _meta(ds.labels, ds.colors, ds.ignore_index)
        if color_masks:
            meta["ignore_color"] = [255, 255, 255]
        (meta_dir / "dataset_meta.json").write_text(json.dumps(meta, indent=2))


def _write_plain_separate(ds, split, i, item_id, image, mask, color_masks, with_meta):
    _write_plain(ds, split, i, item_id, image, mask, color_masks, with_meta, separate=True)


def _write_css(ds, split, i, item_id, image, mask, color_masks, with_meta):
    base = ds.root / split
    _save_image(image, base / "images" / f"{item_id}.png")
    if color_masks:
        # Datumaro maps colours through the meta file's palette; ignore pixels must be a
        # declared colour too, so they are written as the background (documented limitation).
        raise ValueError("common_semantic_segmentation: generate index masks (color_masks=False)")
    _save_png(mask, base / "masks" / f"{item_id}.png")
    ds.masks[split][item_id] = mask
    (base / "dataset_meta.json").write_text(json.dumps(_meta(ds.labels, ds.colors, ds.ignore_index)))
    ds.args["train_data_root"] = str(ds.root)


def _write_camvid(ds, split, i, item_id, image, mask, color_masks, with_meta):
    # CamVid marks unlabelled pixels with a "Void" class rather than 255: declare it after the
    # real labels and write ignore pixels as that index.
    root = ds.root
    void = len(ds.labels)
    _save_image(image, root / split / f"{item_id}.png")
    if color_masks:
        raise ValueError("camvid: generate index masks (color_masks=False)")
    _save_png(np.where(mask == ds.ignore_index, void, mask).astype(np.uint8), root / f"{split}annot" / f"{item_id}.png")
    ds.masks[split][item_id] = mask
    with open(root / f"{split}.txt", "a", encoding="utf-8") as f:
        f.write(f"/{split}/{item_id}.png /{split}annot/{item_id}.png\n")
    with open(root / "label_colors.txt", "w", encoding="utf-8") as f:
        for name, (r, g, b) in zip(ds.labels, ds.colors, strict=True):
            f.write(f"{r} {g} {b} {name}\n")
        f.write("255 255 255 Void\n")
    ds.args["train_data_root"] = str(root)


def _write_cityscapes(ds, split, i, item_id, image, mask, color_masks, with_meta):
    root = ds.root
    city = "synthcity"
    stem = f"{city}_{i:06d}_000019"
    _save_image(image, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    _save_png(mask, root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
    ds.masks[split][f"{city}/{stem}"] = mask
    ds.args["train_data_root"] = str(root)


def _write_voc(ds, split, i, item_id, image, mask, color_masks, with_meta):
    root = ds.root
    _save_image(image, root / "JPEGImages" / f"{item_id}.jpg")
    palette = voc_colormap(256)
    palette[255] = VOC_IGNORE_COLOR
    _save_png(mask, root / "SegmentationClass" / f"{item_id}.png", palette=palette)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    with open(sets / f"{split}.txt", "a", encoding="utf-8") as f:
        f.write(f"{item_id}\n")
    ds.masks[split][item_id] = mask
    ds.args["train_data_root"] = str(root)


def _write_ade20k2020(ds, split, i, item_id, image, mask, color_masks, with_meta):
    # ADE20K 2020: class index k (1-based in the full ADE list; 0 = unlabelled) is stored in the
    # _seg.png as R = (k // 256) * 10, G = k % 256; the JSON lists the objects with their names.
    root = ds.root
    subset = {"train": "training", "val": "validation"}[split]
    folder = root / subset / "synthetic" / "scenes"
    name = f"ADE_{'train' if split == 'train' else 'val'}_{i:08d}"
    _save_image(image, folder / f"{name}.jpg")
    ade_index = np.where(mask == ds.ignore_index, 0, mask.astype(np.int32) + 1)  # label j -> ADE j+1
    seg = np.zeros((*mask.shape, 3), dtype=np.uint8)
    seg[..., 0] = (ade_index // 256) * 10
    seg[..., 1] = ade_index % 256
    seg[..., 2] = 0
    _save_png(seg, folder / f"{name}_seg.png")
    objects = []
    for n, label_id in enumerate(sorted(int(v) for v in np.unique(mask) if v != ds.ignore_index)):
        objects.append(
            {
                "id": n,
                "name": ds.labels[label_id],
                "name_ndx": label_id + 1,
                "raw_name": ds.labels[label_id],
                "hypernym": [],
                "occluded": "no",
                "crop": "0",
                "attributes": [],
                "parts": {"part_level": 0, "is_part_of": [], "hasparts": []},
                "instance_mask": f"instance_{n:03d}_{name}.png",
                "polygon": {"x": [0, 1, 1], "y": [0, 0, 1]},
            }
        )
    doc = {"annotation": {"filename": f"{name}.jpg", "folder": str(folder), "object": objects}}
    (folder / f"{name}.json").write_text(json.dumps(doc))
    ds.masks[split][f"synthetic/scenes/{name}"] = mask
    ds.args["train_data_root"] = str(root)


_WRITERS = {
    "plain": _write_plain,
    "plain_separate": _write_plain_separate,
    "common_semantic_segmentation": _write_css,
    "camvid": _write_camvid,
    "cityscapes": _write_cityscapes,
    "voc": _write_voc,
    "ade20k2020": _write_ade20k2020,
}
