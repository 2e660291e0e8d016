"""The training loop: Adam, gradient clipping, linear warm-up then plateau on validation Dice,
early stopping, per-epoch checkpoints that a killed run resumes from, and the model bundle.

Output folder (``--output``)::

    last.pt         full training state after the last finished epoch (resume point)
    best.pt         weights of the best epoch (validation mean Dice)
    metrics.jsonl   one JSON object per finished epoch
    model.json      bundle metadata; written last, so its presence means training finished
    dataset/        the canonical dataset, when training started from raw data
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from segcore import __version__, devices, parallel
from segcore.bundle import BUNDLE_META
from segcore.data.convert import load_manifest
from segcore.data.dataset import EvalDataset, SegmentationDataset, collate_eval
from segcore.data.transforms import MEAN, STD, AugmentConfig
from segcore.errors import SegcoreError
from segcore.losses import CrossEntropy, DiceCrossEntropy, MaxPoolingCrossEntropy
from segcore.models import create_model, get_template, init_weights
from segcore.models.templates import RECIPES, Recipe
from segcore.semi import SemiConfig

log = logging.getLogger(__name__)


BEST = "best.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """One training: the template's recipe (``segcore.models.Recipe``, possibly overridden) plus
    the run's own settings. Saved in the bundle (``training_config``) under these names."""

    template: str = ""
    recipe: str = "default"  # the named recipe (segcore.models.templates.RECIPES) the overrides start from
    num_workers: int = 2
    time_budget_min: float | None = None  # stop before an epoch that would overrun this
    augment: dict = field(default_factory=dict)  # AugmentConfig overrides
    device: str = "auto"  # auto|cpu|cuda|cuda:N (segcore.devices)
    precision: str = "auto"  # auto|fp32|bf16|fp16: autocast of the forward pass (segcore.devices)
    memory_format: str = "auto"  # auto|channels_last|contiguous: order of weights and activations (segcore.devices)
    # Diagnostics: more weight averages (their decays) scored after every epoch beside the model the
    # training validates; their Dice goes to metrics.jsonl (``val_mdice_ema``), nothing else.
    probe_ema_decays: tuple[float, ...] = ()
    semi: dict = field(default_factory=dict)  # SemiConfig overrides; used when unlabelled images are given

    @classmethod
    def from_template(cls, template: str, recipe: str | None = None, **overrides) -> TrainConfig:
        """The template's recipe, changed by the named ``recipe`` (``RECIPES``; None: "default")
        and then by ``overrides`` (None values keep the recipe's; ``augment`` adds to the recipe's)."""
        recipe = recipe or "default"
        if recipe not in RECIPES:
            raise SegcoreError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        changes, augment = RECIPES[recipe]
        t = get_template(template)
        values = {**asdict(t.training), **changes, "template": t.id, "recipe": recipe}
        values.update({k: v for k, v in overrides.items() if v is not None and k != "augment"})
        values["augment"] = {**augment, **(overrides.get("augment") or {})}
        values["input_size"] = tuple(values["input_size"])
        return cls(**values)

    @classmethod
    def from_bundle(cls, meta: dict) -> TrainConfig:
        """The config a bundle was trained with (``model.json``). Bundles from before named recipes
        hold no ``recipe``: they were trained with the reference recipe, which their empty
        ``augment`` and any setting they lack meant then."""
        values = {**meta["training_config"], "input_size": tuple(meta["input_size"])}
        if "recipe" not in values:
            changes, augment = RECIPES["reference"]
            values = {**changes, **values, "recipe": "reference"}
            values["augment"] = {**augment, **values.get("augment", {})}
        return cls(**values)


