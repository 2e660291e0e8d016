"""Helpers for tests that kill a training mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path


def kill_after_epochs(cmd: list[str], env: dict, metrics: Path, epochs: int, timeout_s: float) -> list[int]:
    """Start ``cmd``, SIGKILL it once ``metrics`` (metrics.jsonl) holds ``epochs`` lines; return the
    epochs it had finished when it died."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
