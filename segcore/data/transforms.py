"""Training augmentations and evaluation preprocessing (numpy + OpenCV, HWC uint8 RGB in).

The training augmentation, in order: a crop (by default OTX 2.x's random resized crop; the
reference recipe's random rescale with ratio 0.5-2.0 of the base scale + random crop with at most
75% of the crop from one class), horizontal flip, random rotation (image padded with 0, mask with
the ignore index; off by default), photometric distortion, and image mixing (the photometric step
runs twice and the two copies are blended through a mask made from smoothed noise; off by
default); then padding to the crop size and ImageNet normalisation. ``AugmentConfig`` holds the
probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

cv2.setNumThreads(1)  # data workers run in parallel processes; keep OpenCV single-threaded


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation. Defaults: OTX 2.6's (RandomResizedCrop, flip, photometric
    distortion with p 0.5; no rotation, no mixing), which learned more per epoch on CamVid than the
    reference's rescale + crop with rotation and mixing (``RECIPES["reference"]``, issue 20)."""

    crop_size: tuple[int, int] = (512, 512)  # (H, W), the network input size
    base_scale_factor: float = 544 / 512  # the rescale base is crop_size * this (OTX: 544 for 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_p: float = 0.5
    rotate_p: float = 0.0  # the reference: 0.5
    rotate_degrees: float = 30.0
    mix_p: float = 0.0  # the reference: 0.5
    photometric_p: float = 0.5  # the photometric step (each of its operations has p=0.5 inside); the reference: 1.0
    # "rescale_crop": mmseg's random rescale + crop above (the reference); "random_resized_crop":
    # OTX 2.x's RandomResizedCrop (a window of area scale x the image and aspect ratio, resized to crop_size).
    crop_mode: str = "random_resized_crop"
    rrc_scale: tuple[float, float] = (0.2, 1.0)
    rrc_ratio: tuple[float, float] = (0.5, 2.0)
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if self.crop_mode not in ("rescale_crop", "random_resized_crop"):
            raise ValueError(f"crop_mode must be rescale_crop or random_resized_crop, got {self.crop_mode!r}")