class WarmupPlateauLR:
    """Linear warm-up per iteration from ``start_factor`` x LR, then ReduceLROnPlateau (mode max)
    on the validation score per epoch; no reductions while warming up."""

    def __init__(self, optimizer, base_lr, warmup_iters, start_factor, factor, patience, min_lr, threshold=1e-4):
        self.optimizer = optimizer
        self.base_lr, self.warmup_iters, self.start_factor = base_lr, warmup_iters, start_factor
        self.factor, self.patience, self.min_lr, self.threshold = factor, patience, min_lr, threshold
        self.iteration = 0
        self.lr = base_lr * (start_factor if warmup_iters > 0 else 1.0)
        self.best = -math.inf
        self.bad_epochs = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    @property
    def warming_up(self) -> bool:
        return self.iteration < self.warmup_iters

    def step_iteration(self) -> None:
        """Call after each optimizer step."""
        self.iteration += 1
        if self.iteration <= self.warmup_iters:
            progress = self.iteration / self.warmup_iters
            self.lr = self.base_lr * (self.start_factor + (1 - self.start_factor) * progress)
            self._apply()

    def step_epoch(self, score: float) -> None:
        """Call after each validation with the mean Dice."""
        if score > self.best + self.threshold:
            self.best, self.bad_epochs = score, 0
            return
        if self.warming_up:
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.lr = max(self.lr * self.factor, self.min_lr)
            self.bad_epochs = 0
            self._apply()

    def state_dict(self) -> dict:
        keys = ("iteration", "lr", "best", "bad_epochs")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics, updated after
    every optimizer step: ``avg = d * avg + (1 - d) * model`` with ``d = min(decay, (1 + n) / (10 + n))``
    after n updates, so the early weights do not linger in it. (Mean Teacher's own ramp, n / (n + 1),
    is a uniform average of every step since the random start until it reaches the decay: on a
    CamVid training of 6 steps per epoch its teacher still predicted one class at epoch 16.) The
    average is a separate copy of the network, used for validation and shipped in the bundle."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise SegcoreError(f"an EMA decay must lie in (0, 1), not {decay}")
        import copy

        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        for avg, now in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(now.detach(), 1.0 - d)
            else:
                avg.copy_(now)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class EarlyStopping:
    """Stop when the score has not improved for ``patience`` epochs, counted from ``start_epoch``
    (``patience`` 0: never)."""

    def __init__(self, start_epoch: int, patience: int):
        self.start_epoch, self.patience = start_epoch, patience
        self.best = -math.inf
        self.best_epoch = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record ``score`` for ``epoch`` (1-based); True when training should stop."""
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            return False
        if epoch < self.start_epoch or self.patience <= 0:  # patience 0: never stop early
            return False
        return epoch - max(self.best_epoch, self.start_epoch - 1) >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def make_criterion(config: TrainConfig, ignore_index: int) -> torch.nn.Module:
    if config.loss == "max_pooling":
        return MaxPoolingCrossEntropy(ignore_index, config.max_pooling_ratio, config.max_pooling_p)
    if config.loss == "cross_entropy":
        return CrossEntropy(ignore_index)
    if config.loss == "ce_dice":
        return DiceCrossEntropy(ignore_index, config.dice_weight)
    raise SegcoreError(f"unknown loss {config.loss!r}; choose max_pooling, cross_entropy or ce_dice")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def evaluate(predict: Callable[..., torch.Tensor], dataset: EvalDataset, *args, **kwargs) -> dict:
    """The scores of one predictor: ``evaluate_all`` with one entry (same further arguments)."""
    return evaluate_all({"": predict}, dataset, *args, **kwargs)[""]


@torch.no_grad()
def evaluate_all(
    predicts: dict[str, Callable[..., torch.Tensor]],
    dataset: EvalDataset,
    num_classes: int,
    ignore_index: int,
    labels: list[str] | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """Dice/IoU over all pixels of a split for each predictor (name: predict), on one pass over the
    data: each batch is read once and given to every one. ``predict(images, size=...)`` resizes the
    logits to each mask's own size (once, from the head's resolution, as ``segcore eval`` and the IR
    do); the logits stay on their device and only the class maps (``metrics.class_map``, taken
    there) come to the CPU.

    In data-parallel training each rank scores every N-th batch (the same batches one process
    would form) and the confusion matrices are summed: the Dice is exactly one process's."""
    from tqdm import tqdm

    from segcore.metrics import class_map
    from segcore.scoring import Tally

    w = parallel.world()
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    mine = batches[w.rank :: w.size]
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=num_workers, collate_fn=collate_eval)
    tallies = {name: Tally(labels, ignore_index, num_classes) for name in predicts}
    for images, masks in tqdm(loader, desc="eval", disable=not progress, leave=False):
        same_size = len({tuple(mask.shape) for mask in masks}) == 1
        for name, predict in predicts.items():
            if same_size:
                maps = class_map(predict(images, size=tuple(masks[0].shape))).cpu()
            else:
                maps = [
                    class_map(predict(image[None], size=tuple(mask.shape)))[0].cpu()
                    for image, mask in zip(images, masks, strict=True)
                ]
            for prediction, mask in zip(maps, masks, strict=True):
                tallies[name].add(prediction, mask)
    return {name: tally.scores(combine=_sum_over_ranks) for name, tally in tallies.items()}


