"""Self-supervised pretraining of a template's backbone on unlabelled images (``segcore pretrain``).

The method is DetCon-B (Hénaff et al., ICCV 2021), the one OTX 1.x shipped for segmentation: two
augmented views of each image; per image, unsupervised segments (``segcore.data.segments``) give
object-like masks that are followed into both views; the backbone's features are averaged inside
each of 16 sampled masks, projected (MLP) and, on the online side, passed through a predictor MLP;
a target network (an exponential moving average of the online one, not trained) projects the other
view. The loss is contrastive per mask (temperature 0.1): a mask's prediction must pick the same
mask in the other view among every mask of the batch. The online backbone is what is kept.

Output folder (``--output``)::

    backbone.pt     the backbone's weights ({"state_dict": {"backbone.<name>": tensor}}), what
                    ``segcore train --load-weights`` takes (the folder itself is accepted too)
    last.pt         full state after the last finished epoch (online + target networks,
                    optimizer, step): ``--resume`` continues exactly
    metrics.jsonl   one JSON object per finished epoch (loss, match accuracy, lr, img/s)
    pretrain.json   settings and results; written last, so a folder that has it is complete
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segcore import __version__, devices
from segcore.data.transforms import grayscale, normalize, photometric, random_resized_crop
from segcore.errors import SegcoreError
from segcore.training import _save_atomic, _write_json_atomic

__all__ = ["BACKBONE", "PRETRAIN_META", "DetCon", "PretrainConfig", "detcon_loss", "pool_masks", "pretrain"]

log = logging.getLogger(__name__)

BACKBONE = "backbone.pt"
PRETRAIN_META = "pretrain.json"
LAST = "last.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining (saved in ``pretrain.json`` as ``config``)."""

    template: str = ""
    epochs: int = 10
    batch_size: int = 16
    input_size: tuple[int, int] = (224, 224)  # each view (OTX: 224 x 224)
    lr: float = 1e-3
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0
    target_momentum: float = 0.99  # target = m * target + (1 - m) * online, after every step
    temperature: float = 0.1
    masks_per_image: int = 16
    projector_hidden: int = 512
    projector_dim: int = 128
    segment_scale: float = 100.0  # Felzenszwalb's scale at 240 px on the longest side
    crop_scale: tuple[float, float] = (0.2, 1.0)  # of the image area, per view
    seed: int = 42
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.masks_per_image < 1:
            raise SegcoreError("pretraining needs epochs >= 1, batch size >= 2 and masks per image >= 1")
        if not 0.0 <= self.target_momentum < 1.0:
            raise SegcoreError(f"the target momentum must lie in [0, 1), not {self.target_momentum}")


# ---------------------------------------------------------------------------------------------
# Data: two views per image, each with the image's segment ids cropped the same way


def _segments_of(path: Path, scale: float) -> np.ndarray:
    from segcore.data.dataset import read_rgb
    from segcore.data.segments import image_segments

    return image_segments(read_rgb(path), scale=scale)


class _SegmentJobs(Dataset):
    def __init__(self, files: list[Path], scale: float):
        self.files, self.scale = files, scale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        return _segments_of(self.files[index], self.scale)


def compute_segments(files: list[Path], scale: float, workers: int, progress: bool = False) -> list[np.ndarray]:
    """The segments of every image (in ``workers`` processes), computed once per pretraining."""
    from tqdm import tqdm

    loader = DataLoader(_SegmentJobs(files, scale), batch_size=None, num_workers=workers)
    segments = tqdm(loader, total=len(files), desc="segments", unit="img", disable=not progress)
    return [np.asarray(s, dtype=np.uint16) for s in segments]  # the loader hands back tensors


