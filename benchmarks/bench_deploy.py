"""Deployment benchmark: PyTorch eager FP32 vs OpenVINO FP32 vs OpenVINO INT8 (PTQ and QAT).

From one CamVid-trained bundle, in one run on an otherwise idle machine:

1. ``segcore export --input-size 512x512``: the FP32 IR (network input 512x512, like OTX's IR);
2. ``segcore optimize`` of that IR (PTQ, 300 calibration images) and of the bundle (QAT);
3. CamVid val mean Dice of every model, each image at its own size (480x360);
4. latency, the figure every segcore command reports (``segcore.scoring.measure_latency``): the
   median milliseconds of one ``predict(image)`` call (a uint8 RGB image in, its class-index mask
   out: resize, normalisation, network, upsampling, softmax and argmax included) on the first 8
   validation images at their own size (480x360), 2 threads, after warm-up, taken in interleaved
   rounds over the models (machine noise hits every model alike); beside it, as a diagnostic, the
   IRs reshaped to a static 1x512x512x3 input (as OTX ships its IR), probabilities out;
5. throughput: OpenVINO with the THROUGHPUT hint and an async queue, PyTorch eager with batch 4;
6. with --profile, OpenVINO's per-layer counters (static shape, plugin default precision): time by
   layer type and kernel, per IR.

With --prepare-only it stops after step 2, so the slow quantizations of several templates can run
side by side, and one later run (which reuses the IRs it finds) times them all on a quiet machine.

OpenVINO's CPU plugin runs FP32 IRs in bf16 where the CPU has it (INFERENCE_PRECISION_HINT), so
the OpenVINO models are timed twice: plugin default and forced f32; the table names which.

Usage::

    python benchmarks/bench_deploy.py --bundle benchmarks/results/Lite-HRNet-18-... \\
        --dataset benchmarks/results/camvid-canonical --out benchmarks/results/deploy-18
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def machine() -> str:
    """CPU model, cores and the flags that decide int8/bf16 speed (recorded with every figure)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ablate_recipe import machine as describe

    return describe()


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def _segcore(*args: str) -> list[str]:
    return [sys.executable, "-m", "segcore.cli", *args]


