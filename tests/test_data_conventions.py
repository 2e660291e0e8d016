"""Data as users have it: datasets without split folders, binary 0/255 masks, datasets a model
cannot learn from, too few items to split, and what other tools leave in a dataset (JPEG masks,
grey-level class codes, EXIF-rotated photos, 1-bit masks, macOS archive leftovers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcore.cli import main
from segcore.data import convert, load_manifest
from segcore.data.synthetic import generate
from segcore.errors import SegcoreError

H, W = 24, 32


def _image(rng) -> np.ndarray:
    return rng.integers(0, 255, (H, W, 3), dtype=np.uint8)


def _blob(rng, values=(0, 255)) -> np.ndarray:
    """A mask of values[0] with a rectangle of values[1] (a binary object mask)."""
    mask = np.full((H, W), values[0], np.uint8)
    y, x = rng.integers(2, H // 2), rng.integers(2, W // 2)
    mask[y : y + H // 3, x : x + W // 3] = values[1]
    return mask


def write_plain(root: Path, masks: dict[str, list[np.ndarray]], meta: dict | None = None, mask_mode=None) -> Path:
    """images/<split>/NNN.png + annotations/<split>/NNN.png (masks saved in ``mask_mode``)."""
    rng = np.random.default_rng(0)
    for split, arrays in masks.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, mask in enumerate(arrays):
            Image.fromarray(_image(rng)).save(root / "images" / split / f"{i:03d}.png")
            img = Image.fromarray(mask)
            if mask_mode == "1":
                img = img.convert("1")
            elif mask_mode == "RGB":
                img = img.convert("RGB")
            img.save(root / "annotations" / split / f"{i:03d}.png")
    if meta is not None:
        (root / "dataset_meta.json").write_text(json.dumps(meta))
    return root


def _refused(capsys, argv: list[str], out: Path, named: Path, problem: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert str(named) in err[0] and problem in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not out.exists(), list(out.rglob("*"))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err[0]


def _convert_argv(root: Path, out: Path) -> list[str]:
    return ["convert", "--train-data-root", str(root), "--output", str(out)]


def _train_argv(root: Path, out: Path) -> list[str]:
    return ["train", "Lite-HRNet-s-mod2", "--train-data-root", str(root), "--output", str(out), "--no-tracking"]


# ------------------------------------------------------------------------------------------
# 1. Datumaro datasets without split folders: the subset "default" is training data


def _css_without_subsets(root: Path, n: int) -> Path:
    generate(root, "common_semantic_segmentation", num_train=n, num_val=0)
    for path in (root / "train").iterdir():
        shutil.move(str(path), root / path.name)
    (root / "train").rmdir()
    return root


def _voc_default(root: Path, n: int) -> Path:
    generate(root, "voc", num_train=n, num_val=0)
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").rename(sets / "default.txt")
    return root


def _camvid_default(root: Path, n: int) -> Path:
    generate(root, "camvid", num_train=n, num_val=0)
    (root / "train.txt").rename(root / "default.txt")
    return root


NO_SUBSETS = {
    "common_semantic_segmentation": _css_without_subsets,
    "voc": _voc_default,
    "camvid": _camvid_default,
}


@pytest.mark.parametrize("fmt", sorted(NO_SUBSETS))
def test_datumaro_default_subset_is_training_data(tmp_path, fmt, capsys):
    root = NO_SUBSETS[fmt](tmp_path / "src", 10)
    out = tmp_path / "out"
    assert main([*_convert_argv(root, out), "--val-ratio", "0.3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == fmt
    assert summary["splits"] == {"train": 7, "val": 3}
    manifest = load_manifest(out)
    assert manifest["val_split"] == {"from": "train", "val_ratio": 0.3, "seed": 42}
    assert sum(manifest["class_pixels"]["train"]) > 0


def test_unused_subsets_are_named_when_train_is_empty(tmp_path, capsys):
    root = _voc_default(tmp_path / "src", 4)
    sets = root / "ImageSets" / "Segmentation"
    (sets / "default.txt").rename(sets / "trainval.txt")
    out = tmp_path / "out"
    err = _refused(capsys, _convert_argv(root, out), out, root, "the train split is empty")
    assert "'trainval' (4 items)" in err


# ------------------------------------------------------------------------------------------
# 2. Binary 0/255 masks


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_binary_0_255_masks_read_as_background_foreground(tmp_path, mode, caplog):
    rng = np.random.default_rng(1)
    masks = {"train": [_blob(rng) for _ in range(4)], "val": [_blob(rng) for _ in range(2)]}
    root = write_plain(tmp_path / "src", masks, mask_mode=mode)
    caplog.set_level("INFO")
    manifest = convert(root, tmp_path / "out")
    assert manifest["labels"] == ["background", "foreground"]
    assert manifest["label_source"] == "binary 0/255"
    assert load_manifest(tmp_path / "out")["label_source"] == "binary 0/255"
    assert "read as binary masks" in caplog.text
    for split in ("train", "val"):
        for item, expected in zip(manifest["items"][split], masks[split], strict=True):
            got = np.array(Image.open(tmp_path / "out" / item["mask"]))
            assert np.array_equal(got, (expected == 255).astype(np.uint8))
    fg = sum(int((m == 255).sum()) for m in masks["train"])
    assert manifest["class_pixels"]["train"][1] == fg
    assert manifest["ignored_pixels"]["train"] == 0


def test_binary_masks_in_separate_folders_and_1_bit(tmp_path):
    rng = np.random.default_rng(2)
    root = write_plain(tmp_path / "src", {"train": [_blob(rng) for _ in range(5)]}, mask_mode="1")
    manifest = convert(root / "images" / "train", tmp_path / "out", train_ann=root / "annotations" / "train")
    assert manifest["labels"] == ["class_0", "class_1"]  # 1-bit masks hold 0/1: class ids
    assert manifest["label_source"] == "mask values"
    assert manifest["class_pixels"]["train"][1] > 0
    rng = np.random.default_rng(2)
    root = write_plain(tmp_path / "src2", {"train": [_blob(rng) for _ in range(5)]})
    manifest = convert(root / "images" / "train", tmp_path / "out2", train_ann=root / "annotations" / "train")
    assert manifest["labels"] == ["background", "foreground"] and manifest["label_source"] == "binary 0/255"


def test_dataset_meta_says_255_is_ignore(tmp_path):
    """With a dataset_meta.json, 255 is what it declares (here: ignore), never silently foreground."""
    rng = np.random.default_rng(3)
    train = [_blob(rng, (0, 1)) for _ in range(3)] + [_blob(rng, (0, 255))]
    meta = {"labels": ["background", "cat"], "ignore_index": 255}
    root = write_plain(tmp_path / "src", {"train": train, "val": [_blob(rng, (0, 1))]}, meta=meta)
    manifest = convert(root, tmp_path / "out")
    assert manifest["labels"] == ["background", "cat"] and manifest["label_source"] == "declared"
    assert manifest["ignored_pixels"]["train"] == int((train[-1] == 255).sum())


def test_binary_test_data_for_a_binary_model(tmp_path):
    """`segcore eval` converts test data with the model's labels: 0/255 masks are still binary."""
    rng = np.random.default_rng(4)
    root = write_plain(tmp_path / "src", {"train": [_blob(rng) for _ in range(3)]})
    from segcore.data.meta import LabelSpec

    spec = LabelSpec(("background", "foreground"), ((0, 0, 0), (255, 255, 255)), 255)
    manifest = convert(root, tmp_path / "out", as_split="val", default_spec=spec)
    assert manifest["label_source"] == "binary 0/255"
    assert manifest["class_pixels"]["val"][1] > 0


