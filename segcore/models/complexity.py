"""Model complexity: FLOPs, MACs, parameters and weight size, measured on the built model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["complexity"]


def complexity(model: nn.Module, input_size: tuple[int, int] = (512, 512)) -> dict[str, float]:
    """Measure ``model`` on one 3-channel image of ``input_size`` (height, width).

    Returns:
        ``gflops``: 1e9 FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, which
        counts convolutions and matrix products at 2 FLOPs per multiply-add (element-wise ops,
        BatchNorm, pooling and resizing are not counted).
        ``gmacs``: the same work in 1e9 multiply-accumulates (``gflops / 2``), the unit that
        mmcv-style counters (and many papers) call "FLOPs".
        ``params_m``: trainable and frozen parameters, in millions.
        ``size_mb``: fp32 bytes of the state dict's floating-point tensors (parameters and
        BatchNorm running statistics) in 1e6 bytes, i.e. the weights a checkpoint stores.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    params = sum(p.numel() for p in model.parameters())
    weights = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return {
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "params_m": params / 1e6,
        "size_mb": weights * 4 / 1e6,
    }