def _ov_throughput(xml: Path, image, config: dict, count: int) -> float:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(xml), "CPU", {**config, "PERFORMANCE_HINT": "THROUGHPUT"})
    queue = ov.AsyncInferQueue(compiled)
    batch = image[None]
    for _ in range(len(queue)):  # warm-up
        queue.start_async({0: batch})
    queue.wait_all()
    started = time.perf_counter()
    for _ in range(count):
        queue.start_async({0: batch})
    queue.wait_all()
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a CamVid-trained model bundle")
    parser.add_argument("--dataset", required=True, help="the canonical CamVid dataset it was trained on")
    parser.add_argument("--out", required=True, help="new folder for the IRs and results.json")
    parser.add_argument("--size", type=int, default=512, help="network input / timed image size (default 512)")
    parser.add_argument("--iters", type=int, default=60, help="timed runs per model (default 60)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-subset", type=int, default=300, help="QAT calibration images (default 300)")
    parser.add_argument("--skip-qat", action="store_true", help="leave out the QAT model")
    parser.add_argument("--ptq-subset", type=int, default=300, help="PTQ calibration images (default 300)")
    parser.add_argument("--head-too", action="store_true", help="also PTQ with --scope head (backbone float, as OTX)")
    parser.add_argument("--prepare-only", action="store_true", help="build the IRs, then stop (no timing)")
    parser.add_argument("--profile", action="store_true", help="also OpenVINO's per-layer counters of every IR")
    args = parser.parse_args()

    import numpy as np
    import openvino as ov
    import torch

    from segcore.data.dataset import read_rgb
    from segcore.export import RawImageModel
    from segcore.inference import OpenVINOPredictor, TorchPredictor
    from segcore.scoring import latency_samples, score_split, split_items

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = f"{args.size}x{args.size}"
    template = json.loads((Path(args.bundle) / "model.json").read_text())["template"]
    irs = {"fp32": out / "fp32", "ptq": out / "int8-ptq", "qat": out / "int8-qat"}
    if args.head_too:
        irs["ptq-head"] = out / "int8-ptq-head"
    steps_s = {}
    if not (irs["fp32"] / "model.xml").exists():
        t = time.perf_counter()
        _run(_segcore("export", args.bundle, "--output", str(irs["fp32"]), "--input-size", size))
        steps_s["export"] = time.perf_counter() - t
    if not (irs["ptq"] / "model.xml").exists():
        t = time.perf_counter()
        _run(_segcore("optimize", template, "--load-weights", str(irs["fp32"]), "--train-data-root", args.dataset,
                      "--output", str(irs["ptq"]), "--subset-size", str(args.ptq_subset)))  # fmt: skip
        steps_s["ptq"] = time.perf_counter() - t
    if args.head_too and not (irs["ptq-head"] / "model.xml").exists():
        t = time.perf_counter()
        _run(_segcore("optimize", template, "--load-weights", str(irs["fp32"]), "--train-data-root", args.dataset,
                      "--output", str(irs["ptq-head"]), "--subset-size", str(args.ptq_subset),
                      "--scope", "head"))  # fmt: skip
        steps_s["ptq-head"] = time.perf_counter() - t
    if args.skip_qat:
        irs.pop("qat")
    elif not (irs["qat"] / "model.xml").exists():
        t = time.perf_counter()
        _run(_segcore("optimize", template, "--load-weights", args.bundle, "--train-data-root", args.dataset,
                      "--output", str(irs["qat"]), "--mode", "qat", "--input-size", size, "--epochs",
                      str(args.qat_epochs), "--subset-size", str(args.qat_subset)))  # fmt: skip
        steps_s["qat"] = time.perf_counter() - t
    if args.prepare_only:
        print(f"IRs ready in {out} ({', '.join(f'{k} {v:.0f} s' for k, v in steps_s.items()) or 'all reused'})")
        return 0

    threads = {"INFERENCE_NUM_THREADS": args.threads}
    f32 = {**threads, "INFERENCE_PRECISION_HINT": "f32"}
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    val_images = [read_rgb(item[0]) for item in split_items(args.dataset, "val")[:8]]

    # Every model, compiled once; timed below in interleaved rounds so that machine noise
    # (a busy neighbour for a few seconds) spreads over all of them instead of one.
    torch_p = TorchPredictor(args.bundle)
    torch_p.input_size = (args.size, args.size)
    raw = RawImageModel(torch_p.model, torch_p.input_size, torch_p.meta["mean"], torch_p.meta["std"]).eval()
    x1 = torch.from_numpy(image)[None]
    models = [{"model": "PyTorch eager FP32", "precision": "f32", "predictor": torch_p}]
    names = (("fp32", "OpenVINO FP32"), ("ptq", "OpenVINO INT8 (PTQ)"), ("ptq-head", "OpenVINO INT8 (PTQ, head only)"),
             ("qat", "OpenVINO INT8 (QAT)"))  # fmt: skip
    for key, name in names:
        if key not in irs:
            continue
        xml = irs[key] / "model.xml"
        for label, config in (("default", threads), ("f32", f32)):
            p = OpenVINOPredictor(xml, config=config)
            static = _static_request(xml, config, args.size)
            models.append({"model": name, "precision": f"{label} ({p.inference_precision})", "predictor": p,
                           "static": static, "xml": xml, "config": config})  # fmt: skip

    # (model, result key, callable, its inputs): the library's latency on real images, and the
    # static-shape diagnostic on the synthetic 512x512 image
    timed = []
    for m in models:
        timed.append((m, "latency_ms", m["predictor"].predict, val_images))
        if "static" in m:
            timed.append((m, "latency_ms_static", m["static"], [{0: image[None]}] * len(val_images)))
    times = {id(fn): [] for _, _, fn, _ in timed}
    with torch.no_grad():
        for _, _, fn, inputs in timed:
            for _ in range(args.warmup):
                fn(inputs[0])
        rounds = max(1, args.iters // len(val_images))
        for _ in range(rounds):
            for _, _, fn, inputs in timed:
                times[id(fn)] += latency_samples(fn, inputs, repeats=1)
    for m, key, fn, _ in timed:
        m[key] = statistics.median(times[id(fn)])

    rows = []
    for m in models:
        if "xml" in m:
            tput = _ov_throughput(m["xml"], image, m["config"], 100)
        else:
            with torch.no_grad():
                x4 = x1.repeat(4, 1, 1, 1)
                raw(x4)
                t = time.perf_counter()
                for _ in range(5):
                    raw(x4)
                tput = 20 / (time.perf_counter() - t)
        row = {k: m[k] for k in ("model", "precision", "latency_ms", "latency_ms_static") if k in m}
        row["throughput_img_s"] = tput
        row["val_mdice"] = score_split(m["predictor"], args.dataset, "val")["mdice"]
        if "xml" in m:
            row["ir_mb"] = _mb(m["xml"])
        if args.profile and "xml" in m and m["config"] is threads:
            row["profile"] = _profile(m["xml"], threads, args.size)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)

    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "openvino": ov.get_version(),
        "torch": torch.__version__,
        "bundle": str(args.bundle),
        "template": template,
        "size": args.size,
        "iters": args.iters,
        "threads": args.threads,
        "step_seconds": steps_s,
        "reports": {
            k: json.loads((irs[k] / "report.json").read_text()) for k in ("ptq", "ptq-head", "qat") if k in irs
        },
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for r in rows:
        if "profile" in r:
            print(f"\nper-layer counters, {r['model']} ({r['precision']}): ms per inference by layer type and kernel")
            for entry in r["profile"][:12]:
                print(f"  {entry['type']:<18} {entry['kernel']:<30} {entry['ms']:7.2f}  x{entry['count']}")
    print("\n| model | inference precision | latency ms (predict, first 8 val images at their size) | "
          f"latency ms, static 1x{size}x3, probabilities | throughput img/s | CamVid val mDice | IR MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        static = f"{r['latency_ms_static']:.1f}" if "latency_ms_static" in r else ""
        ir_mb = f"{r['ir_mb']:.2f}" if "ir_mb" in r else ""
        print(f"| {r['model']} | {r['precision']} | {r['latency_ms']:.1f} | {static} | {r['throughput_img_s']:.2f} | "
              f"{r['val_mdice']:.4f} | {ir_mb} |")  # fmt: skip
    return 0


def _static_request(xml: Path, config: dict, size: int):
    """The IR reshaped to a static 1 x size x size x 3 input (as OTX ships its IR), compiled."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml)
    model.reshape([1, size, size, 3])
    request = core.compile_model(model, "CPU", {**config, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    return request.infer


def _profile(xml: Path, config: dict, size: int) -> list[dict]:
    import openvino as ov

    return layer_times(ov.Core().read_model(xml), config, size)


def layer_times(model, config: dict, size: int, runs: int = 30) -> list[dict]:
    """OpenVINO's per-layer counters (PERF_COUNT) of an ov.Model at a static 1 x size x size x 3
    input: milliseconds per inference summed by (layer type, kernel), largest first."""
    from collections import defaultdict

    import numpy as np
    import openvino as ov

    model = model.clone()
    model.reshape([1, size, size, 3])
    request = ov.Core().compile_model(model, "CPU", {**config, "PERF_COUNT": True}).create_infer_request()
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    for _ in range(3):
        request.infer({0: image})
    ms, count = defaultdict(float), defaultdict(int)
    for _ in range(runs):
        request.infer({0: image})
        for layer in request.profiling_info:
            if layer.status == layer.Status.EXECUTED:
                key = (layer.node_type, layer.exec_type)
                ms[key] += layer.real_time.total_seconds() * 1000 / runs
                count[key] += 1
    return [
        {"type": t, "kernel": k, "ms": round(v, 3), "count": count[(t, k)] // runs}
        for (t, k), v in sorted(ms.items(), key=lambda kv: -kv[1])
    ]


def _mb(xml: Path) -> float:
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6


if __name__ == "__main__":
    sys.exit(main())
