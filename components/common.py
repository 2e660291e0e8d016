"""What the component functions share: the factory that makes a kfp component of a function, and
the helpers their bodies call at run time.

kfp puts only a component function's own source into the compiled YAML, so every body imports what
it needs inside the function (``from components import common``): the image has segcore,
``components`` and ``pipelines`` installed, and so has the local virtualenv.

Tracking: every step is an MLflow run nested under the pipeline's parent run, which the first step
(convert) creates and hands on as ``mlflow_parent_run_id``; the last step (validation of the INT8
model) logs the headline numbers on it and marks it finished, and a failing step marks it failed.
A cluster whose Kubeflow MLflow integration injects ``MLFLOW_RUN_ID`` gets no parent of ours:
each step then logs into the run Kubeflow made for it.
"""

import argparse
import base64
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("segcore.components")

# What scripts/build_image.sh tags; `segcore pipeline compile --image` puts another on every step.
DEFAULT_IMAGE = "localhost/segcore:dev"
PARENT_STEP = "pipeline"


def make_component(func: Callable, image: str = DEFAULT_IMAGE):
    """A kfp v2 lightweight Python component of ``func`` running in ``image``.

    ``install_kfp_package=False``: the image carries the kfp that compiled the pipeline, so a step
    starts without network (no ``pip install kfp`` in the container command)."""
    from kfp import dsl

    return dsl.component(func, base_image=image, install_kfp_package=False)


# ---------------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> None:
    """``segcore ARGV`` in this process; a non-zero exit is an exception (the CLI has already printed
    its one-line error on stderr)."""
    from segcore.cli import main
    from segcore.tracking import redact

    log.info("segcore %s", redact(" ".join(argv)))
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"segcore {argv[0]} failed (exit code {code}); its error is printed above")


def flags(pairs: dict[str, object]) -> list[str]:
    """CLI flags of the values that are set (empty strings, None and zeros mean 'default')."""
    out: list[str] = []
    for flag, value in pairs.items():
        if value in (None, "", 0, 0.0) or value is False:
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


# ---------------------------------------------------------------------------------- tracking


def tracking_args(
    tracking: bool, uri: str, experiment: str, parent_run_id: str = "", run_name: str | None = None
) -> argparse.Namespace:
    """The tracking settings of a step as ``segcore.tracking`` reads them from a command line."""
    return argparse.Namespace(
        no_tracking=not tracking,
        tracking_uri=uri or None,
        experiment=experiment or None,
        parent_run_id=parent_run_id or None,
        run_name=run_name,
    )


def tracking_flags(tracking: bool, uri: str, experiment: str, parent_run_id: str = "") -> list[str]:
    """The same settings as ``segcore`` flags (for steps that run a CLI command)."""
    if not tracking:
        return ["--no-tracking"]
    return flags({"--tracking-uri": uri, "--experiment": experiment, "--parent-run-id": parent_run_id})


def _client(args: argparse.Namespace):
    from mlflow.tracking import MlflowClient

    from segcore.tracking import settings_from

    settings = settings_from(args)
    if settings is None or not args.parent_run_id:
        return None
    return MlflowClient(tracking_uri=settings.uri)


def start_parent_run(args: argparse.Namespace, name: str, params: dict) -> str:
    """Create the pipeline's MLflow parent run (left RUNNING: the last step finishes it); its id, or
    "" when tracking is off or Kubeflow injected a run of its own (``MLFLOW_RUN_ID``)."""
    from segcore.tracking import settings_from, start_run

    settings = settings_from(args)
    if settings is None:
        return ""
    if settings.injected_run_id:
        log.info("MLFLOW_RUN_ID is set (Kubeflow's MLflow integration): no segcore parent run")
        return ""
    tracker = start_run(settings, PARENT_STEP, name, tags={"segcore.pipeline": "true"})
    tracker.owns_run = False  # stays RUNNING after this step
    tracker.log_params(params)
    tracker.close()
    log.info("MLflow parent run of this pipeline: %s", tracker.run_id)
    return tracker.run_id


def update_parent(args: argparse.Namespace, *, metrics: dict | None = None, status: str | None = None) -> None:
    """Log ``metrics`` on the parent run and/or set its status; never fails the step."""
    try:
        client = _client(args)
        if client is None:
            return
        if metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
            client.log_batch(args.parent_run_id, metrics=items)
        if status == "RUNNING":
            if client.get_run(args.parent_run_id).info.status != "RUNNING":
                client.update_run(args.parent_run_id, status="RUNNING")
        elif status:
            client.set_terminated(args.parent_run_id, status)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a step
        log.warning("could not update the MLflow parent run %s: %s", args.parent_run_id, exc)


