"""``segcore templates``: list the model templates with complexity measured on the built models."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
List the Lite-HRNet model templates (use the ID or the name with --template) with their
complexity, measured by building each model and running one image through it:
GFLOPs as counted by torch.utils.flop_counter (2 FLOPs per multiply-add, convolutions only),
GMACs (multiply-accumulates, the unit mmcv-style counters call FLOPs), parameters in millions
and fp32 weight size in MB (1e6 bytes, parameters + BatchNorm statistics). The "ref" columns are
the figures published with the OTX templates, which come from older model versions.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "templates",
        help="list model templates with GFLOPs, parameters and size",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--num-classes", type=int, default=11, metavar="N", help="classes of the measured models (default: 11)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=(512, 512),
        metavar=("HEIGHT", "WIDTH"),
        help="input size of the measurement (default: 512 512)",
    )
    parser.set_defaults(func=run)
    return parser


def collect(num_classes: int = 11, input_size: tuple[int, int] = (512, 512)) -> list[dict]:
    """One record per template: ID, name, measured complexity and the published figures."""
    from segcore.models import TEMPLATES, complexity, create_model

    rows = []
    for template in TEMPLATES:
        measured = complexity(create_model(template, num_classes), input_size)
        rows.append(
            {
                "id": template.id,
                "name": template.name,
                "gflops": round(measured["gflops"], 3),
                "gmacs": round(measured["gmacs"], 3),
                "params_m": round(measured["params_m"], 4),
                "size_mb": round(measured["size_mb"], 2),
                "reference_gflops": template.reference_gflops,
                "reference_size_mb": template.reference_size_mb,
                "input_size": list(input_size),
                "num_classes": num_classes,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    headers = ("ID", "Name", "GFLOPs", "GMACs", "Params (M)", "Size (MB)", "Ref GFLOPs", "Ref MB")
    keys = ("id", "name", "gflops", "gmacs", "params_m", "size_mb", "reference_gflops", "reference_size_mb")
    formats = ("{}", "{}", "{:.2f}", "{:.2f}", "{:.3f}", "{:.2f}", "{:.2f}", "{:.1f}")
    cells = [[f.format(row[k]) for k, f in zip(keys, formats, strict=True)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def run(args: argparse.Namespace) -> int:
    input_size = (int(args.input_size[0]), int(args.input_size[1]))
    if args.num_classes < 1 or min(input_size) < 32:
        from segcore.errors import SegcoreError

        raise SegcoreError("--num-classes must be >= 1 and --input-size at least 32 x 32")
    rows = collect(args.num_classes, input_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows))
    print(
        f"\nMeasured at {input_size[0]}x{input_size[1]}, batch 1, {args.num_classes} classes. "
        "GFLOPs: torch FlopCounterMode (2 per multiply-add); GMACs = GFLOPs / 2.\n"
        "Ref: OTX template metadata (older OTE 0.x models, not reproducible from these architectures)."
    )
    return 0
