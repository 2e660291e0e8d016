"""`segcore train` under torchrun, as users and Kubeflow Trainer start it: --nproc-per-node, two
"nodes" on 127.0.0.1 configured only by PET_* variables, a rank killed with SIGKILL (the others
stop within a bounded time) and --resume with another number of processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_parallel import free_port

from segcore.cli import main
from segcore.data.synthetic import generate

TRAIN = ["train", "Lite-HRNet-s-mod2", "--input-size", "32x32", "--batch-size", "2", "--num-workers", "0"]


def segcore(*args: str) -> list[str]:
    return [sys.executable, "-m", "segcore.cli", *args]


def _env(**extra) -> dict:
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", **extra}


def _epochs(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def _ranked_children(pid: int) -> dict[int, int]:
    """{rank: pid} of the processes below ``pid`` that torchrun started (their RANK variable)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    ranks, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                raw = (Path("/proc") / str(child) / "environ").read_text().split("\0")
                env = dict(v.split("=", 1) for v in raw if "=" in v)
            except OSError:
                continue
            if "RANK" in env and "segcore.cli" in (Path("/proc") / str(child) / "cmdline").read_text():
                ranks.setdefault(int(env["RANK"]), child)
    return ranks


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("torchrun") / "raw", "plain", num_train=8, num_val=3, size=(32, 32), seed=4)


def test_a_killed_rank_stops_the_training_and_resume_continues_with_one_process(raw, tmp_path):
    out = tmp_path / "run"
    cmd = segcore(*TRAIN, "--train-data-root", str(raw.root), "--output", str(out), "--epochs", "30")
    proc = subprocess.Popen([*cmd, "--nproc-per-node", "2", "--dist-timeout", "20"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_epochs(out)) < 2:
        time.sleep(0.05)
    ranks = _ranked_children(proc.pid)
    assert proc.poll() is None and sorted(ranks) == [0, 1], "training ended before a rank could be killed"
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60, "the surviving rank did not stop in bounded time"
    done = _epochs(out)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == done[-1]
    assert not (out / "model.json").exists()

    resumed = subprocess.run([*cmd, "--resume", "--epochs", str(done[-1] + 2)], env=_env(), capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done[-1]}" in resumed.stderr
    assert _epochs(out) == list(range(1, done[-1] + 3))  # nothing redone, nothing skipped
    assert json.loads((out / "model.json").read_text())["train_processes"] == 1


def test_two_nodes_started_by_pet_variables_train_a_bundle_that_eval_accepts(raw, tmp_path, capsys):
    """What Kubeflow Trainer's torch-distributed runtime does: torchrun in every node, configured
    only by PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT."""
    out = tmp_path / "run"
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "-m", "segcore.cli", *TRAIN,
           "--train-data-root", str(raw.root), "--output", str(out), "--epochs", "2", "--json"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            cmd,
            env=_env(
                PET_NNODES="2",
                PET_NPROC_PER_NODE="1",
                PET_NODE_RANK=str(rank),
                PET_MASTER_ADDR="127.0.0.1",
                PET_MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]
    meta = json.loads(results[0][0].strip().splitlines()[-1])
    assert results[1][0].strip() == ""  # rank 0 reports
    assert meta["train_processes"] == 2 and meta["epochs_run"] == 2
    assert _epochs(out) == [1, 2]
    assert main(["eval", str(out), "--test-data-root", str(raw.root / "images" / "val"),
                 "--test-ann-files", str(raw.root / "annotations" / "val"), "--json"]) == 0  # fmt: skip
    scores = json.loads(capsys.readouterr().out)
    assert scores["mdice"] == pytest.approx(meta["best_val_mdice"], abs=1e-6)


def test_nproc_per_node_is_refused_under_torchrun(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*TRAIN, "--train-data-root", str(raw.root), "--output", str(tmp_path / "x"),
                 "--nproc-per-node", "2"]) == 2  # fmt: skip
    assert "already running under torchrun" in capsys.readouterr().err
