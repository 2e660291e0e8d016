"""Self-supervised pretraining (DetCon): segments, mask pooling, the loss against a scalar
reference, the views, and `segcore pretrain` end to end (round trip into training, resume, S3 and
MLflow, refusals)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.cli import main
from segcore.data.segments import felzenszwalb
from segcore.data.synthetic import generate
from segcore.errors import SegcoreError
from segcore.models import create_model, get_template
from segcore.models.weights import load_backbone_weights
from segcore.pretrain import PretrainConfig, PretrainViews, compute_segments, detcon_loss, pool_masks, pretrain

TEMPLATE = "Lite-HRNet-s-mod2"
TINY = ["--input-size", "64x64", "--batch-size", "4", "--num-workers", "0", "--epochs", "2"]


def test_felzenszwalb_finds_flat_regions_and_merges_small_ones():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = (200, 40, 40)  # two flat halves
    image[2:4, 2:4] = 255  # a 4-pixel speck
    labels = felzenszwalb(image, scale=10, sigma=0, min_size=1)
    assert labels.max() + 1 == 3 and labels[0, 0] == 0  # numbered from the first pixel
    assert len(np.unique(labels[:, :15][labels[:, :15] != labels[2, 2]])) == 1
    merged = felzenszwalb(image, scale=10, sigma=0, min_size=10)
    assert merged.max() + 1 == 2 and merged[2, 2] == merged[0, 0] and merged[0, 0] != merged[0, 29]


def test_pool_masks_averages_inside_each_segment():
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    ids = torch.zeros(2, 8, 8, dtype=torch.int64)
    ids[:, :, 4:] = 1  # right half is segment 1 (maps exactly onto feature columns 2-3)
    picked = torch.tensor([[1, 0, 7], [0, 0, 1]])
    pooled, present = pool_masks(features, ids, picked)
    assert present.tolist() == [[True, True, False], [True, True, True]]
    assert torch.allclose(pooled[0, 0], features[0, :, :, 2:].mean((1, 2)))
    assert torch.allclose(pooled[0, 1], features[0, :, :, :2].mean((1, 2)))
    assert torch.allclose(pooled[1, 2], features[1, :, :, 2:].mean((1, 2)))


def _reference_loss(q, t, valid, picked, temperature):
    """The loss row by row with Python scalars."""
    n, k = picked.shape
    owner = [i // k for i in range(n * k)]
    flat = picked.reshape(-1).tolist()
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    qn, tn = [unit(v) for v in q.tolist()], [unit(v) for v in t.tolist()]
    total, rows = 0.0, 0
    for i in range(n * k):
        if not valid[i]:
            continue
        logits = {}
        for j in range(n * k):
            same_segment = owner[i] == owner[j] and flat[i] == flat[j]
            if not valid[j] or (same_segment and i != j):
                continue
            logits[j] = sum(a * b for a, b in zip(qn[i], tn[j], strict=True)) / temperature
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits.values()))
        rows += 1
    return total / rows


def test_detcon_loss_matches_a_scalar_reference():
    torch.manual_seed(0)
    picked = torch.tensor([[3, 5, 3], [1, 2, 4]])  # image 0 drew segment 3 twice
    q, t = torch.randn(6, 4), torch.randn(6, 4)
    valid = torch.tensor([True, True, True, True, False, True])
    loss, accuracy = detcon_loss(q, t, valid, picked, 0.1)
    assert loss.item() == pytest.approx(_reference_loss(q, t, valid.tolist(), picked, 0.1), rel=1e-5)
    perfect, acc = detcon_loss(t * 3, t, torch.ones(6, dtype=torch.bool), torch.arange(6).reshape(2, 3), 0.1)
    assert acc.item() == 1.0 and perfect.item() < loss.item()


def _images(tmp_path, count=8) -> Path:
    gen = generate(tmp_path / "raw", "plain", num_train=count, num_val=0, size=(72, 80), seed=5)
    folder = tmp_path / "photos"
    shutil.copytree(gen.root / "images" / "train", folder / "nested")
    return folder


def test_views_follow_the_same_segments_and_are_seeded(tmp_path):
    files = sorted((_images(tmp_path, 2) / "nested").iterdir())
    config = PretrainConfig(template=TEMPLATE, input_size=(64, 64), masks_per_image=5)
    segments = compute_segments(files, config.segment_scale, workers=0)
    data = PretrainViews(files, segments, config)
    one, two, ids_one, ids_two, picked = data[(1, 0)]
    assert one.shape == two.shape == (3, 64, 64) and ids_one.shape == (64, 64) and picked.shape == (5,)
    in_both = set(ids_one.unique().tolist()) & set(ids_two.unique().tolist())
    assert set(picked.tolist()) <= in_both
    again = data[(1, 0)]
    assert all(torch.equal(a, b) for a, b in zip(again, (one, two, ids_one, ids_two, picked), strict=True))
    assert not torch.equal(data[(2, 0)][0], one)  # another epoch, other views


def test_pretrain_then_train_round_trip(tmp_path, capsys):
    photos = _images(tmp_path)
    out = tmp_path / "pre"
    assert main(["pretrain", TEMPLATE, "--data-root", str(photos), "--output", str(out), *TINY, "--json"]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta["epochs_run"] == 2 and meta["images"] == 8 and math.isfinite(meta["final_loss"])
    assert (out / "backbone.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 2

    saved = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
    model = create_model(get_template(TEMPLATE), 3)
    assert load_backbone_weights(model, out) == len(saved)  # the folder is accepted as --load-weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())

    labelled = generate(tmp_path / "labelled", "plain", num_train=4, num_val=2, size=(64, 64), seed=6)
    assert main(["train", TEMPLATE, "--train-data-root", str(labelled.root), "--output", str(tmp_path / "fine"),
                 "--load-weights", str(out), "--epochs", "1", "--input-size", "64x64", "--batch-size", "4",
                 "--num-workers", "0"]) == 0  # fmt: skip
    assert (tmp_path / "fine" / "model.json").is_file()

    assert main(["pretrain", TEMPLATE, "--data-root", str(photos), "--output", str(out), *TINY]) == 2
    assert "holds a finished pretraining" in capsys.readouterr().err


def test_pretrain_resume_continues_exactly(tmp_path):
    photos = _images(tmp_path)
    files = sorted((photos / "nested").iterdir())
    config = PretrainConfig(template=get_template(TEMPLATE).id, epochs=3, batch_size=4, input_size=(64, 64),
                            num_workers=0, precision="fp32")  # fmt: skip
    whole = pretrain(config, files, tmp_path / "whole")

    class Crash(Exception):
        pass

    def crash_after_two(record):
        if record["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        pretrain(config, files, tmp_path / "parts", on_epoch=crash_after_two)
    with pytest.raises(SegcoreError, match="unfinished pretraining"):
        pretrain(config, files, tmp_path / "parts")
    with pytest.raises(SegcoreError, match="other settings"):
        pretrain(PretrainConfig(**{**config.__dict__, "lr": 0.01}), files, tmp_path / "parts", resume=True)
    parts = pretrain(config, files, tmp_path / "parts", resume=True)
    assert parts["final_loss"] == whole["final_loss"] and parts["epochs_run"] == 3
    a = torch.load(tmp_path / "whole" / "backbone.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "parts" / "backbone.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_refuses_bad_input(tmp_path, capsys):
    photos = _images(tmp_path, 3)
    assert main(["pretrain", TEMPLATE, "--data-root", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["pretrain", TEMPLATE, "--data-root", str(photos), "--output", str(tmp_path / "o"), *TINY,
                 "--batch-size", "4"]) == 2  # fmt: skip
    assert "fewer than one batch" in capsys.readouterr().err
    assert main(["pretrain", TEMPLATE, "--data-root", str(photos), "--output", str(tmp_path / "p"),
                 "--device", "cuda:7"]) != 0 or torch.cuda.device_count() > 7  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_pretrain_from_and_to_s3_is_tracked(tmp_path, tracking_env):
    from mlflow import MlflowClient

    from segcore import storage

    photos = _images(tmp_path)
    bucket = tracking_env.s3.bucket
    storage.sync_up(photos, storage.parse_s3_uri(f"s3://{bucket}/pre/photos"))
    out = f"s3://{bucket}/pre/out"
    assert main(["pretrain", TEMPLATE, "--data-root", f"s3://{bucket}/pre/photos", "--output", out, *TINY,
                 "--experiment", "pretrain-test"]) == 0  # fmt: skip
    local = storage.local_input(out)
    assert json.loads((local / "pretrain.json").read_text())["epochs_run"] == 2
    client = MlflowClient(tracking_uri=tracking_env.url)
    run = client.search_runs([client.get_experiment_by_name("pretrain-test").experiment_id])[0]
    assert run.data.tags["segcore.step"] == "pretrain" and run.info.status == "FINISHED"
    assert run.data.params["method"] == "detcon" and run.data.params["image_count"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