def _view(image: np.ndarray, segments: np.ndarray, config: PretrainConfig, rng, blur_p: float, solarize_p: float):
    """One view (BYOL's augmentations): random resized crop + flip of image and segment ids
    together, then colour distortion (p 0.8), grayscale (p 0.2), Gaussian blur, solarisation."""
    crop, ids = random_resized_crop(image, segments, config.input_size, rng, config.crop_scale, (3 / 4, 4 / 3))
    if rng.random() < 0.5:
        crop, ids = crop[:, ::-1], ids[:, ::-1]
    crop = np.ascontiguousarray(crop)
    if rng.random() < 0.8:
        crop = photometric(crop, rng)
    if rng.random() < 0.2:
        crop = grayscale(crop)
    if rng.random() < blur_p:
        sigma = rng.uniform(0.1, 2.0)
        crop = cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, sigmaY=sigma)
    if rng.random() < solarize_p:
        crop = np.where(crop < 128, crop, 255 - crop).astype(np.uint8)
    return normalize(crop), np.ascontiguousarray(ids).astype(np.int64)


class PretrainViews(Dataset):
    """Item (epoch, index) -> (view 1, view 2, segment ids of each, the sampled segment ids); the
    randomness depends only on (seed, epoch, index), so a resumed run sees the same data."""

    def __init__(self, files: list[Path], segments: list[np.ndarray], config: PretrainConfig):
        self.files, self.segments, self.config = files, segments, config

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        from segcore.data.dataset import read_rgb

        epoch, index = item
        rng = np.random.default_rng([self.config.seed, epoch, index, 3])
        image = read_rgb(self.files[index])
        h, w = image.shape[:2]
        segments = cv2.resize(self.segments[index], (w, h), interpolation=cv2.INTER_NEAREST)
        one, ids_one = _view(image, segments, self.config, rng, blur_p=1.0, solarize_p=0.0)
        two, ids_two = _view(image, segments, self.config, rng, blur_p=0.1, solarize_p=0.2)
        common = np.intersect1d(np.unique(ids_one), np.unique(ids_two))
        pool = common if len(common) else np.unique(ids_one)  # no overlap: no positive pair (masked out)
        k = self.config.masks_per_image
        picked = rng.choice(pool, size=k, replace=len(pool) < k)
        return (
            torch.from_numpy(one),
            torch.from_numpy(two),
            torch.from_numpy(ids_one),
            torch.from_numpy(ids_two),
            (torch.from_numpy(picked.astype(np.int64))),
        )


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, index): a permutation seeded by (seed, epoch), the incomplete batch dropped."""

    def __init__(self, length: int, batch_size: int, seed: int):
        self.length, self.batch_size, self.seed, self.epoch = length, batch_size, seed, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.batch_size

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch, 4]).permutation(self.length)
        for b in range(len(self)):
            yield [(self.epoch, int(i)) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


# ---------------------------------------------------------------------------------------------
# The networks and the loss


class DenseFeatures(nn.Module):
    """A Lite-HRNet backbone's outputs resized to the highest resolution and concatenated."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        size = features[0].shape[-2:]
        rest = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]]
        return torch.cat([features[0], *rest], dim=1)


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs)
    )


class DetCon(nn.Module):
    """Online network (backbone features, projector, predictor) and its target copy (backbone
    features and projector, updated only as a moving average of the online ones)."""

    def __init__(self, backbone: nn.Module, hidden: int, dim: int, channels: int):
        super().__init__()
        self.online = DenseFeatures(backbone)
        self.projector = _mlp(channels, hidden, dim)
        self.predictor = _mlp(dim, hidden, dim)
        self.target = copy.deepcopy(self.online)
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        pairs = [(self.target, self.online), (self.target_projector, self.projector)]
        for target, online in pairs:
            for t, o in zip(target.state_dict().values(), online.state_dict().values(), strict=True):
                if t.dtype.is_floating_point:
                    t.lerp_(o, 1.0 - momentum)
                else:
                    t.copy_(o)