def rescale(image: np.ndarray, mask: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize keeping the aspect ratio so the image fits in ``scale`` (long, short) sides."""
    h, w = mask.shape
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(h, w), short_side / min(h, w))
    size = (max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return image, mask


def random_crop(
    image: np.ndarray,
    mask: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float,
    ignore_index: int,
    tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``size`` (H, W); retry up to ``tries`` times while one class fills > cat_max_ratio."""
    h, w = mask.shape
    ch, cw = min(size[0], h), min(size[1], w)

    def window():
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        return y, x

    y, x = window()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            crop = mask[y : y + ch, x : x + cw]
            counts = np.bincount(crop.ravel(), minlength=256)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = window()
    return image[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]


def random_resized_crop(
    image: np.ndarray,
    mask: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """A window of ``scale`` x the image area and aspect ratio (w/h) in ``ratio`` (log-uniform),
    resized to ``size`` (H, W); after ``tries`` misses, the largest centred window that fits."""
    h, w = mask.shape
    area = h * w
    for _ in range(tries):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = (w, int(round(w / aspect))) if w / h < aspect else (int(round(h * aspect)), h)
        cw, ch = min(cw, w), min(ch, h)
        y, x = (h - ch) // 2, (w - cw) // 2
    image, mask = image[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]
    out = (size[1], size[0])
    return (
        cv2.resize(image, out, interpolation=cv2.INTER_LINEAR),
        cv2.resize(mask, out, interpolation=cv2.INTER_NEAREST),
    )


def rotate(image: np.ndarray, mask: np.ndarray, degrees: float, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=ignore_index)
    return image, mask


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness (±32), contrast (0.5-1.5), saturation (0.5-1.5) and hue (±18) each with p=0.5;
    contrast before or after the colour changes at random (mmseg's PhotoMetricDistortion).

    Every step maps a uint8 value to a uint8 value (within a channel), so each is applied as a
    256-entry table computed with the float32 arithmetic of applying it pixel by pixel (the
    same numbers, several times faster than float32 images)."""
    values = np.arange(256, dtype=np.float32)
    table = values.copy()  # float32, before clipping: brightness and contrast compose unclipped
    if rng.random() < 0.5:
        table += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        table *= rng.uniform(0.5, 1.5)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    out = image
    if do_sat or do_hue:
        out = cv2.LUT(image, np.clip(table, 0, 255).astype(np.uint8))
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        channel_tables = [values, values, values]
        if do_sat:
            channel_tables[1] = np.clip(values * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:  # OpenCV's 8-bit hue runs 0..179
            channel_tables[0] = (values + rng.integers(-18, 19)) % 180
        hsv = cv2.LUT(hsv, np.stack(channel_tables, axis=1).astype(np.uint8)[:, None, :])
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        table = values.copy()
    if not contrast_first and rng.random() < 0.5:
        table *= rng.uniform(0.5, 1.5)
    return cv2.LUT(out, np.clip(table, 0, 255).astype(np.uint8))


def grayscale(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601 weights) in all three channels, uint8."""
    gray = (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).clip(0, 255)
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def mixing_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Binary mask from Gaussian noise smoothed with sigma = exp(log10(U(4, 16))), cut at its median."""
    noise = rng.standard_normal(shape).astype(np.float32)
    sigma = math.exp(math.log10(rng.uniform(4.0, 16.0)))
    smooth = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return smooth > np.median(smooth)


def pad_to(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], ignore_index: int):
    h, w = mask.shape
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore_index)
    return image, mask


def normalize(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 normalised with the ImageNet mean/std."""
    img = (image.astype(np.float32) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


class TrainTransform:
    def __init__(self, config: AugmentConfig):
        self.cfg = config

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        cfg = self.cfg
        image, mask = self.geometric(image, mask, rng)
        if rng.random() < cfg.mix_p:
            first, second = photometric(image, rng), photometric(image, rng)
            keep = mixing_mask(mask.shape, rng)
            # Only the photometric step differs between the copies, so the labels of both agree
            # and the mask needs no blending.
            image = np.where(keep[..., None], first, second)
        elif cfg.photometric_p >= 1.0 or rng.random() < cfg.photometric_p:  # p=1 draws nothing
            image = photometric(image, rng)
        image, mask = pad_to(np.ascontiguousarray(image), np.ascontiguousarray(mask), cfg.crop_size, cfg.ignore_index)
        return normalize(image), mask.astype(np.int64)

    def geometric(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """The crop (rescale + crop, or random resized crop), flip and rotation, unpadded."""
        cfg = self.cfg
        if cfg.crop_mode == "random_resized_crop":
            image, mask = random_resized_crop(image, mask, cfg.crop_size, rng, cfg.rrc_scale, cfg.rrc_ratio)
        else:
            base = (cfg.crop_size[0] * cfg.base_scale_factor, cfg.crop_size[1] * cfg.base_scale_factor)
            ratio = rng.uniform(*cfg.ratio_range)
            image, mask = rescale(image, mask, (int(base[0] * ratio), int(base[1] * ratio)))
            image, mask = random_crop(image, mask, cfg.crop_size, rng, cfg.cat_max_ratio, cfg.ignore_index)
        if rng.random() < cfg.flip_p:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < cfg.rotate_p:
            angle = rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)
            image, mask = rotate(np.ascontiguousarray(image), np.ascontiguousarray(mask), angle, cfg.ignore_index)
        return image, mask


def eval_preprocess(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (not keeping the ratio) to the network input size, then normalise."""
    return normalize(eval_resize(image, size))


def eval_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``eval_preprocess``'s resize alone: HWC uint8 at ``size`` (H, W), not keeping the ratio."""
    if image.shape[:2] != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return image
