"""A self-contained HTML page of a scoring: summary numbers, per-class Dice/IoU and overlays."""

from __future__ import annotations

import base64


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
