"""MLflow tracking against a real `mlflow server` (SQLite backend, artifacts proxied to SeaweedFS S3),
with data and outputs on S3: two trainings (one killed and resumed), what MLflow holds afterwards,
what is in the bucket, no credential anywhere, a server restart mid-training, and the small API that
eval / export / optimize and the Kubeflow components use."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from segcore import storage, tracking
from segcore.cli import main
from segcore.errors import SegcoreError

TINY = ["--input-size", "32x32", "--batch-size", "4", "--num-workers", "0"]
TEMPLATE = "Lite-HRNet-s-mod2"
EXPERIMENT = "e2e"
MODEL_NAME = f"segcore-{EXPERIMENT}-{TEMPLATE}"


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifact_files(client, run_id, f.path) if f.is_dir else [f.path]
    return out


@contextlib.contextmanager
def _interrupt_after_epoch(epoch: int, monkeypatch):
    """Make segcore.training.train raise KeyboardInterrupt (a kill) right after ``epoch`` was logged."""
    import segcore.training

    real = segcore.training.train

    def train(*args, on_epoch=None, **kwargs):
        def hook(record):
            on_epoch(record)
            if record["epoch"] == epoch:
                raise KeyboardInterrupt

        return real(*args, on_epoch=hook, **kwargs)

    monkeypatch.setattr(segcore.training, "train", train)
    yield
    monkeypatch.setattr(segcore.training, "train", real)


@pytest.fixture(scope="module")
def trained(s3_server, mlflow_server, tmp_path_factory):
    """demo-data -> convert -> two trainings of two learning rates, all on S3, tracked to the server.
    The first training is killed after epoch 1 and resumed from S3. Everything printed or logged is
    kept for the credential check."""
    bucket = s3_server.bucket
    root = f"s3://{bucket}/e2e"
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger()
    old_level = logger.level
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        mp.setenv("AWS_MAX_ATTEMPTS", "2")
        mp.setenv("SEGCORE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("SEGCORE_TRACKING", "on")
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        for name in ("MLFLOW_RUN_ID", "SEGCORE_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        storage.configure(None)
        storage.reset_client()
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            assert main(["demo-data", "--output", f"{root}/raw", "--num-train", "8", "--num-val", "4",
                         "--size", "40x48", "--seed", "3"]) == 0  # fmt: skip
            assert main(["convert", "--train-data-root", f"{root}/raw", "--output", f"{root}/dataset"]) == 0
            common = ["train", TEMPLATE, "--train-data-root", f"{root}/dataset", "--epochs", "2", *TINY,
                      "--experiment", EXPERIMENT, "--json"]  # fmt: skip
            a = [*common, "--output", f"{root}/run-a", "--lr", "0.001", "--run-name", "lr 0.001"]
            with _interrupt_after_epoch(1, mp):
                killed = main(a)
            killed_keys = s3_server.keys("e2e/run-a/")
            resumed = main([*a, "--resume"])
            b = main([*common, "--output", f"{root}/run-b", "--lr", "0.003", "--run-name", "lr 0.003"])
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            storage.reset_client()
    return {"killed": killed, "killed_keys": killed_keys, "resumed": resumed, "b": b, "text": out.getvalue()}


def test_two_trainings_on_s3_are_tracked(trained, mlflow_server, s3_server, tmp_path):
    assert (trained["killed"], trained["resumed"], trained["b"]) == (130, 0, 0)
    # the kill left checkpoints in S3 but nothing that looks finished; the resume took them
    assert "e2e/run-a/last.pt" in trained["killed_keys"] and "e2e/run-a/model.json" not in trained["killed_keys"]
    assert "resuming after epoch 1" in trained["text"]
    assert "0 files downloaded" in trained["text"]  # the dataset came from the cache the second time

    client = _client(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"lr 0.001", "lr 0.003"}  # the resumed training continued its run
    labels = ["background", "road", "car", "person"]
    for name, run in runs.items():
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        p = run.data.params
        assert p["template_name"] == TEMPLATE and p["lr"] == name.split()[1] and p["epochs"] == "2"
        assert p["labels"] == ",".join(labels) and p["train_items"] == "8" and p["val_items"] == "4"
        assert len(p["dataset_hash"]) == 64 and p["seed"] == "42" and p["segcore_version"]
        assert p["train_data_root"] == f"s3://{s3_server.bucket}/e2e/dataset"
        history = client.get_metric_history(rid, "val_dice")
        assert [m.step for m in history] == [1, 2]
        assert all(0 <= m.value <= 1 for m in history)
        for label in labels:
            assert [m.step for m in client.get_metric_history(rid, f"val_dice/{label}")] == [1, 2]
        for key in ("train_loss", "lr", "img_per_s", "epoch_seconds", "val_miou"):
            assert [m.step for m in client.get_metric_history(rid, key)] == [1, 2]
        assert run.data.metrics["best_val_dice"] == pytest.approx(max(m.value for m in history))
        assert {f"best_val_dice/{label}" for label in labels} <= set(run.data.metrics)

        files = _artifact_files(client, rid)
        assert {"plots/val_confusion_matrix.png", "plots/val_per_class_dice.png"} <= set(files)
        assert len([f for f in files if f.startswith("overlays/") and f.endswith(".png")]) == 4
        assert {"bundle/model.json", "bundle/best.pt", "bundle/metrics.jsonl", "model/MLmodel"} <= set(files)
        # ... and they are in the bucket, under the server's --artifacts-destination
        keys = s3_server.keys(f"mlartifacts/{exp.experiment_id}/{rid}/")
        for f in ("plots/val_confusion_matrix.png", "model/MLmodel", "bundle/best.pt"):
            assert f"mlartifacts/{exp.experiment_id}/{rid}/artifacts/{f}" in keys

        # the training output on S3: the bundle, the checkpoints, one metrics line per epoch
        prefix = f"e2e/run-{'a' if name == 'lr 0.001' else 'b'}/"
        out_keys = set(s3_server.keys(prefix))
        for f in ("model.json", "best.pt", "last.pt", "metrics.jsonl", "tracking.json"):
            assert prefix + f in out_keys
        body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=prefix + "metrics.jsonl")["Body"].read()
        assert [json.loads(line)["epoch"] for line in body.decode().splitlines()] == [1, 2]

    # a plot is a real PNG
    png = client.download_artifacts(runs["lr 0.003"].info.run_id, "plots/val_per_class_dice.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # two versions of one registered model; 'best' on the better one
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())
    best_run = max(runs.values(), key=lambda r: r.data.metrics["best_val_dice"])
    holder = client.get_model_version_by_alias(MODEL_NAME, "best")
    assert holder.run_id == best_run.info.run_id
    assert float(holder.tags["val_dice"]) == pytest.approx(best_run.data.metrics["best_val_dice"], abs=1e-6)

    # the registered model loads (pyfunc from code) and segments an image at its own size
    import mlflow.artifacts
    import mlflow.pyfunc

    source = client.get_model_version_download_uri(MODEL_NAME, holder.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=mlflow_server.url, dst_path=tmp_path)
    model = mlflow.pyfunc.load_model(local)
    masks = model.predict(np.random.default_rng(0).integers(0, 255, (1, 40, 48, 3), dtype=np.uint8))
    assert masks.shape == (1, 40, 48) and masks.dtype == np.uint8 and masks.max() < len(labels)


def test_no_credential_in_mlflow_logs_or_outputs(trained, mlflow_server, s3_server, tmp_path):
    secrets = [s3_server.secret_key, s3_server.access_key]
    assert "MLflow" in trained["text"] and "epoch 2" in trained["text"]  # the capture did capture
    seen = [trained["text"]]
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    seen.append(json.dumps(exp.tags))
    for run in client.search_runs([exp.experiment_id]):
        seen.append(json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics), run.info.run_name]))
        dst = tmp_path / run.info.run_id
        dst.mkdir()
        client.download_artifacts(run.info.run_id, "", str(dst))
        seen += [p.read_bytes().decode("latin-1") for p in dst.rglob("*") if p.is_file()]
    for version in client.search_model_versions(f"name='{MODEL_NAME}'"):
        seen.append(json.dumps([version.tags, version.source, version.description]))
    s3 = s3_server.client()
    for key in s3_server.keys("e2e/"):
        seen.append(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read().decode("latin-1"))
    assert len(seen) > 50
    for text in seen:
        for secret in secrets:
            assert secret not in text


def test_steps_join_the_training_run_family(trained, tracking_env, tmp_path, monkeypatch):
    """What eval / export / optimize do: given the trained bundle, their run nests under the
    training run; with a pipeline parent, every step nests under it; MLFLOW_RUN_ID is used as is."""
    from segcore.inference import TorchPredictor

    client = _client(tracking_env)
    bundle = storage.local_input(f"s3://{tracking_env.s3.bucket}/e2e/run-b")
    dataset = storage.local_input(f"s3://{tracking_env.s3.bucket}/e2e/dataset")
    train_run = json.loads((bundle / tracking.RUN_FILE).read_text())["run_id"]
    args = argparse.Namespace(tracking_uri=None, experiment=EXPERIMENT, run_name=None, parent_run_id=None)
    with tracking.tracking_run(args, "eval", run_name="eval b", bundle=bundle) as tracker:
        tracker.log_params({"split": "val"})
        scores = tracking.log_segmentation_report(tracker, TorchPredictor(bundle), dataset, "val", prefix="test")
        tracker.log_metrics({"test_dice": scores["mdice"], "latency_ms": 1.5})
        tracker.log_dict({"mdice": scores["mdice"]}, "scores.json")
        tracker.log_image(np.zeros((4, 4, 3), np.uint8), "images/black.png")
    run = client.get_run(tracker.run_id)
    assert run.data.tags["mlflow.parentRunId"] == train_run and run.data.tags["segcore.train_run_id"] == train_run
    assert run.data.tags["segcore.step"] == "eval" and run.info.status == "FINISHED"
    assert run.data.metrics["test_dice"] == pytest.approx(client.get_run(train_run).data.metrics["best_val_dice"])
    files = set(_artifact_files(client, tracker.run_id))
    assert {"plots/test_confusion_matrix.png", "scores.json", "images/black.png"} <= files

    # a pipeline run: the parent made by the pipeline, one nested run per step
    parent = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="pipeline")
    monkeypatch.setenv("SEGCORE_PARENT_RUN_ID", parent.info.run_id)
    with tracking.tracking_run(None, "export", bundle=bundle) as step:
        step.log_metrics({"ir_mb": 3.2})
    child = client.get_run(step.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.experiment_id == parent.info.experiment_id

    # Kubeflow's MLflow integration injects the run: it is used as is, its status left alone
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    with tracking.tracking_run(None, "optimize") as injected:
        injected.log_metrics({"int8_dice_drop": 0.01}, step=0)
    assert injected.run_id == parent.info.run_id
    after = client.get_run(parent.info.run_id)
    assert after.data.metrics["int8_dice_drop"] == 0.01 and after.info.status == "RUNNING"


def test_tracking_off_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argparse.Namespace(no_tracking=True, tracking_uri="http://127.0.0.1:9", experiment=None)
    with tracking.tracking_run(args, "train") as tracker:
        assert not tracker.enabled and tracker.run_id is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifacts(tmp_path, "x")
        tracker.register_model("m", score=1.0)
        tracker.write_run_file(tmp_path)
        assert tracking.log_segmentation_report(tracker, None, tmp_path) is None
    assert not (tmp_path / tracking.RUN_FILE).exists()
    monkeypatch.setenv("SEGCORE_TRACKING", "off")
    assert tracking.settings_from(argparse.Namespace(no_tracking=False)) is None
    monkeypatch.setenv("SEGCORE_TRACKING", "on")
    settings = tracking.settings_from(None)
    assert settings.uri == "sqlite:///mlflow.db" and settings.experiment_name == "segcore"
    assert tracking.redact("https://user:pw@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert tracking.model_name("my exp", "Lite-HRNet-18") == "segcore-my-exp-Lite-HRNet-18"


class _FakeClient:
    """Stands in for MlflowClient: metric value 1 fails twice (a blip), 2 is refused (bad request),
    3 always fails with a server error, anything else is taken."""

    def __init__(self):
        self.taken, self.calls, self.status = [], 0, None

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        value = metrics[0].value
        if value == 1 and self.calls <= 2:
            raise MlflowException("connection refused", error_code="INTERNAL_ERROR")
        if value == 2:
            raise MlflowException("bad value", error_code="INVALID_PARAMETER_VALUE")
        if value == 3:
            raise MlflowException("server fault", error_code="INTERNAL_ERROR")
        self.taken.append((value, metrics[0].step))

    def set_terminated(self, run_id, status):
        self.status = status


def test_tracker_queue_keeps_order_retries_blips_and_skips_what_fails(monkeypatch, caplog):
    monkeypatch.setenv("SEGCORE_TRACKING_RETRY_MAX", "0.01")
    fake = _FakeClient()
    tracker = tracking.Tracker(fake, "run", "0", "exp", "sqlite:///unused.db", owns_run=True)
    for step, value in enumerate([1, 2, 3, 4], start=1):
        tracker.log_metrics({"m": value, "skipped_nan": float("nan"), "skipped_none": None}, step=step)
    tracker.log_artifact("/no/such/file.png")  # a caller's mistake: a warning, not an exception
    tracker.close("FINISHED", timeout=30)
    assert fake.taken == [(1.0, 1), (4.0, 4)] and fake.status == "FINISHED"
    assert len(tracker.dropped) == 2 and "did not take" in caplog.text and "log_artifact failed" in caplog.text


def test_unreachable_tracking_server_fails_before_training(tmp_path, capsys, monkeypatch):
    from servers import free_ports

    from segcore.data.synthetic import generate

    monkeypatch.setenv("SEGCORE_TRACKING", "on")
    gen = generate(tmp_path / "raw", num_train=4, num_val=2, size=(32, 32))
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    out = tmp_path / "run"
    code = main(["train", TEMPLATE, "--train-data-root", str(gen.root), "--output", str(out), "--epochs", "1",
                 *TINY, "--tracking-uri", url])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("segcore train: error: MLflow tracking server") and url in err[-1]
    assert "--no-tracking" in err[-1]
    assert not out.exists()  # nothing trained, nothing written


def test_tracking_survives_a_server_restart_mid_training(tracking_env, tmp_path, monkeypatch, caplog):
    """The server is stopped after epoch 1 and started again (same port, same store) after epoch 2:
    training goes on, epoch 2 is queued and arrives, epochs 3-4 are logged after the restart."""
    import segcore.training
    from segcore.data.synthetic import generate

    server = tracking_env
    gen = generate(tmp_path / "raw", num_train=4, num_val=2, size=(32, 32), seed=5)
    real = segcore.training.train
    events = []

    def train(*args, on_epoch=None, **kwargs):
        def hook(record):
            on_epoch(record)
            if record["epoch"] == 1:
                server.stop()
                events.append("stopped")
            elif record["epoch"] == 2:
                server.start()
                events.append("started")

        return real(*args, on_epoch=hook, **kwargs)

    monkeypatch.setattr(segcore.training, "train", train)
    caplog.set_level(logging.INFO)
    try:
        code = main(["train", TEMPLATE, "--train-data-root", str(gen.root), "--output", str(tmp_path / "run"),
                     "--epochs", "4", *TINY, "--experiment", "restart", "--json"])  # fmt: skip
    finally:
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    assert code == 0 and events == ["stopped", "started"]
    assert "failed" in caplog.text and "the work goes on" in caplog.text and "is back" in caplog.text
    client = _client(server)
    exp = client.get_experiment_by_name("restart")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice/background")] == [1, 2, 3, 4]
    assert "model/MLmodel" in _artifact_files(client, run.info.run_id)
    assert client.get_model_version_by_alias(f"segcore-restart-{TEMPLATE}", "best").run_id == run.info.run_id
    assert os.environ["MLFLOW_TRACKING_URI"] == server.url


def test_settings_errors_are_one_line(tracking_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(SegcoreError, match="MLflow at http://127.0.0.1"):
        with tracking.tracking_run(None, "eval"):
            pass


def test_core_imports_neither_mlflow_nor_boto3():
    import subprocess
    import sys

    code = (
        "import sys, segcore.data, segcore.models, segcore.losses, segcore.metrics, segcore.training;"
        "bad = [m for m in ('mlflow', 'boto3', 'botocore', 'kfp') if m in sys.modules]; assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_export_eval_optimize_on_s3_log_to_the_run_family(trained, tracking_env, capsys):
    """The CLI steps after training, with S3 paths: each logs its Dice, latency and sizes in a run
    nested under the run of the model it was given (train -> export -> eval / optimize)."""
    client = _client(tracking_env)
    root = f"s3://{tracking_env.s3.bucket}/e2e"
    train_run = json.loads((storage.local_input(f"{root}/run-b") / tracking.RUN_FILE).read_text())["run_id"]
    common = ["--experiment", EXPERIMENT, "--json"]
    assert main(["export", f"{root}/run-b", "--output", f"{root}/ir-b", *common]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["ir"] == f"{root}/ir-b/model.xml"
    assert {"e2e/ir-b/model.xml", "e2e/ir-b/model.bin", "e2e/ir-b/tracking.json"} <= set(
        tracking_env.s3.keys("e2e/ir-b/")
    )
    assert main(["eval", f"{root}/ir-b/model.xml", "--test-data-root", f"{root}/dataset", *common]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert main(["optimize", TEMPLATE, "--load-weights", f"{root}/ir-b", "--train-data-root", f"{root}/dataset",
                 "--output", f"{root}/int8-b", "--subset-size", "2", *common]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert "e2e/int8-b/report.json" in tracking_env.s3.keys("e2e/int8-b/")

    export_run = json.loads((storage.local_input(f"{root}/ir-b") / tracking.RUN_FILE).read_text())["run_id"]
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{export_run}'")
    runs = {r.data.tags["segcore.step"]: r for r in children}
    assert len(children) == 2 and set(runs) == {"eval", "optimize"}
    assert client.get_run(export_run).data.tags["mlflow.parentRunId"] == train_run
    assert client.get_run(export_run).data.metrics["ir_mb"] == pytest.approx(exported["ir_bytes"] / 1e6)
    assert client.get_run(export_run).data.metrics["latency_ms"] > 0
    ev, opt = runs["eval"], runs["optimize"]
    assert ev.data.metrics["test_dice"] == pytest.approx(scores["mdice"])
    assert all(f"test_dice/{name}" in ev.data.metrics for name in scores["per_class"])
    assert opt.data.metrics["val_dice_int8"] == pytest.approx(report["val_mdice_int8"])
    assert {"dice_drop", "int8_ir_mb", "fp32_ir_mb", "latency_ms_int8"} <= set(opt.data.metrics)
    assert "report.json" in _artifact_files(client, opt.info.run_id)


# ------------------------------------------------------------------ MLflow as its UI shows runs


def _runs_by_step(uri: str, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["segcore.step"]: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.parametrize("experiment", ["cli", "pipeline"])
def test_runs_record_their_dataset_as_an_mlflow_input(tiny, experiment):
    """Training, evaluation and quantization runs, from the CLI and from the pipeline's components,
    carry the canonical dataset as an MLflow dataset input: the UI's Dataset column."""
    manifest = json.loads((tiny.cli.dataset / "manifest.json").read_text())
    runs = _runs_by_step(tiny.uri, experiment)
    contexts = {}
    for step in ("train", "eval", "optimize"):
        (entry,) = runs[step].inputs.dataset_inputs
        ds = entry.dataset
        assert ds.name == Path(tiny.raw).name and ds.digest == manifest["content_hash"][:32]
        assert json.loads(ds.profile) == {"splits": {"train": 8, "val": 4}, "num_classes": 3}
        assert json.loads(ds.schema)["labels"] == manifest["labels"]
        assert ds.source_type == "local" and json.loads(ds.source)["uri"]
        contexts[step] = {t.key: t.value for t in entry.tags}["mlflow.data.context"]
    assert contexts == {"train": "train", "eval": "val", "optimize": "train"}


