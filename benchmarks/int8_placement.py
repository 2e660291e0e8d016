"""Where the INT8 IR's time goes when more of the network runs in int8 (issue 17).

Run by hand on an FP32 IR written by ``segcore export`` and the canonical dataset it was trained on:

    python benchmarks/int8_placement.py --ir runs/camvid-18-ir/model.xml --dataset data/camvid-canonical

From the FP32 IR it builds these INT8 IRs, each with NNCF's PTQ (mixed preset, quantile ranges,
--calibration training images), and times them beside the FP32 IR:

- default: ``segcore optimize``'s ignored scope (weighting multiplications, the aggregator's and
  the fuse layers' additions, pre/post-processing kept float);
- mul: the same, but the weighting multiplications quantized too (only the additions and the
  pre/post-processing float);
- concat: the default IR plus a FakeQuantize on both inputs of every concatenation that feeds a
  channel shuffle, so the concat, the shuffle and the split after it may run in int8. These
  FakeQuantizes get one fixed range (--concat-range), not calibrated ones: this variant answers
  what the plugin does with an int8 shuffle and how fast it is, not what it does to Dice.

Latency: batch 1, the IR reshaped to a static 1x512x512x3 input, plugin default precision, 2
threads, median of interleaved rounds of 10 runs; then OpenVINO's per-layer counters (30 runs)
summed by layer type and kernel for the layer types that differ most. Results are printed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def quantize(fp32_xml: Path, dataset: Path, calibration: int, quantize_muls: bool):
    import nncf
    import openvino as ov

    from segcore import optimize as opt
    from segcore.data.dataset import read_rgb

    model = ov.Core().read_model(fp32_xml)
    names = set(opt.ignored_names(model, "full"))
    if quantize_muls:
        owners = opt.module_names(model)
        names = {n for n in names if not re.fullmatch(opt.WEIGHTING_MULTIPLY, owners.get(n, n))}
    items = opt.calibration_sample(opt._items(dataset, "train"), calibration)
    return nncf.quantize(
        model,
        nncf.Dataset(items, lambda item: read_rgb(item[0])[None]),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(items),
        ignored_scope=nncf.IgnoredScope(names=sorted(names)),
        advanced_parameters=opt._advanced("quantile"),
    )


def with_concat_quantizers(model, low: float, high: float) -> int:
    """A 256-level FakeQuantize [low, high] on every input of each concat that feeds a shuffle."""
    import openvino.opset13 as ops

    def const(value):
        return ops.constant(np.array(value, np.float32).reshape(1, 1, 1, 1))

    inserted = 0
    for node in model.get_ops():
        if node.get_type_name() != "Concat":
            continue
        consumers = [t.get_node() for o in node.outputs() for t in o.get_target_inputs()]
        if len(consumers) != 1 or consumers[0].get_type_name() != "Reshape":  # the shuffle's first Reshape
            continue
        for i in range(node.get_input_size()):
            fq = ops.fake_quantize(node.input_value(i), const(low), const(high), const(low), const(high), 256)
            node.input(i).replace_source_output(fq.output(0))
            inserted += 1
    model.validate_nodes_and_infer_types()
    return inserted


def compiled(model, threads: int, size: int):
    import openvino as ov

    model = model.clone()
    model.reshape([1, size, size, 3])
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(model, "CPU", config).create_infer_request()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ir", required=True, help="the FP32 IR (model.xml)")
    ap.add_argument("--dataset", required=True, help="canonical dataset (its train split calibrates)")
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--concat-range", default="-8,8", help="LOW,HIGH of the concat FakeQuantizes")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import openvino as ov
    from ablate_recipe import machine
    from bench_deploy import layer_times

    fp32 = ov.Core().read_model(args.ir)
    default = quantize(Path(args.ir), Path(args.dataset), args.calibration, quantize_muls=False)
    muls = quantize(Path(args.ir), Path(args.dataset), args.calibration, quantize_muls=True)
    concat = default.clone()
    low, high = (float(v) for v in args.concat_range.split(","))
    inserted = with_concat_quantizers(concat, low, high)
    models = {"fp32": fp32, "int8 default": default, "int8 mul": muls, "int8 concat": concat}
    print(f"{machine()}; OpenVINO {ov.get_version()}; {inserted} FakeQuantizes added in 'int8 concat'")

    image = {0: np.random.default_rng(0).integers(0, 256, (1, args.size, args.size, 3), dtype=np.uint8)}
    requests = {name: compiled(m, args.threads, args.size) for name, m in models.items()}
    times = {name: [] for name in models}
    for request in requests.values():
        for _ in range(5):
            request.infer(image)
    for _ in range(args.rounds):
        for name, request in requests.items():
            for _ in range(10):
                started = time.perf_counter()
                request.infer(image)
                times[name].append((time.perf_counter() - started) * 1000)
    for name in models:
        print(f"{name:<14} median {statistics.median(times[name]):6.1f} ms")

    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    profiles = {
        name: {(e["type"], e["kernel"]): e["ms"] for e in layer_times(m, config, args.size)}
        for name, m in models.items()
    }
    types = defaultdict(float)
    for ms in profiles.values():
        for key, value in ms.items():
            types[key] = max(types[key], value)
    print(f"\n{'layer type':<18}{'kernel':<30}" + "".join(f"{n:>14}" for n in models))
    for key in sorted(types, key=lambda k: -types[k])[:16]:
        print(f"{key[0]:<18}{key[1]:<30}" + "".join(f"{profiles[n].get(key, 0.0):14.2f}" for n in models))
    print(f"{'sum of layers':<48}" + "".join(f"{sum(profiles[n].values()):14.2f}" for n in models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
