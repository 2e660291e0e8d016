"""Loading backbone weights from a checkpoint file (``--load-weights``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from segcore.errors import SegcoreError

__all__ = ["backbone_state_dict", "is_bundle", "load_backbone_weights", "load_bundle_weights"]

log = logging.getLogger(__name__)

# Wrappers around the tensors: mmcv/mmseg ("state_dict"), OTX 2 / Lightning ("state_dict"),
# plain training scripts ("model").
_WRAPPER_KEYS = ("state_dict", "model")
# Parts of OTX's ImageNet-pretrained Lite-HRNet checkpoints that only serve classification
# (OTE configs drop them with ``ignore_keys``).
_CLASSIFIER_ONLY = ("increase_modules.", "downsample_modules.", "final_layer.")
# BN batch counters, which old checkpoints lack.
_OPTIONAL = ("num_batches_tracked",)
# The iterative aggregator belongs to the backbone only in the Lite-HRNet-18 template; ImageNet
# checkpoints never have it, and a Lite-HRNet-18 checkpoint has one that 18-mod2 keeps in its head.
_AGGREGATOR = "aggregator."


def _unwrap(obj: object) -> Mapping[str, torch.Tensor] | None:
    """The dict of tensors, possibly nested under a wrapper key."""
    for _ in range(3):
        if not isinstance(obj, Mapping) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def backbone_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the backbone: strip everything up to ``backbone.`` (``module.``,
    ``model.model.``, ...) when such keys exist; otherwise assume backbone-only keys."""
    marked = {k.split("backbone.", 1)[1]: v for k, v in state.items() if "backbone." in k}
    if marked:
        return marked
    return {k.removeprefix("module."): v for k, v in state.items()}


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_backbone_weights(model: nn.Module, path: str | Path) -> int:
    """Load backbone weights from ``path`` into ``model.backbone``; return the tensor count.

    ``path`` may also be the folder ``segcore pretrain`` wrote. Accepts checkpoints of the same
    architecture in segcore, OTX 1.x (mmseg) or OTX 2.x naming: a bare state dict or one wrapped
    in ``state_dict``/``model``, keys with or without a
    ``backbone.`` (or ``module.``, ``model.model.backbone.``) prefix. Classification-only parts
    of ImageNet checkpoints are skipped. Anything else that does not match raises a
    ``SegcoreError`` naming the file and the first offending keys.
    """
    path = Path(path)
    if path.is_dir() and (path / "pretrain.json").is_file():  # a `segcore pretrain` output folder
        path = path / json.loads((path / "pretrain.json").read_text()).get("weights", "backbone.pt")
    backbone = getattr(model, "backbone", model)
    if not path.is_file():
        raise SegcoreError("weights file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle is the file's fault
        raise SegcoreError(f"cannot read weights ({type(exc).__name__}: {exc})", path) from exc
    state = _unwrap(obj)
    if state is None:
        raise SegcoreError(
            "no state dict of tensors found (expected a dict of tensors, maybe under 'state_dict')", path
        )

    source = {k: v for k, v in backbone_state_dict(state).items() if not k.startswith(_CLASSIFIER_ONLY)}
    target = backbone.state_dict()
    skipped = [k for k in source if k.startswith(_AGGREGATOR) and k not in target]
    if skipped:
        log.info("%s: ignoring %d aggregator tensors this model keeps outside its backbone", path, len(skipped))
        source = {k: v for k, v in source.items() if k not in skipped}
    missing = [k for k in target if k not in source and not k.startswith(_AGGREGATOR) and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in source if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        raise SegcoreError(
            "backbone weights do not match this model's architecture; "
            + "; ".join(parts)
            + ". Use a checkpoint of the same Lite-HRNet variant.",
            path,
        )
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in source.items() if v.shape != target[k].shape
    ]
    if mismatched:
        raise SegcoreError(f"{len(mismatched)} tensors have the wrong shape: {_first(mismatched, 3)}", path)

    backbone.load_state_dict(source, strict=False)
    log.info("loaded %d backbone tensors from %s", len(source), path)
    return len(source)


CLASSIFIER = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a finished training's folder (what ``--load-weights`` extends by class)."""
    return Path(path, "model.json").is_file()


def load_bundle_weights(
    model: nn.Module, bundle: str | Path, template_id: str, labels: list[str], allow_dropped: bool = False
) -> dict:
    """Class-incremental start: every weight of a trained bundle of the same template, with the
    classifier's rows matched to ``labels`` by class name (new classes keep their fresh
    initialisation; old classes the new data lacks are refused unless ``allow_dropped``).
    Returns what happened: {"bundle", "kept", "added", "dropped"}."""
    bundle = Path(bundle)
    meta = json.loads((bundle / "model.json").read_text())
    if meta.get("template") != template_id:
        raise SegcoreError(f"was trained with {meta.get('template')}, not {template_id}: choose that template", bundle)
    weights = bundle / meta.get("weights", "best.pt")
    try:
        saved = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    except Exception as exc:  # a damaged or foreign file
        raise SegcoreError(f"cannot read the bundle's weights ({type(exc).__name__}: {exc})", weights) from exc
    old = list(meta["labels"])
    kept = [name for name in labels if name in old]
    added = [name for name in labels if name not in old]
    dropped = [name for name in old if name not in labels]
    if dropped and not allow_dropped:
        raise SegcoreError(
            f"the data has no class {', '.join(dropped)} of this model; label them, or pass "
            "--allow-dropped-classes to forget them",
            bundle,
        )
    if not kept:
        raise SegcoreError(f"shares no class with the data (model: {', '.join(old)})", bundle)
    target = model.state_dict()
    body = {k: v for k, v in saved.items() if k not in CLASSIFIER}
    missing = [k for k in target if k not in CLASSIFIER and k not in body]
    unexpected = [k for k in body if k not in target]
    wrong = [k for k, v in body.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or wrong:
        raise SegcoreError(
            f"the bundle's weights do not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} of another shape: {_first(missing + unexpected + wrong, 3)})",
            weights,
        )
    model.load_state_dict(body, strict=False)
    with torch.no_grad():
        for key in CLASSIFIER:
            rows = target[key]
            for i, name in enumerate(labels):
                if name in old:
                    rows[i].copy_(saved[key][old.index(name)])  # the parameter itself (state_dict shares it)
    log.info(
        "classes from %s: kept %d (%s), added %d%s, dropped %d%s",
        bundle, len(kept), ", ".join(kept), len(added), f" ({', '.join(added)})" if added else "",
        len(dropped), f" ({', '.join(dropped)})" if dropped else "",
    )  # fmt: skip
    return {"bundle": str(bundle), "kept": kept, "added": added, "dropped": dropped}