def _sum_over_ranks(matrix: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """A confusion matrix and image count summed over the ranks (as they are with one)."""
    if not parallel.distributed():
        return matrix, count
    total = torch.from_numpy(np.append(matrix.reshape(-1), count).astype(np.int64))
    parallel.all_reduce_sum_(total)
    return total[:-1].numpy().reshape(matrix.shape), int(total[-1])


@dataclass
class _State:
    """What a training carries from epoch to epoch (and what last.pt restores). ``net`` is what
    the training pass calls: ``model`` itself, or its DistributedDataParallel wrapper."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupPlateauLR
    stopper: EarlyStopping
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None
    memory_format: str = "contiguous"  # of the networks' weights and of every batch they are given
    start_epoch: int = 1
    train_seconds: float = 0.0
    world: parallel.World = parallel.World()
    ema: WeightAverage | None = None  # ema_decay > 0: the weights validated; semi-supervised: the teacher
    probes: list[WeightAverage] = field(default_factory=list)  # TrainConfig.probe_ema_decays
    semi: SemiConfig | None = None  # semi-supervised training (unlabelled images given)
    unlabeled_images: int = 0
    started_from: dict | None = None  # class-incremental: the bundle and the classes kept / added / dropped

    @property
    def shipped(self) -> torch.nn.Module:
        """The network best.pt would hold if chosen alone: the weight average, else the model."""
        return self.ema.model if self.ema is not None else self.model

    def candidates(self) -> dict[str, torch.nn.Module]:
        """The networks validated after each epoch; the best-scoring one is the epoch's score and
        goes into best.pt. Semi-supervised: the teacher and the student; else one network."""
        if self.semi is not None:
            return {"teacher": self.ema.model, "student": self.model}
        return {"average" if self.ema is not None else "model": self.shipped}

    def autocast(self):
        return devices.autocast(self.device, self.precision)

    def to_device(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A CPU batch of images on the training's device, dtype and memory format."""
        order = devices.MEMORY_FORMATS[self.memory_format]
        return images.to(self.device, dtype=dtype, non_blocking=True, memory_format=order)

    def after_step(self) -> None:
        for average in ([self.ema] if self.ema is not None else []) + self.probes:
            average.update(self.model)

    def predictor(self, net: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """Validation logits of a CPU batch, on the training's device (``evaluate`` takes the class
        map there). In fp32 whatever the training's precision: the Dice a training records is the
        one ``segcore eval`` gives its bundle."""
        dtype = next(net.parameters()).dtype

        def predict(images: torch.Tensor, size=None) -> torch.Tensor:
            return net(self.to_device(images, dtype), size=size).float()

        return predict


def train(
    config: TrainConfig,
    dataset_root: str | Path,
    output: str | Path,
    *,
    resume: bool = False,
    load_weights: str | Path | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    initial_model: torch.nn.Module | None = None,
    unlabeled: list[Path] | None = None,
    allow_dropped_classes: bool = False,
) -> dict:
    """Train ``config.template`` on a canonical dataset; return the bundle metadata.

    ``initial_model`` replaces the freshly built network (quantization-aware training passes a
    trained segmenter with fake-quantizers inserted). ``unlabeled`` (image files) switches on
    semi-supervised training (``segcore.semi``) with ``config.semi``'s settings. ``load_weights``
    is backbone weights (a .pth) or a finished bundle of the same template: then every weight is
    loaded and the classifier's rows are matched to this dataset's classes by name
    (class-incremental; ``allow_dropped_classes`` lets old classes the data lacks go).
    """
    output = Path(output)
    manifest = load_manifest(dataset_root)
    w = parallel.world()

    def prepare_output() -> None:
        _refuse_existing(output, resume)
        output.mkdir(parents=True, exist_ok=True)

    parallel.lead(prepare_output)  # in data-parallel training only rank 0 writes to OUTPUT
    seed_everything(config.seed)
    weights = load_weights if w.main else None  # DDP hands rank 0's weights to the others
    state = _initial_state(config, manifest["labels"], weights, resume, output, initial_model, allow_dropped_classes)
    if unlabeled:
        state.semi = SemiConfig(**config.semi)
        state.ema = WeightAverage(state.model, state.semi.teacher_decay)  # the teacher
    if resume:
        _restore(state, output, manifest, config)
    criterion = make_criterion(config, manifest["ignore_index"])
    augment = AugmentConfig(crop_size=config.input_size, ignore_index=manifest["ignore_index"], **config.augment)
    train_set = SegmentationDataset(dataset_root, "train", augment, seed=config.seed)
    val_set = EvalDataset(dataset_root, "val", config.input_size, cache_mb=_val_cache_mb())
    last_done = state.start_epoch - 1
    progress = progress and w.main
    loader = _train_loader(config, train_set, state)
    if state.semi is not None:
        loader = _with_unlabeled(config, state, train_set, loader, unlabeled, augment)
    for epoch in range(state.start_epoch, config.epochs + 1):
        if parallel.lead(lambda epoch=epoch: _over_budget(config, state, epoch)):
            break
        record, should_stop = _run_epoch(config, state, criterion, loader, val_set, manifest, epoch, progress)
        if w.main:
            _save_epoch(state, record, output, manifest, config, should_stop)
        last_done = epoch
        if on_epoch and w.main:
            on_epoch(record)
        if should_stop:
            log.info("early stopping: no improvement for %d epochs", config.early_stop_patience)
            break
    return parallel.lead(lambda: _write_bundle(config, manifest, output, last_done, state))


def _val_cache_mb() -> float:
    """MiB of the val split kept in memory between epochs (``SEGCORE_VAL_CACHE_MB``, default 512:
    CamVid's 101 images take 97 MiB at 512x512; 0 reads the split from disk every epoch)."""
    return devices.megabytes_from_env("SEGCORE_VAL_CACHE_MB", 512.0, "0: read the val split every epoch")


class _SemiLoader:
    """The labelled loader with the unlabelled one beside it: yields (images, masks, unlabelled)
    where unlabelled is (weak, strong, valid) or None in the epochs before the unlabelled start."""

    def __init__(self, labelled: DataLoader, unlabelled: DataLoader, start_epoch: int):
        self.labelled, self.unlabelled, self.start_epoch = labelled, unlabelled, start_epoch
        self.batch_sampler = self  # set_epoch reaches both samplers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.labelled.batch_sampler.set_epoch(epoch)
        self.unlabelled.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.labelled)

    def __iter__(self):
        if self.epoch < self.start_epoch:
            for images, masks in self.labelled:
                yield images, masks, None
            return
        for (images, masks), extra in zip(self.labelled, self.unlabelled, strict=True):
            yield images, masks, extra


def _with_unlabeled(config, state: _State, train_set, loader: DataLoader, files: list[Path], augment) -> _SemiLoader:
    from segcore.semi import UnlabeledBatches, UnlabeledDataset, image_digest

    labelled = {image_digest(train_set.load(i)[0]) for i in range(len(train_set))}
    data = UnlabeledDataset(files, augment, state.semi, config.seed, labelled)
    w = state.world
    sampler = UnlabeledBatches(len(data), state.semi.unlabeled_batch_size, len(loader), config.seed, w)
    state.unlabeled_images = len(data)
    unlabelled = DataLoader(data, batch_sampler=sampler, **_loader_options(config, state))
    log.info(
        "semi-supervised (Mean Teacher): %d unlabelled images, batch %d beside the labelled %d, from epoch %d",
        len(data), state.semi.unlabeled_batch_size, config.batch_size, state.semi.unlabeled_start_epoch,
    )  # fmt: skip
    return _SemiLoader(loader, unlabelled, state.semi.unlabeled_start_epoch)


def _refuse_existing(output: Path, resume: bool) -> None:
    if (output / BUNDLE_META).exists() and not resume:
        raise SegcoreError("holds a finished training; choose a new --output", output)
    if (output / LAST).exists() and not resume:
        raise SegcoreError(
            "holds an unfinished training; pass --resume to continue it or choose a new --output", output
        )


def _initial_state(
    config, labels: list[str], load_weights, resume, output: Path, initial_model, allow_dropped: bool = False
) -> _State:
    w = parallel.world()
    device = parallel.device_for(devices.resolve_device(config.device), w)
    precision = devices.resolve_precision(config.precision, device)
    memory_format = devices.resolve_memory_format(config.memory_format, device)
    if device.type == "cpu":
        devices.limit_heap_retention()  # only when SEGCORE_MMAP_THRESHOLD_MB asks for it
    if initial_model is not None:
        model = initial_model
    else:
        model = init_weights(create_model(get_template(config.template), len(labels)), config.init)
    started_from = None
    if load_weights and not (resume and (output / LAST).exists()):
        from segcore.models.weights import is_bundle, load_backbone_weights, load_bundle_weights

        if is_bundle(load_weights):
            template_id = get_template(config.template).id
            started_from = load_bundle_weights(model, load_weights, template_id, labels, allow_dropped)
        else:
            load_backbone_weights(model, load_weights)
    if w.distributed:
        model = parallel.sync_batchnorm(model, device)
    model.to(device, memory_format=devices.MEMORY_FORMATS[memory_format])
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    scheduler = WarmupPlateauLR(
        optimizer, config.lr, config.warmup_iters, config.warmup_start_factor,
        config.plateau_factor, config.plateau_patience, config.min_lr,
    )  # fmt: skip
    stopper = EarlyStopping(config.early_stop_start_epoch, config.early_stop_patience)
    net = model
    if w.distributed:
        # Rank 0's parameters and buffers are copied to every rank once; buffers are not re-sent
        # before each forward pass: synchronised batch norm keeps them equal.
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        log.info("training on %s in %s (%s), rank %d of %d", device, precision, memory_format, w.rank, w.size)
    else:
        log.info("training on %s in %s (%s)", device, precision, memory_format)
    scaler = devices.grad_scaler(device, precision)
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    probes = [WeightAverage(model, d) for d in config.probe_ema_decays]
    return _State(
        model, net, optimizer, scheduler, stopper, device, precision, scaler, memory_format, world=w, ema=ema,
        probes=probes, started_from=started_from,
    )  # fmt: skip


def _restore(state: _State, output: Path, manifest: dict, config: TrainConfig) -> None:
    """Continue from OUTPUT/last.pt when there is one (a fresh start otherwise)."""
    saved = parallel.lead(lambda: _read_checkpoint(output, manifest, config))  # rank 0 reads, all get it
    if saved is None:
        return
    state.model.load_state_dict(saved["model"])
    if state.ema is not None:
        if "ema" in saved:
            state.ema.load_state_dict(saved["ema"])
        else:  # a checkpoint of a training without averaging: start the average here
            state.ema = WeightAverage(state.model, state.ema.decay)
    for probe in state.probes:
        if f"ema_{probe.decay}" in saved.get("probes", {}):
            probe.load_state_dict(saved["probes"][f"ema_{probe.decay}"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.stopper.load_state_dict(saved["early_stopping"])
    _set_rng_state(saved["rng"])
    state.start_epoch = config.epochs + 1 if saved.get("stopped") else saved["epoch"] + 1
    state.train_seconds = saved.get("train_seconds", 0.0)
    state.started_from = saved.get("started_from")
    log.info("resuming after epoch %d (best mean Dice %.4f)", saved["epoch"], state.stopper.best)


def _read_checkpoint(output: Path, manifest: dict, config: TrainConfig) -> dict | None:
    """OUTPUT/last.pt, checked against the dataset and template (None: nothing to resume)."""
    last_path = output / LAST
    if not last_path.exists():
        log.info("nothing to resume in %s: starting from scratch", output)
        (output / METRICS).unlink(missing_ok=True)
        return None
    saved = torch.load(last_path, map_location="cpu", weights_only=True)
    if saved["dataset_hash"] != manifest["content_hash"]:
        raise SegcoreError("the dataset changed since this training started; use a new --output", output)
    if saved["template"] != get_template(config.template).id:
        raise SegcoreError(f"was trained with {saved['template']}, not {config.template}", last_path)
    return saved


def _over_budget(config: TrainConfig, state: _State, epoch: int) -> bool:
    """With a time budget: would one more epoch (as long as the average so far) overrun it?"""
    if config.time_budget_min is None or epoch == 1:
        return False
    last_epoch_s = state.train_seconds / max(1, epoch - 1)
    if state.train_seconds + last_epoch_s <= config.time_budget_min * 60:
        return False
    log.info("time budget of %.1f min reached after %d epochs", config.time_budget_min, epoch - 1)
    return True


class _EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of the current epoch (``set_epoch``): its share of the global batches
    (``--batch-size`` per process), shuffled by seed and epoch only, so a resumed or re-sharded run
    sees the same data. Items are (epoch, index) pairs, for workers that outlive an epoch."""

    def __init__(self, length: int, batch_size: int, seed: int, world: parallel.World):
        self.length, self.batch_size, self.seed, self.world = length, batch_size, seed, world
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> parallel.GlobalBatchSampler:
        w = self.world
        return parallel.GlobalBatchSampler(self.length, self.batch_size, self.seed * 1000 + self.epoch, w.rank, w.size)

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self):
        for batch in self._batches():
            yield [(self.epoch, index) for index in batch]


def _train_loader(config: TrainConfig, train_set: SegmentationDataset, state: _State) -> DataLoader:
    """The training loader of the whole run (``loader.batch_sampler.set_epoch`` before each epoch).
    Its worker processes are started once and kept: workers forked anew every epoch from a process
    that holds a trained model's memory made each later epoch 15% slower (copy-on-write faults)."""
    w = state.world
    batch_size = config.batch_size
    if len(train_set) < batch_size * w.size:
        batch_size = max(1, len(train_set) // w.size)
        log.warning("batch size %d x %d processes > %d training items: using %d per process",
                    config.batch_size, w.size, len(train_set), batch_size)  # fmt: skip
    sampler = _EpochBatches(len(train_set), batch_size, config.seed, w)
    return DataLoader(train_set, batch_sampler=sampler, **_loader_options(config, state))


def _loader_options(config: TrainConfig, state: _State) -> dict:
    """Workers that live for the whole run (see ``_train_loader``); pinned memory on CUDA."""
    options = dict(num_workers=config.num_workers, pin_memory=state.device.type == "cuda")
    if config.num_workers > 0:
        options.update(prefetch_factor=2, persistent_workers=True)
    return options


def _train_pass(config: TrainConfig, state: _State, criterion, loader, epoch: int, progress: bool) -> tuple:
    """One pass over the training split: (mean loss, images seen by all ranks). The loss of a step
    is the global batch's (the criteria reduce over the ranks)."""
    from tqdm import tqdm

    model, optimizer, scheduler, scaler = state.model, state.optimizer, state.scheduler, state.scaler
    model.train()
    ranks = state.world.size
    loss_sum, seen, started = 0.0, 0, time.perf_counter()
    unsup = {"loss": 0.0, "used": 0.0, "steps": 0}
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
    dtype = next(model.parameters()).dtype  # fp32 (fp64 where a numerical check made the model so)
    for batch in bar:
        images, masks, extra = batch if len(batch) == 3 else (*batch, None)
        images = state.to_device(images, dtype)
        masks = masks.to(state.device, non_blocking=True)
        if extra is None:
            with state.autocast():
                logits = state.net(images)
            loss = criterion(logits, masks)  # every loss computes (and its softmax) in fp32
            del logits  # freed before the backward pass, which does not need it
        else:
            loss = _semi_loss(state, criterion, images, masks, extra, epoch, unsup, dtype, config.seed)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_iteration()
        state.after_step()
        loss_sum += loss.item() * len(images) * ranks
        seen += len(images) * ranks
        rate = seen / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{scheduler.lr:.2e}", ips=f"{rate:.2f}")
    bar.close()
    extras = {}
    if state.semi is not None:
        steps = max(unsup["steps"], 1)
        extras = {"train_unsup_loss": unsup["loss"] / steps, "pseudo_pixel_share": unsup["used"] / steps}
    return loss_sum / max(seen, 1), seen, extras


def _semi_loss(
    state: _State, criterion, images, masks, extra, epoch: int, unsup: dict, dtype, seed: int
) -> torch.Tensor:
    """The labelled loss plus the weighted unsupervised loss of one step. The student sees the
    labelled images and the strong views in one forward pass (one batch-norm batch, one DDP call);
    the teacher labels the weak views. CutMix's rectangles are drawn from (seed, epoch, step, rank),
    so a resumed run mixes alike."""
    from segcore.semi import (
        IGNORE,
        cutmix,
        cutmix_boxes,
        ignore_share,
        pseudo_labels,
        unlabeled_weight,
        unsupervised_balanced_ce,
        unsupervised_ce_dice,
        unsupervised_loss,
    )

    weak, strong = state.to_device(extra[0], dtype), state.to_device(extra[1], dtype)
    valid = extra[2].to(state.device, non_blocking=True)
    with torch.no_grad(), state.autocast():
        teacher_logits = state.ema.model(weak)
    share, threshold = ignore_share(state.semi, epoch), state.semi.pseudo_threshold
    labels = pseudo_labels(devices.at_least_fp32(teacher_logits), valid, share, threshold=threshold)
    if state.semi.unlabeled_mix == "cutmix" and len(strong) > 1:
        rng = np.random.default_rng([seed, epoch, unsup["steps"], state.world.rank, 3])
        strong, labels = cutmix(strong, labels, cutmix_boxes(len(strong), *labels.shape[1:], rng))
    with state.autocast():
        logits = state.net(torch.cat([images, strong]))
    logits = devices.at_least_fp32(logits)
    supervised = criterion(logits[: len(images)], masks)
    losses = {"ce": unsupervised_loss, "ce_dice": unsupervised_ce_dice, "ce_balanced": unsupervised_balanced_ce}
    unsup_loss = losses[state.semi.unlabeled_loss]
    unsupervised = unsup_loss(logits[len(images) :], labels)
    unsup["loss"] += float(unsupervised.detach())
    unsup["used"] += float((labels != IGNORE).float().mean())
    unsup["steps"] += 1
    return supervised + unlabeled_weight(state.semi, epoch) * unsupervised


def _run_epoch(config, state: _State, criterion, loader, val_set, manifest, epoch, progress) -> tuple[dict, bool]:
    """Train one epoch, validate, step the schedulers; (the metrics record, whether to stop)."""
    started = time.perf_counter()
    loader.batch_sampler.set_epoch(epoch)
    loss, seen, extras = _train_pass(config, state, criterion, loader, epoch, progress)
    train_time = time.perf_counter() - started
    state.model.eval()
    labels = manifest["labels"]
    networks = dict(state.candidates())  # all scored on one pass over the val split
    networks.update({f"ema_{probe.decay}": probe.model for probe in state.probes})
    if state.ema is not None and state.probes:  # the model itself beside its averages
        networks["ema_none"] = state.model
    for net in networks.values():
        net.eval()
    predicts = {name: state.predictor(net) for name, net in networks.items()}
    scored = evaluate_all(predicts, val_set, len(labels), manifest["ignore_index"], labels, progress=progress)
    by_source = {name: scored[name] for name in state.candidates()}
    source = max(by_source, key=lambda name: by_source[name]["mdice"])  # the first on a tie
    scores = by_source[source]
    probes = {name.removeprefix("ema_"): s["mdice"] for name, s in scored.items() if name.startswith("ema_")}
    epoch_time = time.perf_counter() - started
    state.train_seconds += epoch_time
    peak_rss = parallel.all_reduce_sum_(torch.tensor([_peak_rss_mb()], dtype=torch.float64))
    mdice = scores["mdice"]
    improved = mdice > state.stopper.best
    lr_used = state.scheduler.lr
    should_stop = state.stopper.update(epoch, mdice)
    state.scheduler.step_epoch(mdice)
    if state.world.distributed:  # decided once, by rank 0, for every rank
        should_stop, scheduler, stopper = parallel.broadcast(
            (should_stop, state.scheduler.state_dict(), state.stopper.state_dict())
        )
        state.scheduler.load_state_dict(scheduler)
        state.stopper.load_state_dict(stopper)
    record = {
        "epoch": epoch,
        "train_loss": loss,
        "val_mdice": mdice,
        "val_miou": scores["miou"],
        "val_dice": {k: v["dice"] for k, v in scores["per_class"].items()},
        "lr": lr_used,
        "img_per_s": seen / train_time,
        "epoch_seconds": epoch_time,
        "peak_rss_mb": round(float(peak_rss)),
        "best": improved,
        "weights_from": source,
        **extras,
    }
    if len(by_source) > 1:
        record["val_mdice_by_source"] = {name: s["mdice"] for name, s in by_source.items()}
    if probes:
        record["val_mdice_ema"] = probes
    log.info(
        "epoch %d: loss %.4f  val mDice %.4f  mIoU %.4f  lr %.2e  %.2f img/s  %.0fs%s",
        epoch, loss, mdice, scores["miou"], lr_used, record["img_per_s"], epoch_time, "  (best)" if improved else "",
    )  # fmt: skip
    return record, should_stop


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save_epoch(state: _State, record: dict, output: Path, manifest: dict, config, stopped: bool) -> None:
    """best.pt when the epoch improved, last.pt (the resume point), a metrics.jsonl line."""
    if record["best"]:
        chosen = state.candidates()[record["weights_from"]]
        _save_atomic({"model": chosen.state_dict(), "epoch": record["epoch"], "mdice": record["val_mdice"],
                      "weights_from": record["weights_from"]}, output / BEST)  # fmt: skip
    checkpoint = {
        "model": state.model.state_dict(),
        **({"ema": state.ema.state_dict()} if state.ema is not None else {}),
        **({"probes": {f"ema_{p.decay}": p.state_dict() for p in state.probes}} if state.probes else {}),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "early_stopping": state.stopper.state_dict(),
        "rng": _rng_state(),
        "epoch": record["epoch"],
        "template": get_template(config.template).id,
        "dataset_hash": manifest["content_hash"],
        "train_seconds": state.train_seconds,
        "stopped": stopped,
        **({"started_from": state.started_from} if state.started_from else {}),
    }
    _save_atomic(checkpoint, output / LAST)
    with open(output / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write_bundle(config: TrainConfig, manifest: dict, output: Path, last_done: int, state: _State) -> dict:
    """model.json, written last: its presence means the training finished."""
    if not (output / BEST).exists():
        raise SegcoreError("training ended before any epoch finished", output)
    best = torch.load(output / BEST, map_location="cpu", weights_only=True)
    template = get_template(config.template)
    meta = {
        "segcore_version": __version__,
        "template": template.id,
        "template_name": template.name,
        "labels": manifest["labels"],
        "colors": manifest["colors"],
        "ignore_index": manifest["ignore_index"],
        "input_size": list(config.input_size),
        "mean": list(MEAN),
        "std": list(STD),
        "color_order": "RGB",
        "weights": BEST,
        "best_epoch": best["epoch"],
        "best_val_mdice": best["mdice"],
        "best_weights_from": best.get("weights_from", "model"),
        "epochs_run": last_done,
        "train_seconds": round(state.train_seconds, 1),
        "train_device": str(state.device),
        "train_precision": state.precision,
        "train_memory_format": state.memory_format,
        "train_processes": state.world.size,
        "training_config": asdict(config),
        **({"semi_supervised": {"unlabeled_images": state.unlabeled_images}} if state.semi is not None else {}),
        **({"started_from": state.started_from} if state.started_from else {}),
        "dataset_hash": manifest["content_hash"],
        "dataset_splits": manifest["splits"],
    }
    _write_json_atomic(meta, output / BUNDLE_META)
    return meta