def pool_masks(features: torch.Tensor, ids: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature (N, K, C) inside each picked segment, and whether the segment is in the view
    (N, K). ``features`` (N, C, h, w); ``ids`` (N, H, W) segment ids at the input resolution;
    ``picked`` (N, K) segment ids. Masks are area-downsampled to the feature resolution."""
    masks = (ids[:, None] == picked[:, :, None, None]).float()
    masks = F.adaptive_avg_pool2d(masks, features.shape[-2:])
    area = masks.sum((2, 3))
    pooled = torch.einsum("nkhw,nchw->nkc", masks, devices.at_least_fp32(features))
    return pooled / area.clamp_min(1e-6)[..., None], area > 0


def detcon_loss(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, picked: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive loss of (M, D) predictions against (M, D) targets of the other view, M = N x K:
    row i's positive is target i; the negatives are every other valid target except copies of the
    same segment (a segment sampled twice). ``valid`` (M,): the segment is in both views; ``picked``
    (N, K) the segment ids. Returns (mean loss over valid rows, share of rows whose best match is
    their positive)."""
    n, k = picked.shape
    q = F.normalize(prediction.float(), dim=1)
    t = F.normalize(target.float(), dim=1)
    logits = q @ t.T / temperature
    image = torch.arange(n, device=picked.device).repeat_interleave(k)
    flat = picked.reshape(-1)
    duplicate = (image[:, None] == image[None, :]) & (flat[:, None] == flat[None, :])
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate | ~valid[None, :], float("-inf"))
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == 0:
        return prediction.sum() * 0.0, torch.zeros(())
    loss = F.cross_entropy(logits[rows], rows)
    accuracy = (logits[rows].argmax(1) == rows).float().mean()
    return loss, accuracy


def feature_channels(backbone: nn.Module, size: tuple[int, int]) -> int:
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        channels = DenseFeatures(backbone)(torch.zeros(1, 3, *size)).shape[1]
        backbone.train(was)
    return int(channels)


# ---------------------------------------------------------------------------------------------
# The loop


