"""The Kubeflow pipeline: the compiled YAML (DAG, artifact types, resources, retries, secrets, a
golden structure), each component's function on tiny generated data, training resumed from S3
checkpoints, an end-to-end local run through kfp.local with MLflow, and cluster submission with
the API call intercepted."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kfp import dsl

from segcore.cli import main
from segcore.errors import SegcoreError

IMAGE = "registry.example.com/segcore:test"
TEMPLATE = "Lite-HRNet-s-mod2"
GOLDEN = Path(__file__).parent / "golden" / "pipeline_structure.json"
TASKS = {"convert", "pretrain", "train", "validate", "export", "quantize", "validate-2"}
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYDONOTLEAK",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-do-not-leak-8c1f",
    "MLFLOW_TRACKING_PASSWORD": "fake-password-do-not-leak-77",
    "MLFLOW_TRACKING_TOKEN": "fake-token-do-not-leak-91",
}


# ---------------------------------------------------------------------------------- compiled YAML


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The pipeline compiled by the CLI with credentials in the environment (they must not leak)."""
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_SECRETS.items():
            mp.setenv(key, value)
        assert main(["pipeline", "compile", "--output", str(path), "--image", IMAGE]) == 0
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return SimpleNamespace(text=text, spec=spec, platform=platform)


def structure(spec: dict) -> dict:
    """What the golden file pins: parameters, tasks, edges, artifact types, retries, caching."""
    components = spec["components"]

    def types(definitions: dict) -> dict:
        return {k: v["artifactType"]["schemaTitle"] for k, v in definitions.get("artifacts", {}).items()}

    tasks = {}
    for name, task in sorted(spec["root"]["dag"]["tasks"].items()):
        comp = components[task["componentRef"]["name"]]
        inputs = task.get("inputs", {})
        tasks[name] = {
            "component": task["componentRef"]["name"],
            "display_name": task["taskInfo"]["name"],
            "depends_on": sorted(task.get("dependentTasks", [])),
            "artifacts_from": {
                k: "{producerTask}.{outputArtifactKey}".format(**v["taskOutputArtifact"])
                for k, v in sorted(inputs.get("artifacts", {}).items())
            },
            "inputs": types(comp.get("inputDefinitions", {})),
            "outputs": types(comp.get("outputDefinitions", {})),
            "output_parameters": sorted(comp.get("outputDefinitions", {}).get("parameters", {})),
            "max_retries": task.get("retryPolicy", {}).get("maxRetryCount", 0),
            "cache": task.get("cachingOptions", {}).get("enableCache", False),
        }
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {
        "pipeline": spec["pipelineInfo"]["name"],
        "parameters": {k: v["parameterType"] for k, v in sorted(params.items())},
        "outputs": sorted(spec["root"]["outputDefinitions"]["parameters"]),
        "tasks": tasks,
    }


