"""Four training kernels against the autograd forms they replace, forward + backward, at the sizes of
a Lite-HRNet-18 training step (512x512 crops, batch 8, CamVid's 11 classes).

Run by hand on an otherwise idle machine:

    python benchmarks/train_kernels.py [--threads 2] [--repeats 10]

- ``ce_dice``: ``segcore.losses.DiceCrossEntropy`` (one log-softmax, a hand-written backward pass)
  against the same loss from autograd's ops (log-softmax, NLL, exp, einsum, gather, index_add:
  what segcore used up to 2026-12-03), on contiguous and channels-last logits.
- ``concat_shuffle``: ``segcore.models.litehrnet.concat_shuffle`` against concatenation followed
  by the channel shuffle, for channels-last halves of the shapes in Lite-HRNet-18's stages, in
  fp32 and bf16.
- ``scale_by``: the cross-resolution weighting's product of a branch with its block-wise weights
  (``segcore.models.litehrnet._scale_by``, a hand-written backward pass) against autograd through
  the same broadcast product (what segcore used up to 2026-12-03), channels-last, fp32 and bf16.
- ``depthwise_s2``: a strided depthwise 3x3 convolution under bf16 autocast,
  ``segcore.models.litehrnet.DepthwiseConv2d`` (the input's gradient from fp32) against
  ``nn.Conv2d`` (oneDNN's bf16 backward), at the shapes of Lite-HRNet-18's fuse layers.

Prints the best of --repeats timings (ms) of each form and their ratio, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision import cpu  # noqa: E402

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def autograd_ce_dice(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy + soft Dice (smooth 1, weight 1) from autograd's ops, as segcore computed it before."""
    classes = logits.shape[1]
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    log_probs = F.log_softmax(logits, dim=1)
    cross_entropy = F.nll_loss(log_probs, target, ignore_index=ignore_index, reduction="sum")
    probs = log_probs.exp()
    weights = valid.to(probs.dtype)
    prob_sum = torch.einsum("nchw,nhw->c", probs, weights)
    true_prob = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1).exp() * weights
    inter = torch.zeros(classes, dtype=probs.dtype).index_add(0, safe.reshape(-1), true_prob.reshape(-1))
    true_sum = torch.bincount(safe[valid], minlength=classes).to(probs.dtype)
    dice = (2 * inter + 1.0) / (prob_sum + true_sum + 1.0)
    return cross_entropy / valid.sum() + (1.0 - dice.mean())


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def time_forms(forms, first: torch.Tensor, second: torch.Tensor, grad: torch.Tensor, repeats: int) -> dict:
    """Best forward + backward time (ms) of each (name, form(first, second)), inputs as fresh leaves."""
    timed = {}
    for name, form in forms:

        def step(form=form):
            a, b = first.detach().requires_grad_(), second.detach().requires_grad_()
            form(a, b).backward(grad)

        timed[name] = best_ms(step, repeats)
    return timed


def loss_rows(repeats: int) -> list[dict]:
    from segcore.losses import DiceCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(8, 11, 512, 512)
    target = torch.randint(0, 11, (8, 512, 512))
    target[:, :20] = 255  # some ignored pixels, as CamVid has
    ours = DiceCrossEntropy()
    rows = []
    for order in ("contiguous", "channels_last"):
        x = logits if order == "contiguous" else logits.contiguous(memory_format=torch.channels_last)
        timed = {}
        for name, loss in (("autograd", autograd_ce_dice), ("segcore", ours)):

            def step(loss=loss, x=x):
                leaf = x.detach().requires_grad_()
                loss(leaf, target).backward()

            timed[name] = best_ms(step, repeats)
        rows.append({"kernel": "ce_dice", "shape": "8x11x512x512", "dtype": "fp32", "order": order, **timed})
    return rows


def shuffle_rows(repeats: int) -> list[dict]:
    from segcore.models.litehrnet import channel_shuffle, concat_shuffle

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels, size in ((20, 128), (40, 64), (80, 32), (160, 16)):
            whole = torch.randn(8, 2 * channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
            kept = whole.chunk(2, dim=1)[0]  # a view of the block's input, as in the network
            branch = torch.randn_like(kept).contiguous(memory_format=torch.channels_last)
            grad = torch.randn_like(whole)
            forms = (
                ("autograd", lambda a, b: channel_shuffle(torch.cat((a, b), dim=1), 2)),
                ("segcore", concat_shuffle),
            )
            timed = time_forms(forms, kept, branch, grad, repeats)
            shape = f"2x 8x{channels}x{size}x{size}"
            rows.append({"kernel": "concat_shuffle", "shape": shape, "dtype": NAMES[dtype],
                         "order": "channels_last", **timed})  # fmt: skip
    return rows


def scale_rows(repeats: int) -> list[dict]:
    from segcore.models.litehrnet import _scale_by, _times_blocks

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels, size, rows_cols in ((20, 128, 32), (20, 128, 16), (40, 64, 32), (80, 32, 16)):
            x = torch.randn(8, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.rand(8, channels, rows_cols, rows_cols, dtype=dtype).contiguous(memory_format=torch.channels_last)
            grad = torch.randn_like(x)
            timed = time_forms((("autograd", _times_blocks), ("segcore", _scale_by)), x, w, grad, repeats)
            shape = f"8x{channels}x{size}x{size} by {rows_cols}x{rows_cols}"
            rows.append({"kernel": "scale_by", "shape": shape, "dtype": NAMES[dtype],
                         "order": "channels_last", **timed})  # fmt: skip
    return rows


def depthwise_rows(repeats: int) -> list[dict]:
    from segcore.models.litehrnet import DepthwiseConv2d

    rows = []
    for channels, size in ((32, 256), (40, 128), (80, 64), (160, 32)):
        ours = DepthwiseConv2d(channels, channels, 3, 2, 1, groups=channels, bias=False)
        plain = torch.nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False)
        plain.load_state_dict(ours.state_dict())
        x = torch.randn(8, channels, size, size).contiguous(memory_format=torch.channels_last).bfloat16()
        grad = torch.randn(8, channels, size // 2, size // 2).contiguous(memory_format=torch.channels_last).bfloat16()
        timed = {}
        for name, conv in (("autograd", plain), ("segcore", ours)):
            conv.to(memory_format=torch.channels_last)

            def step(conv=conv, x=x, grad=grad):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = conv(x.detach().requires_grad_())
                out.backward(grad)

            timed[name] = best_ms(step, repeats)
        rows.append({"kernel": "depthwise_s2", "shape": f"8x{channels}x{size}x{size}", "dtype": "bf16",
                     "order": "channels_last", **timed})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu()}; {args.threads} threads; forward + backward, best of {args.repeats}, ms")
    print(f"{'kernel':<15} {'shape':<26} {'dtype':<9} {'order':<14} {'before':>8} {'segcore':>8} {'ratio':>6}")
    for row in [
        *loss_rows(args.repeats),
        *shuffle_rows(args.repeats),
        *scale_rows(args.repeats),
        *depthwise_rows(args.repeats),
    ]:
        row["ratio"] = round(row["segcore"] / row["autograd"], 2)
        print(f"{row['kernel']:<15} {row['shape']:<26} {row['dtype']:<9} {row['order']:<14} "
              f"{row['autograd']:>8.1f} {row['segcore']:>8.1f} {row['ratio']:>6.2f}")  # fmt: skip
        print(json.dumps(row), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
