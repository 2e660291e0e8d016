"""A model bundle (the training output folder): its metadata and the network with its best weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from segcore.errors import SegcoreError

BUNDLE_META = "model.json"


def load_bundle(bundle: str | Path) -> tuple[torch.nn.Module, dict]:
    """(segmenter in eval mode with the bundle's weights, bundle metadata); clear errors for a
    folder that is not a finished bundle or weights that do not fit."""
    from segcore.models import create_model, get_template

    path = Path(bundle)
    meta_path = path / BUNDLE_META
    if not meta_path.is_file():
        if (path / "last.pt").is_file():
            raise SegcoreError("training has not finished here (no model.json); resume it first", path)
        raise SegcoreError("not a segcore model bundle (no model.json)", path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SegcoreError(f"unreadable bundle metadata ({exc})", meta_path) from None
    weights = path / meta["weights"]
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise SegcoreError(f"cannot load weights ({' '.join(str(exc).split())[:200]})", weights) from None
    model = create_model(get_template(meta["template"]), len(meta["labels"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise SegcoreError(f"weights do not fit {meta['template']} ({str(exc)[:160]})", weights) from None
    model.eval()
    return model, meta
