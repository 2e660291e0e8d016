"""Datasets: reading user formats (Datumaro and the plain layout), the canonical dataset."""

from segcore.data.convert import MANIFEST, convert, load_manifest
from segcore.data.meta import LabelSpec
from segcore.data.sources import SUPPORTED_FORMATS, detect_format, open_dataset

__all__ = [
    "MANIFEST",
    "SUPPORTED_FORMATS",
    "LabelSpec",
    "convert",
    "detect_format",
    "load_manifest",
    "open_dataset",
]
