"""Loss, augmentations, LR schedule, early stopping, metrics, and training end to end (incl. resume)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from runs import kill_after_epochs

from segcore.cli import main
from segcore.data import transforms as T
from segcore.data.synthetic import generate
from segcore.errors import SegcoreError
from segcore.losses import MaxPoolingCrossEntropy, max_pooling_weights
from segcore.metrics import ConfusionMatrix
from segcore.training import EarlyStopping, WarmupPlateauLR

# ---------------------------------------------------------------------------------- loss


def brute_force_weights(losses: list[float], ratio: float, p: float) -> list[float]:
    """The documented algorithm, scalar loop by loop (sorted scan, threshold, tau / alpha);
    pixels at or above the stopping index i* get tau."""
    eps = float(np.finfo(np.float32).eps)
    order = sorted(range(len(losses)), key=lambda k: losses[k])
    s = [losses[k] for k in order]
    size = len(s)
    w = [0.0] * size
    pos = 0
    while pos < size and s[pos] < eps:
        pos += 1
    n = size - pos
    m = int(ratio * n)
    if n <= 0 or m <= 0:
        return w
    q = p / (p - 1)
    c = m - n
    a0 = a1 = 0.0
    i, eta = pos, 0.0
    while i < size and eta < eps:
        lq = (s[i] / s[-1]) ** q
        a0, a1 = a1, a1 + lq
        c += 1
        eta = c * lq - a1
        i += 1
    if eta < eps:
        c += 1
        a0 = a1
    else:
        i -= 1  # i* itself gets tau
    alpha = (a0 / c) ** (1 / q) * s[-1]
    tau = 1 / (n ** (1 / q) * m ** (1 / p))
    for k in range(i, size):
        w[order[k]] = tau
    if alpha > -eps:
        for k in range(pos, i):
            w[order[k]] = tau * (s[k] / alpha) ** (q - 1)
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio,p", [(0.25, 1.7), (0.5, 2.5), (0.1, 1.3)])
def test_max_pooling_weights_match_brute_force(seed, ratio, p):
    rng = np.random.default_rng(seed)
    losses = rng.exponential(1.0, size=300).astype(np.float32)
    losses[:20] = 0.0  # zero-loss pixels get no weight
    got = max_pooling_weights(torch.from_numpy(losses), ratio, p).numpy()
    want = np.array(brute_force_weights(losses.tolist(), ratio, p))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
    assert np.all(got[:20] == 0)
    ranked = got[np.argsort(losses)][20:]  # non-zero losses, easiest first
    n, m = len(ranked), int(ratio * len(ranked))
    tau = 1 / (n ** (1 - 1 / p) * m ** (1 / p))
    assert ranked[-1] == pytest.approx(tau)  # the hardest pixels get tau
    assert ranked[-len(ranked) // 4 :].mean() > 2 * ranked[: len(ranked) // 2].mean()  # hard ones dominate


def test_max_pooling_degenerate_cases():
    assert torch.all(max_pooling_weights(torch.zeros(10)) == 0)
    assert torch.all(max_pooling_weights(torch.tensor([1.0, 2.0])) == 0)  # m = int(0.25 * 2) = 0


def test_max_pooling_loss_gradient_follows_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 7))
    target[0, 0, :] = 255
    loss = MaxPoolingCrossEntropy(ignore_index=255)(logits, target)
    loss.backward()
    # the same value and gradient from the weights used as constants
    logits2 = logits.detach().clone().requires_grad_(True)
    pixel = torch.nn.functional.cross_entropy(logits2, target, ignore_index=255, reduction="none")
    valid = target != 255
    w = max_pooling_weights(pixel[valid].detach())
    manual = (w * pixel[valid]).sum()
    manual.backward()
    assert torch.allclose(loss, manual, rtol=1e-5)
    assert torch.allclose(logits.grad, logits2.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(logits.grad[0, :, 0, :] == 0)  # ignored pixels contribute nothing
    # a step against the gradient lowers the loss
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    assert MaxPoolingCrossEntropy()(stepped, target) < loss


# ---------------------------------------------------------------------------------- augmentations


def _blocky(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 4, size=(h // 10, w // 10)), np.ones((10, 10), dtype=np.int64)).astype(np.uint8)
    mask[:5, :] = 255
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = np.where(mask == 255, 250, mask * 40 + 20)
    image[..., 1] = 100
    return image, mask


def _agreement(image, mask):
    """Share of interior mask pixels (away from class edges, where interpolation blends colours)
    whose colour encodes their class; padding is image 0 with mask ignore."""
    expect = np.where(mask == 255, 250, mask.astype(np.int32) * 40 + 20)
    padded = (mask == 255) & (image[..., 0] == 0)
    ok = (np.abs(image[..., 0].astype(np.int32) - expect) <= 2) | padded
    m = np.pad(mask, 1, mode="edge")
    interior = (m[1:-1, 1:-1] == m[:-2, 1:-1]) & (m[1:-1, 1:-1] == m[2:, 1:-1])
    interior &= (m[1:-1, 1:-1] == m[1:-1, :-2]) & (m[1:-1, 1:-1] == m[1:-1, 2:])
    return ok[interior].mean()


@pytest.mark.parametrize(
    "op",
    [
        lambda i, m, r: T.rescale(i, m, (120, 90)),
        lambda i, m, r: T.rescale(i, m, (40, 30)),
        lambda i, m, r: T.random_crop(i, m, (40, 50), r, 0.75, 255),
        lambda i, m, r: (i[:, ::-1], m[:, ::-1]),
        lambda i, m, r: T.rotate(i, m, 25.0, 255),
        lambda i, m, r: T.pad_to(i, m, (64, 96), 255),
    ],
    ids=["upscale", "downscale", "crop", "flip", "rotate", "pad"],
)
def test_geometric_augmentations_keep_alignment(op):
    image, mask = _blocky()
    out_image, out_mask = op(image, mask, np.random.default_rng(0))
    assert out_image.shape[:2] == out_mask.shape
    assert _agreement(out_image, out_mask) > 0.97
    assert set(np.unique(out_mask)) <= set(np.unique(mask))  # no new values: ignore stays 255


def test_rotation_pads_image_zero_and_mask_ignore():
    image, mask = _blocky()
    out_image, out_mask = T.rotate(image, mask, 30.0, 255)
    corner = (slice(0, 3), slice(0, 3))
    assert np.all(out_mask[corner] == 255) and np.all(out_image[corner] == 0)


def test_crop_limits_one_class_share():
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[:, 70:] = 1
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(20):
        _, m = T.random_crop(image, mask, (50, 50), rng, 0.75, 255)
        shares.append(np.bincount(m.ravel(), minlength=2)[:2].max() / m.size)
    assert np.mean(np.array(shares) < 0.75) > 0.8


def test_photometric_and_mixing_leave_mask_alone():
    image, mask = _blocky()
    rng = np.random.default_rng(3)
    keep = T.mixing_mask(mask.shape, rng)
    assert keep.dtype == bool and 0.4 < keep.mean() < 0.6
    out = T.photometric(image, rng)
    assert out.shape == image.shape and out.dtype == np.uint8
    cfg = T.AugmentConfig(crop_size=(48, 64), mix_p=1.0, rotate_p=0.0)
    x, y = T.TrainTransform(cfg)(image, mask, np.random.default_rng(1))
    assert x.shape == (3, 48, 64) and x.dtype == np.float32 and y.shape == (48, 64)
    assert set(np.unique(y)) <= set(np.unique(mask))


def _photometric_per_pixel(image, rng):
    """The photometric distortion computed on float32 images pixel by pixel (its definition)."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img *= rng.uniform(0.5, 1.5)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19)) % 180
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first and rng.random() < 0.5:
        img *= rng.uniform(0.5, 1.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_photometric_tables_equal_the_per_pixel_definition():
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for seed in range(64):  # covers every combination of the four coin flips
        fast, slow = np.random.default_rng(seed), np.random.default_rng(seed)
        assert np.array_equal(T.photometric(image, fast), _photometric_per_pixel(image, slow)), seed
        assert fast.random() == slow.random()  # the same draws: later augmentation is unchanged


def test_train_transform_is_deterministic_per_seed():
    image, mask = _blocky()
    t = T.TrainTransform(T.AugmentConfig(crop_size=(32, 32)))
    a = t(image, mask, np.random.default_rng([1, 2, 3]))
    b = t(image, mask, np.random.default_rng([1, 2, 3]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ---------------------------------------------------------------------------------- schedule


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_then_plateau_sequence():
    opt = _optimizer()
    s = WarmupPlateauLR(opt, 1.0, warmup_iters=4, start_factor=1 / 3, factor=0.1, patience=2, min_lr=0.005)
    lrs = [s.lr]
    for _ in range(6):
        s.step_iteration()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [1 / 3, 1 / 3 + 2 / 3 * 0.25, 1 / 3 + 2 / 3 * 0.5, 1 / 3 + 2 / 3 * 0.75, 1.0, 1.0, 1.0]
    assert lrs == pytest.approx(expected)
    s.step_epoch(0.5)  # best
    for _ in range(3):  # 3 bad epochs > patience 2 -> drop
        s.step_epoch(0.4)
    assert s.lr == pytest.approx(0.1)
    for _ in range(3):
        s.step_epoch(0.4)
    assert s.lr == pytest.approx(0.01)
    for _ in range(3):
        s.step_epoch(0.4)
    assert s.lr == pytest.approx(0.005)  # floored at min_lr
    s.step_epoch(0.9)  # improvement resets the count
    s.step_epoch(0.8)
    s.step_epoch(0.8)
    assert s.lr == pytest.approx(0.005)


def test_no_plateau_drop_during_warmup():
    opt = _optimizer()
    s = WarmupPlateauLR(opt, 1.0, warmup_iters=100, start_factor=0.5, factor=0.1, patience=0, min_lr=1e-6)
    s.step_epoch(0.5)
    for _ in range(5):
        s.step_iteration()
        s.step_epoch(0.1)
    assert s.lr == pytest.approx(0.5 + 0.5 * 5 / 100)


def test_warmup_plateau_state_round_trip():
    opt = _optimizer()
    s = WarmupPlateauLR(opt, 1.0, 4, 1 / 3, 0.1, 2, 1e-6)
    for _ in range(5):
        s.step_iteration()
    s.step_epoch(0.3)
    s.step_epoch(0.2)
    t = WarmupPlateauLR(_optimizer(), 1.0, 4, 1 / 3, 0.1, 2, 1e-6)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_early_stopping():
    stop = EarlyStopping(start_epoch=3, patience=2)
    decisions = [stop.update(e, s) for e, s in enumerate([0.5, 0.4, 0.4, 0.6, 0.5, 0.5, 0.5], start=1)]
    assert decisions == [False, False, False, False, False, True, True]
    assert stop.best_epoch == 4
    late = EarlyStopping(start_epoch=5, patience=2)
    assert [late.update(e, s) for e, s in enumerate([0.9, 0.1, 0.1, 0.1, 0.1, 0.1], start=1)] == [
        False, False, False, False, False, True,
    ]  # fmt: skip
    never = EarlyStopping(start_epoch=3, patience=0)  # --early-stop-patience 0
    assert not any(never.update(e, s) for e, s in enumerate([0.9] + [0.1] * 30, start=1))


# ---------------------------------------------------------------------------------- metrics


def test_dice_and_iou_by_hand():
    # classes 0, 1, 2 (2 absent everywhere), 3 predicted but never true; 255 ignored
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [3, 3, 1, 0]])
    cm = ConfusionMatrix(4, 255)
    cm.update(pred, gt)
    s = cm.scores(["a", "b", "c", "d"])
    # class 0: gt 3 px, pred 1 px (ignored pixels excluded), tp 1 -> dice 2/4, iou 1/3
    # class 1: gt 3, pred 4 (one predicted where gt is 0), tp 3 -> dice 6/7, iou 3/4
    # class 2: absent -> left out
    # class 3: gt 0, pred 1 -> dice 0, iou 0
    assert s["per_class"]["a"] == {"dice": pytest.approx(0.5), "iou": pytest.approx(1 / 3)}
    assert s["per_class"]["b"] == {"dice": pytest.approx(6 / 7), "iou": pytest.approx(0.75)}
    assert s["per_class"]["c"] == {"dice": None, "iou": None}
    assert s["per_class"]["d"] == {"dice": 0.0, "iou": 0.0}
    assert s["mdice"] == pytest.approx((0.5 + 6 / 7 + 0) / 3)
    assert s["miou"] == pytest.approx((1 / 3 + 0.75 + 0) / 3)


def test_dice_sums_pixels_over_the_split_not_per_image():
    cm = ConfusionMatrix(2, 255)
    cm.update(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]))  # perfect, 4 px of class 1
    cm.update(np.array([0]), np.array([1]))  # one miss
    s = cm.scores()
    assert s["per_class"]["1"]["dice"] == pytest.approx(2 * 4 / (5 + 4))
    assert not math.isnan(s["mdice"])


