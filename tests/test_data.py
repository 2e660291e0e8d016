"""segcore convert: every supported layout, exact masks, splits, and every bad-input case."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcore.cli import main
from segcore.data import convert, load_manifest
from segcore.data.synthetic import generate

FORMAT_OF_LAYOUT = {"plain_separate": "plain"}


def _names(mask: np.ndarray, labels: list[str], ignore: int) -> np.ndarray:
    """Label names per pixel ('' for ignored), so masks from different label orders compare."""
    table = np.array([*labels, *([""] * (256 - len(labels)))], dtype=object)
    table[ignore] = ""
    return table[mask]


@pytest.mark.parametrize(
    "layout",
    ["plain", "plain_separate", "common_semantic_segmentation", "camvid", "cityscapes", "voc", "ade20k2020"],
)
def test_convert_every_layout_exact(tmp_path, layout, capsys):
    gen = generate(tmp_path / "src", layout, num_train=5, num_val=3, seed=3)
    out = tmp_path / "out"
    rc = main(["convert", *gen.cli_args(), "--output", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == FORMAT_OF_LAYOUT.get(layout, layout)
    assert summary["splits"] == {"train": 5, "val": 3}
    assert summary["ignore_index"] == 255
    assert summary["output"] == str(out)
    if layout == "ade20k2020":  # ADE20K names labels in order of appearance
        assert sorted(summary["labels"]) == sorted(set(summary["labels"]))
        assert set(summary["labels"]) == set(gen.labels)
    else:
        assert summary["labels"] == gen.labels

    manifest = load_manifest(out)
    assert manifest["labels"] == summary["labels"]
    for split in ("train", "val"):
        items = {item["id"]: item for item in manifest["items"][split]}
        assert set(items) == set(gen.masks[split])
        pixels = np.zeros(len(manifest["labels"]), dtype=np.int64)
        for item_id, expected in gen.masks[split].items():
            got = np.array(Image.open(out / items[item_id]["mask"]))
            assert got.dtype == np.uint8 and got.shape == expected.shape
            assert np.array_equal(_names(got, manifest["labels"], 255), _names(expected, gen.labels, 255)), item_id
            pixels += np.bincount(got.ravel(), minlength=256)[: len(pixels)]
            assert Image.open(out / items[item_id]["image"]).size == expected.shape[::-1]
        assert manifest["class_pixels"][split] == pixels.tolist()
    assert not list(tmp_path.glob(".out.partial*"))


def test_plain_colour_masks_through_palette(tmp_path):
    gen = generate(tmp_path / "src", "plain", color_masks=True, seed=5)
    manifest = convert(gen.root, tmp_path / "out")
    for item in manifest["items"]["train"]:
        got = np.array(Image.open(tmp_path / "out" / item["mask"]))
        assert np.array_equal(got, gen.masks["train"][item["id"]])


def test_plain_without_meta_names_labels_from_values(tmp_path):
    gen = generate(tmp_path / "src", "plain", with_meta=False, num_classes=3, seed=1)
    manifest = convert(gen.root, tmp_path / "out")
    used = {int(v) for m in gen.masks["train"].values() for v in np.unique(m) if v != 255}
    used |= {int(v) for m in gen.masks["val"].values() for v in np.unique(m) if v != 255}
    assert manifest["labels"] == [f"class_{i}" for i in range(max(used) + 1)]


def test_missing_val_split_is_split_deterministically(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    gen = generate(tmp_path / "src", "plain", num_train=10, num_val=0)
    a = convert(gen.root, tmp_path / "a", val_ratio=0.3, seed=7)
    b = convert(gen.root, tmp_path / "b", val_ratio=0.3, seed=7)
    c = convert(gen.root, tmp_path / "c", val_ratio=0.3, seed=8)
    assert a["splits"] == {"train": 7, "val": 3}
    assert a["val_split"] == {"from": "train", "val_ratio": 0.3, "seed": 7}
    ids = lambda m: [i["id"] for i in m["items"]["val"]]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert a["content_hash"] == b["content_hash"]
    assert "no validation split given" in caplog.text


def test_content_hash_tracks_pixels(tmp_path):
    gen = generate(tmp_path / "src", "plain", seed=2)
    first = convert(gen.root, tmp_path / "a")["content_hash"]
    mask_path = next((gen.root / "annotations" / "train").iterdir())
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = (mask[0, 0] + 1) % 4
    Image.fromarray(mask).save(mask_path)
    assert convert(gen.root, tmp_path / "b")["content_hash"] != first


def test_camvid_shared_dataset(tmp_path):
    root = Path(os.environ.get("SEGCORE_CAMVID", Path(__file__).parents[2] / "shared/datasets/camvid"))
    if not (root / "images").is_dir():
        pytest.skip("CamVid not available (set SEGCORE_CAMVID)")
    manifest = convert(root, tmp_path / "camvid")
    assert manifest["format"] == "plain"
    assert len(manifest["labels"]) == 11 and manifest["labels"][0] == "Sky"
    assert manifest["splits"] == {"train": 367, "val": 101}
    assert manifest["ignore_index"] == 255


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit code 2, no output directory left behind


def _break_truncate(gen):
    path = sorted((gen.root / "images" / "train").glob("*.png"))[0]
    path.write_bytes(path.read_bytes()[:200])
    return path


def _break_garbage(gen):
    path = sorted((gen.root / "images" / "train").glob("*.png"))[0]
    path.write_bytes(b"this is not an image at all" * 10)
    return path


def _break_mask_size(gen):
    path = sorted((gen.root / "annotations" / "train").glob("*.png"))[1]
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(path)
    return path


def _break_mask_value(gen):
    path = sorted((gen.root / "annotations" / "val").glob("*.png"))[0]
    mask = np.array(Image.open(path))
    mask[5, 5] = 7  # 4 labels + ignore 255
    Image.fromarray(mask).save(path)
    return path


def _break_missing_mask(gen):
    path = sorted((gen.root / "annotations" / "train").glob("*.png"))[2]
    path.unlink()
    return sorted((gen.root / "images" / "train").glob(path.stem + ".*"))[0]


def _break_missing_image(gen):
    path = sorted((gen.root / "images" / "val").glob("*"))[0]
    path.unlink()
    return gen.root / "annotations" / "val" / (path.stem + ".png")


def _break_empty_split(gen):
    for folder in ("images", "annotations"):
        for path in (gen.root / folder / "val").iterdir():
            path.unlink()
    return gen.root / "images" / "val"


BREAKERS = {
    "truncated image": (_break_truncate, "truncated"),
    "unreadable image": (_break_garbage, "unreadable"),
    "mask size": (_break_mask_size, "is 12x10 but its image"),
    "unknown mask value": (_break_mask_value, "mask value 7 is neither a label (0..3) nor the ignore index 255"),
    "image without mask": (_break_missing_mask, "image has no mask"),
    "mask without image": (_break_missing_image, "mask has no image"),
    "empty split": (_break_empty_split, "the val split is empty"),
}


def _assert_clean_failure(capsys, rc, out: Path, named: Path, problem: str):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert str(named) in err[0]
    assert problem in err[0]
    assert "Traceback" not in err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_plain(tmp_path, capsys, case):
    gen = generate(tmp_path / "src", "plain", num_train=4, num_val=2)
    breaker, problem = BREAKERS[case]
    named = breaker(gen)
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out)])
    _assert_clean_failure(capsys, rc, out, named, problem)


def test_bad_input_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(missing), "--output", str(out)])
    _assert_clean_failure(capsys, rc, out, missing, "does not exist")


def test_bad_input_unrecognised_format(tmp_path, capsys):
    root = tmp_path / "weird"
    root.mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "data.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(root), "--output", str(out)])
    _assert_clean_failure(capsys, rc, out, root, "unrecognised dataset format")
    # lists the supported formats
    rc = main(["convert", "--train-data-root", str(root), "--output", str(out)])
    err = capsys.readouterr().err
    for name in ("ade20k2020", "cityscapes", "voc", "common_semantic_segmentation", "camvid", "plain"):
        assert name in err


def test_bad_input_colour_not_in_palette(tmp_path, capsys):
    gen = generate(tmp_path / "src", "plain", color_masks=True)
    path = sorted((gen.root / "annotations" / "train").glob("*.png"))[0]
    rgb = np.array(Image.open(path))
    rgb[3, 4] = (1, 2, 3)
    Image.fromarray(rgb).save(path)
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out)])
    _assert_clean_failure(capsys, rc, out, path, "colour (1, 2, 3) at pixel (x=4, y=3) is not in the palette")


def test_bad_input_mask_value_datumaro_format(tmp_path, capsys):
    gen = generate(tmp_path / "src", "common_semantic_segmentation")
    path = sorted((gen.root / "train" / "masks").glob("*.png"))[0]
    mask = np.array(Image.open(path))
    mask[0, 0] = 9
    Image.fromarray(mask).save(path)
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out)])
    _assert_clean_failure(capsys, rc, out, path, "mask value 9 is not a label (0..3) or the ignore index 255")


def test_bad_input_truncated_image_datumaro_format(tmp_path, capsys):
    gen = generate(tmp_path / "src", "voc")
    path = sorted((gen.root / "JPEGImages").glob("*.jpg"))[0]
    path.write_bytes(path.read_bytes()[:300])
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out)])
    _assert_clean_failure(capsys, rc, out, path, "truncated")


def test_skip_invalid_drops_and_reports(tmp_path, capsys):
    gen = generate(tmp_path / "src", "plain", num_train=6, num_val=3)
    bad_image = _break_truncate(gen)
    bad_mask = _break_mask_value(gen)
    out = tmp_path / "out"
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out), "--skip-invalid", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 5, "val": 2}
    report = json.loads((out / "report.json").read_text())
    assert {s["file"] for s in report["skipped"]} == {str(bad_image), str(bad_mask)}
    assert all(s["problem"] for s in report["skipped"])


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    gen = generate(tmp_path / "src", "plain")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    rc = main(["convert", "--train-data-root", str(gen.root), "--output", str(out), "--overwrite"])
    assert rc == 0 and (out / "manifest.json").is_file() and not (out / "keep.txt").exists()


def test_demo_data_command(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo-data", "--output", str(out), "--num-train", "3", "--num-val", "2", "--size", "32x40"]) == 0
    assert "next: segcore convert" in capsys.readouterr().out
    manifest = convert(out, tmp_path / "ds")
    assert manifest["splits"] == {"train": 3, "val": 2}
    assert manifest["items"]["train"][0]["height"] == 32 and manifest["items"]["train"][0]["width"] == 40
    assert main(["demo-data", "--output", str(out)]) == 2


def test_real_process_exit_code_and_single_line(tmp_path):
    """The console script itself: exit status 2 and one stderr line, no traceback."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "segcore.cli",
            "convert",
            "--train-data-root",
            str(tmp_path / "x"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert not out.exists()


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "segcore.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "convert" in proc.stdout


def test_eval_dataset_cache_gives_the_same_items_and_reads_each_image_once(tmp_path, monkeypatch):
    import torch

    from segcore.data.dataset import EvalDataset, SegmentationDataset

    generate(tmp_path / "raw", "plain", num_train=2, num_val=3, size=(40, 48), seed=3)
    convert(tmp_path / "raw", tmp_path / "data")
    reads = []
    load = SegmentationDataset.load
    monkeypatch.setattr(SegmentationDataset, "load", lambda self, i: reads.append(i) or load(self, i))
    plain = EvalDataset(tmp_path / "data", "val", (32, 32))
    item_bytes = 32 * 32 * 3 + 40 * 48  # a resized uint8 image and its uint8 mask
    cached = EvalDataset(tmp_path / "data", "val", (32, 32), cache_mb=2.5 * item_bytes / 2**20)  # room for two
    for _ in range(3):  # three epochs
        for i in range(3):
            want, got = plain[i], cached[i]
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
            assert got[1].dtype == torch.int64
    assert reads.count(0) == reads.count(1) == 3 + 1  # plain: every epoch; cached: once
    assert reads.count(2) == 3 + 3  # beyond the budget: read every epoch, as without a cache
