"""The MLflow pyfunc of a segcore model bundle, logged as a "model from code" (no pickle).

``segcore.tracking`` logs this file with the bundle (``model.json`` + ``best.pt``) as the
artifact ``bundle``; MLflow runs it when the model is loaded, and prediction goes through
``segcore.inference.TorchPredictor``: the weights are read with ``torch.load(weights_only=True)``
and each image gets the preprocessing and the resize back to its own size that ``segcore predict``
applies.

Input: uint8 RGB images as one array N x H x W x 3. Output: uint8 index masks N x H x W.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SegcoreBundleModel(PythonModel):
    def load_context(self, context) -> None:
        from segcore.inference import TorchPredictor

        self.predictor = TorchPredictor(context.artifacts["bundle"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        if isinstance(model_input, dict):  # a named tensor input
            model_input = next(iter(model_input.values()))
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images N x H x W x 3, got shape {images.shape}")
        images = images.astype(np.uint8, copy=False)
        return np.stack([self.predictor.predict(np.ascontiguousarray(image)) for image in images])


mlflow.models.set_model(SegcoreBundleModel())
