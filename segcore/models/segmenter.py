"""Backbone + head, built from a template."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcore.models.heads import FCNHead, IterativeAggregator
from segcore.models.litehrnet import ConvBNAct, LiteHRNet
from segcore.models.templates import Template, get_template

__all__ = ["INIT_SCHEMES", "Segmenter", "create_model", "init_weights"]


class Segmenter(nn.Module):
    """A backbone and a decode head; logits are resized (bilinear) to the input size.

    ``forward`` takes N x 3 x H x W normalised images and returns N x C x H x W logits.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits resized (bilinear) straight from the head's resolution to ``size`` (default: x's).

        Inference at an image's own size passes that size: one resize instead of two. (An
        argument of ``forward``, not a separate method, so NNCF's quantizer hooks run.)
        """
        logits = self.decode_head(self.backbone(x))
        if not torch.jit.is_tracing():
            # Channels-last training: full-size logits in channels-last order make the loss's
            # softmax over the 11-odd classes 3-6x slower; the copy here is at the head's 1/16 size
            logits = logits.contiguous()
        size = tuple(x.shape[-2:]) if size is None else size
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def create_model(template: str | Template, num_classes: int) -> Segmenter:
    """Build the Lite-HRNet segmenter of ``template`` (ID, name or record) for ``num_classes``."""
    template = get_template(template)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    bb, head = template.backbone, template.head
    aggregator = None
    if head.aggregator_in_backbone:
        aggregator = IterativeAggregator(bb.channels, head.aggregator_min_channels)
    backbone = LiteHRNet(
        stem_channels=bb.stem_channels,
        stem_strides=bb.stem_strides,
        extra_stride=bb.extra_stride,
        num_modules=bb.num_modules,
        num_branches=bb.num_branches,
        num_blocks=bb.num_blocks,
        reduce_ratios=bb.reduce_ratios,
        channels=bb.channels,
        aggregator=aggregator,
    )
    decode_head = FCNHead(
        in_channels=[aggregator.out_channels] if aggregator is not None else bb.channels,
        channels=head.channels,
        num_classes=num_classes,
        aggregate=aggregator is None,
        aggregator_min_channels=head.aggregator_min_channels,
    )
    return Segmenter(backbone, decode_head)


INIT_SCHEMES = ("torch", "kaiming", "otx")


def init_weights(model: Segmenter, scheme: str) -> Segmenter:
    """Re-initialise ``model`` in place for training from scratch.

    ``torch`` keeps PyTorch's layer defaults. ``kaiming`` draws every convolution from a normal
    distribution scaled by its fan-out for ReLU (He et al. 2015; what mmcv's ``ConvModule`` does,
    on which OTX builds most of Lite-HRNet) with zero biases, and batch norms at weight 1, bias 0;
    the classifier (``conv_seg``) keeps its own N(0, 0.01) start. ``otx`` is what OTX 2.6's
    Lite-HRNet gets: the kaiming draw only for the convolutions that OTX builds as ``ConvModule``
    (segcore's ``ConvBNAct``: stem, weighting, block and head convolutions), PyTorch's defaults for
    the plain convolutions of the transition and fuse layers and for the classifier.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if scheme == "torch":
        return model
    if scheme == "otx":
        for module in model.modules():
            if isinstance(module, ConvBNAct):
                nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
                if module.conv.bias is not None:
                    nn.init.zeros_(module.conv.bias)
        model.decode_head.conv_seg.reset_parameters()
        return model
    classifier = getattr(model.decode_head, "conv_seg", None)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module is not classifier:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
