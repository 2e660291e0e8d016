"""Lite-HRNet backbone (Yu et al., CVPR 2021) as used by OpenVINO Training Extensions.

The network keeps several resolutions alive in parallel branches. A ShuffleNet-style stem
reduces the input; each stage adds one lower-resolution branch (a *transition*) and stacks
*modules*; a module runs LITE blocks over all branches and then *fuses* the branches.

Module attribute names follow the OTX/mmseg layout (``stem.conv1.conv.weight``,
``stage0.0.layers.0.cross_resolution_weighting.conv1.bn.running_mean``,
``stage1.2.fuse_layers.1.0.0.0.weight``, ...) so that public checkpoints of the same
architecture load with nothing but a prefix change.

Export notes: every resize takes its target size from a tensor's shape at run time and no
branch of the Python code depends on a tensor's shape, so tracing (TorchScript, ``torch.export``,
``openvino.convert_model``) records a graph that stays valid for other input sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvBNAct",
    "CrossResolutionWeighting",
    "LiteBlock",
    "LiteHRModule",
    "LiteHRNet",
    "SpatialWeighting",
    "Stem",
    "channel_shuffle",
    "concat_shuffle",
]


def _tracing() -> bool:
    """Whether this forward pass is being traced or exported (a graph for any input and layout)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (ShuffleNet), keeping ``x``'s memory format.

    A channels-last tensor (channels innermost in memory: what a training in channels-last order
    passes, see ``segcore.devices.resolve_memory_format``) is shuffled within each pixel's channels
    and stays channels-last; the plain version would hand the following layers a contiguous (NCHW)
    tensor, and every operation mixing the two orders copies. Contiguous tensors, and every trace
    or export (whatever the strides of its example), take the plain path, which OpenVINO reads as
    one ShuffleChannels."""
    if not _tracing() and x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1:  # channels innermost
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).unflatten(3, (groups, -1)).transpose(3, 4).reshape(n, h, w, c)
        return pixels.permute(0, 3, 1, 2)
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def concat_shuffle(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``channel_shuffle(torch.cat((first, second), dim=1), 2)``: the channels of two equal halves,
    interleaved. Channels-last halves are interleaved in one copy (a stack on a new innermost
    dimension) instead of a concatenation and a shuffle copy, which takes about half the time
    forward and backward (``benchmarks/train_kernels.py``); the result is
    channels-last. Contiguous halves, traces and exports take the plain concat and shuffle."""
    if not _tracing() and first.dim() == 4 and first.shape == second.shape and first.stride(1) == second.stride(1) == 1:
        n, c, h, w = first.shape
        pixels = torch.stack((first.permute(0, 2, 3, 1), second.permute(0, 2, 3, 1)), dim=4)
        return pixels.view(n, h, w, 2 * c).permute(0, 3, 1, 2)
    return channel_shuffle(torch.cat((first, second), dim=1), 2)


def _bf16_autocast_on_cpu(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (same parameters, same function). In a bf16 training on the CPU,
    a strided one on inputs of up to 128x128 pixels computes its input's gradient in fp32 and
    rounds it to bf16: oneDNN's bf16 kernel for the backward data pass of a strided depthwise
    convolution was 3.5-12x slower than this at those sizes here (``benchmarks/train_kernels.py``);
    at 256x256 the fp32 detour (two conversions of a large tensor) was 2x slower, so larger inputs
    keep the bf16 kernel. Everything else stays bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.shape[-2] * x.shape[-1] <= 128 * 128
        plain = self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str)
        simple = plain or self.stride == (1, 1) or not small or not torch.is_grad_enabled() or _tracing()
        if simple or not _bf16_autocast_on_cpu(x):
            return super().forward(x)
        weight = self.weight.to(torch.bfloat16)  # the cast autocast would make
        out = _StridedDepthwise.apply(x.to(torch.bfloat16), weight, self.stride, self.padding, self.groups)
        return out if self.bias is None else out + self.bias.to(out.dtype).view(1, -1, 1, 1)


class _StridedDepthwise(torch.autograd.Function):
    """bf16 convolution forward; backward: the input's gradient from an fp32 pass, the weights'
    from the bf16 kernel (which is fast)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, groups):
        ctx.save_for_backward(x, weight)
        ctx.config = (stride, padding, groups)
        return F.conv2d(x, weight, None, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, groups = ctx.config
        conv_backward = torch.ops.aten.convolution_backward
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_backward(
                grad.float(), x.float(), weight.float(), None, stride, padding, (1, 1), False, (0, 0), groups,
                (True, False, False),
            )[0].to(x.dtype)  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_w = conv_backward(
                grad, x, weight, None, stride, padding, (1, 1), False, (0, 0), groups, (False, True, False)
            )[1]
        return grad_x, grad_w, None, None, None


class ConvBNAct(nn.Sequential):
    """Conv2d, optional BatchNorm, optional activation (mmcv ``ConvModule`` layout).

    The convolution has a bias only when there is no BatchNorm after it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        super().__init__()
        depthwise = groups > 1 and groups == in_channels == out_channels
        self.conv = (DepthwiseConv2d if depthwise else nn.Conv2d)(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=not norm,
        )
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)
        if act is not None:  # ReLU in place: what follows a conv or BN needs no copy of its output
            self.act = act(inplace=True) if act is nn.ReLU else act()


