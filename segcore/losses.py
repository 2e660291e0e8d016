"""Cross-entropy re-weighted by the max-pooling loss (Rota Bulo, Neuhold, Kontschieder, CVPR 2017).

The loss max-pooling weighting finds, among all pixel weightings whose p-norm ball is bounded
(ratio of supported pixels, p), the one that maximises the weighted loss: the hardest pixels get
the largest weights, so rare classes (usually the hardest) are not drowned by common ones. This is
the closed-form solution of the paper as the reference implementation computes it (sort, a
threshold scan, then weights tau and tau * (l / alpha)^(q - 1)), vectorised in PyTorch.

One detail follows the documented algorithm rather than the reference's C loop: the pixel where
the scan stops (i*) gets tau, like every harder pixel, so no weight exceeds tau (the C loop gives
that one pixel tau * (l / alpha)^(q - 1), slightly above tau).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcore import parallel
from segcore.devices import at_least_fp32

_EPS = float(torch.finfo(torch.float32).eps)


@torch.no_grad()
def max_pooling_weights(losses: torch.Tensor, ratio: float = 0.25, p: float = 1.7) -> torch.Tensor:
    """Weights for a 1-D tensor of non-negative per-pixel losses (same shape; no gradient)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if p <= 1.0:
        raise ValueError(f"p must be > 1, got {p}")
    flat = at_least_fp32(losses.detach().reshape(-1))
    weights = torch.zeros_like(flat)
    size = flat.numel()
    if size == 0:
        return weights.view_as(losses)
    sorted_losses, order = torch.sort(flat)
    eps = torch.tensor([_EPS], dtype=flat.dtype, device=flat.device)
    pos = int(torch.searchsorted(sorted_losses, eps).item())  # first >= eps
    n = size - pos
    m = int(ratio * n)
    if n <= 0 or m <= 0:
        return weights.view_as(losses)
    q = p / (p - 1.0)
    top = sorted_losses[-1]
    active = sorted_losses[pos:]
    x = (active / top) ** q  # ascending
    cum = torch.cumsum(x.double(), 0)
    counter = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device) + (m - n)
    eta = counter * x.double() - cum
    hits = torch.nonzero(eta >= _EPS)
    if hits.numel():  # the scan stops at the first index j where eta >= eps
        j = int(hits[0].item())
        stop = pos + j  # pixels from i* = j on get tau
        c = m - n + j + 1
        a_prev = float(cum[j - 1]) if j > 0 else 0.0
    else:  # scanned everything
        stop = size
        c = m + 1
        a_prev = float(cum[-1])
    alpha = (a_prev / c) ** (1.0 / q) * float(top) if c > 0 and a_prev > 0 else 0.0
    tau = 1.0 / (n ** (1.0 / q) * m ** (1.0 / p))
    sorted_weights = torch.zeros_like(sorted_losses)
    sorted_weights[stop:] = tau
    if alpha > _EPS:
        sorted_weights[pos:stop] = tau * (sorted_losses[pos:stop] / alpha) ** (q - 1.0)
    weights[order] = sorted_weights
    return weights.view_as(losses)