def test_class_map_is_argmax_with_the_first_index_on_ties():
    from segcore.metrics import class_map

    logits = torch.randint(0, 3, (2, 5, 4, 6)).float()  # few values: many ties
    logits[0, :, 0, 0] = float("inf")
    want = torch.zeros(2, 4, 6, dtype=torch.long)
    for n, y, x in np.ndindex(2, 4, 6):
        column = logits[n, :, y, x].tolist()
        want[n, y, x] = column.index(max(column))  # the first largest, one pixel at a time
    assert torch.equal(class_map(logits, 1), want)
    assert torch.equal(class_map(logits[1], 0), want[1])


class _Counted(torch.utils.data.Dataset):
    """Items of an eval split (normalised image, mask at its own size), counting the reads."""

    def __init__(self, items):
        self.items, self.reads = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.reads += 1
        return self.items[index]


def test_evaluate_all_scores_each_network_on_one_pass_as_a_pixel_count_does():
    from segcore.training import evaluate, evaluate_all

    gen = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (8, 8), (6, 10), (8, 8), (5, 5)]  # batch 2: one batch of two sizes, one of one image
    items = []
    for size in sizes:
        mask = torch.randint(0, 3, size, generator=gen)
        mask[0, 0] = 255
        items.append((torch.randn(3, 8, 8, generator=gen), mask))
    dataset = _Counted(items)
    convs = {name: torch.nn.Conv2d(3, 3, 1) for name in ("a", "b")}

    def predictor(conv):
        return lambda images, size: torch.nn.functional.interpolate(conv(images), size=size, mode="bilinear")

    predicts = {name: predictor(conv) for name, conv in convs.items()}
    together = evaluate_all(predicts, dataset, 3, 255, batch_size=2)
    assert dataset.reads == len(sizes)  # each image read once for both networks
    for name, predict in predicts.items():
        matrix = np.zeros((3, 3), dtype=np.int64)
        for image, mask in items:
            with torch.no_grad():
                pred = predict(image[None], size=tuple(mask.shape))[0].argmax(0)
            for truth, guess in zip(mask.reshape(-1).tolist(), pred.reshape(-1).tolist(), strict=True):
                if truth != 255:
                    matrix[truth, guess] += 1
        assert together[name]["confusion_matrix"] == matrix.tolist()
        assert together[name]["num_images"] == len(sizes)
        alone = evaluate(predict, dataset, 3, 255, batch_size=2)
        assert alone["mdice"] == together[name]["mdice"] and alone["confusion_matrix"] == matrix.tolist()


