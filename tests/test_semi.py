"""Semi-supervised training (Mean Teacher): the EMA teacher, pseudo-label filtering, the unlabelled
data stream, and the training end to end (mode switch, bundle, resume)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from runs import kill_after_epochs

from segcore import parallel
from segcore.cli import main
from segcore.data.synthetic import generate
from segcore.data.transforms import AugmentConfig
from segcore.errors import DataError
from segcore.semi import (
    SemiConfig,
    UnlabeledBatches,
    UnlabeledDataset,
    cutmix,
    cutmix_boxes,
    ignore_share,
    list_unlabeled,
    pseudo_labels,
    unlabeled_weight,
    unsupervised_balanced_ce,
    unsupervised_ce_dice,
    unsupervised_loss,
)
from segcore.training import WeightAverage

TINY = ["--input-size", "32x32", "--batch-size", "4", "--num-workers", "0", "--unlabeled-batch-size", "3"]


def test_weight_average_matches_a_scalar_reference():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, decay=0.9)
    want = 1.0
    for n, value in enumerate([3.0, -2.0, 5.0, 0.5] + [1.5] * 30):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        d = min(0.9, (1 + n) / (10 + n))  # the first updates follow the model closely
        want = d * want + (1 - d) * value
        assert average.model.weight.item() == pytest.approx(want, rel=1e-6)
    assert not average.model.weight.requires_grad
    copy = WeightAverage(model, decay=0.9)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == average.updates and copy.model.weight.item() == average.model.weight.item()
    with pytest.raises(Exception, match="decay"):
        WeightAverage(model, decay=1.0)


def test_weight_average_copies_integer_buffers_and_averages_bn_statistics():
    model = torch.nn.BatchNorm2d(2)
    average = WeightAverage(model, decay=0.5)
    model.train()
    model(torch.randn(4, 2, 3, 3) * 3 + 1)
    average.update(model)  # d = min(0.5, 1 / 10)
    assert average.model.num_batches_tracked.item() == 1
    assert torch.allclose(average.model.running_mean, 0.9 * model.running_mean)
    before = average.model.running_var.clone()
    model(torch.randn(4, 2, 3, 3))
    average.update(model)  # d = min(0.5, 2 / 11)
    assert torch.allclose(average.model.running_var, 2 / 11 * before + 9 / 11 * model.running_var)


def _reference_pseudo_labels(logits: np.ndarray, valid: np.ndarray, share: float, threshold: float = 0.0) -> np.ndarray:
    """Scalar loops: softmax, argmax, entropy; per image the floor(share x valid) highest-entropy
    valid pixels, every pixel whose largest probability is below ``threshold`` and every invalid
    pixel become 255."""
    n, c, h, w = logits.shape
    out = np.zeros((n, h, w), np.int64)
    for i in range(n):
        entropies = []
        for y in range(h):
            for x in range(w):
                z = [float(logits[i, k, y, x]) for k in range(c)]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                p = [v / sum(e) for v in e]
                out[i, y, x] = max(range(c), key=lambda k: p[k])
                if max(p) < threshold:
                    out[i, y, x] = 255
                if not valid[i, y, x]:
                    out[i, y, x] = 255
                else:
                    entropies.append((-sum(q * math.log(max(q, 1e-12)) for q in p), y, x))
        entropies.sort(reverse=True)
        for _, y, x in entropies[: int(math.floor(share * len(entropies)))]:
            out[i, y, x] = 255
    return out


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_pseudo_labels_drop_the_highest_entropy_share_of_each_image(share):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 4, 6, 7)).astype(np.float32)
    valid = rng.random((2, 6, 7)) > 0.2
    got = pseudo_labels(torch.from_numpy(logits), torch.from_numpy(valid), share).numpy()
    np.testing.assert_array_equal(got, _reference_pseudo_labels(logits, valid, share))
    kept = (got != 255).sum(axis=(1, 2))
    assert list(kept) == [v - int(math.floor(share * v)) for v in valid.sum(axis=(1, 2))]


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_pseudo_labels_drop_the_pixels_below_the_confidence_threshold(threshold):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 4, 6, 7)).astype(np.float32)
    valid = rng.random((2, 6, 7)) > 0.2
    got = pseudo_labels(torch.from_numpy(logits), torch.from_numpy(valid), 0.0, threshold=threshold).numpy()
    want = _reference_pseudo_labels(logits, valid, 0.0, threshold)
    np.testing.assert_array_equal(got, want)
    assert 0 < (want != 255).sum() < valid.sum()  # the threshold kept some valid pixels and dropped others


def test_a_confidence_threshold_replaces_the_entropy_share():
    config = SemiConfig(pseudo_ignore_start=0.2, pseudo_threshold=0.95)
    assert ignore_share(config, 1) == 0.0


def test_unsupervised_ce_dice_is_the_labelled_loss_over_the_used_pixels_times_their_share():
    from segcore.losses import DiceCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, :3] = 255  # 18 of 60 pixels not used
    got = unsupervised_ce_dice(logits, labels)
    assert got.item() == pytest.approx(DiceCrossEntropy()(logits, labels).item() * 42 / 60, rel=1e-6)
    got.backward()
    assert logits.grad[0, :, :3].abs().max() == 0 and logits.grad.abs().sum() > 0
    nothing = unsupervised_ce_dice(logits, torch.full_like(labels, 255))
    assert nothing.item() == 0.0 and nothing.requires_grad


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40), (7, 5)])
def test_cutmix_boxes_are_rectangles_of_half_the_area(height, width):
    rng = np.random.default_rng(0)
    boxes = cutmix_boxes(20, height, width, rng)
    assert boxes.shape == (20, height, width) and boxes.dtype == bool
    for box in boxes:
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box.sum() == len(rows) * len(cols)  # a filled rectangle
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)) and np.array_equal(
            cols, np.arange(cols[0], cols[-1] + 1)
        )
        assert abs(box.sum() - 0.5 * height * width) <= max(height, width)  # half the area, up to rounding
    assert len({b.tobytes() for b in boxes}) > (10 if height * width > 100 else 3)  # positions and shapes vary
    assert np.array_equal(boxes, cutmix_boxes(20, height, width, np.random.default_rng(0)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cutmix_takes_the_box_from_the_next_image_for_pixels_and_labels_alike(channels_last):
    rng = np.random.default_rng(1)
    images = torch.randn(3, 2, 6, 5)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(rng.integers(0, 4, (3, 6, 5)))
    boxes = cutmix_boxes(3, 6, 5, rng)
    mixed, mixed_labels = cutmix(images, labels, boxes)
    for i in range(3):
        for y in range(6):
            for x in range(5):
                source = (i + 1) % 3 if boxes[i, y, x] else i
                assert torch.equal(mixed[i, :, y, x], images[source, :, y, x])
                assert mixed_labels[i, y, x] == labels[source, y, x]
    assert mixed.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_ignore_share_falls_linearly_to_zero():
    config = SemiConfig(pseudo_ignore_start=0.2, pseudo_ignore_epochs=100)
    assert ignore_share(config, 1) == pytest.approx(0.2)
    assert ignore_share(config, 51) == pytest.approx(0.1)
    assert ignore_share(config, 101) == 0.0 and ignore_share(config, 300) == 0.0
    assert ignore_share(replace(config, pseudo_ignore_epochs=0), 1) == 0.0


def test_unlabeled_weight_ramps_up_as_mean_teacher_from_the_start_epoch():
    config = SemiConfig(unlabeled_weight=1.0, unlabeled_start_epoch=2, unlabeled_rampup_epochs=10)
    assert unlabeled_weight(config, 2) == pytest.approx(math.exp(-5 * 0.9**2))
    assert unlabeled_weight(config, 6) == pytest.approx(math.exp(-5 * 0.5**2))
    assert unlabeled_weight(config, 11) == 1.0 and unlabeled_weight(config, 40) == 1.0
    weights = [unlabeled_weight(config, e) for e in range(2, 12)]
    assert weights == sorted(weights)
    assert unlabeled_weight(replace(config, unlabeled_rampup_epochs=0), 2) == 1.0  # the default: at once


def test_unsupervised_balanced_ce_weighs_every_pseudo_label_class_alike_against_a_scalar_reference():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 2, 4, requires_grad=True)
    labels = torch.tensor([[[0, 0, 0, 0], [0, 0, 255, 1]], [[0, 0, 0, 255], [0, 0, 0, 255]]])  # class 2 absent
    got = unsupervised_balanced_ce(logits, labels)
    per_class = {}  # the reference, pixel by pixel: -log softmax of the label
    for n in range(2):
        for y in range(2):
            for x in range(4):
                c = int(labels[n, y, x])
                if c == 255:
                    continue
                scores = [float(logits[n, k, y, x]) for k in range(3)]
                nll = math.log(sum(math.exp(v) for v in scores)) - scores[c]
                per_class.setdefault(c, []).append(nll)
    used = sum(len(v) for v in per_class.values())
    reference = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class) * used / labels.numel()
    assert got.item() == pytest.approx(reference, rel=1e-6)
    assert len(per_class[0]) == 12 and len(per_class[1]) == 1  # the one class-1 pixel weighs as much as twelve
    got.backward()
    assert logits.grad[1, :, :, 3].abs().max() == 0 and logits.grad[0, :, 1, 3].abs().sum() > 0
    nothing = unsupervised_balanced_ce(logits, torch.full_like(labels, 255))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_the_cli_offers_the_unsupervised_losses_the_config_accepts():
    import argparse

    from segcore.commands.train import _add_semi_arguments
    from segcore.semi import LOSSES

    parser = argparse.ArgumentParser()
    _add_semi_arguments(parser)
    assert next(a.choices for a in parser._actions if a.dest == "unlabeled_loss") == LOSSES


def test_unsupervised_loss_is_normalised_by_all_pixels():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(2, 3, 4, 5)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, (2, 4, 5)))
    labels[0, :2] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert unsupervised_loss(logits, labels).item() == pytest.approx(per_pixel.sum().item() / labels.numel(), rel=1e-6)


def test_unlabelled_batches_cycle_evenly_resume_and_shard():
    one = UnlabeledBatches(10, 4, steps_per_epoch=3, seed=5, world=parallel.World())
    seen = []
    for epoch in (1, 2, 3, 4, 5):
        one.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == 3 and all(len(b) == 4 and all(e == epoch for e, _ in b) for b in batches)
        seen += [i for b in batches for _, i in b]
    counts = np.bincount(seen, minlength=10)
    assert counts.max() - counts.min() <= 1  # 60 draws over 10 images: each used 6 times
    one.set_epoch(3)
    assert list(one) == list(one)  # a resumed epoch sees the same batches
    # two ranks at batch 2 take the halves of the single process's batches of 4
    ranks = [UnlabeledBatches(10, 2, 3, 5, parallel.World(rank=r, size=2)) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(3)
    assert [a + b for a, b in zip(*[list(r) for r in ranks], strict=True)] == list(one)


def test_unlabelled_views_are_pixel_aligned(tmp_path):
    gen = generate(tmp_path / "raw", "plain", num_train=2, num_val=1, size=(40, 48), seed=3)
    files = list_unlabeled(gen.root / "images")
    augment = AugmentConfig(crop_size=(32, 32), rotate_p=1.0, crop_mode="random_resized_crop")
    plain = SemiConfig(strong_photometric_p=0.0, strong_grayscale_p=0.0, cutout_p=0.0)
    weak, strong, valid = UnlabeledDataset(files, augment, plain, seed=1)[(1, 0)]
    assert weak.shape == strong.shape == (3, 32, 32) and valid.shape == (32, 32)
    assert torch.equal(weak, strong)  # no strong changes: the same pixels
    assert not valid.all() and valid.any()  # rotation leaves corners outside the image
    cut = replace(plain, cutout_p=1.0)
    weak2, strong2, _ = UnlabeledDataset(files, augment, cut, seed=1)[(1, 0)]
    assert torch.equal(weak2, weak)  # the weak view does not depend on the strong settings
    changed = (strong2 != weak2).any(0)
    assert changed.any() and torch.allclose(strong2[:, changed], torch.zeros(()), atol=0.01)  # mean colour
    again = UnlabeledDataset(files, augment, SemiConfig(), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(again[(2, 1)], again[(2, 1)], strict=True))


def test_unlabelled_folder_errors_and_duplicates(tmp_path, caplog):
    with pytest.raises(DataError, match="no such folder"):
        list_unlabeled(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        list_unlabeled(tmp_path / "empty")
    gen = generate(tmp_path / "raw", "plain", num_train=3, num_val=1, size=(32, 32), seed=4)
    files = list_unlabeled(gen.root / "images" / "train")
    from segcore.data.dataset import read_rgb
    from segcore.semi import image_digest

    labelled = {image_digest(read_rgb(files[0]))}
    data = UnlabeledDataset(files, AugmentConfig(crop_size=(32, 32)), SemiConfig(), 0, labelled)
    assert data.files == files[1:]
    assert "skipped 1 unlabelled images" in caplog.text
    with pytest.raises(DataError, match="every unlabelled image"):
        UnlabeledDataset(files[:1], AugmentConfig(crop_size=(32, 32)), SemiConfig(), 0, labelled)


def _data(tmp_path):
    labelled = generate(tmp_path / "raw", "plain", num_train=8, num_val=2, size=(32, 32), seed=2)
    extra = generate(tmp_path / "more", "plain", num_train=6, num_val=0, size=(32, 40), seed=9)
    photos = tmp_path / "photos" / "nested"
    shutil.copytree(extra.root / "images" / "train", photos)
    shutil.copy(next((labelled.root / "images" / "train").iterdir()), photos / "dup.png")  # a labelled image
    return labelled, tmp_path / "photos"


def test_semi_mode_switches_on_only_with_unlabelled_images(tmp_path, capsys):
    labelled, photos = _data(tmp_path)
    base = ["train", "Lite-HRNet-s-mod2", "--train-data-root", str(labelled.root), "--epochs", "2",
            "--input-size", "32x32", "--batch-size", "4", "--num-workers", "0", "--json"]  # fmt: skip
    assert main([*base, "--output", str(tmp_path / "sup")]) == 0
    sup = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(x) for x in (tmp_path / "sup" / "metrics.jsonl").read_text().splitlines()]
    assert "semi_supervised" not in sup and sup["best_weights_from"] == "model"
    assert all("train_unsup_loss" not in r and "val_mdice_by_source" not in r for r in records)

    out = tmp_path / "semi"
    assert main([*base, "--output", str(out), "--unlabeled-data-root", str(photos), "--unlabeled-batch-size", "3"]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["semi_supervised"] == {"unlabeled_images": 6}  # the copy of a labelled image is skipped
    assert meta["training_config"]["semi"] == {"unlabeled_batch_size": 3}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train_unsup_loss"] == 0.0  # epoch 1: labelled data only
    # epoch 2 leaves out 19.8% of each image's pixels (floored to whole pixels), the highest-entropy ones
    assert records[1]["train_unsup_loss"] > 0 and 0 < records[1]["pseudo_pixel_share"] <= 0.802 + 1e-3
    assert all(set(r["val_mdice_by_source"]) == {"teacher", "student"} for r in records)
    best = max(records, key=lambda r: r["val_mdice"])
    assert meta["best_weights_from"] == best["weights_from"] in ("teacher", "student")
    assert best["val_mdice"] == max(best["val_mdice_by_source"].values())
    # the bundle evaluates to the Dice recorded for the chosen network
    assert main(["eval", str(out), "--test-data-root", str(labelled.root / "images" / "val"),
                 "--test-ann-files", str(labelled.root / "annotations" / "val"), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["mdice"] == pytest.approx(meta["best_val_mdice"], abs=1e-6)


def test_semi_options_without_unlabelled_data_are_refused(tmp_path, capsys):
    labelled, _ = _data(tmp_path)
    argv = ["train", "Lite-HRNet-s-mod2", "--train-data-root", str(labelled.root), "--output", str(tmp_path / "o")]
    assert main([*argv, "--unlabeled-weight", "0.5"]) == 2
    assert "need --unlabeled-data-root" in capsys.readouterr().err
    assert main([*argv, "--unlabeled-rampup", "5"]) == 2
    assert "need --unlabeled-data-root" in capsys.readouterr().err
    assert main([*argv, "--pseudo-threshold", "0.95"]) == 2
    assert "need --unlabeled-data-root" in capsys.readouterr().err
    assert main([*argv, "--unlabeled-data-root", str(tmp_path), "--pseudo-threshold", "1.5"]) == 2
    assert "--pseudo-threshold 1.5: give a probability between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([*argv, "--unlabeled-data-root", str(tmp_path), "--unlabeled-rampup", "-1"])
    assert "argument --unlabeled-rampup: -1: give 0 or more epochs" in capsys.readouterr().err
    assert main([*argv, "--unlabeled-data-root", str(tmp_path), "--teacher-decay", "1"]) == 2
    assert "--teacher-decay 1.0: give a value from 0 up to (not including) 1" in capsys.readouterr().err
    assert main([*argv, "--unlabeled-loss", "ce_dice"]) == 2
    assert "need --unlabeled-data-root" in capsys.readouterr().err
    assert main([*argv, "--unlabeled-data-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such folder of unlabelled images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mix", ["none", "cutmix"])
def test_semi_resume_continues_exactly(tmp_path, mix):
    """Two epochs, then a resume to three, equal one run of three: student, teacher, optimizer."""
    from segcore.data.convert import convert
    from segcore.semi import list_unlabeled
    from segcore.training import TrainConfig, train

    labelled, photos = _data(tmp_path)
    convert(labelled.root, tmp_path / "ds")
    files = list_unlabeled(photos)
    config = TrainConfig.from_template(
        "Lite-HRNet-s-mod2", epochs=3, batch_size=4, input_size=(32, 32), num_workers=0, precision="fp32",
        semi={"unlabeled_batch_size": 3, "unlabeled_mix": mix},
    )  # fmt: skip
    train(config, tmp_path / "ds", tmp_path / "whole", unlabeled=files)
    train(replace(config, epochs=2), tmp_path / "ds", tmp_path / "parts", unlabeled=files)
    (tmp_path / "parts" / "model.json").unlink()
    train(config, tmp_path / "ds", tmp_path / "parts", unlabeled=files, resume=True)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    for key in ("model",):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), name
    for name, value in a["ema"]["model"].items():
        assert torch.equal(value, b["ema"]["model"][name]), name
    assert a["ema"]["updates"] == b["ema"]["updates"]
    lines = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["val_mdice"] for r in lines(tmp_path / "whole")] == [r["val_mdice"] for r in lines(tmp_path / "parts")]


def test_cutmix_and_the_balanced_loss_change_what_the_student_learns_from(tmp_path):
    """The options reach the training step: same seed and data, plain, with CutMix and with the
    class-balanced loss, the unsupervised losses of epoch 2 (the first with unlabelled data) differ."""
    from segcore.data.convert import convert
    from segcore.semi import list_unlabeled
    from segcore.training import TrainConfig, train

    labelled, photos = _data(tmp_path)
    convert(labelled.root, tmp_path / "ds")
    losses = {}
    for name, semi in (
        ("none", {}),
        ("cutmix", {"unlabeled_mix": "cutmix"}),
        ("ce_balanced", {"unlabeled_loss": "ce_balanced"}),
    ):
        config = TrainConfig.from_template(
            "Lite-HRNet-s-mod2", epochs=2, batch_size=4, input_size=(32, 32), num_workers=0, precision="fp32",
            semi={"unlabeled_batch_size": 3, **semi},
        )  # fmt: skip
        train(config, tmp_path / "ds", tmp_path / name, unlabeled=list_unlabeled(photos))
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["train_unsup_loss"] == 0.0 < records[1]["train_unsup_loss"]
        losses[name] = records[1]["train_unsup_loss"]
    assert len(set(losses.values())) == 3, losses


def test_semi_resume_after_sigkill_continues_at_the_next_epoch(tmp_path):
    labelled, photos = _data(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "segcore.cli", "train", "Lite-HRNet-s-mod2", "--train-data-root", str(labelled.root),
           "--unlabeled-data-root", str(photos), "--output", str(out), "--epochs", "12", *TINY]  # fmt: skip
    env = {**os.environ, "CI": "true"}
    metrics = out / "metrics.jsonl"
    done = kill_after_epochs(cmd, env, metrics, epochs=2, timeout_s=240)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == done[-1] and ckpt["ema"]["updates"] > 0  # the teacher is checkpointed
    resumed = subprocess.run([*cmd, "--resume", "--epochs", str(done[-1] + 2)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done[-1]}" in resumed.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, done[-1] + 3))
    assert all(r["train_unsup_loss"] > 0 for r in records[1:])


def test_the_pipeline_training_keys_its_checkpoints_by_the_unlabelled_data(tmp_path):
    """train_resumable (the pipeline's train step): semi-supervised with unlabelled data, and a
    checkpoint folder of its own (a supervised training of the same data is not reused)."""
    from segcore.data.convert import convert
    from segcore.steps import TrainOptions, train_resumable

    labelled, photos = _data(tmp_path)
    convert(labelled.root, tmp_path / "ds")
    options = TrainOptions(epochs=2, batch_size=4, input_size=(32, 32), num_workers=0, precision="fp32")
    key = {"epochs": 2}
    sup, sup_at = train_resumable("Lite-HRNet-s-mod2", str(tmp_path / "ds"), str(tmp_path / "m1"), options,
                                  str(tmp_path / "ckpt"), key)  # fmt: skip
    semi, semi_at = train_resumable("Lite-HRNet-s-mod2", str(tmp_path / "ds"), str(tmp_path / "m2"), options,
                                    str(tmp_path / "ckpt"), {**key, "unlabeled": str(photos)},
                                    unlabeled=str(photos))  # fmt: skip
    assert sup_at != semi_at
    assert "semi_supervised" not in sup and semi["semi_supervised"] == {"unlabeled_images": 6}


def test_semi_config_refuses_an_unknown_loss_or_mix():
    with pytest.raises(ValueError, match="unlabeled_mix 'mixup': choose one of none, cutmix"):
        SemiConfig(unlabeled_mix="mixup")
    with pytest.raises(ValueError, match="unlabeled_loss 'dice': choose one of ce, ce_dice, ce_balanced"):
        SemiConfig(unlabeled_loss="dice")
