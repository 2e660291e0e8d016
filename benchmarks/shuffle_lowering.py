"""How the channel shuffle is lowered, and what it costs in the OpenVINO IR (issue 17).

Run by hand on a trained bundle (any template; the figures in docs/benchmarks.md are the CamVid
Lite-HRNet-18):

    python benchmarks/shuffle_lowering.py --bundle B [--variants base,stack,gather,none] [--rounds 6]

Each variant replaces how a LITE block re-joins its two halves, `channel_shuffle(cat(kept,
processed))`, then exports the bundle at 512x512 (segcore.export.to_openvino), reshapes it to a
static 1x512x512x3 input and times batch-1 inference at the CPU plugin's default precision and with
f32 forced (2 threads, latency hint; median of interleaved rounds of 10 runs, one random image).
Variants: base (segcore's: Reshape-Transpose-Reshape, which OpenVINO fuses into ShuffleChannels),
stack (torch.stack on a new axis + reshape: one copy instead of two), gather (a channel
index_select: Gather), none (no shuffle at all: wrong numbers, the lower bound of what removing
the shuffle could gain). Prints each variant's largest difference from the first one, its median
latency and its five most expensive layer types (OpenVINO's performance counters, one run).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from segcore.models import litehrnet  # noqa: E402


def _base(kept, processed):
    return litehrnet.channel_shuffle(torch.cat((kept, processed), dim=1), 2)


def _stack(kept, processed):
    return torch.stack((kept, processed), dim=2).flatten(1, 2)


def _gather(kept, processed):
    channels = kept.shape[1] + processed.shape[1]
    order = torch.arange(channels).view(2, -1).t().reshape(-1)
    return torch.cat((kept, processed), dim=1).index_select(1, order)


def _none(kept, processed):
    return torch.cat((kept, processed), dim=1)


VARIANTS = {"base": _base, "stack": _stack, "gather": _gather, "none": _none}


def _with_join(join):
    def forward(self, xs):
        halves = [x.chunk(2, dim=1) for x in xs]
        ys = self.cross_resolution_weighting([h[1] for h in halves])
        ys = [sw(dw(y)) for y, dw, sw in zip(ys, self.depthwise_convs, self.spatial_weighting, strict=True)]
        return [join(h[0], y) for h, y in zip(halves, ys, strict=True)]

    return forward


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--variants", default="base,stack,gather,none")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import openvino as ov

    from segcore.bundle import load_bundle
    from segcore.export import to_openvino

    model, meta = load_bundle(args.bundle)
    meta["input_size"] = [512, 512]
    core = ov.Core()
    image = np.random.default_rng(0).integers(0, 255, (1, 512, 512, 3), dtype=np.uint8)
    names = args.variants.split(",")
    requests, outputs = {}, {}
    original = litehrnet.LiteBlock.forward
    try:
        for name in names:
            litehrnet.LiteBlock.forward = _with_join(VARIANTS[name])
            ov_model = to_openvino(model, meta)
            ov_model.reshape([1, 512, 512, 3])
            for precision in ("default", "f32"):
                config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": True}
                if precision == "f32":
                    config["INFERENCE_PRECISION_HINT"] = "f32"
                request = core.compile_model(ov_model, "CPU", config).create_infer_request()
                requests[name, precision] = request
                outputs[name, precision] = request.infer({0: image})[0].copy()
    finally:
        litehrnet.LiteBlock.forward = original
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for key, request in requests.items():
            for _ in range(10):
                started = time.perf_counter()
                request.infer({0: image})
                times[key].append((time.perf_counter() - started) * 1e3)
    for (name, precision), request in requests.items():
        diff = float(np.abs(outputs[name, precision] - outputs[names[0], precision]).max())
        by_type = collections.defaultdict(float)
        for layer in request.profiling_info:
            by_type[layer.node_type] += layer.real_time.total_seconds() * 1e3
        top = sorted(by_type.items(), key=lambda kv: -kv[1])[:5]
        median = statistics.median(times[name, precision])
        layers = ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in top)
        print(f"{name:<7} {precision:<8} max |diff| {diff:.3g}  median {median:.1f} ms  {layers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