# ---------------------------------------------------------------------------------- end to end

TINY = ["--input-size", "32x32", "--batch-size", "4", "--num-workers", "0"]


def test_train_eval_predict_end_to_end(tmp_path, capsys):
    gen = generate(tmp_path / "raw", "plain", num_train=8, num_val=4, size=(40, 48), seed=1)
    out = tmp_path / "run"
    assert main(["train", "Lite-HRNet-s-mod2", "--train-data-root", str(gen.root), "--output", str(out),
                 "--epochs", "2", *TINY, "--json"]) == 0  # fmt: skip
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["labels"] == gen.labels and meta["epochs_run"] == 2
    assert meta["template"] == "Custom_Semantic_Segmentation_Lite-HRNet-s-mod2_OCR"
    state = torch.load(out / "best.pt", weights_only=True)
    assert "model" in state
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["val_mdice"] <= 1 and set(r["val_dice"]) == set(gen.labels) for r in records)

    assert main(["eval", str(out), "--test-data-root", str(gen.root / "images" / "val"),
                 "--test-ann-files", str(gen.root / "annotations" / "val"), "--json"]) == 0  # fmt: skip
    scores = json.loads(capsys.readouterr().out)
    assert scores["num_images"] == 4 and set(scores["per_class"]) == set(gen.labels)
    assert scores["mdice"] == pytest.approx(meta["best_val_mdice"], abs=1e-6)

    pred = tmp_path / "pred"
    assert main(["predict", str(out), "--input", str(gen.root / "images" / "val"), "--output", str(pred),
                 "--overlay"]) == 0  # fmt: skip
    from PIL import Image

    masks = sorted(pred.glob("val_*[0-9].png"))
    assert len(masks) == 4
    m = np.array(Image.open(masks[0]))
    assert m.dtype == np.uint8 and m.shape == (40, 48) and m.max() < len(gen.labels)
    assert len(list(pred.glob("*_overlay.png"))) == 4