def test_compiled_dag_has_the_seven_steps_their_edges_and_typed_artifacts(compiled):
    dag = compiled.spec["root"]["dag"]["tasks"]
    assert set(dag) == TASKS
    deps = {name: set(task.get("dependentTasks", [])) for name, task in dag.items()}
    # conversion -> training -> validation -> export -> quantization -> validation of the INT8 model
    assert deps["convert"] == set()
    assert "convert" in deps["pretrain"]  # for the MLflow parent run; it needs no dataset
    assert {"convert", "pretrain"} <= deps["train"]
    assert {"train", "convert"} <= deps["validate"]
    assert {"validate", "train"} <= deps["export"]  # export waits for the FP32 validation (its gate)
    assert "export" in deps["quantize"]
    assert "quantize" in deps["validate-2"]

    def source(task: str, name: str) -> str:
        art = dag[task]["inputs"]["artifacts"][name]["taskOutputArtifact"]
        return f"{art['producerTask']}.{art['outputArtifactKey']}"

    assert source("train", "dataset") == "convert.dataset"
    assert source("train", "load_weights") == "pretrain.pretrained"
    assert source("validate", "model") == "train.model"
    assert source("export", "model") == "train.model"
    assert source("quantize", "ir") == "export.ir"
    assert source("validate-2", "model") == "quantize.int8_ir"  # the INT8 model is what gets validated
    parent = dag["train"]["inputs"]["parameters"]["mlflow_parent_run_id"]["taskOutputParameter"]
    assert parent == {"outputParameterKey": "mlflow_parent_run_id", "producerTask": "convert"}

    components = compiled.spec["components"]
    out_types = {
        a["artifactType"]["schemaTitle"]
        for comp in components.values()
        for a in comp.get("outputDefinitions", {}).get("artifacts", {}).values()
    }
    assert {"system.Dataset", "system.Model", "system.Metrics", "system.ClassificationMetrics", "system.HTML"} <= (
        out_types
    )
    validate_out = components["comp-validate"]["outputDefinitions"]["artifacts"]
    assert validate_out["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert validate_out["confusion_matrix"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert validate_out["report"]["artifactType"]["schemaTitle"] == "system.HTML"


def test_every_step_runs_the_image_with_resources_and_train_retries(compiled):
    executors = compiled.spec["deploymentSpec"]["executors"]
    assert len(executors) == 7
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name  # starts without network
        assert "import segcore" in container["command"][-1] or "from segcore" in container["command"][-1], name
        resources = container["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name
        assert "accelerator" not in resources, name  # no GPU unless asked for
    assert executors["exec-train"]["container"]["resources"]["resourceCpuRequest"] == "4"
    dag = compiled.spec["root"]["dag"]["tasks"]
    for name in ("pretrain", "train"):
        retry = dag[name]["retryPolicy"]
        assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "60s"
    assert all("retryPolicy" not in task for name, task in dag.items() if name not in ("pretrain", "train"))
    assert all(task["cachingOptions"]["enableCache"] for task in dag.values())
    # a retried training resumes: the component trains through train_resumable (always resuming,
    # from the checkpoint prefix; see test_retried_training_resumes_from_s3_checkpoints)
    train_source = executors["exec-train"]["container"]["command"][-1]
    assert "train_resumable(" in train_source and "checkpoint_uri" in train_source


def test_credentials_come_from_secrets_and_never_appear_in_the_yaml(compiled):
    for value in FAKE_SECRETS.values():
        assert value not in compiled.text
    params = compiled.spec["root"]["inputDefinitions"]["parameters"]
    for name in params:
        assert not any(word in name.lower() for word in ("password", "secret", "token", "access_key")), name
    executors = compiled.platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(compiled.spec["deploymentSpec"]["executors"])
    for name, config in executors.items():
        secrets = {s["secretName"]: s for s in config["secretAsEnv"]}
        assert set(secrets) == {"segcore-s3", "segcore-mlflow"}, name
        s3_env = {k["envVar"] for k in secrets["segcore-s3"]["keyToEnv"]}
        mlflow_env = {k["envVar"] for k in secrets["segcore-mlflow"]["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= s3_env
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= mlflow_env
        assert all(s["optional"] for s in secrets.values())
    shm = executors["exec-train"]["emptyDirMounts"]  # data loader workers need more than 64 MB of /dev/shm
    assert shm == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}]


def test_golden_structure(compiled):
    """Catches accidental DAG changes. After an intended one: SEGCORE_UPDATE_GOLDEN=1 pytest -k golden."""
    got = structure(compiled.spec)
    if os.environ.get("SEGCORE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(GOLDEN.read_text())


def test_gpu_and_secret_names_are_compile_options(tmp_path):
    from pipelines.segmentation import Options, compile_pipeline

    path = compile_pipeline(
        tmp_path / "gpu.yaml",
        Options(image=IMAGE, train_accelerator="nvidia.com/gpu", train_accelerator_count=2, s3_secret="team-s3"),
    )
    spec, platform = yaml.safe_load_all(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "2"
    assert all("accelerator" not in e["container"]["resources"] for n, e in executors.items() if n != "exec-train")
    names = {
        s["secretName"]
        for s in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["secretAsEnv"]
    }
    assert names == {"team-s3", "segcore-mlflow"}


# ---------------------------------------------------------------------------------- components


def _artifact(cls, path: Path):
    return cls(name=path.name, uri=str(path), metadata={})


@pytest.fixture(scope="module")
def raw(tiny):
    return tiny.raw


@pytest.fixture(scope="module")
def steps(tiny):
    """convert -> train -> export -> validate -> quantize through the components' functions, tracked
    (the session's ``tiny`` fixture, conftest.py)."""
    return tiny.kfp


def test_convert_component_writes_a_dataset(steps):
    assert (Path(steps.dataset.path) / "manifest.json").is_file()
    assert steps.dataset.metadata["splits"] == {"train": 8, "val": 4}
    assert len(steps.dataset.metadata["labels"]) == 3
    assert steps.converted.mlflow_parent_run_id  # tracking on: the pipeline's parent run


def test_convert_component_without_tracking_has_no_parent_run(raw, tmp_path):
    from components.convert import convert_op

    dataset = _artifact(dsl.Dataset, tmp_path / "dataset")
    assert convert_op.python_func(train_data_uri=str(raw), dataset=dataset, tracking=False).mlflow_parent_run_id == ""


def test_train_export_quantize_components(steps):
    assert (Path(steps.model.path) / "model.json").is_file() and (Path(steps.model.path) / "best.pt").is_file()
    assert steps.model.metadata["framework"] == "pytorch"
    assert 0.0 <= steps.train_metrics.metadata["best_val_mean_dice"] <= 1.0
    assert steps.train_metrics.metadata["epochs_run"] == 2
    assert (Path(steps.ir.path) / "model.xml").is_file() and steps.ir.metadata["precision"] == "FP32"
    assert (Path(steps.int8.path) / "model.xml").is_file() and steps.int8.metadata["precision"] == "INT8"
    m = steps.quant_metrics.metadata
    assert {"val_dice_fp32", "val_dice_int8", "dice_drop", "fp32_mb", "int8_mb", "compression"} <= set(m)
    assert m["int8_mb"] < m["fp32_mb"]


def test_train_component_patiences_reach_the_training_and_minus_one_keeps_the_templates(steps, tmp_path):
    from components.train import train_op

    def train(name: str, **patience):
        model, metrics = _artifact(dsl.Model, tmp_path / name), _artifact(dsl.Metrics, tmp_path / f"{name}-metrics")
        train_op.python_func(template=TEMPLATE, dataset=steps.dataset, model=model, metrics=metrics, tracking=False,
                             epochs=1, batch_size=4, input_size="32x32", num_workers=0, **patience)  # fmt: skip
        return json.loads((Path(model.path) / "model.json").read_text())["training_config"]

    given = train("given", early_stop_patience=0, plateau_patience=40)
    assert (given["early_stop_patience"], given["plateau_patience"]) == (0, 40)
    templates = json.loads((Path(steps.model.path) / "model.json").read_text())["training_config"]
    assert (templates["early_stop_patience"], templates["plateau_patience"]) == (8, 4)  # the component's -1 defaults
    with pytest.raises(SegcoreError, match="plateau_patience -2"):
        train("refused", plateau_patience=-2)
    assert not (tmp_path / "refused").exists()


def test_pipeline_cli_patience_flags_map_to_the_run_parameters(capsys):
    from pipelines.cli import add_parser, pipeline_params

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pipeline", "run", "--local", "--early-stop-patience", "0", "--plateau-patience", "40"])
    params = pipeline_params(args)
    assert (params["early_stop_patience"], params["plateau_patience"]) == (0, 40)
    assert pipeline_params(parser.parse_args(["pipeline", "run", "--local"]))["plateau_patience"] is None
    with pytest.raises(SystemExit):
        parser.parse_args(["pipeline", "run", "--local", "--plateau-patience", "-1"])
    assert "argument --plateau-patience: -1: give 0 or more epochs" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["model", "int8"])
def test_validate_component_reports_dice_confusion_matrix_and_html(steps, which):
    from components.validate import validate_op

    out = steps.work / f"validate-{which}"
    metrics = _artifact(dsl.Metrics, out / "metrics")
    confusion = _artifact(dsl.ClassificationMetrics, out / "confusion")
    report = _artifact(dsl.HTML, out / "report")
    result = validate_op.python_func(
        model=getattr(steps, which),
        dataset=steps.dataset,
        metrics=metrics,
        confusion_matrix=confusion,
        report=report,
        label="int8" if which == "int8" else "fp32",
        num_overlays=2,
        tracking=False,
    )
    labels = steps.dataset.metadata["labels"]
    assert 0.0 <= result.mean_dice <= 1.0 and metrics.metadata["mean_dice"] == pytest.approx(result.mean_dice)
    assert {"mean_dice", "mean_iou", "latency_ms"} <= set(metrics.metadata)
    assert metrics.metadata["latency_ms"] > 0
    matrix = confusion.metadata["confusionMatrix"]
    assert [s["displayName"] for s in matrix["annotationSpecs"]] == labels
    assert len(matrix["rows"]) == len(labels)
    html = Path(report.path).read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert all(name in html for name in labels)


def test_validate_component_gates_on_min_dice(steps):
    from components.validate import validate_op

    out = steps.work / "gate"
    with pytest.raises(ValueError, match="below the required"):
        validate_op.python_func(
            model=steps.model,
            dataset=steps.dataset,
            metrics=_artifact(dsl.Metrics, out / "m"),
            confusion_matrix=_artifact(dsl.ClassificationMetrics, out / "c"),
            report=_artifact(dsl.HTML, out / "r"),
            min_dice=1.01,
            num_overlays=0,
            tracking=False,
        )


class PodDied(Exception):
    """Stands for the pod being killed in the middle of a training."""


def test_train_component_retry_resumes_from_s3_checkpoints(steps, s3_env, tmp_path, monkeypatch, caplog):
    """A training killed after epoch 1 of 2 is retried: the retry continues at epoch 2 from the
    checkpoints under checkpoint_uri; a later attempt finds the finished training and reuses it."""
    import segcore.training
    from components.train import train_op
    from segcore.steps.train import checkpoint_prefix

    real = segcore.training.train

    def killed_after_epoch_1(*args, on_epoch=None, **kwargs):
        def hook(record):
            on_epoch(record)  # uploads the checkpoint of this epoch
            if record["epoch"] == 1:
                raise PodDied  # the pod dies after the checkpoint of epoch 1 is uploaded

        return real(*args, on_epoch=hook, **kwargs)

    checkpoints = f"s3://{s3_env.bucket}/pipeline-checkpoints"
    kwargs = dict(template=TEMPLATE, dataset=steps.dataset, epochs=2, batch_size=4, input_size="32x32")
    kwargs.update(num_workers=0, checkpoint_uri=checkpoints, tracking=False)

    def attempt(n: int):
        model, metrics = _artifact(dsl.Model, tmp_path / f"model-{n}"), _artifact(dsl.Metrics, tmp_path / f"m-{n}")
        train_op.python_func(model=model, metrics=metrics, **kwargs)
        return model, metrics

    monkeypatch.setattr(segcore.training, "train", killed_after_epoch_1)
    with pytest.raises(PodDied):
        attempt(1)
    monkeypatch.setattr(segcore.training, "train", real)
    manifest = json.loads((Path(steps.dataset.path) / "manifest.json").read_text())
    settings = {"epochs": 2, "batch_size": 4, "input_size": "32x32", "lr": 0.0}
    prefix = checkpoint_prefix(checkpoints, manifest["content_hash"], TEMPLATE, settings)
    keys = s3_env.keys(prefix.split("/", 3)[3] + "/")
    assert any(k.endswith("/last.pt") for k in keys) and not any(k.endswith("/model.json") for k in keys)

    caplog.set_level("INFO")
    model, metrics = attempt(2)
    assert "resuming after epoch 1" in caplog.text
    records = [json.loads(line) for line in (Path(model.path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert metrics.metadata["epochs_run"] == 2 and model.metadata["checkpoints"] == prefix

    caplog.clear()
    again, _ = attempt(3)
    assert "finished: reusing it" in caplog.text
    assert (Path(again.path) / "model.json").read_text() == (Path(model.path) / "model.json").read_text()


# ---------------------------------------------------------------------------------- local run


def _mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


MAIN_JOB_RESULT = "SEGCORE_MAIN_JOB_RESULT"


@pytest.fixture(scope="module")
def local_run(raw, tmp_path_factory):
    """A whole local run of the DAG with MLflow: its --json result. CI runs the README's main job
    once (with --json) and hands its result over in SEGCORE_MAIN_JOB_RESULT, so the DAG runs once
    in CI; without it (a developer's `pytest`) the test runs a small DAG itself."""
    given = os.environ.get(MAIN_JOB_RESULT)
    if given:
        return json.loads(Path(given).read_text())
    tmp_path = tmp_path_factory.mktemp("local-run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["pipeline", "run", "--local", "--pipeline-root", str(tmp_path / "runs"), "--train-data-root", str(raw),
            "--epochs", "1", "--input-size", "32x32", "--batch-size", "4", "--subset-size", "4",
            "--tracking-uri", uri, "--experiment", "pipeline-e2e", "--json"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setenv("SEGCORE_TRACKING", "on")
        code = main(argv)
    assert code == 0
    result = json.loads(out.getvalue())
    assert Path(result["pipeline_root"]).parent == tmp_path / "runs"
    assert result["mlflow_tracking_uri"] == uri and result["mlflow_experiment"] == "pipeline-e2e"
    return result


def test_local_run_end_to_end_with_mlflow(local_run):
    result = local_run
    assert set(result["tasks"]) == TASKS and set(result["tasks"].values()) == {"SUCCEEDED"}
    run_dir = Path(result["pipeline_root"])
    uri, experiment = result["mlflow_tracking_uri"], result["mlflow_experiment"]

    def executor_output(task: str) -> dict:
        return json.loads((run_dir / task / "executor_output.json").read_text())

    for task in ("validate", "validate-2"):
        metrics = executor_output(task)["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert 0.0 <= metrics["mean_dice"] <= 1.0 and metrics["latency_ms"] > 0
    assert result["fp32_mean_dice"] == pytest.approx(
        executor_output("validate")["artifacts"]["metrics"]["artifacts"][0]["metadata"]["mean_dice"]
    )
    int8_dice = executor_output("validate-2")["parameterValues"]["mean_dice"]
    assert result["int8_mean_dice"] == pytest.approx(int8_dice)
    assert executor_output("quantize")["artifacts"]["metrics"]["artifacts"][0]["metadata"][
        "val_dice_int8"
    ] == pytest.approx(int8_dice, abs=1e-5)  # the INT8 IR that quantize wrote is the model validate-2 scored
    assert (run_dir / "validate-2" / "report").read_text().count("data:image/png;base64,") == 4
    # the INT8 validation reports its drop from the FP32 validation's Dice
    int8_metrics = executor_output("validate-2")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert int8_metrics["dice_drop"] == pytest.approx(result["fp32_mean_dice"] - int8_dice, abs=1e-6)
    assert "dice_drop" not in executor_output("validate")["artifacts"]["metrics"]["artifacts"][0]["metadata"]

    runs = _mlflow_runs(uri, experiment)
    parent = next(r for r in runs if r.info.run_id == result["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["fp32_val_dice"] == pytest.approx(result["fp32_mean_dice"])
    assert parent.data.metrics["int8_val_dice"] == pytest.approx(result["int8_mean_dice"])
    assert parent.data.metrics["int8_dice_drop"] == pytest.approx(
        result["fp32_mean_dice"] - result["int8_mean_dice"], abs=1e-6
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    steps = sorted(r.data.tags["segcore.step"] for r in children)
    # the pipeline's validate and quantize tasks run the evaluate and optimize steps
    assert steps == ["convert", "eval", "eval", "export", "optimize", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    int8_run = next(r for r in children if r.data.tags.get("segcore.model") == "int8")
    assert int8_run.data.metrics["test_dice"] == pytest.approx(result["int8_mean_dice"])


def test_local_run_failure_is_one_line_and_marks_the_mlflow_run_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGCORE_TRACKING", "on")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bad = tmp_path / "bad"
    (bad / "images" / "train").mkdir(parents=True)
    (bad / "images" / "train" / "x.png").write_bytes(b"not a png")
    code = main(
        [
            "pipeline",
            "run",
            "--local",
            "--pipeline-root",
            str(tmp_path / "runs"),
            "--train-data-root",
            str(bad),
            "--tracking-uri",
            uri,
            "--experiment",
            "fails",
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("segcore pipeline: error: the local pipeline run failed") and "convert" in last
    (parent,) = [r for r in _mlflow_runs(uri, "fails") if r.data.tags.get("segcore.step") == "pipeline"]
    assert parent.info.status == "FAILED"


def test_local_run_refuses_missing_data(tmp_path, capsys):
    code = main(["pipeline", "run", "--local", "--pipeline-root", str(tmp_path), "--train-data-root", "/nonexistent"])
    assert code == 2
    assert "/nonexistent: does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- submit


class _FakeKfpApi(http.server.BaseHTTPRequestHandler):
    """Answers every request with an empty JSON object (what kfp.Client's health check reads)."""

    def _answer(self):
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("namespace", ["team-a", None])
def test_submit_sends_the_package_arguments_and_namespace(kfp_api, monkeypatch, capsys, namespace):
    import kfp

    calls = []

    def create_run(self, pipeline_file, arguments=None, run_name=None, experiment_name=None, namespace=None, **kw):
        calls.append(
            {
                "host": self._existing_config.host,
                "package": Path(pipeline_file).read_text(),
                "arguments": arguments,
                "run_name": run_name,
                "experiment_name": experiment_name,
                "namespace": namespace,
                **kw,
            }
        )
        return SimpleNamespace(run_id="run-0001")

    monkeypatch.setattr(kfp.Client, "create_run_from_pipeline_package", create_run)
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    argv = ["pipeline", "submit", "--host", kfp_api, "--image", IMAGE, "--experiment", "camvid",
            "--run-name", "camvid 18", "--no-cache", "--train-data-root", "s3://data/camvid",
            "--template", "Lite-HRNet-18", "--epochs", "30", "--input-size", "360x480",
            "--checkpoint-uri", "s3://runs/ckpt", "--tracking-uri", "http://mlflow.mlflow:5000", "--json"]  # fmt: skip
    if namespace:
        argv += ["--namespace", namespace]
    assert main(argv) == 0
    (call,) = calls
    assert call["host"] == kfp_api
    assert call["namespace"] == namespace
    assert call["experiment_name"] == "camvid" and call["run_name"] == "camvid 18"
    assert call["enable_caching"] is False
    assert call["arguments"] == {
        "train_data_uri": "s3://data/camvid",
        "template": "Lite-HRNet-18",
        "epochs": 30,
        "input_size": "360x480",
        "checkpoint_uri": "s3://runs/ckpt",
        "mlflow_tracking_uri": "http://mlflow.mlflow:5000",
        "mlflow_experiment": "camvid",  # the Kubeflow experiment's name unless --mlflow-experiment
    }
    spec, _ = yaml.safe_load_all(call["package"])
    assert set(spec["root"]["dag"]["tasks"]) == TASKS
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
    assert not any(value in call["package"] for value in FAKE_SECRETS.values())
    out = json.loads(capsys.readouterr().out)
    assert out["run_id"] == "run-0001" and out["url"] == f"{kfp_api}/#/runs/details/run-0001"


def test_submit_to_an_unreachable_host_is_a_one_line_error(capsys):
    from servers import free_ports

    (port,) = free_ports(1)
    code = main(["pipeline", "submit", "--host", f"http://127.0.0.1:{port}", "--train-data-root", "s3://data/x"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("segcore pipeline: error: Kubeflow Pipelines at http://127.0.0.1:") and "unreachable" in err


def test_pretrain_component_feeds_the_training(steps, raw, tmp_path, caplog):
    """The pretrain step skips without images (an empty Model the training ignores) and otherwise
    pretrains; the train step then starts from its backbone, and refuses a second source of weights."""
    from components.pretrain import pretrain_op
    from components.train import train_op

    skipped = _artifact(dsl.Model, tmp_path / "none")
    pretrain_op.python_func(template=TEMPLATE, pretrained=skipped, tracking=False)
    assert skipped.metadata == {"pretrained": False}

    pretrained = _artifact(dsl.Model, tmp_path / "pretrained")
    pretrain_op.python_func(template=TEMPLATE, pretrained=pretrained, pretrain_data_uri=str(raw / "images"),
                            pretrain_epochs=1, pretrain_batch_size=4, pretrain_input_size="64x64", num_workers=0,
                            tracking=False)  # fmt: skip
    assert pretrained.metadata["pretrained"] and (Path(pretrained.path) / "backbone.pt").is_file()

    kwargs = dict(template=TEMPLATE, dataset=steps.dataset, epochs=1, batch_size=4, input_size="32x32", num_workers=0)
    caplog.set_level("INFO")
    for name, given in (("plain", skipped), ("fine", pretrained)):
        model, metrics = _artifact(dsl.Model, tmp_path / name), _artifact(dsl.Metrics, tmp_path / f"{name}-m")
        train_op.python_func(model=model, metrics=metrics, load_weights=given, tracking=False, **kwargs)
        assert (Path(model.path) / "model.json").is_file()
        assert ("backbone tensors from" in caplog.text) == (name == "fine")
    # a train step's Model as load_weights: class-incremental from the earlier bundle
    more = _artifact(dsl.Model, tmp_path / "more")
    train_op.python_func(model=more, metrics=_artifact(dsl.Metrics, tmp_path / "more-m"), load_weights=steps.model,
                         tracking=False, **kwargs)  # fmt: skip
    assert json.loads((Path(more.path) / "model.json").read_text())["started_from"]["kept"]
    with pytest.raises(SegcoreError, match="both give initial weights"):
        train_op.python_func(model=_artifact(dsl.Model, tmp_path / "x"), metrics=_artifact(dsl.Metrics, tmp_path / "y"),
                             load_weights=pretrained, load_weights_uri=str(tmp_path / "fine"), tracking=False,
                             **kwargs)  # fmt: skip
