"""Semi-supervised training (Mean Teacher): what the training loop adds when unlabelled images are
given (``segcore train ... --unlabeled-data-root DIR``).

- The teacher is an exponential moving average of the student (``training.WeightAverage``,
  ``teacher = d * teacher + (1 - d) * student`` after every step, d = ``teacher_decay``).
- Each unlabelled image gives two pixel-aligned views of one random crop: a weak one (the crop,
  flip and rotation of the labelled data) for the teacher and a strong one (the same pixels, then
  photometric distortion, grayscale and cut-out) for the student.
- Pseudo-labels are the teacher's argmax on the weak view. In each image the share
  ``ignore_share(epoch)`` of pixels with the highest prediction entropy is left out (no fixed
  confidence threshold): it falls linearly from ``pseudo_ignore_start`` to 0 over
  ``pseudo_ignore_epochs`` epochs. Pixels outside the image (rotation, padding) are left out too.
- The unsupervised loss is the student's cross-entropy on the strong view against the
  pseudo-labels, summed over the used pixels and divided by all pixels of the unlabelled batch
  (so it scales with the share used), weighted by ``unlabeled_weight``. With ``unlabeled_loss``
  "ce_dice" it is the labelled loss (cross-entropy + soft Dice, which weights every class
  equally) over the used pixels, times the share used; with "ce_balanced" the cross-entropy is
  averaged within each pseudo-label class and then over the classes, times the share used (so the
  classes a confident teacher labels most, sky and road, do not make most of the loss). The first
  ``unlabeled_start_epoch - 1`` epochs use labelled data only.
- With ``unlabeled_mix`` "cutmix" (French et al., BMVC 2020: "Semi-supervised semantic
  segmentation needs strong, varied perturbations"), each strong view takes a rectangle of half its
  area from the next unlabelled image of the batch, and its pseudo-labels take the same rectangle
  from that image's pseudo-labels: the teacher labels unmixed views, the student learns on mixed ones.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from segcore import parallel
from segcore.data.transforms import MEAN, AugmentConfig, TrainTransform, grayscale, normalize, pad_to, photometric
from segcore.devices import at_least_fp32
from segcore.errors import DataError

log = logging.getLogger(__name__)

IGNORE = 255


@dataclass(frozen=True)
class SemiConfig:
    """The semi-supervised settings (saved in the bundle's training_config as ``semi``)."""

    unlabeled_weight: float = 0.1
    # > 0: the weight rises as Mean Teacher's sigmoid ramp-up, exp(-5 (1 - t)^2), t = (epoch - start) /
    # rampup_epochs, from the unlabelled start epoch until full weight; 0: full weight at once (OTX)
    unlabeled_rampup_epochs: int = 0
    unlabeled_batch_size: int = 5  # per process, beside the labelled batch
    teacher_decay: float = 0.99
    # "ce" (OTX's), "ce_dice" (cross-entropy + soft Dice on the pseudo-labels) or "ce_balanced" (cross-entropy
    # averaged per pseudo-label class, then over the classes)
    unlabeled_loss: str = "ce"
    pseudo_ignore_start: float = 0.2
    pseudo_ignore_epochs: int = 100
    # > 0: keep only pixels whose teacher confidence (largest softmax probability) reaches it, and
    # drop no entropy share (pseudo_ignore_start is then not used)
    pseudo_threshold: float = 0.0
    unlabeled_start_epoch: int = 2
    strong_photometric_p: float = 0.7
    strong_grayscale_p: float = 0.3
    cutout_p: float = 0.35
    cutout_holes: tuple[int, int] = (1, 8)
    cutout_size: tuple[float, float] = (0.2, 0.4)  # of the crop's height and width
    unlabeled_mix: str = "none"  # "none" or "cutmix" (between the strong views of a batch)

    def __post_init__(self):
        for name, value, allowed in (("unlabeled_loss", self.unlabeled_loss, LOSSES),
                                     ("unlabeled_mix", self.unlabeled_mix, MIXES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"semi-supervised {name} {value!r}: choose one of {', '.join(allowed)}")


LOSSES = ("ce", "ce_dice", "ce_balanced")
MIXES = ("none", "cutmix")


def unlabeled_weight(config: SemiConfig, epoch: int) -> float:
    """The unsupervised loss's weight in ``epoch`` (after the ramp-up: ``unlabeled_weight``)."""
    if config.unlabeled_rampup_epochs <= 0:
        return config.unlabeled_weight
    t = min(1.0, max(0.0, (epoch - config.unlabeled_start_epoch + 1) / config.unlabeled_rampup_epochs))
    return config.unlabeled_weight * math.exp(-5.0 * (1.0 - t) ** 2)


def ignore_share(config: SemiConfig, epoch: int) -> float:
    """The share of each image's pixels (highest entropy first) left out of the pseudo-labels."""
    if config.pseudo_ignore_epochs <= 0 or config.pseudo_threshold > 0:
        return 0.0
    progress = min(1.0, (epoch - 1) / config.pseudo_ignore_epochs)
    return config.pseudo_ignore_start * (1.0 - progress)


@torch.no_grad()
def pseudo_labels(
    logits: torch.Tensor, valid: torch.Tensor, share: float, ignore_index: int = IGNORE, threshold: float = 0.0
) -> torch.Tensor:
    """The argmax of ``logits`` (N, C, H, W) with, per image, the ``share`` of its valid pixels
    with the highest softmax entropy (floored to whole pixels), every pixel whose largest
    probability is below ``threshold``, and every pixel where ``valid`` is False, set to
    ``ignore_index``."""
    probs = torch.softmax(at_least_fp32(logits), dim=1)
    confidence, labels = probs.max(1)
    labels[~valid] = ignore_index
    if threshold > 0.0:
        labels[confidence < threshold] = ignore_index
    if share <= 0.0:
        return labels
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
    for i in range(len(labels)):
        where = valid[i].reshape(-1).nonzero().squeeze(1)  # flat positions of the valid pixels
        drop = int(math.floor(share * where.numel()))
        if drop <= 0:
            continue
        highest = torch.topk(entropy[i].reshape(-1)[where], drop).indices
        labels[i].view(-1)[where[highest]] = ignore_index
    return labels


def unsupervised_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Cross-entropy over the pseudo-labelled pixels divided by all pixels of the (global) batch."""
    pixel = torch.nn.functional.cross_entropy(at_least_fp32(logits), labels, ignore_index=ignore_index, reduction="sum")
    total = torch.tensor(float(labels.numel()), device=logits.device)
    return parallel.sum_across(pixel) / parallel.sum_across(total).clamp(min=1)


def unsupervised_ce_dice(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Cross-entropy + soft Dice (``losses.DiceCrossEntropy``) over the pseudo-labelled pixels,
    times their share of all pixels of the (global) batch; 0 with a gradient when none is used."""
    from segcore.losses import DiceCrossEntropy

    used = parallel.all_reduce_sum_((labels != ignore_index).sum().double())
    total = parallel.all_reduce_sum_(torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device))
    return DiceCrossEntropy(ignore_index)(logits, labels) * float(used / total.clamp(min=1))


def unsupervised_balanced_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Cross-entropy averaged over the pixels of each pseudo-label class, then over the classes
    present in the (global) batch, times the share of its pixels used; 0 with a gradient when none is
    used. Every class the teacher labels weighs the same, however many pixels it has."""
    logits = at_least_fp32(logits)
    classes = logits.shape[1]
    pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    used = labels != ignore_index
    bins = torch.where(used, labels, classes).reshape(-1)  # unused pixels go to an extra bin
    sums = torch.zeros(classes + 1, dtype=pixel.dtype, device=pixel.device).index_add(0, bins, pixel.reshape(-1))
    counts = torch.bincount(bins, minlength=classes + 1).to(torch.float64)
    total = torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)
    sums, counts, total = (
        parallel.sum_across(sums[:classes]),
        parallel.all_reduce_sum_(counts[:classes]),
        parallel.all_reduce_sum_(total),
    )
    present = counts > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    per_class = sums[present] / counts[present].to(sums.dtype)
    return per_class.mean() * float(counts.sum() / total.clamp(min=1))


def strong_view(image: np.ndarray, config: SemiConfig, rng: np.random.Generator) -> np.ndarray:
    """Photometric distortion (p ``strong_photometric_p``), grayscale (p ``strong_grayscale_p``),
    then cut-out (p ``cutout_p``): 1-8 rectangles of 0.2-0.4 of the height and width, filled with
    the mean colour (0 after normalisation). Geometry is untouched: the view stays pixel-aligned."""
    out = image
    if rng.random() < config.strong_photometric_p:
        out = photometric(out, rng)
    if rng.random() < config.strong_grayscale_p:
        out = grayscale(out)
    if rng.random() < config.cutout_p:
        out = out.copy()
        h, w = out.shape[:2]
        for _ in range(int(rng.integers(config.cutout_holes[0], config.cutout_holes[1] + 1))):
            ch = max(1, int(h * rng.uniform(*config.cutout_size)))
            cw = max(1, int(w * rng.uniform(*config.cutout_size)))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            out[y : y + ch, x : x + cw] = np.array(MEAN, np.float32).round().astype(np.uint8)
    return out


def cutmix_boxes(count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One rectangle per image (``count`` x H x W booleans): half the area (rounded to whole
    pixels), an aspect ratio drawn log-uniformly from 1/2 to 2, at a uniform random position."""
    boxes = np.zeros((count, height, width), bool)
    for i in range(count):
        ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # box height / box width
        box_h = min(height, max(1, round(math.sqrt(0.5 * height * width * ratio))))
        box_w = min(width, max(1, round(0.5 * height * width / box_h)))
        y, x = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        boxes[i, y : y + box_h, x : x + box_w] = True
    return boxes


def cutmix(images: torch.Tensor, labels: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inside image i's box, its pixels (N, C, H, W) and labels (N, H, W) are those of image
    (i + 1) mod N; elsewhere they are its own."""
    box = torch.from_numpy(boxes).to(images.device)
    mixed = torch.where(box[:, None], images.roll(-1, 0), images)
    if not images.is_contiguous():  # channels-last batches stay channels-last
        mixed = mixed.contiguous(memory_format=torch.channels_last)
    return mixed, torch.where(box, labels.roll(-1, 0), labels)


def image_digest(image: np.ndarray) -> str:
    """Identity of an image's pixels (the same picture stored in another format matches)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def list_unlabeled(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (any nesting; hidden files and archive leftovers skipped)."""
    from segcore.data.sources import IMAGE_EXTENSIONS, _is_junk

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("no such folder of unlabelled images", folder)
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _is_junk(p, folder)
    ]
    if not files:
        raise DataError("holds no images (.jpg, .png, ...)", folder)
    return files


class UnlabeledDataset(Dataset):
    """Unlabelled images -> (weak view, strong view, valid pixels), seeded by (seed, epoch, index)
    like the labelled data. Images whose pixels equal a labelled training image's are skipped."""

    def __init__(
        self,
        files: list[Path],
        augment: AugmentConfig,
        config: SemiConfig,
        seed: int,
        exclude_digests: set[str] = frozenset(),
    ):
        from segcore.data.dataset import read_rgb

        self.config = config
        self.seed = seed
        # The geometric part of the labelled recipe; colour changes belong to the strong view only.
        self.augment = replace(augment, photometric_p=0.0, mix_p=0.0, cat_max_ratio=1.0)
        self.transform = TrainTransform(self.augment)
        self.files: list[Path] = []
        skipped = []
        for path in files:
            if exclude_digests and image_digest(read_rgb(path)) in exclude_digests:
                skipped.append(path)
            else:
                self.files.append(path)
        if skipped:
            log.warning(
                "skipped %d unlabelled images that are also labelled training images (e.g. %s)",
                len(skipped), skipped[0],
            )  # fmt: skip
        if not self.files:
            raise DataError("every unlabelled image is also a labelled training image", files[0].parent)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        from segcore.data.dataset import read_rgb

        epoch, index = item
        image = read_rgb(self.files[index])
        rng = np.random.default_rng([self.seed, epoch, index, 1])  # 1: not the labelled items' streams
        marker = np.zeros(image.shape[:2], np.uint8)
        crop, marker = self.transform.geometric(image, marker, rng)
        size, ignore = self.augment.crop_size, self.augment.ignore_index
        strong = strong_view(np.ascontiguousarray(crop), self.config, rng)
        crop, marker = pad_to(np.ascontiguousarray(crop), np.ascontiguousarray(marker), size, ignore)
        strong, _ = pad_to(strong, np.zeros(strong.shape[:2], np.uint8), size, ignore)
        return (
            torch.from_numpy(normalize(crop)),
            torch.from_numpy(normalize(strong)),
            torch.from_numpy(marker != ignore),
        )


class UnlabeledBatches(torch.utils.data.Sampler):
    """The unlabelled batches that accompany the labelled steps of an epoch: a stream that runs
    through seeded permutations of the unlabelled set (pass p is shuffled by (seed, p)) and carries
    on across epochs, so every image is used equally often; position depends only on (epoch,
    step), so a resumed run sees the same batches. Rank r takes part r of each global batch."""

    def __init__(self, length: int, batch_size: int, steps_per_epoch: int, seed: int, world: parallel.World):
        self.length, self.batch_size, self.steps, self.seed, self.world = (
            length, batch_size, steps_per_epoch, seed, world,
        )  # fmt: skip
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def _order(self, p: int) -> np.ndarray:
        return np.random.default_rng([self.seed, p, 2]).permutation(self.length)

    def __iter__(self):
        size, rank = self.world.size, self.world.rank
        global_batch = self.batch_size * size
        orders: dict[int, np.ndarray] = {}
        for step in range(self.steps):
            start = ((self.epoch - 1) * self.steps + step) * global_batch + rank * self.batch_size
            batch = []
            for position in range(start, start + self.batch_size):
                p, i = divmod(position, self.length)
                if p not in orders:
                    orders[p] = self._order(p)
                batch.append((self.epoch, int(orders[p][i])))
            yield batch