def _lr_at(config: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _step(model: DetCon, batch, config: PretrainConfig, device, precision) -> tuple[torch.Tensor, torch.Tensor]:
    one, two, ids_one, ids_two, picked = (t.to(device, non_blocking=True) for t in batch)
    n, k = picked.shape
    views, ids = torch.cat([one, two]), torch.cat([ids_one, ids_two])
    both = torch.cat([picked, picked])
    with devices.autocast(device, precision):
        features = model.online(views)
    pooled, present = pool_masks(features, ids, both)
    prediction = model.predictor(model.projector(pooled.reshape(2 * n * k, -1)))
    with torch.no_grad():
        with devices.autocast(device, precision):
            target_features = model.target(views)
        target = model.target_projector(pool_masks(target_features, ids, both)[0].reshape(2 * n * k, -1))
    valid = (present[:n] & present[n:]).reshape(-1)
    half = n * k
    loss_a, acc_a = detcon_loss(prediction[:half], target[half:], valid, picked, config.temperature)
    loss_b, acc_b = detcon_loss(prediction[half:], target[:half], valid, picked, config.temperature)
    return (loss_a + loss_b) / 2, (acc_a + acc_b) / 2


def _refuse_existing(output: Path, resume: bool) -> None:
    if (output / PRETRAIN_META).exists() and not resume:
        raise SegcoreError("holds a finished pretraining; choose a new --output", output)
    if (output / LAST).exists() and not resume:
        raise SegcoreError(
            "holds an unfinished pretraining; pass --resume to continue it or choose a new --output", output
        )


def pretrain(
    config: PretrainConfig,
    files: list[Path],
    output: str | Path,
    *,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Pretrain ``config.template``'s backbone on the images ``files``; return the metadata
    written to ``output/pretrain.json``. A finished folder with ``resume`` is returned as it is."""
    from segcore.models import get_template
    from segcore.training import seed_everything

    output = Path(output)
    if resume and (output / PRETRAIN_META).exists():
        return json.loads((output / PRETRAIN_META).read_text())
    _refuse_existing(output, resume)
    template = get_template(config.template)
    if len(files) < config.batch_size:
        raise SegcoreError(f"{len(files)} images are fewer than one batch of {config.batch_size}")
    output.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    device = devices.resolve_device(config.device)
    precision = devices.resolve_precision(config.precision, device)
    model, optimizer, start, step, records = _setup(config, template, output, resume, device)
    log.info(
        "pretraining %s (DetCon) on %s in %s: %d images, views %dx%d, batch %d, %d epochs",
        template.name, device, precision, len(files), *config.input_size, config.batch_size, config.epochs,
    )  # fmt: skip
    t0 = time.perf_counter()
    segments = compute_segments(files, config.segment_scale, config.num_workers, progress)
    log.info("segments of %d images in %.0f s", len(files), time.perf_counter() - t0)
    data = PretrainViews(files, segments, config)
    sampler = EpochBatches(len(data), config.batch_size, config.seed)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda")
    for epoch in range(start, config.epochs + 1):
        sampler.set_epoch(epoch)
        record, step = _epoch(model, optimizer, loader, config, epoch, step, (device, precision), progress)
        records.append(record)
        _save_atomic(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
             "config": _jsonable(config), "records": [json.dumps(r) for r in records]},
            output / LAST,
        )  # fmt: skip
        _write_lines(records, output / METRICS)  # after last.pt: a resumed run rewrites it from there
        log.info(
            "pretrain epoch %d/%d: loss %.4f, match accuracy %.3f, %.1f img/s",
            epoch, config.epochs, record["loss"], record["match_accuracy"], record["img_per_s"],
        )  # fmt: skip
        if on_epoch:
            on_epoch(record)
    return _finish(config, template, model, output, len(files), device, precision, records)


def _setup(config: PretrainConfig, template, output: Path, resume: bool, device):
    """The networks and the optimizer, fresh or from ``output/last.pt``: (model, optimizer, first
    epoch, optimizer steps so far, the finished epochs' records)."""
    from segcore.models import create_model, init_weights

    backbone = init_weights(create_model(template, 2), "otx").backbone
    channels = feature_channels(backbone, config.input_size)
    model = DetCon(backbone, config.projector_hidden, config.projector_dim, channels).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    if not (resume and (output / LAST).exists()):
        return model, optimizer, 1, 0, []
    saved = torch.load(output / LAST, map_location="cpu", weights_only=True)
    if _settings(saved["config"]) != _settings(_jsonable(config)):
        raise SegcoreError("was started with other settings; resume it with the same ones", output / LAST)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    log.info("resuming the pretraining after epoch %d", saved["epoch"])
    return model, optimizer, saved["epoch"] + 1, saved["step"], [json.loads(r) for r in saved["records"]]


def _epoch(model: DetCon, optimizer, loader, config: PretrainConfig, epoch: int, step: int, where, progress: bool):
    """One pass over the images: (the epoch's record, optimizer steps so far)."""
    from tqdm import tqdm

    device, precision = where
    model.train()
    began, losses, accuracies, lr = time.perf_counter(), [], [], config.lr
    for batch in tqdm(loader, desc=f"pretrain {epoch}/{config.epochs}", disable=not progress, leave=False):
        lr = _lr_at(config, step, len(loader))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, accuracy = _step(model, batch, config, device, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(config.target_momentum)
        step += 1
        losses.append(float(loss.detach()))
        accuracies.append(float(accuracy))
    seconds = time.perf_counter() - began
    record = {
        "epoch": epoch,
        "loss": float(np.mean(losses)),
        "match_accuracy": float(np.mean(accuracies)),
        "lr": lr,
        "img_per_s": len(loader) * config.batch_size / seconds,
        "epoch_seconds": seconds,
    }
    return record, step


def _write_lines(records: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def _settings(config: dict) -> dict:
    """What must not change on resume (worker count, device and precision may)."""
    return {k: v for k, v in config.items() if k not in ("num_workers", "device", "precision")}


def _jsonable(config: PretrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _finish(config, template, model: DetCon, output: Path, images: int, device, precision, records) -> dict:
    state = {f"backbone.{k}": v.detach().cpu() for k, v in model.online.backbone.state_dict().items()}
    _save_atomic({"state_dict": state, "template": template.id, "method": "detcon"}, output / BACKBONE)
    meta = {
        "template": template.id,
        "template_name": template.name,
        "method": "detcon",
        "weights": BACKBONE,
        "images": images,
        "epochs_run": len(records),
        "final_loss": records[-1]["loss"],
        "final_match_accuracy": records[-1]["match_accuracy"],
        "pretrain_seconds": sum(r["epoch_seconds"] for r in records),
        "device": str(device),
        "precision": precision,
        "config": _jsonable(config),
        "segcore_version": __version__,
    }
    _write_json_atomic(meta, output / PRETRAIN_META)
    return meta