def test_train_refuses_to_clobber_and_eval_rejects_non_bundle(tmp_path, capsys):
    gen = generate(tmp_path / "raw", "plain", num_train=4, num_val=2, size=(32, 32))
    assert main(["eval", str(tmp_path), "--test-data-root", str(gen.root)]) == 2
    assert "not a segcore model bundle" in capsys.readouterr().err
    assert main(["train", "no-such-template", "--train-data-root", str(gen.root), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Lite-HRNet-18" in err and len(err.strip().splitlines()) == 1


def test_resume_after_sigkill_continues_from_checkpoint(tmp_path):
    gen = generate(tmp_path / "raw", "plain", num_train=8, num_val=2, size=(32, 32), seed=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "segcore.cli", "train", "Lite-HRNet-s-mod2", "--train-data-root", str(gen.root),
           "--output", str(out), "--epochs", "12", *TINY]  # fmt: skip
    env = {**os.environ, "CI": "true"}
    metrics = out / "metrics.jsonl"
    done = kill_after_epochs(cmd, env, metrics, epochs=2, timeout_s=180)
    assert not (out / "model.json").exists()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == done[-1]  # the checkpoint holds every finished epoch

    # the same command without --resume refuses; with it, training continues after done[-1]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 2
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done[-1]}" in resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # nothing redone, nothing skipped
    assert len(epochs) > len(done)
    meta = json.loads((out / "model.json").read_text())
    assert meta["epochs_run"] == epochs[-1]


def test_random_resized_crop_keeps_labels_and_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[:, 40:] = 2
    mask[:5] = 255
    for _ in range(20):
        img, out = T.random_resized_crop(image, mask, (32, 48), rng, (0.2, 1.0), (0.5, 2.0))
        assert img.shape == (32, 48, 3) and out.shape == (32, 48)
        assert set(np.unique(out)) <= {0, 2, 255}  # nearest: no value that was not there
    t = T.TrainTransform(T.AugmentConfig(crop_size=(32, 32), crop_mode="random_resized_crop", photometric_p=0.5))
    x, y = t(image, mask, rng)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    with pytest.raises(ValueError, match="crop_mode"):
        T.AugmentConfig(crop_mode="zoom")


def test_photometric_p_1_keeps_the_random_stream_of_the_reference_recipe():
    """The reference recipe (p=1) draws no extra number for the step's probability: its seeded
    augmentation is the one the step had before ``photometric_p`` existed."""
    from segcore.models.templates import RECIPES

    image = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    reference = {**RECIPES["reference"][1], "mix_p": 0.0}
    assert reference["photometric_p"] == 1.0
    rng = np.random.default_rng(5)
    a = T.TrainTransform(T.AugmentConfig(crop_size=(32, 32), **reference))(image, mask, rng)
    b = T.TrainTransform(T.AugmentConfig(crop_size=(32, 32), **{**reference, "photometric_p": 0.999}))(
        image, mask, np.random.default_rng(5)
    )
    assert not np.array_equal(a[0], b[0])  # p < 1 draws one number more: the stream shifts
    none = T.TrainTransform(T.AugmentConfig(crop_size=(32, 32), mix_p=0.0, rotate_p=0.0, photometric_p=0.0))
    c = none(image, mask, np.random.default_rng(5))
    assert c[0].shape == (3, 32, 32)


def test_named_recipes_start_from_the_defaults_and_take_overrides():
    import dataclasses

    from segcore.data.transforms import AugmentConfig
    from segcore.models.templates import RECIPES
    from segcore.training import TrainConfig

    default = TrainConfig.from_template("Lite-HRNet-s-mod2")
    assert default.recipe == "default" and default.augment == {} and default.loss == "ce_dice"
    assert AugmentConfig().crop_mode == "random_resized_crop" and AugmentConfig().mix_p == 0.0
    ref = TrainConfig.from_template("Lite-HRNet-s-mod2", recipe="reference", lr=5e-4, augment={"mix_p": 0.25})
    assert (ref.recipe, ref.loss, ref.grad_clip_norm, ref.warmup_iters, ref.lr) == (
        "reference", "max_pooling", 40.0, 80, 5e-4
    )  # fmt: skip
    assert ref.augment == {"crop_mode": "rescale_crop", "rotate_p": 0.5, "mix_p": 0.25, "photometric_p": 1.0}
    with pytest.raises(SegcoreError, match="unknown recipe 'otx1'"):
        TrainConfig.from_template("Lite-HRNet-s-mod2", recipe="otx1")
    # the CLI's --recipe choices are written out (no torch import to build the parser): the same names
    import argparse

    from segcore.commands.train import _add_recipe_arguments

    parser = argparse.ArgumentParser()
    _add_recipe_arguments(parser)
    assert next(a.choices for a in parser._actions if a.dest == "recipe") == tuple(RECIPES)
    # a bundle's config comes back as it was; one from before named recipes had the reference's
    meta = {"training_config": dataclasses.asdict(ref), "input_size": [512, 512]}
    assert TrainConfig.from_bundle(meta) == ref
    legacy = {k: v for k, v in dataclasses.asdict(ref).items() if k not in ("recipe", "loss", "init")}
    old = TrainConfig.from_bundle({"training_config": {**legacy, "augment": {}}, "input_size": [512, 512]})
    assert (old.recipe, old.loss, old.init) == ("reference", "max_pooling", "torch")
    assert AugmentConfig(**old.augment) == AugmentConfig(**RECIPES["reference"][1])


def test_cross_entropy_option_is_plain_mean_cross_entropy():
    from segcore.training import TrainConfig, make_criterion

    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = 255
    config = TrainConfig.from_template("Lite-HRNet-s-mod2", loss="cross_entropy")
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(make_criterion(config, 255)(logits, target), expected)
    with pytest.raises(SegcoreError, match="unknown loss"):
        make_criterion(TrainConfig.from_template("Lite-HRNet-s-mod2", loss="dice"), 255)


def test_ce_dice_loss_is_cross_entropy_plus_soft_dice_over_valid_pixels():
    from segcore.training import TrainConfig, make_criterion

    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    criterion = make_criterion(TrainConfig.from_template("Lite-HRNet-s-mod2", loss="ce_dice", dice_weight=0.5), 255)
    # a confident, correct prediction: both terms vanish; whatever it says on ignored pixels
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 40
    perfect[0, :, :2] = torch.tensor([0.0, 40.0, 0.0]).view(3, 1, 1)
    assert criterion(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    # otherwise: cross-entropy + 0.5 * (1 - mean soft Dice), the Dice from softmax over valid pixels
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    valid = target != 255
    probs = logits.softmax(1).permute(0, 2, 3, 1)[valid]
    onehot = torch.nn.functional.one_hot(target[valid], 3).float()
    dice = (2 * (probs * onehot).sum(0) + 1) / (probs.sum(0) + onehot.sum(0) + 1)
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255) + 0.5 * (1 - dice.mean())
    loss = criterion(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss.backward()
    assert torch.allclose(logits.grad, expected_grad, rtol=1e-4, atol=1e-7)
    assert logits.grad[0, :, :2].abs().max() == 0  # ignored pixels get no gradient


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ce_dice_hand_written_backward_equals_autograd_of_the_textbook_form(ignored, channels_last):
    """The loss's own backward pass (float64, every pixel valid or some ignored, either memory
    order) against autograd through softmax, one-hot and sums."""
    from segcore.losses import DiceCrossEntropy

    torch.manual_seed(1)
    target = torch.randint(0, 5, (3, 6, 7))
    if ignored:
        target[0, :2] = 255
        target[2, :, 3] = 255
    logits = torch.randn(3, 5, 6, 7, dtype=torch.float64) * 3
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    valid = target != 255
    probs = theirs.softmax(1).permute(0, 2, 3, 1)[valid]
    onehot = torch.nn.functional.one_hot(target[valid], 5).double()
    dice = (2 * (probs * onehot).sum(0) + 1) / (probs.sum(0) + onehot.sum(0) + 1)
    expected = torch.nn.functional.cross_entropy(theirs, target, ignore_index=255) + 0.7 * (1 - dice.mean())
    loss = DiceCrossEntropy(dice_weight=0.7)(ours, target)
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-10, atol=1e-15)
    if ignored:
        assert ours.grad.permute(0, 2, 3, 1)[~valid].abs().max() == 0


def test_ce_dice_reads_bf16_logits_as_an_fp32_copy_would_give_them():
    """bf16 logits go into the loss as they are (no fp32 copy at the peak of memory): the loss and
    the bf16 gradient equal those through an explicit fp32 copy exactly."""
    from segcore.losses import DiceCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 16).bfloat16()
    target = torch.randint(0, 5, (2, 16, 16))
    target[0, :3] = 255
    direct, copied = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, expected = DiceCrossEntropy()(direct, target), DiceCrossEntropy()(copied.float(), target)
    loss.backward()
    expected.backward()
    assert loss.dtype == torch.float32 and loss.item() == expected.item()
    assert direct.grad.dtype == torch.bfloat16 and torch.equal(direct.grad, copied.grad)


