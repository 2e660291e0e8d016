"""segcore: semantic segmentation from user data to a quantized OpenVINO model."""

from segcore.errors import SegcoreError

__version__ = "0.1.0"
__all__ = ["SegcoreError", "__version__"]
