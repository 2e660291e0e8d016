"""OpenVINO IR export: a self-contained graph from raw image to class probabilities.

The IR takes one uint8 RGB image in NHWC layout (batch 1) with dynamic height and width (what any
image decoder gives) and does the rest inside the graph: bilinear resize to the network input size the
model was trained for, ImageNet normalisation, the segmenter, bilinear resize of the logits back to
the image's own size, and softmax. So an application, or OpenVINO's Model API, needs no segcore
code: argmax over the channel axis of the output is the mask at the image's size.

The ``model_info`` section of the IR's rt_info carries what the Model API reads (model type,
labels, embedded processing, layout, resize type, mean/scale values for information) plus
``segcore_meta``, a JSON string with everything segcore needs to evaluate or re-quantize the IR.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segcore.errors import SegcoreError
from segcore.models.litehrnet import fixed_input_size

log = logging.getLogger(__name__)

IR_NAME = "model.xml"
META_KEY = "segcore_meta"
PRECISIONS = ("FP32", "FP16")


class RawImageModel(nn.Module):
    """uint8 N x H x W x 3 RGB -> float N x C x H x W class probabilities (any H, W)."""

    def __init__(self, model: nn.Module, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[1], images.shape[2]
        x = images.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.model(x, size=(height, width)).softmax(1)


def model_info(meta: dict) -> dict[str, str]:
    """The rt_info ``model_info`` entries for a bundle's metadata (Model API parameter names)."""
    height, width = meta["input_size"]
    return {
        "model_type": "Segmentation",
        # Model API splits labels on spaces; names keep theirs in segcore_meta.
        "labels": " ".join(name.replace(" ", "_") for name in meta["labels"]),
        "embedded_processing": "True",  # resize + normalisation are in the graph
        "orig_height": str(height),
        "orig_width": str(width),
        "input_dtype": "u8",
        "layout": "NHWC",
        "reverse_input_channels": "False",  # the graph expects RGB
        "mean_values": " ".join(f"{v:g}" for v in meta["mean"]),
        "scale_values": " ".join(f"{v:g}" for v in meta["std"]),
        "resize_type": "standard",
        "pad_value": "0",
        # The output is already at the image's size; plain argmax, no thresholding: class 0 is a
        # real class in segcore (there is no implicit background to fall back to).
        "blur_strength": "-1",
        "soft_threshold": "0.0",
        "return_soft_prediction": "True",
        "ignore_index": str(meta["ignore_index"]),
        META_KEY: json.dumps(meta),
    }


def to_openvino(model: nn.Module, meta: dict, example_size: tuple[int, int] | None = None):
    """Convert a segmenter (normalised NCHW in, logits out) to an ov.Model with the raw-image interface."""
    import openvino as ov

    wrapped = RawImageModel(model, meta["input_size"], meta["mean"], meta["std"]).eval()
    h, w = example_size or tuple(meta["input_size"])
    example = torch.zeros(1, h, w, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings(), fixed_input_size(model):
        # Tracing warns about shape-dependent Python values (the dynamic resize) and, for
        # fake-quantized models, about tiny trace-check differences; neither affects the IR.
        warnings.simplefilter("ignore")
        # Batch 1, height and width dynamic. A dynamic batch too would leave every tensor of the
        # network dynamic (not only the resizes at either end), and the CPU plugin then runs it
        # without its static-shape layout and fusion passes: 2x slower for INT8 on CamVid.
        # Traced here without torch's trace check (a second trace and a comparison run; a third of
        # the conversion time, half for fake-quantized models): the IR is the same.
        traced = torch.jit.trace(wrapped, example, check_trace=False, strict=False)
        ov_model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([1, -1, -1, 3])])
    ov_model.inputs[0].get_node().set_layout(ov.Layout("NHWC"))
    ov_model.inputs[0].get_tensor().set_names({"image"})
    ov_model.outputs[0].get_tensor().set_names({"probabilities"})
    set_model_info(ov_model, meta)
    return ov_model


def set_model_info(ov_model, meta: dict) -> None:
    for key, value in model_info(meta).items():
        ov_model.set_rt_info(value, ["model_info", key])


def read_meta(ov_model, path: Path) -> dict:
    """The segcore metadata embedded in an IR, or a SegcoreError naming the file."""
    if not ov_model.has_rt_info(["model_info", META_KEY]):
        model_type = (
            ov_model.get_rt_info(["model_info", "model_type"]).astype(str)
            if ov_model.has_rt_info(["model_info", "model_type"])
            else "unknown"
        )
        raise SegcoreError(
            f"not a segcore segmentation IR (model_info has no {META_KEY}; model type: {model_type})", path
        )
    try:
        return json.loads(ov_model.get_rt_info(["model_info", META_KEY]).astype(str))
    except json.JSONDecodeError as exc:
        raise SegcoreError(f"corrupt {META_KEY} in the IR ({exc})", path) from None


def read_ir(path: str | Path):
    """Read an IR (the .xml, or a folder holding model.xml) -> (ov.Model, xml path); clear errors."""
    import openvino as ov

    path = Path(path)
    xml = path / IR_NAME if path.is_dir() else path
    if not xml.is_file():
        raise SegcoreError("no such IR (expected an .xml file or a folder with model.xml)", xml)
    if not xml.with_suffix(".bin").is_file():
        raise SegcoreError(f"the IR's weights file {xml.with_suffix('.bin').name} is missing beside it", xml)
    try:
        return ov.Core().read_model(xml), xml
    except RuntimeError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "unreadable")
        raise SegcoreError(f"OpenVINO cannot read this IR ({first.strip()[:200]})", xml) from None


def check_new_output(output: Path) -> None:
    """Outputs go to new (or empty) folders: refuse before any work is done."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise SegcoreError("exists and is not empty; choose a new --output", output)


def write_ir(ov_model, output: str | Path, precision: str = "FP32", extra_files: dict[str, dict] | None = None) -> Path:
    """Save ``ov_model`` as OUTPUT/model.xml + .bin (plus JSON side files) atomically; return the xml path."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise SegcoreError(f"unknown precision {precision!r} (choose {', '.join(PRECISIONS)})")
    output = Path(output)
    check_new_output(output)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        ov.save_model(ov_model, staging / IR_NAME, compress_to_fp16=precision == "FP16")
        for name, content in (extra_files or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output / IR_NAME


def ir_size(xml: Path) -> int:
    """Bytes of an IR on disk (.xml + .bin)."""
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def export_bundle(
    bundle: str | Path, output: str | Path, precision: str = "FP32", input_size: tuple[int, int] | None = None
) -> dict:
    """Export a trained bundle to OUTPUT/model.xml; return a small report."""
    from segcore.bundle import load_bundle

    check_new_output(Path(output))
    model, meta = load_bundle(bundle)
    if input_size:
        meta["input_size"] = list(input_size)
    meta["precision"] = precision
    meta["source_bundle"] = str(Path(bundle).resolve())
    ov_model = to_openvino(model, meta)
    report = {
        "template": meta["template"],
        "precision": precision,
        "input_size": meta["input_size"],
        "labels": meta["labels"],
        "source": str(bundle),
    }
    xml = write_ir(ov_model, output, precision, {"export.json": report})
    report["ir"] = str(xml)
    report["ir_bytes"] = ir_size(xml)
    return report
