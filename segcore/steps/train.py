"""The train step: a template trained on a dataset -> a model bundle (local or s3://), with
per-epoch metrics, plots, the model and its registered version in MLflow; resumable."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.steps.data import DataSource
from segcore.tracking import TrackingOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """What a user may change of the template's recipe (None: the template's default)."""

    epochs: int | None = None
    batch_size: int | None = None
    input_size: tuple[int, int] | None = None
    lr: float | None = None
    seed: int | None = None
    num_workers: int = 2
    time_budget_min: float | None = None
    device: str | None = None  # auto|cpu|cuda|cuda:N (default auto)
    precision: str | None = None  # auto|fp32|bf16|fp16 (default auto)
    memory_format: str | None = None  # auto|channels_last|contiguous (default auto)
    semi: dict | None = None  # segcore.semi.SemiConfig overrides (used with unlabelled images)
    recipe: str | None = None  # a named recipe, segcore.models.templates.RECIPES (default "default")
    early_stop_patience: int | None = None  # epochs without a better validation Dice; 0: no early stopping
    plateau_patience: int | None = None  # the learning rate is cut after patience + 1 epochs without a better Dice


def train_step(
    template: str,
    source: DataSource,
    output: str,
    options: TrainOptions = TrainOptions(),
    *,
    resume: bool = False,
    load_weights: str | None = None,
    progress: bool = False,
    tracking: TrackingOptions | None = None,
    dist_timeout_s: float | None = None,
    unlabeled: str | None = None,
    allow_dropped_classes: bool = False,
) -> dict:
    """Train and write the bundle to ``output`` (uploaded after every epoch when s3://); return
    the bundle metadata. Everything that can be refused is refused before any download.

    Under torchrun (``WORLD_SIZE`` > 1) this is one rank of a data-parallel training: rank 0 does
    all of the above; the other ranks get the data (rank 0's copy when they can see it), train, and
    write nothing. ``dist_timeout_s`` bounds every collective (``segcore.parallel``).

    ``unlabeled`` (a folder of images, local or s3://) switches on semi-supervised training.
    ``load_weights`` may be a bundle: class-incremental training (``segcore.training.train``)."""
    from segcore import devices, parallel
    from segcore.models import get_template
    from segcore.training import TrainConfig

    t = get_template(template)
    config = TrainConfig.from_template(t.id, **asdict(options))
    device = devices.resolve_device(config.device)  # CUDA asked for and missing: refused before any work
    with parallel.session(parallel.device_for(device, parallel.env_world()), dist_timeout_s) as world:
        if not world.main:
            return _train_follower(config, source, resume=resume, unlabeled=unlabeled)
        return _train_main(
            t, config, source, output, resume, load_weights, progress, tracking, unlabeled, allow_dropped_classes
        )


def _unlabeled_files(unlabeled: str | None) -> list[Path] | None:
    """The unlabelled images under a local folder or an s3:// prefix (downloaded and cached)."""
    from segcore import storage
    from segcore.semi import list_unlabeled

    if not unlabeled:
        return None
    return list_unlabeled(storage.local_input(unlabeled) if storage.is_s3(unlabeled) else Path(unlabeled))


def _train_main(t, config, source: DataSource, output: str, resume, load_weights, progress, tracking,
                unlabeled=None, allow_dropped_classes=False) -> dict:  # fmt: skip
    """``train_step`` of one process, or of rank 0."""
    import contextlib

    from segcore import parallel, storage
    from segcore.data.convert import load_manifest
    from segcore.tracking import check_tracking, tracking_run
    from segcore.training import train

    with contextlib.ExitStack() as stack:

        def prepare() -> dict:
            resolved_hardware(config)
            check_output(output, resume)
            check_tracking(tracking)
            unlabeled_files = _unlabeled_files(unlabeled)
            local = source.localized()
            weights = str(storage.local_input(load_weights)) if load_weights else None
            out = stack.enter_context(storage.local_output(output, resume=resume, exist_ok=True))
            tracker = stack.enter_context(
                tracking_run(
                    tracking,
                    "train",
                    run_name=f"train {t.name}",
                    resume_from=out if resume else None,
                    tags={"segcore.template": t.name},
                    system_metrics=True,
                )
            )
            dataset = _prepare_or_clean(local, out)
            manifest = load_manifest(dataset)
            return dict(
                out=out, tracker=tracker, dataset=dataset, manifest=manifest, weights=weights, unlabeled=unlabeled_files
            )

        # The other ranks wait for the data (or for the reason there is none).
        prepared = parallel.lead(
            prepare,
            lambda p: {
                "dataset": str(p["dataset"]),
                "hash": p["manifest"]["content_hash"],
                "unlabeled": [str(f) for f in p["unlabeled"] or []],
            },
        )
        out, tracker, dataset, manifest = (prepared[k] for k in ("out", "tracker", "dataset", "manifest"))
        tracker.write_run_file(out)
        tracker.log_params(
            train_params(t, config, manifest, source, output, load_weights, unlabeled, prepared["unlabeled"])
        )
        tracker.log_dataset(manifest, source.train_root, "train")
        upload = _uploader(output, out)

        def on_epoch(record: dict) -> None:
            tracker.log_metrics(epoch_metrics(record), step=record["epoch"])
            upload()

        _announce(t, config, parallel.world().size)
        meta = train(
            config,
            dataset,
            out,
            resume=resume,
            load_weights=prepared["weights"],
            progress=progress,
            on_epoch=on_epoch,
            unlabeled=prepared["unlabeled"],
            allow_dropped_classes=allow_dropped_classes,
        )
        if tracker.enabled:
            try:
                log_training_result(tracker, out, dataset, meta)
            except Exception as exc:  # noqa: BLE001 - the training succeeded; tracking must not fail it
                log.warning("could not log the training result to MLflow: %s", exc)
        upload(final=True)  # before the tracking queue is flushed: the bundle first
    return meta


def _announce(t, config, ranks: int) -> None:
    batch = f"batch {config.batch_size}" + (f" x {ranks} processes" if ranks > 1 else "")
    log.info(
        "training %s: input %dx%d, %s, lr %g, up to %d epochs",
        t.name, *config.input_size, batch, config.lr, config.epochs,
    )  # fmt: skip


def _train_follower(config, source: DataSource, *, resume: bool, unlabeled: str | None = None) -> dict:
    """``train_step`` on a rank other than 0: the data (rank 0's canonical copy when this node
    sees it, its own otherwise), then the training. It writes, logs and uploads nothing."""
    import tempfile

    from segcore import parallel
    from segcore.data.convert import MANIFEST, load_manifest
    from segcore.training import train

    logging.getLogger("segcore").setLevel(logging.WARNING)  # rank 0 reports for everyone
    shared = parallel.lead(None)
    with tempfile.TemporaryDirectory(prefix="segcore-rank-") as scratch:
        dataset = Path(shared["dataset"])
        if not ((dataset / MANIFEST).is_file() and load_manifest(dataset)["content_hash"] == shared["hash"]):
            dataset = source.localized().canonical(Path(scratch) / "dataset")
            if load_manifest(dataset)["content_hash"] != shared["hash"]:
                raise SegcoreError("this node's copy of the training data differs from rank 0's", dataset)
        files = [Path(f) for f in shared["unlabeled"]]
        if files and not all(f.is_file() for f in files):  # another node: its own copy
            files = _unlabeled_files(unlabeled)
        return train(config, dataset, Path(scratch) / "output", resume=resume, unlabeled=files or None)


def train_resumable(
    template: str,
    dataset: str,
    model_dir: str,
    options: TrainOptions,
    checkpoint_uri: str = "",
    key: dict | None = None,
    tracking: TrackingOptions | None = None,
    unlabeled: str = "",
    load_weights: str = "",
    allow_dropped_classes: bool = False,
) -> tuple[dict, str]:
    """The pipeline's training: with ``checkpoint_uri`` (s3:// or a volume that outlives the pod)
    checkpoints go to ``<checkpoint_uri>/train-<key>`` (key: dataset content, template and
    ``key``, default the options), a retried attempt resumes there and a finished training found there is reused;
    the bundle then lands in ``model_dir``. Returns (bundle metadata, where the checkpoints are)."""
    from segcore.data.convert import load_manifest

    source = DataSource(dataset)
    more = dict(
        tracking=tracking,
        unlabeled=unlabeled or None,
        load_weights=load_weights or None,
        allow_dropped_classes=allow_dropped_classes,
    )
    if not checkpoint_uri:
        meta = train_step(template, source, model_dir, options, resume=True, **more)
        return meta, model_dir
    manifest = load_manifest(dataset)
    prefix = checkpoint_prefix(checkpoint_uri, manifest["content_hash"], template, key or asdict(options))
    if finished_at(prefix):
        log.info("%s holds this training, finished: reusing it", prefix)
    else:
        train_step(template, source, prefix, options, resume=True, **more)
    return collect_bundle(prefix, model_dir), prefix


def finished_at(prefix: str) -> bool:
    """Whether ``prefix`` (a folder or s3:// prefix) holds a finished training (its model.json)."""
    from segcore import storage

    return storage.exists(f"{prefix}/model.json") if storage.is_s3(prefix) else Path(prefix, "model.json").is_file()


def collect_bundle(prefix: str, model_dir: str) -> dict:
    """Copy the bundle at ``prefix`` into ``model_dir``; its metadata."""
    import json

    from segcore import storage

    if storage.is_s3(prefix):
        storage.download(prefix, model_dir)
    else:
        shutil.copytree(prefix, model_dir, dirs_exist_ok=True)
    return json.loads(Path(model_dir, "model.json").read_text())


def checkpoint_prefix(checkpoint_uri: str, dataset_hash: str, template: str, settings: dict) -> str:
    """One folder per dataset content, template and training settings under ``checkpoint_uri``, so
    a retried attempt finds its own checkpoints and nothing else does."""
    import hashlib
    import json

    key = json.dumps([dataset_hash, template, sorted(settings.items())], default=str)
    return f"{checkpoint_uri.rstrip('/')}/train-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def check_output(
    output: str, resume: bool, finished_file: str = "", last_file: str = "", what: str = "training"
) -> None:
    """The same refusals for a local folder and an S3 prefix, before any download or work: a
    folder that holds ``finished_file`` (default the bundle's model.json) or ``last_file`` (default
    last.pt) is refused unless ``resume``."""
    from segcore import storage
    from segcore.training import BUNDLE_META, LAST

    finished_file, last_file = finished_file or BUNDLE_META, last_file or LAST
    if resume:
        if storage.is_s3(output):
            storage.check_bucket(output)
        return
    if storage.is_s3(output):
        uri = storage.check_bucket(output)
        finished, unfinished = storage.exists(uri.child(finished_file)), storage.exists(uri.child(last_file))
    else:
        finished, unfinished = (Path(output) / finished_file).exists(), (Path(output) / last_file).exists()
    if finished:
        raise SegcoreError(f"holds a finished {what}; choose a new --output", output)
    if unfinished:
        raise SegcoreError(f"holds an unfinished {what}; pass --resume to continue it or choose a new --output", output)


def _prepare_or_clean(source: DataSource, output: Path) -> Path:
    """The canonical dataset (raw data is converted into OUTPUT/dataset); when the data is refused,
    the output folder this call created goes away with it, so nothing looks like a started training."""
    created = not output.exists()
    try:
        return source.canonical(output / "dataset")
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise


def _uploader(output: str, local: Path):
    """Uploads the bundle folder to an s3:// output (a no-op for local outputs)."""
    from segcore import storage

    remote = storage.parse_s3_uri(output) if storage.is_s3(output) else None

    def upload(final: bool = False) -> None:
        if remote is None:
            return
        try:
            storage.sync_up(local, remote)
        except SegcoreError as exc:
            if final:
                raise
            log.warning("checkpoint upload failed, training goes on (retried after the next epoch): %s", exc)

    return upload


def train_params(
    template, config, manifest: dict, source: DataSource, output: str, load_weights, unlabeled=None, unlabeled_files=()
) -> dict:
    """What MLflow records about a training: template, every hyper-parameter, data and versions."""
    from segcore import __version__
    from segcore.tracking import redact

    params = {"template": template.id, "template_name": template.name, **resolved_hardware(config)}
    for key, value in asdict(config).items():
        if key in ("augment", "semi"):
            params.update({f"{key}.{k}": v for k, v in value.items()})
        elif key == "input_size":
            params[key] = f"{value[0]}x{value[1]}"
        else:
            params[key] = value
    params.update(
        dataset_hash=manifest["content_hash"],
        labels=",".join(manifest["labels"]),
        num_classes=len(manifest["labels"]),
        ignore_index=manifest["ignore_index"],
        train_items=manifest["splits"]["train"],
        val_items=manifest["splits"]["val"],
        segcore_version=__version__,
        load_weights=redact(load_weights) if load_weights else None,
        output=redact(output),
        **source.params(),
    )
    if unlabeled_files:
        params.update(unlabeled_data_root=redact(unlabeled), unlabeled_files=len(unlabeled_files))
    return params


def resolved_hardware(config) -> dict:
    """The device and precision a training's ``auto`` settings mean on this machine."""
    from segcore import devices, parallel

    world = parallel.world()
    device = parallel.device_for(devices.resolve_device(config.device), world)
    return {
        "train_device": str(device),
        "train_precision": devices.resolve_precision(config.precision, device),
        "train_memory_format": devices.resolve_memory_format(config.memory_format, device),
        "train_processes": world.size,
    }


def epoch_metrics(record: dict) -> dict:
    """A metrics.jsonl record as MLflow metrics: val_dice is the mean Dice, val_dice/<class> per class."""
    names = ("train_loss", "lr", "img_per_s", "epoch_seconds", "peak_rss_mb", "train_unsup_loss", "pseudo_pixel_share")
    metrics = {k: record[k] for k in names if k in record}
    metrics.update({f"val_dice_{name}": dice for name, dice in record.get("val_mdice_by_source", {}).items()})
    metrics.update(val_dice=record["val_mdice"], val_miou=record["val_miou"])
    metrics.update({f"val_dice/{name}": dice for name, dice in record["val_dice"].items()})
    return metrics


def _input_example(dataset: Path):
    """A small validation image (longest side 64 px) for the MLflow model's input example."""
    import cv2

    from segcore.data.dataset import SegmentationDataset

    image, _ = SegmentationDataset(dataset, "val").load(0)
    scale = 64 / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))))
    return image


def log_training_result(tracker, output: Path, dataset: Path, meta: dict) -> None:
    """End of a tracked training: final scores, plots and overlays of the best model, the model
    (bundle + pyfunc), and a registered version with alias 'best' if it beats the current holder."""
    from segcore.inference import TorchPredictor
    from segcore.tracking import log_segmentation_report, model_name

    final = {k: meta[k] for k in ("best_epoch", "epochs_run", "train_seconds")}
    final["best_val_dice"] = meta["best_val_mdice"]
    scores = log_segmentation_report(tracker, TorchPredictor(output), dataset, "val")
    if scores:
        final.update({f"best_val_dice/{k}": v["dice"] for k, v in scores["per_class"].items()})
        final["best_val_miou"] = scores["miou"]
    tracker.log_metrics(final)
    if tracker.log_model_bundle(output, input_example=_input_example(dataset)):
        tracker.register_model(
            model_name(tracker.experiment_name, meta["template_name"]),
            score=meta["best_val_mdice"],
            tags={"template": meta["template"], "dataset_hash": meta["dataset_hash"]},
        )
