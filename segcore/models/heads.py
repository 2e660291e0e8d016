"""Decode side of the Lite-HRNet segmenters: the iterative aggregator and the FCN head.

Attribute names follow OTX/mmseg (``aggregator.projects.0.depthwise_conv.conv.weight``,
``convs.0.bn.weight``, ``conv_seg.weight``) so checkpoints map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcore.models.litehrnet import ConvBNAct

__all__ = ["DepthwiseSeparableConv", "FCNHead", "IterativeAggregator"]


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 conv + BN, then pointwise 1x1 conv + BN + ReLU (mmcv layout)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNAct(in_channels, in_channels, 3, groups=in_channels, act=None)
        self.pointwise_conv = ConvBNAct(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class IterativeAggregator(nn.Module):
    """Merge all branches into the highest-resolution one, from the lowest resolution up.

    Starting at the lowest-resolution branch: upsample the running result bilinearly
    (``align_corners=True``, as in OTX) to the next branch's size, add that branch, and apply a
    depthwise-separable conv that maps to the channels of the branch after it. Branches narrower
    than ``min_channels`` are first widened by a 1x1 conv + BN + ReLU (OTX ``aggregator_min_channels``).
    OTX's optional merge normalisation and concatenation are off in every template and not built.

    Args:
        in_channels: channels of the inputs, highest resolution first.
        min_channels: lower bound on the channels the aggregator works with.
    """

    def __init__(self, in_channels: Sequence[int], min_channels: int = 0) -> None:
        super().__init__()
        widths = [max(c, min_channels) for c in reversed(in_channels)]  # lowest resolution first
        self.out_channels = widths[-1]
        self.projects = nn.ModuleList(
            DepthwiseSeparableConv(w, widths[min(i + 1, len(widths) - 1)]) for i, w in enumerate(widths)
        )
        self.expanders = nn.ModuleList(
            ConvBNAct(c, min_channels, 1) if c < min_channels else nn.Identity() for c in reversed(in_channels)
        )

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        y: torch.Tensor | None = None
        for x, expand, project in zip(reversed(xs), self.expanders, self.projects, strict=True):
            x = expand(x)
            if y is not None:
                x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
            y = project(x)
        assert y is not None
        return y


class FCNHead(nn.Module):
    """FCN head with optional iterative aggregation (OTX ``FCNHead`` with ``enable_aggregator``).

    Aggregator (if any), one 1x1 conv + BN, a 1x1 classifier. As in OTX, the conv's ReLU is
    removed, there is no dropout and the input is not concatenated. The output has the
    resolution of the first (highest-resolution) input.

    Args:
        in_channels: channels of the backbone outputs, highest resolution first. Without the
            aggregator only the first is used.
        channels: width of the conv before the classifier.
        num_classes: output classes.
        aggregate: build the iterative aggregator over all inputs.
        aggregator_min_channels: see ``IterativeAggregator``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        aggregate: bool = True,
        aggregator_min_channels: int = 0,
    ) -> None:
        super().__init__()
        if aggregate:
            self.aggregator: nn.Module | None = IterativeAggregator(in_channels, aggregator_min_channels)
            feature_channels = self.aggregator.out_channels
        else:
            self.aggregator = None
            feature_channels = in_channels[0]
        self.convs = nn.Sequential(ConvBNAct(feature_channels, channels, 1, act=None))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.aggregator(xs) if self.aggregator is not None else xs[0]
        return self.conv_seg(self.convs(x))