def test_kaiming_init_scales_convolutions_by_fan_out_and_keeps_the_classifier():
    from segcore.models import create_model, init_weights

    torch.manual_seed(0)
    model = init_weights(create_model("Lite-HRNet-s-mod2", 3), "kaiming")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.decode_head.conv_seg]
    big = max(convs, key=lambda m: m.weight.numel())
    fan_out = big.weight.shape[0] * big.weight[0, 0].numel()
    assert big.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)
    assert all(m.bias is None or not m.bias.any() for m in convs)
    assert model.decode_head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.2)
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(model, "xavier")
    # the recipe's default leaves PyTorch's initialisation alone
    torch.manual_seed(1)
    a = create_model("Lite-HRNet-s-mod2", 3)
    torch.manual_seed(1)
    b = init_weights(create_model("Lite-HRNet-s-mod2", 3), "torch")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_otx_init_draws_only_the_conv_modules_by_fan_out():
    """OTX 2.6's Lite-HRNet: kaiming for its ConvModules (segcore's ConvBNAct), PyTorch's
    defaults for the plain fuse/transition convolutions and the classifier."""
    from segcore.models import create_model, init_weights
    from segcore.models.litehrnet import ConvBNAct

    torch.manual_seed(0)
    model = init_weights(create_model("Lite-HRNet-18", 11), "otx")
    conv_bn_act = [m.conv for m in model.modules() if isinstance(m, ConvBNAct)]
    big = max(conv_bn_act, key=lambda m: m.weight.numel())
    fan_out = big.weight.shape[0] * big.weight[0, 0].numel()
    assert big.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)
    assert all(m.bias is None or not m.bias.any() for m in conv_bn_act)
    inside = {id(m) for m in conv_bn_act}
    plain = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in inside]
    fuse = max(plain, key=lambda m: m.weight.numel())
    for conv in (fuse, model.decode_head.conv_seg):  # PyTorch's U(+-1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.15)


