"""Speed and memory of the Lite-HRNet templates on CPU.

Per template, each in a fresh subprocess so peak RSS belongs to one measurement:

* inference: batch 1, eval mode, ``torch.no_grad``, median latency after warm-up;
* training: batch 8, forward + cross-entropy + backward + gradient clipping (L2 40) + Adam step,
  images per second after warm-up;
* peak resident memory of each subprocess (``resource.getrusage(...).ru_maxrss``).

Usage::

    python benchmarks/bench_models.py                      # all templates, 2 threads, 512x512
    python benchmarks/bench_models.py --templates Lite-HRNet-s-mod2 --json out.json

"CPU share" is the process's CPU time over (wall time x threads) during the timed part: well
below 1 means the measurement competed with other work on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _infer(args: argparse.Namespace) -> dict:
    import torch

    from segcore.models import create_model

    torch.manual_seed(0)
    model = create_model(args.template, args.num_classes).eval()
    x = torch.randn(1, 3, args.size, args.size)
    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            model(x)
        cpu = time.process_time()
        for _ in range(args.iters):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu
    return {
        "latency_ms_median": 1000 * statistics.median(times),
        "latency_ms_min": 1000 * min(times),
        "cpu_share_infer": cpu / (sum(times) * args.threads),
        "peak_rss_infer_mib": _peak_rss_mib(),
    }


def _train(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from segcore.models import create_model

    torch.manual_seed(0)
    model = create_model(args.template, args.num_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, args.num_classes, (args.batch_size, args.size, args.size))
    y[:, : args.size // 16] = 255  # some ignored pixels, as in real masks

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        optimizer.step()

    for _ in range(args.train_warmup):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.train_steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "train_img_per_s": args.batch_size * args.train_steps / elapsed,
        "train_step_s": elapsed / args.train_steps,
        "cpu_share_train": cpu / (elapsed * args.threads),
        "peak_rss_train_mib": _peak_rss_mib(),
    }


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = _infer(args) if args.worker == "infer" else _train(args)
    print(json.dumps(result))


def _run_worker(mode: str, template: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--template", template]
    for name in ("threads", "size", "num_classes", "warmup", "iters", "batch_size", "train_warmup", "train_steps"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{template} {mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "| Template | Latency (ms, median) | Train (img/s) | Peak RSS infer (MiB) | Peak RSS train (MiB) "
        "| CPU share infer / train |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['latency_ms_median']:.0f} | {r['train_img_per_s']:.2f} | "
            f"{r['peak_rss_infer_mib']:.0f} | {r['peak_rss_train_mib']:.0f} | "
            f"{r['cpu_share_infer']:.2f} / {r['cpu_share_train']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"{meta['date']}, {meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['size']}x{meta['size']}, {meta['num_classes']} classes; latency: batch 1, median of "
        f"{meta['iters']} after {meta['warmup']} warm-up runs; training: batch {meta['batch_size']}, "
        f"{meta['train_steps']} steps after {meta['train_warmup']} warm-up steps."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="*", help="template names or IDs (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--size", type=int, default=512, help="square input size (default: 512)")
    parser.add_argument("--num-classes", type=int, default=11, help="classes (default: 11, CamVid)")
    parser.add_argument("--warmup", type=int, default=5, help="inference warm-up runs (default: 5)")
    parser.add_argument("--iters", type=int, default=30, help="timed inference runs (default: 30)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default: 8)")
    parser.add_argument("--train-warmup", type=int, default=2, help="training warm-up steps (default: 2)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps (default: 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", choices=("infer", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--template", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _worker(args)
        return 0

    import torch

    from segcore.errors import SegcoreError
    from segcore.models import TEMPLATES, get_template

    try:
        templates = [get_template(t) for t in args.templates] if args.templates else list(TEMPLATES)
    except SegcoreError as exc:
        parser.error(str(exc))
    meta = {
        "date": dt.date.today().isoformat(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        **{k: getattr(args, k) for k in ("threads", "size", "num_classes", "warmup", "iters")},
        **{k: getattr(args, k) for k in ("batch_size", "train_warmup", "train_steps")},
    }
    results = []
    for template in templates:
        row = {"id": template.id, "name": template.name}
        row.update(_run_worker("infer", template.name, args))
        row.update(_run_worker("train", template.name, args))
        results.append(row)
        print(f"{template.name}: {json.dumps({k: round(v, 2) for k, v in row.items() if isinstance(v, float)})}")
        sys.stdout.flush()
    print()
    print(markdown(results, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