@contextlib.contextmanager
def step_run(args: argparse.Namespace, step: str, *, bundle: str | None = None, tags: dict | None = None) -> Iterator:
    """The step's own (nested) MLflow run; a failure inside also marks the parent run FAILED, a
    (re)started step marks it RUNNING again (a retried step after a failed attempt)."""
    from segcore.tracking import tracking_run

    update_parent(args, status="RUNNING")
    try:
        with tracking_run(args, step, run_name=args.run_name or step, bundle=bundle, tags=tags) as tracker:
            yield tracker
    except BaseException:
        update_parent(args, status="FAILED")
        raise


@contextlib.contextmanager
def failure_marks_parent(args: argparse.Namespace) -> Iterator[None]:
    """For steps whose command makes its own run (train): only the parent's status is handled here."""
    update_parent(args, status="RUNNING")
    try:
        yield
    except BaseException:
        update_parent(args, status="FAILED")
        raise


# ---------------------------------------------------------------------------------- training


def checkpoint_prefix(checkpoint_uri: str, dataset_hash: str, template: str, settings: dict) -> str:
    """Where a training keeps its checkpoints under ``checkpoint_uri``: one folder per dataset
    content, template and training settings, so a retried attempt finds its own checkpoints and
    nothing else does."""
    import hashlib
    import json

    key = json.dumps([dataset_hash, template, sorted(settings.items())], default=str)
    return f"{checkpoint_uri.rstrip('/')}/train-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------- validation


def measure_latency(predict: Callable, images: list, repeats: int = 3) -> float:
    """Median milliseconds of one ``predict(image)`` (after one warm-up call)."""
    if not images:
        return 0.0
    predict(images[0])
    times = []
    for _ in range(repeats):
        for image in images:
            started = time.perf_counter()
            predict(image)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def png_base64(rgb) -> str:
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(data.tobytes()).decode("ascii")


def overlay_panel(image, truth, prediction, colors: list, ignore_index: int):
    """image | ground truth | prediction, the masks blended over the image (RGB uint8)."""
    import numpy as np

    from segcore.inference import overlay

    truth = truth.copy()
    truth[truth == ignore_index] = 0
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.hstack([image, gap, overlay(image, truth, colors), gap, overlay(image, prediction, colors)])


def html_report(title: str, scores: dict, summary: dict, panels: list[tuple[str, str]], colors: list) -> str:
    """A self-contained HTML page: summary numbers, per-class Dice/IoU and overlays (base64 PNGs)."""
    from html import escape

    def num(value) -> str:
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else escape(str(value))

    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{num(v)}</td></tr>" for k, v in summary.items())
    classes = ""
    for i, (name, s) in enumerate(scores["per_class"].items()):
        r, g, b = (colors[i] if i < len(colors) else (0, 0, 0))[:3]
        swatch = f'<span style="display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b})"></span>'
        bar = int(round(200 * (s["dice"] or 0.0)))
        classes += (
            f"<tr><td>{swatch} {escape(name)}</td><td>{num(s['dice'])}</td><td>{num(s['iou'])}</td>"
            f'<td><div style="width:{bar}px;height:10px;background:#4a7fc1"></div></td></tr>'
        )
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(item)}">'
        f"<figcaption>{escape(item)}: image | ground truth | prediction</figcaption></figure>"
        for item, data in panels
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
img{{width:100%;max-width:1200px;image-rendering:pixelated}} figure{{margin:0 0 1em 0}}</style></head>
<body><h2>{escape(title)}</h2>
<table>{rows}</table>
<h3>Per class</h3>
<table><tr><th>class</th><th>Dice</th><th>IoU</th><th></th></tr>{classes}</table>
<h3>Predictions</h3>{figures}
</body></html>
"""


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """NNCF and OpenVINO print progress on stdout; keep a step's stdout for its own messages."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def size_flag(text: str) -> str:
    """'64' or '64x64' as given, validated early with segcore's own parser ('' stays '')."""
    if not text:
        return ""
    from segcore.commands.demo_data import parse_size

    h, w = parse_size(text)
    return f"{h}x{w}"


def read_json(path: str | Path) -> dict:
    import json

    return json.loads(Path(path).read_text())
