"""Loading a trained model bundle and applying it to images at their original size."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from segcore.data.transforms import eval_preprocess
from segcore.errors import SegcoreError


class TorchPredictor:
    """A model bundle (training output folder) in PyTorch eager mode."""

    def __init__(self, bundle: str | Path):
        from segcore.models import create_model, get_template
        from segcore.training import BUNDLE_META

        self.path = Path(bundle)
        meta_path = self.path / BUNDLE_META
        if not meta_path.is_file():
            if (self.path / "last.pt").is_file():
                raise SegcoreError("training has not finished here (no model.json); resume it first", self.path)
            raise SegcoreError("not a segcore model bundle (no model.json)", self.path)
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SegcoreError(f"unreadable bundle metadata ({exc})", meta_path) from None
        weights = self.path / self.meta["weights"]
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise SegcoreError(f"cannot load weights ({' '.join(str(exc).split())[:200]})", weights) from None
        self.labels = list(self.meta["labels"])
        self.input_size = tuple(self.meta["input_size"])
        self.model = create_model(get_template(self.meta["template"]), len(self.labels))
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise SegcoreError(f"weights do not fit {self.meta['template']} ({str(exc)[:160]})", weights) from None
        self.model.eval()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """N,3,H,W normalised input -> N,C,H,W logits."""
        return self.model(images)

    __call__ = logits

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB image -> uint8 index mask of the same height and width."""
        x = torch.from_numpy(eval_preprocess(image, self.input_size))[None]
        logit = self.logits(x)
        logit = torch.nn.functional.interpolate(logit, size=image.shape[:2], mode="bilinear", align_corners=False)
        return logit[0].argmax(0).to(torch.uint8).numpy()


def load_predictor(path: str | Path) -> TorchPredictor:
    return TorchPredictor(path)


def overlay(image: np.ndarray, mask: np.ndarray, colors: list, alpha: float = 0.5) -> np.ndarray:
    """Blend the label colours over the image (RGB)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = np.array(colors, dtype=np.uint8)
    painted = palette[mask]
    return cv2.addWeighted(image, 1 - alpha, painted, alpha, 0)
