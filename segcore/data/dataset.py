"""PyTorch datasets over a canonical dataset (see ``segcore.data.convert``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segcore.data.convert import load_manifest
from segcore.data.transforms import AugmentConfig, TrainTransform, eval_resize, normalize
from segcore.errors import DataError


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError("unreadable image", path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise DataError("unreadable index mask", path)
    return mask


class SegmentationDataset(Dataset):
    """Items of one split. With ``augment`` set, samples are augmented with a generator seeded
    by (seed, epoch, index), so a resumed run sees the same data as an uninterrupted one. The
    index may be an (epoch, index) pair: data-loading workers that live across epochs hold their
    own copy of the dataset, so the training's sampler sends the epoch along with each index."""

    def __init__(self, root: str | Path, split: str, augment: AugmentConfig | None = None, seed: int = 0):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.items = self.manifest["items"][split]
        self.split = split
        self.transform = TrainTransform(augment) if augment else None
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        item = self.items[index]
        return read_rgb(self.root / item["image"]), read_mask(self.root / item["mask"])

    def __getitem__(self, index: int | tuple[int, int]):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        rng = np.random.default_rng([self.seed, epoch, index])
        image, mask = self.transform(image, mask, rng)
        return torch.from_numpy(image), torch.from_numpy(mask)


class EvalDataset(Dataset):
    """Images resized to the network input; masks at their original size (scoring happens there).

    With ``cache_mb`` > 0 the items read are kept in memory (the resized uint8 image and the mask
    as stored), until they fill that many MiB: a training validates every epoch, and would read,
    decode and resize the split again each time on its own thread (9 ms a CamVid image)."""

    def __init__(self, root: str | Path, split: str, input_size: tuple[int, int], cache_mb: float = 0.0):
        self.base = SegmentationDataset(root, split)
        self.input_size = input_size
        self.cache_left = int(cache_mb * 2**20)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        item = self.cache.get(index)
        if item is None:
            image, mask = self.base.load(index)
            item = eval_resize(image, self.input_size), mask
            size = item[0].nbytes + mask.nbytes
            if size <= self.cache_left:
                self.cache[index], self.cache_left = item, self.cache_left - size
        image, mask = item
        return torch.from_numpy(normalize(image)), torch.from_numpy(mask.astype(np.int64))


def collate_eval(batch):
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]
