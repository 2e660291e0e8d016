"""INT8 with NNCF: post-training quantization of an IR, or quantization-aware training of a bundle.

Both follow OTX's settings for Lite-HRNet: the mixed preset (symmetric weights, asymmetric
activations), the multiplications inside cross-resolution and spatial weighting left in floating
point (they scale features by sigmoid gates, which INT8 hurts), and for PTQ also the iterative
aggregator's additions and the additions of the fuse layers (every convolution stays INT8; keeping
these float recovered all of full PTQ's Dice loss on CamVid); 300 calibration images from the
training split. The graph's own pre- and post-processing (input resize, the resize of the logits
to the image size, softmax) stays in floating point too: int8 gains nothing there, and rounding
the logits would flip near ties.

Activation ranges (``range_estimator``): "quantile" (the default) takes each calibration image's
1e-4 and 1 - 1e-4 quantiles and averages them over the images (NNCF's MEAN_QUANTILE);
"quantile_minmax" takes the same per-image quantiles but keeps the lowest and the highest over the
images, which is what OTX 1.x configured; "histogram" is NNCF's MSE-optimal range from a histogram;
"minmax" the plain extremes. Plain min/max calibrates about 2.5x faster, since NNCF reduces
min/max inside the graph but copies every activation out of OpenVINO for quantiles, and it costs
far more Dice: on CamVid with Lite-HRNet-18 (32 calibration images, 25 validation images) the mean
Dice went from 0.441 (FP32) to 0.415 with quantiles and to 0.335 with min/max (0.334 with mean
min/max).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from segcore.errors import SegcoreError
from segcore.export import (
    check_new_output,
    ir_size,
    read_ir,
    read_meta,
    set_model_info,
    to_openvino,
    write_ir,
)

log = logging.getLogger(__name__)

# NNCF compiles its PyTorch extension on first use (QAT) and gives up after 60 s by default; on a
# busy 2-core machine (a shared CI runner, a pod beside other work) that one-off build can take
# longer. A user's own NNCF_EXTENSION_LOAD_TIMEOUT wins.
NNCF_EXTENSION_TIMEOUT_S = 600

# Node names in the converted graph carry the torch module path, e.g.
# "__module.model.backbone.stage0.1.layers.0.spatial_weighting.1/aten::mul/Multiply".
WEIGHTING_MULTIPLY = r".*(cross_resolution_weighting|spatial_weighting)[^/]*/aten::mul/.*"
AGGREGATOR_ADD = r".*aggregator/aten::add/.*"
# The additions of each high-resolution module's fuse layers (a branch plus the upsampled or
# strided other branches): quantizing their inputs cost Lite-HRNet-18 all of its PTQ Dice loss
# on CamVid (0.029 of 0.029, benchmarks/int8_study.py), and OTX 1.x's configs kept exactly these in float.
FUSE_ADD = r"__module\.model\.backbone\.stage\d+\.\d+/aten::add/.*"
QAT_FUSE_ADD = r"(.*/)?backbone/stage\d+/\d+/add/\d+"  # the same in NNCF's PyTorch graph
# --scope head: the whole backbone stays in floating point (OTX 2.6's PTQ setting for Lite-HRNet-18,
# ignored-scope pattern "__module.model.backbone/*"); only the decode head runs in INT8. In the
# Lite-HRNet-18 template the iterative aggregator belongs to the backbone, so it stays float too.
BACKBONE = r"__module\.model\.backbone[./].*"
QAT_BACKBONE = r"(.*/)?backbone[./\[].*"  # the same in NNCF's PyTorch graph
SCOPES = ("full", "head")
# The segmenter's own final resize of the logits, in NNCF's PyTorch graph: kept float for QAT
# as processing_ops() does for PTQ.
SEGMENTER_RESIZE = "/interpolate/0"


def processing_ops(ov_model) -> list[str]:
    """The IR's pre- and post-processing resizes and softmax (the export wrapper's own ops).

    Left in floating point: quantizing the input of the final resize rounds the logits to 256
    levels before the argmax, which flips near-tied pixels, and int8 buys nothing for a resize.
    """
    return [
        node.get_friendly_name()
        for node in ov_model.get_ops()
        if node.get_type_name() in ("Interpolate", "Softmax")
        and not any(part in node.get_friendly_name() for part in (".backbone", ".decode_head"))
    ]


def ignored_names(ov_model, scope: str = "full") -> list[str]:
    """The IR operations PTQ leaves in floating point, by name: the pre/post-processing, the
    weighting multiplications, the aggregator's and the fuse layers' additions, and with ``scope="head"`` the whole
    backbone. Every pattern must match something in this IR (a pattern that silently matched
    nothing would quantize what it was meant to protect)."""
    import re

    if scope not in SCOPES:
        raise SegcoreError(f"unknown scope {scope!r} (choose {', '.join(SCOPES)})")
    names = [node.get_friendly_name() for node in ov_model.get_ops() if node.get_type_name() != "Constant"]
    patterns = {
        "weighting multiplications": WEIGHTING_MULTIPLY,
        "aggregator additions": AGGREGATOR_ADD,
        "fuse additions": FUSE_ADD,
    }
    if scope == "head":
        patterns["backbone"] = BACKBONE
    ignored = set(processing_ops(ov_model))
    owners = module_names(ov_model)
    for what, pattern in patterns.items():
        hit = [name for name in names if re.fullmatch(pattern, owners.get(name, name))]
        if not hit:
            raise SegcoreError(f"the ignored scope for the {what} ({pattern}) matches no operation of this IR")
        ignored.update(hit)
    return sorted(ignored)


def module_names(ov_model) -> dict[str, str]:
    """Each operation's torch module name. The converter names operations after the module that
    made them ("__module.model.backbone.stem.conv/aten::_convolution/Convolution"), but fusions
    leave some without (a convolution merged with its batch norm's scale becomes "Multiply_123"):
    those take the name of the nearest named operation they feed (the first by name on a tie, so
    the answer does not depend on the graph's unordered consumer sets)."""
    named = "__module."
    out: dict[str, str] = {}
    for node in ov_model.get_ops():
        name = node.get_friendly_name()
        if node.get_type_name() == "Constant" or name.startswith(named):
            continue
        frontier, seen = [node], {name}
        while frontier and name not in out:
            consumers = {
                target.get_node().get_friendly_name(): target.get_node()
                for current in frontier
                for output in current.outputs()
                for target in output.get_target_inputs()
            }
            found = sorted(other for other in consumers if other.startswith(named))
            if found:
                out[name] = found[0]
            frontier = [consumers[other] for other in sorted(consumers) if other not in seen]
            seen.update(consumers)
    return out


def quantized_layers(ov_model) -> int:
    """Convolutions and matrix products that run in INT8: their activation input comes straight
    from a FakeQuantize."""
    count = 0
    for node in ov_model.get_ops():
        if node.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            count += node.input_value(0).get_node().get_type_name() == "FakeQuantize"
    return count


def _quiet_nncf() -> None:
    """NNCF logs every node it leaves out at INFO; keep that for --verbose."""
    import nncf

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        nncf.set_log_level(logging.WARNING)


def _preset(name: str):
    import nncf

    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    if name not in presets:
        raise SegcoreError(f"unknown preset {name!r} (choose {', '.join(presets)})")
    return presets[name]


RANGE_ESTIMATORS = ("quantile", "quantile_minmax", "histogram", "minmax")


def _range_estimator(name: str):
    """NNCF's activation range parameters for a RANGE_ESTIMATORS name (None: NNCF's min/max)."""
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if name not in RANGE_ESTIMATORS:
        raise SegcoreError(f"unknown range estimator {name!r} (choose {', '.join(RANGE_ESTIMATORS)})")
    if name == "quantile_minmax":
        return RangeEstimatorParameters(
            min=StatisticsCollectorParameters(
                statistics_type=StatisticsType.QUANTILE, aggregator_type=AggregatorType.MIN
            ),
            max=StatisticsCollectorParameters(
                statistics_type=StatisticsType.QUANTILE, aggregator_type=AggregatorType.MAX
            ),
        )
    return {
        "quantile": RangeEstimatorParametersSet.MEAN_QUANTILE,
        "histogram": RangeEstimatorParametersSet.HISTOGRAM,
    }.get(name)


def _advanced(range_estimator: str):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    params = _range_estimator(range_estimator)
    if params is None:
        return AdvancedQuantizationParameters()
    return AdvancedQuantizationParameters(activations_range_estimator_params=params)


def count_ops(ov_model, *types: str) -> dict[str, int]:
    counts = dict.fromkeys(types, 0)
    for node in ov_model.get_ops():
        name = node.get_type_name()
        if name in counts:
            counts[name] += 1
    return counts


def _items(dataset_root: Path, split: str) -> list[tuple[Path, Path]]:
    from segcore.scoring import split_items

    return split_items(dataset_root, split)


def calibration_sample(items: list, size: int, seed: int = 0) -> list:
    """``size`` items drawn without replacement (all of them when there are fewer)."""
    if len(items) <= size:
        return list(items)
    picked = np.random.default_rng(seed).choice(len(items), size, replace=False)
    return [items[i] for i in sorted(picked)]


def dice_of(predict, items: list[tuple[Path, Path]], labels: list[str], ignore_index: int) -> float:
    """Mean Dice of ``predict(image) -> mask`` over (image, mask) file pairs."""
    from segcore.scoring import score_items

    return score_items(predict, items, labels, ignore_index)["mdice"]


def quantize_ir(
    ov_model,
    meta: dict,
    dataset_root: Path,
    subset_size: int = 300,
    preset: str = "mixed",
    max_dice_drop: float | None = None,
    seed: int = 0,
    range_estimator: str = "quantile",
    scope: str = "full",
):
    """Post-training quantization of a segcore IR; with ``max_dice_drop``, accuracy-controlled.
    ``scope``: "full" quantizes the whole network, "head" keeps the backbone in floating point."""
    import nncf

    from segcore.data.dataset import read_rgb

    calibration = nncf.Dataset(
        calibration_sample(_items(dataset_root, "train"), subset_size, seed), lambda item: read_rgb(item[0])[None]
    )
    options = dict(
        preset=_preset(preset),
        subset_size=subset_size,
        ignored_scope=nncf.IgnoredScope(names=ignored_names(ov_model, scope)),
        advanced_parameters=_advanced(range_estimator),
    )
    if max_dice_drop is None:
        return nncf.quantize(ov_model, calibration, **options)

    labels, ignore = meta["labels"], meta["ignore_index"]
    output_index = 0

    def validate(compiled, items):
        def predict(image):
            return compiled(image[None])[output_index][0].argmax(0)

        items = list(items)
        return dice_of(predict, items, labels, ignore), None

    validation = nncf.Dataset(_items(dataset_root, "val"), lambda item: read_rgb(item[0])[None])
    options["advanced_quantization_parameters"] = options.pop("advanced_parameters")
    return nncf.quantize_with_accuracy_control(
        ov_model,
        calibration,
        validation,
        validation_fn=validate,
        max_drop=max_dice_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        **options,
    )


def allow_slow_extension_build() -> None:
    """Give NNCF's one-off extension build ``NNCF_EXTENSION_TIMEOUT_S`` unless the user set a limit."""
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", str(NNCF_EXTENSION_TIMEOUT_S))


def quantization_aware_training(
    bundle: str | Path,
    dataset_root: Path,
    work_dir: Path,
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int | None = None,
    subset_size: int = 300,
    preset: str = "mixed",
    num_workers: int = 2,
    progress: bool = False,
    range_estimator: str = "quantile",
    scope: str = "full",
):
    """Insert NNCF fake-quantizers into a trained segmenter, fine-tune it with the training recipe
    at a low learning rate, and return (quantized torch model with the best weights, its metadata)."""
    allow_slow_extension_build()
    import nncf
    import torch

    from segcore.data.dataset import EvalDataset
    from segcore.inference import TorchPredictor
    from segcore.models.litehrnet import fixed_input_size
    from segcore.training import BEST, TrainConfig, train

    predictor = TorchPredictor(bundle, memory_format="contiguous")  # NNCF's graph is built and tested so
    meta = dict(predictor.meta)
    config = TrainConfig.from_bundle(meta)
    config = replace(
        config,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size or config.batch_size,
        num_workers=num_workers,
        time_budget_min=None,
        early_stop_start_epoch=1,
        device="auto",  # the machine's, not the one the bundle was trained on
        precision="fp32",  # fake-quantizers simulate INT8 on fp32 values
        memory_format="contiguous",  # the order NNCF's fake-quantized graph was built and tested in
        ema_decay=0.0,  # fine-tunes the quantized network itself
        probe_ema_decays=(),
    )
    calibration_set = EvalDataset(dataset_root, "train", config.input_size)
    indices = calibration_sample(list(range(len(calibration_set))), subset_size)
    calibration = nncf.Dataset(indices, lambda i: torch.as_tensor(calibration_set[i][0])[None])
    with fixed_input_size(predictor.model):  # the graph the export will trace (see litehrnet.py)
        log.info("QAT: calibrating fake-quantizers on %d training images", len(indices))
        model = nncf.quantize(
            predictor.model,
            calibration,
            preset=_preset(preset),
            subset_size=len(indices),
            ignored_scope=nncf.IgnoredScope(
                names=[SEGMENTER_RESIZE],
                patterns=[r".*(cross_resolution_weighting|spatial_weighting).*mul.*", QAT_FUSE_ADD]
                + ([QAT_BACKBONE] if scope == "head" else []),
            ),
            advanced_parameters=_advanced(range_estimator),
        )
        log.info("QAT: fine-tuning %d epochs at lr %g", config.epochs, config.lr)
        result = train(config, dataset_root, work_dir, initial_model=model, progress=progress)
        best = torch.load(work_dir / BEST, map_location="cpu", weights_only=True)
        model.to("cpu")  # exported and scored on the CPU
        model.load_state_dict(best["model"])
        model.eval()
    meta["qat"] = {
        "epochs": result["epochs_run"],
        "lr": lr,
        "best_epoch": result["best_epoch"],
        "best_val_mdice_torch": result["best_val_mdice"],
        "calibration_images": len(indices),
    }
    return model, meta


def _check_request(model_path: Path, mode: str | None, max_dice_drop: float | None, output: Path) -> tuple[str, bool]:
    """(mode, whether the source is an IR), or a SegcoreError before any work."""
    from segcore.bundle import BUNDLE_META
    from segcore.inference import is_ir

    source_is_ir = is_ir(model_path) and not (model_path / BUNDLE_META).is_file()
    mode = mode or ("ptq" if source_is_ir else "qat")
    if mode not in ("ptq", "qat"):
        raise SegcoreError(f"unknown mode {mode!r} (choose ptq or qat)")
    if mode == "qat" and source_is_ir:
        raise SegcoreError(
            "quantization-aware training needs a PyTorch bundle (training output), not an IR", model_path
        )
    if max_dice_drop is not None and mode == "qat":
        raise SegcoreError("--max-dice-drop applies to --mode ptq (QAT fine-tunes instead)")
    check_new_output(output)
    return mode, source_is_ir


def _fp32_ir(model_path: Path, source_is_ir: bool, input_size, work: Path):
    """(FP32 ov.Model, its xml, metadata) of an IR, or of a bundle exported into ``work``."""
    if source_is_ir:
        fp32_model, xml = read_ir(model_path)
        return fp32_model, xml, read_meta(fp32_model, xml)
    from segcore.bundle import load_bundle

    model, meta = load_bundle(model_path)
    if input_size:
        meta["input_size"] = list(input_size)
    fp32_model = to_openvino(model, meta)
    return fp32_model, write_ir(fp32_model, work / "fp32"), meta


def _check_fit(meta: dict, template, dataset_root: Path, model_path: Path) -> None:
    from segcore.data.convert import load_manifest

    if meta["template"] != template.id:
        raise SegcoreError(f"is a {meta['template']} model, not {template.id}", model_path)
    labels = load_manifest(dataset_root)["labels"]
    if labels != meta["labels"]:
        raise SegcoreError(f"labels {labels} differ from the model's {meta['labels']}", dataset_root)


def _latency(xml: Path, items: list[tuple[Path, Path]]) -> float:
    from segcore.data.dataset import read_rgb
    from segcore.inference import OpenVINOPredictor
    from segcore.scoring import measure_latency

    return measure_latency(OpenVINOPredictor(xml).predict, [read_rgb(image) for image, _ in items[:8]])


def _publish(folder: Path, output: Path) -> None:
    """Copy the finished IR folder to ``output`` under a temporary name, then rename it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        output.rmdir()
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.copytree(folder, staging)
    staging.rename(output)


def optimize(
    model_path: str | Path,
    template: str,
    dataset_root: str | Path,
    output: str | Path,
    mode: str | None = None,
    max_dice_drop: float | None = None,
    subset_size: int = 300,
    preset: str = "mixed",
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int | None = None,
    input_size: tuple[int, int] | None = None,
    num_workers: int = 2,
    progress: bool = False,
    range_estimator: str = "quantile",
    scope: str = "full",
) -> dict:
    """Quantize MODEL (an IR: PTQ; a bundle: QAT, or PTQ of its FP32 export) -> OUTPUT/model.xml + report.json."""
    from segcore.inference import OpenVINOPredictor
    from segcore.models import get_template

    started = time.perf_counter()
    _quiet_nncf()
    template = get_template(template)
    model_path, output, dataset_root = Path(model_path), Path(output), Path(dataset_root)
    mode, source_is_ir = _check_request(model_path, mode, max_dice_drop, output)
    if scope not in SCOPES:
        raise SegcoreError(f"unknown scope {scope!r} (choose {', '.join(SCOPES)})")
    with tempfile.TemporaryDirectory(prefix="segcore-optimize-") as tmp:
        tmp = Path(tmp)
        fp32_model, xml, meta = _fp32_ir(model_path, source_is_ir, input_size, tmp)
        _check_fit(meta, template, dataset_root, model_path)
        val_items, calibration = _items(dataset_root, "val"), min(subset_size, len(_items(dataset_root, "train")))
        dice_before = dice_of(OpenVINOPredictor(xml).predict, val_items, meta["labels"], meta["ignore_index"])
        log.info("FP32 IR: val mean Dice %.4f", dice_before)
        if mode == "ptq":
            log.info("PTQ: %d calibration images, preset %s", calibration, preset)
            int8_model = quantize_ir(
                fp32_model, meta, dataset_root, subset_size, preset, max_dice_drop, range_estimator=range_estimator,
                scope=scope,
            )  # fmt: skip
            meta["ptq"] = {"calibration_images": subset_size, "preset": preset, "max_dice_drop": max_dice_drop}
        else:
            qat_model, meta = quantization_aware_training(
                model_path, dataset_root, tmp / "qat", epochs=epochs, lr=lr, batch_size=batch_size,
                subset_size=subset_size, preset=preset, num_workers=num_workers, progress=progress,
                range_estimator=range_estimator, scope=scope,
            )  # fmt: skip
            if input_size:
                meta["input_size"] = list(input_size)
            int8_model = to_openvino(qat_model, meta)
        meta.update(precision="INT8", quantization=mode)
        set_model_info(int8_model, meta)
        int8_xml = write_ir(int8_model, tmp / "int8")
        dice_after = dice_of(OpenVINOPredictor(int8_xml).predict, val_items, meta["labels"], meta["ignore_index"])
        log.info("INT8 IR: val mean Dice %.4f (FP32 %.4f)", dice_after, dice_before)
        report = {
            "mode": mode, "template": template.id, "source": str(model_path),
            "input_size": list(meta["input_size"]), "preset": preset, "range_estimator": range_estimator,
            "calibration_images": calibration, "max_dice_drop": max_dice_drop, "val_images": len(val_items),
            "val_mdice_fp32": dice_before, "val_mdice_int8": dice_after, "dice_drop": dice_before - dice_after,
            "fp32_ir_bytes": ir_size(xml), "int8_ir_bytes": ir_size(int8_xml),
            "fake_quantize_ops": count_ops(int8_model, "FakeQuantize")["FakeQuantize"],
            "scope": scope, "quantized_layers": quantized_layers(int8_model),
            "layers": count_ops(fp32_model, "Convolution", "GroupConvolution", "MatMul"),
            "latency_ms_fp32": _latency(xml, val_items), "latency_ms_int8": _latency(int8_xml, val_items),
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        if mode == "qat":
            report["qat"] = meta["qat"]
        (int8_xml.parent / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _publish(int8_xml.parent, output)
    report["ir"] = str(output / "model.xml")
    return report
