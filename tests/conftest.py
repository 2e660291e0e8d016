"""Shared fixtures: real S3 (SeaweedFS) and MLflow servers on loopback, started once per session.

Every test runs with MLflow tracking off (``SEGCORE_TRACKING=off``) and a private S3 cache unless
it asks otherwise (the ``s3_env`` / ``tracking_env`` fixtures), so no test writes ./mlflow.db or
~/.cache.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from servers import MlflowServer, SeaweedS3

TINY_TEMPLATE = "Lite-HRNet-s-mod2"
TINY_TRAIN = {"epochs": 2, "batch_size": 4, "input_size": "32x32", "num_workers": 0}  # 2: a curve


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are opt-in: they run with ``-m slow`` only."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="opt-in: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_segcore(tmp_path_factory):
    """Session-wide, so module-scoped fixtures that train (before any function fixture) see it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGCORE_TRACKING", "off")
        mp.setenv("SEGCORE_CACHE", str(tmp_path_factory.getbasetemp() / "segcore-cache"))
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        mp.delenv("SEGCORE_PARENT_RUN_ID", raising=False)
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3_server).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process talks to the test S3 server (environment credentials, fresh boto3 client)."""
    from segcore import storage

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage.configure(None)
    storage.reset_client()
    yield s3_server
    storage.reset_client()


@pytest.fixture
def tracking_env(mlflow_server, s3_env, monkeypatch):
    """Tracking on, to the test MLflow server."""
    monkeypatch.setenv("SEGCORE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("SEGCORE_TRACKING_RETRY_MAX", "1")
    return mlflow_server


# ------------------------------------------- one tiny dataset through every step, once a session


def _artifact(cls, path: Path):
    return cls(name=path.name, uri=str(path), metadata={})


def _step_keys(uri: str, experiment: str) -> dict[str, tuple[set, set]]:
    """step -> (param keys, metric keys) of an experiment's step runs (a pipeline's parent aside)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        step = run.data.tags["segcore.step"]
        if step != "pipeline":
            assert step not in out, f"two {step} runs"
            # system metrics depend on how long a step ran (sampled every few seconds): left out
            metrics = {k for k in run.data.metrics if not k.startswith("system/")}
            out[step] = (set(run.data.params), metrics)
    return out


def _cli_steps(raw: Path, work: Path, flags: list[str]) -> SimpleNamespace:
    from segcore.cli import main

    train = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_TRAIN.items()]
    assert main(["convert", "--train-data-root", str(raw), "--output", str(work / "dataset"), *flags]) == 0
    assert main(["train", TINY_TEMPLATE, "--train-data-root", str(work / "dataset"), "--output", str(work / "run"),
                 *train, *flags]) == 0  # fmt: skip
    assert main(["export", str(work / "run"), "--output", str(work / "ir"), *flags]) == 0
    assert main(["eval", str(work / "ir"), "--test-data-root", str(work / "dataset"), *flags]) == 0
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["optimize", TINY_TEMPLATE, "--load-weights", str(work / "ir"), "--train-data-root",
                     str(work / "dataset"), "--output", str(work / "int8"), "--subset-size", "2", "--json",
                     *flags]) == 0  # fmt: skip
    return SimpleNamespace(dataset=work / "dataset", run=work / "run", ir=work / "ir" / "model.xml", int8=work / "int8",
                           optimize_json=json.loads(printed.getvalue()))  # fmt: skip


def _component_steps(raw: Path, work: Path, tracking: dict) -> SimpleNamespace:
    from kfp import dsl

    from components.convert import convert_op
    from components.export import export_op
    from components.quantize import quantize_op
    from components.train import train_op
    from components.validate import validate_op

    dataset = _artifact(dsl.Dataset, work / "dataset")
    converted = convert_op.python_func(train_data_uri=str(raw), dataset=dataset, **tracking)
    tracking = {**tracking, "mlflow_parent_run_id": converted.mlflow_parent_run_id}
    model, train_metrics = _artifact(dsl.Model, work / "model"), _artifact(dsl.Metrics, work / "train_metrics")
    train_op.python_func(template=TINY_TEMPLATE, dataset=dataset, model=model, metrics=train_metrics, **TINY_TRAIN,
                         **tracking)  # fmt: skip
    ir = _artifact(dsl.Model, work / "ir")
    export_op.python_func(model=model, ir=ir, **tracking)
    validate_op.python_func(model=ir, dataset=dataset, metrics=_artifact(dsl.Metrics, work / "validate_metrics"),
                            confusion_matrix=_artifact(dsl.ClassificationMetrics, work / "confusion"),
                            report=_artifact(dsl.HTML, work / "report"), num_overlays=1, **tracking)  # fmt: skip
    int8, quant_metrics = _artifact(dsl.Model, work / "int8"), _artifact(dsl.Metrics, work / "quant_metrics")
    quantize_op.python_func(template=TINY_TEMPLATE, ir=ir, model=model, dataset=dataset, int8_ir=int8,
                            metrics=quant_metrics, subset_size=4, **tracking)  # fmt: skip
    return SimpleNamespace(work=work, converted=converted, dataset=dataset, model=model, train_metrics=train_metrics,
                           ir=ir, int8=int8, quant_metrics=quant_metrics)  # fmt: skip


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny dataset (3 classes, 8 train + 4 val images of 40x48) taken once through every step,
    by the CLI commands and by the Kubeflow components' functions, both tracked into one SQLite
    MLflow store (experiments "cli" and "pipeline"). The trained bundle, IRs and datasets are
    shared by the tests that need a trained model; the key sets are compared in test_steps.

    Tests may read these outputs and write beside them, never change them."""
    from segcore.data.synthetic import generate

    work = tmp_path_factory.mktemp("tiny")
    gen = generate(work / "raw", "plain", num_train=8, num_val=4, size=(40, 48), num_classes=3, seed=1)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # a SQLite store keeps artifacts in ./mlruns: here, not in the checkout
        mp.setenv("SEGCORE_TRACKING", "on")
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        cli = _cli_steps(gen.root, work / "cli", ["--tracking-uri", uri, "--experiment", "cli"])
        kfp = _component_steps(gen.root, work / "kfp", {"mlflow_tracking_uri": uri, "mlflow_experiment": "pipeline"})
    keys = {"cli": _step_keys(uri, "cli"), "pipeline": _step_keys(uri, "pipeline")}
    return SimpleNamespace(gen=gen, raw=gen.root, uri=uri, cli=cli, kfp=kfp, keys=keys)
