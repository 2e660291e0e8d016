"""Image sizes as users write them: 'HxW', or one number for a square."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' (or a single number for a square) -> (height, width); usable as an argparse type."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 360x480, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"size must be HxW with sides >= 8, got {text!r}")
    return parts[0], parts[1]
