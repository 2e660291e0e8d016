"""Training throughput and peak memory, fp32 against bf16 autocast and channels-last against
contiguous memory order, side by side in one run.

Run by hand on an otherwise idle machine:

    python benchmarks/precision.py --templates Lite-HRNet-s-mod2,Lite-HRNet-18 --steps 6

Each (template, precision, memory format) trains in its own subprocess (so peak RSS is its own):
random images and masks at --input-size, batch --batch-size, the template's recipe (Adam,
max-pooling loss, clipping), --warmup steps untimed, then --steps timed. The combinations
alternate over --rounds rounds so that drift hits all alike. Prints one JSON line per
measurement and a table with the CPU model and its bf16/AMX flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(shown)}"


def measure(
    template: str, precision: str, order: str, size: tuple[int, int], batch: int, warmup: int, steps: int
) -> dict:
    import torch

    from segcore import devices
    from segcore.losses import MaxPoolingCrossEntropy
    from segcore.models import create_model

    torch.manual_seed(0)
    memory_format = devices.MEMORY_FORMATS[order]
    model = create_model(template, 11).train().to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = MaxPoolingCrossEntropy()
    cpu_device = torch.device("cpu")
    images = torch.randn(batch, 3, *size).contiguous(memory_format=memory_format)
    masks = torch.randint(0, 11, (batch, *size))
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        with devices.autocast(cpu_device, precision):
            logits = model(images)
        loss = criterion(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "template": template, "precision": precision, "memory_format": order,
        "img_per_s": round(batch * len(times) / sum(times), 3), "peak_rss_mb": round(peak_mb),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--templates", default="Lite-HRNet-s-mod2,Lite-HRNet-18")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--memory-formats", default="channels_last,contiguous")
    ap.add_argument("--input-size", default="512x512")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.input_size.split("x"))
    if args.one:
        template, precision, order = args.one.split(":")
        print(json.dumps(measure(template, precision, order, size, args.batch_size, args.warmup, args.steps)))
        return 0
    rows = []
    combinations = [
        (template, precision, order)
        for template in args.templates.split(",")
        for precision in args.precisions.split(",")
        for order in args.memory_formats.split(",")
    ]
    for _ in range(args.rounds):
        for template, precision, order in combinations:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{template}:{precision}:{order}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(out, flush=True)
    print(f"\n{cpu()}; batch {args.batch_size} at {args.input_size}, {args.steps} timed steps, {args.rounds} rounds")
    print(f"{'template':<20} {'precision':<9} {'memory':<13} {'img/s (each round)':<24} {'peak RSS MB':>11}")
    for template, precision, order in combinations:
        mine = [r for r in rows if (r["template"], r["precision"], r["memory_format"]) == (template, precision, order)]
        rates = ", ".join(f"{r['img_per_s']:.2f}" for r in mine)
        print(f"{template:<20} {precision:<9} {order:<13} {rates:<24} {max(r['peak_rss_mb'] for r in mine):>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