def test_binary_masks_train_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(5)
    root = write_plain(tmp_path / "src", {"train": [_blob(rng) for _ in range(4)], "val": [_blob(rng)]})
    out = tmp_path / "run"
    argv = [*_train_argv(root, out), "--epochs", "1", "--batch-size", "2", "--input-size", "32x32", "--json"]
    assert main([*argv, "--num-workers", "0"]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["labels"] == ["background", "foreground"]


# ------------------------------------------------------------------------------------------
# 3. Datasets a model cannot learn from


def test_all_ignored_masks_are_refused(tmp_path, capsys):
    full = np.full((H, W), 255, np.uint8)
    root = write_plain(tmp_path / "src", {"train": [full] * 3, "val": [full]})
    out = tmp_path / "out"
    err = _refused(capsys, _convert_argv(root, out), out, root, "no labelled pixel in the train split")
    assert "255" in err


@pytest.mark.parametrize("with_meta", [True, False])
def test_single_class_in_train_is_refused(tmp_path, capsys, with_meta):
    rng = np.random.default_rng(6)
    meta = {"labels": ["road", "car"], "ignore_index": 255} if with_meta else None
    train = [_blob(rng, (0, 255)) for _ in range(3)] if with_meta else [np.zeros((H, W), np.uint8)] * 3
    root = write_plain(tmp_path / "src", {"train": train, "val": [_blob(rng, (0, 1))]}, meta=meta)
    out = tmp_path / "out"
    name = "road" if with_meta else "class_0"
    _refused(capsys, _convert_argv(root, out), out, root, f"only one class ('{name}') has labelled pixels")


def test_single_class_datumaro_format_is_refused(tmp_path, capsys):
    root = _css_without_subsets(tmp_path / "src", 4)
    for path in (root / "masks").glob("*.png"):
        Image.fromarray(np.full(np.array(Image.open(path)).shape, 2, np.uint8)).save(path)
    out = tmp_path / "out"
    _refused(capsys, _convert_argv(root, out), out, root, "only one class ('car') has labelled pixels")


def test_train_refuses_the_same_and_leaves_nothing(tmp_path, capsys):
    root = write_plain(
        tmp_path / "src", {"train": [np.zeros((H, W), np.uint8)] * 3, "val": [np.zeros((H, W), np.uint8)]}
    )
    out = tmp_path / "run"
    _refused(capsys, _train_argv(root, out), out, root, "only one class ('class_0')")


def test_class_only_in_val_warns(tmp_path, capsys, caplog):
    rng = np.random.default_rng(7)
    meta = {"labels": ["sky", "road", "boat"]}
    root = write_plain(
        tmp_path / "src", {"train": [_blob(rng, (0, 1)) for _ in range(3)], "val": [_blob(rng, (0, 2))]}, meta=meta
    )
    out = tmp_path / "out"
    assert main([*_convert_argv(root, out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["warnings"] and "boat" in summary["warnings"][0] and "none in train" in summary["warnings"][0]
    assert "boat" in caplog.text
    assert load_manifest(out)["warnings"] == summary["warnings"]


# ------------------------------------------------------------------------------------------
# 4. Too few items to split


@pytest.mark.parametrize("layout", ["plain", "common_semantic_segmentation"])
def test_too_few_items_to_split(tmp_path, capsys, layout):
    rng = np.random.default_rng(8)
    if layout == "plain":
        root = write_plain(tmp_path / "src", {"train": [_blob(rng, (0, 1))]})
    else:
        root = _css_without_subsets(tmp_path / "src", 1)
    out = tmp_path / "out"
    err = _refused(capsys, _convert_argv(root, out), out, root, "too few labelled items to split into train and val")
    assert "1 image+mask pair found" in err and "--val-data-root" in err
    out = tmp_path / "run"
    _refused(capsys, _train_argv(root, out), out, root, "too few labelled items")


# ------------------------------------------------------------------------------------------
# What else users' data holds


def test_jpeg_masks_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(9)
    root = write_plain(tmp_path / "src", {"train": [_blob(rng, (0, 1)) for _ in range(3)]})
    bad = root / "annotations" / "train" / "001.jpg"
    Image.fromarray(_blob(rng, (0, 1))).save(bad, quality=80)
    (root / "annotations" / "train" / "001.png").unlink()
    out = tmp_path / "out"
    _refused(capsys, _convert_argv(root, out), out, bad, "mask is a JPEG")


def test_grey_level_class_codes_are_refused_without_meta(tmp_path, capsys):
    rng = np.random.default_rng(10)
    masks = [_blob(rng, (0, 128)) for _ in range(3)] + [_blob(rng, (64, 192))]
    root = write_plain(tmp_path / "src", {"train": masks})
    out = tmp_path / "out"
    _refused(capsys, _convert_argv(root, out), out, root, "are not class ids 0..K-1")


def test_anti_aliased_masks_are_refused_without_meta(tmp_path, capsys):
    rng = np.random.default_rng(11)
    ramp = np.tile(np.linspace(0, 254, W).astype(np.uint8), (H, 1))  # 0..254: a resized 0/255 mask
    root = write_plain(tmp_path / "src", {"train": [ramp, _blob(rng, (0, 1)), _blob(rng, (0, 1))]})
    out = tmp_path / "out"
    _refused(capsys, _convert_argv(root, out), out, root, "anti-aliased")


def test_exif_rotated_photo_keeps_its_displayed_orientation(tmp_path, capsys):
    rng = np.random.default_rng(12)
    root = write_plain(tmp_path / "src", {"train": [_blob(rng, (0, 1)) for _ in range(3)]})
    # A phone photo stored 32 wide x 24 high with orientation 6 (shown rotated: 24 wide x 32 high)
    stored = Image.fromarray(_image(rng))
    exif = stored.getexif()
    exif[0x0112] = 6
    photo = root / "images" / "train" / "003.jpg"
    stored.save(photo, exif=exif.tobytes())
    shown = np.zeros((W, H), np.uint8)
    shown[: W // 2] = 1
    Image.fromarray(shown).save(root / "annotations" / "train" / "003.png")
    manifest = convert(root, tmp_path / "out")
    item = next(i for s in ("train", "val") for i in manifest["items"][s] if i["id"] == "003")
    assert (item["height"], item["width"]) == (W, H)
    assert Image.open(tmp_path / "out" / item["image"]).size == (H, W)
    # The mask drawn on the stored pixels instead: a clear refusal
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "annotations" / "train" / "003.png")
    out = tmp_path / "out2"
    named = root / "annotations" / "train" / "003.png"
    _refused(capsys, _convert_argv(root, out), out, named, "EXIF orientation (6)")


def test_hidden_and_archive_leftover_files_are_ignored(tmp_path):
    rng = np.random.default_rng(13)
    root = write_plain(tmp_path / "src", {"train": [_blob(rng, (0, 1)) for _ in range(4)]})
    for folder in ("images", "annotations"):
        (root / folder / "train" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        junk = root / folder / "train" / "__MACOSX"
        junk.mkdir()
        (junk / "001.png").write_bytes(b"resource fork")
    manifest = convert(root, tmp_path / "out")
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == 4


def test_pipeline_convert_step_refuses_the_same(tmp_path):
    from kfp import dsl

    from components.convert import convert_op

    root = write_plain(
        tmp_path / "src", {"train": [np.zeros((H, W), np.uint8)] * 3, "val": [np.zeros((H, W), np.uint8)]}
    )
    out = tmp_path / "dataset"
    dataset = dsl.Dataset(name="dataset", uri=str(out), metadata={})
    with pytest.raises(SegcoreError, match=r"only one class \('class_0'\)"):
        convert_op.python_func(train_data_uri=str(root), dataset=dataset, tracking=False)
    assert not out.exists()


@pytest.mark.parametrize("layout", ["voc", "camvid", "ade20k2020", "common_semantic_segmentation"])
def test_single_class_is_refused_in_every_datumaro_format(tmp_path, capsys, layout):
    gen = generate(tmp_path / "src", layout, num_train=3, num_val=2, num_classes=1)
    out = tmp_path / "out"
    _refused(capsys, _convert_argv(gen.root, out), out, gen.root, "has labelled pixels in the training split")
