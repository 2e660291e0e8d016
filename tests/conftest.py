"""Shared fixtures: real S3 (SeaweedFS) and MLflow servers on loopback, started once per session.

Every test runs with MLflow tracking off (``SEGCORE_TRACKING=off``) and a private S3 cache unless
it asks otherwise (the ``s3_env`` / ``tracking_env`` fixtures), so no test writes ./mlflow.db or
~/.cache.
"""

from __future__ import annotations

import pytest
from servers import MlflowServer, SeaweedS3


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
