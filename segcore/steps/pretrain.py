"""The pretrain step: a template's backbone pretrained on unlabelled images (local or s3://) ->
an output folder (local or s3://, uploaded after every epoch) whose backbone ``segcore train
--load-weights`` takes; parameters and per-epoch metrics in MLflow like a training; resumable."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from segcore.errors import SegcoreError
from segcore.tracking import TrackingOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainOptions:
    """What a user may change of the pretraining (None: ``segcore.pretrain.PretrainConfig``'s default)."""

    epochs: int | None = None
    batch_size: int | None = None
    input_size: tuple[int, int] | None = None
    lr: float | None = None
    seed: int | None = None
    num_workers: int = 2
    device: str | None = None
    precision: str | None = None


def pretrain_step(
    template: str,
    images: str,
    output: str,
    options: PretrainOptions = PretrainOptions(),
    *,
    resume: bool = False,
    progress: bool = False,
    tracking: TrackingOptions | None = None,
) -> dict:
    """Pretrain and write ``output``; return the metadata (``pretrain.json``). Everything that can
    be refused (the images, the output, the device) is refused before any download or work."""
    import contextlib

    from segcore import devices, parallel, storage
    from segcore.models import get_template
    from segcore.pretrain import LAST, PRETRAIN_META, PretrainConfig, pretrain
    from segcore.semi import list_unlabeled
    from segcore.steps.train import _uploader, check_output
    from segcore.tracking import check_tracking, tracking_run

    if parallel.env_world().distributed:
        raise SegcoreError("segcore pretrain runs in one process; start it without torchrun")
    t = get_template(template)
    config = PretrainConfig(template=t.id, **{k: v for k, v in asdict(options).items() if v is not None})
    devices.resolve_device(config.device)  # CUDA asked for and missing: refused now
    check_output(output, resume, PRETRAIN_META, LAST, what="pretraining")
    check_tracking(tracking)
    files = list_unlabeled(storage.local_input(images) if storage.is_s3(images) else Path(images))
    if len(files) < config.batch_size:
        raise SegcoreError(f"holds {len(files)} images, fewer than one batch of {config.batch_size}", images)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(storage.local_output(output, resume=resume, exist_ok=True))
        tracker = stack.enter_context(
            tracking_run(
                tracking,
                "pretrain",
                run_name=f"pretrain {t.name}",
                resume_from=out if resume else None,
                tags={"segcore.template": t.name},
                system_metrics=True,
            )
        )
        out.mkdir(parents=True, exist_ok=True)
        tracker.write_run_file(out)
        tracker.log_params(pretrain_params(t, config, images, output, len(files)))
        upload = _uploader(output, out)

        def on_epoch(record: dict) -> None:
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
            upload()

        meta = pretrain(config, files, out, resume=resume, progress=progress, on_epoch=on_epoch)
        tracker.log_metrics({"final_loss": meta["final_loss"], "pretrain_seconds": meta["pretrain_seconds"]})
        tracker.log_artifact(out / PRETRAIN_META)
        upload(final=True)
    return meta


def pretrain_params(template, config, images: str, output: str, count: int) -> dict:
    """What MLflow records about a pretraining."""
    from segcore import __version__
    from segcore.tracking import redact

    params = {"template": template.id, "template_name": template.name, "method": "detcon"}
    for key, value in asdict(config).items():
        params[key] = f"{value[0]}x{value[1]}" if key == "input_size" else value
    params.update(images=redact(images), image_count=count, output=redact(output), segcore_version=__version__)
    return params