class CrossEntropy(torch.nn.Module):
    """Mean cross-entropy over the valid pixels (ignore index excluded) of the global batch: in
    data-parallel training the sum and the pixel count are taken over all ranks
    (``segcore.parallel``), so every rank holds the global batch's loss."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = at_least_fp32(logits)  # the loss and its softmax in fp32 under autocast
        pixel_loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        count = parallel.all_reduce_sum_((target != self.ignore_index).sum().float())
        return parallel.sum_across(pixel_loss.sum()) / count.clamp(min=1)


class MaxPoolingCrossEntropy(torch.nn.Module):
    """Per-pixel cross-entropy (ignore index excluded) weighted by the max-pooling weights.

    The weights are computed over all valid pixels of the batch (of the global batch, across the
    ranks, in data-parallel training), multiplied by their count and used as constants; the result
    is the mean of weight * loss over the valid pixels.
    """

    def __init__(self, ignore_index: int = 255, ratio: float = 0.25, p: float = 1.7):
        super().__init__()
        self.ignore_index, self.ratio, self.p = ignore_index, ratio, p

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = at_least_fp32(logits)  # the loss and its softmax in fp32 under autocast
        pixel_loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        losses = pixel_loss[target != self.ignore_index]
        everyone, start = parallel.gather_flat(losses)
        if everyone.numel() == 0:
            return parallel.sum_across(pixel_loss.sum() * 0.0)
        weights = max_pooling_weights(everyone, self.ratio, self.p)[start : start + losses.numel()]
        return parallel.sum_across((weights * losses).sum())


class DiceCrossEntropy(torch.nn.Module):
    """Cross-entropy plus ``dice_weight`` x soft Dice loss (1 - mean soft Dice over classes).

    The soft Dice of a class is (2 sum(p t) + 1) / (sum p + sum t + 1) over the batch's valid pixels
    (p: softmax probability, t: one-hot target), computed in fp32. It optimises the metric we
    report directly and weights every class equally, however few pixels it has.
    """

    def __init__(self, ignore_index: int = 255, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.ignore_index, self.dice_weight, self.smooth = ignore_index, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = logits.shape[1]
        valid = target != self.ignore_index
        local = _DiceCrossEntropySums.apply(logits, target, self.ignore_index)
        true_sum = torch.bincount(target[valid], minlength=classes).to(local.dtype)
        sums = parallel.sum_across(torch.cat([local, true_sum]))  # over the global batch in data-parallel training
        count = parallel.all_reduce_sum_(valid.sum().float())
        if count == 0:
            return sums.sum() * 0.0
        inter, prob_sum = sums[:classes], sums[classes : 2 * classes]
        cross_entropy, true_sum = sums[2 * classes], sums[2 * classes + 1 :]
        dice = (2 * inter + self.smooth) / (prob_sum + true_sum + self.smooth)
        return cross_entropy / count + self.dice_weight * (1.0 - dice.mean())


class _DiceCrossEntropySums(torch.autograd.Function):
    """(logits N x C x H x W, target N x H x W) -> one rank's sums over its valid pixels: per class
    the probability of the true class (C), per class the probability (C), and the cross-entropy
    (1), computed in fp32 (or float64) whatever the logits' dtype, with a hand-written backward
    pass that returns the gradient in the logits' dtype. bf16 logits are read as they are: no fp32
    copy of them exists beside the probabilities at the training's peak of memory.

    Against the same sums built from autograd's ops this keeps one N x C x H x W tensor for the
    backward pass instead of two, never builds a one-hot target, and takes about half the time
    (``benchmarks/train_kernels.py``). With upstream gradients gI, gP (per class) and gCE, pixel i
    of true class t and probabilities p gets

        dz_k = p_k (gP_k + gCE - gI_t p_t - sum_c p_c gP_c) + [k = t] (gI_t p_t - gCE)

    and an ignored pixel gets 0 (tests compare values and gradients with the textbook form).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        ctx.logits_dtype = logits.dtype
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.contiguous()  # the class dimension's fast kernels (class-last is 3-6x slower)
        valid = target != ignore_index
        safe = target.masked_fill(~valid, 0).unsqueeze(1)
        weights = valid.to(dtype)
        log_probs = F.log_softmax(logits, dim=1, dtype=dtype)
        true_log_prob = log_probs.gather(1, safe).squeeze(1)
        probs = log_probs.exp_()  # log_probs is not needed again: reuse its memory
        cross_entropy = -(true_log_prob * weights).sum()
        true_prob = true_log_prob.exp_().mul_(weights)
        inter = torch.zeros(logits.shape[1], dtype=dtype, device=logits.device)
        inter.index_add_(0, safe.reshape(-1), true_prob.reshape(-1))
        every_pixel = bool(valid.all())
        prob_sum = probs.sum((0, 2, 3)) if every_pixel else torch.einsum("nchw,nhw->c", probs, weights)
        ctx.save_for_backward(probs, safe, valid)
        ctx.every_pixel = every_pixel
        return torch.cat([inter, prob_sum, cross_entropy[None]])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, safe, valid = ctx.saved_tensors
        classes = probs.shape[1]
        g_inter, g_prob, g_ce = grad[:classes], grad[classes : 2 * classes], grad[2 * classes]
        true_prob = probs.gather(1, safe).squeeze(1)
        g_true = g_inter[safe.squeeze(1)] * true_prob  # gI_t p_t per pixel
        per_pixel = (g_ce - torch.einsum("nchw,c->nhw", probs, g_prob)).sub_(g_true)
        dz = probs * g_prob.view(1, classes, 1, 1)
        dz.addcmul_(probs, per_pixel.unsqueeze(1))
        dz.scatter_add_(1, safe, (g_true - g_ce).unsqueeze(1))
        if not ctx.every_pixel:
            dz.mul_(valid.unsqueeze(1))
        return dz.to(ctx.logits_dtype), None, None
