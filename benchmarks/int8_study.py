"""Where does full-network INT8 lose Dice? Quantize once, then put parts back into floating point.

Run by hand on a trained bundle and its canonical dataset (issue 17):

    python benchmarks/int8_study.py --bundle B --dataset benchmarks/results/camvid-canonical \\
        --out benchmarks/results/int8-study-18 --estimators quantile,quantile_minmax

For each range estimator the FP32 IR is quantized once with ``segcore optimize``'s defaults
(``segcore.optimize.quantize_ir``, scope "full"). Every variant is then a copy of that INT8 model
in which some FakeQuantize operations are bypassed (their consumers read the float input again):
"float X" keeps part X in floating point, "only X" quantizes X alone. The ranges of the other
quantizers stay as calibrated, so each row isolates what X's quantization costs. A FakeQuantize
belongs to the part of the operation it feeds (a convolution's weights and input belong to that
convolution's stage). Parts: the stem, each backbone stage, the aggregator, the decode head, and
across stages the inputs of the fuse layers' additions, of the concatenations, and of the
upsampling resizes.

Each variant's CamVid val mean Dice is measured on the OpenVINO CPU plugin at its default
precision; with --latency, the chosen variants are also written as IRs, read back and timed at
the plugin's default precision and with f32 forced (batch 1, a 512x512 uint8 image, the IR's own
pre- and post-processing included, median of interleaved rounds of 10 runs, as
benchmarks/bench_deploy.py times).
Results go to OUT/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PARTS = {
    "stem": r"__module\.model\.backbone\.stem[./].*",
    "aggregator": r"__module\.model\.backbone\.aggregator[./].*",
    "head": r"__module\.model\.decode_head[./].*",
}
STAGE = re.compile(r"__module\.model\.backbone\.(stage\d+)[./].*")


def part_of(owner: str) -> str:
    stage = STAGE.fullmatch(owner)
    if stage:
        return stage.group(1)
    return next((name for name, pattern in PARTS.items() if re.fullmatch(pattern, owner)), "other")


def quantizer_groups(model) -> dict[str, set[str]]:
    """FakeQuantize names by the part of the network they feed, and by the kind of consumer."""
    from segcore.optimize import module_names

    owners = module_names(model)
    groups: dict[str, set[str]] = defaultdict(set)
    for node in model.get_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        name = node.get_friendly_name()
        consumers = sorted(
            (t.get_node() for t in node.output(0).get_target_inputs()), key=lambda n: n.get_friendly_name()
        )
        groups["all"].add(name)
        for consumer in consumers:
            owner = owners.get(consumer.get_friendly_name(), consumer.get_friendly_name())
            part = part_of(owner)
            groups[part].add(name)
            kind = consumer.get_type_name()
            if kind == "Add" and part.startswith("stage") and "/aten::add" in owner:
                groups["fuse additions"].add(name)
            elif kind == "Concat":
                groups["concat inputs"].add(name)
            elif kind == "Interpolate":
                groups["upsampling inputs"].add(name)
            if node.input_value(0).get_node().get_type_name() == "Constant":
                groups["weights"].add(name)
    return dict(groups)


def bypassed(model, names: set[str]):
    """A copy of ``model`` whose FakeQuantize ops in ``names`` pass their input through."""
    copy = model.clone()
    for node in copy.get_ops():
        if node.get_type_name() == "FakeQuantize" and node.get_friendly_name() in names:
            source = node.input_value(0)
            for target in list(node.output(0).get_target_inputs()):
                target.replace_source_output(source)
    copy.validate_nodes_and_infer_types()
    return copy


def variants(groups: dict[str, set[str]]) -> dict[str, set[str]]:
    """Variant name -> the quantizers it bypasses."""
    everything = groups["all"]
    out = {"INT8 full": set()}
    for part in sorted(groups):
        if part == "all":
            continue
        out[f"float {part}"] = groups[part]
        if part not in ("weights",):
            out[f"only {part}"] = everything - groups[part]
    return out


def compile_model(model, config: dict):
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})


def dice(compiled, items, labels, ignore) -> dict:
    """{"mdice": mean Dice, "dice": {class: Dice}} of a compiled IR on (image, mask) items."""
    from segcore.scoring import score_items

    def predict(image):
        return compiled(image[None])[0][0].argmax(0)

    scores = score_items(predict, items, labels, ignore)
    return {"mdice": scores["mdice"], "dice": {k: v["dice"] for k, v in scores["per_class"].items()}}


def timed(compiled_models: dict, image, iters: int, warmup: int = 10) -> dict[str, float]:
    """Median ms per call of each compiled model, in interleaved rounds of 10 calls."""
    requests = {name: c.create_infer_request() for name, c in compiled_models.items()}
    times: dict[str, list[float]] = {name: [] for name in requests}
    for request in requests.values():
        for _ in range(warmup):
            request.infer({0: image[None]})
    for _ in range(max(1, iters // 10)):
        for name, request in requests.items():
            for _ in range(10):
                started = time.perf_counter()
                request.infer({0: image[None]})
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--dataset", required=True, help="canonical dataset the bundle was trained on")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=512, help="network input size (default 512, as OTX)")
    ap.add_argument("--calibration", type=int, default=64, help="calibration images (default 64)")
    ap.add_argument("--estimators", default="quantile", help="comma-separated range estimators")
    ap.add_argument("--val-images", type=int, default=0, help="score on the first N val images (0: all)")
    ap.add_argument("--latency", default="", help="comma-separated variant names to time too ('' none)")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import openvino as ov
    from ablate_recipe import machine

    from segcore.export import export_bundle, read_ir, read_meta
    from segcore.optimize import _items, quantize_ir, quantized_layers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32_xml = out / "fp32" / "model.xml"
    if not fp32_xml.exists():
        export_bundle(args.bundle, out / "fp32", input_size=(args.size, args.size))
    fp32, _ = read_ir(fp32_xml)
    meta = read_meta(fp32, fp32_xml)
    items = _items(Path(args.dataset), "val")
    items = items[: args.val_images] if args.val_images else items
    labels, ignore = meta["labels"], meta["ignore_index"]
    config = {"INFERENCE_NUM_THREADS": args.threads}
    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "openvino": ov.get_version(),
        "bundle": args.bundle, "template": meta["template"], "size": args.size, "calibration": args.calibration,
        "val_images": len(items), "rows": [],
    }  # fmt: skip
    base = dice(compile_model(fp32, config), items, labels, ignore)
    results["rows"].append({"estimator": "-", "variant": "FP32", "mdice": base["mdice"], "dice": base["dice"]})
    print(f"FP32: {base['mdice']:.4f}", flush=True)
    to_time = {"FP32": fp32}
    for estimator in [e.strip() for e in args.estimators.split(",") if e.strip()]:
        started = time.perf_counter()
        int8 = quantize_ir(fp32.clone(), meta, Path(args.dataset), args.calibration, range_estimator=estimator)
        seconds = time.perf_counter() - started
        groups = quantizer_groups(int8)
        print(f"{estimator}: calibrated in {seconds:.0f} s; quantizers per group:",
              {k: len(v) for k, v in groups.items()}, flush=True)  # fmt: skip
        for name, names in variants(groups).items():
            model = bypassed(int8, names)
            score = dice(compile_model(model, config), items, labels, ignore)
            row = {
                "estimator": estimator, "variant": name, "mdice": score["mdice"],
                "drop": base["mdice"] - score["mdice"], "bypassed": len(names),
                "quantized_layers": quantized_layers(model), "dice": score["dice"], "calibration_s": round(seconds),
            }  # fmt: skip
            results["rows"].append(row)
            print(f"  {name:<28} mDice {row['mdice']:.4f} (drop {row['drop']:+.4f}), "
                  f"{row['quantized_layers']} int8 layers", flush=True)  # fmt: skip
            if name in args.latency.split(","):
                to_time[f"{estimator}: {name}"] = model
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if len(to_time) > 1:
        # timed as written to disk and read back, as a user runs them (weights stored in int8)
        for i, (name, model) in enumerate(list(to_time.items())):
            ov.save_model(model, out / "timed" / f"{i}.xml")
            to_time[name] = ov.Core().read_model(out / "timed" / f"{i}.xml")
        image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        f32 = {**config, "INFERENCE_PRECISION_HINT": "f32"}
        compiled = {f"{n} | default": compile_model(m, config) for n, m in to_time.items()}
        compiled.update({f"{n} | f32": compile_model(m, f32) for n, m in to_time.items()})
        results["latency_ms"] = timed(compiled, image, args.iters)
        for name, ms in results["latency_ms"].items():
            print(f"  latency {name:<48} {ms:.1f} ms", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
