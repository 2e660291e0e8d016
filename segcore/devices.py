"""Where a training or a PyTorch evaluation runs, and in which precision.

``--device auto|cpu|cuda|cuda:N``: ``auto`` is the first CUDA device when torch sees one, else the
CPU. Asking for CUDA where there is none (a CPU build of torch, a node without a driver) is an
error at once, not hours of training on the CPU.

``--precision auto|fp32|bf16|fp16`` (mixed precision through ``torch.autocast``; the loss, the
softmax and the metrics stay in fp32): ``auto`` is bf16 where the hardware computes it natively
(a CUDA device with bf16; a CPU with AVX512-BF16 or AMX), fp16 with a gradient scaler on a CUDA
device without bf16, and fp32 elsewhere. fp16 needs CUDA.

``--memory-format auto|channels_last|contiguous``: the order of the network's weights and
activations in memory during training. ``auto`` is channels-last (NHWC) on the CPU, where oneDNN's
depthwise and 1x1 convolutions run it natively and Lite-HRNet-18 trains about 1.3x faster than in
the contiguous (NCHW) order (docs/benchmarks.md), and contiguous on CUDA, where it was not measured.
The values computed are the same up to rounding; bundles do not depend on it.

``SEGCORE_MMAP_THRESHOLD_MB=N`` (opt-in) makes a training on the CPU ask glibc to serve
allocations of N MiB or more from fresh mappings that go back to the system when freed
(``mallopt(M_MMAP_THRESHOLD)``, ``limit_heap_retention``), instead of keeping freed activation
memory in its heap, where it counts as the process's memory. It trades speed for memory: for
Lite-HRNet-18 at 512x512, batch 8, bf16, 4 MiB gave 3.11-3.12 GB instead of 3.22-3.26 GB but
4-19% less speed, and in fp32 45% less speed, from the page faults of fresh mappings
(docs/benchmarks.md). By default glibc's own rule stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from pathlib import Path

import torch

from segcore.errors import SegcoreError

DEVICES = "auto|cpu|cuda|cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h

log = logging.getLogger(__name__)


def megabytes_from_env(name: str, default: float, zero_means: str) -> float:
    """A size in MiB from environment variable ``name`` (``default`` when unset or empty)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SegcoreError(f"{name}={raw!r}: give a number of MiB ({zero_means})") from None


def limit_heap_retention() -> int:
    """Set glibc's mmap threshold to ``SEGCORE_MMAP_THRESHOLD_MB`` MiB when that is set, so that
    freed large blocks go back to the system instead of staying in the heap; the threshold set in
    bytes, or 0 when nothing was set (unset or 0, another C library, or glibc refused)."""
    megabytes = megabytes_from_env("SEGCORE_MMAP_THRESHOLD_MB", 0.0, "0: glibc's default")
    if megabytes <= 0 or not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return 0
    threshold = int(megabytes * 1024 * 1024)
    if not mallopt(_M_MMAP_THRESHOLD, threshold):  # glibc caps it at 32 MiB on 64-bit systems
        log.warning("glibc refused an mmap threshold of %g MiB; its default stays", megabytes)
        return 0
    return threshold


def resolve_device(spec: str | None = "auto") -> torch.device:
    """The torch device of a ``--device`` value (SegcoreError for CUDA where there is none)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise SegcoreError(f"--device {spec!r}: expected {DEVICES}")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise SegcoreError(f"--device {spec}: CUDA asked for, but {why} (torch {torch.__version__})")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SegcoreError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def resolve_precision(spec: str | None, device: torch.device) -> str:
    """fp32, bf16 or fp16 for a ``--precision`` value on ``device``."""
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise SegcoreError(f"--precision {spec!r}: expected one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if spec == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if spec == "fp16" and not cuda:
        raise SegcoreError("--precision fp16 needs a CUDA device (use bf16 or fp32 on a CPU)")
    if spec == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise SegcoreError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")
    return spec


def resolve_memory_format(spec: str | None, device: torch.device) -> str:
    """channels_last or contiguous for a ``--memory-format`` value on ``device``."""
    spec = (spec or "auto").strip().lower().replace("-", "_")
    if spec == "auto":
        return "channels_last" if device.type == "cpu" else "contiguous"
    if spec not in MEMORY_FORMATS:
        raise SegcoreError(f"--memory-format {spec!r}: expected auto, {' or '.join(MEMORY_FORMATS)}")
    return spec


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in fp32 when autocast made it bf16 or fp16 (fp32 and fp64 pass unchanged): the
    loss, the softmax and batch-norm statistics are computed in at least fp32."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


def autocast(device: torch.device, precision: str):
    """The forward pass's mixed-precision context (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (disabled, a pass-through, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
