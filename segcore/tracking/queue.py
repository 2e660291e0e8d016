"""The ordered, retrying send queue behind a tracker: a background thread sends each call in turn;
when the server fails it warns once, retries with exponential backoff and keeps the queue, so what
is logged during an outage arrives when the server is back."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("segcore.tracking")

# MLflow error codes worth retrying; any other MlflowException is the server rejecting the request.
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "IO_ERROR",
    "UNKNOWN",
    "ABORTED",
}
_MAX_ATTEMPTS_WHEN_UP = 5


class _Op:
    __slots__ = ("what", "fn")

    def __init__(self, what: str, fn: Callable[[], object]):
        self.what, self.fn = what, fn


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server or the network failing. Anything else (the server rejecting a
    request, a bug) is reported and skipped, so one bad call cannot block the queue."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, OSError):  # connection errors, requests' and urllib3's exceptions
        return True
    try:
        from botocore.exceptions import BotoCoreError  # artifacts sent straight to S3
    except ImportError:
        return False
    return isinstance(exc, BotoCoreError)


class SendQueue:
    """Calls sent in order by one daemon thread; ``dropped`` names those given up."""

    def __init__(self, uri: str | None):
        self.uri = uri
        self.dropped: list[str] = []
        self._queue: deque[_Op] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._wake = threading.Event()  # set by stop(): end a backoff wait
        self._outage_since: float | None = None
        self._retry_max = float(os.environ.get("SEGCORE_TRACKING_RETRY_MAX", "10"))
        self._thread = threading.Thread(target=self._work, name="segcore-mlflow", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable[[], object]) -> None:
        with self._cv:
            self._queue.append(_Op(what, fn))
            self._cv.notify_all()

    def _next(self) -> _Op | None:
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            self._busy = True
            return self._queue[0]

    def _work(self) -> None:
        delay, current, attempts = 0.5, None, 0
        while (op := self._next()) is not None:
            if op is not current:
                current, attempts = op, 0
            attempts += 1
            try:
                op.fn()
            except Exception as exc:  # noqa: BLE001 - tracking must never stop the work
                # An outage is retried for as long as it lasts; a call that keeps failing while the
                # server answers (a server-side fault) is given up after a few tries.
                if is_transient(exc) and (attempts < _MAX_ATTEMPTS_WHEN_UP or not self._server_answers()):
                    self._outage(exc, delay)
                    delay = min(delay * 2, self._retry_max)
                    continue
                log.warning("MLflow at %s did not take %s, skipped: %s", self.uri, op.what, _reason(exc))
                self.dropped.append(op.what)
            else:
                if self._outage_since is not None:
                    log.warning(
                        "MLflow at %s is back after %.0fs: sending the queued tracking calls",
                        self.uri,
                        time.monotonic() - self._outage_since,
                    )
                    self._outage_since = None
                delay = 0.5
            self._done(op)

    def _outage(self, exc: Exception, delay: float) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "MLflow at %s failed (%s): the work goes on; %d tracking calls queued, retrying with backoff",
                self.uri,
                _reason(exc),
                len(self._queue),
            )
        else:
            log.debug("MLflow still failing (%s); retry in %.1fs", _reason(exc), delay)
        with self._cv:
            self._busy = False
            self._cv.notify_all()
        self._wake.wait(timeout=delay)

    def _done(self, op: _Op) -> None:
        with self._cv:
            if self._queue and self._queue[0] is op:
                self._queue.popleft()
            self._busy = False
            self._cv.notify_all()

    def _server_answers(self) -> bool:
        if not self.uri or not self.uri.startswith(("http://", "https://")):
            return True  # a local store: no outage to wait for
        import requests

        try:
            requests.get(f"{self.uri.rstrip('/')}/health", timeout=5)
            return True
        except requests.RequestException:
            return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has been sent (or ``timeout`` s); True when the queue is empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left if left is not None else 1.0)
        return True

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def stop(self, timeout: float) -> list[str]:
        """Flush for up to ``timeout`` s, stop the thread; the calls left unsent."""
        done = self.flush(timeout)
        with self._cv:
            left = [] if done else [op.what for op in self._queue]
            self._stop = True
            self._cv.notify_all()
        self._wake.set()
        return left


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
