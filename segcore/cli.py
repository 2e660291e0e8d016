"""Command-line entry point: argument parsing only; the work lives in segcore modules.

Each sub-command is a module in ``segcore.commands`` exposing ``add_parser(subparsers)``
(which registers the parser and sets ``func``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from importlib.metadata import entry_points

from segcore import __version__
from segcore.errors import SegcoreError

COMMANDS = ("convert", "demo_data", "templates", "train", "pretrain", "evaluate", "export", "optimize")
# More commands come from installed packages through this entry-point group (the Kubeflow
# pipeline's `segcore pipeline`, in pipelines/cli.py): the core never imports the adapters above it.
PLUGIN_GROUP = "segcore.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segcore",
        description="Semantic segmentation MLOps: convert data, train Lite-HRNet models, "
        "evaluate, export to OpenVINO and quantize with NNCF.",
    )
    parser.add_argument("--version", action="version", version=f"segcore {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"segcore.commands.{name}").add_parser(sub)
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        entry.load().add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a command may re-launch itself (torchrun)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except SegcoreError as exc:
        print(f"segcore {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"segcore {args.command}: interrupted", file=sys.stderr)
        return 130


def quiet() -> bool:
    """True when progress bars should stay off (CI, or SEGCORE_QUIET set)."""
    return os.environ.get("CI", "").lower() == "true" or bool(os.environ.get("SEGCORE_QUIET"))


if __name__ == "__main__":
    sys.exit(main())