def test_early_stopping_and_plateau_patience_from_the_cli(tmp_path, capsys):
    gen = generate(tmp_path / "raw", "plain", num_train=4, num_val=2, size=(32, 32), seed=3)
    out = tmp_path / "run"
    args = ["train", "Lite-HRNet-s-mod2", "--train-data-root", str(gen.root), "--epochs", "1", "--input-size",
            "32x32", "--batch-size", "4", "--num-workers", "0", "--early-stop-patience", "0"]  # fmt: skip
    assert main([*args, "--output", str(out), "--plateau-patience", "12"]) == 0
    config = json.loads((out / "model.json").read_text())["training_config"]
    assert (config["early_stop_patience"], config["plateau_patience"]) == (0, 12)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--output", str(tmp_path / "bad"), "--plateau-patience", "-1"])
    assert "argument --plateau-patience: -1: give 0 or more epochs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_plateau_patience_counts_epochs_after_warmup():
    """patience N: the (N + 1)-th epoch in a row without a better score cuts the rate."""
    s = WarmupPlateauLR(_optimizer(), 1.0, 0, 1.0, 0.1, 3, 1e-6)
    s.step_epoch(0.5)
    for _ in range(3):
        s.step_epoch(0.4)
    assert s.lr == pytest.approx(1.0)
    s.step_epoch(0.4)
    assert s.lr == pytest.approx(0.1)
