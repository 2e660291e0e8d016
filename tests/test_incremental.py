"""Class-incremental training: a trained bundle's classes matched to new data by name."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from segcore.cli import main
from segcore.data.synthetic import generate
from segcore.errors import SegcoreError
from segcore.models import create_model, get_template
from segcore.models.weights import CLASSIFIER, load_bundle_weights

TEMPLATE = get_template("Lite-HRNet-s-mod2")


def _bundle(tmp_path, labels: list[str], seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(TEMPLATE, len(labels))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every tensor distinguishable from a fresh model's
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 1, "mdice": 0.5}, folder / "best.pt")
    (folder / "model.json").write_text(json.dumps({"template": TEMPLATE.id, "labels": labels, "weights": "best.pt"}))
    return folder, model


def test_classes_are_matched_by_name_reordered_and_added(tmp_path):
    folder, old = _bundle(tmp_path, ["background", "road", "car"])
    torch.manual_seed(1)
    new = create_model(TEMPLATE, 4)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    labels = ["car", "background", "person", "road"]
    info = load_bundle_weights(new, folder, TEMPLATE.id, labels)
    assert info["kept"] == ["car", "background", "road"] and info["added"] == ["person"] and info["dropped"] == []
    got, was = new.state_dict(), old.state_dict()
    for key, value in was.items():
        if key not in CLASSIFIER:
            assert torch.equal(got[key], value), key
    for key in CLASSIFIER:
        for i, name in enumerate(labels):
            want = was[key][["background", "road", "car"].index(name)] if name != "person" else fresh[key][i]
            assert torch.equal(got[key][i], want), (key, name)


def test_dropped_classes_are_refused_unless_allowed(tmp_path):
    folder, old = _bundle(tmp_path, ["background", "road", "car"])
    new = create_model(TEMPLATE, 2)
    with pytest.raises(SegcoreError, match="no class car of this model.*--allow-dropped-classes"):
        load_bundle_weights(new, folder, TEMPLATE.id, ["road", "background"])
    info = load_bundle_weights(new, folder, TEMPLATE.id, ["road", "background"], allow_dropped=True)
    assert info["dropped"] == ["car"]
    assert torch.equal(new.state_dict()[CLASSIFIER[0]][0], old.state_dict()[CLASSIFIER[0]][1])
    with pytest.raises(SegcoreError, match="shares no class"):
        load_bundle_weights(create_model(TEMPLATE, 1), folder, TEMPLATE.id, ["sky"], allow_dropped=True)
    with pytest.raises(SegcoreError, match="not Custom_Semantic_Segmentation_Lite-HRNet-18_OCR"):
        load_bundle_weights(create_model("Lite-HRNet-18", 3), folder, get_template("Lite-HRNet-18").id, ["road"])


def test_train_adds_a_class_to_a_trained_bundle_and_resumes(tmp_path, capsys, caplog):
    old_data = generate(tmp_path / "raw3", "plain", num_train=4, num_val=2, size=(32, 32), num_classes=3, seed=1)
    new_data = generate(tmp_path / "raw5", "plain", num_train=4, num_val=2, size=(32, 32), num_classes=4, seed=2)
    tiny = ["--input-size", "32x32", "--batch-size", "4", "--num-workers", "0", "--json"]
    old = tmp_path / "old"
    assert main(["train", "Lite-HRNet-s-mod2", "--train-data-root", str(old_data.root), "--output", str(old),
                 "--epochs", "1", *tiny]) == 0  # fmt: skip
    capsys.readouterr()
    caplog.set_level(logging.INFO)
    new = tmp_path / "new"
    argv = ["train", "Lite-HRNet-s-mod2", "--train-data-root", str(new_data.root), "--output", str(new),
            "--load-weights", str(old), *tiny]  # fmt: skip
    assert main([*argv, "--epochs", "1"]) == 0
    printed = capsys.readouterr()
    meta = json.loads(printed.out.strip().splitlines()[-1])
    assert meta["labels"] == ["background", "road", "car", "person"]
    assert meta["started_from"] == {"bundle": str(old), "kept": ["background", "road", "car"], "added": ["person"],
                                    "dropped": []}  # fmt: skip
    assert "kept 3 (background, road, car), added 1 (person), dropped 0" in caplog.text
    # a resumed run (one more epoch) still says where it started
    (new / "model.json").unlink()
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["epochs_run"] == 2 and meta["started_from"]["added"] == ["person"]
    # the old model's classes must all be in the new data
    assert main(["train", "Lite-HRNet-s-mod2", "--train-data-root", str(old_data.root), "--output",
                 str(tmp_path / "fewer"), "--load-weights", str(new), "--epochs", "1", *tiny]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no class person of this model" in err and len(err.strip().splitlines()) == 1
