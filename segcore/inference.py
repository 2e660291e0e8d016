"""Applying a model to images at their original size: a PyTorch bundle or an OpenVINO IR."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from segcore.data.transforms import eval_preprocess
from segcore.errors import SegcoreError
from segcore.metrics import class_map


class TorchPredictor:
    """A model bundle (training output folder) in PyTorch eager mode.

    ``memory_format`` (segcore.devices.resolve_memory_format; auto: channels-last on the CPU) is the
    order the network runs in; a training validates in its own, so with both on auto ``segcore
    eval`` gives a bundle exactly the Dice its training recorded."""

    def __init__(self, bundle: str | Path, device: str | None = "cpu", memory_format: str = "auto"):
        from segcore.bundle import load_bundle
        from segcore.devices import MEMORY_FORMATS, resolve_device, resolve_memory_format

        self.path = Path(bundle)
        self.device = resolve_device(device)
        self.memory_format = MEMORY_FORMATS[resolve_memory_format(memory_format, self.device)]
        self.model, self.meta = load_bundle(self.path)
        self.model.to(self.device, memory_format=self.memory_format)
        self.labels = list(self.meta["labels"])
        self.input_size = tuple(self.meta["input_size"])

    @torch.no_grad()
    def logits(self, images: torch.Tensor, size=None) -> torch.Tensor:
        """N,3,H,W normalised input (on the CPU) -> N,C,H,W fp32 logits on the CPU (resized to
        ``size`` when given)."""
        return self.model(images.to(self.device, memory_format=self.memory_format), size=size).float().cpu()

    __call__ = logits

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB image -> uint8 index mask of the same height and width."""
        x = torch.from_numpy(eval_preprocess(image, self.input_size))[None]
        logits = self.model(x.to(self.device, memory_format=self.memory_format), size=image.shape[:2])
        return class_map(logits[0], 0).to(torch.uint8).cpu().numpy()  # taken on the device


class OpenVINOPredictor:
    """An IR written by ``segcore export`` / ``optimize`` (raw uint8 image in, probabilities out)."""

    def __init__(self, path: str | Path, device: str = "CPU", config: dict | None = None):
        import openvino as ov

        from segcore.export import read_ir, read_meta

        ov_model, self.path = read_ir(path)
        self.meta = read_meta(ov_model, self.path)
        self.labels = list(self.meta["labels"])
        self.input_size = tuple(self.meta["input_size"])
        config = {"PERFORMANCE_HINT": "LATENCY", **(config or {})}
        try:
            self.compiled = ov.Core().compile_model(ov_model, device, config)
        except RuntimeError as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), "failed")
            raise SegcoreError(
                f"OpenVINO cannot compile this IR for {device} ({first.strip()[:200]})", self.path
            ) from None
        self.request = self.compiled.create_infer_request()

    @property
    def inference_precision(self) -> str:
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return value.to_string() if hasattr(value, "to_string") else str(value)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB image -> C x H x W class probabilities."""
        result = self.request.infer({0: np.ascontiguousarray(image)[None]})
        return result[self.compiled.output(0)][0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.probabilities(image).argmax(0).astype(np.uint8)


def is_ir(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".xml" or (path.is_dir() and (path / "model.xml").is_file())


def load_predictor(path: str | Path, device: str | None = None, **ov_options) -> TorchPredictor | OpenVINOPredictor:
    """A PyTorch bundle folder (model.json) or an OpenVINO IR (.xml or a folder with model.xml).
    ``device`` (auto|cpu|cuda|cuda:N, default cpu) places a bundle; an IR runs on OpenVINO's CPU."""
    from segcore.bundle import BUNDLE_META

    path = Path(path)
    if is_ir(path) and not (path / BUNDLE_META).is_file():
        if device not in (None, "cpu", "auto"):
            raise SegcoreError(f"--device {device} applies to PyTorch bundles; an IR runs on OpenVINO's CPU", path)
        return OpenVINOPredictor(path, **ov_options)
    return TorchPredictor(path, device or "cpu")


def overlay(image: np.ndarray, mask: np.ndarray, colors: list, alpha: float = 0.5) -> np.ndarray:
    """Blend the label colours over the image (RGB)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = np.array(colors, dtype=np.uint8)
    painted = palette[mask]
    return cv2.addWeighted(image, 1 - alpha, painted, alpha, 0)
