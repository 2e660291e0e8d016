"""Lite-HRNet segmentation models: templates, model factory, weights and complexity.

Importing this package pulls in torch only (no MLflow, boto3 or kfp).
"""

from segcore.models.complexity import complexity
from segcore.models.segmenter import INIT_SCHEMES, Segmenter, create_model, init_weights
from segcore.models.templates import TEMPLATES, Template, get_template
from segcore.models.weights import load_backbone_weights

__all__ = [
    "INIT_SCHEMES",
    "TEMPLATES",
    "Segmenter",
    "Template",
    "complexity",
    "create_model",
    "get_template",
    "init_weights",
    "load_backbone_weights",
]
