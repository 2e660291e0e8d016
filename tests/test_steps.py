"""One step, one function: a CLI command and a Kubeflow component of the same step call the same
library function, so they log the same MLflow parameter and metric keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from segcore.cli import main

TEMPLATE = "Lite-HRNet-s-mod2"
SIZE = "32x32"


def _artifact(cls, path: Path):
    return cls(name=path.name, uri=str(path), metadata={})


def _keys(uri: str, experiment: str) -> dict[str, tuple[set, set]]:
    """step -> (param keys, metric keys) of the step runs of an experiment (the pipeline's parent
    run aside)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        step = run.data.tags["segcore.step"]
        if step != "pipeline":
            assert step not in out, f"two {step} runs"
            out[step] = (set(run.data.params), set(run.data.metrics))
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The same five steps, once through the CLI and once through the components, tracked into a
    SQLite store: {"cli": keys, "pipeline": keys}."""
    from kfp import dsl

    from components.convert import convert_op
    from components.export import export_op
    from components.quantize import quantize_op
    from components.train import train_op
    from components.validate import validate_op
    from segcore.data.synthetic import generate

    work = tmp_path_factory.mktemp("keys")
    raw = generate(work / "raw", "plain", num_train=6, num_val=3, size=(32, 32), num_classes=3, seed=4).root
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGCORE_TRACKING", "on")
        flags = ["--tracking-uri", uri, "--experiment", "cli"]
        assert main(["convert", "--train-data-root", str(raw), "--output", str(work / "ds"), *flags]) == 0
        train = ["--epochs", "1", "--batch-size", "3", "--input-size", SIZE, "--num-workers", "0"]
        assert main(["train", TEMPLATE, "--train-data-root", str(work / "ds"), "--output", str(work / "m"),
                     *train, *flags]) == 0  # fmt: skip
        assert main(["export", str(work / "m"), "--output", str(work / "ir"), *flags]) == 0
        assert main(["eval", str(work / "ir"), "--test-data-root", str(work / "ds"), *flags]) == 0
        assert main(["optimize", TEMPLATE, "--load-weights", str(work / "ir"), "--train-data-root",
                     str(work / "ds"), "--output", str(work / "int8"), "--subset-size", "2", *flags]) == 0  # fmt: skip

        kf = {"mlflow_tracking_uri": uri, "mlflow_experiment": "pipeline"}
        ds = _artifact(dsl.Dataset, work / "k-ds")
        parent = convert_op.python_func(train_data_uri=str(raw), dataset=ds, **kf).mlflow_parent_run_id
        kf["mlflow_parent_run_id"] = parent
        model = _artifact(dsl.Model, work / "k-m")
        train_op.python_func(template=TEMPLATE, dataset=ds, model=model, metrics=_artifact(dsl.Metrics, work / "k-tm"),
                             epochs=1, batch_size=3, input_size=SIZE, num_workers=0, **kf)  # fmt: skip
        ir = _artifact(dsl.Model, work / "k-ir")
        export_op.python_func(model=model, ir=ir, **kf)
        validate_op.python_func(model=ir, dataset=ds, metrics=_artifact(dsl.Metrics, work / "k-vm"),
                                confusion_matrix=_artifact(dsl.ClassificationMetrics, work / "k-cm"),
                                report=_artifact(dsl.HTML, work / "k-html"), num_overlays=1, **kf)  # fmt: skip
        quantize_op.python_func(template=TEMPLATE, ir=ir, model=model, dataset=ds,
                                int8_ir=_artifact(dsl.Model, work / "k-int8"),
                                metrics=_artifact(dsl.Metrics, work / "k-qm"), subset_size=2, **kf)  # fmt: skip
    return {"cli": _keys(uri, "cli"), "pipeline": _keys(uri, "pipeline")}


@pytest.mark.parametrize("step", ["convert", "train", "export", "eval", "optimize"])
def test_cli_and_component_log_the_same_keys(logged, step):
    cli_params, cli_metrics = logged["cli"][step]
    kfp_params, kfp_metrics = logged["pipeline"][step]
    assert cli_metrics and cli_params
    assert cli_metrics == kfp_metrics
    assert cli_params == kfp_params