def test_experiments_segcore_creates_open_on_their_runs_and_others_are_left_alone(tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from segcore.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TrackingOptions, tracking_run

    client = MlflowClient(tracking_uri=tiny.uri)
    for name in ("cli", "pipeline"):
        assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mine = MlflowClient(tracking_uri=uri).create_experiment("made-by-the-user")
    monkeypatch.setenv("SEGCORE_TRACKING", "on")
    with tracking_run(TrackingOptions(tracking_uri=uri, experiment="made-by-the-user"), "eval"):
        pass
    assert EXPERIMENT_KIND_TAG not in MlflowClient(tracking_uri=uri).get_experiment(mine).tags


def test_system_metrics_are_on_for_training_and_off_with_one_setting(tmp_path, monkeypatch):
    import time

    from mlflow import MlflowClient

    from segcore.tracking import TrackingOptions, tracking_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SEGCORE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")

    def system_keys(options: TrackingOptions, system_metrics: bool = True) -> set[str]:
        with tracking_run(options, "train", system_metrics=system_metrics) as tracker:
            time.sleep(1.0)
        metrics = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics
        return {k for k in metrics if k.startswith("system/")}

    options = TrackingOptions(tracking_uri=uri, experiment="sys")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system_keys(options)
    assert not system_keys(TrackingOptions(tracking_uri=uri, experiment="sys", no_system_metrics=True))
    assert not system_keys(options, system_metrics=False)  # steps that do not train
    monkeypatch.setenv("SEGCORE_SYSTEM_METRICS", "off")
    assert not system_keys(options)


_START_A_RUN = """
import sys
from segcore.tracking.runs import start_run
from segcore.tracking.settings import Settings
settings = Settings(sys.argv[1], "race", None, None, None, None, system_metrics=False)
start_run(settings, "train").close()
"""


def test_two_processes_starting_runs_on_a_fresh_sqlite_store_both_succeed(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    for trial in range(3):  # without the lock most trials lost a process (5 of 8 processes failed)
        uri = f"sqlite:///{tmp_path / f'fresh-{trial}' / 'mlflow.db'}"
        procs = [
            subprocess.Popen([sys.executable, "-c", _START_A_RUN, uri], stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(e.strip().splitlines()[-1] for e in errors if e)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("race")
        assert len(client.search_runs([experiment.experiment_id])) == 2