def _dw_pw(in_channels: int, out_channels: int, stride: int, relu: bool) -> nn.Sequential:
    """Depthwise 3x3 + BN, pointwise 1x1 + BN (+ ReLU): the transition and fuse building block."""
    layers: list[nn.Module] = [
        DepthwiseConv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """ShuffleNet-style stem: strided 3x3 conv(s), then a two-branch shuffle unit.

    ``strides[0]`` is the stride of the first conv and ``strides[1]`` that of the shuffle unit's
    depthwise convs; ``extra_stride`` adds a second strided 3x3 conv (Lite-HRNet-s).
    """

    def __init__(
        self,
        in_channels: int,
        stem_channels: int,
        out_channels: int,
        expand_ratio: float = 1.0,
        strides: tuple[int, int] = (2, 2),
        extra_stride: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = ConvBNAct(in_channels, stem_channels, 3, stride=strides[0])
        self.conv2 = ConvBNAct(stem_channels, stem_channels, 3, stride=2) if extra_stride else nn.Identity()

        mid_channels = round(stem_channels * expand_ratio)
        branch_channels = stem_channels // 2
        if stem_channels == out_channels:
            inc_channels = out_channels - branch_channels
            linear_channels = branch_channels
        else:
            inc_channels = out_channels - stem_channels
            linear_channels = stem_channels

        self.branch1 = nn.Sequential(
            ConvBNAct(branch_channels, branch_channels, 3, strides[1], groups=branch_channels, act=None),
            ConvBNAct(branch_channels, inc_channels, 1),
        )
        self.expand_conv = ConvBNAct(branch_channels, mid_channels, 1)
        self.depthwise_conv = ConvBNAct(mid_channels, mid_channels, 3, strides[1], groups=mid_channels, act=None)
        self.linear_conv = ConvBNAct(mid_channels, linear_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x1, x2 = x.chunk(2, dim=1)
        x1 = self.branch1(x1)
        x2 = self.linear_conv(self.depthwise_conv(self.expand_conv(x2)))
        return concat_shuffle(x1, x2)


def _pool_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling to ``size``, as a plain strided average pool when the sizes divide.

    Both give the same numbers when ``x``'s size is a multiple of ``size`` (always so for the
    usual input sizes: branches halve), but OpenVINO's CPU plugin has an optimised kernel only
    for the plain one (its AdaptiveAvgPool took about 15% of Lite-HRNet-18's inference time).
    The kernel is computed from the shape, so a trace of it holds for that input size only.
    """
    height, width = int(x.shape[-2]), int(x.shape[-1])
    out_h, out_w = int(size[0]), int(size[1])
    if height % out_h == 0 and width % out_w == 0:
        kernel = (height // out_h, width // out_w)
        return x if kernel == (1, 1) else F.avg_pool2d(x, kernel, kernel)
    return F.adaptive_avg_pool2d(x, (out_h, out_w))


def _scale_by(x: torch.Tensor, weights: torch.Tensor, broadcast: bool = True) -> torch.Tensor:
    """``x * F.interpolate(weights, size=x's, mode="nearest")`` without the upsampled copy when the
    sizes divide: each weight multiplies its block of pixels through a broadcast view. The same
    numbers, with one tensor of ``x``'s size less to compute and to keep for the backward pass.
    A traced or exported graph, and ``broadcast=False``, keep the Interpolate."""
    height, width = x.shape[-2:]
    rows, cols = weights.shape[-2:]
    if not broadcast or _tracing() or height % rows or width % cols:
        return x * F.interpolate(weights, size=(height, width), mode="nearest")
    if (rows, cols) == (height, width):
        return x * weights
    return _BlockScale.apply(x, weights)


def _times_blocks(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each ``weights`` pixel multiplies its block of ``x`` (sizes divide), through a broadcast view."""
    (height, width), (rows, cols) = x.shape[-2:], weights.shape[-2:]
    blocks = x.unflatten(3, (cols, width // cols)).unflatten(2, (rows, height // rows))
    return (blocks * weights[:, :, :, None, :, None]).flatten(4, 5).flatten(2, 3)


class _BlockScale(torch.autograd.Function):
    """``_times_blocks`` whose weight gradient is a sum pooling of ``grad * x`` (average pooling
    with divisor 1, which has channels-last kernels) instead of autograd's reduction over the
    broadcast dimensions, 2.5-8x slower in channels-last order (``benchmarks/train_kernels.py``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weights)
        return _times_blocks(x, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weights = ctx.saved_tensors
        grad_x = _times_blocks(grad, weights).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            kernel = (x.shape[-2] // weights.shape[-2], x.shape[-1] // weights.shape[-1])
            grad_w = F.avg_pool2d(grad * x, kernel, divisor_override=1).to(weights.dtype)
        return grad_x, grad_w


class CrossResolutionWeighting(nn.Module):
    """Channel weights computed from all branches at once.

    Every branch is average-pooled to the smallest branch's size, the results are concatenated
    and squeezed by ``ratio`` (1x1 conv + BN + ReLU), expanded back (1x1 conv + BN + sigmoid),
    split per branch, upsampled (nearest) and multiplied into the branch.

    In training and eager inference the upsampling is a broadcast (``_scale_by``); the graph for one
    input size (``fixed_input_size``: the export and QAT) keeps OpenVINO's patterns: strided
    average pooling and a nearest Interpolate.
    """

    def __init__(self, channels: Sequence[int], ratio: int) -> None:
        super().__init__()
        self.channels = list(channels)
        total = sum(self.channels)
        self.conv1 = ConvBNAct(total, int(total / ratio), 1)
        self.conv2 = ConvBNAct(int(total / ratio), total, 1, act=nn.Sigmoid)
        # Set by fixed_input_size() for a graph whose input size never changes (the export, QAT).
        self.fixed_size = False

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        min_size = xs[-1].shape[-2:]
        pool = _pool_to if self.fixed_size else F.adaptive_avg_pool2d
        pooled = [pool(x, min_size) for x in xs[:-1]] + [xs[-1]]
        weights = self.conv2(self.conv1(torch.cat(pooled, dim=1)))
        return [
            _scale_by(x, w, broadcast=not self.fixed_size)
            for x, w in zip(xs, weights.split(self.channels, dim=1), strict=True)
        ]


@contextmanager
def fixed_input_size(model: nn.Module):
    """Within this block, ``model`` runs (or is traced) at one input size: cross-resolution
    weighting pools with plain strided average pooling (see ``_pool_to``), not adaptive pooling,
    and upsamples its weights with an Interpolate (not ``_scale_by``'s broadcast).
    Used for the export; QAT keeps it on for its whole run (its inputs all have one size, and
    NNCF's quantizers attach to the ops by name, so the trained and the exported graph must match)."""
    modules = [m for m in model.modules() if isinstance(m, CrossResolutionWeighting)]
    before = [m.fixed_size for m in modules]
    for m in modules:
        m.fixed_size = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.fixed_size = flag


class SpatialWeighting(nn.Module):
    """Squeeze-and-excitation on one branch (``weighting_module_version='v1'``): no BatchNorm."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, int(channels / ratio), 1, norm=False)
        self.conv2 = ConvBNAct(int(channels / ratio), channels, 1, norm=False, act=nn.Sigmoid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv2(self.conv1(F.adaptive_avg_pool2d(x, 1)))


class LiteBlock(nn.Module):
    """The LITE block (OTX ``ConditionalChannelWeighting``), applied to all branches together.

    Each branch is split in half; the second halves go through cross-resolution weighting, a
    per-branch depthwise 3x3 conv + BN and spatial weighting; then each branch re-joins its
    halves and shuffles channels.
    """

    def __init__(self, channels: Sequence[int], reduce_ratio: int) -> None:
        super().__init__()
        half = [c // 2 for c in channels]
        self.cross_resolution_weighting = CrossResolutionWeighting(half, reduce_ratio)
        self.depthwise_convs = nn.ModuleList(ConvBNAct(c, c, 3, groups=c, act=None) for c in half)
        self.spatial_weighting = nn.ModuleList(SpatialWeighting(c) for c in half)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        halves = [x.chunk(2, dim=1) for x in xs]
        kept = [h[0] for h in halves]
        ys = self.cross_resolution_weighting([h[1] for h in halves])
        ys = [sw(dw(y)) for y, dw, sw in zip(ys, self.depthwise_convs, self.spatial_weighting, strict=True)]
        return [concat_shuffle(k, y) for k, y in zip(kept, ys, strict=True)]


class LiteHRModule(nn.Module):
    """LITE blocks over all branches, then a fuse layer that gives every branch all others.

    Fuse paths: to a higher resolution, 1x1 conv + BN then nearest upsampling; to a lower
    resolution, one (depthwise 3x3 stride 2 + BN, 1x1 + BN) step per halving, with ReLU between
    steps. The sums are followed by ReLU.

    Two details of the reference implementation (HRNet/Lite-HRNet, kept in OTX 1.x and 2.x) are
    reproduced because trained weights depend on them: (1) each fused sum starts from branch
    0's term and then adds every branch including branch 0, so branch 0's term counts twice;
    (2) the reference accumulates the first sum in place in branch 0's tensor, so the paths from
    branch 0 into the lower branches read that (pre-ReLU) sum instead of the block output.
    The doubled term is computed once here and added twice, which gives the same result as the
    reference with less work (the reference runs the branch-0 path twice).
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, reduce_ratio: int) -> None:
        super().__init__()
        channels = list(channels)
        self.num_branches = len(channels)
        self.layers = nn.Sequential(*(LiteBlock(channels, reduce_ratio) for _ in range(num_blocks)))
        self.fuse_layers = nn.ModuleList()
        for i, c_out in enumerate(channels):
            row = nn.ModuleList()
            for j, c_in in enumerate(channels):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = i - j
                    row.append(
                        nn.Sequential(
                            *(
                                _dw_pw(c_in, c_out if k == steps - 1 else c_in, 2, relu=k < steps - 1)
                                for k in range(steps)
                            )
                        )
                    )
            self.fuse_layers.append(row)
        self.relu = nn.ReLU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = self.layers(xs)
        outs: list[torch.Tensor] = []
        first: torch.Tensor | None = None  # pre-ReLU fused sum of branch 0 (see class docstring)
        for i, row in enumerate(self.fuse_layers):
            if i == 0:
                y = xs[0] + xs[0]
            else:
                from_first = row[0](first)
                y = from_first + from_first
            for j in range(1, self.num_branches):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + F.interpolate(row[j](xs[j]), size=y.shape[-2:], mode="nearest")
                else:
                    y = y + row[j](xs[j])
            if i == 0:
                first = y
            outs.append(self.relu(y))
        return outs


class LiteHRNet(nn.Module):
    """Lite-HRNet backbone; returns one feature map per branch, highest resolution first.

    Args:
        stem_channels: channels of the stem (its output has as many).
        stem_strides: strides of the stem's first conv and of its shuffle unit.
        extra_stride: add a second strided conv to the stem.
        num_modules, num_branches, num_blocks, reduce_ratios: one entry per stage.
        channels: channels of every branch of the last stage; stage ``s`` uses the first
            ``num_branches[s]`` of them.
        in_channels: input image channels.
        aggregator: optional module that merges the branch outputs inside the backbone (the
            OTX 1.0 Lite-HRNet-18 layout, ``out_aggregator``); the backbone then returns its
            single output in a one-element list.
    """

    def __init__(
        self,
        stem_channels: int,
        stem_strides: tuple[int, int],
        extra_stride: bool,
        num_modules: Sequence[int],
        num_branches: Sequence[int],
        num_blocks: Sequence[int],
        reduce_ratios: Sequence[int],
        channels: Sequence[int],
        in_channels: int = 3,
        aggregator: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.stem = Stem(in_channels, stem_channels, stem_channels, 1.0, stem_strides, extra_stride)
        self.num_stages = len(num_modules)
        previous = [stem_channels]
        for s in range(self.num_stages):
            current = list(channels[: num_branches[s]])
            self.add_module(f"transition{s}", self._make_transition(previous, current))
            stage = nn.Sequential(
                *(LiteHRModule(current, num_blocks[s], reduce_ratios[s]) for _ in range(num_modules[s]))
            )
            self.add_module(f"stage{s}", stage)
            previous = current
        self.out_channels = previous
        self.aggregator = aggregator

    @staticmethod
    def _make_transition(previous: list[int], current: list[int]) -> nn.ModuleList:
        """Adapt existing branches whose width changes; create new branches from the lowest one."""
        layers = nn.ModuleList()
        for i, c_out in enumerate(current):
            if i < len(previous):
                c_in = previous[i]
                layers.append(_dw_pw(c_in, c_out, 1, relu=True) if c_in != c_out else nn.Identity())
            else:
                c_in = previous[-1]
                steps = i + 1 - len(previous)
                layers.append(
                    nn.Sequential(
                        *(_dw_pw(c_in, c_out if k == steps - 1 else c_in, 2, relu=True) for k in range(steps))
                    )
                )
        return layers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        ys = [self.stem(x)]
        for s in range(self.num_stages):
            transition: nn.ModuleList = getattr(self, f"transition{s}")
            inputs = [t(ys[j] if j < len(ys) else ys[-1]) for j, t in enumerate(transition)]
            ys = getattr(self, f"stage{s}")(inputs)
        if self.aggregator is not None:
            return [self.aggregator(ys)]
        return ys
